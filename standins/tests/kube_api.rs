//! The Kubernetes API test server, driven by the real kube client the agent uses: lists
//! with selectors, watches that resume, relist after 410 and cut streams, injected
//! errors, merge patches of pods/status. No root needed.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;
use standins::kube_api::ApiServer;

async fn client(server: &ApiServer) -> kube::Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn pod(ns: &str, name: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

const T: Duration = Duration::from_secs(5);

type Events = futures::stream::BoxStream<'static, Result<watcher::Event<Pod>, watcher::Error>>;

async fn next(events: &mut Events) -> Result<watcher::Event<Pod>, watcher::Error> {
    tokio::time::timeout(T, events.next())
        .await
        .expect("an event")
        .expect("stream open")
}

#[tokio::test]
async fn lists_filter_by_field_and_label_selectors() {
    let server = ApiServer::start().await;
    server.create_namespace(namespace("demo", &[("istio.io/dataplane-mode", "ambient")]));
    server.create_namespace(namespace("other", &[]));
    server.create_pod(pod("demo", "a", "node-1"));
    server.create_pod(pod("demo", "b", "node-2"));
    let c = client(&server).await;
    let pods: Api<Pod> = Api::all(c.clone());
    let on_node = pods
        .list(&ListParams::default().fields("spec.nodeName=node-1"))
        .await
        .unwrap();
    let names: Vec<_> = on_node
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a"]);
    let nss: Api<Namespace> = Api::all(c);
    let ambient = nss
        .list(&ListParams::default().labels("istio.io/dataplane-mode=ambient"))
        .await
        .unwrap();
    assert_eq!(ambient.items.len(), 1);
    assert_eq!(ambient.items[0].metadata.name.as_deref(), Some("demo"));
}

#[tokio::test]
async fn a_watcher_sees_changes_and_relists_after_expiry_and_cut_streams() {
    let server = ApiServer::start().await;
    server.create_pod(pod("demo", "a", "node-1"));
    let c = client(&server).await;
    let pods: Api<Pod> = Api::all(c);
    let cfg = watcher::Config::default().fields("spec.nodeName=node-1");
    let mut events = watcher(pods, cfg).default_backoff().boxed();

    let mut inits = 0;
    let mut seen = Vec::new();
    // Initial list.
    loop {
        match next(&mut events).await {
            Ok(watcher::Event::Init) => inits += 1,
            Ok(watcher::Event::InitApply(p)) => seen.push(p.metadata.name.unwrap_or_default()),
            Ok(watcher::Event::InitDone) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["a"]);
    // A change arrives as Apply; another node's pod never does.
    server.create_pod(pod("demo", "elsewhere", "node-2"));
    server.create_pod(pod("demo", "b", "node-1"));
    match next(&mut events).await {
        Ok(watcher::Event::Apply(p)) => assert_eq!(p.metadata.name.as_deref(), Some("b")),
        other => panic!("unexpected {other:?}"),
    }
    // The stream is cut and the client kept out (500s) while a is deleted and the
    // history is compacted past the client's version: back in, it gets 410 Expired,
    // relists, and converges.
    server.fail_next(usize::MAX);
    server.drop_watches();
    server.delete_pod("demo", "a");
    server.create_pod(pod("demo", "elsewhere-2", "node-2"));
    server.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.fail_next(0);
    let mut relisted = Vec::new();
    loop {
        match next(&mut events).await {
            Ok(watcher::Event::Init) => inits += 1,
            Ok(watcher::Event::InitApply(p)) => relisted.push(p.metadata.name.unwrap_or_default()),
            Ok(watcher::Event::InitDone) => break,
            Ok(other) => panic!("expected a relist, got {other:?}"),
            Err(_) => {}
        }
    }
    assert_eq!(inits, 2);
    assert_eq!(relisted, ["b"]);
}

#[tokio::test]
async fn errors_are_returned_and_merge_patches_of_status_apply() {
    let server = ApiServer::start().await;
    server.create_pod(pod("demo", "a", "node-1"));
    let c = client(&server).await;
    let pods: Api<Pod> = Api::namespaced(c, "demo");
    server.fail_next(1);
    assert!(pods.get("a").await.is_err(), "injected failure");
    let patch = json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}});
    pods.patch_status("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let got = pods.get("a").await.unwrap();
    assert_eq!(
        got.metadata.annotations.unwrap()["ambient.istio.io/redirection"],
        "enabled"
    );
    let remove = json!({"metadata": {"annotations": {"ambient.istio.io/redirection": null}}});
    pods.patch_status("a", &PatchParams::default(), &Patch::Merge(&remove))
        .await
        .unwrap();
    let got = server.pod("demo", "a").unwrap();
    assert!(got.metadata.annotations.unwrap_or_default().is_empty());
    assert!(pods.get("missing").await.is_err());
}
