//! `cargo xtask bench [--short] [--out <dir>]`: the system benchmark (see
//! `tools::bench`); `--only <part>` runs one part; `--profile` instead records where
//! ztunnel's CPU goes (perf). Prints progress, then the table; writes it, the JSON and the SVG
//! chart under `target/bench/` (or `--out`); a full run also publishes the table into
//! `docs/results/bench.md` (`tools::results`). Exit 2 when it cannot run, 1 when a
//! measurement failed. Missed targets are reported, not failures.

use std::path::PathBuf;
use std::process::ExitCode;

use tools::bench::{self, Options};

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the benchmark creates network namespaces and iptables rules: run it as root");
        return ExitCode::from(2);
    }
    let mut short = false;
    let mut profile = false;
    let mut only = None;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--short" => short = true,
            "--profile" => profile = true,
            "--only" => match args.next() {
                Some(part)
                    if ["throughput", "latency", "footprint", "idle", "cni"]
                        .contains(&part.as_str()) =>
                {
                    only = Some(part)
                }
                _ => {
                    eprintln!("--only takes one of: throughput, latency, footprint, idle, cni");
                    return ExitCode::from(2);
                }
            },
            "--out" => match args.next() {
                Some(dir) => out = Some(PathBuf::from(dir)),
                None => {
                    eprintln!("--out needs a directory");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("unknown argument {other:?}; usage: bench [--short] [--profile] [--only throughput|latency|footprint|idle|cni] [--out <dir>]");
                return ExitCode::from(2);
            }
        }
    }
    // Only a full run, into the usual place, is published into docs/results/.
    let publish = !short && only.is_none() && out.is_none() && !profile;
    let out = out.unwrap_or_else(default_out_dir);
    let mut opts = if short {
        Options::short(out)
    } else {
        Options::full(out)
    };
    opts.only = only;
    let rt = match e2e::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    if profile {
        return match rt.block_on(bench::profile(&opts)) {
            Ok(files) => {
                for f in files {
                    println!("written: {}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("profile failed: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match rt.block_on(bench::run(&opts)) {
        Ok(report) => {
            println!("\n{}", report.markdown());
            println!(
                "written: {0}/bench.md, {0}/bench.json, {0}/bench.svg",
                opts.out_dir.display()
            );
            if publish {
                let published = tools::results::publish(
                    "bench",
                    "Benchmark results",
                    "cargo xtask bench",
                    &report.markdown(),
                );
                match published {
                    Ok(path) => println!("published: {}", path.display()),
                    Err(e) => eprintln!("cannot publish into docs/results: {e}"),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `target/bench/` of the build this binary belongs to (target/<profile>/bench).
fn default_out_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("bench")))
        .unwrap_or_else(|| PathBuf::from("target/bench"))
}
