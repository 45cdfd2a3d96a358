//! CNI ADD → enrolled: the time kubelet waits on our plugin for an ambient pod, rules
//! included. The agent and ztunnel run as processes against the in-repo API server;
//! each pod's object exists (Pending) and its network is up before the timed part,
//! which is our plugin's ADD alone: the plugin process, its API lookup, the event to
//! the agent, the agent's rules in the pod, the ZDS Add and ztunnel's ack.

use std::time::Instant;

use anyhow::Context;

use e2e::cluster::{Cluster, AMBIENT};

/// ADD times in milliseconds: of `n` ambient pods, and, as the floor the plugin
/// itself costs (its process, its API lookup), of pods outside the mesh.
pub struct AddTimes {
    pub enrolled: Vec<f64>,
    pub outside: Vec<f64>,
}

pub async fn run(index: u8, n: usize, progress: &dyn Fn(&str)) -> anyhow::Result<AddTimes> {
    let cluster = Cluster::new(index, false).await;
    cluster.namespace("bench", &[AMBIENT]);
    cluster.namespace("plain", &[]);
    cluster.node.write_mesh_config("workloads: []\n");
    let agent = cluster.start_agent(1);
    let ztunnel = cluster.start_ztunnel_mesh(1);
    ztunnel.wait_readiness(200).await;
    // The sandbox is made untimed; the plugin's ADD is timed.
    let add = |namespace: &str, name: String| {
        let pod = cluster.sandbox_before_plugin(namespace, &name);
        let start = Instant::now();
        cluster
            .plugin_add(&pod)
            .with_context(|| format!("CNI ADD of {namespace}/{name}"))?;
        anyhow::Ok((pod, start.elapsed().as_secs_f64() * 1e3))
    };
    let mut pods = Vec::with_capacity(n);
    let mut outside = Vec::new();
    for i in 0..n.div_ceil(5) {
        let (pod, ms) = add("plain", format!("plain-{i}"))?;
        outside.push(ms);
        pods.push(pod);
    }
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let (pod, ms) = add("bench", format!("cni-{i}"))?;
        times.push(ms);
        let captured = pod.iptables_save().contains("ISTIO_OUTPUT");
        anyhow::ensure!(captured, "pod {i}: ADD returned but its rules are not in");
        pods.push(pod);
        if (i + 1) % 25 == 0 {
            progress(&format!("{} pods added through the plugin", i + 1));
        }
    }
    // Pods first (CNI DEL), then the processes, then the node.
    drop(pods);
    drop((agent, ztunnel));
    drop(cluster);
    Ok(AddTimes {
        enrolled: times,
        outside,
    })
}
