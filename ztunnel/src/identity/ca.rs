//! The local CA: signs workload certificates with a root read from PEM files, so a mesh
//! runs without a control plane. Two ztunnels given the same root trust each other.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::source::{BoxError, BoxFuture, CertSource, WorkloadCert};
use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by other users (mode {mode:o}); a CA key must be mode 0600 or 0400"
    )]
    KeyPermissions { path: String, mode: u32 },
    #[error("the CA key: {0} (PKCS#8 PEM, RSA or ECDSA)")]
    Key(rcgen::Error),
    #[error("the CA certificate: {0}")]
    Cert(rcgen::Error),
    #[error("the CA certificate is not PEM: {0}")]
    Pem(String),
    #[error("signing a workload certificate: {0}")]
    Sign(rcgen::Error),
}

/// The mesh root: its certificate (what everyone trusts) and key (what signs).
pub struct LocalCa {
    root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Slack on `not_before` for clocks that differ a little between nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

impl LocalCa {
    /// Loads the root from `cert` and `key` PEM files. The key file must not be
    /// readable by group or others.
    pub fn from_files(cert: &Path, key: &Path) -> Result<LocalCa, CaError> {
        let meta = std::fs::metadata(key).map_err(|source| CaError::Read {
            path: key.display().to_string(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyPermissions {
                path: key.display().to_string(),
                mode,
            });
        }
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<LocalCa, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        let root = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| CaError::Pem(e.to_string()))?
            .1
            .contents;
        let root = CertificateDer::from(root);
        let issuer = Issuer::from_ca_cert_der(&root, key).map_err(CaError::Cert)?;
        Ok(LocalCa { root, issuer })
    }

    /// A new ECDSA P-256 root for `trust_domain`, as (certificate PEM, key PEM).
    pub fn generate_root(
        trust_domain: &str,
        validity: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Key)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "ztunnel local root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + validity).into();
        let cert = params.self_signed(&key).map_err(CaError::Cert)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The root certificate, for trust stores.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Signs a new ECDSA P-256 certificate for `identity`, valid for `ttl`, usable by
    /// both TLS clients and servers, with the identity as its only (URI) SAN.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        let uri = identity.to_string();
        params.subject_alt_names =
            vec![SanType::URI(uri.clone().try_into().map_err(CaError::Sign)?)];
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issued = SystemTime::now();
        let not_after = issued + ttl;
        params.not_before = (issued - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots: vec![self.root.clone()],
            issued,
            not_after,
        })
    }
}

impl CertSource for LocalCa {
    fn describe(&self) -> String {
        "the local CA".into()
    }

    fn issue<'a>(
        &'a self,
        identity: &'a Identity,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<WorkloadCert, BoxError>> {
        // Signing is a few hundred microseconds of CPU: done inline.
        let issued = LocalCa::issue(self, identity, ttl).map_err(BoxError::from);
        Box::pin(std::future::ready(issued))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri_sans(der: &CertificateDer<'_>) -> Vec<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn issues_certificates_with_the_identity_as_uri_san() {
        let (cert, key) =
            LocalCa::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let ca = LocalCa::from_pem(&cert, &key).unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let wc = ca.issue(&id, Duration::from_secs(600)).unwrap();
        assert_eq!(
            uri_sans(&wc.chain[0]),
            ["spiffe://cluster.local/ns/default/sa/sleep"]
        );
        let half = wc.renew_at(wc.issued).duration_since(wc.issued).unwrap();
        assert_eq!(half, Duration::from_secs(300), "renewal at half-life");
    }

    #[test]
    fn an_rsa_root_signs_too() {
        let ca = LocalCa::from_pem(
            include_str!("../../testdata/rsa-root.crt"),
            include_str!("../../testdata/rsa-root.key"),
        )
        .unwrap();
        let wc = ca.issue(
            &Identity::new("cluster.local", "a", "b"),
            Duration::from_secs(60),
        );
        assert!(wc.is_ok());
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) =
            LocalCa::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let (cert_path, key_path) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = LocalCa::from_files(&cert_path, &key_path).err().unwrap();
        assert!(err.to_string().contains("mode 644"), "{err}");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(LocalCa::from_files(&cert_path, &key_path).is_ok());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(matches!(
            LocalCa::from_pem("nope", "nope"),
            Err(CaError::Key(_))
        ));
        let (_, key) = LocalCa::generate_root("td", Duration::from_secs(60)).unwrap();
        assert!(matches!(
            LocalCa::from_pem("nope", &key),
            Err(CaError::Pem(_))
        ));
    }
}
