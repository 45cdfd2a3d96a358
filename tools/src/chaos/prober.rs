//! The continuous prober: new connections every few milliseconds and one long-lived
//! connection, mesh→mesh over each family, mesh→non-mesh and non-mesh→mesh.
//!
//! Bypass of ztunnel on the way in is detected exactly: clients bind their source port
//! from a range below the kernel's ephemeral range (which ztunnel's upstream sockets
//! use), and the echo server tells each client the peer address it saw; the app seeing
//! the client's own port means the connection did not pass ztunnel.
//! Mesh→mesh payloads carry [`SECRET`], which must never be seen in plaintext on the
//! wire.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use e2e::cluster::KubePod;
use e2e::node::TestPod;

/// Marks mesh→mesh payloads.
pub const SECRET: &str = "CHAOS-MESH-SECRET";
/// Source ports of probe clients: below the default ephemeral range (32768-60999).
const PORTS: std::ops::Range<u16> = 20000..32000;
const CONNECT: Duration = Duration::from_secs(1);
const ANSWER: Duration = Duration::from_secs(2);

/// Counts since the last [`Stats::take`].
#[derive(Default)]
pub struct Stats {
    attempted: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    bypass: AtomicU64,
    /// Outcomes of the mesh→mesh IPv4 flow, for the time to recover.
    mesh: Mutex<Vec<(Instant, bool)>>,
    /// When any flow last failed.
    last_failure: Mutex<Option<Instant>>,
}

/// A snapshot of [`Stats`].
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub attempted: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub bypass: u64,
    pub mesh: Vec<(Instant, bool)>,
}

