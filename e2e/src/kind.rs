//! The in-cluster half of `cargo xtask kind-e2e`: applications and checks on a real
//! cluster, through kubectl, with the assertions of [`crate::observe`] that the local
//! suite makes too.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The namespace the applications run in, labelled for ambient.
pub const NAMESPACE: &str = "ambient-demo";

/// `sleep` and `httpbin` as Istio's samples run them: each with its service account
/// (its SPIFFE identity), httpbin behind a Service on port 8000.
pub const APPS: &str = r#"apiVersion: v1
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
      containers:
        - name: sleep
          image: curlimages/curl:8.10.1
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
      containers:
        - name: httpbin
          image: mccutchen/go-httpbin:v2.15.0
          ports:
            - containerPort: 8080
"#;

/// kubectl against one context.
#[derive(Clone, Debug)]
pub struct Kubectl {
    pub context: String,
}

impl Kubectl {
    /// The argument list for `args` (context first).
    pub fn args(&self, args: &[&str]) -> Vec<String> {
        std::iter::once("--context".to_string())
            .chain(std::iter::once(self.context.clone()))
            .chain(args.iter().map(|a| a.to_string()))
            .collect()
    }

    /// Runs kubectl; stdout, or what it said on failure.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        self.run_with_input(args, None)
    }

    pub fn run_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        crate::output(Command::new("kubectl").args(self.args(args)), input)
    }

    /// The name of the first pod labelled `app=<app>` in `namespace`.
    pub fn pod_of(&self, namespace: &str, app: &str) -> Result<String, String> {
        let name = self.run(&[
            "get",
            "pod",
            "-n",
            namespace,
            "-l",
            &format!("app={app}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        if name.trim().is_empty() {
            Err(format!("no pod app={app} in {namespace}"))
        } else {
            Ok(name.trim().to_string())
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
            "--profile",
            "netadmin",
            "--container",
            name,
            "--",
        ];
        args.extend_from_slice(command);
        self.run(&args)?;
        for _ in 0..60 {
            let state = self.run(&[
                "get",
                "pod",
                "-n",
                namespace,
                pod,
                "-o",
                &format!(
                    "jsonpath={{.status.ephemeralContainerStatuses[?(@.name==\"{name}\")].state.terminated.reason}}"
                ),
            ])?;
            if !state.trim().is_empty() {
                return self.run(&["logs", "-n", namespace, pod, "-c", name]);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        Err(format!("debug container {name} in {pod} did not finish"))
    }
}

/// Requests from sleep to httpbin every `gap` while running: how many, how many failed.
pub struct Prober {
    stop: Arc<AtomicBool>,
    attempted: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One request from sleep to httpbin (the prober's and the mTLS check's): `Err` says
/// what went wrong, kubectl's failure or an HTTP status other than 200.
pub fn request(k: &Kubectl, sleep_pod: &str) -> Result<(), String> {
    let args = curl_args(sleep_pod);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let code = k.run(&args)?;
    if code.trim() == "200" {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// kubectl's arguments for [`request`].
pub fn curl_args(sleep_pod: &str) -> Vec<String> {
    [
        "exec",
        "-n",
        NAMESPACE,
        sleep_pod,
        "--",
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        "http://httpbin:8000/get",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Prober {
    pub fn start(kubectl: Kubectl, sleep_pod: String, gap: Duration) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let attempted = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, a, f) = (stop.clone(), attempted.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                a.fetch_add(1, Ordering::Relaxed);
                if request(&kubectl, &sleep_pod).is_err() {
                    f.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(gap);
            }
        });
        Prober {
            stop,
            attempted,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops probing; (attempted, failed).
    pub fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.attempted.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_applications_are_valid_manifests_with_their_own_identities() {
        let docs: Vec<Value> = serde_saphyr::from_multiple(APPS).unwrap();
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
        for app in ["sleep", "httpbin"] {
            let deploy = docs
                .iter()
                .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == app)
                .unwrap();
            assert_eq!(
                deploy["spec"]["template"]["spec"]["serviceAccountName"],
                app
            );
            assert_eq!(deploy["spec"]["template"]["metadata"]["labels"]["app"], app);
        }
        let svc = docs.iter().find(|d| d["kind"] == "Service").unwrap();
        assert_eq!(svc["spec"]["ports"][0]["port"], 8000);
    }

    #[test]
    fn kubectl_always_names_its_context() {
        let k = Kubectl {
            context: "kind-x".into(),
        };
        assert_eq!(
            k.args(&["get", "pods"]),
            ["--context", "kind-x", "get", "pods"]
        );
        let curl = curl_args("sleep-1").join(" ");
        assert!(curl.starts_with("exec -n ambient-demo sleep-1 -- curl"));
        assert!(curl.ends_with("http://httpbin:8000/get"));
    }
}
