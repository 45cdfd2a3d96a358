//! The node agent as a whole: binds the ZDS socket, adopts pods enrolled before it
//! started, and serves ztunnel.

use std::path::PathBuf;
use std::time::Duration;

use protocol::SeqpacketListener;
use tokio::task::JoinHandle;

use crate::enroll::{EnrollError, Enroller, Pod};
use crate::rules::{Iptables, Redirection, RuleConfig};
use crate::zds_server::ZdsServer;

/// Settings of the agent's core.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where ztunnel connects (`/var/run/ztunnel/ztunnel.sock`).
    pub zds_socket: PathBuf,
    /// Permission bits of the socket file: never world-writable.
    pub zds_socket_mode: u32,
    /// Bound on each ZDS write and each ack.
    pub zds_timeout: Duration,
    pub rules: RuleConfig,
    pub iptables: Iptables,
}

/// A running agent. Dropping it stops serving and removes its socket.
pub struct Agent {
    enroller: Enroller,
    serve: JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("ZDS socket: {0}")]
    Bind(#[from] protocol::Error),
    #[error("ZDS socket mode {0:o} is world-writable; refusing")]
    WorldWritable(u32),
    #[error("adopting an already enrolled pod: {0}")]
    Adopt(#[from] EnrollError),
}

impl Agent {
    /// Adopts `enrolled` (pods this node had enrolled before the agent started), then
    /// binds the socket and serves, so the first ztunnel to connect gets them all.
    pub async fn start(cfg: AgentConfig, enrolled: &[Pod]) -> Result<Agent, AgentError> {
        let adopt = enrolled
            .iter()
            .map(|p| (p.clone(), Enroller::open(p)))
            .collect();
        Self::start_adopting(cfg, adopt).await
    }

    /// Like [`Agent::start`], with each pod's netns already looked up (an `Err` when it
    /// could not be found: ztunnel is told to keep its proxy).
    pub async fn start_adopting(
        cfg: AgentConfig,
        enrolled: Vec<(Pod, Result<std::sync::Arc<protocol::Netns>, EnrollError>)>,
    ) -> Result<Agent, AgentError> {
        if cfg.zds_socket_mode & 0o002 != 0 {
            return Err(AgentError::WorldWritable(cfg.zds_socket_mode));
        }
        let server = ZdsServer::new(cfg.zds_timeout);
        let enroller = Enroller::new(Redirection::new(cfg.rules, cfg.iptables), server.clone());
        for (pod, netns) in enrolled {
            enroller.adopt(&pod, netns).await?;
        }
        let listener = SeqpacketListener::bind(&cfg.zds_socket, cfg.zds_socket_mode)?;
        let serve = tokio::spawn(server.serve(listener));
        Ok(Agent { enroller, serve })
    }

    pub fn enroller(&self) -> &Enroller {
        &self.enroller
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.serve.abort();
    }
}
