//! `istio-cni`: the ambient node agent.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use istio_cni::discovery::find_pod_netns;
use istio_cni::k8s::controller::{
    pod_ips, to_enroll_pod, Controller, ControllerConfig, Enrolled, PodKey,
};
use istio_cni::k8s::selection::{Selection, REDIRECTION_ANNOTATION};
use istio_cni::rules::hostprobe::HostProbes;
use istio_cni::rules::{Backend, Iptables, RuleConfig};
use istio_cni::{Agent, AgentConfig, EnrollError, EnrollStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use protocol::Netns;
use tracing_subscriber::EnvFilter;

/// The ambient node agent: sets up in-pod traffic redirection and hands pods' network
/// namespaces to ztunnel.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
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
    /// This node's name. With it, the agent watches the Kubernetes API and enrolls the
    /// node's pods; without it, it only serves ZDS.
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
    /// Where the CNI plugin reaches the agent.
    #[arg(long, env = "PLUGIN_EVENT_SOCKET", default_value = istio_cni::cni::event::DEFAULT_SOCKET)]
    plugin_event_socket: PathBuf,
    /// The node's CNI plugin directory, where install-cni puts the plugin.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI network config directory, whose primary config gets our entry.
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Install the plugin into the node's CNI config (and keep it there).
    #[arg(long, env = "INSTALL_CNI", default_value_t = true, action = clap::ArgAction::Set)]
    install_cni: bool,
    /// Remove the plugin on exit (DaemonSet removal). Off by default, so an upgrade
    /// leaves the plugin in place and new pods wait for the new agent.
    #[arg(long, env = "UNINSTALL_CNI_ON_EXIT", default_value_t = false, action = clap::ArgAction::Set)]
    uninstall_cni_on_exit: bool,
    /// Address of `/readyz`.
    #[arg(long, env = "AGENT_READINESS_ADDR", default_value = "0.0.0.0:8000")]
    readiness_addr: std::net::SocketAddr,
    /// The ipset of enrolled pod IPs that host probe rules SNAT to.
    #[arg(long, env = "HOST_PROBE_SET", default_value = istio_cni::rules::hostprobe::PROBE_SET)]
    host_probe_set: String,
}

