//! The cluster's certificates and kubeconfigs: one CA for every component (TLS between
//! etcd, the API server, the kubelets, the controller manager and the scheduler, each
//! side checking the other), the service-account signing key, and a kubeconfig per
//! client identity, laid out as kubeadm lays out `/etc/kubernetes/pki`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::{Error, Result};

/// What a certificate is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Usage {
    Server,
    Client,
    Both,
}

/// A certificate to issue: its subject, its names, and what it is for.
#[derive(Clone, Debug)]
pub struct CertSpec {
    /// The file stem under `pki/` (`apiserver` gives `apiserver.crt`, `apiserver.key`).
    pub name: String,
    pub common_name: String,
    /// Kubernetes reads the organisations as the user's groups.
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub usage: Usage,
}

impl CertSpec {
    /// A client certificate for the Kubernetes user `user` in `groups`.
    pub fn client(name: &str, user: &str, groups: &[&str]) -> CertSpec {
        CertSpec {
            name: name.into(),
            common_name: user.into(),
            organizations: groups.iter().map(|g| g.to_string()).collect(),
            dns_names: Vec::new(),
            ips: Vec::new(),
            usage: Usage::Client,
        }
    }

    /// A serving certificate for `dns_names` and `ips`.
    pub fn server(name: &str, dns_names: &[&str], ips: &[IpAddr], usage: Usage) -> CertSpec {
        CertSpec {
            name: name.into(),
            common_name: dns_names.first().copied().unwrap_or(name).into(),
            organizations: Vec::new(),
            dns_names: dns_names.iter().map(|d| d.to_string()).collect(),
            ips: ips.to_vec(),
            usage,
        }
    }
}

/// The CA, able to sign; its files are `pki/ca.crt` and `pki/ca.key`.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn tls(what: &str, e: rcgen::Error) -> Error {
    Error::Setup(format!("{what}: {e}"))
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).map_err(|e| Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, e))
}

impl Ca {
    /// A new CA in `dir` (created).
    pub fn create(dir: &Path) -> Result<Ca> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let key = KeyPair::generate().map_err(|e| tls("the CA's key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ambient-inpod cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| tls("the CA's certificate", e))?;
        write(&dir.join("ca.crt"), &cert.pem(), 0o644)?;
        write(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The certificate and key files of an issued `name`.
    pub fn files(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        )
    }

    /// Issues `spec` and writes `<name>.crt` and `<name>.key`.
    pub fn issue(&self, spec: &CertSpec) -> Result<Issued> {
        let what = format!("the certificate {}", spec.name);
        let key = KeyPair::generate().map_err(|e| tls(&what, e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        for o in &spec.organizations {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        params.distinguished_name = dn;
        for d in &spec.dns_names {
            let name = d.clone().try_into().map_err(|e| tls(&what, e))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match spec.usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| tls(&what, e))?;
        let (cert_file, key_file) = self.files(&spec.name);
        let issued = Issued {
            cert: cert_file,
            key: key_file,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        write(&issued.cert, &issued.cert_pem, 0o644)?;
        write(&issued.key, &issued.key_pem, 0o600)?;
        Ok(issued)
    }

    /// The service accounts' token signing key pair, `sa.key` and `sa.pub`.
    pub fn service_account_keys(&self) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate().map_err(|e| tls("the service-account key", e))?;
        let (private, public) = (self.dir.join("sa.key"), self.dir.join("sa.pub"));
        write(&private, &key.serialize_pem(), 0o600)?;
        write(&public, &key.public_key_pem(), 0o644)?;
        Ok((private, public))
    }
}

/// An issued certificate and key, as files and as PEM.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A kubeconfig for `server` that trusts `ca_pem` and authenticates with `client`.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, client: &Issued) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ambient
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: ambient
  context:
    cluster: ambient
    user: {user}
current-context: ambient
",
        ca = b64(ca_pem),
        cert = b64(&client.cert_pem),
        key = b64(&client.key_pem),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_carry_their_names_and_groups_and_chain_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(dir.path()).unwrap();
        let node = ca
            .issue(&CertSpec::client(
                "kubelet-client",
                "system:node:w1",
                &["system:nodes"],
            ))
            .unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(node.cert_pem.as_bytes()).unwrap();
        let cert = parsed.parse_x509().unwrap();
        let subject = cert.subject().to_string();
        assert!(subject.contains("CN=system:node:w1"), "{subject}");
        assert!(subject.contains("O=system:nodes"), "{subject}");
        let (_, ca_parsed) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        let ca_cert = ca_parsed.parse_x509().unwrap();
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());
        let server = ca
            .issue(&CertSpec::server(
                "apiserver",
                &["kubernetes.default.svc"],
                &["10.96.0.1".parse().unwrap()],
                Usage::Server,
            ))
            .unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(server.cert_pem.as_bytes()).unwrap();
        let text = format!(
            "{:?}",
            parsed.parse_x509().unwrap().subject_alternative_name()
        );
        assert!(
            text.contains("kubernetes.default.svc") && text.contains("[10, 96, 0, 1]"),
            "{text}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&server.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "a key is readable by others");
    }

    #[test]
    fn a_kubeconfig_names_the_server_and_embeds_the_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(dir.path()).unwrap();
        let admin = ca
            .issue(&CertSpec::client(
                "admin",
                "kubernetes-admin",
                &["system:masters"],
            ))
            .unwrap();
        let text = kubeconfig("https://172.30.0.1:6443", ca.cert_pem(), "admin", &admin);
        let doc: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            doc["clusters"][0]["cluster"]["server"],
            "https://172.30.0.1:6443"
        );
        assert_eq!(doc["current-context"], "ambient");
        assert!(doc["users"][0]["user"]["client-key-data"]
            .as_str()
            .is_some_and(|k| !k.is_empty()));
    }
}
