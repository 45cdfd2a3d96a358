//! The kubeconfig the CNI plugin uses to ask the API server about a pod.
//!
//! The container runtime executes the plugin on the host, where none of the agent
//! container's paths exist (its service-account token and CA live in the container's
//! mounts). So the file is self-contained: the server, the CA and the credentials are
//! embedded. It is built from the agent's own credentials — the in-cluster service
//! account, or the agent's `KUBECONFIG` — and rewritten whenever those files change
//! (the service-account token rotates). It is written atomically, mode 0600, and a
//! symlink at its path is replaced, never followed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

/// The plugin's kubeconfig in the CNI conf dir: Istio's name (sorted after every
/// network config, and not one itself), so a migration from Istio's agent overwrites
/// its file instead of leaving it behind.
pub const FILE_NAME: &str = "ZZZ-istio-cni-kubeconfig";
/// The name earlier releases of this agent gave it: removed when the agent installs.
pub const EARLIER_FILE_NAME: &str = "istio-cni-kubeconfig";

/// Where a pod's service account is mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not set: is the agent running in a pod? (or set KUBECONFIG)")]
    MissingEnv(&'static str),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KubeconfigError + '_ {
    move |source| KubeconfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the agent's credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// The pod's service account, as an in-cluster client uses it.
    InCluster {
        /// `<protocol>://<host>:<port>` from `KUBERNETES_SERVICE_*`.
        server: String,
        /// `KUBE_CA_FILE`, default `<sa dir>/ca.crt`; `None` with `SKIP_TLS_VERIFY`.
        ca_file: Option<PathBuf>,
        token_file: PathBuf,
    },
    /// The agent's own kubeconfig (out-of-cluster agents, tests).
    File(PathBuf),
}

impl Credentials {
    /// In-cluster credentials from the environment, Istio's install-cni variables:
    /// `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`,
    /// `KUBERNETES_SERVICE_PROTOCOL` (https), `KUBE_CA_FILE`, `SKIP_TLS_VERIFY`.
    pub fn in_cluster(
        env: impl Fn(&str) -> Option<String>,
        sa_dir: &Path,
    ) -> Result<Credentials, KubeconfigError> {
        let host = env("KUBERNETES_SERVICE_HOST")
            .filter(|h| !h.is_empty())
            .ok_or(KubeconfigError::MissingEnv("KUBERNETES_SERVICE_HOST"))?;
        let port = env("KUBERNETES_SERVICE_PORT")
            .filter(|p| !p.is_empty())
            .ok_or(KubeconfigError::MissingEnv("KUBERNETES_SERVICE_PORT"))?;
        let protocol = env("KUBERNETES_SERVICE_PROTOCOL")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "https".into());
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        let skip = env("SKIP_TLS_VERIFY").is_some_and(|v| v == "true");
        let ca_file = (!skip).then(|| {
            env("KUBE_CA_FILE")
                .filter(|f| !f.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| sa_dir.join("ca.crt"))
        });
        Ok(Credentials::InCluster {
            server: format!("{protocol}://{host}:{port}"),
            ca_file,
            token_file: sa_dir.join("token"),
        })
    }
}

/// The parts of a kubeconfig file the agent may use.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KubeconfigFile {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    client_certificate: Option<String>,
    client_certificate_data: Option<String>,
    client_key: Option<String>,
    client_key_data: Option<String>,
    exec: Option<serde::de::IgnoredAny>,
    auth_provider: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
    user: Option<String>,
}

