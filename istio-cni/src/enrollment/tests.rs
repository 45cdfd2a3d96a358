//! The enrollment's decisions, tested without root: every side effect goes through a
//! fake of its seam ([`super::seams`], the annotation writer), and each fake writes
//! what it was asked into one shared trace. A case is a list of events (a CNI ADD or
//! DEL, a watch reconcile, a removal, an adoption, a drift round, a ztunnel
//! connecting, a fault) and the trace they must produce, results included; the
//! kernel's side stays with the root e2e tests.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use protocol::zds::WorkloadInfo;
use protocol::{Netns, NetnsId, WorkloadUid};

use super::*;
use crate::rules::route::RouteState;
use crate::rules::save::Drift;
use crate::rules::FamilyVerification;

/// What the fakes were asked, in order, and what each step returned.
#[derive(Clone, Default)]
struct Trace(Arc<Mutex<Vec<String>>>);

impl Trace {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Sandbox names by netns identity, so the trace reads `sb1`, not `net:[4026…]`.
#[derive(Clone, Default)]
struct Names(Arc<Mutex<HashMap<NetnsId, String>>>);

impl Names {
    fn of(&self, id: NetnsId) -> String {
        let names = self.0.lock().unwrap();
        names.get(&id).cloned().unwrap_or_else(|| id.to_string())
    }
}

#[derive(Default)]
struct RulesState {
    installed: HashSet<NetnsId>,
    /// Sandboxes whose rules something else changed.
    tampered: HashSet<NetnsId>,
    /// Applies that fail from now on (`u32::MAX`: all).
    failing_applies: u32,
    failing_verify: bool,
}

struct FakeRules {
    trace: Trace,
    names: Names,
    state: Mutex<RulesState>,
}

fn injected() -> RulesError {
    RulesError::Addresses(io::Error::other("injected failure"))
}

impl Redirect for FakeRules {
    fn families(&self) -> Vec<Family> {
        vec![Family::V4]
    }

    fn apply(&self, netns: &Netns) -> Result<Applied, RulesError> {
        let name = self.names.of(netns.id());
        let mut st = self.state.lock().unwrap();
        if st.failing_applies > 0 {
            st.failing_applies = st
                .failing_applies
                .saturating_sub(u32::from(st.failing_applies != u32::MAX));
            self.trace.push(format!("rules apply {name}: fails"));
            return Err(injected());
        }
        let changed = st.installed.insert(netns.id()) | st.tampered.remove(&netns.id());
        self.trace.push(format!(
            "rules apply {name}: {}",
            if changed { "written" } else { "unchanged" }
        ));
        Ok(if changed {
            Applied::Changed
        } else {
            Applied::Unchanged
        })
    }

    fn verify(&self, netns: &Netns) -> Result<Verification, RulesError> {
        let name = self.names.of(netns.id());
        let st = self.state.lock().unwrap();
        if st.failing_verify {
            self.trace.push(format!("rules verify {name}: fails"));
            return Err(injected());
        }
        let clean = st.installed.contains(&netns.id()) && !st.tampered.contains(&netns.id());
        self.trace.push(format!(
            "rules verify {name}: {}",
            if clean { "clean" } else { "drifted" }
        ));
        let missing = if clean {
            vec![]
        } else {
            vec!["nat: -A ISTIO_OUTPUT …".to_string()]
        };
        Ok(Verification {
            families: vec![FamilyVerification {
                family: Family::V4,
                iptables: Drift {
                    missing,
                    extra: vec![],
                },
                route: RouteState {
                    rule: true,
                    route: true,
                },
                expected_rule: String::new(),
                expected_route: String::new(),
            }],
        })
    }

    fn remove(&self, netns: &Netns) -> Result<(), RulesError> {
        let name = self.names.of(netns.id());
        self.state.lock().unwrap().installed.remove(&netns.id());
        self.trace.push(format!("rules remove {name}"));
        Ok(())
    }
}

/// How the fake ztunnel answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Zt {
    /// None connected.
    Gone,
    Acks,
    Refuses,
}

struct FakeZtunnel {
    trace: Trace,
    names: Names,
    mode: Mutex<Zt>,
}

impl FakeZtunnel {
    fn mode(&self) -> Zt {
        *self.mode.lock().unwrap()
    }
}

