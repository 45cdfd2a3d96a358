//! `cargo xtask chaos [--short] [--only <text>]`: the fault matrix (see
//! `tools::chaos`). Prints progress, then the table in Markdown; writes it and the JSON
//! rows under `target/chaos/`; a full run also publishes the table into
//! `docs/results/chaos.md` (`tools::results`). Exit code 1 when a must-be-0 column of a gated fault is
//! not 0, 2 when it cannot run.

use std::process::ExitCode;
use std::time::Instant;

use tools::chaos::{self, Fault, Options};

fn main() -> ExitCode {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the chaos run creates network namespaces and iptables rules: run it as root");
        return ExitCode::from(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Only a full run of every fault is published into docs/results/.
    let publish = !args.iter().any(|a| a == "--short" || a == "--only");
    let mut opts = if args.iter().any(|a| a == "--short") {
        Options::short()
    } else {
        Options::full()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--short" => {}
            "--only" => {
                let Some(text) = it.next() else {
                    eprintln!("--only needs a part of a fault's name");
                    return ExitCode::from(2);
                };
                opts.faults.retain(|f| f.name().contains(text.as_str()));
                if opts.faults.is_empty() {
                    let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                    eprintln!(
                        "no fault matches {text:?}; faults:\n  {}",
                        names.join("\n  ")
                    );
                    return ExitCode::from(2);
                }
            }
            other => {
                eprintln!("unknown argument {other:?}; usage: chaos [--short] [--only <text>]");
                return ExitCode::from(2);
            }
        }
    }
    let rt = match e2e::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    println!(
        "chaos: {} fault(s) x {} round(s), {:?} of probing after each recovery",
        opts.faults.len(),
        opts.rounds,
        opts.window
    );
    // Ctrl-C or SIGTERM drops the run, and with it every pod, process and rule it made.
    let rows = rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let mut progress = |line: &str| println!("{line}");
        tokio::select! {
            rows = chaos::run(&opts, &mut progress) => Some(rows),
            _ = tokio::signal::ctrl_c() => None,
            _ = terminated => None,
        }
    });
    let Some(rows) = rows else {
        eprintln!("interrupted; everything the run made is removed");
        return ExitCode::from(2);
    };
    let table = chaos::report::markdown(&rows);
    println!("\n{table}");
    println!("(run took {:.0} s)", started.elapsed().as_secs_f64());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/chaos");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("chaos.md"), &table))
        .and_then(|()| {
            std::fs::write(
                dir.join("chaos.json"),
                serde_json::to_vec_pretty(&rows).unwrap_or_default(),
            )
        });
    match written {
        Ok(()) => println!("written: {}", dir.display()),
        Err(e) => eprintln!("cannot write {}: {e}", dir.display()),
    }
    if publish {
        let body = format!(
            "{table}\n\n(run took {:.0} s)",
            started.elapsed().as_secs_f64()
        );
        match tools::results::publish("chaos", "Fault matrix results", "cargo xtask chaos", &body) {
            Ok(path) => println!("published: {}", path.display()),
            Err(e) => eprintln!("cannot publish into docs/results: {e}"),
        }
    }
    let violations: Vec<String> = rows
        .iter()
        .filter(|r| r.gated)
        .flat_map(|r| r.violations())
        .collect();
    if violations.is_empty() {
        println!("every must-be-0 column is 0");
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "must-be-0 columns that are not:\n  {}",
            violations.join("\n  ")
        );
        ExitCode::FAILURE
    }
}
