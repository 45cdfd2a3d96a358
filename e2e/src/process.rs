//! ztunnel and the agent as real processes: started with the environment a DaemonSet
//! would give them, their logs captured to a file the test can wait on. Killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::node::TestNode;

/// A project binary running as a process, its output in a log file.
pub struct Process {
    child: Child,
    log: PathBuf,
}

/// ztunnel.
pub type Ztunnel = Process;
/// The node agent (`istio-cni`) in Kubernetes mode.
pub type AgentProcess = Process;

/// The agent binary with only the capabilities its chart gives its container; with
/// `rootfs`, chrooted into that root filesystem (the agent image's packages, which
/// `cargo xtask setup` assembles) in a mount namespace of its own that sees the
/// node's `/proc`, `/sys`, `/dev`, `/run` (netns, xtables lock) and `/tmp` (the test
/// node's files), so the mounts go with the process.
pub fn agent_command(rootfs: Option<&std::path::Path>) -> Command {
    let caps = crate::charts::agent_setpriv_args();
    let Some(rootfs) = rootfs else {
        return setpriv(caps, crate::bin_path("istio-cni"));
    };
    let bin = rootfs.join("usr/local/bin/istio-cni");
    std::fs::copy(crate::bin_path("istio-cni"), &bin).expect("copy the agent into the rootfs");
    // The root is the script's $0 (no quoting of paths in the script); arguments
    // added to the command reach the agent as "$@".
    let script = format!(
        "for d in proc sys dev run tmp; do mount --rbind \"/$d\" \"$0/$d\" || exit 1; done; \
         exec chroot \"$0\" setpriv {} /usr/local/bin/istio-cni \"$@\"",
        caps.join(" ")
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(rootfs);
    cmd
}

/// `program` run by `setpriv` with `args` (see [`crate::charts`]).
fn setpriv(args: Vec<String>, program: PathBuf) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(args).arg(program);
    cmd
}

