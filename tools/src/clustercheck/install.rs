//! Installing, upgrading and removing charts with helm, as docs/install.md tells an
//! operator: Istio's base and istiod from Istio's module, Istio's own istio-cni chart
//! (for the migration), and our two charts; only images' hubs and tags are set.

use std::process::Command;
use std::time::Instant;

use super::{apply, available, Run, ISTIO_NS};
use crate::incluster::{apps, NAMESPACE};

/// `helm <args>` against the cluster.
pub fn helm(r: &Run, args: &[&str]) -> Result<String, String> {
    e2e::output(
        Command::new(&r.m.helm)
            .arg("--kubeconfig")
            .arg(r.cluster.layout.kubeconfig("admin"))
            .args(args),
        None,
    )
}

/// An image reference's hub and tag (`localhost/ambient-inpod/ztunnel:0.1.0`).
pub fn hub_and_tag(reference: &str) -> Result<(String, String), String> {
    let (repo, tag) = reference
        .rsplit_once(':')
        .ok_or_else(|| format!("{reference} has no tag"))?;
    let (hub, _) = repo
        .rsplit_once('/')
        .ok_or_else(|| format!("{reference} has no hub"))?;
    Ok((hub.to_string(), tag.to_string()))
}

/// Our images' hub and tag.
pub fn ours(r: &Run) -> Result<(String, String), String> {
    r.m.image("ztunnel")
        .map_err(|e| e.to_string())
        .and_then(hub_and_tag)
}

/// Istio's images' hub and tag (without the `-distroless` variant its ambient
/// profile adds).
fn istios(r: &Run) -> Result<(String, String), String> {
    let (hub, tag) =
        r.m.image("pilot")
            .map_err(|e| e.to_string())
            .and_then(hub_and_tag)?;
    Ok((hub, tag.trim_end_matches("-distroless").to_string()))
}

/// One helm step in Istio's namespace, waited for (`--wait`), recorded as a check.
pub fn step(r: &mut Run, name: &str, args: &[&str]) -> bool {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--namespace", ISTIO_NS, "--wait", "--timeout", "5m"]);
    let started = Instant::now();
    let result =
        helm(r, &all).map(|_| format!("helm {} ({:.0?})", all.join(" "), started.elapsed()));
    r.check(name, result)
}

/// Istio's base chart and istiod (ambient profile).
pub fn control_plane(r: &mut Run) -> bool {
    let (hub, tag) = match istios(r) {
        Ok(v) => v,
        Err(e) => return r.check("Istio's images", Err(e)),
    };
    let base = r.m.istio_charts.join("base").display().to_string();
    let istiod =
        r.m.istio_charts
            .join("istio-control/istio-discovery")
            .display()
            .to_string();
    let (hub, tag) = (format!("global.hub={hub}"), format!("global.tag={tag}"));
    step(
        r,
        "helm install istio-base (Istio's base chart)",
        &["install", "istio-base", &base, "--create-namespace"],
    ) && step(
        r,
        "helm install istiod (Istio's istio-discovery chart, ambient profile)",
        &[
            "install",
            "istiod",
            &istiod,
            "--set",
            "profile=ambient",
            "--set",
            &hub,
            "--set",
            &tag,
        ],
    )
}

/// Istio's own istio-cni chart with Istio's agent (ambient profile; no DNS capture,
/// which our ztunnel does not serve yet), as a cluster running Istio has it. Istio's
/// agent runs in a pod network and enters the node's network namespace through
/// `/proc/1/ns/net`, which works here because each node has a PID namespace of its own
/// (see `realcluster::node`).
pub fn istio_cni(r: &mut Run) -> bool {
    let (hub, tag) = match istios(r) {
        Ok(v) => v,
        Err(e) => return r.check("Istio's images", Err(e)),
    };
    let chart = r.m.istio_charts.join("istio-cni").display().to_string();
    let (hub, tag) = (format!("global.hub={hub}"), format!("global.tag={tag}"));
    step(
        r,
        "helm install istio-cni (Istio's own chart and agent, ambient profile, ambient.dnsCapture=false)",
        &[
            "install",
            "istio-cni",
            &chart,
            "--set",
            "profile=ambient",
            "--set",
            "ambient.dnsCapture=false",
            "--set",
            &hub,
            "--set",
            &tag,
        ],
    )
}

/// `helm <verb> <release> <our chart>` (`install` or `upgrade`), with our images at
/// `tag` (the manifest's when `None`).
pub fn ours_step(r: &mut Run, verb: &str, release: &str, tag: Option<&str>) -> bool {
    let (hub, built) = match ours(r) {
        Ok(v) => v,
        Err(e) => return r.check("our images", Err(e)),
    };
    let chart = r.m.charts.join(release).display().to_string();
    let tag = tag.unwrap_or(&built);
    let (hub_v, tag_v) = (format!("hub={hub}"), format!("tag={tag}"));
    step(
        r,
        &format!("helm {verb} {release} (our chart, tag {tag})"),
        &[verb, release, &chart, "--set", &hub_v, "--set", &tag_v],
    )
}

/// `helm uninstall <release>`, waited for.
pub fn uninstall(r: &mut Run, release: &str) -> bool {
    step(
        r,
        &format!("helm uninstall {release}"),
        &["uninstall", release],
    )
}

/// The applications' namespace (labelled for ambient) and sleep and httpbin, on
/// different nodes.
pub fn applications(r: &mut Run) -> bool {
    let (curl, httpbin) = (r.image("curl"), r.image("go-httpbin"));
    let (n1, n2) = (r.node(0).name, r.node(1).name);
    let k = r.k();
    let ns = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    istio.io/dataplane-mode: ambient\n"
    );
    let result = apply(k, &ns)
        .and_then(|_| {
            k.run_with_input(
                &["apply", "-n", NAMESPACE, "-f", "-"],
                Some(&apps(&curl, &httpbin, Some((&n1, &n2)))),
            )
        })
        .and_then(|_| available(k, NAMESPACE, &["sleep", "httpbin"], "300s"))
        .and_then(|_| k.run(&["get", "pods", "-n", NAMESPACE, "-o", "wide"]));
    r.check(
        "sleep and httpbin started by the kubelets in an ambient namespace",
        result,
    )
}
