//! install-cni: puts the plugin into the node's CNI setup and keeps it there.
//!
//! - The plugin binary is copied into the CNI bin dir atomically (temp file, rename).
//! - Our entry is appended, last, to the node's primary network config: the lexically
//!   first `.conf`/`.conflist` in the conf dir. A `.conf` becomes a `.conflist` holding
//!   the original plugin then ours. The file's other plugins and its mode are kept.
//!   A config that is not what CNI expects is a clear error and is left untouched.
//! - Another agent (the primary CNI's) may write the same file at the same moment: the
//!   file is read again just before our rename, and if it changed we start over from
//!   what it now holds, so neither write is lost.
//! - [`Installer::keep_installed`] repairs the moment the conf or bin dir changes
//!   (inotify), so a pod can start without our plugin only for as long as the kernel
//!   takes to tell us. Repairs are rate-limited: a fight is detected and paused.
//! - [`Installer::uninstall`] restores the original config byte for byte and removes
//!   what we added. An agent restart (upgrade) does not uninstall: the plugin stays, so
//!   new pods wait for the new agent instead of starting uncaptured.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tracing::{debug, info, warn};

/// The plugin's file name in the bin dir, and its `type` in the config.
pub const PLUGIN_NAME: &str = "istio-cni";

#[derive(Clone, Debug)]
pub struct InstallConfig {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The plugin binary to install (normally the agent's own executable).
    pub source_binary: PathBuf,
    /// Our entry in the chain (its `type` is set to `istio-cni`).
    pub plugin_conf: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no CNI network config (.conf or .conflist) in {0} yet")]
    NoPrimaryConfig(PathBuf),
    #[error("{path} is not a valid CNI config ({reason}); left as it is")]
    BadConfig { path: PathBuf, reason: String },
    #[error("{0} kept changing under us; will retry")]
    Contended(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What we changed, so uninstall can undo exactly that.
#[derive(Clone, Debug)]
struct Original {
    /// The file we modified (or the `.conf` we converted) and its bytes before.
    path: PathBuf,
    bytes: Vec<u8>,
    /// The `.conflist` we wrote (in place of a `.conf`, or the same file).
    written: PathBuf,
    /// What we wrote into it.
    wrote: Vec<u8>,
}

pub struct Installer {
    cfg: InstallConfig,
    original: Mutex<Option<Original>>,
    repairs: Mutex<Vec<Instant>>,
    metrics: Option<crate::metrics::SharedMetrics>,
}

/// More repairs than this within [`LOOP_WINDOW`] means someone keeps undoing us.
const LOOP_LIMIT: usize = 5;
const LOOP_WINDOW: Duration = Duration::from_secs(60);
/// Attempts at writing a config that keeps changing between our read and our rename.
const ATTEMPTS: usize = 5;

/// Network configs are a few KiB; one larger than this is refused, not read.
const MAX_CONFIG: u64 = 1 << 20;

/// Reads a network config file, refusing one larger than [`MAX_CONFIG`].
fn read_config(path: &Path) -> Result<Vec<u8>, InstallError> {
    super::read_bounded(path, MAX_CONFIG).map_err(io(path))
}

/// The temporary files' suffix.
const TMP: &str = "istio-cni-tmp";

/// Writes `bytes` to a temporary file beside `path` with `mode` (see
/// [`super::write_new`]); returns its path.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, InstallError> {
    let tmp = super::temp_beside(path, TMP);
    super::write_new(&tmp, bytes, mode).map_err(io(&tmp))?;
    Ok(tmp)
}

/// Writes `bytes` to `path` atomically and durably, with `mode` (see
/// [`super::write_atomic`]).
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    super::write_atomic(path, bytes, mode, TMP).map_err(io(path))
}

/// The primary config: lexically first `.conf` or `.conflist`.
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let mut candidates: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf") | Some("conflist")
                )
        })
        .collect();
    candidates.sort();
    Ok(candidates.into_iter().next())
}

fn is_conflist(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("conflist")
}

