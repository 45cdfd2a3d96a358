//! The control plane as processes on the host: etcd (client and peer TLS with client
//! certificates), kube-apiserver (RBAC and the Node authorizer, NodeRestriction,
//! service-account tokens signed with the cluster's key, TLS to etcd and to the
//! kubelets, whose serving certificates it verifies), kube-controller-manager and
//! kube-scheduler (each with its own identity), as kubeadm sets them up.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::pki::{kubeconfig, Ca, CertSpec, Usage};
use super::{
    daemon, wait_for, Components, Error, Layout, Result, API_PORT, CLUSTER_DOMAIN, HOST_IP,
    KUBERNETES_SERVICE_IP, SERVICE_CIDR,
};

/// The API server's URL, from the host and from the nodes.
pub fn api_url() -> String {
    format!("https://{HOST_IP}:{API_PORT}")
}

/// Every certificate and kubeconfig of the control plane, written under the layout.
pub struct Credentials {
    pub ca: Ca,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

/// Makes the CA, the control plane's certificates, the service-account keys and the
/// kubeconfigs of the administrator, the controller manager and the scheduler.
pub fn credentials(layout: &Layout) -> Result<Credentials> {
    let ca = Ca::create(&layout.pki())?;
    let local: IpAddr = "127.0.0.1".parse().map_err(|_| Error::Setup("ip".into()))?;
    ca.issue(&CertSpec::server(
        "etcd-server",
        &["localhost"],
        &[local],
        Usage::Both,
    ))?;
    ca.issue(&CertSpec::client(
        "apiserver-etcd-client",
        "kube-apiserver-etcd-client",
        &[],
    ))?;
    let svc = format!("kubernetes.default.svc.{CLUSTER_DOMAIN}");
    ca.issue(&CertSpec::server(
        "apiserver",
        &[
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            &svc,
            "localhost",
        ],
        &[KUBERNETES_SERVICE_IP.into(), HOST_IP.into(), local],
        Usage::Server,
    ))?;
    ca.issue(&CertSpec::client(
        "apiserver-kubelet-client",
        "kube-apiserver-kubelet-client",
        &["system:masters"],
    ))?;
    let (sa_key, sa_pub) = ca.service_account_keys()?;
    for (name, user, groups) in [
        ("admin", "kubernetes-admin", &["system:masters"][..]),
        (
            "controller-manager",
            "system:kube-controller-manager",
            &[][..],
        ),
        ("scheduler", "system:kube-scheduler", &[][..]),
    ] {
        let issued = ca.issue(&CertSpec::client(name, user, groups))?;
        let path = layout.kubeconfig(name);
        let text = kubeconfig(&api_url(), ca.cert_pem(), user, &issued);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(Credentials { ca, sa_key, sa_pub })
}

fn arg(flag: &str, value: impl AsRef<std::ffi::OsStr>) -> [std::ffi::OsString; 2] {
    [flag.into(), value.as_ref().to_os_string()]
}

/// Starts etcd, the API server, the controller manager and the scheduler, and waits
/// until the API server answers ready.
pub fn start(layout: &Layout, components: &Components, creds: &Credentials) -> Result<()> {
    let ca = creds.ca.cert_path();
    let (etcd_crt, etcd_key) = creds.ca.files("etcd-server");
    let mut etcd = Command::new(components.bin("etcd")?);
    etcd.args(["--name", "default"])
        .args(arg("--data-dir", layout.root.join("etcd")))
        .args([
            "--listen-client-urls",
            "https://127.0.0.1:2379",
            "--advertise-client-urls",
            "https://127.0.0.1:2379",
            "--listen-peer-urls",
            "https://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "https://127.0.0.1:2380",
            "--initial-cluster",
            "default=https://127.0.0.1:2380",
            "--initial-cluster-state",
            "new",
            "--listen-metrics-urls",
            "http://127.0.0.1:2381",
            "--client-cert-auth",
            "--peer-client-cert-auth",
        ])
        .args(arg("--cert-file", &etcd_crt))
        .args(arg("--key-file", &etcd_key))
        .args(arg("--trusted-ca-file", &ca))
        .args(arg("--peer-cert-file", &etcd_crt))
        .args(arg("--peer-key-file", &etcd_key))
        .args(arg("--peer-trusted-ca-file", &ca));
    daemon::spawn(layout, "etcd", etcd)?;

    let (api_crt, api_key) = creds.ca.files("apiserver");
    let (etcd_client_crt, etcd_client_key) = creds.ca.files("apiserver-etcd-client");
    let (kubelet_client_crt, kubelet_client_key) = creds.ca.files("apiserver-kubelet-client");
    let mut api = Command::new(components.bin("kube-apiserver")?);
    api.args(["--advertise-address", &HOST_IP.to_string()])
        .args(["--bind-address", &HOST_IP.to_string()])
        .args(["--secure-port", &API_PORT.to_string()])
        .args(["--etcd-servers", "https://127.0.0.1:2379"])
        .args(arg("--etcd-cafile", &ca))
        .args(arg("--etcd-certfile", &etcd_client_crt))
        .args(arg("--etcd-keyfile", &etcd_client_key))
        .args(arg("--client-ca-file", &ca))
        .args(arg("--tls-cert-file", &api_crt))
        .args(arg("--tls-private-key-file", &api_key))
        .args(arg("--kubelet-client-certificate", &kubelet_client_crt))
        .args(arg("--kubelet-client-key", &kubelet_client_key))
        .args(arg("--kubelet-certificate-authority", &ca))
        .args(["--kubelet-preferred-address-types", "InternalIP"])
        .args([
            "--service-account-issuer",
            &format!("https://kubernetes.default.svc.{CLUSTER_DOMAIN}"),
        ])
        .args(arg("--service-account-key-file", &creds.sa_pub))
        .args(arg("--service-account-signing-key-file", &creds.sa_key))
        .args(["--service-cluster-ip-range", SERVICE_CIDR])
        .args(["--authorization-mode", "Node,RBAC"])
        .args(["--enable-admission-plugins", "NodeRestriction"])
        .arg("--allow-privileged=true")
        // Webhooks and aggregated APIs are called at their endpoints' addresses (the
        // host has no kube-proxy rules for service addresses).
        .arg("--enable-aggregator-routing=true")
        .arg("--profiling=false");
    daemon::spawn(layout, "kube-apiserver", api)?;

    let admin = layout.kubeconfig("admin");
    let kubectl = components.bin("kubectl")?;
    wait_for(
        "kube-apiserver to answer /readyz",
        Duration::from_secs(90),
        Duration::from_millis(500),
        || {
            e2e::output(
                Command::new(&kubectl)
                    .arg("--kubeconfig")
                    .arg(&admin)
                    .args(["get", "--raw", "/readyz"]),
                None,
            )
            .map_err(|e| {
                format!(
                    "{e}\nkube-apiserver's log ends:\n{}\netcd's log ends:\n{}",
                    daemon::log_tail(layout, "kube-apiserver", 10),
                    daemon::log_tail(layout, "etcd", 5)
                )
            })
        },
    )?;

    let cm = layout.kubeconfig("controller-manager");
    let mut cmgr = Command::new(components.bin("kube-controller-manager")?);
    cmgr.args(arg("--kubeconfig", &cm))
        .args(arg("--authentication-kubeconfig", &cm))
        .args(arg("--authorization-kubeconfig", &cm))
        .args(["--bind-address", "127.0.0.1"])
        .args(arg("--cluster-signing-cert-file", &ca))
        .args(arg("--cluster-signing-key-file", creds.ca.key_path()))
        .args(arg("--root-ca-file", &ca))
        .args(arg("--service-account-private-key-file", &creds.sa_key))
        .arg("--use-service-account-credentials=true")
        .args(["--service-cluster-ip-range", SERVICE_CIDR])
        .args(["--cluster-name", "ambient"])
        .arg("--leader-elect=false");
    daemon::spawn(layout, "kube-controller-manager", cmgr)?;

    let sched = layout.kubeconfig("scheduler");
    let mut scheduler = Command::new(components.bin("kube-scheduler")?);
    scheduler
        .args(arg("--kubeconfig", &sched))
        .args(arg("--authentication-kubeconfig", &sched))
        .args(arg("--authorization-kubeconfig", &sched))
        .args(["--bind-address", "127.0.0.1"])
        .arg("--leader-elect=false");
    daemon::spawn(layout, "kube-scheduler", scheduler)?;
    Ok(())
}
