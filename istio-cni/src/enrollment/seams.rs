//! The enrollment's side effects, each behind a trait, so that its decisions can be
//! tested with fakes and without root:
//!
//! - [`Redirect`]: put, check and take out the redirection in a pod's netns (today
//!   [`Redirection`]'s iptables and policy routes; a native nftables one later);
//! - [`Ztunnel`]: tell ztunnel about pods (the [`ZdsServer`]);
//! - [`Sandboxes`]: find and open pods' network namespaces on the node (`/proc`).
//!
//! The annotation writer is the fourth ([`super::StatusWriter`]). The real
//! implementations are here too, each a thin forward to its owner.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use protocol::zds::WorkloadInfo;
use protocol::{Netns, NetnsId, WorkloadUid};

use crate::discovery::{find_pod_netns, netns_in_use, node_netns};
use crate::rules::{Applied, Family, Redirection, RulesError, Verification};
use crate::zds_server::{AddOutcome, ZdsError, ZdsServer};

/// Puts, checks and takes out the redirection in a pod's netns. The calls block (they
/// run programs or netlink); the enrollment runs them off the async threads.
pub trait Redirect: Send + Sync + 'static {
    /// The address families redirected.
    fn families(&self) -> Vec<Family>;
    /// Brings the netns's redirection to the expected one, writing nothing when it is
    /// already in place.
    fn apply(&self, netns: &Netns) -> Result<Applied, RulesError>;
    /// Compares the netns's redirection with the expected one.
    fn verify(&self, netns: &Netns) -> Result<Verification, RulesError>;
    /// Takes the redirection out of the netns.
    fn remove(&self, netns: &Netns) -> Result<(), RulesError>;
}

impl Redirect for Redirection {
    fn families(&self) -> Vec<Family> {
        Redirection::families(self)
    }

    fn apply(&self, netns: &Netns) -> Result<Applied, RulesError> {
        Redirection::apply(self, netns)
    }

    fn verify(&self, netns: &Netns) -> Result<Verification, RulesError> {
        Redirection::verify(self, netns)
    }

    fn remove(&self, netns: &Netns) -> Result<(), RulesError> {
        Redirection::remove(self, netns)
    }
}

/// Tells ztunnel about pods. The enrollment makes a pod part of its snapshot before
/// an Add and takes it out before a Del (see [`ZdsServer::add`]).
pub trait Ztunnel: Send + Sync + 'static {
    /// Sends the pod's Add with its netns to the newest ztunnel and waits for the ack.
    fn add(
        &self,
        uid: WorkloadUid,
        info: WorkloadInfo,
        netns: Arc<Netns>,
    ) -> BoxFuture<'_, Result<AddOutcome, ZdsError>>;
    /// Sends Del to every connected ztunnel.
    fn del<'a>(&'a self, uid: &'a WorkloadUid) -> BoxFuture<'a, Result<(), ZdsError>>;
    /// How many ztunnels are connected (and got their snapshot).
    fn connections(&self) -> usize;
}

impl Ztunnel for ZdsServer {
    fn add(
        &self,
        uid: WorkloadUid,
        info: WorkloadInfo,
        netns: Arc<Netns>,
    ) -> BoxFuture<'_, Result<AddOutcome, ZdsError>> {
        Box::pin(ZdsServer::add(self, uid, info, netns))
    }

    fn del<'a>(&'a self, uid: &'a WorkloadUid) -> BoxFuture<'a, Result<(), ZdsError>> {
        Box::pin(ZdsServer::del(self, uid))
    }

    fn connections(&self) -> usize {
        ZdsServer::connections(self)
    }
}

/// Finds and opens pods' network namespaces on the node. The calls block (they read
/// `/proc`); the enrollment runs the scans off the async threads.
pub trait Sandboxes: Send + Sync + 'static {
    /// Opens the pod netns at `path`, refusing the node's own (a request naming it would
    /// otherwise put redirection rules on the node and ztunnel's listeners on the host).
    fn open(&self, path: &Path) -> io::Result<Netns>;
    /// The identity of the netns `path` names now, if it opens.
    fn id_at(&self, path: &Path) -> Option<NetnsId>;
    /// The netns of each wanted pod (uid → its IPs), never one in `exclude`.
    fn find(
        &self,
        wanted: &HashMap<String, Vec<IpAddr>>,
        exclude: &HashSet<NetnsId>,
    ) -> io::Result<HashMap<String, Netns>>;
    /// Every netns some process is in: the sandboxes that still exist.
    fn in_use(&self) -> io::Result<HashSet<NetnsId>>;
}

/// The node's `/proc` (or a pod's view of it, mounted elsewhere).
#[derive(Clone, Debug)]
pub struct ProcSandboxes {
    pub proc_root: PathBuf,
}

impl Sandboxes for ProcSandboxes {
    fn open(&self, path: &Path) -> io::Result<Netns> {
        let netns = Netns::open(path)?;
        if node_netns(&self.proc_root).contains(&netns.id()) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "it is the node's own network namespace, not a pod's: refusing to redirect the node's traffic",
            ));
        }
        Ok(netns)
    }

    fn id_at(&self, path: &Path) -> Option<NetnsId> {
        Netns::open(path).ok().map(|n| n.id())
    }

    fn find(
        &self,
        wanted: &HashMap<String, Vec<IpAddr>>,
        exclude: &HashSet<NetnsId>,
    ) -> io::Result<HashMap<String, Netns>> {
        find_pod_netns(&self.proc_root, wanted, exclude)
    }

    fn in_use(&self) -> io::Result<HashSet<NetnsId>> {
        netns_in_use(&self.proc_root)
    }
}
