//! `helm upgrade` of both our charts to a new image tag, as an operator rolls out a
//! new release: istio-cni first, then ztunnel (docs/install.md's order), under a prober
//! in the client pod and a capture on the client's node link. No pod may lose
//! capture, nothing may cross in the clear, and requests may fail only while a
//! ztunnel restarts, within [`ZTUNNEL_RESTART_BOUND`].

use std::time::{Duration, Instant};

use super::dayone::within_bound;
use super::evidence::{self, capture, only_tls_to_15008};
use super::{
    annotation_becomes, eventually, install, running_prober, Run, ISTIO_NS, ZTUNNEL_RESTART_BOUND,
};
use crate::incluster::NAMESPACE;
use crate::realcluster::node;

pub fn run(r: &mut Run) {
    r.report
        .part("helm upgrade of both our charts to a new image tag");
    let k = r.k().clone();
    let (hub, tag) = match install::ours(r) {
        Ok(v) => v,
        Err(e) => {
            r.check("our images", Err(e));
            return;
        }
    };
    // There is no registry: the new tag is given to the same images on every node.
    let next = format!("{tag}-next");
    let tagged: Result<Vec<String>, String> = ["ztunnel", "istio-cni"]
        .iter()
        .flat_map(|image| r.cluster.nodes.iter().map(move |n| (image, n)))
        .map(|(image, n)| {
            let (from, to) = (
                format!("{hub}/{image}:{tag}"),
                format!("{hub}/{image}:{next}"),
            );
            node::tag_image(n, &from, &to)
                .map(|()| format!("{}: {to}", n.spec.name))
                .map_err(|e| e.to_string())
        })
        .collect();
    if !r.check(
        "the new tag on every node's containerd",
        tagged.map(|t| t.join("\n")),
    ) {
        return;
    }
    let Ok((sleep, httpbin)) = r.pods() else {
        r.check("the applications' pods", Err("not found".into()));
        return;
    };
    let Ok(httpbin_ip) = evidence::pod_ip(&k, &httpbin) else {
        r.check("httpbin's address", Err("none".into()));
        return;
    };
    let cap = capture(
        &r.node(0),
        &format!("host {httpbin_ip}"),
        &r.captures(),
        "upgrade",
    );
    let prober = match running_prober(&k, &sleep, 600) {
        Ok(p) => p,
        Err(e) => {
            r.check("a prober in sleep", Err(e));
            return;
        }
    };
    let started = Instant::now();
    let upgraded = install::ours_step(r, "upgrade", "istio-cni", Some(&next))
        && install::ours_step(r, "upgrade", "ztunnel", Some(&next));
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let probes = prober.stop();
    if !upgraded {
        return;
    }
    r.check(
        "both DaemonSets run the new tag",
        ["istio-cni-node", "ztunnel"]
            .iter()
            .map(|ds| {
                let images = k.run(&[
                    "get", "pod", "-n", ISTIO_NS, "-l", &selector(ds), "-o",
                    "jsonpath={range .items[*]}{.metadata.name} {.spec.containers[0].image} {.status.phase}{\"\\n\"}{end}",
                ])?;
                let stale: Vec<&str> = images.lines().filter(|l| !l.contains(&next) || !l.ends_with("Running")).collect();
                if stale.is_empty() && !images.trim().is_empty() {
                    Ok(images)
                } else {
                    Err(format!("not every {ds} pod runs {next}:\n{images}"))
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.concat()),
    );
    r.check(
        "the upgrade under a prober: requests unanswered only while a ztunnel restarts",
        within_bound(
            &probes,
            Some(ZTUNNEL_RESTART_BOUND),
            &format!("both charts upgraded in {took:.0?}"),
        ),
    );
    r.check(
        "the upgrade: everything to or from httpbin was TLS to 15008",
        only_tls_to_15008(cap, &httpbin_ip, false),
    );
    for pod in [&sleep, &httpbin] {
        r.check(
            "after the upgrade the pod keeps its redirection",
            annotation_becomes(&k, NAMESPACE, pod, "enabled", Duration::from_secs(10)),
        );
    }
    for i in 0..r.cluster.nodes.len() {
        let name = r.node(i).name;
        r.check(
            &format!("no pod lost capture on {name}: istio-cni diagnose finds every pod healthy"),
            eventually(Duration::from_secs(30), || {
                evidence::diagnose(&k, &name, None)
            }),
        );
    }
}

fn selector(ds: &str) -> String {
    if ds == "ztunnel" {
        "app=ztunnel".into()
    } else {
        "k8s-app=istio-cni-node".into()
    }
}
