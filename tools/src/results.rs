//! The results a full run publishes into the repository's `docs/results/`, so the
//! documentation's figures are what the commands produced, never pasted by hand: the
//! run's Markdown under a header saying when, on which commit and on what machine it
//! was measured. Shortened or partial runs (the test suite's) publish nothing.

use std::path::{Path, PathBuf};

/// `docs/results/` in the workspace.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/results")
}

/// The header of a published result: what ran, when, on which commit, on what.
pub fn header(title: &str, command: &str) -> String {
    let run = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    let commit = run(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = !run(
        "git",
        &["-C", env!("CARGO_MANIFEST_DIR"), "status", "--porcelain"],
    )
    .is_empty();
    let when = run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let kernel = run("uname", &["-r"]);
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!(
        "# {title}\n\n\
         Written by `{command}` on {when}, commit `{commit}`{}, Linux {kernel}, {cpus} CPUs. \
         Do not edit: the next full run rewrites it.\n\n",
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        }
    )
}

/// Writes `docs/results/<name>.md`: the header, then `body`. Returns the path.
pub fn publish(name: &str, title: &str, command: &str, body: &str) -> std::io::Result<PathBuf> {
    let dir = dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.md"));
    std::fs::write(&path, format!("{}{body}\n", header(title, command)))?;
    Ok(path)
}
