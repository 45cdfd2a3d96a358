//! `cargo xtask dist`: a release of both binaries from this one workspace. Builds them
//! in release mode, asks each for its `version`, refuses to package two different
//! build versions, and writes into `target/dist/<version>/`: the binaries,
//! `SHA256SUMS` (check with `sha256sum -c SHA256SUMS`) and `manifest.json` naming the
//! version and the protocol versions each binary says it speaks (ZDS between the
//! agent and ztunnel, plugin events between the CNI plugin and the agent).
//!
//! The agent's binary is also the CNI plugin, which the node's container runtime runs
//! on the node itself, outside any image: it is linked statically (glibc's static
//! libraries, `-C target-feature=+crt-static` for the host's target), so it runs on a
//! node whose C library is older than the build machine's. The release refuses a
//! dynamically linked `istio-cni`. ztunnel runs only in its image and stays dynamic.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The binaries a release holds.
pub const BINARIES: [&str; 2] = ["ztunnel", "istio-cni"];

/// The host's target triple, from `rustc -vV`.
pub fn host_triple(rustc_vv: &str) -> Option<&str> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::trim)
}

/// Whether an ELF executable needs no dynamic loader (no `PT_INTERP` program header).
pub fn is_static(elf: &[u8]) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&elf[0x20..0x28]);
    let phoff = usize::try_from(u64::from_le_bytes(phoff))?;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    for i in 0..count {
        let at = phoff
            .checked_add(i * size)
            .filter(|&at| at + 4 <= elf.len())
            .context("program headers past the end of the file")?;
        let kind = u32::from_le_bytes([elf[at], elf[at + 1], elf[at + 2], elf[at + 3]]);
        if kind == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

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

/// `manifest.json`; `statics` names the statically linked binaries.
pub fn manifest(
    version: &str,
    told: &[Told],
    sums: &[(String, String)],
    statics: &[&str],
) -> serde_json::Value {
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
                "linkage": if statics.contains(&t.name.as_str()) { "static" } else { "dynamic" },
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

/// Builds the agent linked statically for the host (`release` or debug); returns it.
pub fn static_agent(target: &Path, mut cargo: Command, release: bool) -> anyhow::Result<PathBuf> {
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    let rustc = String::from_utf8_lossy(&rustc.stdout).into_owned();
    let triple = host_triple(&rustc).context("rustc -vV names no host")?;
    cargo
        .args(["build", "--bins", "-p", "istio-cni", "--target", triple])
        .args(release.then_some("--release"))
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    crate::run(cargo)?;
    let profile = if release { "release" } else { "debug" };
    Ok(target.join(triple).join(profile).join("istio-cni"))
}

/// Builds, checks and packages; returns the release directory. `cargo` makes a fresh
/// cargo command.
pub fn run(target: &Path, cargo: impl Fn() -> Command) -> anyhow::Result<PathBuf> {
    let mut zt = cargo();
    zt.args(["build", "--release", "--bins", "-p", "ztunnel"]);
    crate::run(zt)?;
    let cni = static_agent(target, cargo(), true)?;
    let paths = [target.join("release/ztunnel"), cni];
    let elf =
        std::fs::read(&paths[1]).with_context(|| format!("reading {}", paths[1].display()))?;
    if !is_static(&elf)? {
        bail!(
            "{} is dynamically linked: the CNI plugin must not depend on the node's C library",
            paths[1].display()
        );
    }
    let told: Vec<Told> = BINARIES
        .iter()
        .zip(&paths)
        .map(|(name, path)| version_of(path, name))
        .collect::<anyhow::Result<_>>()?;
    let version = one_version(&told)?;
    let out = target.join("dist").join(&version);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for (name, path) in BINARIES.iter().zip(&paths) {
        std::fs::copy(path, out.join(name)).with_context(|| format!("copying {name}"))?;
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
    let manifest = manifest(&version, &told, &parsed, &["istio-cni"]);
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    Ok(out)
}

/// The SHA-256 of `data`, in hex (by coreutils' `sha256sum`, as the release's sums).
pub fn sha256(data: &[u8]) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running sha256sum (coreutils)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(data)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("sha256sum failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .filter(|h| h.len() == 64)
        .map(str::to_string)
        .with_context(|| format!("not a sha256sum line: {text:?}"))
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
    fn the_host_triple_and_static_linking_are_read_from_what_the_tools_say() {
        let vv = "rustc 1.91.0\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.91.0\n";
        assert_eq!(host_triple(vv), Some("x86_64-unknown-linux-gnu"));
        assert_eq!(host_triple("rustc 1.91.0\n"), None);
        // A dynamically linked executable (this test, as cargo builds it) has a
        // loader; a header with no program headers has none; junk is refused.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static(&me).unwrap());
        let mut bare = me[..64].to_vec();
        bare[0x38] = 0;
        bare[0x39] = 0;
        assert!(is_static(&bare).unwrap());
        assert!(is_static(b"#!/bin/sh\n").is_err());
        let mut cut = me[..64].to_vec();
        cut[0x38] = 1;
        assert!(is_static(&cut).is_err(), "program headers past the end");
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
        let m = manifest("0.1.0", &told, &sums, &["istio-cni"]);
        assert_eq!(m["version"], "0.1.0");
        assert_eq!(m["binaries"][0]["linkage"], "dynamic");
        assert_eq!(m["binaries"][1]["linkage"], "static");
        assert_eq!(m["binaries"][0]["sha256"], a.as_str());
        assert_eq!(m["binaries"][0]["protocols"]["zds"], "V1");
        assert!(m["binaries"][0]["protocols"].get("plugin_event").is_none());
        assert_eq!(m["binaries"][1]["protocols"]["plugin_event"], "1");
    }
}
