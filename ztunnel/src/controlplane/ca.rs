//! Certificates from istiod's CA (`istio.v1.auth.IstioCertificateService/
//! CreateCertificate`), as Istio's ztunnel asks for them: a fresh ECDSA P-256 key per
//! certificate, a CSR with an empty subject and the SPIFFE id as its only URI SAN, the
//! requested lifetime, and (one ztunnel speaking for a node's pods) the identity it
//! asks on behalf of as `ImpersonatedIdentity` metadata. Nothing the CA returns is
//! used before it is checked: the leaf must chain, through the intermediates, to the
//! roots that came with it, and must be the identity asked for.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use prost_types::value::Kind;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::RootCertStore;
use tonic::transport::Channel;

use super::ControlPlane;
use crate::identity::source::{BoxError, BoxFuture, CertSource, WorkloadCert};
use crate::identity::Identity;
use crate::proto::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::istio::ca::IstioCertificateRequest;

pub struct CaClient {
    cp: ControlPlane,
    client: IstioCertificateServiceClient<Channel>,
}

impl CaClient {
    pub fn new(cp: ControlPlane) -> CaClient {
        let client = IstioCertificateServiceClient::new(cp.channel());
        CaClient { cp, client }
    }
}

/// A PEM certificate's DER.
fn one_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("{what} is not a PEM certificate: {e}"))
}

fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

/// Checks a CreateCertificate answer for `identity` and turns it into a certificate
/// with `key`: `chain` is `[leaf, intermediates…, roots]` (the last entry may hold
/// several roots).
pub fn accept_chain(
    identity: &Identity,
    key: PrivateKeyDer<'static>,
    chain: &[String],
) -> Result<WorkloadCert, String> {
    let (leaf, rest) = chain
        .split_first()
        .ok_or("the CA returned no certificate")?;
    let (roots_pem, intermediates) = rest
        .split_last()
        .ok_or("the CA returned no root with the certificate")?;
    let leaf = one_cert(leaf, "the leaf")?;
    let intermediates = intermediates
        .iter()
        .map(|p| one_cert(p, "an intermediate"))
        .collect::<Result<Vec<_>, _>>()?;
    let roots = CertificateDer::pem_slice_iter(roots_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the roots are not PEM certificates: {e}"))?;
    if roots.is_empty() {
        return Err("the CA returned no root with the certificate".into());
    }
    let mut store = RootCertStore::empty();
    for r in &roots {
        store
            .add(r.clone())
            .map_err(|e| format!("a root the CA returned is unusable: {e}"))?;
    }
    let parsed = ParsedCertificate::try_from(&leaf).map_err(|e| format!("the leaf: {e}"))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &store,
        &intermediates,
        UnixTime::now(),
        crate::tls::provider().signature_verification_algorithms.all,
    )
    .map_err(|e| format!("the certificate does not chain to the roots it came with: {e}"))?;
    let got = crate::tls::identity_of(&leaf)?;
    if got != *identity {
        return Err(format!(
            "the CA issued a certificate for {got}, not {identity}"
        ));
    }
    let (not_before, not_after) = validity(&leaf)?;
    let mut full = vec![leaf];
    full.extend(intermediates);
    Ok(WorkloadCert {
        identity: identity.clone(),
        chain: full,
        key,
        roots,
        issued: not_before,
        not_after,
    })
}

impl CertSource for CaClient {
    fn describe(&self) -> String {
        format!("the CA at {}", self.cp.address())
    }

    fn issue<'a>(
        &'a self,
        identity: &'a Identity,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<WorkloadCert, BoxError>> {
        Box::pin(async move {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
            let csr = params.serialize_request(&key)?.pem()?;
            let metadata = prost_types::Struct {
                fields: BTreeMap::from([(
                    "ImpersonatedIdentity".to_string(),
                    prost_types::Value {
                        kind: Some(Kind::StringValue(identity.to_string())),
                    },
                )]),
            };
            let request = IstioCertificateRequest {
                csr,
                validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                metadata: Some(metadata),
            };
            let response = self
                .client
                .clone()
                .create_certificate(self.cp.request(request))
                .await
                .map_err(|s| format!("CreateCertificate: {}: {}", s.code(), s.message()))?
                .into_inner();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            Ok(accept_chain(identity, key, &response.cert_chain)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::LocalCa;

    fn pem(der: &CertificateDer<'_>) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap_or_default())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn a_chain_is_used_only_if_it_chains_to_its_roots_and_is_the_identity_asked_for() {
        let (cert, key) =
            LocalCa::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let ca = LocalCa::from_pem(&cert, &key).unwrap();
        let id = Identity::new("cluster.local", "ns", "sa");
        let wc = ca.issue(&id, Duration::from_secs(600)).unwrap();
        let chain = vec![pem(&wc.chain[0]), cert.clone()];
        let ok = accept_chain(&id, wc.key.clone_key(), &chain).unwrap();
        assert_eq!(ok.roots.len(), 1);
        let life = ok.not_after.duration_since(ok.issued).unwrap();
        assert!(life >= Duration::from_secs(600), "{life:?}");

        let other = Identity::new("cluster.local", "ns", "other");
        let err = accept_chain(&other, wc.key.clone_key(), &chain).unwrap_err();
        assert!(
            err.contains("not spiffe://cluster.local/ns/ns/sa/other"),
            "{err}"
        );

        let (foreign, _) =
            LocalCa::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let err = accept_chain(&id, wc.key.clone_key(), &[pem(&wc.chain[0]), foreign]).unwrap_err();
        assert!(err.contains("does not chain"), "{err}");

        let err = accept_chain(&id, wc.key.clone_key(), &[pem(&wc.chain[0])]).unwrap_err();
        assert!(err.contains("no root"), "{err}");
        assert!(accept_chain(&id, wc.key.clone_key(), &[])
            .unwrap_err()
            .contains("no certificate"));
    }
}
