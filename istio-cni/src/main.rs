//! `istio-cni`: the ambient node agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use istio_cni::cni::install::{InstallConfig, Installer};
use istio_cni::cni::kubeconfig::{self, Credentials};
use istio_cni::k8s::controller::{annotated_pods, Controller, ControllerConfig};
use istio_cni::k8s::selection::Selection;
use istio_cni::k8s::shutdown;
use istio_cni::k8s::status::KubeStatus;
use istio_cni::rules::{Backend, Family, Iptables};
use istio_cni::{Agent, AgentConfig, Enrollment, Startup};
use tracing_subscriber::EnvFilter;

/// The ambient node agent: sets up in-pod traffic redirection and hands pods' network
/// namespaces to ztunnel.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Option<Subcommand>,
    /// The ZDS socket ztunnel connects to.
    #[arg(
        long,
        env = "ZTUNNEL_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    ztunnel_uds: PathBuf,
    /// iptables backend for pod rules: auto (match the host), legacy or nft.
    #[arg(long, env = "IPTABLES_BACKEND", default_value = "auto")]
    iptables_backend: String,
    /// Seconds to wait for the xtables lock.
    #[arg(long, env = "IPTABLES_LOCK_WAIT", default_value_t = 5)]
    iptables_lock_wait: u64,
    /// Seconds to wait for each ZDS write and ack.
    #[arg(long, env = "ZDS_TIMEOUT", default_value_t = 5)]
    zds_timeout: u64,
    /// This node's name: the agent watches the Kubernetes API for the node's pods.
    /// Required to run the agent (not its subcommands).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// kubeconfig to reach the API server (default: in-cluster config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Where to look for pods' processes.
    #[arg(long, env = "PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// Namespaces whose pods are never enrolled (comma-separated).
    #[arg(
        long,
        env = "AMBIENT_EXCLUDED_NAMESPACES",
        default_value = "kube-system",
        value_delimiter = ','
    )]
    excluded_namespaces: Vec<String>,
    /// The agent's own namespace, which is ztunnel's (both charts install into one
    /// release namespace): only there does `app=ztunnel` mean ztunnel.
    #[arg(long, env = "POD_NAMESPACE", default_value = istio_cni::k8s::selection::DEFAULT_SYSTEM_NAMESPACE)]
    pod_namespace: String,
    /// Where the CNI plugin reaches the agent.
    #[arg(long, env = "PLUGIN_EVENT_SOCKET", default_value = istio_cni::cni::event::DEFAULT_SOCKET)]
    plugin_event_socket: PathBuf,
    /// The node's CNI plugin directory, where install-cni puts the plugin.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI network config directory, whose primary config gets our entry
    /// (Istio's `MOUNTED_CNI_NET_DIR`: where the agent sees it).
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// The same directory as the container runtime sees it, for the paths written
    /// into the plugin's config (default: `--cni-conf-dir`). Istio's name.
    #[arg(long, env = "CNI_NET_DIR")]
    cni_net_dir: Option<PathBuf>,
    /// Log lines as text (`plain`) or one JSON object each (`json`).
    #[arg(long, env = "LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    log_format: String,
    /// Install the plugin into the node's CNI config (and keep it there).
    #[arg(long, env = "INSTALL_CNI", default_value_t = true, action = clap::ArgAction::Set)]
    install_cni: bool,
    /// Always remove the plugin on exit. Off, the agent asks the API server about its
    /// DaemonSet when it stops, as Istio's does: still there (an upgrade, a restart),
    /// the plugin stays and new pods wait for the next agent; gone or going (an
    /// uninstall), it is removed.
    #[arg(long, env = "UNINSTALL_CNI_ON_EXIT", default_value_t = false, action = clap::ArgAction::Set)]
    uninstall_cni_on_exit: bool,
    /// Istio's switch for the same: remove the plugin on every exit, upgrades included.
    #[arg(long, env = "AMBIENT_DISABLE_SAFE_UPGRADE", default_value_t = false, action = clap::ArgAction::Set)]
    ambient_disable_safe_upgrade: bool,
    /// Address of `/readyz`.
    #[arg(long, env = "AGENT_READINESS_ADDR", default_value = "0.0.0.0:8000")]
    readiness_addr: std::net::SocketAddr,
    /// Address of the Prometheus metrics (`/metrics`; Istio's CNI agent serves them on
    /// its monitoring port, 15014). Nothing else is served there.
    #[arg(long, env = "MONITORING_ADDR", default_value = "0.0.0.0:15014")]
    monitoring_addr: std::net::SocketAddr,
    /// Address of `/debug/enrollment` (every enrolled pod's identity, addresses, netns
    /// and fds, for `istio-cni diagnose`): a loopback address, as the agent runs on
    /// the host network; another is refused.
    #[arg(long, env = "DEBUG_ADDR", default_value = "127.0.0.1:15015")]
    debug_addr: std::net::SocketAddr,
    /// Seconds between re-verifications of every enrolled pod's rules (jittered by a
    /// tenth); drift is repaired. 0 turns the periodic check off (rules are still
    /// checked on every reconcile).
    #[arg(long, env = "DRIFT_CHECK_INTERVAL", default_value_t = 60)]
    drift_check_interval: u64,
    /// The ipsets of enrolled pod IPs that host probe rules SNAT to: this prefix plus
    /// `-v4` and `-v6`.
    #[arg(long, env = "HOST_PROBE_SET", default_value = istio_cni::rules::hostprobe::PROBE_SET_PREFIX)]
    host_probe_set: String,
    /// Redirect IPv6 as well as IPv4 (Istio's `AMBIENT_IPV6`). Off, a pod with a
    /// routable IPv6 address is refused rather than left with uncaptured IPv6.
    #[arg(long, env = "AMBIENT_IPV6", default_value_t = true, action = clap::ArgAction::Set)]
    ambient_ipv6: bool,
    /// Seconds an HTTP client of `/readyz` has to send its request headers.
    #[arg(long, env = "HTTP_HEADER_READ_TIMEOUT", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_header_read_timeout: u64,
    /// HTTP connections served at once; more are closed at once.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    http_max_connections: u32,
}

