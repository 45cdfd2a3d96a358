//! A control-plane test server: the part of istiod a ztunnel talks to, served from the
//! same protos over gRPC and TLS, so a real ztunnel process uses it exactly as it
//! would use istiod. It serves delta ADS (workloads, services and authorization
//! policies, pushed by the test) and the CA (`CreateCertificate`, signing with the
//! node's mesh root), requires the bearer token it hands out, and records every
//! request it receives. It can be stopped and started again on the same port.
//!
//! The only stand-in for istiod in this project; istiod itself does not run here.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prost::Message;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use ztunnel::proto::envoy::service::discovery::v3 as ads;
use ztunnel::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ztunnel::proto::istio::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ztunnel::proto::istio::ca::{IstioCertificateRequest, IstioCertificateResponse};
use ztunnel::proto::istio::security as xsec;
use ztunnel::proto::istio::workload as xwl;

use crate::MeshRoot;

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// One request ztunnel sent on an ADS stream.
#[derive(Clone, Debug, Default)]
pub struct AdsRequest {
    pub type_url: String,
    /// Empty on a stream's first request of a type.
    pub response_nonce: String,
    /// A NACK's message.
    pub error: Option<String>,
    pub initial_resource_versions: BTreeMap<String, String>,
    pub node_id: Option<String>,
    pub node_metadata: BTreeMap<String, String>,
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
}

/// One `CreateCertificate` call.
#[derive(Clone, Debug)]
pub struct CsrRequest {
    pub impersonated_identity: Option<String>,
    pub validity_seconds: i64,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Resources {
    by_type: BTreeMap<&'static str, BTreeMap<String, (String, prost_types::Any)>>,
    version: u64,
}

#[derive(Default)]
struct Inner {
    resources: Resources,
    streams: Vec<mpsc::Sender<Result<ads::DeltaDiscoveryResponse, Status>>>,
    nonce: u64,
    requests: Vec<AdsRequest>,
    csrs: Vec<CsrRequest>,
    ca_down: bool,
    cert_ttl: Option<Duration>,
    token: String,
    streams_opened: u64,
}

struct Shared {
    inner: Mutex<Inner>,
    /// The mesh root that signs workload certificates and the serving certificate.
    root_pem: String,
    root_key_pem: String,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn issuer(&self) -> Issuer<'static, KeyPair> {
        let key = KeyPair::from_pem(&self.root_key_pem).expect("root key");
        Issuer::from_ca_cert_pem(&self.root_pem, key).expect("root")
    }

    fn check_token<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let want = format!("Bearer {}", self.lock().token);
        match req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some(got) if got == want => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated("no token")),
        }
    }
}