impl Ztunnel for FakeZtunnel {
    fn add(
        &self,
        uid: WorkloadUid,
        _info: WorkloadInfo,
        netns: Arc<Netns>,
    ) -> BoxFuture<'_, Result<AddOutcome, ZdsError>> {
        let mode = self.mode();
        self.trace.push(format!(
            "ztunnel add {uid} {}: {}",
            self.names.of(netns.id()),
            match mode {
                Zt::Gone => "none connected",
                Zt::Acks => "acked",
                Zt::Refuses => "refused",
            }
        ));
        Box::pin(async move {
            match mode {
                Zt::Gone => Ok(AddOutcome::NoZtunnel),
                Zt::Acks => Ok(AddOutcome::Acked),
                Zt::Refuses => Err(ZdsError::Rejected {
                    kind: "Add",
                    uid: uid.to_string(),
                    error: "no".into(),
                }),
            }
        })
    }

    fn del<'a>(&'a self, uid: &'a WorkloadUid) -> BoxFuture<'a, Result<(), ZdsError>> {
        self.trace.push(format!("ztunnel del {uid}"));
        Box::pin(async { Ok(()) })
    }

    fn connections(&self) -> usize {
        usize::from(self.mode() != Zt::Gone)
    }
}

/// The node's sandboxes: stand-in netns handles by path, and which pod a `/proc` scan
/// would find in which.
#[derive(Default)]
struct SandboxesState {
    by_path: HashMap<PathBuf, Netns>,
    /// uid → the sandbox a scan of `/proc` finds it in.
    by_uid: HashMap<String, PathBuf>,
    alive: HashSet<NetnsId>,
}

struct FakeSandboxes {
    trace: Trace,
    state: Mutex<SandboxesState>,
}

const NODE: &str = "/proc/1/ns/net";

impl Sandboxes for FakeSandboxes {
    fn open(&self, path: &Path) -> io::Result<Netns> {
        if path == Path::new(NODE) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the node's own",
            ));
        }
        let st = self.state.lock().unwrap();
        match st.by_path.get(path) {
            Some(ns) => ns.try_clone(),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn id_at(&self, path: &Path) -> Option<NetnsId> {
        self.state.lock().unwrap().by_path.get(path).map(Netns::id)
    }

    fn find(
        &self,
        wanted: &HashMap<String, Vec<IpAddr>>,
        exclude: &HashSet<NetnsId>,
    ) -> io::Result<HashMap<String, Netns>> {
        let st = self.state.lock().unwrap();
        let mut out = HashMap::new();
        for uid in wanted.keys() {
            let found = st.by_uid.get(uid).and_then(|p| st.by_path.get(p));
            if let Some(ns) = found.filter(|ns| !exclude.contains(&ns.id())) {
                out.insert(uid.clone(), ns.try_clone()?);
            }
        }
        self.trace.push(format!(
            "scan /proc: found {}",
            if out.is_empty() { "nothing" } else { "it" }
        ));
        Ok(out)
    }

    fn in_use(&self) -> io::Result<HashSet<NetnsId>> {
        Ok(self.state.lock().unwrap().alive.clone())
    }
}

struct FakeStatus {
    trace: Trace,
    failing: Mutex<bool>,
}

impl StatusWriter for FakeStatus {
    fn write<'a>(
        &'a self,
        pod: &'a PodInfo,
        value: Option<Annotation>,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        let failing = *self.failing.lock().unwrap();
        let value = value.map_or("(none)", Annotation::as_str);
        self.trace.push(format!(
            "annotate {} {value}{}",
            pod.uid,
            if failing { ": fails" } else { "" }
        ));
        Box::pin(async move {
            match failing {
                true => Err(StatusError {
                    pod: pod.key.to_string(),
                    reason: "injected".into(),
                }),
                false => Ok(()),
            }
        })
    }

    fn warn<'a>(
        &'a self,
        pod: &'a PodInfo,
        reason: &'a str,
        _message: &'a str,
    ) -> BoxFuture<'a, Result<(), StatusError>> {
        self.trace.push(format!("event {} {reason}", pod.uid));
        Box::pin(async { Ok(()) })
    }
}

/// One enrollment with fakes behind every seam.
struct World {
    trace: Trace,
    names: Names,
    rules: Arc<FakeRules>,
    ztunnel: Arc<FakeZtunnel>,
    sandboxes: Arc<FakeSandboxes>,
    status: Arc<FakeStatus>,
    enrollment: Enrollment,
}

const UID: &str = "u1";

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

fn info() -> PodInfo {
    PodInfo {
        uid: WorkloadUid::new(UID),
        key: PodKey {
            namespace: "ns".into(),
            name: "p".into(),
        },
        service_account: "sa".into(),
    }
}

