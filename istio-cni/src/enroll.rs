//! The enrollment API: what the pod sources (Kubernetes watches, the CNI plugin) call.
//!
//! `enroll` = enter the pod's netns and install the redirection, hand ztunnel the netns
//! and wait for its ack. `unenroll` = remove the redirection, flush the pod's redirected
//! conntrack entries, tell every ztunnel to drain the pod.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use protocol::zds::WorkloadInfo;
use protocol::{Netns, WorkloadUid};
use tracing::{info, warn};

use crate::rules::{Applied, Redirection, RulesError, Verification};
use crate::zds_server::{AddOutcome, SnapshotEntry, ZdsError, ZdsServer};

/// What the agent knows about a pod it is asked to enroll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub uid: WorkloadUid,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// A path to the pod's netns: `/proc/<pid>/ns/net`, `/var/run/netns/<name>`, …
    pub netns_path: PathBuf,
    pub ips: Vec<IpAddr>,
}

impl Pod {
    fn workload_info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

/// Where an enrolled pod stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrollStatus {
    /// Rules in place and ztunnel's listeners up: traffic flows through ztunnel.
    Enabled,
    /// Rules in place but no ztunnel connected yet: the pod's traffic fails closed until
    /// a ztunnel connects and receives it in its snapshot.
    Pending,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {uid}: cannot open its netns {path}: {source}")]
    Netns {
        uid: WorkloadUid,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {uid}: {source}")]
    Rules {
        uid: WorkloadUid,
        source: RulesError,
    },
    #[error("pod {uid}: {source}")]
    Ztunnel { uid: WorkloadUid, source: ZdsError },
    #[error("pod {uid}: rule worker failed: {source}")]
    Worker {
        uid: WorkloadUid,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Enrolls and unenrolls pods. Cheap to clone.
#[derive(Clone)]
pub struct Enroller {
    redirection: Arc<Redirection>,
    server: ZdsServer,
}

impl Enroller {
    pub fn new(redirection: Redirection, server: ZdsServer) -> Self {
        Enroller {
            redirection: Arc::new(redirection),
            server,
        }
    }

    pub fn server(&self) -> &ZdsServer {
        &self.server
    }

    pub fn redirection(&self) -> &Redirection {
        &self.redirection
    }

    async fn blocking<T: Send + 'static>(
        &self,
        uid: &WorkloadUid,
        netns: Arc<Netns>,
        f: impl FnOnce(&Redirection, &Netns) -> Result<T, RulesError> + Send + 'static,
    ) -> Result<T, EnrollError> {
        let redirection = self.redirection.clone();
        tokio::task::spawn_blocking(move || f(&redirection, &netns))
            .await
            .map_err(|source| EnrollError::Worker {
                uid: uid.clone(),
                source,
            })?
            .map_err(|source| EnrollError::Rules {
                uid: uid.clone(),
                source,
            })
    }

    /// Opens the pod's netns from its path.
    pub fn open(pod: &Pod) -> Result<Arc<Netns>, EnrollError> {
        Netns::open(&pod.netns_path)
            .map(Arc::new)
            .map_err(|source| EnrollError::Netns {
                uid: pod.uid.clone(),
                path: pod.netns_path.clone(),
                source,
            })
    }

    /// Installs the redirection in the pod's netns and hands the netns to ztunnel.
    ///
    /// Returns once ztunnel acked (listeners up), or at once with
    /// [`EnrollStatus::Pending`] when no ztunnel is connected. On error the rules stay
    /// in place, so the pod fails closed; the caller retries or unenrolls.
    pub async fn enroll(&self, pod: &Pod) -> Result<EnrollStatus, EnrollError> {
        self.enroll_netns(pod, Self::open(pod)?).await
    }

    /// [`enroll`](Self::enroll) with the pod's netns already open (found by /proc
    /// discovery rather than given as a path).
    pub async fn enroll_netns(
        &self,
        pod: &Pod,
        netns: Arc<Netns>,
    ) -> Result<EnrollStatus, EnrollError> {
        let applied = self
            .blocking(&pod.uid, netns.clone(), |r, ns| r.apply(ns))
            .await?;
        info!(uid = %pod.uid, pod = %pod.name, namespace = %pod.namespace, netns = %netns.id(),
              rules = if applied == Applied::Changed { "installed" } else { "already in place" },
              "enrolling pod");
        let outcome = self
            .server
            .add(pod.uid.clone(), pod.workload_info(), netns)
            .await
            .map_err(|source| EnrollError::Ztunnel {
                uid: pod.uid.clone(),
                source,
            })?;
        Ok(match outcome {
            AddOutcome::Acked => EnrollStatus::Enabled,
            AddOutcome::NoZtunnel => {
                warn!(uid = %pod.uid, "no ztunnel connected: pod pending, its traffic fails closed until one connects");
                EnrollStatus::Pending
            }
        })
    }

    /// Takes the pod out of the mesh. The netns is the one kept since enrollment, so
    /// this works even when the pod's processes (and its netns path) are already gone.
    pub async fn unenroll(&self, uid: &WorkloadUid) -> Result<(), EnrollError> {
        if let Some(netns) = self.server.netns(uid) {
            self.blocking(uid, netns, |r, ns| r.remove(ns)).await?;
        }
        info!(%uid, "unenrolled pod, telling ztunnel to drain it");
        self.server
            .del(uid)
            .await
            .map_err(|source| EnrollError::Ztunnel {
                uid: uid.clone(),
                source,
            })
    }

    /// Adopts a pod that was enrolled before this agent started (an agent restart):
    /// repairs its rules only where they drifted and puts it in the snapshot, before
    /// any ztunnel connects. A pod whose netns could not be found (`Err`) is sent as
    /// Keep, so ztunnel keeps whatever proxy it runs for it.
    pub async fn adopt(
        &self,
        pod: &Pod,
        netns: Result<Arc<Netns>, EnrollError>,
    ) -> Result<(), EnrollError> {
        match netns {
            Ok(netns) => {
                let applied = self
                    .blocking(&pod.uid, netns.clone(), |r, ns| r.apply(ns))
                    .await?;
                if applied == Applied::Changed {
                    warn!(uid = %pod.uid, "adopted pod had drifted rules; repaired");
                }
                self.server.insert(
                    pod.uid.clone(),
                    SnapshotEntry::Add {
                        info: pod.workload_info(),
                        netns,
                    },
                );
            }
            Err(e) => {
                warn!("{e}; ztunnel will be told to keep its proxy");
                self.server.insert(pod.uid.clone(), SnapshotEntry::Keep);
            }
        }
        Ok(())
    }

    /// Checks an enrolled pod's redirection against the expected one.
    pub async fn verify(&self, uid: &WorkloadUid) -> Option<Result<Verification, EnrollError>> {
        let netns = self.server.netns(uid)?;
        Some(self.blocking(uid, netns, |r, ns| r.verify(ns)).await)
    }
}
