//! What each enrolled pod costs ztunnel, and how fast it takes one: a ztunnel of its
//! own (mesh mode, local CA) connected to a ZDS server in this process, which plays
//! the agent and hands it fresh network namespaces one Add at a time, timing each Add
//! to its ack; RSS, fds and threads read from `/proc` as pods come and go.
//!
//! The pods here are bare network namespaces (no veth, no rules): ztunnel's cost per
//! pod is its listeners, its state and the netns fd, none of which depends on the
//! pod's interfaces; and 1000 of them fit on no single bridge (1024 ports at most).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use istio_cni::zds_server::{SnapshotEntry, SnapshotSource, ZdsError, ZdsServer};
use protocol::zds::WorkloadInfo;
use protocol::{Netns, SeqpacketListener, WorkloadUid};

use super::procfs;
use e2e::{TestNode, Ztunnel};

/// Nothing to replay: the pods are added live.
struct NoSnapshot;

impl SnapshotSource for NoSnapshot {
    fn snapshot(&self) -> Vec<(WorkloadUid, SnapshotEntry)> {
        Vec::new()
    }
    fn snapshot_answered(&self, _: &WorkloadUid, _: &SnapshotEntry, _: Result<(), &ZdsError>) {}
}

/// ztunnel's footprint at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Footprint {
    pub rss: f64,
    pub fds: f64,
    pub threads: f64,
}

impl Footprint {
    fn of(pid: u32) -> anyhow::Result<Footprint> {
        Ok(Footprint {
            rss: procfs::rss_bytes(pid)? as f64,
            fds: procfs::fds(pid)? as f64,
            threads: procfs::threads(pid)? as f64,
        })
    }

    /// The cost of each of `n` pods over `base`.
    pub fn per_pod(&self, base: &Footprint, n: usize) -> Footprint {
        let n = n.max(1) as f64;
        Footprint {
            rss: (self.rss - base.rss) / n,
            fds: (self.fds - base.fds) / n,
            threads: (self.threads - base.threads) / n,
        }
    }
}

pub struct ScaleResult {
    pub idle: Footprint,
    /// (pods, footprint with that many enrolled).
    pub loaded: Vec<(usize, Footprint)>,
    /// After every pod left.
    pub after_leave: Footprint,
    /// RSS after each add/delete cycle.
    pub cycles: Vec<f64>,
    /// Add → ack of every Add, in milliseconds.
    pub add_ack_ms: Vec<f64>,
}

/// A new, empty network namespace (held by its fd only: it vanishes when dropped).
fn fresh_netns() -> anyhow::Result<Netns> {
    std::thread::spawn(|| -> anyhow::Result<Netns> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare netns")?;
        Ok(Netns::current()?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

fn info(i: usize) -> WorkloadInfo {
    WorkloadInfo {
        name: format!("scale-{i}"),
        namespace: "bench".into(),
        service_account: format!("scale-{i}"),
    }
}

fn uid(i: usize) -> WorkloadUid {
    WorkloadUid::new(format!("bench-scale-{i}"))
}

/// Lets RSS settle after a burst (freed memory, the allocator's trims).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Enrolls `steps` pods (cumulative, ascending), reads the footprint at each step,
/// removes them all, then runs `cycles` add/delete cycles of `cycle_pods` pods.
pub async fn run(
    node: &TestNode,
    steps: &[usize],
    cycles: usize,
    cycle_pods: usize,
    progress: &dyn Fn(&str),
) -> anyhow::Result<ScaleResult> {
    let most = steps.iter().copied().max().unwrap_or(0).max(cycle_pods);
    node.write_mesh_config("workloads: []\n");
    let listener = SeqpacketListener::bind(&node.zds_socket(), 0o600)?;
    let server = ZdsServer::new(Duration::from_secs(5));
    let serving = tokio::spawn(server.clone().serve(listener, Arc::new(NoSnapshot)));
    let ztunnel = Ztunnel::start_mesh(node, 1, &[]);
    let pid = ztunnel.pid();
    tokio::time::timeout(Duration::from_secs(20), server.wait_for_connections(1))
        .await
        .context("ztunnel did not connect to the ZDS socket")?;
    progress(&format!("making {most} network namespaces"));
    let namespaces: Vec<Arc<Netns>> = (0..most)
        .map(|_| fresh_netns().map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    settle().await;
    let idle = Footprint::of(pid)?;

    let mut add_ack_ms = Vec::new();
    let mut loaded = Vec::new();
    let mut enrolled = 0;
    let add = |i: usize| {
        let (server, netns) = (server.clone(), namespaces[i].clone());
        async move {
            let start = Instant::now();
            server
                .add(uid(i), info(i), netns)
                .await
                .with_context(|| format!("Add of pod {i}"))?;
            anyhow::Ok(start.elapsed().as_secs_f64() * 1e3)
        }
    };
    for &step in steps {
        while enrolled < step {
            add_ack_ms.push(add(enrolled).await?);
            enrolled += 1;
        }
        settle().await;
        let f = Footprint::of(pid)?;
        progress(&format!(
            "{step} pods enrolled: RSS {:.1} MB, {} fds, {} threads",
            f.rss / 1e6,
            f.fds,
            f.threads
        ));
        loaded.push((step, f));
    }
    for i in 0..enrolled {
        server.del(&uid(i)).await?;
    }
    // Draining a pod's proxy finishes in the background, and ztunnel gives freed
    // memory back a second after a burst of pods has drained.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after_leave = Footprint::of(pid)?;
    progress(&format!(
        "all {enrolled} pods left: RSS {:.1} MB (idle {:.1} MB)",
        after_leave.rss / 1e6,
        idle.rss / 1e6
    ));

    let mut rss_cycles = Vec::new();
    for _ in 0..cycles {
        for i in 0..cycle_pods {
            add(i).await?;
        }
        for i in 0..cycle_pods {
            server.del(&uid(i)).await?;
        }
        settle().await;
        rss_cycles.push(procfs::rss_bytes(pid)? as f64);
    }
    drop(ztunnel);
    serving.abort();
    Ok(ScaleResult {
        idle,
        loaded,
        after_leave,
        cycles: rss_cycles,
        add_ack_ms,
    })
}