fn path_of(sandbox: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{sandbox}"))
}

impl World {
    fn new() -> World {
        let trace = Trace::default();
        let names = Names::default();
        let rules = Arc::new(FakeRules {
            trace: trace.clone(),
            names: names.clone(),
            state: Mutex::default(),
        });
        let ztunnel = Arc::new(FakeZtunnel {
            trace: trace.clone(),
            names: names.clone(),
            mode: Mutex::new(Zt::Acks),
        });
        let sandboxes = Arc::new(FakeSandboxes {
            trace: trace.clone(),
            state: Mutex::default(),
        });
        let status = Arc::new(FakeStatus {
            trace: trace.clone(),
            failing: Mutex::new(false),
        });
        let enrollment = Enrollment::new(Parts {
            redirect: rules.clone(),
            ztunnel: ztunnel.clone(),
            sandboxes: sandboxes.clone(),
            probes: None,
            status: Some(status.clone()),
            metrics: SharedMetrics::default(),
        });
        World {
            trace,
            names,
            rules,
            ztunnel,
            sandboxes,
            status,
            enrollment,
        }
    }

    /// A new sandbox named `name` for the pod, alive and findable in `/proc`.
    fn sandbox(&self, name: &str) {
        let ns = Netns::stand_in().expect("a stand-in netns");
        self.names.0.lock().unwrap().insert(ns.id(), name.into());
        let mut st = self.sandboxes.state.lock().unwrap();
        st.alive.insert(ns.id());
        st.by_uid.insert(UID.into(), path_of(name));
        st.by_path.insert(path_of(name), ns);
    }

    fn id_of(&self, name: &str) -> NetnsId {
        let st = self.sandboxes.state.lock().unwrap();
        st.by_path[&path_of(name)].id()
    }

    async fn run(&self, step: &Step) {
        let uid = WorkloadUid::new(UID);
        let t = &self.trace;
        match step {
            Step::Sandbox(name) => self.sandbox(name),
            Step::Vanish(name) => {
                let mut st = self.sandboxes.state.lock().unwrap();
                if let Some(ns) = st.by_path.remove(&path_of(name)) {
                    st.alive.remove(&ns.id());
                }
                st.by_uid.remove(UID);
            }
            Step::Installed(name) => {
                let id = self.id_of(name);
                self.rules.state.lock().unwrap().installed.insert(id);
            }
            Step::Tamper(name) => {
                let id = self.id_of(name);
                self.rules.state.lock().unwrap().tampered.insert(id);
            }
            Step::RulesFail(n) => self.rules.state.lock().unwrap().failing_applies = *n,
            Step::VerifyFails => self.rules.state.lock().unwrap().failing_verify = true,
            Step::ZtunnelIs(mode) => *self.ztunnel.mode.lock().unwrap() = *mode,
            Step::StatusFails(on) => *self.status.failing.lock().unwrap() = *on,
            Step::Add(name, container) => {
                let pod = Pod {
                    uid: uid.clone(),
                    name: "p".into(),
                    namespace: "ns".into(),
                    service_account: "sa".into(),
                    netns_path: if *name == "node" {
                        PathBuf::from(NODE)
                    } else {
                        path_of(name)
                    },
                    ips: vec![ip(1)],
                    container_id: Some((*container).into()),
                };
                let r = self.enrollment.enroll(&pod).await;
                t.push(format!("=> ADD {name}: {}", outcome(r)));
            }
            Step::Del(container, name) => {
                let del = SandboxDel {
                    key: info().key,
                    uid: Some(uid.clone()),
                    container_id: container.map(str::to_string),
                    netns_path: name.map(path_of),
                };
                let r = self.enrollment.cni_del(del).await;
                t.push(format!("=> DEL: {}", outcome(r)));
            }
            Step::Watch(ips, annotation) => {
                let want = Wanted {
                    info: info(),
                    ips: ips.iter().map(|i| ip(*i)).collect(),
                    annotation: annotation.map(str::to_string),
                };
                let r = self.enrollment.ensure(want).await;
                t.push(format!("=> watch: {}", outcome(r)));
            }
            Step::Leave(why) => {
                let r = self.enrollment.remove(&uid, *why).await;
                t.push(format!("=> leave {why:?}: {}", outcome(r)));
            }
            Step::Adopted(locate, annotation) => {
                let adopt = Adopt {
                    info: info(),
                    ips: vec![ip(1)],
                    locate: match locate {
                        Some(name) => Locate::Path(path_of(name)),
                        None => Locate::Discover,
                    },
                    annotation: annotation.map(str::to_string),
                };
                let r = self.enrollment.adopt(vec![adopt]).await;
                t.push(format!("=> adopt: {}", outcome(r)));
            }
            Step::DriftRound => {
                self.enrollment.check_all_rules().await;
                t.push("=> drift round".into());
            }
            Step::Repair => {
                self.enrollment.repair(&uid).await;
                t.push("=> repair".into());
            }
            Step::Snapshot(answer) => {
                let entries = self.enrollment.snapshot();
                let mut said = Vec::new();
                for (uid, entry) in &entries {
                    said.push(match entry {
                        SnapshotEntry::Add { netns, .. } => {
                            format!("add {uid} {}", self.names.of(netns.id()))
                        }
                        SnapshotEntry::Keep => format!("keep {uid}"),
                    });
                    let refused = ZdsError::Rejected {
                        kind: "Add",
                        uid: uid.to_string(),
                        error: "no".into(),
                    };
                    let result = if *answer { Ok(()) } else { Err(&refused) };
                    self.enrollment.snapshot_answered(uid, entry, result);
                }
                // The answers are recorded by tasks of their own.
                for _ in 0..100 {
                    tokio::task::yield_now().await;
                }
                t.push(format!("=> snapshot: [{}]", said.join(", ")));
            }
        }
    }