/// Parses a network config the way CNI reads it: a `.conflist` is an object with a
/// `plugins` array of objects, a `.conf` one plugin object. Anything else is refused
/// with what is wrong, before anything is written.
fn parse(path: &Path, bytes: &[u8]) -> Result<Map<String, Value>, InstallError> {
    let bad = |reason: String| InstallError::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    let value: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(bad("not a JSON object".into()));
    };
    if is_conflist(path) {
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no \"plugins\" list".into()))?;
        if let Some(i) = plugins.iter().position(|p| !p.is_object()) {
            return Err(bad(format!("plugins[{i}] is not an object")));
        }
    } else if !obj.get("type").is_some_and(Value::is_string) {
        return Err(bad("a .conf without a \"type\"".into()));
    }
    Ok(obj)
}

/// The chain with our entry last (any other entry of ours removed), or `None` when
/// `bytes` already has exactly `ours` last. A `.conf` becomes a list: it, then ours.
pub fn chain(path: &Path, bytes: &[u8], ours: &Value) -> Result<Option<Vec<u8>>, InstallError> {
    let mut obj = parse(path, bytes)?;
    if !is_conflist(path) {
        let (version, name) = (obj.remove("cniVersion"), obj.remove("name"));
        obj = match json!({"cniVersion": version, "name": name, "plugins": [obj]}) {
            Value::Object(list) => list,
            _ => unreachable!("a json! object literal"),
        };
    }
    let Some(Value::Array(plugins)) = obj.get_mut("plugins") else {
        unreachable!("parse checked the plugins list")
    };
    if is_conflist(path) && plugins.last() == Some(ours) {
        return Ok(None);
    }
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_NAME));
    plugins.push(ours.clone());
    serde_json::to_vec_pretty(&Value::Object(obj))
        .map(Some)
        .map_err(|e| InstallError::BadConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The config list without our entries, or `None` when it has none (a `.conf` is
/// one plugin, never ours).
pub fn unchain(path: &Path, bytes: &[u8]) -> Result<Option<Vec<u8>>, InstallError> {
    if !is_conflist(path) {
        return Ok(None);
    }
    let mut obj = parse(path, bytes)?;
    let Some(Value::Array(plugins)) = obj.get_mut("plugins") else {
        unreachable!("parse checked the plugins list")
    };
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_NAME));
    if plugins.len() == before {
        return Ok(None);
    }
    serde_json::to_vec_pretty(&Value::Object(obj))
        .map(Some)
        .map_err(|e| InstallError::BadConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Every `.conflist` in `conf_dir`.
fn conflists(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut out: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_conflist(p))
        .collect();
    out.sort();
    Ok(out)
}

impl Installer {
    /// Like [`Installer::new`], counting every write (and failure) of the plugin in
    /// `istio_cni_installs_total`.
    pub fn with_metrics(cfg: InstallConfig, metrics: crate::metrics::SharedMetrics) -> Installer {
        Installer {
            metrics: Some(metrics),
            ..Installer::new(cfg)
        }
    }

    pub fn new(mut cfg: InstallConfig) -> Installer {
        if let Some(obj) = cfg.plugin_conf.as_object_mut() {
            obj.insert("type".into(), json!(PLUGIN_NAME));
        } else {
            cfg.plugin_conf = json!({ "type": PLUGIN_NAME });
        }
        Installer {
            cfg,
            original: Mutex::new(None),
            repairs: Mutex::new(Vec::new()),
            metrics: None,
        }
    }

    /// Whether the binary and our entry (exactly, and last) are both in place.
    pub fn is_installed(&self) -> bool {
        let binary = self.cfg.bin_dir.join(PLUGIN_NAME).exists();
        let chained = primary_config(&self.cfg.conf_dir)
            .ok()
            .flatten()
            .filter(|p| is_conflist(p))
            .and_then(|p| Some((read_config(&p).ok()?, p)))
            .is_some_and(|(bytes, p)| matches!(chain(&p, &bytes, &self.cfg.plugin_conf), Ok(None)));
        binary && chained
    }

    /// Installs the binary and the chain entry (idempotent). Returns whether anything
    /// was written.
    pub fn install(&self) -> Result<bool, InstallError> {
        let result = self
            .install_binary()
            .and_then(|binary| Ok(self.install_config()? || binary));
        if let Some(m) = &self.metrics {
            match &result {
                Ok(true) => m.install(true),
                // Waiting for the primary CNI is not a failed install.
                Ok(false) | Err(InstallError::NoPrimaryConfig(_)) => {}
                Err(_) => m.install(false),
            }
        }
        result
    }

    fn install_binary(&self) -> Result<bool, InstallError> {
        let dest = self.cfg.bin_dir.join(PLUGIN_NAME);
        let bytes = fs::read(&self.cfg.source_binary).map_err(io(&self.cfg.source_binary))?;
        if fs::read(&dest).is_ok_and(|have| have == bytes) {
            return Ok(false);
        }
        fs::create_dir_all(&self.cfg.bin_dir).map_err(io(&self.cfg.bin_dir))?;
        write_atomic(&dest, &bytes, 0o755)?;
        info!(path = %dest.display(), "installed the CNI plugin binary");
        Ok(true)
    }

    fn install_config(&self) -> Result<bool, InstallError> {
        self.install_config_racing(&mut || {})
    }

    /// [`install_config`](Self::install_config), calling `before_commit` between
    /// writing our version and renaming it into place (where another writer may strike).
    fn install_config_racing(&self, before_commit: &mut dyn FnMut()) -> Result<bool, InstallError> {
        let conf_dir = &self.cfg.conf_dir;
        let mut last = conf_dir.clone();
        for _ in 0..ATTEMPTS {
            let path = primary_config(conf_dir)?
                .ok_or_else(|| InstallError::NoPrimaryConfig(conf_dir.clone()))?;
            let bytes = read_config(&path)?;
            let mode = fs::metadata(&path).map_err(io(&path))?.permissions().mode() & 0o7777;
            let Some(out) = chain(&path, &bytes, &self.cfg.plugin_conf)? else {
                return Ok(false);
            };
            let written = path.with_extension("conflist");
            let tmp = write_temp(&written, &out, mode)?;
            before_commit();
            // Whatever another writer put there since our read must not be lost.
            if read_config(&path).ok().as_deref() != Some(&bytes[..]) {
                debug!(path = %path.display(), "the CNI config changed while we wrote ours; again");
                let _ = fs::remove_file(&tmp);
                last = path;
                continue;
            }
            {
                let mut original = self.original.lock().unwrap_or_else(|p| p.into_inner());
                if original.is_none() {
                    *original = Some(Original {
                        path: path.clone(),
                        bytes,
                        written: written.clone(),
                        wrote: out.clone(),
                    });
                }
            }
            fs::rename(&tmp, &written).map_err(io(&written))?;
            if written != path {
                fs::remove_file(&path).map_err(io(&path))?;
            }
            info!(path = %written.display(), "added istio-cni to the CNI chain");
            return Ok(true);
        }
        Err(InstallError::Contended(last))
    }

    /// Puts back whatever is missing. Returns whether anything was repaired. Repairs
    /// (writes, not attempts: a half-written file is not one) beyond [`LOOP_LIMIT`] a
    /// minute are refused with a warning: something keeps rewriting the config and
    /// fighting it would only spin.
    pub fn repair(&self) -> Result<bool, InstallError> {
        if self.is_installed() {
            return Ok(false);
        }
        if primary_config(&self.cfg.conf_dir)?.is_none() {
            // Nothing to chain onto yet: waiting is not a fight.
            return Err(InstallError::NoPrimaryConfig(self.cfg.conf_dir.clone()));
        }
        let now = Instant::now();
        {
            let mut repairs = self.repairs.lock().unwrap_or_else(|p| p.into_inner());
            repairs.retain(|t| now.duration_since(*t) < LOOP_WINDOW);
            if repairs.len() >= LOOP_LIMIT {
                warn!("the CNI config keeps being rewritten ({} repairs in {LOOP_WINDOW:?}): another agent is fighting istio-cni; pausing repairs", repairs.len());
                return Ok(false);
            }
        }
        // Whatever is on disk now is the new "original" to keep.
        *self.original.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let wrote = self.install()?;
        if wrote {
            warn!("the istio-cni plugin or its chain entry was missing; repaired");
            self.repairs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(now);
        }
        Ok(wrote)
    }

    /// Repairs as soon as the conf or bin dir changes, until dropped; every 30 s too,
    /// in case a change notification was lost (the kernel's queue overflowed).
    pub async fn keep_installed(self: Arc<Self>) {
        for dir in [&self.cfg.conf_dir, &self.cfg.bin_dir] {
            if let Err(e) = fs::create_dir_all(dir) {
                warn!("creating {}: {e}", dir.display());
            }
        }
        let watch = crate::fswatch::DirWatch::new(&[
            self.cfg.conf_dir.as_path(),
            self.cfg.bin_dir.as_path(),
        ]);
        if let Err(e) = &watch {
            warn!("cannot watch the CNI directories ({e}); polling every second instead");
        }
        loop {
            // First with the watch in place: a change made between the first install
            // attempt and the watch's creation raised no event to wait for.
            match self.repair() {
                Err(e @ InstallError::NoPrimaryConfig(_)) => debug!("{e}"),
                Err(e) => warn!("repairing the CNI config: {e}"),
                Ok(_) => {}
            }
            // The network configs and our binary; not temporary files, not logs.
            let ours = |name: &std::ffi::OsStr| {
                let name = name.to_string_lossy();
                name == PLUGIN_NAME || name.ends_with(".conf") || name.ends_with(".conflist")
            };
            match &watch {
                Ok(w) => tokio::select! {
                    r = w.changed(ours) => if let Err(e) = r {
                        warn!("watching the CNI directories: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    },
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                },
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    /// Takes the plugin out of the node: our entry out of every config list (the
    /// original bytes back, exactly, when this agent made the change and nothing has
    /// touched the file since; else the file as it now is without our entry, which is
    /// what an agent that started after the install has to go on) and the plugin
    /// binary removed. Returns the files changed or removed.
    pub fn uninstall(&self) -> Result<Vec<PathBuf>, InstallError> {
        let mut changed = Vec::new();
        let original = self
            .original
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(orig) =
            original.filter(|o| read_config(&o.written).is_ok_and(|now| now == o.wrote))
        {
            let mode = fs::metadata(&orig.written)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o644);
            if orig.written != orig.path {
                fs::remove_file(&orig.written).map_err(io(&orig.written))?;
                changed.push(orig.written.clone());
            }
            write_atomic(&orig.path, &orig.bytes, mode)?;
            changed.push(orig.path);
        }
        for path in conflists(&self.cfg.conf_dir)? {
            let bytes = read_config(&path)?;
            let Some(out) = unchain(&path, &bytes)? else {
                continue;
            };
            let mode = fs::metadata(&path).map_err(io(&path))?.permissions().mode() & 0o7777;
            write_atomic(&path, &out, mode)?;
            changed.push(path);
        }
        let binary = self.cfg.bin_dir.join(PLUGIN_NAME);
        match fs::remove_file(&binary) {
            Ok(()) => changed.push(binary),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&binary)(e)),
        }
        info!(
            files = ?changed,
            "istio-cni taken out of the node's CNI configuration"
        );
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        _root: tempfile::TempDir,
        cfg: InstallConfig,
    }

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let (bin, conf) = (root.path().join("bin"), root.path().join("net.d"));
        fs::create_dir_all(&conf).unwrap();
        let source = root.path().join("istio-cni-build");
        fs::write(&source, b"#!plugin v1").unwrap();
        let cfg = InstallConfig {
            bin_dir: bin,
            conf_dir: conf,
            source_binary: source,
            plugin_conf: json!({"kubeconfig": "/etc/cni/net.d/istio-cni-kubeconfig"}),
        };
        Dirs { _root: root, cfg }
    }

    const CONFLIST: &str = "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"k8s-pod-network\",\n  \"plugins\": [ {\"type\": \"bridge\"}, {\"type\": \"portmap\", \"capabilities\": {\"portMappings\": true}} ]\n}\n";

    /// The chain's plugin types, in order.
    fn types(conflist: &Value) -> Vec<&str> {
        conflist["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect()
    }

    fn has_our_plugin(conflist: &Value) -> bool {
        conflist["plugins"]
            .as_array()
            .and_then(|p| p.last())
            .is_some_and(|p| p["type"] == PLUGIN_NAME)
    }

    fn read_json(p: &Path) -> Value {
        serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
    }

    /// A file planted where install writes its temporary files (a symlink to a file
    /// the agent, as root, would overwrite) is removed, never written through; the
    /// config and the binary land where they belong.
    #[test]
    fn install_never_writes_through_a_planted_link() {
        let d = dirs();
        let primary = d.cfg.conf_dir.join("10-bridge.conflist");
        fs::write(&primary, CONFLIST).unwrap();
        let victim = d._root.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        fs::create_dir_all(&d.cfg.bin_dir).unwrap();
        for planted in [
            super::super::temp_beside(&primary, TMP),
            super::super::temp_beside(&d.cfg.bin_dir.join(PLUGIN_NAME), TMP),
        ] {
            std::os::unix::fs::symlink(&victim, &planted).unwrap();
        }
        Installer::new(d.cfg.clone()).install().unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(has_our_plugin(&read_json(&primary)));
        assert_eq!(
            fs::read(d.cfg.bin_dir.join(PLUGIN_NAME)).unwrap(),
            b"#!plugin v1"
        );
        let left: Vec<_> = fs::read_dir(&d.cfg.conf_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "temporary files left: {left:?}");
    }

    #[test]
    fn our_plugin_goes_last_in_the_primary_conflist_and_uninstall_restores_it_exactly() {
        let d = dirs();
        let primary = d.cfg.conf_dir.join("10-bridge.conflist");
        fs::write(&primary, CONFLIST).unwrap();
        fs::set_permissions(&primary, fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(d.cfg.conf_dir.join("99-other.conflist"), CONFLIST).unwrap();
        let inst = Installer::new(d.cfg.clone());
        inst.install().unwrap();
        inst.install().unwrap();
        let v = read_json(&primary);
        assert_eq!(
            types(&v),
            ["bridge", "portmap", "istio-cni"],
            "appended once, last"
        );
        assert_eq!(
            v["plugins"][1]["capabilities"]["portMappings"], true,
            "other plugins kept"
        );
        assert_eq!(
            fs::metadata(&primary).unwrap().permissions().mode() & 0o777,
            0o640,
            "mode kept"
        );
        assert_eq!(
            fs::read_to_string(d.cfg.conf_dir.join("99-other.conflist")).unwrap(),
            CONFLIST
        );
        let bin = d.cfg.bin_dir.join("istio-cni");
        assert_eq!(fs::read(&bin).unwrap(), b"#!plugin v1");
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(inst.is_installed());

        inst.uninstall().unwrap();
        assert_eq!(
            fs::read_to_string(&primary).unwrap(),
            CONFLIST,
            "byte for byte"
        );
        assert!(!bin.exists());
    }

    #[test]
    fn a_conf_becomes_a_conflist_and_comes_back_on_uninstall() {
        let d = dirs();
        let conf = d.cfg.conf_dir.join("10-flannel.conf");
        let original = r#"{"cniVersion":"0.4.0","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true}}"#;
        fs::write(&conf, original).unwrap();
        let inst = Installer::new(d.cfg.clone());
        inst.install().unwrap();
        assert!(!conf.exists());
        let list = read_json(&d.cfg.conf_dir.join("10-flannel.conflist"));
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["name"], "cbr0");
        assert_eq!(list["plugins"][0]["type"], "flannel");
        assert_eq!(list["plugins"][0]["delegate"]["hairpinMode"], true);
        assert_eq!(list["plugins"][1]["type"], "istio-cni");
        inst.uninstall().unwrap();
        assert_eq!(fs::read_to_string(&conf).unwrap(), original);
        assert!(!d.cfg.conf_dir.join("10-flannel.conflist").exists());
    }

    /// The agent that uninstalls is rarely the one that installed: after an upgrade
    /// or a restart, a new agent found the chain already right and wrote nothing.
    /// It still takes our entry out (and only ours), and a change another writer
    /// made since the install is kept.
    #[test]
    fn an_agent_that_did_not_install_still_takes_the_plugin_out_and_keeps_others_changes() {
        let d = dirs();
        let primary = d.cfg.conf_dir.join("10-bridge.conflist");
        fs::write(&primary, CONFLIST).unwrap();
        fs::set_permissions(&primary, fs::Permissions::from_mode(0o640)).unwrap();
        Installer::new(d.cfg.clone()).install().unwrap();
        let successor = Installer::new(d.cfg.clone());
        assert!(!successor.install().unwrap(), "nothing to write");
        let changed = successor.uninstall().unwrap();
        assert_eq!(types(&read_json(&primary)), ["bridge", "portmap"]);
        assert_eq!(
            fs::metadata(&primary).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(!d.cfg.bin_dir.join("istio-cni").exists());
        assert!(changed.contains(&primary), "{changed:?}");

        // Installed by this agent, then the primary CNI added a plugin after ours.
        let inst = Installer::new(d.cfg.clone());
        inst.install().unwrap();
        let mut v = read_json(&primary);
        v["plugins"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "bandwidth"}));
        fs::write(&primary, v.to_string()).unwrap();
        inst.uninstall().unwrap();
        assert_eq!(
            types(&read_json(&primary)),
            ["bridge", "portmap", "bandwidth"],
            "the later change is kept, only our entry goes"
        );
        // Nothing of ours: nothing changes.
        let before = fs::read(&primary).unwrap();
        assert!(Installer::new(d.cfg.clone())
            .uninstall()
            .unwrap()
            .is_empty());
        assert_eq!(fs::read(&primary).unwrap(), before);
    }

    #[test]
    fn a_rewritten_or_removed_chain_is_repaired_and_a_fight_is_given_up() {
        let d = dirs();
        let primary = d.cfg.conf_dir.join("10-bridge.conflist");
        fs::write(&primary, CONFLIST).unwrap();
        let inst = Installer::new(d.cfg.clone());
        inst.install().unwrap();
        assert!(!inst.repair().unwrap(), "nothing to repair");
        // The primary CNI rewrites its file without us.
        fs::write(&primary, CONFLIST).unwrap();
        assert!(inst.repair().unwrap());
        assert!(has_our_plugin(&read_json(&primary)));
        // Our binary deleted.
        fs::remove_file(d.cfg.bin_dir.join("istio-cni")).unwrap();
        assert!(inst.repair().unwrap());
        assert!(d.cfg.bin_dir.join("istio-cni").exists());
        // Someone keeps undoing us: after the limit, repairs pause.
        for _ in 0..LOOP_LIMIT {
            fs::write(&primary, CONFLIST).unwrap();
            let _ = inst.repair().unwrap();
        }
        fs::write(&primary, CONFLIST).unwrap();
        assert!(!inst.repair().unwrap(), "repair loop detected");
    }

    /// A config that lands after the first install attempt but before the watch
    /// exists raises no event the watch sees; the real cluster's suite caught the
    /// 30 s wait (the safety re-check) once under load.
    #[tokio::test]
    async fn a_config_written_before_the_watch_started_is_chained_at_once() {
        let d = dirs();
        let inst = Arc::new(Installer::new(d.cfg.clone()));
        assert!(inst.install().is_err(), "no config yet");
        let primary = d.cfg.conf_dir.join("10-bridge.conflist");
        fs::write(&primary, CONFLIST).unwrap();
        let keeper = tokio::spawn(inst.clone().keep_installed());
        let chained = tokio::time::timeout(Duration::from_secs(5), async {
            while !inst.is_installed() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        keeper.abort();
        assert!(chained.is_ok(), "not chained within 5 s");
        assert!(has_our_plugin(&read_json(&primary)));
    }

    #[test]
    fn no_config_yet_and_bad_json_are_clear_errors() {
        let d = dirs();
        let inst = Installer::new(d.cfg.clone());
        assert!(matches!(
            inst.install(),
            Err(InstallError::NoPrimaryConfig(_))
        ));
        fs::write(d.cfg.conf_dir.join("10-x.conflist"), "{nope").unwrap();
        let err = inst.install().unwrap_err().to_string();
        assert!(
            err.contains("10-x.conflist") && err.contains("not a valid CNI config"),
            "{err}"
        );
    }

    #[test]
    fn json_that_is_not_a_cni_config_is_refused_and_left_untouched() {
        let d = dirs();
        let inst = Installer::new(d.cfg.clone());
        let list = d.cfg.conf_dir.join("10-x.conflist");
        for (text, why) in [
            ("[]", "not a JSON object"),
            ("\"plugins\"", "not a JSON object"),
            ("{\"plugins\": 3}", "no \"plugins\" list"),
            ("{\"plugins\": [1]}", "plugins[0] is not an object"),
        ] {
            fs::write(&list, text).unwrap();
            let err = inst.install().unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
            assert_eq!(fs::read_to_string(&list).unwrap(), text, "nothing written");
            assert!(!inst.is_installed());
            assert!(inst.repair().is_err());
        }
        fs::remove_file(&list).unwrap();
        let conf = d.cfg.conf_dir.join("10-x.conf");
        fs::write(&conf, "[1, 2]").unwrap();
        assert!(inst.install().is_err());
        assert_eq!(fs::read_to_string(&conf).unwrap(), "[1, 2]");
        let names: Vec<_> = fs::read_dir(&d.cfg.conf_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names.len(),
            1,
            "no temporary or converted file left: {names:?}"
        );
    }

    #[test]
    fn a_write_by_another_cni_between_our_read_and_our_rename_is_not_lost() {
        let d = dirs();
        let primary = d.cfg.conf_dir.join("10-bridge.conflist");
        fs::write(&primary, CONFLIST).unwrap();
        let inst = Installer::new(d.cfg.clone());
        inst.install_binary().unwrap();
        let theirs = CONFLIST.replace("portmap", "bandwidth");
        let mut struck = false;
        inst.install_config_racing(&mut || {
            if !std::mem::replace(&mut struck, true) {
                fs::write(&primary, &theirs).unwrap();
            }
        })
        .unwrap();
        assert_eq!(
            types(&read_json(&primary)),
            ["bridge", "bandwidth", "istio-cni"],
            "their write kept, ours on top"
        );
        assert!(inst.is_installed());
        // Someone who never stops: we give up with a clear error rather than clobber.
        fs::write(&primary, CONFLIST).unwrap();
        let mut n = 0;
        let err = inst
            .install_config_racing(&mut || {
                n += 1;
                fs::write(&primary, format!("{CONFLIST}{}", " ".repeat(n))).unwrap();
            })
            .unwrap_err();
        assert!(matches!(err, InstallError::Contended(_)), "{err}");
        assert!(!has_our_plugin(&read_json(&primary)));
    }

    #[test]
    fn a_half_written_config_is_not_a_repair_and_does_not_look_like_a_fight() {
        let d = dirs();
        let primary = d.cfg.conf_dir.join("10-bridge.conflist");
        fs::write(&primary, CONFLIST).unwrap();
        let inst = Installer::new(d.cfg.clone());
        inst.install().unwrap();
        // A writer that truncates then writes wakes us twice; the first time the file
        // is empty. Only the real rewrites are repairs, and LOOP_LIMIT of them pass.
        for _ in 0..LOOP_LIMIT {
            fs::write(&primary, "").unwrap();
            assert!(inst.repair().is_err(), "an empty file is not a config");
            fs::write(&primary, CONFLIST).unwrap();
            assert!(inst.repair().unwrap(), "repaired");
        }
        fs::write(&primary, CONFLIST).unwrap();
        assert!(!inst.repair().unwrap(), "only now is it a fight");
    }

    #[test]
    fn an_outdated_entry_of_ours_is_replaced() {
        let d = dirs();
        let primary = d.cfg.conf_dir.join("10-bridge.conflist");
        fs::write(&primary, CONFLIST).unwrap();
        Installer::new(d.cfg.clone()).install().unwrap();
        let mut newer = d.cfg.clone();
        newer.plugin_conf = json!({"kubeconfig": "/elsewhere"});
        let inst = Installer::new(newer);
        assert!(!inst.is_installed());
        assert!(inst.repair().unwrap());
        let v = read_json(&primary);
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2]["kubeconfig"], "/elsewhere");
    }

    #[tokio::test]
    async fn keep_installed_repairs_on_the_change_itself() {
        let d = dirs();
        let primary = d.cfg.conf_dir.join("10-bridge.conflist");
        fs::write(&primary, CONFLIST).unwrap();
        let inst = Arc::new(Installer::new(d.cfg.clone()));
        inst.install().unwrap();
        let task = tokio::spawn(inst.clone().keep_installed());
        tokio::time::sleep(Duration::from_millis(50)).await;
        fs::write(&primary, CONFLIST).unwrap();
        // Well inside the 30 s fallback tick: the inotify event did it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !inst.is_installed() {
            assert!(Instant::now() < deadline, "not repaired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
    }
}
