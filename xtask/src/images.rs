//! `cargo xtask images [--hub <hub>] [--tag <tag>]`: both container images from
//! `docker/Dockerfile` (one build of the workspace, two targets), tagged as the charts
//! expect them (`<hub>/ztunnel:<tag>`, `<hub>/istio-cni:<tag>`). Needs a Docker
//! engine; without one it says so and exits non-zero at once.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::setup::Problem;

/// The charts' default hub.
pub const DEFAULT_HUB: &str = "localhost/ambient-inpod";
pub const IMAGES: [&str; 2] = ["ztunnel", "istio-cni"];

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub hub: String,
    pub tag: String,
}

/// The value after flag `name` on a command line (not empty, not another flag).
pub fn flag_value<'a>(
    it: &mut impl Iterator<Item = &'a String>,
    name: &str,
) -> Result<String, String> {
    it.next()
        .filter(|v| !v.is_empty() && !v.starts_with("--"))
        .cloned()
        .ok_or_else(|| format!("{name} needs a value"))
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hub: DEFAULT_HUB.into(),
            tag: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut opts = Options::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--hub" => opts.hub = flag_value(&mut it, a)?,
                "--tag" => opts.tag = flag_value(&mut it, a)?,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(opts)
    }

    /// `<hub>/<image>:<tag>`.
    pub fn reference(&self, image: &str) -> String {
        format!("{}/{image}:{}", self.hub, self.tag)
    }
}

/// Runs `cmd` with a deadline; `Err` carries what it printed (or why it did not run).
pub fn probe(mut cmd: Command, deadline: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {deadline:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        let err = text(&out.stderr);
        Err(err.lines().last().unwrap_or("failed").to_string())
    }
}

/// Whether a Docker engine answers.
pub fn engine() -> Result<String, String> {
    let mut cmd = Command::new("docker");
    cmd.args(["info", "--format", "{{.ServerVersion}}"]);
    probe(cmd, Duration::from_secs(10)).map_err(|e| format!("`docker info`: {e}"))
}

/// Builds both images from the workspace at `root`.
pub fn build(root: &Path, opts: &Options) -> anyhow::Result<Vec<String>> {
    engine().map_err(|e| Problem(format!("building the images needs a Docker engine ({e})")))?;
    let mut built = Vec::new();
    for image in IMAGES {
        let reference = opts.reference(image);
        let mut cmd = Command::new("docker");
        cmd.args([
            "build",
            "--file",
            "docker/Dockerfile",
            "--target",
            image,
            "--tag",
        ])
        .arg(&reference)
        .arg(".")
        .current_dir(root);
        crate::run(cmd)?;
        built.push(reference);
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_default_to_the_charts_hub_and_this_version() {
        let o = Options::parse(&[]).unwrap();
        assert_eq!(o.hub, DEFAULT_HUB);
        assert_eq!(
            o.reference("ztunnel"),
            format!("{DEFAULT_HUB}/ztunnel:{}", env!("CARGO_PKG_VERSION"))
        );
        let o = Options::parse(&args(&["--hub", "reg.example/mesh", "--tag", "dev"])).unwrap();
        assert_eq!(o.reference("istio-cni"), "reg.example/mesh/istio-cni:dev");
        assert!(Options::parse(&args(&["--hub"])).is_err());
        assert!(Options::parse(&args(&["--tag", "--hub"])).is_err());
        assert!(Options::parse(&args(&["--push"])).is_err());
    }

    #[test]
    fn a_missing_program_or_a_slow_one_is_an_error_not_a_hang() {
        assert!(probe(Command::new("/nonexistent/docker"), Duration::from_secs(1)).is_err());
        let mut slow = Command::new("sleep");
        slow.arg("5");
        let start = Instant::now();
        assert!(probe(slow, Duration::from_millis(200)).is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
        let mut ok = Command::new("echo");
        ok.arg("hi");
        assert_eq!(probe(ok, Duration::from_secs(5)).unwrap(), "hi");
    }

    #[test]
    fn the_dockerfile_has_a_stage_per_image() {
        let dockerfile = include_str!("../../docker/Dockerfile");
        for image in IMAGES {
            assert!(dockerfile.contains(&format!(" AS {image}\n")), "{image}");
        }
    }
}
