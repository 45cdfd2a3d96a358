//! The agent's image carries every program the agent calls. These machines have no
//! container engine, so the image's root filesystem is assembled from the same Debian
//! packages as `docker/Dockerfile`'s agent stage (`cargo xtask setup`, debootstrap),
//! and the agent runs chrooted in it, with its chart's capabilities: it enrolls a pod
//! (iptables and ip6tables restore and save, ip rules and routes, the host probe
//! ipset) and takes it out again (conntrack), exactly as on the host. Root only.

use e2e::charts;
use e2e::cluster::{Cluster, AMBIENT};
use e2e::node::normalize_save;
use e2e::observe::{SPEC6_SAVE, SPEC_SAVE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_in_its_images_root_filesystem_enrolls_and_removes_a_pod() {
    let rootfs = charts::tool("agent-rootfs");
    let cluster = Cluster::new(79, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let pod = cluster.add_pod("demo", "sleep", &[]);
    let agent = cluster.start_agent_in_rootfs(1, &rootfs);
    let _zt = cluster.start_ztunnel(1);
    cluster.wait_annotation(&pod, Some("enabled"), &agent).await;
    assert_eq!(
        pod.iptables_save(),
        normalize_save(SPEC_SAVE),
        "{}",
        agent.logs()
    );
    assert_eq!(pod.ip6tables_save(), normalize_save(SPEC6_SAVE));
    assert!(pod.policy_routing().contains("lookup 100"));
    let probes = e2e::sh("ipset", &["list", &format!("{}-v4", cluster.probe_set)]);
    assert!(probes.contains(&pod.ip.to_string()), "{probes}");

    // Out of the mesh: rules, routes and probe entry removed by the same programs.
    cluster.label_pod(&pod, "istio.io/dataplane-mode", Some("none"));
    cluster.wait_annotation(&pod, None, &agent).await;
    assert!(!pod.iptables_save().contains("ISTIO"), "{}", agent.logs());
    assert!(!pod.ip6tables_save().contains("ISTIO"));
    let probes = e2e::sh("ipset", &["list", &format!("{}-v4", cluster.probe_set)]);
    assert!(!probes.contains(&pod.ip.to_string()), "{probes}");
    assert!(
        agent
            .lines(&["WARN"])
            .iter()
            .all(|l| !l.contains("No such file")),
        "{}",
        agent.logs()
    );
}

/// The agent binary is also the CNI plugin, which the container runtime runs on the
/// node, on the node's C library, whatever its age: as shipped it is linked statically
/// and runs in a root with nothing but itself. (`cargo xtask test` builds it so and
/// sets `E2E_AGENT_BIN`; the whole suite then runs that build.)
#[test]
fn the_cni_plugin_as_shipped_runs_with_no_c_library_at_all() {
    let Some(bin) = std::env::var_os("E2E_AGENT_BIN") else {
        panic!("E2E_AGENT_BIN is not set: run the suite with `cargo xtask test`, which builds the static agent");
    };
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&bin, root.path().join("istio-cni")).expect("copy");
    let run = |env: Option<(&str, &str)>, stdin: &str| {
        let mut cmd = std::process::Command::new("chroot");
        cmd.arg(root.path()).arg("/istio-cni");
        match env {
            Some((k, v)) => cmd.env(k, v),
            None => cmd.arg("version"),
        };
        e2e::output(&mut cmd, Some(stdin)).unwrap_or_else(|e| panic!("{e}"))
    };
    let version = run(None, "");
    assert!(version.contains("PluginEventVersion"), "{version}");
    let versions = run(
        Some(("CNI_COMMAND", "VERSION")),
        "{\"cniVersion\":\"1.0.0\"}",
    );
    assert!(versions.contains("\"supportedVersions\""), "{versions}");
}
