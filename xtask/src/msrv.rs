//! The Rust version the workspace declares (`rust-version` in `Cargo.toml`, inherited
//! by every crate) is the one it needs, checked before the test suite: no dependency
//! may need a newer one (from `cargo metadata`), and none of our code may use an API
//! stabilised after it (clippy's `incompatible_msrv`, which reads the declaration).

use std::process::Command;

use anyhow::{bail, Context};

/// A version as `(major, minor, patch)`; `None` when it does not parse.
fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
        parts.next().flatten().unwrap_or(0),
    ))
}

/// From `cargo metadata`'s JSON: the version our crates declare, and the packages
/// that need a newer one (name, version, their rust-version).
pub fn too_new(metadata: &serde_json::Value) -> Result<(String, Vec<String>), String> {
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .ok_or("no workspace_members")?
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let packages = metadata["packages"].as_array().ok_or("no packages")?;
    let declared: Vec<&str> = packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
        .map(|p| p["rust_version"].as_str().unwrap_or(""))
        .collect();
    let Some(first) = declared.first() else {
        return Err("no workspace member found".into());
    };
    if let Some(odd) = declared.iter().find(|d| *d != first) {
        return Err(format!(
            "the crates declare different rust-versions ({first:?}, {odd:?}): each should inherit the workspace's (rust-version.workspace = true)"
        ));
    }
    let ours = parse(first).ok_or_else(|| format!("no rust-version declared ({first:?})"))?;
    let newer = packages
        .iter()
        .filter_map(|p| {
            let needs = p["rust_version"].as_str()?;
            (parse(needs)? > ours).then(|| {
                format!(
                    "{} {} needs {needs}",
                    p["name"].as_str().unwrap_or("?"),
                    p["version"].as_str().unwrap_or("?")
                )
            })
        })
        .collect();
    Ok((first.to_string(), newer))
}

/// Runs both checks with `cargo`.
pub fn check(cargo: impl Fn() -> Command) -> anyhow::Result<()> {
    let out = cargo()
        .args(["metadata", "--format-version", "1"])
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata's JSON")?;
    let (declared, newer) = too_new(&metadata).map_err(anyhow::Error::msg)?;
    if !newer.is_empty() {
        bail!(
            "rust-version {declared} is older than dependencies need; raise it in Cargo.toml:\n  {}",
            newer.join("\n  ")
        );
    }
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-A",
        "clippy::all",
        "-D",
        "clippy::incompatible_msrv",
    ]);
    crate::run(clippy).context("an API newer than the declared rust-version is used")?;
    eprintln!("xtask: rust-version {declared}: what the dependencies and the code need");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metadata(ours: &str, dep: &str) -> serde_json::Value {
        json!({
            "workspace_members": ["a 0.1.0", "b 0.1.0"],
            "packages": [
                {"id": "a 0.1.0", "name": "a", "version": "0.1.0", "rust_version": ours},
                {"id": "b 0.1.0", "name": "b", "version": "0.1.0", "rust_version": ours},
                {"id": "d 5.0.0", "name": "kube", "version": "5.0.0", "rust_version": dep},
                {"id": "e 1.0.0", "name": "old", "version": "1.0.0", "rust_version": null},
            ]
        })
    }

    #[test]
    fn a_dependency_needing_a_newer_rust_is_named() {
        assert_eq!(
            too_new(&metadata("1.89", "1.89.0")).unwrap(),
            ("1.89".to_string(), Vec::<String>::new())
        );
        assert_eq!(
            too_new(&metadata("1.80", "1.89.0")).unwrap().1,
            ["kube 5.0.0 needs 1.89.0"]
        );
        let mut split = metadata("1.89", "1.0");
        split["packages"][1]["rust_version"] = json!(null);
        assert!(too_new(&split)
            .unwrap_err()
            .contains("rust-version.workspace"));
    }
}
