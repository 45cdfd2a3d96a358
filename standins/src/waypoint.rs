//! A stand-in waypoint: what an Istio waypoint (an Envoy that speaks HBONE itself and is
//! not captured by ztunnel) does at L4, in a pod's netns. It terminates HBONE on 15008
//! as its own identity (mutual TLS from the mesh root), records each CONNECT (the
//! target and the client's proven identity), and forwards the stream over HBONE, as
//! its own identity, to the upstream the test gives it (through that pod's ztunnel).
//!
//! The only stand-in for a waypoint in this project.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ztunnel::identity::ca::LocalCa;
use ztunnel::identity::manager::{CertManager, IdentityCert};
use ztunnel::identity::Identity;

use crate::MeshRoot;

/// One CONNECT the waypoint received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub authority: String,
    pub client: Option<Identity>,
}

pub struct Waypoint {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
    /// Every connection's task: stopping the waypoint ends them all, as a dying
    /// waypoint's connections end.
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    _certs: Arc<CertManager>,
}

/// Opens an HBONE stream from `netns` to `upstream_ztunnel` (an `ip:15008`), as `cert`,
/// requiring `expect`, asking for `target`.
async fn hbone_to(
    pod_netns: Arc<ztunnel::inpod::netns::InpodNetns>,
    cert: Arc<IdentityCert>,
    expect: Identity,
    upstream_ztunnel: SocketAddr,
    target: SocketAddr,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
    let tcp = pod_netns
        .run(move || {
            let s =
                std::net::TcpStream::connect_timeout(&upstream_ztunnel, Duration::from_secs(5))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .await
        .map_err(|e| format!("connect {upstream_ztunnel}: {e}"))?;
    let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
    let roots = cert.roots();
    let cfg = ztunnel::tls::client_config(cert, roots, expect).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ztunnel::tls::server_name(upstream_ztunnel.ip()), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!("upstream answered {}", resp.status()));
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(|e| e.to_string())?;
    Ok(TokioIo::new(upgraded))
}

impl Waypoint {
    /// Serves HBONE in the pod netns at `netns_path` as `identity` (certificate from
    /// the mesh `root`), forwarding every stream to `upstream` (an app `ip:port` behind
    /// a mesh pod, whose identity is `upstream_identity`).
    pub async fn start(
        root: &MeshRoot,
        netns_path: &std::path::Path,
        identity: Identity,
        upstream: SocketAddr,
        upstream_identity: Identity,
    ) -> Waypoint {
        let ca = LocalCa::from_files(&root.cert, &root.key).expect("mesh root");
        let certs = CertManager::new(
            Arc::new(ca),
            Duration::from_secs(3600),
            ztunnel::tls::provider(),
        );
        let cert = certs.get(&identity).await.expect("waypoint certificate");
        let server =
            ztunnel::tls::server_config(cert.clone(), cert.roots()).expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let netns = Arc::new(ztunnel::inpod::netns::InpodNetns::new(
            protocol::Netns::open(netns_path).expect("waypoint netns"),
        ));
        let listener = netns
            .run(|| {
                let l = std::net::TcpListener::bind("0.0.0.0:15008")?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .await
            .expect("bind 15008 in the waypoint pod");
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (recorded, tasks) = (seen.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen, cert, netns) = (
                    acceptor.clone(),
                    recorded.clone(),
                    cert.clone(),
                    netns.clone(),
                );
                let upstream_identity = upstream_identity.clone();
                let conn_tasks = tasks.clone();
                let handle = tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client = ztunnel::tls::peer_identity(tls.get_ref().1);
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (seen, cert, netns, client) =
                                (seen.clone(), cert.clone(), netns.clone(), client.clone());
                            let conn_tasks = conn_tasks.clone();
                            let upstream_identity = upstream_identity.clone();
                            async move {
                                let authority = req
                                    .uri()
                                    .authority()
                                    .map(|a| a.to_string())
                                    .unwrap_or_default();
                                seen.lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(Seen { authority, client });
                                let ztunnel_addr = SocketAddr::new(upstream.ip(), 15008);
                                let mut resp = Response::new(Empty::<Bytes>::new());
                                match hbone_to(
                                    netns,
                                    cert,
                                    upstream_identity,
                                    ztunnel_addr,
                                    upstream,
                                )
                                .await
                                {
                                    Ok(mut up) => {
                                        let relay = tokio::spawn(async move {
                                            if let Ok(down) = hyper::upgrade::on(req).await {
                                                let mut down = TokioIo::new(down);
                                                let _ = tokio::io::copy_bidirectional(
                                                    &mut down, &mut up,
                                                )
                                                .await;
                                            }
                                        });
                                        conn_tasks
                                            .lock()
                                            .unwrap_or_else(|p| p.into_inner())
                                            .push(relay);
                                    }
                                    Err(_) => *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE,
                                }
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
                tasks.lock().unwrap_or_else(|p| p.into_inner()).push(handle);
            }
        });
        Waypoint {
            seen,
            task,
            conns,
            _certs: certs,
        }
    }

    /// The CONNECTs received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The waypoint is gone: its port closes and its connections end.
    pub fn stop(&self) {
        self.task.abort();
        for t in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        self.stop();
    }
}
