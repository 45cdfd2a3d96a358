//! `istio-cni diagnose` on a node: healthy pods say so; each fault an operator meets
//! is named exactly, with a non-zero exit: a rule deleted by hand, a policy route gone,
//! ztunnel not knowing the pod, ztunnel killed (no listeners). ztunnel runs in its own
//! netns, as a ztunnel pod does, and diagnose reaches its localhost admin port through
//! the ZDS peer's pid. Kubernetes mode, real processes. Root only.

use std::process::Command;
use std::time::Duration;

use e2e::cluster::{Cluster, AMBIENT};
use e2e::{AgentProcess, Ztunnel};
use serde_json::Value;

/// A network namespace of its own for ztunnel; removed on drop.
struct OwnNetns(String);

impl OwnNetns {
    fn new(name: String) -> OwnNetns {
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        e2e::sh("ip", &["netns", "add", &name]);
        e2e::sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        OwnNetns(name)
    }
}

impl Drop for OwnNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Run {
    code: Option<i32>,
    out: String,
}

async fn diagnose(agent: &AgentProcess, args: &[&str]) -> Run {
    let addr = agent
        .listening_addr("debug endpoint listening")
        .await
        .to_string();
    let mut cmd = Command::new(e2e::bin_path("istio-cni"));
    cmd.env_remove("CNI_COMMAND")
        .args(["diagnose", "--agent", &addr])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run diagnose"))
        .await
        .unwrap();
    Run {
        code: out.status.code(),
        out: String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr),
    }
}

async fn diagnose_json(agent: &AgentProcess, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let run = diagnose(agent, &all).await;
    let v = serde_json::from_str(&run.out).unwrap_or_else(|e| panic!("{e}: {}", run.out));
    (run.code, v)
}

fn problems(v: &Value) -> Vec<String> {
    v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["problems"].as_array().unwrap().clone())
        .map(|p| p["what"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_says_healthy_and_names_each_fault() {
    let cluster = Cluster::new(46, false).await;
    cluster.namespace("demo", &[AMBIENT]);
    let a = cluster.add_pod("demo", "sleep", &[]);
    let b = cluster.add_pod("demo", "httpbin", &[]);
    // No periodic repair: the faults must stay for diagnose to see them.
    let agent = cluster.start_agent_with(1, |cmd| {
        cmd.env("DRIFT_CHECK_INTERVAL", "0");
    });
    let ztunnel_netns = OwnNetns::new(format!("zt{}-ztunnel", cluster.node.id));
    let mut zt = Ztunnel::start_in_netns(&cluster.node, 1, &ztunnel_netns.0);
    for pod in [&a, &b] {
        cluster.wait_annotation(pod, Some("enabled"), &agent).await;
    }

    // Healthy: exit 0, every check shown.
    let run = diagnose(&agent, &[]).await;
    assert_eq!(run.code, Some(0), "{}", run.out);
    assert_eq!(
        run.out.matches("verdict     HEALTHY").count(),
        2,
        "{}",
        run.out
    );
    assert!(run.out.contains("pod demo/sleep"), "{}", run.out);
    assert!(
        run.out.contains("rules       as expected")
            && run.out.contains(&format!("15001 ztunnel[{}]", zt.pid()))
            && run.out.contains(&format!(
                "in the netns of ztunnel (pid {}): proxy Up",
                zt.pid()
            )),
        "{}",
        run.out
    );
    let (code, v) = diagnose_json(&agent, &["demo/sleep"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(v["healthy"], true);
    assert_eq!(v["pods"].as_array().unwrap().len(), 1);
    assert_eq!(v["pods"][0]["pod"]["uid"], a.uid.as_str());
    assert_eq!(v["pods"][0]["ztunnel"]["status"], "known");

    // A rule deleted by hand in a: named exactly, exit 1; b is still healthy.
    let rule = a.delete_outbound_redirect();
    let (code, v) = diagnose_json(&agent, &["sleep"]).await;
    assert_eq!(code, Some(1));
    assert_eq!(
        problems(&v),
        vec![format!("redirection drifted: IPv4 missing: nat: -A {rule}")]
    );
    let run = diagnose(&agent, &["demo/httpbin"]).await;
    assert_eq!(run.code, Some(0), "{}", run.out);

    // b's policy route removed.
    b.delete_policy_route();
    let (code, v) = diagnose_json(&agent, &["demo/httpbin"]).await;
    assert_eq!(code, Some(1));
    assert_eq!(
        problems(&v),
        vec!["redirection drifted: IPv4 missing: ip route local 0.0.0.0/0 dev lo table 100"]
    );

    // A ztunnel that does not know the pods (pointed at explicitly).
    let stranger = Ztunnel::start_with(&cluster.node, 2, |cmd| {
        cmd.env("PASSTHROUGH_ONLY", "true")
            .env("INPOD_UDS", "/nonexistent/ztunnel.sock");
    });
    let admin = stranger.admin_addr().await.to_string();
    let (code, v) = diagnose_json(&agent, &["--ztunnel-admin", &admin, &b.uid]).await;
    assert_eq!(code, Some(1));
    let found = problems(&v);
    assert!(
        found.contains(&format!(
            "ztunnel (admin {admin}) has no proxy for this pod"
        )),
        "{found:?}"
    );

    // ztunnel killed: no listeners in the pods, nobody connected.
    zt.kill();
    agent.wait_for(&["ztunnel disconnected"], 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let run = diagnose(&agent, &["demo/sleep"]).await;
    assert_eq!(run.code, Some(1), "{}", run.out);
    for port in [
        "15001 (outbound)",
        "15006 (inbound plaintext)",
        "15008 (inbound HBONE)",
    ] {
        assert!(
            run.out
                .contains(&format!("nothing listens on {port} in the pod")),
            "{}",
            run.out
        );
    }
    assert!(
        run.out.contains("no ztunnel is connected to the agent"),
        "{}",
        run.out
    );
    assert!(run.out.contains("next: "), "{}", run.out);

    // Bad input: an unknown pod, an agent that is not there.
    let run = diagnose(&agent, &["demo/nope"]).await;
    assert_eq!(run.code, Some(2), "{}", run.out);
    assert!(
        run.out.contains("no enrolled pod matches \"demo/nope\""),
        "{}",
        run.out
    );
    let mut cmd = Command::new(e2e::bin_path("istio-cni"));
    let out = cmd
        .args(["diagnose", "--agent", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot ask the agent at 127.0.0.1:1"));
}
