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

/// Binds the socket (mode 0600, replacing a stale socket but never another file).
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
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
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
