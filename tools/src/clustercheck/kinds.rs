//! Pods of every kind beside the mesh, on the client's node: a host-network pod in
//! the ambient namespace, a pod in an excluded namespace (kube-system, even labelled
//! ambient), a pod labelled `istio.io/dataplane-mode=none`, and a Job whose pod
//! completes. None may be blocked from starting; none but the Job's (in the ambient
//! namespace) may be captured; the Job's pod leaves the mesh when it completes.

use std::time::Duration;

use super::evidence::enrolled;
use super::{apply, available, eventually, Run, ISTIO_NS};
use crate::incluster::{client, job, request_from, Client, Kubectl, NAMESPACE};

/// Not captured: no redirection annotation, not among the pods the node's agent
/// enrolled.
fn uncaptured(k: &Kubectl, namespace: &str, pod: &str, node: &str) -> Result<String, String> {
    let note = k.jsonpath(
        namespace,
        &format!("pod/{pod}"),
        "{.metadata.annotations.ambient\\.istio\\.io/redirection}",
    )?;
    if !note.is_empty() {
        return Err(format!(
            "{namespace}/{pod} has ambient.istio.io/redirection={note}"
        ));
    }
    let pods = enrolled(k, node)?;
    if pods.iter().any(|(name, _)| name == pod) {
        return Err(format!("{node}'s agent has {namespace}/{pod} enrolled"));
    }
    Ok(format!(
        "{namespace}/{pod}: Running, no redirection annotation, not among the {} pods {node}'s agent enrolled",
        pods.len()
    ))
}

pub fn run(r: &mut Run) {
    r.report.part("pods of every kind beside the mesh");
    let k = r.k().clone();
    let node = r.node(0).name;
    let image = r.image("curl");
    let ambient = [("istio.io/dataplane-mode", "ambient")];
    let opted_out = [("istio.io/dataplane-mode", "none")];
    let pods = [
        (
            "a host-network pod in the ambient namespace",
            Client { name: "hostnet", namespace: NAMESPACE, host_network: true, ..Client::default() },
            false,
        ),
        (
            "a pod in an excluded namespace (kube-system), labelled istio.io/dataplane-mode=ambient",
            Client { name: "system", namespace: "kube-system", labels: &ambient, ..Client::default() },
            true,
        ),
        (
            "a pod labelled istio.io/dataplane-mode=none in the ambient namespace",
            Client { name: "optout", namespace: NAMESPACE, labels: &opted_out, ..Client::default() },
            true,
        ),
    ];
    for (what, c, asks) in pods {
        let c = Client {
            image: &image,
            node: Some(&node),
            ..c
        };
        let result = apply(&k, &client(&c))
            .and_then(|_| available(&k, c.namespace, &[c.name], "120s"))
            .and_then(|_| k.pod_of(c.namespace, c.name))
            .and_then(|pod| {
                let seen = uncaptured(&k, c.namespace, &pod, &node)?;
                if !asks {
                    return Ok(seen);
                }
                // Outside the mesh, plaintext to httpbin (PERMISSIVE) is answered.
                eventually(Duration::from_secs(30), || {
                    request_from(&k, c.namespace, &pod)
                })
                .map(|()| format!("{seen}; its plaintext request to httpbin answered 200"))
            });
        r.check(&format!("{what}: starts, not captured"), result);
        let _ = k.run(&[
            "delete",
            "deploy",
            "-n",
            c.namespace,
            c.name,
            "--wait=false",
        ]);
        let _ = k.run(&["delete", "serviceaccount", "-n", c.namespace, c.name]);
    }

    // A Job in the ambient namespace: captured while it runs, done, then gone.
    let result = apply(&k, &job("once", &image, Some(&node)))
        .and_then(|_| {
            k.run(&[
                "wait", "-n", NAMESPACE, "--for=condition=Complete", "job/once", "--timeout=120s",
            ])
        })
        .and_then(|_| {
            k.run(&[
                "get", "pod", "-n", NAMESPACE, "-l", "job-name=once", "-o",
                "jsonpath={.items[0].metadata.name} {.items[0].status.phase} {.items[0].metadata.annotations.ambient\\.istio\\.io/redirection}",
            ])
        })
        .and_then(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [pod, phase, ..] = f.as_slice() else {
                return Err(format!("the Job's pod: {line:?}"));
            };
            if *phase != "Succeeded" {
                return Err(format!("{pod}: phase {phase}"));
            }
            let pod = pod.to_string();
            // It was in the mesh: its ztunnel carried its request, over mTLS.
            let ztunnel = k.pod_on_node(ISTIO_NS, "app=ztunnel", &node)?;
            let carried = eventually(Duration::from_secs(20), || {
                let log = k.run(&["logs", "-n", ISTIO_NS, &ztunnel, "--tail=-1"])?;
                log.lines()
                    .find(|l| {
                        l.contains("connection complete")
                            && l.contains(&format!("src.workload=\"{pod}\""))
                            && l.contains("dst.identity=\"spiffe://")
                    })
                    .map(str::to_string)
                    .ok_or_else(|| format!("no access log line of {pod} on {ztunnel}"))
            })?;
            eventually(Duration::from_secs(30), || {
                let left = enrolled(&k, &node)?;
                if left.iter().any(|(n, _)| *n == pod) {
                    Err(format!("{pod} is still enrolled on {node} after completing"))
                } else {
                    Ok(format!(
                        "{pod}: Succeeded; its request went through ztunnel over mTLS:\n{carried}\n\
                         then it is no longer among {node}'s enrolled pods"
                    ))
                }
            })
        });
    r.check(
        "a Job's pod in the ambient namespace: captured, completes, leaves the mesh",
        result,
    );
    let _ = k.run(&["delete", "job", "-n", NAMESPACE, "once", "--wait=false"]);
}