/// A rendered kubeconfig and the files it was built from (to watch for changes).
pub struct Rendered {
    pub yaml: String,
    pub sources: Vec<PathBuf>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Credentials files are small; one larger than this is refused, not read.
const MAX_FILE: u64 = 1 << 20;

/// Reads a file the kubeconfig embeds, recording it as a source.
fn read(path: &Path, sources: &mut Vec<PathBuf>) -> Result<Vec<u8>, KubeconfigError> {
    let bytes = super::read_bounded(path, MAX_FILE).map_err(io(path))?;
    sources.push(path.to_path_buf());
    Ok(bytes)
}

fn text(path: &Path, sources: &mut Vec<PathBuf>) -> Result<String, KubeconfigError> {
    let bytes = read(path, sources)?;
    String::from_utf8(bytes)
        .map(|s| s.trim().to_string())
        .map_err(|_| KubeconfigError::Invalid {
            path: path.to_path_buf(),
            reason: "not UTF-8 text".into(),
        })
}

/// Builds the plugin's self-contained kubeconfig from `creds`.
pub fn render(creds: &Credentials) -> Result<Rendered, KubeconfigError> {
    let mut sources = Vec::new();
    let mut cluster = serde_json::Map::new();
    let mut user = serde_json::Map::new();
    match creds {
        Credentials::InCluster {
            server,
            ca_file,
            token_file,
        } => {
            cluster.insert("server".into(), json!(server));
            match ca_file {
                Some(ca) => {
                    let data = b64(&read(ca, &mut sources)?);
                    cluster.insert("certificate-authority-data".into(), json!(data));
                }
                None => {
                    cluster.insert("insecure-skip-tls-verify".into(), json!(true));
                }
            }
            user.insert("token".into(), json!(text(token_file, &mut sources)?));
        }
        Credentials::File(path) => {
            let invalid = |reason: String| KubeconfigError::Invalid {
                path: path.clone(),
                reason,
            };
            let raw = read(path, &mut sources)?;
            let file: KubeconfigFile =
                serde_saphyr::from_slice(&raw).map_err(|e| invalid(e.to_string()))?;
            let base = path.parent().unwrap_or(Path::new("/"));
            let resolve = |p: &str| base.join(p);
            let context = match &file.current_context {
                Some(name) => file.contexts.iter().find(|c| &c.name == name),
                None => file.contexts.first(),
            }
            .ok_or_else(|| invalid("no current context".into()))?;
            let c = &file
                .clusters
                .iter()
                .find(|c| c.name == context.context.cluster)
                .ok_or_else(|| invalid(format!("no cluster {}", context.context.cluster)))?
                .cluster;
            cluster.insert("server".into(), json!(c.server));
            if let Some(data) = &c.certificate_authority_data {
                cluster.insert("certificate-authority-data".into(), json!(data));
            } else if let Some(ca) = &c.certificate_authority {
                let data = b64(&read(&resolve(ca), &mut sources)?);
                cluster.insert("certificate-authority-data".into(), json!(data));
            }
            if c.insecure_skip_tls_verify {
                cluster.insert("insecure-skip-tls-verify".into(), json!(true));
            }
            let u = match &context.context.user {
                Some(name) => file
                    .users
                    .iter()
                    .find(|u| &u.name == name)
                    .map(|u| &u.user)
                    .ok_or_else(|| invalid(format!("no user {name}")))?,
                None => &User::default(),
            };
            if u.exec.is_some() || u.auth_provider.is_some() {
                return Err(invalid(
                    "exec and auth-provider credentials cannot be handed to the CNI plugin; use a token or a client certificate".into(),
                ));
            }
            if let Some(token) = &u.token {
                user.insert("token".into(), json!(token));
            } else if let Some(f) = &u.token_file {
                user.insert("token".into(), json!(text(&resolve(f), &mut sources)?));
            }
            for (data, file, key) in [
                (
                    &u.client_certificate_data,
                    &u.client_certificate,
                    "client-certificate-data",
                ),
                (&u.client_key_data, &u.client_key, "client-key-data"),
            ] {
                if let Some(d) = data {
                    user.insert(key.into(), json!(d));
                } else if let Some(f) = file {
                    user.insert(key.into(), json!(b64(&read(&resolve(f), &mut sources)?)));
                }
            }
        }
    }
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "istio-cni", "user": user}],
        "contexts": [{"name": "istio-cni-context", "context": {"cluster": "local", "user": "istio-cni"}}],
        "current-context": "istio-cni-context",
    });
    let body = serde_saphyr::to_string(&doc).map_err(|e| KubeconfigError::Invalid {
        path: PathBuf::from("<kubeconfig>"),
        reason: e.to_string(),
    })?;
    Ok(Rendered {
        yaml: format!(
            "# The istio-cni CNI plugin's kubeconfig, written by the istio-cni agent: self-contained\n# (the runtime runs the plugin on the host), rewritten when the agent's credentials change.\n{body}"
        ),
        sources,
    })
}

/// Writes `bytes` to `path` with mode 0600, atomically and durably, never through a
/// symlink (see [`super::write_atomic`]). Returns whether the file changed.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<bool, KubeconfigError> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::symlink_metadata(path) {
        let current = meta.file_type().is_file()
            && meta.permissions().mode() & 0o777 == 0o600
            && fs::read(path).is_ok_and(|have| have == bytes);
        if current {
            return Ok(false);
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io(dir))?;
    super::write_atomic(path, bytes, 0o600, "tmp").map_err(io(path))?;
    Ok(true)
}

/// Renders and writes the kubeconfig once.
pub fn write(creds: &Credentials, path: &Path) -> Result<Rendered, KubeconfigError> {
    let rendered = render(creds)?;
    if write_private(path, rendered.yaml.as_bytes())? {
        info!(path = %path.display(), "wrote the CNI plugin's kubeconfig");
    }
    Ok(rendered)
}

