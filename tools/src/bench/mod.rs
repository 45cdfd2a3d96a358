//! `cargo xtask bench`: what users compare between mesh data planes, each figure
//! measured on the direct path and through ztunnel in the same run, interleaved
//! (direct, ours, direct, ours, …), medians over the rounds:
//!
//! - throughput (iperf3, 1 and 4 streams) and CPU-seconds per GB (ztunnel's, against
//!   the whole machine's on the direct path);
//! - 64-byte request/response on one connection, and connect + one round trip +
//!   close, unpinned and with everything (client, server, ztunnel) on one CPU; ztunnel
//!   CPU per connection;
//! - ztunnel's footprint per enrolled pod (RSS, fds, threads) at 100 and 1000 pods,
//!   after they leave and over add/delete cycles, and ZDS Add → ack ([`scale`]);
//! - ztunnel's RSS with 1,000 and 10,000 idle connections through it ([`idle`]);
//! - CNI ADD → enrolled through the real plugin and agent ([`cni`]).
//!
//! The data path runs on one node: a bridge, four pods (a direct pair, a mesh pair
//! enrolled by our agent), ztunnel in mesh mode with a local CA, HBONE between the
//! mesh pods.

pub mod cni;
pub mod idle;
pub mod iperf;
pub mod latency;
pub mod procfs;
pub mod report;
pub mod scale;
pub mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use e2e::mesh_files::workload;
use e2e::{Mesh, TestNode, TestPod};
use latency::Mode;
use report::{Bound, On, Report, Row};
use stats::{median, percentile};

/// How long and how much.
#[derive(Clone, Debug)]
pub struct Options {
    pub short: bool,
    /// Direct/mesh pairs per data-path test.
    pub rounds: usize,
    pub iperf_seconds: u32,
    pub rr_samples: usize,
    pub connect_samples: usize,
    /// Pods enrolled at each footprint reading (cumulative).
    pub scale_steps: Vec<usize>,
    pub cycles: usize,
    pub cycle_pods: usize,
    pub cni_pods: usize,
    /// Idle connections at each RSS reading (cumulative).
    pub idle_steps: Vec<usize>,
    /// Longest wait for the pods' TIME_WAIT sockets to drain between tests.
    pub drain_limit: Duration,
    pub out_dir: PathBuf,
    /// Only this part: `throughput`, `latency`, `footprint`, `idle` or `cni` (all
    /// when `None`).
    pub only: Option<String>,
}

impl Options {
    fn runs(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == part)
    }

    pub fn full(out_dir: PathBuf) -> Options {
        Options {
            short: false,
            rounds: 3,
            iperf_seconds: 5,
            rr_samples: 20_000,
            connect_samples: 2_000,
            scale_steps: vec![100, 1000],
            cycles: 10,
            cycle_pods: 100,
            cni_pods: 150,
            idle_steps: vec![1000, 10_000],
            drain_limit: Duration::from_secs(70),
            out_dir,
            only: None,
        }
    }

    /// A quick pass over every measurement (the test suite's form): figures too
    /// rough to judge, but every part runs.
    pub fn short(out_dir: PathBuf) -> Options {
        Options {
            short: true,
            rounds: 1,
            iperf_seconds: 1,
            rr_samples: 300,
            connect_samples: 100,
            scale_steps: vec![10, 30],
            cycles: 2,
            cycle_pods: 10,
            cni_pods: 8,
            idle_steps: vec![100, 300],
            drain_limit: Duration::from_secs(5),
            out_dir,
            only: None,
        }
    }
}

/// Node indexes (subnets) of the benchmark; apart from the test suite's.
const DATAPATH_NODE: u8 = 231;
const SCALE_NODE: u8 = 232;
const CNI_NODE: u8 = 233;

const IPERF_PORT: u16 = 5201;
const LATENCY_PORT: u16 = 9000;

fn progress(msg: &str) {
    println!("bench: {msg}");
}

/// TIME_WAIT sockets in a pod.
fn time_wait(pod: &TestPod) -> usize {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns_name,
            "ss",
            "-Htan",
            "state",
            "time-wait",
        ])
        .output()
        .map(|o| {
            o.stdout
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count()
        })
        .unwrap_or(0)
}

/// TIME_WAIT sockets the next test may start beside: a few dozen (iperf3's control
/// connections) weigh nothing; the thousands a connection test leaves are what make
/// the next test's port picks and lookups drift.
const TIME_WAIT_LEFT: usize = 64;

