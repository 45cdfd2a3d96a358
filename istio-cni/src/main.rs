//! `istio-cni`: the ambient node agent.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use istio_cni::rules::{Backend, Iptables, RuleConfig};
use istio_cni::{Agent, AgentConfig};
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    let cfg = AgentConfig {
        zds_socket: args.ztunnel_uds,
        zds_socket_mode: 0o600,
        zds_timeout: Duration::from_secs(args.zds_timeout),
        rules: RuleConfig::default(),
        iptables: Iptables {
            backend,
            lock_wait: Duration::from_secs(args.iptables_lock_wait),
        },
    };
    println!("ztunnel_uds: {}", cfg.zds_socket.display());
    println!("iptables_backend: {backend:?}");
    println!("zds_timeout: {:?}", cfg.zds_timeout);
    let _agent = Agent::start(cfg, &[]).await.context("starting the agent")?;
    shutdown_signal().await?;
    tracing::info!("shutting down");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    Ok(())
}