/// One binary, two roles: run by a container runtime (`CNI_COMMAND` set) it is the
/// chained CNI plugin; otherwise it is the node agent.
fn main() -> std::process::ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return istio_cni::cni::plugin::main();
    }
    match agent_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn agent_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let backend = match args.iptables_backend.as_str() {
        "auto" => Backend::detect().context("detecting the host's iptables backend")?,
        other => other.parse().map_err(anyhow::Error::msg)?,
    };
    let iptables = Iptables {
        backend,
        lock_wait: Duration::from_secs(args.iptables_lock_wait),
    };
    let cfg = AgentConfig {
        zds_socket: args.ztunnel_uds.clone(),
        zds_socket_mode: 0o600,
        zds_timeout: Duration::from_secs(args.zds_timeout),
        rules: RuleConfig::default(),
        iptables: iptables.clone(),
    };
    println!("ztunnel_uds: {}", cfg.zds_socket.display());
    println!("iptables_backend: {backend:?}");
    println!("zds_timeout: {:?}", cfg.zds_timeout);
    println!("node_name: {}", args.node_name.as_deref().unwrap_or(""));
    println!(
        "excluded_namespaces: {}",
        args.excluded_namespaces.join(",")
    );
    println!("host_probe_set: {}", args.host_probe_set);
    println!(
        "plugin_event_socket: {}",
        args.plugin_event_socket.display()
    );
    let Some(node) = args.node_name.clone() else {
        let _agent = Agent::start(cfg, &[]).await.context("starting the agent")?;
        return shutdown_signal().await;
    };
    let client = match &args.kubeconfig {
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
    };

    // Pods this node enrolled before the agent (re)started: find their netns in /proc
    // and hand them to ztunnel's snapshot before serving.
    let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let pods = Api::<Pod>::all(client.clone())
        .list(&on_node)
        .await
        .context("listing this node's pods")?;
    let annotated: Vec<&Pod> = pods
        .items
        .iter()
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION_ANNOTATION))
                .is_some_and(|v| v == "enabled" || v == "pending")
        })
        .collect();
    let wanted: HashMap<String, Vec<_>> = annotated
        .iter()
        .map(|p| (p.metadata.uid.clone().unwrap_or_default(), pod_ips(p)))
        .collect();
    let mut found = find_pod_netns(&args.proc_root, &wanted).context("scanning /proc for pods")?;
    let mut adopted = HashMap::new();
    let mut probe_members = BTreeMap::new();
    let mut adopt = Vec::new();
    for p in annotated {
        let epod = to_enroll_pod(p);
        let netns = found
            .remove(epod.uid.as_str())
            .map(Arc::new)
            .ok_or_else(|| EnrollError::Netns {
                uid: epod.uid.clone(),
                path: args.proc_root.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no process of the pod found",
                ),
            });
        tracing::info!(uid = %epod.uid, found = netns.is_ok(), "adopting a pod enrolled before this agent started");
        for ip in &epod.ips {
            probe_members.insert(*ip, epod.uid.clone());
        }
        adopted.insert(
            PodKey {
                namespace: epod.namespace.clone(),
                name: epod.name.clone(),
            },
            Enrolled {
                uid: epod.uid.clone(),
                ips: epod.ips.clone(),
                status: EnrollStatus::Enabled,
            },
        );
        adopt.push((epod, netns));
    }
    let agent = Agent::start_adopting(cfg, adopt)
        .await
        .context("starting the agent")?;

    let host = Netns::current().context("opening the host netns")?;
    let probes = HostProbes::new(&RuleConfig::default(), iptables, &args.host_probe_set);
    probes
        .install(&host)
        .context("installing host probe rules")?;
    probes
        .sync(&host, &probe_members)
        .context("syncing the host probe set")?;

    let (controller, run) = Controller::new(
        client,
        agent.enroller().clone(),
        Some((probes, host)),
        ControllerConfig {
            node_name: node,
            selection: Selection {
                excluded_namespaces: args.excluded_namespaces.clone(),
                ..Selection::default()
            },
            proc_root: args.proc_root.clone(),
            workers: 2,
        },
        adopted,
    );
    let plugin_events = istio_cni::cni::server::bind(&args.plugin_event_socket)
        .with_context(|| format!("binding {}", args.plugin_event_socket.display()))?;
    tokio::spawn(istio_cni::cni::server::serve(plugin_events, controller));

    // install-cni: the plugin goes into the node's chain only once the agent serves it.
    let installer = args
        .install_cni
        .then(|| install_cni(&args))
        .transpose()?
        .map(Arc::new);
    if let Some(installer) = &installer {
        let repairer = installer.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match repairer.repair() {
                    Err(e @ istio_cni::cni::install::InstallError::NoPrimaryConfig(_)) => {
                        tracing::debug!("{e}")
                    }
                    Err(e) => tracing::warn!("repairing the CNI config: {e}"),
                    Ok(_) => {}
                }
            }
        });
    }
    let readiness = installer.clone();
    let ready: Arc<dyn Fn() -> bool + Send + Sync> =
        Arc::new(move || readiness.as_ref().is_none_or(|i| i.is_installed()));
    let readiness_addr = args.readiness_addr;
    tokio::spawn(async move {
        if let Err(e) = istio_cni::readyz::serve(readiness_addr, ready).await {
            tracing::warn!("readiness endpoint: {e}");
        }
    });
    let result = tokio::select! {
        _ = run => Ok(()),
        r = shutdown_signal() => r,
    };
    if let (Some(installer), true) = (&installer, args.uninstall_cni_on_exit) {
        installer
            .uninstall()
            .context("uninstalling the CNI plugin")?;
    }
    result
}

/// Writes the plugin's kubeconfig (0600) and installs the plugin into the chain.
fn install_cni(args: &Args) -> anyhow::Result<istio_cni::cni::install::Installer> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let kubeconfig = args.cni_conf_dir.join("istio-cni-kubeconfig");
    let contents = match &args.kubeconfig {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").unwrap_or_default();
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://{host}:{port}\n    certificate-authority: {sa}/ca.crt\ncontexts:\n- name: istio-cni\n  context:\n    cluster: local\n    user: istio-cni\ncurrent-context: istio-cni\nusers:\n- name: istio-cni\n  user:\n    tokenFile: {sa}/token\n"
            )
            .into_bytes()
        }
    };
    std::fs::create_dir_all(&args.cni_conf_dir)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&kubeconfig)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
    f.write_all(&contents)?;
    let installer =
        istio_cni::cni::install::Installer::new(istio_cni::cni::install::InstallConfig {
            bin_dir: args.cni_bin_dir.clone(),
            conf_dir: args.cni_conf_dir.clone(),
            source_binary: std::env::current_exe().context("locating the agent binary")?,
            plugin_conf: serde_json::json!({
                "kubeconfig": kubeconfig,
                "agent_socket": args.plugin_event_socket,
                "exclude_namespaces": args.excluded_namespaces,
            }),
        });
    if let Err(e) = installer.install() {
        // No primary config yet (the primary CNI installs it later): the repair loop
        // installs us as soon as it appears.
        tracing::warn!("installing the CNI plugin: {e}; will retry");
    }
    Ok(installer)
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    tracing::info!("shutting down");
    Ok(())
}
