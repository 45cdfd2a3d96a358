//! ztunnel as a real process: started with the environment a DaemonSet would give it,
//! its logs captured to a file the test can wait on. Killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::node::TestNode;

pub struct Ztunnel {
    child: Child,
    log: PathBuf,
}

impl Ztunnel {
    /// Starts ztunnel number `n` of `node`, connecting to the node's ZDS socket.
    pub fn start(node: &TestNode, n: u32) -> Ztunnel {
        let log = node.dir.path().join(format!("ztunnel-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(crate::bin_path("ztunnel"))
            .env("INPOD_UDS", node.zds_socket())
            .env("READINESS_ADDR", "127.0.0.1:0")
            .env("POD_DRAIN_GRACE", "1s")
            .env("CONNECT_TIMEOUT", "2s")
            .env("NODE_NAME", format!("node-{}", node.id))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start ztunnel");
        Ztunnel { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many log lines contain every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.logs()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits until at least `n` log lines contain every one of `needles`.
    pub async fn wait_for(&self, needles: &[&str], n: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.count(needles) < n {
            assert!(
                Instant::now() < deadline,
                "ztunnel never logged {n} line(s) with {needles:?}; its log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The readiness endpoint's address, from the startup log.
    pub async fn readiness_addr(&self) -> std::net::SocketAddr {
        self.wait_for(&["readiness endpoint listening"], 1).await;
        let logs = self.logs();
        let line = logs
            .lines()
            .find(|l| l.contains("readiness endpoint listening"))
            .unwrap_or_default();
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("addr= in the readiness log line");
        addr.parse().expect("readiness address")
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- ztunnel log ({}) ---\n{}",
                self.log.display(),
                self.logs()
            );
        }
    }
}
