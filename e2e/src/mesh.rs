//! The usual starting point of a test: the agent serving the node's ZDS socket, one
//! ztunnel connected to it, and some pods enrolled.

use istio_cni::{Agent, EnrollStatus, Startup};

use crate::{TestNode, TestPod, Ztunnel};

pub struct Mesh {
    pub agent: Agent,
    pub ztunnel: Ztunnel,
}

impl Mesh {
    /// Starts the agent and ztunnel number 1, waits for their ZDS session, then enrolls
    /// `pods` and checks that each is enabled (ztunnel acked its listeners).
    pub async fn start(node: &TestNode, pods: &[&TestPod]) -> Mesh {
        let agent = Agent::start(&node.agent_config(), Startup::default())
            .await
            .expect("start agent");
        let ztunnel = Ztunnel::start(node, 1);
        agent.zds().wait_for_connections(1).await;
        let mesh = Mesh { agent, ztunnel };
        for pod in pods {
            mesh.enroll(pod).await;
        }
        mesh
    }

    /// Like [`Mesh::start`] with ztunnel in mesh mode (the node's local config, which
    /// must be written first, and CA), plus `env` for ztunnel.
    pub async fn start_in_mesh(node: &TestNode, pods: &[&TestPod], env: &[(&str, &str)]) -> Mesh {
        let agent = Agent::start(&node.agent_config(), Startup::default())
            .await
            .expect("start agent");
        let ztunnel = Ztunnel::start_mesh(node, 1, env);
        agent.zds().wait_for_connections(1).await;
        let mesh = Mesh { agent, ztunnel };
        for pod in pods {
            mesh.enroll(pod).await;
        }
        mesh
    }

    /// Enrolls `pod`, which must end up enabled.
    pub async fn enroll(&self, pod: &TestPod) {
        let status = self
            .agent
            .enrollment()
            .enroll(&pod.pod())
            .await
            .expect("enroll");
        assert_eq!(status, EnrollStatus::Enabled, "pod {}", pod.name);
    }
}