/// Keeps `path` in step with `creds` until dropped: rewritten as soon as a file it
/// was built from changes (inotify on their directories), and checked every minute
/// in case a change was missed. The watch outlives each rewrite and is in place before
/// each render, so a change landing while we write is seen on the next turn.
pub async fn keep_current(creds: Credentials, path: PathBuf) {
    let mut watched: Vec<PathBuf> = Vec::new();
    let mut watch = None;
    loop {
        let sources = match write(&creds, &path) {
            Ok(r) => r.sources,
            Err(e) => {
                warn!("the CNI plugin's kubeconfig: {e}; will retry");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut dirs: Vec<PathBuf> = sources
            .iter()
            .filter_map(|s| s.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        if !dirs.is_empty() && dirs != watched {
            let refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
            watch = crate::fswatch::DirWatch::new(&refs)
                .map_err(|e| {
                    warn!("cannot watch the agent's credentials ({e}); checking every minute")
                })
                .ok();
            watched = dirs;
            continue; // render once more, now that changes cannot slip by
        }
        // The files we read, and kubelet's atomic-writer entries (`..data` swapped in
        // when a projected token rotates).
        let names: Vec<std::ffi::OsString> = sources
            .iter()
            .filter_map(|s| s.file_name().map(ToOwned::to_owned))
            .collect();
        let ours = |name: &std::ffi::OsStr| {
            names.iter().any(|n| n == name) || name.to_string_lossy().starts_with("..")
        };
        let tick = tokio::time::sleep(Duration::from_secs(60));
        match &watch {
            Some(w) => {
                tokio::select! {
                    r = w.changed(ours) => if r.is_err() { tokio::time::sleep(RETRY).await },
                    _ = tick => {}
                }
            }
            None => tick.await,
        }
    }
}

/// Pause after a failed render or watch, so a persistent failure cannot spin.
const RETRY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sa_dir(token: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("token"), format!("{token}\n")).unwrap();
        fs::write(d.path().join("ca.crt"), "-----BEGIN CERTIFICATE-----\nX\n").unwrap();
        d
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn parsed(r: &Rendered) -> serde_json::Value {
        serde_saphyr::from_str(&r.yaml).unwrap()
    }

    #[test]
    fn in_cluster_credentials_are_embedded_not_referenced() {
        let sa = sa_dir("tok-1");
        let creds = Credentials::in_cluster(
            env(&[
                ("KUBERNETES_SERVICE_HOST", "fd00::1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ]),
            sa.path(),
        )
        .unwrap();
        let r = render(&creds).unwrap();
        let v = parsed(&r);
        let cluster = &v["clusters"][0]["cluster"];
        assert_eq!(cluster["server"].as_str(), Some("https://[fd00::1]:443"));
        let ca = base64::engine::general_purpose::STANDARD
            .decode(cluster["certificate-authority-data"].as_str().unwrap())
            .unwrap();
        assert!(ca.starts_with(b"-----BEGIN CERTIFICATE-----"));
        assert_eq!(v["users"][0]["user"]["token"].as_str(), Some("tok-1"));
        assert!(!r.yaml.contains(sa.path().to_str().unwrap()), "{}", r.yaml);
        assert_eq!(r.sources.len(), 2);
        let missing = Credentials::in_cluster(env(&[]), sa.path()).unwrap_err();
        assert!(missing.to_string().contains("KUBERNETES_SERVICE_HOST"));
        let skip = Credentials::in_cluster(
            env(&[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
                ("SKIP_TLS_VERIFY", "true"),
            ]),
            sa.path(),
        )
        .unwrap();
        let v = parsed(&render(&skip).unwrap());
        assert_eq!(
            v["clusters"][0]["cluster"]["insecure-skip-tls-verify"],
            true
        );
    }

    #[test]
    fn a_kubeconfig_with_file_references_becomes_self_contained() {
        let sa = sa_dir("tok-2");
        let kc = sa.path().join("kubeconfig");
        fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority: ca.crt\nusers:\n- name: u\n  user:\n    tokenFile: token\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
        )
        .unwrap();
        let r = render(&Credentials::File(kc.clone())).unwrap();
        let v = parsed(&r);
        assert_eq!(
            v["clusters"][0]["cluster"]["server"].as_str(),
            Some("https://127.0.0.1:6443")
        );
        assert!(v["clusters"][0]["cluster"]["certificate-authority-data"].is_string());
        assert_eq!(v["users"][0]["user"]["token"].as_str(), Some("tok-2"));
        assert!(!r.yaml.contains("tokenFile") && !r.yaml.contains("ca.crt"));
        fs::write(&kc, "clusters: [}").unwrap();
        let Err(err) = render(&Credentials::File(kc.clone())) else {
            panic!("rendered a broken kubeconfig")
        };
        assert!(err.to_string().contains("kubeconfig"), "{err}");
        fs::write(&kc, "apiVersion: v1\nclusters:\n- name: c\n  cluster: {server: 'https://h'}\nusers:\n- name: u\n  user: {exec: {command: aws}}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n").unwrap();
        let Err(err) = render(&Credentials::File(kc)) else {
            panic!("rendered exec credentials")
        };
        assert!(err.to_string().contains("exec"), "{err}");
    }

    #[test]
    fn writes_are_private_atomic_and_never_follow_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("istio-cni-kubeconfig");
        let victim = d.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(write_private(&path, b"config-1").unwrap());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap(), "config-1");
        assert!(!write_private(&path, b"config-1").unwrap(), "unchanged");
        // A symlink planted at the temporary name is removed, not followed.
        std::os::unix::fs::symlink(&victim, d.path().join(".istio-cni-kubeconfig.tmp")).unwrap();
        assert!(write_private(&path, b"config-2").unwrap());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(fs::read_to_string(&path).unwrap(), "config-2");
    }
}
