//! ztunnel, the ambient node proxy, in in-pod mode: it receives each enrolled pod's
//! network namespace from the node agent and proxies the pod's traffic from listeners
//! created inside that namespace.

pub mod authz;
pub mod config;
pub mod identity;
pub mod inpod;
pub mod proxy;
pub mod readiness;
pub mod state;
pub mod tls;

use std::sync::Arc;

use config::Config;
use inpod::statemanager::{InpodProxyFactory, StateManager};
use inpod::workloadmanager::WorkloadProxyManager;
use proxy::ProxyConfig;

/// Runs ztunnel until `shutdown` completes, then leaves the agent's stream and drains
/// every pod proxy (listeners close at once, connections get the drain grace period).
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let proxy_cfg = Arc::new(ProxyConfig {
        mark: cfg.packet_mark,
        reuse_port: cfg.inpod_port_reuse,
        drain_grace: cfg.pod_drain_grace,
        connect_timeout: cfg.connect_timeout,
    });
    let state = StateManager::new(Arc::new(InpodProxyFactory { cfg: proxy_cfg }));
    let readiness = readiness::bind(cfg.readiness_addr).await?;
    tokio::spawn(readiness::serve(readiness, state.ready()));
    let zds = WorkloadProxyManager::new(cfg.inpod_uds.clone(), state.clone(), cfg.zds_timeout);
    tokio::select! {
        _ = zds.run() => {}
        _ = shutdown => {}
    }
    state.shutdown().await;
    Ok(())
}
