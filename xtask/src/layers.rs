//! Which of the workspace's crates may depend on which (the crates' part of the
//! architecture; inside ztunnel, `ztunnel/tests/architecture.rs` holds the modules'
//! part). Dependencies point one way: `protocol` at the bottom, the two binaries
//! beside each other, the charts' reader on its own, the stand-in servers on the
//! protocols they speak, the node harness on all of those, the user-facing tools on
//! top; `xtask` on none of them. Checked by a test, from `cargo metadata`.

/// Each workspace crate and the workspace crates it may depend on (normal and build
/// dependencies; a test's dev-dependencies may reach further up, never into a cycle
/// of normal dependencies).
pub const ALLOWED: [(&str, &[&str]); 8] = [
    ("protocol", &[]),
    ("istio-cni", &["protocol"]),
    ("ztunnel", &["protocol"]),
    ("charts", &[]),
    ("standins", &["charts", "protocol", "ztunnel"]),
    (
        "e2e",
        &["charts", "istio-cni", "protocol", "standins", "ztunnel"],
    ),
    (
        "tools",
        &["e2e", "istio-cni", "protocol", "standins", "ztunnel"],
    ),
    ("xtask", &[]),
];

/// From `cargo metadata --no-deps`: every dependency of a workspace crate on another
/// that [`ALLOWED`] does not allow, and every workspace crate it does not name.
pub fn violations(metadata: &serde_json::Value) -> Vec<String> {
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let ours: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut out = Vec::new();
    for p in &packages {
        let name = p["name"].as_str().unwrap_or("?");
        let Some((_, allowed)) = ALLOWED.iter().find(|(n, _)| *n == name) else {
            out.push(format!(
                "{name}: a workspace crate the layering does not name"
            ));
            continue;
        };
        let deps = p["dependencies"].as_array().cloned().unwrap_or_default();
        for d in deps {
            let dep = d["name"].as_str().unwrap_or("?");
            let dev = d["kind"].as_str() == Some("dev");
            if ours.contains(&dep) && !dev && !allowed.contains(&dep) {
                out.push(format!("{name} depends on {dep}, which it may not"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(crate::root())
            .output()
            .expect("cargo metadata");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON")
    }

    #[test]
    fn the_workspace_crates_depend_on_each_other_only_downwards() {
        assert_eq!(violations(&metadata()), Vec::<String>::new());
    }

    #[test]
    fn a_dependency_upwards_is_a_violation() {
        let m = serde_json::json!({"packages": [
            {"name": "protocol", "dependencies": []},
            {"name": "ztunnel", "dependencies": [
                {"name": "protocol", "kind": null},
                {"name": "istio-cni", "kind": null},
                {"name": "e2e", "kind": "dev"},
            ]},
            {"name": "istio-cni", "dependencies": [{"name": "protocol", "kind": null}]},
            {"name": "e2e", "dependencies": []},
            {"name": "newcomer", "dependencies": []},
        ]});
        assert_eq!(
            violations(&m),
            [
                "ztunnel depends on istio-cni, which it may not",
                "newcomer: a workspace crate the layering does not name"
            ]
        );
    }
}
