//! The agent's plugin-event socket: one request per connection from the CNI plugin,
//! answered once the pod is enrolled (or with why it could not be).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::{info, warn};

use super::event::{check_version, Command, Request, Response};
use crate::enroll;
use crate::k8s::controller::Controller;

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

/// Serves plugin events until dropped.
pub async fn serve(listener: UnixListener, controller: Arc<Controller>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let controller = controller.clone();
        tokio::spawn(async move {
            let mut body = Vec::new();
            let response = match (&mut stream).take(MAX_REQUEST).read_to_end(&mut body).await {
                Err(e) => Response::err(format!("reading the request: {e}")),
                Ok(_) => match serde_json::from_slice::<Request>(&body) {
                    Err(e) => Response::err(format!("malformed plugin request: {e}")),
                    Ok(req) => handle(&controller, req).await,
                },
            };
            let mut out = serde_json::to_vec(&response).unwrap_or_default();
            out.push(b'\n');
            let _ = stream.write_all(&out).await;
        });
    }
}

async fn handle(controller: &Controller, req: Request) -> Response {
    if let Err(e) = check_version(req.version) {
        warn!("{e}");
        return Response::err(e);
    }
    let pod = enroll::Pod {
        uid: protocol::WorkloadUid::new(req.pod_uid.clone()),
        name: req.pod_name.clone(),
        namespace: req.pod_namespace.clone(),
        service_account: req.service_account.clone(),
        netns_path: req.netns.clone(),
        ips: req.ips.iter().copied().filter(|ip| ip.is_ipv4()).collect(),
    };
    match req.command {
        Command::Add => {
            info!(pod = %format!("{}/{}", req.pod_namespace, req.pod_name), "CNI ADD: enrolling");
            match controller.add_from_cni(pod).await {
                Ok(status) => Response::ok(match status {
                    crate::EnrollStatus::Enabled => "enabled",
                    crate::EnrollStatus::Pending => "pending",
                }),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Command::Del => {
            controller.forget_from_cni(&req.pod_namespace, &req.pod_name);
            Response::ok("")
        }
    }
}
