//! ztunnel, the ambient node proxy, in in-pod mode: it receives each enrolled pod's
//! network namespace from the node agent and proxies the pod's traffic from listeners
//! created inside that namespace.

pub mod admin;
pub mod authz;
pub mod config;
pub mod controlplane;
pub mod http;
pub mod identity;
pub mod inpod;
pub mod memory;
pub mod metrics;
pub mod proto;
pub mod proxy;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod xds;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use admin::readiness::Readiness;
use config::{Config, MeshSource};
use controlplane::{ControlPlane, ControlPlaneConfig};
use identity::manager::CertManager;
use identity::source::CertSource;
use inpod::statemanager::StateManager;
use inpod::workloadmanager::WorkloadProxyManager;
use proxy::factory::PodProxyFactory;
use proxy::pool::HboneConfig;
use proxy::socket::Keepalive;
use proxy::{MeshConfig, ProxyConfig};
use state::{Protocol, Sources, Store};
use tokio::sync::watch;
use xds::{NodeIdentity, XdsClient, XdsStatus};

/// How long a connection waits for a pod's workload or certificate (Istio: 5 s).
const POD_WAIT: Duration = Duration::from_secs(5);

/// The running mesh side.
struct Mesh {
    config: Arc<MeshConfig>,
    xds: Option<Arc<XdsStatus>>,
    /// True once the mesh state is complete enough to take pods.
    ready: watch::Receiver<bool>,
}

/// Where certificates come from: the local CA when `LOCAL_CA_CERT`/`LOCAL_CA_KEY` are
/// set, istiod's CA otherwise.
fn cert_source(cfg: &Config) -> anyhow::Result<Arc<dyn CertSource>> {
    match (&cfg.local_ca_cert, &cfg.local_ca_key) {
        (Some(cert), Some(key)) => Ok(Arc::new(identity::ca::LocalCa::from_files(cert, key)?)),
        (None, None) => {
            if cfg.xds().is_none() && cfg.ca_address.is_none() {
                anyhow::bail!(
                    "no source of certificates: xDS is off and neither LOCAL_CA_CERT/LOCAL_CA_KEY (a local root: `ztunnel create-root --out-dir DIR`) nor CA_ADDRESS is set"
                );
            }
            let address = cfg.ca().unwrap_or_default();
            let cp = ControlPlane::new(ControlPlaneConfig {
                address,
                root: cfg.ca_root_ca.clone(),
                alt_hostname: cfg.alt_ca_hostname.clone(),
                token: cfg.auth_token.clone(),
                cluster_id: cfg.cluster_id.clone(),
                headers: config::headers("CA_HEADER_"),
            })?;
            Ok(Arc::new(controlplane::ca::CaClient::new(cp)))
        }
        _ => anyhow::bail!("LOCAL_CA_CERT and LOCAL_CA_KEY go together: set both or neither"),
    }
}

