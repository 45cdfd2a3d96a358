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
use istio_cni::{Agent, AgentConfig, EnrollStatus};
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
        let netns = found.remove(epod.uid.as_str()).map(Arc::new);
        tracing::info!(uid = %epod.uid, found = netns.is_some(), "adopting a pod enrolled before this agent started");
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
        adopt.push((epod, Some(netns)));
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
                excluded_namespaces: args.excluded_namespaces,
                ..Selection::default()
            },
            proc_root: args.proc_root,
            workers: 2,
        },
        adopted,
    );
    let plugin_events = istio_cni::cni::server::bind(&args.plugin_event_socket)
        .with_context(|| format!("binding {}", args.plugin_event_socket.display()))?;
    tokio::spawn(istio_cni::cni::server::serve(plugin_events, controller));
    tokio::select! {
        _ = run => Ok(()),
        r = shutdown_signal() => r,
    }
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