#[derive(Debug, clap::Subcommand)]
enum Subcommand {
    /// Checks enrolled pods on this node (rules, route, ztunnel's listeners and admin
    /// view, annotation) and says what is wrong and what to do. Exit code 1 when
    /// something is wrong, 2 when the checks could not run.
    Diagnose(DiagnoseArgs),
    /// Prints the build version and the protocol versions this build speaks (ZDS
    /// towards ztunnel, plugin events from the CNI plugin), then exits.
    Version,
    /// Records on every pod istio-cni redirects, cluster-wide, a Warning event
    /// (IstioCNIUninstalled) saying it keeps its redirection until it ends: what the
    /// chart's pre-delete hook runs during `helm uninstall`. Always exits 0 (a pod it
    /// could not tell is printed), so it never blocks an uninstall.
    AnnounceUninstall,
}

/// What `istio-cni version` prints: with the plugin-event version it speaks.
fn build_info() -> String {
    let events = istio_cni::cni::event::EVENT_VERSION.to_string();
    protocol::message::build_info(&[("PluginEventVersion", &events)])
}

#[derive(Debug, clap::Args)]
struct DiagnoseArgs {
    /// The pod (`namespace/name`, `name` or uid); every enrolled pod without it.
    pod: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The agent's debug address (`DEBUG_ADDR`).
    #[arg(long, env = "DIAGNOSE_AGENT_ADDR", default_value = "127.0.0.1:15015")]
    agent: std::net::SocketAddr,
    /// ztunnel's admin address; by default the agent's ZDS peer's netns is entered to
    /// reach its localhost:15000.
    #[arg(long)]
    ztunnel_admin: Option<std::net::SocketAddr>,
}

impl Args {
    /// The CNI config directory as the container runtime sees it.
    fn runtime_conf_dir(&self) -> &Path {
        self.cni_net_dir.as_deref().unwrap_or(&self.cni_conf_dir)
    }

    fn http_limits(&self) -> istio_cni::http::Limits {
        istio_cni::http::Limits {
            header_read_timeout: Duration::from_secs(self.http_header_read_timeout),
            max_connections: self.http_max_connections as usize,
            ..Default::default()
        }
    }
}

