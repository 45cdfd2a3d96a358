//! Acting on a real cluster as its user does, through `kubectl`: the sample
//! applications, requests between them, a debug container in a pod, and a prober
//! that sends requests from inside the client pod and records each answer with its
//! time. `cargo xtask cluster-e2e` (`tools/src/bin/cluster_e2e.rs`) makes its checks
//! with these and with the assertions of [`e2e::observe`] that the local suite
//! makes too.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The namespace the applications run in, labelled for ambient.
pub const NAMESPACE: &str = "ambient-demo";

/// `sleep` (a client with curl) and `httpbin` (an echo server on 8080 behind a
/// Service on 8000) as Istio's samples run them, each with its own service account
/// (its SPIFFE identity); `nodes` (sleep's, httpbin's) places them, so that their
/// traffic crosses from one node to the other.
pub fn apps(sleep_image: &str, httpbin_image: &str, nodes: Option<(&str, &str)>) -> String {
    let placement = |node: Option<&str>| {
        node.map(|n| format!("      nodeSelector:\n        kubernetes.io/hostname: {n}\n"))
            .unwrap_or_default()
    };
    let (sleep_node, httpbin_node) = match nodes {
        Some((s, h)) => (Some(s), Some(h)),
        None => (None, None),
    };
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: sleep
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: sleep
spec:
  replicas: 1
  selector:
    matchLabels:
      app: sleep
  template:
    metadata:
      labels:
        app: sleep
    spec:
      serviceAccountName: sleep
      terminationGracePeriodSeconds: 0
{sleep_placement}      containers:
        - name: sleep
          image: {sleep_image}
          imagePullPolicy: IfNotPresent
          command: ["/bin/sleep", "infinity"]
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: httpbin
---
apiVersion: v1
kind: Service
metadata:
  name: httpbin
  labels:
    app: httpbin
spec:
  selector:
    app: httpbin
  ports:
    - name: http
      port: 8000
      targetPort: 8080
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: httpbin
spec:
  replicas: 1
  selector:
    matchLabels:
      app: httpbin
  template:
    metadata:
      labels:
        app: httpbin
    spec:
      serviceAccountName: httpbin
{httpbin_placement}      containers:
        - name: httpbin
          image: {httpbin_image}
          imagePullPolicy: IfNotPresent
          ports:
            - containerPort: 8080
          # The kubelet's probes reach an enrolled pod through the host probe rules
          # (under STRICT mTLS they could not go through ztunnel).
          readinessProbe:
            httpGet:
              path: /get
              port: 8080
            periodSeconds: 2
            failureThreshold: 2
"#,
        sleep_placement = placement(sleep_node),
        httpbin_placement = placement(httpbin_node),
    )
}