/// Keeps a certificate for every identity of this node's workloads in the mesh, from
/// the moment the workload appears (as Istio's ztunnel prefetches them).
async fn keep_certificates(store: Arc<Store>, certs: Arc<CertManager>) {
    let mut changes = store.subscribe();
    loop {
        let ids: BTreeSet<_> = store
            .get()
            .local_workloads()
            .filter(|w| w.protocol == Protocol::Hbone)
            .map(|w| w.identity())
            .collect();
        certs.keep(ids);
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// The mesh side: its state (xDS and/or the local file) and its certificates. `None`
/// only with `PASSTHROUGH_ONLY`; with no source at all, an error.
fn start_mesh(cfg: &Config, readiness: &Arc<Readiness>) -> anyhow::Result<Option<Mesh>> {
    let (xds, local) = match cfg.mesh_source().map_err(anyhow::Error::msg)? {
        MeshSource::Passthrough => {
            tracing::warn!("PASSTHROUGH_ONLY: no mesh; every pod's traffic is passed through in plaintext, without policy");
            return Ok(None);
        }
        MeshSource::Mesh { xds, local } => (xds, local),
    };
    let node = Some(cfg.node_name.clone()).filter(|n| !n.is_empty());
    let store = Store::new(state::MeshState::default());
    let sources = Sources::new(node, store.clone());
    if let Some(path) = local {
        let (objects, warnings) = state::watch::load(&path, &cfg.trust_domain)?;
        for w in warnings {
            tracing::warn!(path = %path.display(), "{w}");
        }
        sources.set_local(objects);
        tokio::spawn(state::watch::watch(
            path,
            cfg.trust_domain.clone(),
            sources.clone(),
            cfg.local_xds_poll,
        ));
    }
    let certs = CertManager::new(cert_source(cfg)?, cfg.secret_ttl(), tls::provider());
    let (ready_tx, ready) = watch::channel(false);
    let xds = match xds {
        None => {
            ready_tx.send_replace(true);
            None
        }
        Some(address) => {
            let cp = ControlPlane::new(ControlPlaneConfig {
                address,
                root: cfg.xds_root_ca.clone(),
                alt_hostname: cfg.alt_xds_hostname.clone(),
                token: cfg.auth_token.clone(),
                cluster_id: cfg.cluster_id.clone(),
                headers: config::headers("XDS_HEADER_"),
            })?;
            let node = NodeIdentity {
                instance_ip: cfg.instance_ip.clone(),
                pod_name: cfg.pod_name.clone(),
                pod_namespace: cfg.pod_namespace.clone(),
                cluster_domain: cfg.cluster_domain.clone(),
                node_name: cfg.node_name.clone(),
                cluster_id: cfg.cluster_id.clone(),
                meta: config::istio_meta(),
            };
            let (client, status) = XdsClient::new(cp, &node, sources.clone());
            let blocker = readiness.block("xDS: the first state of every type");
            let mut first = status.ready();
            tokio::spawn(async move {
                if first.wait_for(|r| *r).await.is_ok() {
                    blocker.release();
                    ready_tx.send_replace(true);
                }
            });
            tokio::spawn(client.run());
            Some(status)
        }
    };
    tokio::spawn(keep_certificates(store.clone(), certs.clone()));
    let config = Arc::new(MeshConfig {
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
        pod_wait: POD_WAIT,
    });
    Ok(Some(Mesh { config, xds, ready }))
}

/// Writes a new root into `dir`: ca.crt (0644) and ca.key (0600). An existing
/// `ca.crt` or `ca.key` is refused unless `overwrite`, and then removed first: the key
/// is always created anew with its mode, never written through a symlink or into a
/// file that keeps looser permissions.
pub fn create_root(
    trust_domain: &str,
    validity: std::time::Duration,
    dir: &std::path::Path,
    overwrite: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (cert, key) = identity::ca::LocalCa::generate_root(trust_domain, validity)?;
    std::fs::create_dir_all(dir)?;
    let files = [
        (dir.join("ca.crt"), cert, 0o644),
        (dir.join("ca.key"), key, 0o600),
    ];
    for (path, _, _) in &files {
        if std::fs::symlink_metadata(path).is_ok() {
            anyhow::ensure!(
                overwrite,
                "{} exists: a root is never replaced by accident (pass --overwrite to replace it)",
                path.display()
            );
            std::fs::remove_file(path)?;
        }
    }
    for (path, contents, mode) in files {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
    }
    Ok(())
}

/// Runs ztunnel until `shutdown` completes (or the admin endpoint's `/quitquitquit`
/// asks), then leaves the agent's stream and drains
/// every pod proxy (listeners close at once, connections get the drain grace period).
pub async fn run(
    cfg: Config,
    logs: Option<Arc<telemetry::LogLevels>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let quit = Arc::new(tokio::sync::Notify::new());
    let readiness = Readiness::new();
    let metrics = Arc::new(metrics::Metrics::new());
    let mesh = start_mesh(&cfg, &readiness)?;
    let connections = Arc::new(proxy::connections::ConnectionTable::default());
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
        mesh: mesh.as_ref().map(|m| m.config.clone()),
        metrics: metrics.clone(),
        connections: connections.clone(),
        max_connections_per_pod: cfg.pod_max_connections as usize,
    });
    let pods = StateManager::new(Arc::new(PodProxyFactory { cfg: proxy_cfg }))
        .with_metrics(metrics.inpod.clone());
    let synced = readiness.block("the agent's first snapshot");
    let mut first_snapshot = pods.synced();
    tokio::spawn(async move {
        if first_snapshot.wait_for(|s| *s).await.is_ok() {
            synced.release();
        }
    });
    let limits = http::Limits {
        header_read_timeout: cfg.http_header_read_timeout,
        max_connections: cfg.http_max_connections as usize,
        ..http::Limits::default()
    };
    let view = admin::NodeView {
        readiness: readiness.clone(),
        pods: pods.clone(),
        mesh: mesh.as_ref().map(|m| m.config.clone()),
        xds: mesh.as_ref().and_then(|m| m.xds.clone()),
        config_lines: Arc::new(cfg.startup_lines()),
        local_config: cfg.local_xds_path.clone(),
        logs,
        quit: quit.clone(),
        connections,
    };
    let listener = http::bind("readiness", cfg.readiness_addr).await?;
    tokio::spawn(admin::serve_readiness(listener, limits, view.clone()));
    let listener = http::bind("admin", cfg.admin_addr).await?;
    tokio::spawn(admin::serve_admin(listener, limits, view));
    let listener = http::bind("stats", cfg.stats_addr).await?;
    tokio::spawn(admin::serve_stats(listener, limits, metrics.clone()));
    let mut zds = WorkloadProxyManager::new(cfg.inpod_uds.clone(), pods.clone(), cfg.zds_timeout);
    if let Some(m) = &mesh {
        zds = zds.after(m.ready.clone());
    }
    tokio::select! {
        _ = zds.run() => {}
        _ = shutdown => {}
        _ = quit.notified() => {}
    }
    readiness.shutdown();
    pods.shutdown().await;
    Ok(())
}