/// One binary, two roles: run by a container runtime (`CNI_COMMAND` set) it is the
/// chained CNI plugin; otherwise it is the node agent.
fn main() -> std::process::ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return istio_cni::cni::plugin::main();
    }
    let argv: Vec<String> = match std::env::args_os().map(|a| a.into_string()).collect() {
        Ok(argv) => argv,
        Err(bad) => {
            eprintln!("Error: an argument is not UTF-8: {bad:?}");
            return std::process::ExitCode::from(2);
        }
    };
    // Istio's names for the same settings, read as aliases of ours.
    let istio = istio_cni::istio_env::translate(|k| std::env::var(k).ok(), &argv);
    let extra = istio.as_ref().map(|t| t.args.clone()).unwrap_or_default();
    let mut args = Args::parse_from(istio_cni::istio_env::with_args(argv, extra));
    match args.command.take() {
        Some(Subcommand::Diagnose(d)) => return diagnose(&args, d),
        Some(Subcommand::Version) => {
            println!("{}", build_info());
            return std::process::ExitCode::SUCCESS;
        }
        Some(Subcommand::AnnounceUninstall) => return announce_uninstall(&args),
        None => {}
    }
    let notes = match istio {
        Ok(t) => t.notes,
        Err(e) => {
            eprintln!("Error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match agent_main(args, notes) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `istio-cni announce-uninstall`: tells every redirected pod, within a budget; exits
/// 0 whatever happened, saying what it did.
fn announce_uninstall(args: &Args) -> std::process::ExitCode {
    use istio_cni::k8s::notice;
    init_logging(args);
    let run = async {
        let client = kube_client(args).await?;
        let status = istio_cni::k8s::status::KubeStatus::new(client.clone());
        anyhow::Ok(notice::announce(&client, &status).await)
    };
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async { tokio::time::timeout(notice::BUDGET, run).await })
                .map_err(|_| anyhow::anyhow!("no answer within {:?}", notice::BUDGET))
        })
        .and_then(|r| r);
    match outcome {
        Ok(a) => {
            println!(
                "told {} redirected pods that they keep their redirection; {} not told",
                a.told.len(),
                a.untold.len()
            );
            for u in a.untold {
                println!("  not told: {u}");
            }
        }
        Err(e) => println!("could not announce the uninstall: {e:#}"),
    }
    std::process::ExitCode::SUCCESS
}

/// A Kubernetes client: from `--kubeconfig`, else in-cluster.
async fn kube_client(args: &Args) -> anyhow::Result<kube::Client> {
    Ok(match &args.kubeconfig {
        Some(path) => {
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).context("reading the kubeconfig")?;
            kube::Client::try_from(
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?,
            )?
        }
        None => kube::Client::try_default()
            .await
            .context("in-cluster Kubernetes config")?,
    })
}