/// kubectl (a given binary) against one cluster (a kubeconfig).
#[derive(Clone, Debug)]
pub struct Kubectl {
    pub program: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    /// The command for `args`, with the kubeconfig named first.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd
    }

    /// Runs kubectl; stdout, or what it said on failure.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        self.run_with_input(args, None)
    }

    pub fn run_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        e2e::output(&mut self.command(args), input)
    }

    /// A jsonpath of one object.
    pub fn jsonpath(&self, namespace: &str, object: &str, path: &str) -> Result<String, String> {
        self.run(&[
            "get",
            "-n",
            namespace,
            object,
            "-o",
            &format!("jsonpath={path}"),
        ])
        .map(|s| s.trim().to_string())
    }

    /// The name of the first pod labelled `app=<app>` in `namespace`.
    pub fn pod_of(&self, namespace: &str, app: &str) -> Result<String, String> {
        self.first_pod(namespace, &format!("app={app}"), None)
    }

    /// The name of the first pod matching `selector` in `namespace` that runs on
    /// `node` (a DaemonSet's pod there).
    pub fn pod_on_node(
        &self,
        namespace: &str,
        selector: &str,
        node: &str,
    ) -> Result<String, String> {
        self.first_pod(namespace, selector, Some(node))
    }

    fn first_pod(
        &self,
        namespace: &str,
        selector: &str,
        node: Option<&str>,
    ) -> Result<String, String> {
        let on_node = node.map(|n| format!("spec.nodeName={n}"));
        let mut args = vec!["get", "pod", "-n", namespace, "-l", selector];
        if let Some(field) = &on_node {
            args.extend(["--field-selector", field.as_str()]);
        }
        args.extend(["-o", "jsonpath={.items[0].metadata.name}"]);
        let name = self.run(&args)?;
        match name.trim() {
            "" => Err(format!(
                "no pod {selector} in {namespace}{}",
                node.map(|n| format!(" on {n}")).unwrap_or_default()
            )),
            name => Ok(name.to_string()),
        }
    }

    /// Runs `command` in an ephemeral debug container (netadmin profile: it shares
    /// the pod's network namespace and may read its rules) and returns its output.
    pub fn debug(
        &self,
        namespace: &str,
        pod: &str,
        image: &str,
        name: &str,
        command: &[&str],
    ) -> Result<String, String> {
        let mut args = vec![
            "debug",
            "-n",
            namespace,
            pod,
            "--image",
            image,
            "--image-pull-policy",
            "IfNotPresent",
            "--profile",
            "netadmin",
            "--container",
            name,
            "--",
        ];
        args.extend_from_slice(command);
        self.run(&args)?;
        for _ in 0..90 {
            let state = self.jsonpath(
                namespace,
                &format!("pod/{pod}"),
                &format!(
                    "{{.status.ephemeralContainerStatuses[?(@.name==\"{name}\")].state.terminated.reason}}"
                ),
            )?;
            if !state.is_empty() {
                return self.run(&["logs", "-n", namespace, pod, "-c", name]);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        Err(format!("debug container {name} in {pod} did not finish"))
    }
}

/// A client: one pod of a curl image, with a service account of its own (its
/// identity), placed on a node; it runs `script` (a shell script) or sleeps.
#[derive(Clone, Debug, Default)]
pub struct Client<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub image: &'a str,
    pub node: Option<&'a str>,
    /// Pod labels besides `app: <name>`.
    pub labels: &'a [(&'a str, &'a str)],
    pub script: Option<&'a str>,
    pub host_network: bool,
}

/// A shell script that asks httpbin every half second from the moment the container
/// starts, printing each answer's time and status (`000`: none).
pub const EARLY_REQUESTS: &str = "while true; do echo \"$(date +%s%3N) $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://httpbin.ambient-demo:8000/get)\"; sleep 0.5; done";

/// The manifest of `c`: its service account and a Deployment of one pod.
pub fn client(c: &Client) -> String {
    let labels: String = c
        .labels
        .iter()
        .map(|(k, v)| format!("        {k}: \"{v}\"\n"))
        .collect();
    let placement = c
        .node
        .map(|n| format!("      nodeSelector:\n        kubernetes.io/hostname: {n}\n"))
        .unwrap_or_default();
    let host_network = if c.host_network {
        "      hostNetwork: true\n"
    } else {
        ""
    };
    let command = match c.script {
        Some(script) => format!("[\"/bin/sh\", \"-c\", {}]", serde_json::json!(script)),
        None => "[\"/bin/sleep\", \"infinity\"]".to_string(),
    };
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: {name}
  namespace: {namespace}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {namespace}
spec:
  replicas: 1
  selector:
    matchLabels:
      app: {name}
  template:
    metadata:
      labels:
        app: {name}
{labels}    spec:
      serviceAccountName: {name}
      terminationGracePeriodSeconds: 0
{placement}{host_network}      containers:
        - name: client
          image: {image}
          imagePullPolicy: IfNotPresent
          command: {command}
"#,
        name = c.name,
        namespace = c.namespace,
        image = c.image,
    )
}