fn header<T>(req: &Request<T>, name: &str) -> Option<String> {
    req.metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn strings(s: &Option<prost_types::Struct>) -> BTreeMap<String, String> {
    s.as_ref()
        .map(|s| {
            s.fields
                .iter()
                .filter_map(|(k, v)| match &v.kind {
                    Some(prost_types::value::Kind::StringValue(x)) => Some((k.clone(), x.clone())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

struct Ads(Arc<Shared>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream =
        ReceiverStream<Result<ads::DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<ads::DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (authorization, cluster_id) =
            (header(&req, "authorization"), header(&req, "clusterid"));
        self.0.check_token(&req)?;
        let (tx, rx) = mpsc::channel(256);
        {
            let mut inner = self.0.lock();
            inner.streams.push(tx.clone());
            inner.streams_opened += 1;
        }
        let shared = self.0.clone();
        let mut incoming = req.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(r)) = incoming.message().await {
                let recorded = AdsRequest {
                    type_url: r.type_url.clone(),
                    response_nonce: r.response_nonce.clone(),
                    error: r.error_detail.as_ref().map(|e| e.message.clone()),
                    initial_resource_versions: r.initial_resource_versions.clone(),
                    node_id: r.node.as_ref().map(|n| n.id.clone()),
                    node_metadata: strings(&r.node.as_ref().and_then(|n| n.metadata.clone())),
                    authorization: authorization.clone(),
                    cluster_id: cluster_id.clone(),
                };
                let first = r.response_nonce.is_empty();
                let answer = {
                    let mut inner = shared.lock();
                    inner.requests.push(recorded);
                    if first {
                        Some(initial_response(&mut inner, &r))
                    } else {
                        None
                    }
                };
                if let Some(answer) = answer {
                    if tx.send(Ok(answer)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn next_nonce(inner: &mut Inner) -> String {
    inner.nonce += 1;
    format!("nonce-{}", inner.nonce)
}

/// The answer to a stream's first request of a type: what the client lacks (resources
/// it does not hold at their current version), and what it holds that is gone.
fn initial_response(
    inner: &mut Inner,
    r: &ads::DeltaDiscoveryRequest,
) -> ads::DeltaDiscoveryResponse {
    let held = inner
        .resources
        .by_type
        .get(r.type_url.as_str())
        .cloned()
        .unwrap_or_default();
    let resources = held
        .iter()
        .filter(|(name, (version, _))| r.initial_resource_versions.get(*name) != Some(version))
        .map(|(name, (version, any))| ads::Resource {
            name: name.clone(),
            version: version.clone(),
            resource: Some(any.clone()),
            ..Default::default()
        })
        .collect();
    let removed = r
        .initial_resource_versions
        .keys()
        .filter(|name| !held.contains_key(*name))
        .cloned()
        .collect();
    ads::DeltaDiscoveryResponse {
        type_url: r.type_url.clone(),
        nonce: next_nonce(inner),
        resources,
        removed_resources: removed,
        ..Default::default()
    }
}

struct Ca(Arc<Shared>);

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let authorization = header(&req, "authorization");
        self.0.check_token(&req)?;
        let r = req.into_inner();
        let ttl = {
            let mut inner = self.0.lock();
            inner.csrs.push(CsrRequest {
                impersonated_identity: strings(&r.metadata).get("ImpersonatedIdentity").cloned(),
                validity_seconds: r.validity_duration,
                authorization,
            });
            if inner.ca_down {
                return Err(Status::unavailable("the test CA is down"));
            }
            inner
                .cert_ttl
                .unwrap_or(Duration::from_secs(r.validity_duration.max(1) as u64))
        };
        let mut csr = CertificateSigningRequestParams::from_pem(&r.csr)
            .map_err(|e| Status::invalid_argument(format!("CSR: {e}")))?;
        let now = std::time::SystemTime::now();
        csr.params.not_before = (now - Duration::from_secs(5)).into();
        csr.params.not_after = (now + ttl).into();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = csr
            .signed_by(&self.0.issuer())
            .map_err(|e| Status::internal(format!("signing: {e}")))?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![cert.pem(), self.0.root_pem.clone()],
        }))
    }
}

/// A TLS connection, as tonic's server wants its transport.
struct Tls(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Tls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The running server.
pub struct ControlPlane {
    pub addr: SocketAddr,
    /// PEM of the root (for `XDS_ROOT_CA`, `CA_ROOT_CA`).
    pub root_file: PathBuf,
    /// The bearer token (for `AUTH_TOKEN`).
    pub token_file: PathBuf,
    shared: Arc<Shared>,
    tls: Arc<rustls::ServerConfig>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    accept: Option<tokio::task::JoinHandle<()>>,
    /// The accepted connections' sockets, to cut them all when stopping (as istiod's
    /// death would).
    sockets: Arc<Mutex<Vec<std::os::fd::OwnedFd>>>,
}

/// The serving certificate: istiod's names and the loopback address, from the root.
fn serving_config(shared: &Shared) -> rustls::ServerConfig {
    let key = KeyPair::generate().expect("serving key");
    let mut params =
        CertificateParams::new(vec!["istiod.istio-system.svc".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
    let cert = params
        .signed_by(&key, &shared.issuer())
        .expect("serving certificate");
    let mut cfg = rustls::ServerConfig::builder_with_provider(ztunnel::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("serving config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

impl ControlPlane {
    /// Starts serving on a free loopback port, signing with the mesh `root`; its
    /// files (the root ztunnel trusts, the token) go into `dir`/controlplane.
    pub async fn start(root: &MeshRoot, dir: &std::path::Path) -> ControlPlane {
        let root_pem = std::fs::read_to_string(&root.cert).expect("mesh root");
        let root_key_pem = std::fs::read_to_string(&root.key).expect("mesh root key");
        let dir = dir.join("controlplane");
        std::fs::create_dir_all(&dir).expect("control plane dir");
        let root_file = dir.join("root-cert.pem");
        std::fs::write(&root_file, &root_pem).expect("root file");
        let token_file = dir.join("istio-token");
        std::fs::write(&token_file, "token-1\n").expect("token file");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                token: "token-1".into(),
                ..Inner::default()
            }),
            root_pem,
            root_key_pem,
        });
        let tls = Arc::new(serving_config(&shared));
        let mut cp = ControlPlane {
            addr: "127.0.0.1:0".parse().expect("addr"),
            root_file,
            token_file,
            shared,
            tls,
            stop: None,
            task: None,
            accept: None,
            sockets: Arc::default(),
        };
        cp.serve().await;
        cp
    }

    async fn serve(&mut self) {
        let mut listener = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while listener.is_none() {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => listener = Some(l),
                // The old listener's port may take a moment to come free.
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("control plane bind {}: {e}", self.addr),
            }
        }
        let listener = listener.expect("listener");
        self.addr = listener.local_addr().expect("addr");
        let (conns_tx, conns_rx) = mpsc::channel::<std::io::Result<Tls>>(16);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let sockets = self.sockets.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                use std::os::fd::AsFd;
                if let Ok(fd) = stream.as_fd().try_clone_to_owned() {
                    sockets.lock().unwrap_or_else(|p| p.into_inner()).push(fd);
                }
                let (acceptor, conns) = (acceptor.clone(), conns_tx.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = conns.send(Ok(Tls(tls))).await;
                    }
                });
            }
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = self.shared.clone();
        let server = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(Ads(shared.clone())))
            .add_service(IstioCertificateServiceServer::new(Ca(shared)))
            .serve_with_incoming_shutdown(ReceiverStream::new(conns_rx), async {
                let _ = stop_rx.await;
            });
        self.task = Some(tokio::spawn(async move {
            let _ = server.await;
        }));
        self.accept = Some(accept);
        self.stop = Some(stop_tx);
    }

    /// Stops serving: every connection is cut, the port is closed.
    pub async fn stop(&mut self) {
        self.shared.lock().streams.clear();
        for fd in self
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            use std::os::fd::AsRawFd;
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for task in [self.accept.take(), self.task.take()].into_iter().flatten() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Serves again on the same port (after [`ControlPlane::stop`]), with the same
    /// resources.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.serve().await;
    }

    /// The environment that points a ztunnel at this control plane (xDS and CA).
    pub fn env(&self) -> Vec<(String, String)> {
        let path = |p: &PathBuf| p.display().to_string();
        vec![
            ("XDS_ADDRESS".into(), format!("https://{}", self.addr)),
            ("CA_ADDRESS".into(), format!("https://{}", self.addr)),
            ("XDS_ROOT_CA".into(), path(&self.root_file)),
            ("CA_ROOT_CA".into(), path(&self.root_file)),
            ("AUTH_TOKEN".into(), path(&self.token_file)),
            ("CLUSTER_ID".into(), "test-cluster".into()),
            ("POD_NAME".into(), "ztunnel-test".into()),
            ("POD_NAMESPACE".into(), "istio-system".into()),
            ("INSTANCE_IP".into(), "10.0.0.250".into()),
        ]
    }

    /// Pushes `resources` of `type_url` (name, message) to every connected ztunnel, in
    /// one response, and keeps them for later streams.
    fn push(
        &self,
        type_url: &'static str,
        resources: Vec<(String, prost_types::Any)>,
        removed: Vec<String>,
    ) {
        let mut inner = self.shared.lock();
        inner.resources.version += 1;
        let version = format!("v{}", inner.resources.version);
        let held = inner.resources.by_type.entry(type_url).or_default();
        for (name, any) in &resources {
            held.insert(name.clone(), (version.clone(), any.clone()));
        }
        for name in &removed {
            held.remove(name);
        }
        let response = ads::DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: next_nonce(&mut inner),
            resources: resources
                .into_iter()
                .map(|(name, any)| ads::Resource {
                    name,
                    version: version.clone(),
                    resource: Some(any),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed,
            ..Default::default()
        };
        inner
            .streams
            .retain(|s| s.try_send(Ok(response.clone())).is_ok());
    }

    pub fn push_workloads(&self, workloads: &[xwl::Workload]) {
        let resources = workloads
            .iter()
            .map(|w| {
                (
                    w.uid.clone(),
                    address_any(xwl::address::Type::Workload(w.clone())),
                )
            })
            .collect();
        self.push(ADDRESS_TYPE, resources, vec![]);
    }

    pub fn push_services(&self, services: &[xwl::Service]) {
        let resources = services
            .iter()
            .map(|s| {
                (
                    format!("{}/{}", s.namespace, s.hostname),
                    address_any(xwl::address::Type::Service(s.clone())),
                )
            })
            .collect();
        self.push(ADDRESS_TYPE, resources, vec![]);
    }

    pub fn push_policies(&self, policies: &[xsec::Authorization]) {
        let resources = policies
            .iter()
            .map(|p| {
                (
                    format!("{}/{}", p.namespace, p.name),
                    prost_types::Any {
                        type_url: AUTHORIZATION_TYPE.into(),
                        value: p.encode_to_vec(),
                    },
                )
            })
            .collect();
        self.push(AUTHORIZATION_TYPE, resources, vec![]);
    }

    /// Pushes raw resources (valid or not) of `type_url`.
    pub fn push_raw(&self, type_url: &'static str, resources: Vec<(String, prost_types::Any)>) {
        self.push(type_url, resources, vec![]);
    }

    pub fn remove(&self, type_url: &'static str, names: &[&str]) {
        self.push(
            type_url,
            vec![],
            names.iter().map(|n| n.to_string()).collect(),
        );
    }

    /// Every ADS request received so far.
    pub fn requests(&self) -> Vec<AdsRequest> {
        self.shared.lock().requests.clone()
    }

    pub fn csrs(&self) -> Vec<CsrRequest> {
        self.shared.lock().csrs.clone()
    }

    pub fn streams_opened(&self) -> u64 {
        self.shared.lock().streams_opened
    }

    /// While down, `CreateCertificate` fails with UNAVAILABLE.
    pub fn set_ca_down(&self, down: bool) {
        self.shared.lock().ca_down = down;
    }

    /// Certificates live this long, whatever ztunnel asks for.
    pub fn set_cert_ttl(&self, ttl: Duration) {
        self.shared.lock().cert_ttl = Some(ttl);
    }

    /// Waits until a received ADS request satisfies `pred`; returns it.
    pub async fn wait_for_request(
        &self,
        what: &str,
        pred: impl Fn(&AdsRequest) -> bool,
    ) -> AdsRequest {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no ADS request {what}; got {:#?}",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for task in [self.accept.take(), self.task.take()].into_iter().flatten() {
            task.abort();
        }
    }
}

fn address_any(t: xwl::address::Type) -> prost_types::Any {
    prost_types::Any {
        type_url: ADDRESS_TYPE.into(),
        value: xwl::Address { r#type: Some(t) }.encode_to_vec(),
    }
}

/// A pod as istiod describes a pod in the mesh (HBONE, all its addresses `ips`, on
/// `node`), its service account named after it.
pub fn workload_of(name: &str, ips: &[IpAddr], node: &str, namespace: &str) -> xwl::Workload {
    xwl::Workload {
        uid: format!("Kubernetes//Pod/{namespace}/{name}"),
        name: name.into(),
        namespace: namespace.into(),
        service_account: name.into(),
        addresses: ips.iter().map(|ip| ip_bytes(*ip)).collect(),
        node: node.into(),
        tunnel_protocol: xwl::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

/// An address as the protos carry it.
pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