/// `istio-cni diagnose`: prints the verdicts; the exit code says whether all is well.
fn diagnose(args: &Args, d: DiagnoseArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let run = || -> anyhow::Result<Vec<istio_cni::diagnose::PodDiagnosis>> {
        let backend = match args.iptables_backend.as_str() {
            "auto" => Backend::detect().context("detecting the host's iptables backend")?,
            other => other.parse().map_err(anyhow::Error::msg)?,
        };
        let opts = istio_cni::diagnose::Options {
            agent: d.agent,
            pod: d.pod.clone(),
            ztunnel_admin: d.ztunnel_admin,
            iptables: Iptables {
                backend,
                lock_wait: Duration::from_secs(args.iptables_lock_wait),
            },
            proc_root: args.proc_root.clone(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(istio_cni::diagnose::run(&opts))?)
    };
    let pods = match run() {
        Ok(pods) => pods,
        Err(e) => {
            eprintln!("Error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let healthy = pods.iter().all(|p| p.healthy);
    if d.json {
        let out = serde_json::json!({"healthy": healthy, "pods": pods});
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        if pods.is_empty() {
            println!("no pod is enrolled on this node");
        }
        for p in &pods {
            println!(
                "{}",
                istio_cni::diagnose::verdict::render(&p.findings, &p.problems)
            );
        }
    }
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Logs as `LOG_FORMAT` asks (`RUST_LOG` filters; info by default), in colour only on
/// a terminal.
fn init_logging(args: &Args) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_ansi(protocol::logging::colours_here())
            .with_env_filter(filter)
            .init();
    }
}

#[tokio::main]
async fn agent_main(args: Args, istio_notes: Vec<String>) -> anyhow::Result<()> {
    let node = args.node_name.clone().context(
        "NODE_NAME is not set: the agent enrolls the pods of its node and must know its \
         name (the chart sets it from the pod's spec.nodeName)",
    )?;
    init_logging(&args);
    let backend = match args.iptables_backend.as_str() {
        "auto" => Backend::detect().context("detecting the host's iptables backend")?,
        other => other.parse().map_err(anyhow::Error::msg)?,
    };
    let iptables = Iptables {
        backend,
        lock_wait: Duration::from_secs(args.iptables_lock_wait),
    };
    let cfg = AgentConfig {
        zds_timeout: Duration::from_secs(args.zds_timeout),
        proc_root: args.proc_root.clone(),
        families: if args.ambient_ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        },
        drift_check_interval: (args.drift_check_interval > 0)
            .then(|| Duration::from_secs(args.drift_check_interval)),
        host_probe_set: Some(args.host_probe_set.clone()),
        plugin_event_socket: Some(args.plugin_event_socket.clone()),
        readiness_addr: Some(args.readiness_addr),
        monitoring_addr: Some(args.monitoring_addr),
        debug_addr: Some(args.debug_addr),
        http_limits: args.http_limits(),
        ..AgentConfig::new(args.ztunnel_uds.clone(), iptables)
    };
    println!("version: {}", build_info());
    println!("ztunnel_uds: {}", cfg.zds_socket.display());
    println!("iptables_backend: {backend:?}");
    println!("zds_timeout: {:?}", cfg.zds_timeout);
    println!("node_name: {node}");
    println!(
        "excluded_namespaces: {}",
        args.excluded_namespaces.join(",")
    );
    println!("ztunnel_namespace: {}", args.pod_namespace);
    println!("host_probe_set: {}", args.host_probe_set);
    println!("ambient_ipv6: {}", args.ambient_ipv6);
    println!(
        "plugin_event_socket: {}",
        args.plugin_event_socket.display()
    );
    println!("readiness_addr: {}", args.readiness_addr);
    println!("monitoring_addr: {}", args.monitoring_addr);
    println!("debug_addr: {}", args.debug_addr);
    println!("drift_check_interval: {}s", args.drift_check_interval);
    println!("uninstall_cni_on_exit: {}", args.uninstall_cni_on_exit);
    println!(
        "ambient_disable_safe_upgrade: {}",
        args.ambient_disable_safe_upgrade
    );
    println!(
        "cni_conf_dir: {} (the runtime's: {})",
        args.cni_conf_dir.display(),
        args.runtime_conf_dir().display()
    );
    for note in &istio_notes {
        println!("istio setting {note}");
    }
    // Taken from here on: a stop asked for while the agent starts is seen once it is
    // up, and handled like any other (never the default action, a kill mid-write).
    let mut stop = Stop::new()?;
    let client = kube_client(&args).await?;
    let api = client.clone();

    // The pods this node enrolled before the agent (re)started go into the snapshot
    // before ztunnel can connect: a ztunnel that got an empty one would drop them.
    // An API server that fails now (a restart, overload) is retried, not fatal: exiting
    // would only crash-loop the agent while new pods wait for it.
    let mut backoff = Duration::from_millis(100);
    let adopt = loop {
        let listed = tokio::select! {
            listed = annotated_pods(&client, &node) => listed,
            r = stop.wait() => return r,
        };
        match listed {
            Ok(pods) => break pods,
            Err(e) => {
                tracing::warn!("listing this node's pods: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    let metrics = istio_cni::metrics::SharedMetrics::default();
    let installer = args
        .install_cni
        .then(|| installer(&args, metrics.clone()))
        .transpose()?
        .map(Arc::new);
    let install_ready = installer
        .clone()
        .map(|i| Arc::new(move || i.is_installed()) as Arc<dyn Fn() -> bool + Send + Sync>);
    let agent = Agent::start(
        &cfg,
        Startup {
            status: Some(Arc::new(KubeStatus::new(client.clone()))),
            adopt,
            metrics,
            install_ready,
        },
    )
    .await
    .context("starting the agent")?;
    let enrollment = agent.enrollment().clone();
    let (_controller, run) = Controller::new(
        client,
        enrollment.clone(),
        ControllerConfig {
            node_name: node.clone(),
            selection: Selection {
                excluded_namespaces: args.excluded_namespaces.clone(),
                ztunnel_namespace: args.pod_namespace.clone(),
                ..Selection::default()
            },
            workers: 2,
        },
    );
    // install-cni: the plugin goes into the node's chain only once the agent serves it.
    let kubeconfig_refresh = match &installer {
        Some(i) => Some(install_cni(&args, i)?),
        None => None,
    };
    let repairs = installer.clone().map(|i| tokio::spawn(i.keep_installed()));
    let result = tokio::select! {
        _ = run => Ok(()),
        r = stop.wait() => r,
    };
    let settings = shutdown::Settings {
        uninstall_on_exit: args.uninstall_cni_on_exit,
        disable_safe_upgrade: args.ambient_disable_safe_upgrade,
    };
    let plan = match settings.forced() {
        Some(plan) => plan,
        None => shutdown::decide(&shutdown::look_up(&api, &args.pod_namespace, &node).await),
    };
    match plan {
        shutdown::Plan::Keep(why) => {
            tracing::info!("istio-cni stays installed on this node: {why}");
        }
        shutdown::Plan::Uninstall(why) => {
            tracing::info!("removing istio-cni from this node: {why}");
            // Nothing may put back what is about to be removed.
            for task in [repairs, kubeconfig_refresh].into_iter().flatten() {
                task.abort();
                let _ = task.await;
            }
            leave(&args, installer.as_deref(), &enrollment, &node).await;
        }
    }
    result
}

/// istio-cni's departure from the node: the plugin out of the chain and the bin dir,
/// its kubeconfig, the sockets and the host probe rules removed; the enrolled pods
/// keep their redirection and are told so. Every step is tried; failures are logged
/// with the file to remove by hand.
async fn leave(args: &Args, installer: Option<&Installer>, enrollment: &Enrollment, node: &str) {
    if let Some(installer) = installer {
        if let Err(e) = installer.uninstall() {
            tracing::error!("taking the plugin out of the CNI configuration: {e}");
        }
    }
    let conf_dir = &args.cni_conf_dir;
    let files = [
        conf_dir.join(kubeconfig::FILE_NAME),
        conf_dir.join(kubeconfig::EARLIER_FILE_NAME),
        args.plugin_event_socket.clone(),
        args.ztunnel_uds.clone(),
    ];
    for file in files.iter().filter(|_| installer.is_some()) {
        match std::fs::remove_file(file) {
            Ok(()) => tracing::info!(path = %file.display(), "removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!("removing {}: {e}", file.display()),
        }
    }
    enrollment.leave_node(node).await;
}

/// install-cni's installer for the node's CNI directories (nothing written yet).
fn installer(args: &Args, metrics: istio_cni::metrics::SharedMetrics) -> anyhow::Result<Installer> {
    // The runtime runs the plugin on the node, where the directory may have another
    // path than in the agent's container.
    let plugin_kubeconfig = args.runtime_conf_dir().join(kubeconfig::FILE_NAME);
    Ok(Installer::with_metrics(
        InstallConfig {
            bin_dir: args.cni_bin_dir.clone(),
            conf_dir: args.cni_conf_dir.clone(),
            source_binary: std::env::current_exe().context("locating the agent binary")?,
            plugin_conf: serde_json::json!({
                "kubeconfig": plugin_kubeconfig,
                "agent_socket": args.plugin_event_socket,
                "exclude_namespaces": args.excluded_namespaces,
                "pod_namespace": args.pod_namespace,
            }),
        },
        metrics,
    ))
}

/// Writes the plugin's kubeconfig (and keeps it current), and installs the plugin
/// into the chain.
fn install_cni(args: &Args, installer: &Installer) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let kubeconfig = args.cni_conf_dir.join(kubeconfig::FILE_NAME);
    let credentials = match &args.kubeconfig {
        Some(path) => Credentials::File(path.clone()),
        None => Credentials::in_cluster(
            |k| std::env::var(k).ok(),
            Path::new(kubeconfig::SERVICE_ACCOUNT_DIR),
        )?,
    };
    // The plugin cannot decide anything without it: fail now, not on every pod.
    kubeconfig::write(&credentials, &kubeconfig).context("the CNI plugin's kubeconfig")?;
    let refresh = tokio::spawn(kubeconfig::keep_current(credentials, kubeconfig.clone()));
    if let Err(e) = installer.install() {
        // No primary config yet (the primary CNI installs it later), or one we cannot
        // parse: the watch installs us as soon as it changes.
        tracing::warn!("installing the CNI plugin: {e}; will retry when the CNI config changes");
    }
    // An earlier release's name for the kubeconfig, once the chain names the new one.
    let earlier = args.cni_conf_dir.join(kubeconfig::EARLIER_FILE_NAME);
    if installer.is_installed() && std::fs::remove_file(&earlier).is_ok() {
        tracing::info!(path = %earlier.display(), "removed the kubeconfig an earlier release wrote");
    }
    Ok(refresh)
}

/// SIGTERM (the kubelet stopping the pod) or Ctrl-C.
struct Stop {
    term: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> anyhow::Result<Stop> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Stop {
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn wait(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.term.recv() => {}
            r = tokio::signal::ctrl_c() => r?,
        }
        tracing::info!("shutting down");
        Ok(())
    }
}
