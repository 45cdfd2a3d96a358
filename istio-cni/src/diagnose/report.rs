//! What the agent tells `istio-cni diagnose` about itself and its pods
//! (`/debug/enrollment` on the loopback debug port): enough to find each pod's netns (the
//! descriptor the agent holds, opened through `/proc/<agent>/fd/<n>`) and ztunnel (the
//! pid of each ZDS peer).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// The agent's process id.
    pub pid: u32,
    /// The connected ztunnels' process ids, oldest connection first.
    pub ztunnel_pids: Vec<i32>,
    /// The address families redirected (`IPv4`, `IPv6`).
    pub families: Vec<String>,
    pub pods: Vec<PodReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodReport {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// `captured` (rules in place), `unlocated` (enrolled before a restart, sandbox
    /// not found yet), `no-sandbox` (torn down, waiting for the next), `left`.
    pub state: String,
    /// Whether ztunnel confirmed the current sandbox.
    pub acked: bool,
    /// The annotation value the agent stands for (`enabled`, `pending`, none).
    pub annotation: Option<String>,
    /// The captured sandbox's netns (`net:[inode]`).
    pub netns: Option<String>,
    /// The agent's descriptor of that netns.
    pub netns_fd: Option<i32>,
    /// Why the agent gave up on the pod's redirection, if it did.
    pub unrepairable: Option<String>,
}