/// A Job of one pod that asks httpbin (retrying while the mesh sets it up) and exits
/// (0 on a 200).
pub fn job(name: &str, image: &str, node: Option<&str>) -> String {
    let placement = node
        .map(|n| format!("      nodeSelector:\n        kubernetes.io/hostname: {n}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  backoffLimit: 0
  template:
    metadata:
      labels:
        app: {name}
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 0
{placement}      containers:
        - name: once
          image: {image}
          imagePullPolicy: IfNotPresent
          command: ["curl", "-sS", "-f", "--retry", "5", "--retry-all-errors", "--max-time", "5", "-o", "/dev/null", "http://httpbin:8000/get"]
"#
    )
}

/// The URL the client asks for: httpbin through its Service.
pub const URL: &str = "http://httpbin:8000/get";

/// One request from sleep to httpbin: `Err` says what went wrong (kubectl's failure,
/// curl's, or an HTTP status other than 200).
pub fn request(k: &Kubectl, sleep_pod: &str) -> Result<(), String> {
    request_from(k, NAMESPACE, sleep_pod)
}

/// One request to httpbin from any pod with curl, in `namespace`.
pub fn request_from(k: &Kubectl, namespace: &str, pod: &str) -> Result<(), String> {
    let url = format!("http://httpbin.{NAMESPACE}:8000/get");
    let code = k.run(&[
        "exec",
        "-n",
        namespace,
        pod,
        "--",
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        &url,
    ])?;
    if code.trim() == "200" {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// One answer the prober got: when (ms since the epoch, the pod's clock, which is
/// the machine's) and the HTTP status (`000`: no answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub at_ms: u64,
    pub code: u16,
}

/// The shell loop the prober runs in the client pod for at most `seconds`: one
/// request every `gap_ms`, each printed as `<ms> <status>`.
pub fn probe_script(seconds: u64, gap_ms: u64) -> String {
    format!(
        "end=$(( $(date +%s) + {seconds} )); \
         while [ $(date +%s) -lt $end ]; do \
         c=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 2 {URL}); \
         echo \"$(date +%s%3N) $c\"; sleep {gap}; done",
        gap = gap_ms as f64 / 1000.0
    )
}

/// Parses one line of [`probe_script`]'s output.
pub fn parse_probe(line: &str) -> Option<Probe> {
    let mut f = line.split_whitespace();
    let at_ms = f.next()?.parse().ok()?;
    let code = f.next()?.parse().ok()?;
    Some(Probe { at_ms, code })
}

/// Requests from inside the client pod, every answer recorded with its time (one
/// `kubectl exec` for the whole run, so a request's time is the pod's, not kubectl's).
pub struct Prober {
    child: std::process::Child,
    probes: Arc<Mutex<Vec<Probe>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    /// Starts probing for at most `seconds`.
    pub fn start(k: &Kubectl, sleep_pod: &str, seconds: u64) -> Result<Prober, String> {
        let script = probe_script(seconds, 200);
        let mut child = k
            .command(&[
                "exec", "-n", NAMESPACE, sleep_pod, "--", "sh", "-c", &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("kubectl exec: {e}"))?;
        let stdout = child.stdout.take().ok_or("kubectl exec: no stdout")?;
        let probes = Arc::new(Mutex::new(Vec::new()));
        let sink = probes.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(p) = parse_probe(&line) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(p);
                }
            }
        });
        Ok(Prober {
            child,
            probes,
            reader: Some(reader),
        })
    }

    /// How many answers so far.
    pub fn count(&self) -> usize {
        self.probes.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops probing; every answer, in order.
    pub fn stop(mut self) -> Vec<Probe> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        probes.clone()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a run of probes shows: how many, how many failed, and the longest stretch
/// without an answered request (from the last success before a failure to the first
/// success after it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outage {
    pub total: usize,
    pub failed: usize,
    pub longest_ms: u64,
}

