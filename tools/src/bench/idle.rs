//! What idle connections cost ztunnel: its RSS with no connection through it, then
//! with N HBONE connections open to a pod and idle (each a CONNECT stream into the
//! pod's 15008, proxied to the pod's app), at each step of `steps`.
//!
//! The client is the benchmark itself, an HBONE client with a mesh identity from the
//! node's CA, many streams per TLS connection as ztunnel's own pool opens them: so
//! ztunnel holds one socket per connection (to the app), not two, and 10,000
//! connections fit in one process's file-descriptor limit on this machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::procfs;
use e2e::app::echo_server;
use e2e::mesh_files::{identity_of, workload, NAMESPACE};
use e2e::{Mesh, TestNode};

/// The node's index (subnet); apart from the suite's and the other parts'.
const IDLE_NODE: u8 = 234;
const APP_PORT: u16 = 8080;
/// CONNECT streams per TLS connection (ztunnel's server allows 100).
const STREAMS_PER_CONNECTION: usize = 100;

pub struct IdleResult {
    /// ztunnel's RSS with no connection through it.
    pub base_rss: f64,
    /// (connections, RSS with that many open and idle).
    pub loaded: Vec<(usize, f64)>,
}

/// Opens HBONE connections in steps; ztunnel's RSS at each.
pub async fn run(steps: &[usize], progress: &dyn Fn(&str)) -> anyhow::Result<IdleResult> {
    use ztunnel::identity::{ca::LocalCa, manager::CertManager, Identity};
    let node = TestNode::new(IDLE_NODE);
    let (client, server) = (node.add_pod("idle-client"), node.add_pod("idle-server"));
    node.write_mesh_config(&format!("workloads:\n{}", workload(&server, "HBONE", "")));
    let mesh = Mesh::start_in_mesh(&node, &[&server], &[]).await;
    let _app = echo_server(&server, APP_PORT).await;
    let files = node.mesh_files();
    let ca = Arc::new(LocalCa::from_files(&files.ca_cert, &files.ca_key)?);
    let certs = CertManager::new(ca, Duration::from_secs(3600), ztunnel::tls::provider());
    let cert = certs
        .get(&Identity::new("cluster.local", NAMESPACE, "idle-client"))
        .await?;
    let server_id: Identity = identity_of(&server)
        .parse()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let target = SocketAddr::new(server.ip, APP_PORT);
    let hbone = SocketAddr::new(server.ip, 15008);
    let ztunnel = mesh.ztunnel.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_rss = procfs::rss_bytes(ztunnel)? as f64;
    let mut senders = Vec::new();
    let mut held = Vec::new();
    let mut loaded = Vec::new();
    for &step in steps {
        while held.len() < step {
            if held.len() % STREAMS_PER_CONNECTION == 0 {
                let tcp = e2e::app::connect(&client, hbone, Duration::from_secs(5)).await?;
                let cfg =
                    ztunnel::tls::client_config(cert.clone(), cert.roots(), server_id.clone())
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                    .connect(ztunnel::tls::server_name(server.ip), tcp)
                    .await
                    .context("TLS to ztunnel's 15008")?;
                let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(64 * 1024)
                    .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
                    .await
                    .context("HTTP/2 to ztunnel")?;
                tokio::spawn(conn);
                senders.push(sender);
            }
            let sender = senders.last_mut().context("a connection")?;
            sender.ready().await.context("HTTP/2 stream slot")?;
            let req = hyper::Request::builder()
                .method(hyper::Method::CONNECT)
                .uri(target.to_string())
                .body(Empty::<Bytes>::new())?;
            let resp = sender.send_request(req).await.context("CONNECT")?;
            anyhow::ensure!(
                resp.status() == hyper::StatusCode::OK,
                "CONNECT answered {}",
                resp.status()
            );
            held.push(hyper::upgrade::on(resp).await.context("the tunnel")?);
        }
        // Every proxied connection has reached the app and exchanged its greeting.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = procfs::rss_bytes(ztunnel)? as f64;
        progress(&format!(
            "idle connections: {step}, ztunnel RSS {:.1} MB (idle {:.1} MB)",
            rss / 1e6,
            base_rss / 1e6
        ));
        loaded.push((step, rss));
    }
    drop(held);
    drop(senders);
    Ok(IdleResult { base_rss, loaded })
}
