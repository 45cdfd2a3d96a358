//! What the agent holds for each pod it enrolls, and the pure decisions made on it:
//! which sandbox a pod is captured in, what its annotation says, what a newly connected
//! ztunnel gets in its snapshot, and whether a CNI DEL is about the current sandbox.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::zds::WorkloadInfo;
use protocol::{Netns, NetnsId, WorkloadUid};

use crate::zds_server::SnapshotEntry;

/// A pod by namespace and name. Its uid changes when the object is recreated (a
/// StatefulSet pod), so a key may name several uids over time.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Who a pod is: what ztunnel needs to pick its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: WorkloadUid,
    pub key: PodKey,
    pub service_account: String,
}

impl PodInfo {
    pub fn workload_info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.key.name.clone(),
            namespace: self.key.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

/// One sandbox of a pod: its network namespace (held open while enrolled) and, when the
/// container runtime told us (CNI), its container id. Kubelet recreates a pod's sandbox
/// under the same uid after a node reboot or when the first one died; the netns
/// identity and the container id are what tell two sandboxes apart.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub netns: Arc<Netns>,
    pub container_id: Option<String>,
    /// The path it was enrolled from (`CNI_NETNS`, `/var/run/netns/<name>`), when known:
    /// while it still names this netns, the sandbox exists.
    pub path: Option<std::path::PathBuf>,
}

impl Sandbox {
    pub fn id(&self) -> NetnsId {
        self.netns.id()
    }

    /// Whether a CNI DEL naming `container_id` and a netns of identity `netns` (when the
    /// netns still opens) is about this sandbox. The container id decides when both
    /// sides know one; otherwise the netns identity must match. A DEL that cannot be
    /// matched is not ours: unenrolling on a guess could take a newer sandbox out of
    /// the mesh, while ignoring a real DEL only leaves a dying sandbox captured.
    pub fn deleted_by(&self, container_id: Option<&str>, netns: Option<NetnsId>) -> bool {
        match (self.container_id.as_deref(), container_id) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => netns == Some(self.id()),
        }
    }
}

/// Where an enrolled pod stands.
#[derive(Clone, Debug)]
pub enum PodState {
    /// Rules are in the sandbox's netns. `acked` once ztunnel confirmed it listens in
    /// this very netns (a live Add or this pod's Add in a snapshot); until then the
    /// pod's traffic fails closed.
    Captured { sandbox: Sandbox, acked: bool },
    /// Enrolled before this agent started, but its netns was not found (after a node
    /// reboot its sandbox is gone until kubelet recreates it): ztunnel is told to keep
    /// whatever proxy it runs, and the next sandbox is enrolled when it shows up.
    Unlocated,
    /// Its sandbox was torn down (CNI DEL): ztunnel was told to drop it; the pod waits
    /// for kubelet's next sandbox.
    NoSandbox,
    /// Out of the mesh; kept only until its annotation is removed.
    Left,
}

/// The `ambient.istio.io/redirection` annotation values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Annotation {
    /// Rules in place and ztunnel acked the pod's current sandbox.
    Enabled,
    /// In the mesh, but not (yet) confirmed by ztunnel: the pod's traffic fails closed.
    Pending,
}

impl Annotation {
    pub fn as_str(self) -> &'static str {
        match self {
            Annotation::Enabled => "enabled",
            Annotation::Pending => "pending",
        }
    }

    pub fn parse(value: &str) -> Option<Annotation> {
        match value {
            "enabled" => Some(Annotation::Enabled),
            "pending" => Some(Annotation::Pending),
            _ => None,
        }
    }
}

/// What an object's annotation value tells us was written: `None` when we cannot tell
/// (a value we do not recognise is rewritten).
pub fn observed(value: Option<&str>) -> Option<Option<Annotation>> {
    match value {
        None => Some(None),
        Some(v) => Annotation::parse(v).map(Some),
    }
}

impl PodState {
    /// What the pod's annotation should say (`None`: no annotation).
    pub fn annotation(&self) -> Option<Annotation> {
        match self {
            PodState::Captured { acked: true, .. } => Some(Annotation::Enabled),
            PodState::Captured { acked: false, .. } | PodState::Unlocated => {
                Some(Annotation::Pending)
            }
            PodState::NoSandbox | PodState::Left => None,
        }
    }

    pub fn sandbox(&self) -> Option<&Sandbox> {
        match self {
            PodState::Captured { sandbox, .. } => Some(sandbox),
            _ => None,
        }
    }
}