    /// Where the pod stands, in words.
    fn state(&self) -> String {
        let uid = WorkloadUid::new(UID);
        let pods = self.enrollment.pods();
        let Some(e) = pods.get(&uid) else {
            return "forgotten".into();
        };
        let mut out = match &e.state {
            PodState::Captured { sandbox, acked } => format!(
                "captured {} {}",
                self.names.of(sandbox.id()),
                if *acked { "acked" } else { "unacked" }
            ),
            PodState::Unlocated => "unlocated".into(),
            PodState::NoSandbox => "no sandbox".into(),
            PodState::Left => "left".into(),
        };
        if e.unrepairable.is_some() {
            out.push_str(", unrepairable");
        }
        if e.annotation_stale() {
            out.push_str(", annotation stale");
        }
        out
    }
}

fn outcome<T: std::fmt::Debug>(r: Result<T, EnrollError>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}").replace("ok ()", "ok"),
        Err(EnrollError::Netns { .. }) => "error: netns".into(),
        Err(EnrollError::Rules { .. }) => "error: rules".into(),
        Err(EnrollError::Ztunnel { .. }) => "error: ztunnel".into(),
        Err(EnrollError::NotFound(_)) => "error: not found".into(),
        Err(e) => format!("error: {e}"),
    }
}

/// One event of a case.
#[derive(Debug)]
enum Step {
    /// A new sandbox of the pod, by name (its path is `/var/run/netns/<name>`).
    Sandbox(&'static str),
    /// The sandbox is gone: its path names nothing and no process is in it.
    Vanish(&'static str),
    /// The sandbox already has its rules (put there before the agent restarted).
    Installed(&'static str),
    /// Something else changed the sandbox's rules.
    Tamper(&'static str),
    /// The next `n` rule applies fail (`u32::MAX`: all of them).
    RulesFail(u32),
    /// Every rule verification fails.
    VerifyFails,
    ZtunnelIs(Zt),
    StatusFails(bool),
    /// CNI ADD in a sandbox, with the container id (`"node"`: the node's own netns).
    Add(&'static str, &'static str),
    /// CNI DEL with a container id and a netns path, when the runtime passed them.
    Del(Option<&'static str>, Option<&'static str>),
    /// A watch reconcile: the pod is wanted, with these IPs (last octets) and the
    /// annotation its object carries.
    Watch(&'static [u8], Option<&'static str>),
    Leave(Leaving),
    /// Adopted at startup: found by path, or by a `/proc` scan (`None`), with the
    /// annotation its object carries.
    Adopted(Option<&'static str>, Option<&'static str>),
    DriftRound,
    /// One background repair of the pod.
    Repair,
    /// A ztunnel connects and answers every entry of its snapshot (`true`: acks).
    Snapshot(bool),
}

use Step::*;

struct Case {
    name: &'static str,
    steps: Vec<Step>,
    /// The whole trace: what the fakes were asked and each step's result.
    trace: &'static [&'static str],
    state: &'static str,
}

/// What enrolling the pod in sandbox `sb1` through CNI ADD writes into the trace.
const ENROLLED: [&str; 4] = [
    "rules apply sb1: written",
    "ztunnel add u1 sb1: acked",
    "annotate u1 enabled",
    "=> ADD sb1: ok Enabled",
];

/// The pod enrolled in `sb1`, then `more`.
fn enrolled_then(more: Vec<Step>) -> Vec<Step> {
    let mut steps = vec![Sandbox("sb1"), Add("sb1", "c1")];
    steps.extend(more);
    steps
}

/// The pod enrolled in `sb1` while no ztunnel is connected, then `more`.
fn pending_then(more: Vec<Step>) -> Vec<Step> {
    let mut steps = vec![ZtunnelIs(Zt::Gone)];
    steps.extend(enrolled_then(more));
    steps
}

/// [`ENROLLED`], then `extra`.
fn after_enrolled(extra: &[&'static str]) -> &'static [&'static str] {
    let mut trace = ENROLLED.to_vec();
    trace.extend_from_slice(extra);
    Vec::leak(trace)
}

/// CNI ADD (capture): new, same and replaced sandboxes; ztunnel acking, absent and
/// refusing; rules failing; the node's own netns.
fn capture_cases() -> Vec<Case> {
    vec![
        Case {
            name: "a new sandbox: rules, then ztunnel's Add, then the annotation",
            steps: vec![Sandbox("sb1"), Add("sb1", "c1")],
            trace: &[
                "rules apply sb1: written",
                "ztunnel add u1 sb1: acked",
                "annotate u1 enabled",
                "=> ADD sb1: ok Enabled",
            ],
            state: "captured sb1 acked",
        },
        Case {
            name: "the same sandbox again: rules checked, no second Add",
            steps: enrolled_then(vec![Add("sb1", "c1")]),
            trace: after_enrolled(&["rules apply sb1: unchanged", "=> ADD sb1: ok Enabled"]),
            state: "captured sb1 acked",
        },
        Case {
            name: "a recreated sandbox replaces the old one and is told to ztunnel",
            steps: enrolled_then(vec![Sandbox("sb2"), Add("sb2", "c2")]),
            trace: after_enrolled(&[
                "rules apply sb2: written",
                "ztunnel add u1 sb2: acked",
                "=> ADD sb2: ok Enabled",
            ]),
            state: "captured sb2 acked",
        },
        Case {
            name: "no ztunnel connected: captured, pending, fails closed",
            steps: vec![ZtunnelIs(Zt::Gone), Sandbox("sb1"), Add("sb1", "c1")],
            trace: &[
                "rules apply sb1: written",
                "ztunnel add u1 sb1: none connected",
                "annotate u1 pending",
                "=> ADD sb1: ok Pending",
            ],
            state: "captured sb1 unacked",
        },
        Case {
            name: "ztunnel refuses: the ADD fails, the rules stay, pending",
            steps: vec![ZtunnelIs(Zt::Refuses), Sandbox("sb1"), Add("sb1", "c1")],
            trace: &[
                "rules apply sb1: written",
                "ztunnel add u1 sb1: refused",
                "annotate u1 pending",
                "=> ADD sb1: error: ztunnel",
            ],
            state: "captured sb1 unacked",
        },
        Case {
            name: "rules fail: nothing told to ztunnel, nothing recorded",
            steps: vec![Sandbox("sb1"), RulesFail(1), Add("sb1", "c1")],
            trace: &["rules apply sb1: fails", "=> ADD sb1: error: rules"],
            state: "forgotten",
        },
        Case {
            name: "an unacked sandbox is sent again on the next ADD",
            steps: pending_then(vec![ZtunnelIs(Zt::Acks), Add("sb1", "c1")]),
            trace: &[
                "rules apply sb1: written",
                "ztunnel add u1 sb1: none connected",
                "annotate u1 pending",
                "=> ADD sb1: ok Pending",
                "rules apply sb1: unchanged",
                "ztunnel add u1 sb1: acked",
                "annotate u1 enabled",
                "=> ADD sb1: ok Enabled",
            ],
            state: "captured sb1 acked",
        },
        Case {
            name: "the node's own netns is refused before any rule",
            steps: vec![Add("node", "c1")],
            trace: &["=> ADD node: error: netns"],
            state: "forgotten",
        },
        Case {
            name: "an annotation that cannot be written is left stale for the repair loop",
            steps: vec![StatusFails(true), Sandbox("sb1"), Add("sb1", "c1")],
            trace: &[
                "rules apply sb1: written",
                "ztunnel add u1 sb1: acked",
                "annotate u1 enabled: fails",
                "=> ADD sb1: ok Enabled",
            ],
            state: "captured sb1 acked, annotation stale",
        },
    ]
}

/// CNI DEL: matched by sandbox, never by uid alone.
fn del_cases() -> Vec<Case> {
    let (steps, with) = (enrolled_then, after_enrolled);
    vec![
        Case {
            name: "DEL of the current sandbox: ztunnel drops it, annotation removed",
            steps: steps(vec![Del(Some("c1"), Some("sb1"))]),
            trace: with(&["ztunnel del u1", "annotate u1 (none)", "=> DEL: ok"]),
            state: "no sandbox",
        },
        Case {
            name: "a late DEL of an older sandbox changes nothing",
            steps: steps(vec![Del(Some("c0"), None)]),
            trace: with(&["=> DEL: ok"]),
            state: "captured sb1 acked",
        },
        Case {
            name: "DEL without a container id is matched by the netns",
            steps: steps(vec![Del(None, Some("sb1"))]),
            trace: with(&["ztunnel del u1", "annotate u1 (none)", "=> DEL: ok"]),
            state: "no sandbox",
        },
        Case {
            name: "DEL that cannot be matched (no id, netns gone) is not ours",
            steps: steps(vec![Vanish("sb1"), Del(None, Some("sb1"))]),
            trace: with(&["=> DEL: ok"]),
            state: "captured sb1 acked",
        },
        Case {
            name: "after DEL, discovery never re-enrolls the torn-down sandbox",
            steps: steps(vec![Del(Some("c1"), Some("sb1")), Watch(&[1], None)]),
            trace: with(&[
                "ztunnel del u1",
                "annotate u1 (none)",
                "=> DEL: ok",
                "scan /proc: found nothing",
                "=> watch: ok",
            ]),
            state: "no sandbox",
        },
    ]
}

/// The watch (ensure): captured and intact, drifted, no IP yet, found or not in /proc.
fn watch_cases() -> Vec<Case> {
    vec![
        Case {
            name: "a running pod labelled in is found in /proc and captured",
            steps: vec![Sandbox("sb1"), Watch(&[1], None)],
            trace: &[
                "scan /proc: found it",
                "rules apply sb1: written",
                "ztunnel add u1 sb1: acked",
                "annotate u1 enabled",
                "=> watch: ok",
            ],
            state: "captured sb1 acked",
        },
        Case {
            name: "no IP yet: waits for its CNI ADD, nothing scanned",
            steps: vec![Watch(&[], None)],
            trace: &["=> watch: ok"],
            state: "forgotten",
        },
        Case {
            name: "not found in /proc: an error the controller retries",
            steps: vec![Watch(&[1], None)],
            trace: &["scan /proc: found nothing", "=> watch: error: not found"],
            state: "forgotten",
        },
        Case {
            name: "a captured pod is re-verified on every reconcile, drift repaired",
            steps: enrolled_then(vec![Tamper("sb1"), Watch(&[1], Some("enabled"))]),
            trace: after_enrolled(&[
                "rules verify sb1: drifted",
                "rules apply sb1: written",
                "=> watch: ok",
            ]),
            state: "captured sb1 acked",
        },
        Case {
            name: "an annotation someone else changed is written back",
            steps: enrolled_then(vec![Watch(&[1], Some("junk"))]),
            trace: after_enrolled(&[
                "rules verify sb1: clean",
                "annotate u1 enabled",
                "=> watch: ok",
            ]),
            state: "captured sb1 acked",
        },
        Case {
            name: "new IPs and a new sandbox in /proc: the new sandbox replaces the old",
            steps: enrolled_then(vec![Sandbox("sb2"), Watch(&[2], Some("enabled"))]),
            trace: after_enrolled(&[
                "scan /proc: found it",
                "rules apply sb2: written",
                "ztunnel add u1 sb2: acked",
                "=> watch: ok",
            ]),
            state: "captured sb2 acked",
        },
        Case {
            name: "new IPs, the sandbox from CNI not in /proc: the API lags, no error",
            steps: enrolled_then(vec![Vanish("sb1"), Watch(&[2], Some("enabled"))]),
            trace: after_enrolled(&["scan /proc: found nothing", "=> watch: ok"]),
            state: "captured sb1 acked",
        },
    ]
}

/// Leaving: opted out (rules removed) or ended (rules kept, failing closed).
fn leave_cases() -> Vec<Case> {
    vec![
        Case {
            name: "opted out: rules removed, ztunnel drains it, annotation removed",
            steps: enrolled_then(vec![Leave(Leaving::OptedOut)]),
            trace: after_enrolled(&[
                "rules remove sb1",
                "ztunnel del u1",
                "annotate u1 (none)",
                "=> leave OptedOut: ok",
            ]),
            state: "forgotten",
        },
        Case {
            name: "ended (terminating): the rules stay until the netns goes",
            steps: enrolled_then(vec![Leave(Leaving::Ended)]),
            trace: after_enrolled(&["ztunnel del u1", "annotate u1 (none)", "=> leave Ended: ok"]),
            state: "forgotten",
        },
        Case {
            name: "after its sandbox's DEL, leaving sends no second Del",
            steps: enrolled_then(vec![Del(Some("c1"), None), Leave(Leaving::OptedOut)]),
            trace: after_enrolled(&[
                "ztunnel del u1",
                "annotate u1 (none)",
                "=> DEL: ok",
                "=> leave OptedOut: ok",
            ]),
            state: "forgotten",
        },
    ]
}

/// Adoption at startup (an agent restart, a node reboot), and the snapshot a ztunnel
/// connecting then gets.
fn adopt_cases() -> Vec<Case> {
    vec![
        Case {
            name: "found by path, rules intact: not rewritten; the snapshot confirms it",
            steps: vec![
                Sandbox("sb1"),
                Installed("sb1"),
                Adopted(Some("sb1"), Some("enabled")),
                Snapshot(true),
            ],
            trace: &[
                "rules apply sb1: unchanged",
                "=> adopt: ok",
                "=> snapshot: [add u1 sb1]",
            ],
            state: "captured sb1 acked",
        },
        Case {
            name: "found in /proc; the new ztunnel refuses it: pending, retried",
            steps: vec![
                Sandbox("sb1"),
                Adopted(None, Some("enabled")),
                Snapshot(false),
                Repair,
            ],
            trace: &[
                "scan /proc: found it",
                "rules apply sb1: written",
                "=> adopt: ok",
                "annotate u1 pending",
                "=> snapshot: [add u1 sb1]",
                "ztunnel add u1 sb1: acked",
                "annotate u1 enabled",
                "=> repair",
            ],
            state: "captured sb1 acked",
        },
        Case {
            name: "not found (a reboot): Keep in the snapshot, pending",
            steps: vec![Adopted(None, Some("enabled")), Snapshot(true)],
            trace: &[
                "scan /proc: found nothing",
                "=> adopt: ok",
                "=> snapshot: [keep u1]",
            ],
            state: "unlocated, annotation stale",
        },
        Case {
            name: "rules cannot be repaired: unlocated, Keep, not failing startup",
            steps: vec![
                Sandbox("sb1"),
                RulesFail(1),
                Adopted(Some("sb1"), Some("enabled")),
                Snapshot(true),
            ],
            trace: &[
                "rules apply sb1: fails",
                "=> adopt: ok",
                "=> snapshot: [keep u1]",
            ],
            state: "unlocated, annotation stale",
        },
        Case {
            name: "after a reboot, the recreated sandbox's ADD captures it (already annotated enabled)",
            steps: vec![
                Adopted(None, Some("enabled")),
                Sandbox("sb2"),
                Add("sb2", "c2"),
            ],
            trace: &[
                "scan /proc: found nothing",
                "=> adopt: ok",
                "rules apply sb2: written",
                "ztunnel add u1 sb2: acked",
                "=> ADD sb2: ok Enabled",
            ],
            state: "captured sb2 acked",
        },
    ]
}

/// Drift rounds: repaired, repair failing three times, the sandbox gone.
fn drift_cases() -> Vec<Case> {
    let with = after_enrolled;
    vec![
        Case {
            name: "intact: verified, nothing written",
            steps: vec![Sandbox("sb1"), Add("sb1", "c1"), DriftRound],
            trace: with(&["rules verify sb1: clean", "=> drift round"]),
            state: "captured sb1 acked",
        },
        Case {
            name: "drifted: repaired",
            steps: vec![Sandbox("sb1"), Add("sb1", "c1"), Tamper("sb1"), DriftRound],
            trace: with(&[
                "rules verify sb1: drifted",
                "rules apply sb1: written",
                "=> drift round",
            ]),
            state: "captured sb1 acked",
        },
        Case {
            name: "repair failing three times in a row: given up, said once",
            steps: enrolled_then(vec![
                Tamper("sb1"),
                RulesFail(u32::MAX),
                DriftRound,
                DriftRound,
                DriftRound,
                DriftRound,
            ]),
            trace: with(&[
                "rules verify sb1: drifted",
                "rules apply sb1: fails",
                "=> drift round",
                "rules verify sb1: drifted",
                "rules apply sb1: fails",
                "=> drift round",
                "rules verify sb1: drifted",
                "rules apply sb1: fails",
                "event u1 AmbientRedirectionUnrepairable",
                "=> drift round",
                "=> drift round",
            ]),
            state: "captured sb1 acked, unrepairable",
        },
        Case {
            name: "verification failing counts as a failed repair",
            steps: enrolled_then(vec![VerifyFails, DriftRound, DriftRound, DriftRound]),
            trace: with(&[
                "rules verify sb1: fails",
                "=> drift round",
                "rules verify sb1: fails",
                "=> drift round",
                "rules verify sb1: fails",
                "event u1 AmbientRedirectionUnrepairable",
                "=> drift round",
            ]),
            state: "captured sb1 acked, unrepairable",
        },
        Case {
            name: "a sandbox gone without a DEL: given up at once, not repaired",
            steps: vec![Sandbox("sb1"), Add("sb1", "c1"), Vanish("sb1"), DriftRound],
            trace: with(&["event u1 AmbientRedirectionUnrepairable", "=> drift round"]),
            state: "captured sb1 acked, unrepairable",
        },
        Case {
            name: "an unrepairable pod's new sandbox clears it",
            steps: vec![
                Sandbox("sb1"),
                Add("sb1", "c1"),
                Vanish("sb1"),
                DriftRound,
                Sandbox("sb2"),
                Add("sb2", "c2"),
                DriftRound,
            ],
            trace: with(&[
                "event u1 AmbientRedirectionUnrepairable",
                "=> drift round",
                "rules apply sb2: written",
                "ztunnel add u1 sb2: acked",
                "=> ADD sb2: ok Enabled",
                "rules verify sb2: clean",
                "=> drift round",
            ]),
            state: "captured sb2 acked",
        },
    ]
}

/// ztunnel restarts: what a newly connected one gets, and the repairs after.
fn ztunnel_cases() -> Vec<Case> {
    vec![
        Case {
            name: "a restarted ztunnel gets the pod in its snapshot and acks it",
            steps: pending_then(vec![ZtunnelIs(Zt::Acks), Snapshot(true)]),
            trace: &[
                "rules apply sb1: written",
                "ztunnel add u1 sb1: none connected",
                "annotate u1 pending",
                "=> ADD sb1: ok Pending",
                "annotate u1 enabled",
                "=> snapshot: [add u1 sb1]",
            ],
            state: "captured sb1 acked",
        },
        Case {
            name: "a torn-down sandbox is not in the snapshot",
            steps: enrolled_then(vec![Del(Some("c1"), None), Snapshot(true)]),
            trace: after_enrolled(&[
                "ztunnel del u1",
                "annotate u1 (none)",
                "=> DEL: ok",
                "=> snapshot: []",
            ]),
            state: "no sandbox",
        },
        Case {
            name: "a repair with ztunnel still refusing keeps the pod pending",
            steps: vec![
                ZtunnelIs(Zt::Refuses),
                Sandbox("sb1"),
                Add("sb1", "c1"),
                Repair,
            ],
            trace: &[
                "rules apply sb1: written",
                "ztunnel add u1 sb1: refused",
                "annotate u1 pending",
                "=> ADD sb1: error: ztunnel",
                "ztunnel add u1 sb1: refused",
                "=> repair",
            ],
            state: "captured sb1 unacked",
        },
    ]
}

async fn check(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in cases {
        let world = World::new();
        for step in &case.steps {
            world.run(step).await;
        }
        let trace = world.trace.take();
        let state = world.state();
        if trace != case.trace || state != case.state {
            failures.push(format!(
                "case: {}\n  steps: {:?}\n  trace:    {trace:#?}\n  expected: {:#?}\n  state: {state:?}, expected {:?}",
                case.name, case.steps, case.trace, case.state
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// One test per group of cases, named after it.
macro_rules! groups {
    ($($test:ident: $cases:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $test() {
            check($cases()).await;
        }
    )*};
}

groups! {
    capture: capture_cases,
    cni_del: del_cases,
    watch: watch_cases,
    leave: leave_cases,
    adopt: adopt_cases,
    drift: drift_cases,
    ztunnel_restarts: ztunnel_cases,
}
