//! The Helm charts as Rust code reads them: rendered by the real `helm` (installed by
//! `cargo xtask setup`), their reviewed golden renderings, and what is taken from a
//! rendering (the DaemonSet, a container, its capabilities, the RBAC in [`rbac`]), so
//! that the charts' promises are checked against the code rather than copied by
//! hand. The chart tests live here (`tests/`, no root needed); the e2e harness and the
//! stand-in API server use this library.

pub mod rbac;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rbac::strings;
use serde_json::Value;

/// The release namespace the tests render into.
pub const NAMESPACE: &str = "istio-system";

/// `charts/<name>` in the workspace.
pub fn chart_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// Where `cargo xtask setup` puts the tools (see `xtask/src/tools.rs`).
pub fn tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AMBIENT_TOOLS_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("ambient-inpod/tools")
}

/// A tool `cargo xtask setup` installed (`helm`, `validate/bin/kubernetes-validate`,
/// `agent-rootfs`).
pub fn tool(relative: &str) -> PathBuf {
    let path = tools_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask setup` installs it (`cargo xtask test` does it)",
        path.display()
    );
    path
}

/// `helm template` of chart `name` with an optional values file.
pub fn render(name: &str, values: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", name])
        .arg(chart_dir(name))
        .args(["--namespace", NAMESPACE]);
    if let Some(v) = values {
        cmd.arg("--values").arg(v);
    }
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The documents of a multi-document YAML stream (empty ones dropped).
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("helm renders YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// The reviewed golden rendering of chart `name` with `variant` values (`default`,
/// `custom`).
pub fn golden_path(name: &str, variant: &str) -> PathBuf {
    chart_dir(name).join(format!("tests/golden-{variant}.yaml"))
}

/// The reviewed default rendering of chart `name` (`istio-cni` or `ztunnel`), read
/// once.
pub fn golden(name: &str) -> &'static [Value] {
    static CHARTS: OnceLock<[Vec<Value>; 2]> = OnceLock::new();
    let [cni, zt] = CHARTS.get_or_init(|| {
        ["istio-cni", "ztunnel"].map(|chart| {
            let path = golden_path(chart, "default");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            documents(&text)
        })
    });
    match name {
        "istio-cni" => cni,
        "ztunnel" => zt,
        other => panic!("no chart {other}"),
    }
}

/// The DaemonSet in a rendering.
pub fn daemonset(docs: &[Value]) -> &Value {
    docs.iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet")
}

/// A container of the DaemonSet in a rendering.
pub fn container<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    daemonset(docs)["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The capabilities a container of chart `name` adds (after dropping ALL), lower
/// case as `setpriv` takes them: `["net_admin", …]`.
pub fn capabilities(docs: &[Value], name: &str) -> Vec<String> {
    let caps = &container(docs, name)["securityContext"]["capabilities"];
    assert_eq!(
        strings(&caps["drop"]),
        ["ALL"],
        "{name} must drop every capability first"
    );
    strings(&caps["add"])
        .iter()
        .map(|c| c.to_ascii_lowercase())
        .collect()
}