pub fn outage(probes: &[Probe]) -> Outage {
    let failed = probes.iter().filter(|p| p.code != 200).count();
    let mut longest = 0;
    let mut last_ok: Option<u64> = probes.first().map(|p| p.at_ms);
    let mut in_failure = false;
    for p in probes {
        if p.code == 200 {
            if in_failure {
                if let Some(start) = last_ok {
                    longest = longest.max(p.at_ms.saturating_sub(start));
                }
            }
            in_failure = false;
            last_ok = Some(p.at_ms);
        } else {
            in_failure = true;
        }
    }
    if in_failure {
        // Never recovered: the stretch runs to the end.
        if let (Some(start), Some(end)) = (last_ok, probes.last()) {
            longest = longest.max(end.at_ms.saturating_sub(start));
        }
    }
    Outage {
        total: probes.len(),
        failed,
        longest_ms: longest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_applications_are_valid_manifests_with_their_own_identities() {
        let text = apps("reg/curl:1", "reg/httpbin:2", Some(("w1", "w2")));
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "Deployment",
                "ServiceAccount",
                "Service",
                "Deployment"
            ]
        );
        for (app, image, node) in [
            ("sleep", "reg/curl:1", "w1"),
            ("httpbin", "reg/httpbin:2", "w2"),
        ] {
            let deploy = docs
                .iter()
                .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == app)
                .unwrap();
            let spec = &deploy["spec"]["template"]["spec"];
            assert_eq!(spec["serviceAccountName"], app);
            assert_eq!(spec["containers"][0]["image"], image);
            assert_eq!(spec["nodeSelector"]["kubernetes.io/hostname"], node);
            assert_eq!(deploy["spec"]["template"]["metadata"]["labels"]["app"], app);
        }
        let svc = docs.iter().find(|d| d["kind"] == "Service").unwrap();
        assert_eq!(svc["spec"]["ports"][0]["port"], 8000);
        let unplaced: Vec<Value> = serde_saphyr::from_multiple(&apps("a", "b", None)).unwrap();
        assert!(unplaced
            .iter()
            .all(|d| d["spec"]["template"]["spec"]["nodeSelector"].is_null()));
    }

    #[test]
    fn clients_and_jobs_are_valid_manifests() {
        let text = client(&Client {
            name: "early",
            namespace: NAMESPACE,
            image: "reg/curl:1",
            node: Some("w1"),
            labels: &[("istio.io/dataplane-mode", "none")],
            script: Some(EARLY_REQUESTS),
            host_network: true,
        });
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        let pod = &docs[1]["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
        assert_eq!(pod["spec"]["hostNetwork"], true);
        assert_eq!(pod["spec"]["serviceAccountName"], "early");
        assert_eq!(pod["spec"]["containers"][0]["command"][2], EARLY_REQUESTS);
        let plain = client(&Client {
            name: "c",
            namespace: "x",
            image: "i",
            ..Client::default()
        });
        let plain: Vec<Value> = serde_saphyr::from_multiple(&plain).unwrap();
        assert_eq!(
            plain[1]["spec"]["template"]["spec"]["containers"][0]["command"][0],
            "/bin/sleep"
        );
        let j: Value = serde_saphyr::from_str(&job("once", "reg/curl:1", Some("w2"))).unwrap();
        assert_eq!(j["spec"]["template"]["spec"]["restartPolicy"], "Never");
        assert_eq!(
            j["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"],
            "w2"
        );
    }

    #[test]
    fn kubectl_always_names_its_kubeconfig() {
        let k = Kubectl {
            program: "/bin/kubectl".into(),
            kubeconfig: "/k/admin.kubeconfig".into(),
        };
        let cmd = k.command(&["get", "pods"]);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["--kubeconfig", "/k/admin.kubeconfig", "get", "pods"]);
    }

    #[test]
    fn probes_parse_and_an_outage_is_measured_from_success_to_success() {
        assert_eq!(
            parse_probe("1700000000123 200"),
            Some(Probe {
                at_ms: 1700000000123,
                code: 200
            })
        );
        assert_eq!(parse_probe("garbage"), None);
        let p = |at_ms, code| Probe { at_ms, code };
        let run = [
            p(0, 200),
            p(200, 200),
            p(400, 0),
            p(2400, 503),
            p(2600, 200),
            p(2800, 200),
        ];
        assert_eq!(
            outage(&run),
            Outage {
                total: 6,
                failed: 2,
                longest_ms: 2400
            }
        );
        let clean = [p(0, 200), p(200, 200)];
        assert_eq!(outage(&clean).failed, 0);
        assert_eq!(outage(&clean).longest_ms, 0);
        let never = [p(0, 200), p(200, 0), p(5000, 0)];
        assert_eq!(outage(&never).longest_ms, 5000);
        assert!(probe_script(30, 200).contains("sleep 0.2"));
    }
}