/// Waits (up to `limit`) until the pods hold at most [`TIME_WAIT_LEFT`] TIME_WAIT
/// sockets, so one test's leftovers do not slow the next.
fn drain_time_wait(pods: &[&TestPod], limit: Duration) {
    let start = Instant::now();
    let mut said = false;
    loop {
        let left: usize = pods.iter().map(|p| time_wait(p)).sum();
        if left <= TIME_WAIT_LEFT {
            return;
        }
        if start.elapsed() >= limit {
            progress(&format!(
                "{left} TIME_WAIT sockets left after {limit:?}; going on"
            ));
            return;
        }
        if !said {
            progress(&format!("waiting for {left} TIME_WAIT sockets to drain"));
            said = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One path's endpoints.
struct Path<'a> {
    client: &'a TestPod,
    server: &'a TestPod,
}

/// What the data-path runs give: per test, the direct and our samples (one per round).
#[derive(Default)]
struct Pairs {
    direct: Vec<f64>,
    ours: Vec<f64>,
}

impl Pairs {
    /// The samples of path `i` of [`DataPath::paths`]: 0 direct, 1 ours.
    fn of(&mut self, i: usize) -> &mut Vec<f64> {
        if i == 0 {
            &mut self.direct
        } else {
            &mut self.ours
        }
    }

    fn medians(&self) -> (f64, f64) {
        (median(&self.direct), median(&self.ours))
    }
}

struct Throughput {
    gbps: Pairs,
    /// Direct: the machine's CPU-s/GB; ours: ztunnel's.
    cpu_per_gb: Pairs,
}

fn throughput(opts: &Options, dp: &DataPath, streams: u32) -> anyhow::Result<Throughput> {
    let ztunnel = dp.ztunnel();
    let mut t = Throughput {
        gbps: Pairs::default(),
        cpu_per_gb: Pairs::default(),
    };
    for round in 0..opts.rounds {
        for (i, path) in dp.paths().iter().enumerate() {
            let machine = procfs::machine_cpu_seconds()?;
            let zt = procfs::cpu_seconds(ztunnel)?;
            let r = iperf::client(
                &path.client.netns_name,
                path.server.ip,
                IPERF_PORT,
                streams,
                opts.iperf_seconds,
            )?;
            // Direct: the whole machine's CPU; ours: ztunnel's own.
            let cpu = if i == 0 {
                procfs::machine_cpu_seconds()? - machine
            } else {
                procfs::cpu_seconds(ztunnel)? - zt
            };
            t.gbps.of(i).push(r.gbit_per_s());
            t.cpu_per_gb.of(i).push(cpu / (r.bytes / 1e9));
            progress(&format!(
                "iperf3 {streams} stream(s), round {}, {}: {:.2} Gbit/s",
                round + 1,
                ["direct", "ours"][i],
                r.gbit_per_s()
            ));
        }
    }
    Ok(t)
}

struct Latency {
    p50: Pairs,
    p99: Pairs,
    /// ztunnel CPU per operation, µs (our path only).
    cpu_per_op: Vec<f64>,
}

fn latency(opts: &Options, dp: &DataPath, mode: Mode, pinned: bool) -> anyhow::Result<Latency> {
    let ztunnel = dp.ztunnel();
    let cpu = pinned.then_some(0usize);
    let samples = match mode {
        Mode::RoundTrip => opts.rr_samples,
        Mode::Connect => opts.connect_samples,
    };
    let warmup = (samples / 10).max(10);
    if pinned {
        procfs::pin_process(ztunnel, Some(&[0]))?;
    }
    let mut out = Latency {
        p50: Pairs::default(),
        p99: Pairs::default(),
        cpu_per_op: Vec::new(),
    };
    let result = (|| -> anyhow::Result<()> {
        for round in 0..opts.rounds {
            for (i, path) in dp.paths().iter().enumerate() {
                let _server = latency::Server::start(path.server.netns(), LATENCY_PORT, cpu)?;
                let to = SocketAddr::new(path.server.ip, LATENCY_PORT);
                let zt = procfs::cpu_seconds(ztunnel)?;
                let lat = latency::client(path.client.netns(), to, mode, warmup, samples, cpu)?;
                let zt_cpu = procfs::cpu_seconds(ztunnel)? - zt;
                let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
                out.p50.of(i).push(p50);
                out.p99.of(i).push(p99);
                if i == 1 {
                    out.cpu_per_op
                        .push(zt_cpu * 1e6 / (samples + warmup) as f64);
                }
                progress(&format!(
                    "{} {}, round {}, {}: p50 {p50:.0} µs, p99 {p99:.0} µs",
                    match mode {
                        Mode::RoundTrip => "request/response",
                        Mode::Connect => "connect+rt+close",
                    },
                    if pinned { "pinned" } else { "unpinned" },
                    round + 1,
                    ["direct", "ours"][i],
                ));
            }
        }
        Ok(())
    })();
    if pinned {
        procfs::pin_process(ztunnel, None)?;
    }
    result.map(|()| out)
}

/// The data-path node: a direct pod pair and a mesh pair (enrolled by our agent,
/// HBONE through ztunnel), iperf3 servers in both server pods. Dropped in field
/// order: servers, mesh, pods, node.
pub struct DataPath {
    _iperf: [iperf::Server; 2],
    mesh: Mesh,
    pods: [TestPod; 4],
    _node: TestNode,
}

impl DataPath {
    pub async fn start() -> anyhow::Result<DataPath> {
        let node = TestNode::new(DATAPATH_NODE);
        let (dc, ds) = (node.add_pod("d-client"), node.add_pod("d-server"));
        let (mc, ms) = (node.add_pod("m-client"), node.add_pod("m-server"));
        node.write_mesh_config(&format!(
            "workloads:\n{}{}",
            workload(&mc, "HBONE", ""),
            workload(&ms, "HBONE", "")
        ));
        let mesh = Mesh::start_in_mesh(&node, &[&mc, &ms], &[]).await;
        let iperf = [
            iperf::Server::start(&ds.netns_name, IPERF_PORT)?,
            iperf::Server::start(&ms.netns_name, IPERF_PORT)?,
        ];
        let dp = DataPath {
            _iperf: iperf,
            mesh,
            pods: [dc, ds, mc, ms],
            _node: node,
        };
        // Untimed: the first HBONE connection and certificates, caches, page faults.
        for path in dp.paths() {
            iperf::client(&path.client.netns_name, path.server.ip, IPERF_PORT, 1, 1)?;
        }
        Ok(dp)
    }

    /// Direct, then ours.
    fn paths(&self) -> [Path<'_>; 2] {
        let [dc, ds, mc, ms] = &self.pods;
        [
            Path {
                client: dc,
                server: ds,
            },
            Path {
                client: mc,
                server: ms,
            },
        ]
    }

    fn pods(&self) -> [&TestPod; 4] {
        let [a, b, c, d] = &self.pods;
        [a, b, c, d]
    }

    pub fn ztunnel(&self) -> u32 {
        self.mesh.ztunnel.pid()
    }
}

/// Runs every measurement; writes `bench.md`, `bench.json` and `bench.svg` into
/// `opts.out_dir`.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut rows = Vec::new();

    if opts.runs("throughput") || opts.runs("latency") {
        datapath(opts, &mut rows).await?;
    }
    if opts.runs("footprint") {
        footprint(opts, &mut rows).await?;
    }
    if opts.runs("idle") {
        idle_rows(opts, &mut rows).await?;
    }
    if opts.runs("cni") {
        cni_add(opts, &mut rows).await?;
    }
    let report = Report {
        title: format!(
            "cargo xtask bench{}",
            if opts.short { " --short" } else { "" }
        ),
        context: vec![
            ("CPUs".into(), procfs::online_cpus().to_string()),
            (
                "kernel".into(),
                e2e::sh("uname", &["-r"]).trim().to_string(),
            ),
            (
                "rounds".into(),
                format!(
                    "{} direct/ours pairs per data-path test, interleaved; medians",
                    opts.rounds
                ),
            ),
            (
                "sizes".into(),
                format!(
                    "iperf3 {} s per run; {} round trips; {} connections; pods {:?}; {} CNI ADDs",
                    opts.iperf_seconds,
                    opts.rr_samples,
                    opts.connect_samples,
                    opts.scale_steps,
                    opts.cni_pods
                ),
            ),
            (
                "took".into(),
                format!("{:.0} s", started.elapsed().as_secs_f64()),
            ),
        ],
        rows,
    };
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    for (name, text) in [
        ("bench.md", report.markdown()),
        ("bench.json", report.json()),
        ("bench.svg", report.svg()),
    ] {
        let path = opts.out_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

async fn datapath(opts: &Options, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dp = DataPath::start().await?;
    if opts.runs("throughput") {
        throughput_rows(opts, &dp, rows)?;
    }
    if opts.runs("latency") {
        latency_rows(opts, &dp, rows)?;
    }
    Ok(())
}

fn throughput_rows(opts: &Options, dp: &DataPath, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let one = tokio::task::block_in_place(|| throughput(opts, dp, 1))?;
    drain_time_wait(&dp.pods(), opts.drain_limit);
    let four = tokio::task::block_in_place(|| throughput(opts, dp, 4))?;
    let (d1, o1) = one.gbps.medians();
    let (d4, o4) = four.gbps.medians();
    rows.push(
        Row::new("iperf3, 1 stream", "Gbit/s", Some(d1), o1)
            .target(Bound::AtLeast(0.40), On::Ratio),
    );
    rows.push(
        Row::new("iperf3, 4 streams", "Gbit/s", Some(d4), o4)
            .target(Bound::AtLeast(0.33), On::Ratio),
    );
    rows.push(
        Row::new("iperf3, ours: 4 streams over 1 stream", "×", None, o4 / o1)
            .target(Bound::AtLeast(1.2), On::Value),
    );
    let (dc1, oc1) = one.cpu_per_gb.medians();
    let (dc4, oc4) = four.cpu_per_gb.medians();
    rows.push(
        Row::new(
            "CPU-s per GB, 1 stream (direct: whole machine; ours: ztunnel)",
            "CPU-s",
            Some(dc1),
            oc1,
        )
        .target(Bound::AtMost(1.5), On::Ratio),
    );
    rows.push(Row::new(
        "CPU-s per GB, 4 streams (direct: whole machine; ours: ztunnel)",
        "CPU-s",
        Some(dc4),
        oc4,
    ));

    Ok(())
}

fn latency_rows(opts: &Options, dp: &DataPath, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    // (what, its name, the pinned p50's target over direct)
    let tests = [
        (Mode::RoundTrip, "request/response 64 B", 2.5),
        (Mode::Connect, "connect + 1 round trip + close", 3.0),
    ];
    for (mode, name, target) in tests {
        for pinned in [false, true] {
            drain_time_wait(&dp.pods(), opts.drain_limit);
            let m = tokio::task::block_in_place(|| latency(opts, dp, mode, pinned))?;
            let how = if pinned {
                "pinned to one CPU"
            } else {
                "unpinned"
            };
            let (d50, o50) = m.p50.medians();
            let (d99, o99) = m.p99.medians();
            let p50 = Row::new(&format!("{name}, {how}, p50"), "µs", Some(d50), o50);
            rows.push(if pinned {
                p50.target(Bound::AtMost(target), On::Ratio)
            } else {
                p50
            });
            rows.push(Row::new(
                &format!("{name}, {how}, p99"),
                "µs",
                Some(d99),
                o99,
            ));
            if mode == Mode::Connect && !pinned {
                rows.push(Row::new(
                    "ztunnel CPU per connection (both ends)",
                    "µs",
                    None,
                    median(&m.cpu_per_op),
                ));
            }
        }
    }
    Ok(())
}

async fn idle_rows(opts: &Options, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    progress("idle connections: opening HBONE streams into a pod");
    let r = idle::run(&opts.idle_steps, &progress).await?;
    for (n, rss) in &r.loaded {
        rows.push(Row::new(
            &format!(
                "ztunnel RSS with {n} idle connections ({:.0} MB), over none ({:.0} MB)",
                rss / 1e6,
                r.base_rss / 1e6
            ),
            "×",
            None,
            rss / r.base_rss,
        ));
        rows.push(
            Row::new(
                &format!("RSS per idle connection ({n})"),
                "kB",
                None,
                (rss - r.base_rss) / *n as f64 / 1e3,
            )
            .target(Bound::AtMost(16.0), On::Value),
        );
    }
    Ok(())
}

async fn footprint(opts: &Options, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    progress("footprint: enrolling pods over ZDS");
    let node = TestNode::new(SCALE_NODE);
    let s = scale::run(
        &node,
        &opts.scale_steps,
        opts.cycles,
        opts.cycle_pods,
        &progress,
    )
    .await?;
    drop(node);
    rows.push(Row::new("ztunnel RSS idle", "MB", None, s.idle.rss / 1e6));
    for (n, f) in &s.loaded {
        let per = f.per_pod(&s.idle, *n);
        rows.push(
            Row::new(
                &format!("RSS per enrolled pod ({n} pods)"),
                "kB",
                None,
                per.rss / 1e3,
            )
            .target(Bound::AtMost(20.0), On::Value),
        );
        rows.push(
            Row::new(
                &format!("fds per enrolled pod ({n} pods)"),
                "",
                None,
                per.fds,
            )
            .target(Bound::AtMost(5.0), On::Value),
        );
        rows.push(
            Row::new(
                &format!("threads per enrolled pod ({n} pods)"),
                "",
                None,
                per.threads,
            )
            .target(Bound::AtMost(0.0), On::Value),
        );
    }
    let most = s.loaded.last().map_or(0, |(n, _)| *n);
    rows.push(
        Row::new(
            &format!("RSS after {most} pods left, over idle"),
            "×",
            None,
            s.after_leave.rss / s.idle.rss,
        )
        .target(Bound::AtMost(1.10), On::Value),
    );
    if let (Some(first), Some(last)) = (s.cycles.first(), s.cycles.last()) {
        rows.push(
            Row::new(
                &format!(
                    "RSS growth over {} add/delete cycles of {} pods (last over first)",
                    s.cycles.len(),
                    opts.cycle_pods
                ),
                "×",
                None,
                last / first,
            )
            // Page-granular noise of the allocator, not growth.
            .target(Bound::AtMost(1.02), On::Value),
        );
    }
    rows.push(
        Row::new(
            &format!(
                "ZDS Add → ack, p50 ({} adds one by one)",
                s.add_ack_ms.len()
            ),
            "ms",
            None,
            median(&s.add_ack_ms),
        )
        .target(Bound::AtMost(0.2), On::Value),
    );
    rows.push(
        Row::new(
            "ZDS Add → ack, p99",
            "ms",
            None,
            percentile(&s.add_ack_ms, 99.0),
        )
        .target(Bound::AtMost(2.0), On::Value),
    );

    Ok(())
}

async fn cni_add(opts: &Options, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    progress("CNI ADD → enrolled through the plugin and the agent");
    let adds = cni::run(CNI_NODE, opts.cni_pods, &progress).await?;
    rows.push(Row::new(
        &format!(
            "CNI ADD → enrolled, p50 ({} pods, rules included)",
            adds.enrolled.len()
        ),
        "ms",
        None,
        median(&adds.enrolled),
    ));
    rows.push(
        Row::new(
            "CNI ADD → enrolled, p99",
            "ms",
            None,
            percentile(&adds.enrolled, 99.0),
        )
        .target(Bound::AtMost(10.0), On::Value),
    );
    rows.push(Row::new(
        &format!(
            "CNI ADD of a pod outside the mesh, p50 ({} pods: the plugin's own cost)",
            adds.outside.len()
        ),
        "ms",
        None,
        median(&adds.outside),
    ));

    Ok(())
}

/// `bench --profile`: where ztunnel's CPU goes on the data path. Records ztunnel with
/// `perf record -g` during a 1-stream iperf3 run and during pinned connection
/// setups, and writes the hottest symbols of each to `profile-*.txt` in `out_dir`
/// (beside the `perf-*.data` files, for `perf report -i`).
pub async fn profile(opts: &Options) -> anyhow::Result<Vec<PathBuf>> {
    let dp = DataPath::start().await?;
    let zt = dp.ztunnel();
    let [_, ours] = dp.paths();
    std::fs::create_dir_all(&opts.out_dir)?;
    let mut written = Vec::new();
    let seconds = opts.iperf_seconds.max(3);
    for (name, bulk) in [("throughput", true), ("connect-pinned", false)] {
        let data = opts.out_dir.join(format!("perf-{name}.data"));
        let mut perf = std::process::Command::new("perf")
            .args(["record", "-F", "1999", "-g", "-o"])
            .arg(&data)
            .args(["-p", &zt.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running perf (package linux-perf)")?;
        std::thread::sleep(Duration::from_millis(500));
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            if bulk {
                iperf::client(
                    &ours.client.netns_name,
                    ours.server.ip,
                    IPERF_PORT,
                    1,
                    seconds,
                )?;
            } else {
                procfs::pin_process(zt, Some(&[0]))?;
                let _server = latency::Server::start(ours.server.netns(), LATENCY_PORT, Some(0))?;
                let to = SocketAddr::new(ours.server.ip, LATENCY_PORT);
                let n = opts.connect_samples;
                let r = latency::client(ours.client.netns(), to, Mode::Connect, 10, n, Some(0));
                procfs::pin_process(zt, None)?;
                r?;
            }
            Ok(())
        })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(perf.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        perf.wait()?;
        let report = std::process::Command::new("perf")
            .args([
                "report",
                "--no-children",
                "--stdio",
                "--sort",
                "dso,symbol",
                "-g",
                "none",
                "-i",
            ])
            .arg(&data)
            .output()
            .context("perf report")?;
        let text: String = String::from_utf8_lossy(&report.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(70)
            .map(|l| format!("{l}\n"))
            .collect();
        let path = opts.out_dir.join(format!("profile-{name}.txt"));
        std::fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}
