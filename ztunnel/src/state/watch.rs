//! Reloads the local configuration file when it changes. A bad edit is logged and the
//! last good configuration stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::localconfig::{ConfigError, LocalConfig};
use super::{MeshState, Store};

/// Reads and validates the file.
pub fn load(path: &Path) -> Result<MeshState, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: name.clone(),
        source,
    })?;
    MeshState::build(&name, LocalConfig::parse(&name, &text)?)
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
pub async fn watch(path: PathBuf, store: Arc<Store>, every: Duration) {
    let mut last = stamp(&path);
    loop {
        tokio::time::sleep(every).await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match load(&path) {
            Ok(state) => {
                info!(path = %path.display(), workloads = state.workload_count(), policies = state.policies.len(), "local config reloaded");
                store.replace(state);
            }
            Err(e) => warn!("local config not reloaded, keeping the last good one: {e}"),
        }
    }
}