impl Process {
    /// Starts the agent (`cmd`, see [`agent_command`]) for `node`, watching the API
    /// server behind `kubeconfig` as node `node_name`, serving the node's ZDS socket;
    /// `n` names its log file.
    pub fn start_agent(
        mut cmd: Command,
        node: &TestNode,
        n: u32,
        kubeconfig: &std::path::Path,
        node_name: &str,
        probe_set: &str,
        adjust: impl FnOnce(&mut Command),
    ) -> AgentProcess {
        let log = node.dir.path().join(format!("agent-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        cmd.env("NODE_NAME", node_name)
            .env("KUBECONFIG", kubeconfig)
            .env("ZTUNNEL_UDS", node.zds_socket())
            .env("HOST_PROBE_SET", probe_set)
            .env(
                "PLUGIN_EVENT_SOCKET",
                node.dir.path().join("pluginevent.sock"),
            )
            // Never the machine's own CNI directories or ports.
            .env("CNI_CONF_DIR", node.dir.path().join("net.d"))
            .env("CNI_BIN_DIR", node.dir.path().join("cni-bin"))
            .env("AGENT_READINESS_ADDR", "127.0.0.1:0")
            .env("MONITORING_ADDR", "127.0.0.1:0")
            .env("DEBUG_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            // As a DaemonSet runs it: no NO_COLOR, stdout a file.
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        adjust(&mut cmd);
        let child = cmd.spawn().expect("start istio-cni");
        Process { child, log }
    }

    /// Starts ztunnel number `n` of `node`, connecting to the node's ZDS socket, with
    /// no mesh (`PASSTHROUGH_ONLY`): for tests of capture and the ZDS lifecycle.
    pub fn start(node: &TestNode, n: u32) -> Ztunnel {
        Self::start_with(node, n, |cmd| {
            cmd.env("PASSTHROUGH_ONLY", "true");
        })
    }

    /// Like [`Ztunnel::start`], with a chance to adjust the command (env, …).
    pub fn start_with(node: &TestNode, n: u32, adjust: impl FnOnce(&mut Command)) -> Ztunnel {
        Self::spawn(node, n, crate::bin_path("ztunnel"), adjust)
    }

    /// Starts ztunnel in mesh mode: the node's local config and CA, short reload poll,
    /// plus `env`.
    pub fn start_mesh(node: &TestNode, n: u32, env: &[(&str, &str)]) -> Ztunnel {
        let mesh = node.mesh_files();
        Self::start_with(node, n, |cmd| {
            cmd.env("LOCAL_XDS_PATH", &mesh.config)
                .env("LOCAL_CA_CERT", &mesh.ca_cert)
                .env("LOCAL_CA_KEY", &mesh.ca_key)
                .env("LOCAL_XDS_POLL", "100ms");
            for (k, v) in env {
                cmd.env(k, v);
            }
        })
    }

    /// Starts ztunnel as another user. The binary is copied into the node's directory
    /// first, so it can be run whatever the permissions of the checkout's path.
    pub fn start_as(node: &TestNode, n: u32, uid: u32) -> Ztunnel {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let bin = node.dir.path().join("ztunnel-copy");
        std::fs::copy(crate::bin_path("ztunnel"), &bin).expect("copy ztunnel");
        for path in [node.dir.path(), bin.as_path()] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        // Another user than the chart's: only the capabilities are the chart's.
        let cmd = setpriv(crate::charts::ztunnel_setpriv_args(false), bin);
        Self::spawn_cmd(node, n, cmd, |cmd| {
            cmd.uid(uid).gid(uid).env("PASSTHROUGH_ONLY", "true");
        })
    }

    /// Starts ztunnel (no mesh) inside the network namespace `netns` (`ip netns exec`,
    /// which execs it: the pid is ztunnel's), as a ztunnel pod runs in its own netns;
    /// its admin API listens on that netns's localhost:15000, as Istio's.
    pub fn start_in_netns(node: &TestNode, n: u32, netns: &str) -> Ztunnel {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, "setpriv"])
            .args(crate::charts::ztunnel_setpriv_args(true))
            .arg(crate::bin_path("ztunnel"));
        Self::spawn_cmd(node, n, cmd, |cmd| {
            cmd.env("PASSTHROUGH_ONLY", "true")
                .env("ADMIN_ADDR", "127.0.0.1:15000");
        })
    }

    /// Runs `bin` as the ztunnel chart runs its container: its group, only its
    /// capabilities.
    fn spawn(node: &TestNode, n: u32, bin: PathBuf, adjust: impl FnOnce(&mut Command)) -> Ztunnel {
        let cmd = setpriv(crate::charts::ztunnel_setpriv_args(true), bin);
        Self::spawn_cmd(node, n, cmd, adjust)
    }

    fn spawn_cmd(
        node: &TestNode,
        n: u32,
        mut cmd: Command,
        adjust: impl FnOnce(&mut Command),
    ) -> Ztunnel {
        let log = node.dir.path().join(format!("ztunnel-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        cmd.env("INPOD_UDS", node.zds_socket())
            .env("READINESS_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("STATS_ADDR", "127.0.0.1:0")
            // The local file (or nothing) unless a test gives a control plane.
            .env("XDS_ADDRESS", "")
            .env("POD_DRAIN_GRACE", "1s")
            .env("CONNECT_TIMEOUT", "2s")
            .env("NODE_NAME", node.node_name())
            .env("RUST_LOG", "info")
            // As a DaemonSet runs it: no NO_COLOR, stdout a file.
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        adjust(&mut cmd);
        let child = cmd.spawn().expect("start ztunnel");
        Process { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log lines that contain every one of `needles`.
    pub fn lines(&self, needles: &[&str]) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// How many log lines contain every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.lines(needles).len()
    }

    /// Waits until at least `n` log lines contain every one of `needles`.
    pub async fn wait_for(&self, needles: &[&str], n: usize) {
        poll(|| async {
            (self.count(needles) < n).then(|| {
                format!(
                    "{} never logged {n} line(s) with {needles:?}; its log:\n{}",
                    self.log.display(),
                    self.logs()
                )
            })
        })
        .await
    }

    /// The readiness endpoint's address, from the startup log.
    pub async fn readiness_addr(&self) -> std::net::SocketAddr {
        self.listening_addr("readiness endpoint listening").await
    }

    /// The HTTP status of `GET /healthz/ready`.
    pub async fn readiness(&self) -> u16 {
        self.readiness_body().await.0
    }

    /// The status and body of `GET /healthz/ready` (the probe's port: Istio's terse
    /// answer).
    pub async fn readiness_body(&self) -> (u16, String) {
        let addr = self.readiness_addr().await;
        crate::http_get(addr, "/healthz/ready").await
    }

    /// The status and body of the admin endpoint's `/healthz/ready`: readiness with
    /// how each pod, certificate and the xDS stream stand.
    pub async fn readiness_detail(&self) -> (u16, String) {
        crate::http_get(self.admin_addr().await, "/healthz/ready").await
    }

    /// ztunnel's `/config_dump` (admin endpoint).
    pub async fn config_dump(&self) -> serde_json::Value {
        let (status, body) = self.admin_get("/config_dump").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("config_dump is not JSON: {e}\n{body}"))
    }

    /// The admin endpoint's address (ztunnel's localhost:15000), from the startup log.
    pub async fn admin_addr(&self) -> std::net::SocketAddr {
        self.listening_addr("admin endpoint listening").await
    }

    /// `POST path` on the admin endpoint: the status and body.
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        crate::http_post(self.admin_addr().await, path).await
    }

    /// `GET path` on the admin endpoint: the status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        crate::http_get(self.admin_addr().await, path).await
    }

    /// The Prometheus text of the stats endpoint (`/stats/prometheus`, :15020).
    pub async fn metrics(&self) -> String {
        let addr = self.listening_addr("stats endpoint listening").await;
        let (status, body) = crate::http_get(addr, "/stats/prometheus").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits until ztunnel's `/config_dump` satisfies `cond` (`what` names it in the
    /// failure): state, where a log line would be a weaker witness.
    pub async fn wait_config(&self, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
        poll(|| async {
            let dump = self.config_dump().await;
            (!cond(&dump)).then(|| format!("ztunnel's config_dump never showed {what}:\n{dump:#}"))
        })
        .await
    }

    /// The value of ztunnel's metric `name`, summed over its series.
    pub async fn metric(&self, name: &str) -> f64 {
        crate::prom::sum(&self.metrics().await, name, &[])
    }

    /// Waits until ztunnel's metric `name` (summed over its series) is at least `n`:
    /// state, where a log line would be a weaker witness (for instance
    /// `workload_manager_proxies_stopped_total` for a pod's proxy drained).
    pub async fn wait_metric(&self, name: &str, n: f64) {
        poll(|| async {
            let got = self.metric(name).await;
            (got < n).then(|| {
                format!(
                    "{name} stayed {got}, expected at least {n}; the log:\n{}",
                    self.logs()
                )
            })
        })
        .await
    }

    /// Polls readiness until it is `status`.
    pub async fn wait_readiness(&self, status: u16) {
        poll(|| async {
            let got = self.readiness().await;
            (got != status).then(|| format!("readiness stayed {got}, expected {status}"))
        })
        .await
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a pod deletion during a rolling upgrade); does not wait.
    pub fn signal_terminate(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) {
        self.signal_terminate();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit code once it has exited (`None`: still running, or killed by a signal).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    /// CPU time (user + system) the process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after ") ".
        let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
            .sum();
        let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        ticks as f64 / per_second
    }

    /// The address an endpoint logged as `<line>` with `addr=…` listens on.
    pub async fn listening_addr(&self, line: &str) -> std::net::SocketAddr {
        self.wait_for(&[line], 1).await;
        let logs = self.logs();
        logs.lines()
            .find(|l| l.contains(line))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr= in the line {line:?}"))
    }

    /// Open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Asks `probe` every 50 ms until it is done (`None`), for at most 15 s; then fails
/// with why it was not (what it said last).
async fn poll<F, Fut>(mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Some(why) = probe().await {
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- process log ({}) ---\n{}",
                self.log.display(),
                self.logs()
            );
        }
    }
}
