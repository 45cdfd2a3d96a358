//! `cargo xtask dist`: a release of both binaries from this one workspace. Builds them
//! in release mode, asks each for its `version`, refuses to package two different
//! build versions, and writes into `target/dist/<version>/`: the binaries,
//! `SHA256SUMS` (check with `sha256sum -c SHA256SUMS`) and `manifest.json` naming the
//! version and the protocol versions each binary says it speaks (ZDS between the
//! agent and ztunnel, plugin events between the CNI plugin and the agent).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The binaries a release holds.
pub const BINARIES: [&str; 2] = ["ztunnel", "istio-cni"];

/// The value of `Key:"…"` in a `version.BuildInfo{…}` line.
pub fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    let start = info.find(&format!("{key}:\""))? + key.len() + 2;
    let len = info[start..].find('"')?;
    Some(&info[start..start + len])
}

/// What one binary says of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Told {
    pub name: String,
    pub version: String,
    pub zds: String,
    pub plugin_event: Option<String>,
}

impl Told {
    pub fn parse(name: &str, info: &str) -> anyhow::Result<Told> {
        let get = |key| {
            field(info, key)
                .map(str::to_string)
                .with_context(|| format!("`{name} version` printed no {key}: {info:?}"))
        };
        Ok(Told {
            name: name.into(),
            version: get("Version")?,
            zds: get("ZdsVersion")?,
            plugin_event: field(info, "PluginEventVersion").map(str::to_string),
        })
    }
}

/// The sums of `sha256sum`'s output, by file name.
pub fn parse_sums(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (sum, name) = l
                .split_once("  ")
                .with_context(|| format!("not a sha256sum line: {l:?}"))?;
            if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("not a SHA-256: {sum:?}");
            }
            Ok((name.to_string(), sum.to_string()))
        })
        .collect()
}

/// Every binary must tell the same build version: one release, one version.
pub fn one_version(told: &[Told]) -> anyhow::Result<String> {
    let Some(first) = told.first() else {
        bail!("no binaries");
    };
    if let Some(other) = told.iter().find(|t| t.version != first.version) {
        bail!(
            "{} says {} but {} says {}: not one build",
            first.name,
            first.version,
            other.name,
            other.version
        );
    }
    Ok(first.version.clone())
}

/// `manifest.json`.
pub fn manifest(version: &str, told: &[Told], sums: &[(String, String)]) -> serde_json::Value {
    let binaries: Vec<serde_json::Value> = told
        .iter()
        .map(|t| {
            let sha256 = sums.iter().find(|(n, _)| *n == t.name).map(|(_, s)| s);
            let mut protocols = serde_json::json!({ "zds": t.zds });
            if let Some(p) = &t.plugin_event {
                protocols["plugin_event"] = serde_json::json!(p);
            }
            serde_json::json!({
                "name": t.name,
                "version": t.version,
                "sha256": sha256,
                "protocols": protocols,
            })
        })
        .collect();
    serde_json::json!({ "version": version, "binaries": binaries })
}

fn version_of(bin: &Path, name: &str) -> anyhow::Result<Told> {
    let out = Command::new(bin)
        .arg("version")
        .env_remove("CNI_COMMAND")
        .output()
        .with_context(|| format!("running {} version", bin.display()))?;
    if !out.status.success() {
        bail!("{} version failed: {}", bin.display(), out.status);
    }
    Told::parse(name, String::from_utf8_lossy(&out.stdout).trim())
}

/// Builds, checks and packages; returns the release directory.
pub fn run(target: &Path, mut cargo: Command) -> anyhow::Result<PathBuf> {
    cargo.args([
        "build",
        "--release",
        "--bins",
        "-p",
        "ztunnel",
        "-p",
        "istio-cni",
    ]);
    crate::run(cargo)?;
    let release = target.join("release");
    let told: Vec<Told> = BINARIES
        .iter()
        .map(|name| version_of(&release.join(name), name))
        .collect::<anyhow::Result<_>>()?;
    let version = one_version(&told)?;
    let out = target.join("dist").join(&version);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for name in BINARIES {
        std::fs::copy(release.join(name), out.join(name))
            .with_context(|| format!("copying {name}"))?;
    }
    let sums = Command::new("sha256sum")
        .args(BINARIES)
        .current_dir(&out)
        .output()
        .context("running sha256sum (coreutils)")?;
    if !sums.status.success() {
        bail!("sha256sum failed: {}", sums.status);
    }
    let text = String::from_utf8_lossy(&sums.stdout).into_owned();
    let parsed = parse_sums(&text)?;
    std::fs::write(out.join("SHA256SUMS"), &text)?;
    let manifest = manifest(&version, &told, &parsed);
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZT: &str =
        r#"version.BuildInfo{Version:"0.1.0", BuildProfile:"release", ZdsVersion:"V1"}"#;
    const CNI: &str = r#"version.BuildInfo{Version:"0.1.0", BuildProfile:"release", ZdsVersion:"V1", PluginEventVersion:"1"}"#;

    #[test]
    fn reads_what_each_binary_tells() {
        let zt = Told::parse("ztunnel", ZT).unwrap();
        assert_eq!((zt.version.as_str(), zt.zds.as_str()), ("0.1.0", "V1"));
        assert_eq!(zt.plugin_event, None);
        let cni = Told::parse("istio-cni", CNI).unwrap();
        assert_eq!(cni.plugin_event.as_deref(), Some("1"));
        let err = Told::parse("ztunnel", "ztunnel 0.1.0").unwrap_err();
        assert!(err.to_string().contains("printed no Version"), "{err}");
    }

    #[test]
    fn one_release_is_one_version() {
        let zt = Told::parse("ztunnel", ZT).unwrap();
        let cni = Told::parse("istio-cni", CNI).unwrap();
        assert_eq!(one_version(&[zt.clone(), cni.clone()]).unwrap(), "0.1.0");
        let older = Told {
            version: "0.0.9".into(),
            ..cni
        };
        let err = one_version(&[zt, older]).unwrap_err().to_string();
        assert!(err.contains("not one build"), "{err}");
    }

    #[test]
    fn checksums_and_manifest() {
        let a = "a".repeat(64);
        let b = "0123456789abcdef".repeat(4);
        let sums = parse_sums(&format!("{a}  ztunnel\n{b}  istio-cni\n")).unwrap();
        assert_eq!(sums[1], ("istio-cni".to_string(), b.clone()));
        assert!(parse_sums("xyz  ztunnel\n").is_err());
        assert!(parse_sums(&format!("{a} ztunnel\n")).is_err());
        let told = [
            Told::parse("ztunnel", ZT).unwrap(),
            Told::parse("istio-cni", CNI).unwrap(),
        ];
        let m = manifest("0.1.0", &told, &sums);
        assert_eq!(m["version"], "0.1.0");
        assert_eq!(m["binaries"][0]["sha256"], a.as_str());
        assert_eq!(m["binaries"][0]["protocols"]["zds"], "V1");
        assert!(m["binaries"][0]["protocols"].get("plugin_event").is_none());
        assert_eq!(m["binaries"][1]["protocols"]["plugin_event"], "1");
    }
}
