//! Mutual TLS between ztunnels: TLS 1.3 only, AES-GCM suites, ALPN `h2`, certificates
//! chained to the mesh root, and SPIFFE identities checked in place of host names.
//!
//! - A client checks that the server's certificate chains to the root and that its URI
//!   SAN is exactly the destination workload's identity (no host name or SNI checks).
//! - A server requires a client certificate chained to the root, in its own trust
//!   domain, and exposes the client's identity for policy and logs.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::identity::manager::IdentityCert;
use crate::identity::Identity;

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// ring, restricted to the TLS 1.3 AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// The identity in a certificate: its one URI SAN, which must be a SPIFFE ID.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("certificate has no subjectAltName")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or("certificate has no URI SAN")?;
    if uris.next().is_some() {
        return Err("certificate has more than one URI SAN".into());
    }
    uri.parse::<Identity>().map_err(|e| e.to_string())
}

/// The identity the peer of a finished handshake proved.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    identity_of(conn.peer_certificates()?.first()?).ok()
}

/// Presents the identity's current certificate (renewals show up at the next handshake).
#[derive(Debug)]
struct CurrentCert(Arc<IdentityCert>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The server config of a local workload: requires client certificates chained to
/// `roots` (normally `cert.roots()`) and in the same trust domain.
pub fn server_config(
    cert: Arc<IdentityCert>,
    roots: Arc<RootCertStore>,
) -> Result<ServerConfig, Error> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| Error::General(format!("client verifier: {e}")))?;
    let verifier = Arc::new(SameTrustDomain {
        inner: webpki,
        trust_domain: cert.identity.trust_domain.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The client config for connecting as `cert`'s identity to a server that must prove
/// `expected` with a certificate chained to `roots` (normally `cert.roots()`).
pub fn client_config(
    cert: Arc<IdentityCert>,
    roots: Arc<RootCertStore>,
    expected: Identity,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier = Arc::new(ExpectedIdentity {
        roots,
        expected,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentCert(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The server name rustls needs for a connection; never checked against the
/// certificate (the SPIFFE identity is).
pub fn server_name(addr: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

/// Chain to the root, then the URI SAN must be exactly the expected identity.
#[derive(Debug)]
struct ExpectedIdentity {
    roots: Arc<RootCertStore>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectedIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let got = identity_of(end_entity).map_err(Error::General)?;
        if got != self.expected {
            return Err(Error::General(format!(
                "server identity {got} is not the expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// WebPKI client verification, then the client's identity must be in our trust domain.
#[derive(Debug)]
struct SameTrustDomain {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SameTrustDomain {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_of(end_entity).map_err(Error::General)?;
        if id.trust_domain != self.trust_domain {
            return Err(Error::General(format!(
                "client identity {id} is outside trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::LocalCa;
    use crate::identity::manager::CertManager;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn manager(trust_domain: &str, ttl: Duration) -> Arc<CertManager> {
        let (cert, key) = LocalCa::generate_root(trust_domain, Duration::from_secs(3600)).unwrap();
        CertManager::new(
            Arc::new(LocalCa::from_pem(&cert, &key).unwrap()),
            ttl,
            provider(),
        )
    }

    fn id(td: &str, sa: &str) -> Identity {
        Identity::new(td, "default", sa)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Handshakes `client` (as `client_id`, expecting `expect`) with `server` (as
    /// `server_id`) over an in-memory pipe. Returns the identity the server saw, or the
    /// first side's error.
    async fn handshake(
        client: &Arc<CertManager>,
        client_id: Identity,
        expect: Identity,
        server: &Arc<CertManager>,
        server_id: Identity,
    ) -> Result<Identity, String> {
        let ccert = client.get(&client_id).await.unwrap();
        let ccfg = client_config(ccert.clone(), ccert.roots(), expect).unwrap();
        let scert = server.get(&server_id).await.unwrap();
        let scfg = server_config(scert.clone(), scert.roots()).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(ccfg));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(scfg));
        let name = server_name([10, 0, 0, 1].into());
        let (c, s) = tokio::join!(connector.connect(name, a), acceptor.accept(b));
        // The client verifies first (the server's certificate comes first): its error is
        // the cause, the server's is the alert it received.
        let mut c = c.map_err(|e| format!("client: {e}"))?;
        let mut s = s.map_err(|e| format!("server: {e}"))?;
        assert_eq!(c.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            c.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        Ok(peer_identity(s.get_ref().1).expect("client identity"))
    }

    #[tokio::test]
    async fn mutual_tls_proves_both_identities() {
        let m = manager("cluster.local", HOUR);
        let seen = handshake(
            &m,
            id("cluster.local", "sleep"),
            id("cluster.local", "httpbin"),
            &m,
            id("cluster.local", "httpbin"),
        )
        .await;
        assert_eq!(seen, Ok(id("cluster.local", "sleep")));
    }

    #[tokio::test]
    async fn a_server_with_the_wrong_identity_is_refused() {
        let m = manager("cluster.local", HOUR);
        let err = handshake(
            &m,
            id("cluster.local", "sleep"),
            id("cluster.local", "httpbin"),
            &m,
            id("cluster.local", "impostor"),
        )
        .await
        .unwrap_err();
        assert!(
            err.starts_with("client:") && err.contains("not the expected"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn certificates_from_another_root_are_refused_both_ways() {
        let mesh = manager("cluster.local", HOUR);
        let other = manager("cluster.local", HOUR);
        // A client whose certificate comes from another root.
        let client_id = id("cluster.local", "sleep");
        let mesh_cert = mesh.get(&id("cluster.local", "httpbin")).await.unwrap();
        let ccfg = client_config(
            other.get(&client_id).await.unwrap(),
            mesh_cert.roots(),
            id("cluster.local", "httpbin"),
        )
        .unwrap();
        let scfg = server_config(mesh_cert.clone(), mesh_cert.roots()).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (c, s) = tokio::join!(
            tokio_rustls::TlsConnector::from(Arc::new(ccfg))
                .connect(server_name([10, 0, 0, 1].into()), a),
            tokio_rustls::TlsAcceptor::from(Arc::new(scfg)).accept(b)
        );
        assert!(s.is_err(), "server accepted a client from another root");
        drop(c);
        // A server whose certificate comes from another root.
        let err = handshake(
            &mesh,
            client_id,
            id("cluster.local", "httpbin"),
            &other,
            id("cluster.local", "httpbin"),
        )
        .await
        .unwrap_err();
        assert!(err.starts_with("client: invalid peer certificate"), "{err}");
    }

    #[tokio::test]
    async fn a_client_from_another_trust_domain_is_refused() {
        let m = manager("cluster.local", HOUR);
        let err = handshake(
            &m,
            id("evil.example", "sleep"),
            id("cluster.local", "httpbin"),
            &m,
            id("cluster.local", "httpbin"),
        )
        .await
        .unwrap_err();
        assert!(err.contains("outside trust domain"), "{err}");
    }

    #[tokio::test]
    async fn renewal_changes_the_certificate_for_new_handshakes_only() {
        let m = manager("cluster.local", Duration::from_secs(2));
        let client_id = id("cluster.local", "sleep");
        let server_id = id("cluster.local", "httpbin");
        let client_cert = m.get(&client_id).await.unwrap();
        let ccfg = Arc::new(
            client_config(client_cert.clone(), client_cert.roots(), server_id.clone()).unwrap(),
        );
        let server_cert = m.get(&server_id).await.unwrap();
        let scfg = Arc::new(server_config(server_cert.clone(), server_cert.roots()).unwrap());
        let first = server_cert.current().cert[0].clone();

        let (a, b) = tokio::io::duplex(64 * 1024);
        let (c, s) = tokio::join!(
            tokio_rustls::TlsConnector::from(ccfg.clone())
                .connect(server_name([10, 0, 0, 1].into()), a),
            tokio_rustls::TlsAcceptor::from(scfg.clone()).accept(b)
        );
        let (mut c, mut s) = (c.unwrap(), s.unwrap());

        tokio::time::sleep(Duration::from_millis(1500)).await;
        let second = server_cert.current().cert[0].clone();
        assert_ne!(first, second, "not renewed at half-life");
        // The established connection carries on.
        c.write_all(b"still").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        // A new handshake sees the new certificate.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (c2, s2) = tokio::join!(
            tokio_rustls::TlsConnector::from(ccfg).connect(server_name([10, 0, 0, 1].into()), a),
            tokio_rustls::TlsAcceptor::from(scfg).accept(b)
        );
        drop(s2);
        let c2 = c2.unwrap();
        assert_eq!(c2.get_ref().1.peer_certificates().unwrap()[0], second);
    }
}