/// Retry pacing for the background repairs of one pod.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    failures: u32,
    next: Option<Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    pub fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| t <= now)
    }

    pub fn failed(&mut self, now: Instant) {
        let delay = Self::FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        self.next = Some(now + delay);
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Netns identities of a pod's torn-down sandboxes remembered, so /proc discovery never
/// re-enrolls a dying sandbox. Bounded: a pod has few sandboxes in its life.
const RETIRED: usize = 8;

/// Everything the agent holds for one pod uid.
#[derive(Clone, Debug)]
pub struct Entry {
    pub pod: PodInfo,
    pub ips: Vec<IpAddr>,
    pub state: PodState,
    pub retired: Vec<NetnsId>,
    /// The annotation the pod object carries as far as we know: `None` when unknown
    /// (never written or seen, or a value we do not recognise).
    pub written: Option<Option<Annotation>>,
    pub backoff: Backoff,
    /// Drift checks in a row whose repair failed.
    pub repair_failures: u32,
    /// Why the agent gave up repairing this sandbox's redirection (reported once; a new
    /// sandbox or the pod's removal clears it).
    pub unrepairable: Option<String>,
}

impl Entry {
    pub fn new(pod: PodInfo, ips: Vec<IpAddr>, state: PodState) -> Entry {
        Entry {
            pod,
            ips,
            state,
            retired: Vec::new(),
            written: None,
            backoff: Backoff::default(),
            repair_failures: 0,
            unrepairable: None,
        }
    }

    /// Remembers `id` as a torn-down sandbox.
    pub fn retire(&mut self, id: NetnsId) {
        if !self.retired.contains(&id) {
            if self.retired.len() == RETIRED {
                self.retired.remove(0);
            }
            self.retired.push(id);
        }
    }

    /// Whether the object's annotation must be (re)written.
    pub fn annotation_stale(&self) -> bool {
        self.written != Some(self.state.annotation())
    }

    /// Whether ztunnel has yet to confirm the current sandbox.
    pub fn unacked(&self) -> bool {
        matches!(self.state, PodState::Captured { acked: false, .. })
    }

    /// What a newly connected ztunnel is told about this pod, if anything.
    pub fn snapshot_entry(&self) -> Option<SnapshotEntry> {
        match &self.state {
            PodState::Captured { sandbox, .. } => Some(SnapshotEntry::Add {
                info: self.pod.workload_info(),
                netns: sandbox.netns.clone(),
            }),
            PodState::Unlocated => Some(SnapshotEntry::Keep),
            PodState::NoSandbox | PodState::Left => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(container: Option<&str>) -> Sandbox {
        Sandbox {
            netns: Arc::new(Netns::current().unwrap()),
            container_id: container.map(str::to_string),
            path: None,
        }
    }

    fn other_netns() -> NetnsId {
        let here = Netns::current().unwrap().id();
        NetnsId {
            dev: here.dev,
            inode: here.inode + 1,
        }
    }

    #[test]
    fn a_del_is_matched_by_container_id_when_both_know_one_else_by_netns() {
        let here = Some(Netns::current().unwrap().id());
        let s = sandbox(Some("c1"));
        assert!(s.deleted_by(Some("c1"), None), "netns already gone");
        assert!(
            !s.deleted_by(Some("c0"), here),
            "a late DEL of an older sandbox"
        );
        let discovered = sandbox(None);
        assert!(discovered.deleted_by(Some("c9"), here));
        assert!(!discovered.deleted_by(Some("c9"), Some(other_netns())));
        assert!(
            !discovered.deleted_by(Some("c9"), None),
            "unmatchable: never unenroll on a guess"
        );
        assert!(!discovered.deleted_by(None, None));
    }

    fn entry(state: PodState) -> Entry {
        let key = PodKey {
            namespace: "ns".into(),
            name: "p".into(),
        };
        let pod = PodInfo {
            uid: WorkloadUid::new("u"),
            key,
            service_account: "sa".into(),
        };
        Entry::new(pod, vec![], state)
    }

    #[test]
    fn the_annotation_says_enabled_only_for_an_acked_sandbox() {
        let acked = entry(PodState::Captured {
            sandbox: sandbox(None),
            acked: true,
        });
        assert_eq!(acked.state.annotation(), Some(Annotation::Enabled));
        let unacked = entry(PodState::Captured {
            sandbox: sandbox(None),
            acked: false,
        });
        assert_eq!(unacked.state.annotation(), Some(Annotation::Pending));
        assert_eq!(
            entry(PodState::Unlocated).state.annotation(),
            Some(Annotation::Pending)
        );
        assert_eq!(entry(PodState::NoSandbox).state.annotation(), None);
        assert_eq!(entry(PodState::Left).state.annotation(), None);
        assert!(unacked.unacked() && !acked.unacked());
        assert_eq!(Annotation::parse("enabled"), Some(Annotation::Enabled));
        assert_eq!(Annotation::parse("garbage"), None);
    }

    #[test]
    fn the_snapshot_adds_captured_pods_keeps_unlocated_ones_and_skips_the_rest() {
        let captured = entry(PodState::Captured {
            sandbox: sandbox(None),
            acked: false,
        });
        assert!(matches!(
            captured.snapshot_entry(),
            Some(SnapshotEntry::Add { .. })
        ));
        assert!(matches!(
            entry(PodState::Unlocated).snapshot_entry(),
            Some(SnapshotEntry::Keep)
        ));
        assert!(entry(PodState::NoSandbox).snapshot_entry().is_none());
        assert!(entry(PodState::Left).snapshot_entry().is_none());
    }

    #[test]
    fn annotation_staleness_and_retired_sandboxes() {
        let mut e = entry(PodState::NoSandbox);
        assert!(e.annotation_stale(), "unknown is stale");
        e.written = Some(None);
        assert!(!e.annotation_stale());
        for i in 0..20 {
            e.retire(NetnsId { dev: 1, inode: i });
            e.retire(NetnsId { dev: 1, inode: i });
        }
        assert_eq!(e.retired.len(), RETIRED);
        assert_eq!(e.retired.last().unwrap().inode, 19);
    }

    #[test]
    fn backoff_grows_and_resets() {
        let now = Instant::now();
        let mut b = Backoff::default();
        assert!(b.due(now));
        b.failed(now);
        assert!(!b.due(now));
        assert!(b.due(now + Duration::from_millis(200)));
        for _ in 0..10 {
            b.failed(now);
        }
        assert!(b.due(now + Backoff::MAX));
        assert!(!b.due(now + Duration::from_secs(4)));
        b.reset();
        assert!(b.due(now));
    }
}
