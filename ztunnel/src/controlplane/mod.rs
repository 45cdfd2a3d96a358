//! The connection to the control plane (istiod), shared by the xDS client and the CA
//! client: gRPC over TLS 1.3 with ALPN h2 and HTTP/2 keepalive, istiod's certificate
//! checked against the configured root and the address's host (or `ALT_*_HOSTNAME`),
//! and on every stream and call the service-account token (`authorization: Bearer`,
//! read from its file each time, so a rotated token is used), `clusterid`, and any
//! configured extra headers.
//!
//! - [`ca`]: the CA client, a certificate source.

pub mod ca;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("{0:?} is not an address like https://istiod.istio-system.svc:15012")]
    Address(String),
    #[error("reading the root certificate {path}: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("{0:?} is not a valid server name")]
    ServerName(String),
    #[error("header {0:?} cannot be sent over gRPC")]
    Header(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
}

/// Where and how to reach the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    /// `https://host:port`.
    pub address: String,
    /// PEM file of the roots the server's certificate must chain to.
    pub root: PathBuf,
    /// The name the server's certificate must carry, if not the address's host.
    pub alt_hostname: Option<String>,
    /// File holding the bearer token.
    pub token: PathBuf,
    pub cluster_id: String,
    /// Extra headers (`XDS_HEADER_*` or `CA_HEADER_*`).
    pub headers: Vec<(String, String)>,
}

/// A configured control plane: hands out channels and authenticated requests.
#[derive(Clone)]
pub struct ControlPlane {
    cfg: Arc<ControlPlaneConfig>,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
}

/// `https://host:port` (or `host:port`): the host (unbracketed) and port.
fn split_address(address: &str) -> Option<(String, u16)> {
    let rest = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address)
        .trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// Reads every certificate in a PEM file.
pub fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, ControlPlaneError> {
    let err = |reason: String| ControlPlaneError::Root {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(err("no certificate in it".into()));
    }
    Ok(certs)
}

impl ControlPlane {
    pub fn new(cfg: ControlPlaneConfig) -> Result<ControlPlane, ControlPlaneError> {
        let (host, port) = split_address(&cfg.address)
            .ok_or_else(|| ControlPlaneError::Address(cfg.address.clone()))?;
        let name = cfg.alt_hostname.clone().unwrap_or_else(|| host.clone());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| ControlPlaneError::ServerName(name))?;
        let mut headers = Vec::new();
        for (k, v) in &cfg.headers {
            let key = AsciiMetadataKey::from_bytes(k.as_bytes())
                .map_err(|_| ControlPlaneError::Header(k.clone()))?;
            let value = AsciiMetadataValue::try_from(v.as_str())
                .map_err(|_| ControlPlaneError::Header(k.clone()))?;
            headers.push((key, value));
        }
        Ok(ControlPlane {
            cfg: Arc::new(cfg),
            host,
            port,
            server_name,
            headers,
        })
    }

    pub fn address(&self) -> &str {
        &self.cfg.address
    }

    /// A gRPC channel that connects on first use (and reconnects after a failure).
    /// The roots are read at each connection, so a root that appears or rotates later
    /// is used without a restart.
    pub fn channel(&self) -> Channel {
        let uri = format!(
            "https://{}:{}",
            if self.host.contains(':') {
                format!("[{}]", self.host)
            } else {
                self.host.clone()
            },
            self.port
        );
        let endpoint = Endpoint::from_shared(uri.clone())
            .unwrap_or_else(|_| Endpoint::from_static("https://localhost:15012"))
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let this = self.clone();
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let this = this.clone();
            async move { this.connect().await }
        }))
    }

    async fn connect(
        &self,
    ) -> Result<TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, ControlPlaneError>
    {
        let addr = format!("{}:{}", self.host, self.port);
        let mut roots = RootCertStore::empty();
        for root in read_roots(&self.cfg.root)? {
            roots.add(root).map_err(|e| ControlPlaneError::Root {
                path: self.cfg.root.clone(),
                reason: e.to_string(),
            })?;
        }
        let mut tls = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ControlPlaneError::Tls {
                addr: addr.clone(),
                source: std::io::Error::other(e),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ControlPlaneError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ControlPlaneError::Tls { addr, source })?;
        Ok(TokioIo::new(stream))
    }

    /// `message` as a request carrying the token, `clusterid` and the extra headers.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        let md = req.metadata_mut();
        match std::fs::read_to_string(&self.cfg.token) {
            Ok(token) => match AsciiMetadataValue::try_from(format!("Bearer {}", token.trim())) {
                Ok(v) => {
                    md.insert("authorization", v);
                }
                Err(_) => {
                    warn!(path = %self.cfg.token.display(), "the token is not a valid header value; sent without it")
                }
            },
            Err(e) => {
                warn!(path = %self.cfg.token.display(), "reading the token: {e}; sent without it")
            }
        }
        if let Ok(v) = AsciiMetadataValue::try_from(self.cfg.cluster_id.as_str()) {
            md.insert("clusterid", v);
        }
        for (k, v) in &self.headers {
            md.insert(k.clone(), v.clone());
        }
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_into_host_and_port() {
        assert_eq!(
            split_address("https://istiod.istio-system.svc:15012"),
            Some(("istiod.istio-system.svc".into(), 15012))
        );
        assert_eq!(
            split_address("https://[fd00::1]:15012/"),
            Some(("fd00::1".into(), 15012))
        );
        assert_eq!(
            split_address("127.0.0.1:15012"),
            Some(("127.0.0.1".into(), 15012))
        );
        for bad in ["https://istiod", "https://:15012", "https://a:b", ""] {
            assert_eq!(split_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn requests_carry_the_current_token_cluster_id_and_headers() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok-1\n").unwrap();
        let cp = ControlPlane::new(ControlPlaneConfig {
            address: "https://istiod:15012".into(),
            root: dir.path().join("root.pem"),
            alt_hostname: None,
            token: token.clone(),
            cluster_id: "c1".into(),
            headers: vec![("x-extra".into(), "v".into())],
        })
        .unwrap();
        let req = cp.request(());
        let md = req.metadata();
        assert_eq!(md.get("authorization").unwrap(), "Bearer tok-1");
        assert_eq!(md.get("clusterid").unwrap(), "c1");
        assert_eq!(md.get("x-extra").unwrap(), "v");
        std::fs::write(&token, "tok-2").unwrap();
        assert_eq!(
            cp.request(()).metadata().get("authorization").unwrap(),
            "Bearer tok-2",
            "a rotated token is read again"
        );
    }
}
