//! The import graph of ztunnel's modules runs one way: `proxy` -> `authz` -> `state`
//! (-> `identity`); `inpod` -> `proxy` through the proxy's own seams (its socket
//! factory, which in-pod mode implements inside each pod's netns, and its proxy
//! factory, which the state manager calls), never `proxy` -> `inpod`; and the local
//! file's schema stays inside `state`. Read from the sources, so a tie that runs the
//! wrong way fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (top-level module, file path relative to src, code without comments).
fn modules() -> Vec<(String, String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files
        .into_iter()
        .map(|path| {
            let rel = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let module = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            let code: String = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(|l| format!("{l}\n"))
                .collect();
            (module, rel, code)
        })
        .collect()
}

/// The top-level modules `code` refers to through `crate::`.
fn uses(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn modules_depend_on_each_other_one_way() {
    // Who may be used by whom (lib.rs and main.rs wire everything together).
    let allowed: &[(&str, &[&str])] = &[
        ("identity", &[]),
        ("tls", &["identity"]),
        ("state", &["identity"]),
        ("authz", &["identity", "state"]),
        ("proto", &[]),
        ("controlplane", &["identity", "proto", "tls"]),
        ("xds", &["controlplane", "identity", "proto", "state"]),
        ("metrics", &["identity", "state"]),
        ("telemetry", &[]),
        ("inpod", &["config", "metrics", "proxy"]),
        ("http", &[]),
        ("config", &[]),
        ("memory", &[]),
        (
            "proxy",
            &["authz", "state", "identity", "tls", "metrics", "memory"],
        ),
        (
            "admin",
            &[
                "http",
                "identity",
                "inpod",
                "metrics",
                "proxy",
                "state",
                "telemetry",
                "xds",
            ],
        ),
    ];
    let mut wrong = Vec::new();
    for (module, file, code) in modules() {
        if module == "lib" || module == "main" {
            continue;
        }
        let Some((_, may)) = allowed.iter().find(|(m, _)| *m == module) else {
            panic!("module {module} ({file}) is not in the allowed graph: add it");
        };
        for used in uses(&code) {
            if used != module && !may.contains(&used.as_str()) {
                wrong.push(format!("{file} uses crate::{used}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "ties that run the wrong way:\n{}",
        wrong.join("\n")
    );
}

/// The seam runs one way: the proxy knows nothing of pods' netns or ZDS.
#[test]
fn the_proxy_never_reaches_into_inpod() {
    let wrong: Vec<String> = modules()
        .into_iter()
        .filter(|(module, _, code)| module == "proxy" && uses(code).contains("inpod"))
        .map(|(_, file, _)| file)
        .collect();
    assert!(wrong.is_empty(), "proxy -> inpod in {wrong:?}");
}

#[test]
fn the_local_files_schema_stays_in_state() {
    let schema = [
        "localconfig",
        "state::translate",
        "LocalConfig",
        "LocalWorkload",
        "LocalService",
        "LocalPolicy",
        "LocalMatch",
    ];
    let mut leaks = Vec::new();
    for (module, file, code) in modules() {
        if module == "state" || module == "lib" {
            continue;
        }
        for name in schema {
            if code.contains(name) {
                leaks.push(format!("{file} names {name}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "file-schema types outside state:\n{}",
        leaks.join("\n")
    );
    // Within state, only the loader and the translator know the schema.
    for (module, file, code) in modules() {
        let knows = file == "state/localconfig.rs"
            || file == "state/translate.rs"
            || file == "state/watch.rs"
            || file == "state/mod.rs";
        if module == "state" && !knows {
            for name in schema {
                assert!(!code.contains(name), "{file} names {name}");
            }
        }
    }
}
