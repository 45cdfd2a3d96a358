//! The agent's plugin-event socket: one request per connection from the CNI plugin,
//! answered once the pod is enrolled (or with why it could not be).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::event::{check_version, Command, Request, Response, EVENT_VERSION};
use crate::enrollment::{EnrollStatus, Enrollment, Pod, PodKey, SandboxDel};

/// Largest request accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Binds the socket, replacing a stale socket but never another file. It is bound
/// under a temporary name, given its final mode (0600), then renamed into place: it
/// never exists at `path` with looser permissions.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let publish = || {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = publish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Whether a peer may send plugin events: root (the container runtime runs the
/// plugin as root) or the agent's own user. Anyone else is refused, whatever the
/// socket's mode lets through.
fn trusted_peer(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

/// Plugin requests handled at once; a container runtime starts a few pods at a time.
const MAX_IN_FLIGHT: usize = 64;
/// Time a plugin has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves plugin events until dropped. At most [`MAX_IN_FLIGHT`] requests are handled
/// at once (more wait in the kernel's backlog); a client that does not send its
/// request in time is dropped; accept failures back off instead of spinning.
pub async fn serve(listener: UnixListener, enrollment: Enrollment) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("plugin event socket: accept failed: {e}; backing off");
                tokio::time::sleep(crate::http::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let own = nix::unistd::geteuid().as_raw();
        match stream.peer_cred() {
            Ok(cred) if trusted_peer(cred.uid(), own) => {}
            Ok(cred) => {
                warn!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "refusing a plugin request from an unexpected user (only root or uid {own} may send one)"
                );
                continue;
            }
            Err(e) => {
                warn!("plugin event socket: cannot read the peer's credentials, closing: {e}");
                continue;
            }
        }
        let enrollment = enrollment.clone();
        tokio::spawn(async move {
            let mut body = Vec::new();
            let mut limited = (&mut stream).take(MAX_REQUEST);
            let read = limited.read_to_end(&mut body);
            let response = match tokio::time::timeout(READ_TIMEOUT, read).await {
                Err(_) => Response::err(format!("no request within {READ_TIMEOUT:?}")),
                Ok(Err(e)) => Response::err(format!("reading the request: {e}")),
                Ok(Ok(_)) => match serde_json::from_slice::<Request>(&body) {
                    Err(e) => Response::err(format!("malformed plugin request: {e}")),
                    // Answered in the request's version (an older plugin gets what it
                    // knows); a newer one gets this build's version with the refusal.
                    Ok(req) => {
                        let version = req.version.clamp(1, EVENT_VERSION);
                        Response {
                            version,
                            ..handle(&enrollment, req).await
                        }
                    }
                },
            };
            let mut out = serde_json::to_vec(&response).unwrap_or_default();
            out.push(b'\n');
            let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(&out)).await;
            drop(slot);
        });
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

async fn handle(enrollment: &Enrollment, req: Request) -> Response {
    if let Err(e) = check_version(req.version) {
        warn!("{e}");
        return Response::err(e);
    }
    let key = PodKey {
        namespace: req.pod_namespace.clone(),
        name: req.pod_name.clone(),
    };
    match req.command {
        Command::Add => {
            info!(pod = %key, container = %req.container_id, "CNI ADD: enrolling");
            let pod = Pod {
                uid: protocol::WorkloadUid::new(req.pod_uid.clone()),
                name: req.pod_name.clone(),
                namespace: req.pod_namespace.clone(),
                service_account: req.service_account.clone(),
                netns_path: req.netns.clone(),
                ips: req.ips.clone(),
                container_id: non_empty(&req.container_id),
            };
            if pod.uid.as_str().is_empty() {
                return Response::err("CNI ADD without the pod's uid");
            }
            match enrollment.enroll(&pod).await {
                Ok(EnrollStatus::Enabled) => Response::ok("enabled"),
                Ok(EnrollStatus::Pending) => Response::ok("pending"),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Command::Del => {
            info!(pod = %key, container = %req.container_id, "CNI DEL");
            let del = SandboxDel {
                key,
                uid: non_empty(&req.pod_uid).map(protocol::WorkloadUid::new),
                container_id: non_empty(&req.container_id),
                netns_path: Some(req.netns.clone()).filter(|p| !p.as_os_str().is_empty()),
            };
            match enrollment.cni_del(del).await {
                Ok(()) => Response::ok(""),
                Err(e) => Response::err(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_the_agents_user_may_send_plugin_events() {
        assert!(trusted_peer(0, 1000));
        assert!(trusted_peer(1000, 1000));
        assert!(!trusted_peer(65534, 1000));
        assert!(!trusted_peer(65534, 0));
    }

    #[tokio::test]
    async fn the_socket_appears_with_its_final_mode_and_replaces_only_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pluginevent.sock");
        let first = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(first);
        // A stale socket is replaced; no temporary name is left behind.
        let _again = bind(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "x").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    }
}
