//! Reloads the local configuration file when it changes. A bad edit is logged and the
//! last good configuration stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::builder::{Objects, StateBuilder};
use super::localconfig::{ConfigError, LocalConfig};
use super::sources::Sources;
use super::{translate, MeshState};

/// The largest local config file read: far above any real mesh's, far below memory.
const MAX_FILE: u64 = 64 << 20;

/// Reads, validates and translates the file (workloads without a trust domain get
/// `trust_domain`). Warnings come back with the objects.
pub fn load(path: &Path, trust_domain: &str) -> Result<(Objects, Vec<String>), ConfigError> {
    use std::io::Read;
    let name = path.display().to_string();
    let read_err = |source| ConfigError::Read {
        path: name.clone(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE + 1).read_to_string(&mut text))
        .map_err(read_err)?;
    if text.len() as u64 > MAX_FILE {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE} bytes"),
        )));
    }
    load_objects(&name, &text, trust_domain)
}

/// Parses, validates and translates `text`; `name` names it in errors.
pub fn load_objects(
    name: &str,
    text: &str,
    trust_domain: &str,
) -> Result<(Objects, Vec<String>), ConfigError> {
    let cfg = LocalConfig::parse(name, text)?;
    translate::translate(cfg, trust_domain).map_err(|e| ConfigError::Invalid {
        path: name.to_string(),
        location: e.location,
        message: e.message,
    })
}

/// [`load_objects`] with Istio's default trust domain, built into a snapshot as
/// ztunnel on `node` would see it.
pub fn load_str(
    name: &str,
    text: &str,
    node: Option<&str>,
) -> Result<(MeshState, Vec<String>), ConfigError> {
    let (objects, warnings) = load_objects(name, text, super::workload::DEFAULT_TRUST_DOMAIN)?;
    let mut b = StateBuilder::new(node.map(str::to_string));
    let built = b.add(&objects).and_then(|()| b.build());
    let state = built.map_err(|e| ConfigError::Invalid {
        path: name.to_string(),
        location: "services".into(),
        message: e.to_string(),
    })?;
    Ok((state, warnings))
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.modified().ok()?,
        std::os::unix::fs::MetadataExt::ino(&meta),
    ))
}

/// Polls `path` every `every` and swaps the store's snapshot when the file changed
/// (content time or inode, so editors that write a new file and rename are seen).
pub async fn watch(path: PathBuf, trust_domain: String, sources: Arc<Sources>, every: Duration) {
    let mut last = stamp(&path);
    loop {
        tokio::time::sleep(every).await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match load(&path, &trust_domain) {
            Ok((objects, warnings)) => {
                for w in warnings {
                    warn!(path = %path.display(), "{w}");
                }
                info!(path = %path.display(), workloads = objects.workloads.len(), services = objects.services.len(), policies = objects.policies.len(), "local config reloaded");
                sources.set_local(objects);
            }
            Err(e) => warn!("local config not reloaded, keeping the last good one: {e}"),
        }
    }
}
