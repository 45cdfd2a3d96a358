//! ztunnel, the ambient node proxy, in in-pod mode: it receives each enrolled pod's
//! network namespace from the node agent and proxies the pod's traffic from listeners
//! created inside that namespace.

pub mod authz;
pub mod config;
pub mod http;
pub mod identity;
pub mod inpod;
pub mod proxy;
pub mod readiness;
pub mod state;
pub mod tls;

use std::sync::Arc;

use config::{Config, MeshSource};
use identity::manager::CertManager;
use inpod::packet::Keepalive;
use inpod::statemanager::StateManager;
use inpod::workloadmanager::WorkloadProxyManager;
use proxy::factory::InpodProxyFactory;
use proxy::pool::HboneConfig;
use proxy::{MeshConfig, ProxyConfig};
use state::Store;

/// The mesh side: its state (from the local config, reloaded on change) and the local
/// CA. `None` only with `PASSTHROUGH_ONLY`; with no source at all, an error.
fn mesh_config(cfg: &Config) -> anyhow::Result<Option<Arc<MeshConfig>>> {
    let path = match cfg.mesh_source().map_err(anyhow::Error::msg)? {
        MeshSource::Passthrough => {
            tracing::warn!("PASSTHROUGH_ONLY: no mesh; every pod's traffic is passed through in plaintext, without policy");
            return Ok(None);
        }
        MeshSource::LocalFile(path) => path,
    };
    if let Some(addr) = cfg.xds() {
        tracing::warn!("XDS_ADDRESS={addr}: this build has no xDS client yet; mesh state comes from LOCAL_XDS_PATH only");
    }
    let (Some(ca_cert), Some(ca_key)) = (&cfg.local_ca_cert, &cfg.local_ca_key) else {
        anyhow::bail!(
            "LOCAL_XDS_PATH needs LOCAL_CA_CERT and LOCAL_CA_KEY (make a root with `ztunnel create-root --out-dir DIR`)"
        );
    };
    let node = Some(cfg.node_name.clone()).filter(|n| !n.is_empty());
    let (state, warnings) = state::watch::load(&path, node.as_deref())?;
    for w in warnings {
        tracing::warn!(path = %path.display(), "{w}");
    }
    let store = Store::new(state);
    tokio::spawn(state::watch::watch(
        path,
        node,
        store.clone(),
        cfg.local_xds_poll,
    ));
    let ca = identity::ca::LocalCa::from_files(ca_cert, ca_key)?;
    let certs = CertManager::new(Arc::new(ca), cfg.workload_cert_ttl, tls::provider());
    Ok(Some(Arc::new(MeshConfig {
        store,
        certs,
        hbone: HboneConfig {
            idle_timeout: cfg.pool_unused_release_timeout,
            max_streams_per_connection: cfg.pool_max_streams_per_connection.into(),
            stream_window: cfg.http2_stream_window_size,
            connection_window: cfg.http2_connection_window_size,
            max_frame_size: cfg.http2_frame_size,
            handshake_timeout: cfg.hbone_handshake_timeout,
            max_handshakes: cfg.hbone_max_handshakes as usize,
            response_timeout: cfg.connect_timeout,
            ..HboneConfig::default()
        },
    })))
}

/// Writes a new root into `dir`: ca.crt (0644) and ca.key (0600).
pub fn create_root(
    trust_domain: &str,
    validity: std::time::Duration,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (cert, key) = identity::ca::LocalCa::generate_root(trust_domain, validity)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.crt"), cert)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("ca.key"))?;
    f.write_all(key.as_bytes())?;
    Ok(())
}

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
        ipv6: cfg.ipv6_enabled,
        keepalive: cfg.keepalive_enabled.then_some(Keepalive {
            time: cfg.keepalive_time,
            interval: cfg.keepalive_interval,
            retries: cfg.keepalive_retries,
            user_timeout: cfg.user_timeout_enabled,
        }),
        mesh: mesh_config(&cfg)?,
    });
    let state = StateManager::new(Arc::new(InpodProxyFactory { cfg: proxy_cfg }));
    let limits = http::Limits {
        header_read_timeout: cfg.http_header_read_timeout,
        max_connections: cfg.http_max_connections as usize,
        ..http::Limits::default()
    };
    let readiness = http::bind("readiness", cfg.readiness_addr).await?;
    tokio::spawn(readiness::serve(readiness, limits, state.ready()));
    let zds = WorkloadProxyManager::new(cfg.inpod_uds.clone(), state.clone(), cfg.zds_timeout);
    tokio::select! {
        _ = zds.run() => {}
        _ = shutdown => {}
    }
    state.shutdown().await;
    Ok(())
}
