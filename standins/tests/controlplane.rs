//! The stand-in control plane, asked by ztunnel's own CA client: it signs for the
//! bearer of its token, records each request, can fail on demand, and refuses a
//! caller without the token. No root needed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use standins::controlplane::ControlPlane;
use standins::MeshRoot;
use ztunnel::controlplane::ca::CaClient;
use ztunnel::controlplane::ControlPlaneConfig;
use ztunnel::identity::source::CertSource;
use ztunnel::identity::Identity;

fn ca_client(env: &HashMap<String, String>, token: PathBuf) -> CaClient {
    let cp = ztunnel::controlplane::ControlPlane::new(ControlPlaneConfig {
        address: env["CA_ADDRESS"].clone(),
        root: env["CA_ROOT_CA"].clone().into(),
        alt_hostname: None,
        token,
        cluster_id: env["CLUSTER_ID"].clone(),
        headers: vec![],
    })
    .expect("a CA client");
    CaClient::new(cp)
}

#[tokio::test]
async fn the_ca_signs_for_the_bearer_of_its_token_and_fails_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let root_dir = dir.path().join("root");
    ztunnel::create_root("cluster.local", Duration::from_secs(3600), &root_dir, false).unwrap();
    let root = MeshRoot {
        cert: root_dir.join("ca.crt"),
        key: root_dir.join("ca.key"),
    };
    let cp = ControlPlane::start(&root, dir.path()).await;
    let env: HashMap<String, String> = cp.env().into_iter().collect();
    let id = Identity::new("cluster.local", "demo", "sleep");

    let client = ca_client(&env, env["AUTH_TOKEN"].clone().into());
    let cert = client
        .issue(&id, Duration::from_secs(600))
        .await
        .expect("a certificate");
    assert_eq!(cert.identity, id);
    let csrs = cp.csrs();
    assert_eq!(csrs.len(), 1);
    assert_eq!(csrs[0].validity_seconds, 600);

    cp.set_ca_down(true);
    let down = client.issue(&id, Duration::from_secs(600)).await;
    assert!(down.is_err(), "the CA is down");
    cp.set_ca_down(false);

    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let refused = ca_client(&env, wrong)
        .issue(&id, Duration::from_secs(600))
        .await;
    let error = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(!error.is_empty(), "a caller without the token is refused");
    assert_eq!(
        cp.csrs().len(),
        2,
        "the refused caller never reached the CA"
    );
}
