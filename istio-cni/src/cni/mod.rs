//! The chained CNI plugin, its channel to the agent, and its installation.
//!
//! - [`plugin`]: the plugin process (`istio-cni` run with `CNI_COMMAND` set).
//! - [`event`]: the versioned plugin <-> agent messages.
//! - [`server`]: the agent's socket that receives them.
//! - [`install`]: install-cni, the plugin put (and kept) in the node's CNI chain.
//! - [`kubeconfig`]: the plugin's self-contained kubeconfig.

pub mod event;
pub mod install;
pub mod kubeconfig;
pub mod plugin;
pub mod server;

/// Writes `bytes` to `path` so that a crash or power cut leaves either the old file or
/// the new one, never a truncated one, and never through a link someone planted: a
/// temporary file beside it (`.<name>.<suffix>`; a stale one is removed, not
/// followed) is created exclusively without following symlinks, with `mode` from the
/// start, written and synced to disk, then renamed over `path` (which replaces a
/// symlink there rather than writing through it), and the directory is synced so the
/// rename lasts. The temporary file is removed if anything fails. The agent writes the
/// node's CNI config, the plugin binary and the plugin's kubeconfig so, as root.
pub(crate) fn write_atomic(
    path: &std::path::Path,
    bytes: &[u8],
    mode: u32,
    suffix: &str,
) -> std::io::Result<()> {
    let tmp = temp_beside(path, suffix);
    write_new(&tmp, bytes, mode)?;
    let publish = || -> std::io::Result<()> {
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    };
    publish().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// `.<name>.<suffix>` beside `path`.
pub(crate) fn temp_beside(path: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{suffix}"))
}

/// Creates `path` anew (a stale file or link there is removed first, never followed)
/// with `mode`, writes `bytes` and syncs them to disk.
pub(crate) fn write_new(path: &std::path::Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)?;
        // The mode given at creation is filtered by the umask: set it exactly.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Syncs the directory holding `path` (a rename is durable once its directory is).
fn sync_dir(path: &std::path::Path) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Reads `path` whole, refusing (with `InvalidData`) a file larger than `max` bytes:
/// the configs and credentials read here are small, and come from other agents.
pub(crate) fn read_bounded(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn an_atomic_write_replaces_a_link_instead_of_following_it_and_sets_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (path, victim) = (dir.path().join("conf"), dir.path().join("victim"));
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_atomic(&path, b"new", 0o640, "tmp").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // A failure leaves no temporary file: the directory's gone.
        let gone = dir.path().join("nodir/conf");
        assert!(write_atomic(&gone, b"x", 0o600, "tmp").is_err());
        assert!(!temp_beside(&gone, "tmp").exists());
    }
}