impl Stats {
    fn record(&self, outcome: Outcome, mesh_v4: bool) {
        self.attempted.fetch_add(1, Ordering::Relaxed);
        let ok = matches!(outcome, Outcome::Ok);
        match outcome {
            Outcome::Ok => self.succeeded.fetch_add(1, Ordering::Relaxed),
            Outcome::Failed => self.failed.fetch_add(1, Ordering::Relaxed),
            Outcome::Bypassed => self.bypass.fetch_add(1, Ordering::Relaxed),
        };
        if !ok {
            *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        if mesh_v4 {
            self.mesh
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((Instant::now(), ok));
        }
    }

    /// The counts so far; starts a new window.
    pub fn take(&self) -> Window {
        Window {
            attempted: self.attempted.swap(0, Ordering::Relaxed),
            succeeded: self.succeeded.swap(0, Ordering::Relaxed),
            failed: self.failed.swap(0, Ordering::Relaxed),
            bypass: self.bypass.swap(0, Ordering::Relaxed),
            mesh: std::mem::take(&mut *self.mesh.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// Whether no flow has failed for `quiet`, and some mesh→mesh connection
    /// succeeded since `t`.
    pub fn steady(&self, t: Instant, quiet: Duration) -> bool {
        let last = *self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
        self.mesh_ok_since(t) && last.is_none_or(|f| f.elapsed() >= quiet)
    }

    /// Whether a mesh→mesh connection succeeded after `t`.
    pub fn mesh_ok_since(&self, t: Instant) -> bool {
        self.mesh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(at, ok)| *ok && *at > t)
    }
}

/// From `fault_at`, how long until mesh→mesh traffic flowed again: `None` when nothing
/// failed.
pub fn recovery(window: &Window, fault_at: Instant) -> Option<Duration> {
    let last_failure = window
        .mesh
        .iter()
        .filter(|(at, ok)| !ok && *at >= fault_at)
        .map(|(at, _)| *at)
        .max()?;
    let back = window
        .mesh
        .iter()
        .filter(|(at, ok)| *ok && *at > last_failure)
        .map(|(at, _)| *at)
        .min()
        .unwrap_or_else(Instant::now);
    Some(back.saturating_duration_since(fault_at))
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ok,
    Failed,
    Bypassed,
}

/// One flow: from a pod to an address.
#[derive(Clone)]
pub struct Flow {
    pub from: Arc<KubePod>,
    pub to: SocketAddr,
    /// Carries [`SECRET`] (mesh→mesh).
    pub secret: bool,
    /// The destination is an enrolled pod: its app must never see our port.
    pub to_mesh: bool,
    /// The mesh→mesh IPv4 flow, whose outcomes time the recovery.
    pub timed: bool,
}

pub struct Prober {
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    /// Probes under way (the long-lived connection counts while open).
    inflight: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

/// Counts a probe under way while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: &Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::AcqRel);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

static NEXT_PORT: AtomicU64 = AtomicU64::new(0);

/// The next probe source port, cycling through [`PORTS`].
fn next_port() -> u16 {
    let span = u64::from(PORTS.end - PORTS.start);
    let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    // The remainder is below the span, itself a u16.
    PORTS.start + (n % span) as u16
}

/// Connects from inside `pod` to `dst` from a probe source port.
async fn connect(pod: &TestPod, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let port = next_port();
    let src = SocketAddr::new(
        if dst.is_ipv4() {
            pod.ip
        } else {
            pod.ip6().unwrap_or(pod.ip)
        },
        port,
    );
    let std_stream = pod
        .netns()
        .run(|| -> std::io::Result<std::net::TcpStream> {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(dst),
                socket2::Type::STREAM,
                None,
            )?;
            s.set_reuse_address(true)?;
            s.bind(&src.into())?;
            s.set_nonblocking(true)?;
            Ok(std::net::TcpStream::from(std::os::fd::OwnedFd::from(s)))
        })??;
    tokio::time::timeout(CONNECT, TcpSocket::from_std_stream(std_stream).connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))?
}

/// The app saw our own source port: the connection did not pass ztunnel.
fn bypassed(answer: &str, local: SocketAddr) -> bool {
    answer
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("peer="))
        .and_then(|p| p.parse::<SocketAddr>().ok())
        .is_some_and(|peer| peer.port() == local.port())
}

async fn probe(flow: &Flow, seq: u64) -> Outcome {
    let payload = if flow.secret {
        format!("{SECRET}-{seq}\n")
    } else {
        format!("plain-{seq}\n")
    };
    let attempt = async {
        let mut s = connect(&flow.from, flow.to).await?;
        let local = s.local_addr()?;
        s.write_all(payload.as_bytes()).await?;
        s.shutdown().await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>((answer, local))
    };
    match tokio::time::timeout(CONNECT + ANSWER, attempt).await {
        Ok(Ok((answer, local))) => {
            if flow.to_mesh && bypassed(&answer, local) {
                Outcome::Bypassed
            } else if answer.starts_with("peer=") && answer.ends_with(&payload) {
                Outcome::Ok
            } else {
                Outcome::Failed
            }
        }
        _ => Outcome::Failed,
    }
}

/// A long-lived connection: a line every 100 ms, each echoed; reconnects when cut.
/// Each line counts as an attempt.
async fn long_lived(
    flow: Flow,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    inflight: Arc<AtomicUsize>,
) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let _open = InFlight::new(&inflight);
        let Ok(mut s) = connect(&flow.from, flow.to).await else {
            stats.record(Outcome::Failed, false);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(local) = s.local_addr() else { continue };
        let mut buf = vec![0u8; 4096];
        let mut greeted = String::new();
        loop {
            if stop.load(Ordering::Relaxed) || paused.load(Ordering::Relaxed) {
                // Closed while paused; a new one once resumed.
                break;
            }
            seq += 1;
            let line = format!("{SECRET}-long-{seq}\n");
            let exchange = async {
                s.write_all(line.as_bytes()).await?;
                let mut got = String::new();
                while !got.contains(&line) {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        return Err(std::io::Error::other("closed"));
                    }
                    got.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                Ok::<_, std::io::Error>(got)
            };
            match tokio::time::timeout(ANSWER, exchange).await {
                Ok(Ok(got)) => {
                    if greeted.is_empty() {
                        greeted = got.clone();
                        if flow.to_mesh && bypassed(&greeted, local) {
                            stats.record(Outcome::Bypassed, false);
                            break;
                        }
                    }
                    stats.record(Outcome::Ok, false);
                }
                _ => {
                    stats.record(Outcome::Failed, false);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Prober {
    /// Starts every flow, each opening a new connection every `gap`; `long` is held
    /// open and written to.
    pub fn start(flows: Vec<Flow>, long: Flow, gap: Duration) -> Prober {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let inflight = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for flow in flows {
            let (stats, stop, paused, inflight) = (
                stats.clone(),
                stop.clone(),
                paused.clone(),
                inflight.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    if paused.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    seq += 1;
                    let _probing = InFlight::new(&inflight);
                    let outcome = probe(&flow, seq).await;
                    stats.record(outcome, flow.timed);
                    tokio::time::sleep(gap).await;
                }
            }));
        }
        tasks.push(tokio::spawn(long_lived(
            long,
            stats.clone(),
            stop.clone(),
            paused.clone(),
            inflight.clone(),
        )));
        Prober {
            stats,
            stop,
            paused,
            inflight,
            tasks,
        }
    }

    /// Stops opening connections (and closes the long-lived one) until resumed, for a
    /// quiet node to count fds on.
    pub async fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + CONNECT + ANSWER;
        while self.inflight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Closes on both sides settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The address of `pod` in `dst`'s family.
pub fn addr_of(pod: &TestPod, v6: bool, port: u16) -> SocketAddr {
    let ip: IpAddr = if v6 {
        pod.ip6().unwrap_or(pod.ip)
    } else {
        pod.ip
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_runs_from_the_fault_to_the_first_success_after_the_last_failure() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let w = Window {
            mesh: vec![
                (at(10), true),
                (at(20), false),
                (at(30), true),
                (at(40), false),
                (at(90), true),
                (at(95), true),
            ],
            ..Default::default()
        };
        assert_eq!(recovery(&w, at(15)), Some(Duration::from_millis(75)));
        let clean = Window {
            mesh: vec![(at(10), true)],
            ..Default::default()
        };
        assert_eq!(recovery(&clean, t0), None);
    }

    #[test]
    fn source_ports_cycle_inside_their_range() {
        for _ in 0..(3 * (PORTS.end - PORTS.start) as usize) {
            assert!(PORTS.contains(&next_port()));
        }
    }

    #[test]
    fn only_our_own_port_seen_by_the_app_is_a_bypass() {
        let local: SocketAddr = "10.0.0.2:20001".parse().unwrap();
        assert!(bypassed("peer=10.0.0.2:20001\nhello\n", local));
        assert!(!bypassed("peer=10.0.0.2:41234\nhello\n", local));
        assert!(!bypassed("garbage", local));
    }
}
