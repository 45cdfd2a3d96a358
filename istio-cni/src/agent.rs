//! The node agent's core: adopts the pods enrolled before it started, then serves
//! ztunnel over ZDS and runs the enrollment's background repairs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocol::SeqpacketListener;
use tokio::task::JoinHandle;

use crate::enrollment::{Adopt, EnrollError, Enrollment, Locate, Pod};
use crate::rules::{Family, Iptables, Redirection, RuleConfig};
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
    /// Where pods' processes are looked up (`/proc`).
    pub proc_root: PathBuf,
    /// The address families redirected (`AMBIENT_IPV6` adds IPv6 to IPv4). A pod with an
    /// address of another family is refused.
    pub families: Vec<Family>,
    /// How often every enrolled pod's rules are re-verified and repaired (jittered);
    /// `None`: only on reconciles.
    pub drift_check_interval: Option<Duration>,
}

impl AgentConfig {
    /// An enrollment with this configuration's rules and ZDS server, and nothing else
    /// (no probe set, no status writer).
    pub fn enrollment(&self) -> Enrollment {
        Enrollment::new(
            Redirection::new(self.rules.clone(), self.iptables.clone(), &self.families),
            ZdsServer::new(self.zds_timeout),
            self.proc_root.clone(),
        )
    }
}

/// A running agent. Dropping it stops serving and removes its socket.
pub struct Agent {
    enrollment: Enrollment,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("ZDS socket: {0}")]
    Bind(#[from] protocol::Error),
    #[error("ZDS socket mode {0:o} is world-writable; refusing")]
    WorldWritable(u32),
    #[error("adopting the pods enrolled before this agent started: {0}")]
    Adopt(#[from] EnrollError),
}

impl Agent {
    /// A standalone agent (no Kubernetes): adopts `enrolled`, pods this node enrolled
    /// before, by their netns paths, then serves.
    pub async fn start(cfg: AgentConfig, enrolled: &[Pod]) -> Result<Agent, AgentError> {
        let adopt = enrolled
            .iter()
            .map(|p| Adopt {
                info: p.info(),
                ips: p.ips.clone(),
                locate: Locate::Path(p.netns_path.clone()),
                annotation: None,
            })
            .collect();
        Self::serve(&cfg, cfg.enrollment(), adopt).await
    }

    /// Adopts `adopt` into `enrollment`, then binds the socket and serves, so the first
    /// ztunnel to connect gets every adopted pod in its snapshot.
    pub async fn serve(
        cfg: &AgentConfig,
        enrollment: Enrollment,
        adopt: Vec<Adopt>,
    ) -> Result<Agent, AgentError> {
        if cfg.zds_socket_mode & 0o002 != 0 {
            return Err(AgentError::WorldWritable(cfg.zds_socket_mode));
        }
        enrollment.adopt(adopt).await?;
        let listener = SeqpacketListener::bind(&cfg.zds_socket, cfg.zds_socket_mode)?;
        let serve = enrollment
            .zds()
            .clone()
            .serve(listener, Arc::new(enrollment.clone()));
        let mut tasks = vec![
            tokio::spawn(serve),
            tokio::spawn(enrollment.clone().run_repairs()),
        ];
        if let Some(interval) = cfg.drift_check_interval {
            tasks.push(tokio::spawn(enrollment.clone().run_drift_checks(interval)));
        }
        Ok(Agent { tasks, enrollment })
    }

    pub fn enrollment(&self) -> &Enrollment {
        &self.enrollment
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
