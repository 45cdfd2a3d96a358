//! `kind_e2e --context <kubectl context> --debug-image <image with ss and iptables>`:
//! the in-cluster checks of `cargo xtask kind-e2e`, on a cluster where istiod and our
//! two charts are installed. Deploys sleep and httpbin into an ambient namespace and
//! checks what the specification's "Observing" section checks, with the assertions the
//! local suite makes (`e2e::observe`): the annotation, ztunnel's in-pod log lines, the
//! listeners and the rules inside the sleep pod, a request over mTLS with both
//! identities logged; then restarts ztunnel's and the agent's DaemonSets while a
//! prober sends requests, none of which may fail. Exit code 0 when all passed, 1 when
//! a check failed, 2 on bad arguments.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use e2e::kind::{request, Kubectl, Prober, APPS, NAMESPACE};
use e2e::observe;

const ISTIO_NS: &str = "istio-system";

/// Retries `f` for up to `within`.
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

fn checks(k: &Kubectl, debug_image: &str) -> Vec<(String, Result<String, String>)> {
    let mut results = Vec::new();
    let mut step = |name: &str, r: Result<String, String>| {
        println!(
            "{} {name}{}",
            if r.is_ok() { "ok  " } else { "FAIL" },
            match &r {
                Err(e) => format!(": {e}"),
                Ok(s) if !s.is_empty() => format!(": {s}"),
                Ok(_) => String::new(),
            }
        );
        let ok = r.is_ok();
        results.push((name.to_string(), r));
        ok
    };
    let ns_yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    istio.io/dataplane-mode: ambient\n"
    );
    let deployed = k
        .run_with_input(&["apply", "-f", "-"], Some(&ns_yaml))
        .and_then(|_| k.run_with_input(&["apply", "-n", NAMESPACE, "-f", "-"], Some(APPS)))
        .and_then(|_| {
            k.run(&[
                "wait",
                "-n",
                NAMESPACE,
                "--for=condition=Available",
                "deploy/sleep",
                "deploy/httpbin",
                "--timeout=300s",
            ])
        });
    if !step(
        "sleep and httpbin deployed in an ambient namespace",
        deployed,
    ) {
        return results;
    }
    let pods = k
        .pod_of(NAMESPACE, "sleep")
        .and_then(|s| Ok((s, k.pod_of(NAMESPACE, "httpbin")?)));
    let Ok((sleep, httpbin)) = pods else {
        step("pods found", pods.map(|_| String::new()));
        return results;
    };
    for pod in [&sleep, &httpbin] {
        let annotated = eventually(Duration::from_secs(60), || {
            let v = k.run(&[
                "get",
                "pod",
                "-n",
                NAMESPACE,
                pod,
                "-o",
                "jsonpath={.metadata.annotations.ambient\\.istio\\.io/redirection}",
            ])?;
            (v.trim() == "enabled")
                .then(String::new)
                .ok_or_else(|| format!("{pod}: ambient.istio.io/redirection is {v:?}"))
        });
        step("ambient.istio.io/redirection: enabled", annotated);
    }
    let ztunnel_log = || k.run(&["logs", "-n", ISTIO_NS, "-l", "app=ztunnel", "--tail=-1"]);
    step(
        "ztunnel's log: in-pod mode, both pods' netns received",
        eventually(Duration::from_secs(30), || {
            observe::check_inpod_log(&ztunnel_log()?, 2).map(|()| String::new())
        }),
    );
    step(
        "listeners on 15001, 15006, 15008 in the sleep pod",
        k.debug(NAMESPACE, &sleep, debug_image, "ss-check", &["ss", "-ntlp"])
            .and_then(|ss| observe::check_listeners(&ss).map(|()| String::new())),
    );
    step(
        "the specification's rules in the sleep pod",
        k.debug(
            NAMESPACE,
            &sleep,
            debug_image,
            "rules-check",
            &["sh", "-c", "iptables-nft-save; iptables-legacy-save"],
        )
        .and_then(|save| observe::check_rules(&save).map(|()| String::new())),
    );
    step(
        "sleep -> httpbin answers 200",
        eventually(Duration::from_secs(30), || {
            request(k, &sleep).map(|()| String::new())
        }),
    );
    let (src, dst) = (
        observe::spiffe("cluster.local", NAMESPACE, "sleep"),
        observe::spiffe("cluster.local", NAMESPACE, "httpbin"),
    );
    step(
        "mutual TLS: both identities in ztunnel's access log",
        eventually(Duration::from_secs(30), || {
            observe::check_mtls_access_log(&ztunnel_log()?, &src, &dst).map(|()| String::new())
        }),
    );
    for (ds, component) in [("ztunnel", "ztunnel"), ("istio-cni-node", "istio-cni")] {
        let prober = Prober::start(k.clone(), sleep.clone(), Duration::from_millis(200));
        let restarted = k
            .run(&["rollout", "restart", "-n", ISTIO_NS, &format!("ds/{ds}")])
            .and_then(|_| {
                k.run(&[
                    "rollout",
                    "status",
                    "-n",
                    ISTIO_NS,
                    &format!("ds/{ds}"),
                    "--timeout=300s",
                ])
            });
        std::thread::sleep(Duration::from_secs(5));
        let (attempted, failed) = prober.stop();
        step(
            &format!("{component} rollout restart: no request failed"),
            restarted.and_then(|_| {
                if attempted > 0 && failed == 0 {
                    Ok(format!("{attempted} requests"))
                } else {
                    Err(format!("{failed} of {attempted} requests failed"))
                }
            }),
        );
    }
    results
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut context, mut image) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--context" => context = it.next().cloned(),
            "--debug-image" => image = it.next().cloned(),
            other => {
                eprintln!("unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(context), Some(image)) = (context, image) else {
        eprintln!("usage: kind_e2e --context <kubectl context> --debug-image <image>");
        return ExitCode::from(2);
    };
    let results = checks(&Kubectl { context }, &image);
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    println!("{} passed, {failed} failed", results.len() - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
