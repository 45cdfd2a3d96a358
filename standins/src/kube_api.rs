//! A small Kubernetes API server for tests: the part of the API the node agent uses,
//! served over real HTTP with real Kubernetes JSON, so the agent talks to it through a
//! kubeconfig exactly as it would to a cluster.
//!
//! - The agent's DaemonSet (`apps/v1`) and nodes: get, for its shutdown decision.
//! - Namespaces and pods: get, list and watch (with resourceVersions: a watch resumes
//!   after the version it names; a version older than the kept history gets an
//!   `Expired` (410) error event, so clients relist), label and field selectors,
//!   create, update, delete, and JSON merge patch (also on `pods/{name}/status`).
//! - A uid in a patch is a precondition, as in Kubernetes: a mismatch is 409 Conflict.
//! - Graceful deletion: a deletion timestamp first, the object gone later.
//! - Optionally HTTPS with a test CA and bearer tokens (401 for any other), to test
//!   what a client does with real credentials.
//! - Fault injection: fail the next requests with 500, cut every open watch, forget
//!   the history (compaction).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Namespace,
    Pod,
    Event,
    DaemonSet,
    Node,
}

impl Kind {
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Namespace => "NamespaceList",
            Kind::Pod => "PodList",
            Kind::Event => "EventList",
            Kind::DaemonSet => "DaemonSetList",
            Kind::Node => "NodeList",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Event => "Event",
            Kind::DaemonSet => "DaemonSet",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::DaemonSet => "apps/v1",
            _ => "v1",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }
}

#[derive(Clone)]
struct Event {
    rv: u64,
    kind: Kind,
    kind_name: &'static str,
    object: Value,
}

struct Watcher {
    kind: Kind,
    namespace: Option<String>,
    filter: Filter,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Objects by (kind, namespace, name).
    objects: BTreeMap<(u8, String, String), Value>,
    history: VecDeque<Event>,
    /// Events before this version have been forgotten.
    oldest: u64,
    watchers: Vec<Watcher>,
    fail_next: usize,
    /// Bearer tokens accepted; `None`: no authentication.
    tokens: Option<Vec<String>>,
    /// Down (restarting): every new connection is closed at once.
    down: bool,
    /// RBAC enforced on every request (403 Forbidden otherwise); `None`: all allowed.
    rbac: Option<Vec<charts::rbac::Rule>>,
    /// Every (verb, resource) asked for, allowed or not.
    calls: BTreeSet<(String, String)>,
}

fn key(kind: Kind, ns: &str, name: &str) -> (u8, String, String) {
    (kind as u8, ns.to_string(), name.to_string())
}

/// Label and field selectors, equality and existence forms.
#[derive(Clone, Default)]
struct Filter {
    labels: Vec<(String, Option<String>, bool)>,
    fields: Vec<(String, String, bool)>,
}

impl Filter {
    fn parse(query: &BTreeMap<String, String>) -> Filter {
        let mut f = Filter::default();
        for term in query
            .get("labelSelector")
            .into_iter()
            .flat_map(|s| s.split(','))
        {
            let term = term.trim();
            if let Some((k, v)) = term.split_once("!=") {
                f.labels.push((k.into(), Some(v.into()), false));
            } else if let Some((k, v)) = term.split_once('=') {
                f.labels
                    .push((k.trim_end_matches('=').into(), Some(v.into()), true));
            } else if let Some(k) = term.strip_prefix('!') {
                f.labels.push((k.into(), None, false));
            } else if !term.is_empty() {
                f.labels.push((term.into(), None, true));
            }
        }
        for term in query
            .get("fieldSelector")
            .into_iter()
            .flat_map(|s| s.split(','))
        {
            if let Some((k, v)) = term.split_once("!=") {
                f.fields.push((k.into(), v.into(), false));
            } else if let Some((k, v)) = term.split_once('=') {
                f.fields
                    .push((k.trim_end_matches('=').into(), v.into(), true));
            }
        }
        f
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.labels.iter().all(|(k, v, eq)| {
            let have = labels.get(k).and_then(Value::as_str);
            match (v, eq) {
                (Some(v), true) => have == Some(v.as_str()),
                (Some(v), false) => have != Some(v.as_str()),
                (None, true) => have.is_some(),
                (None, false) => have.is_none(),
            }
        }) && self.fields.iter().all(|(path, v, eq)| {
            let mut cur = obj;
            for part in path.split('.') {
                cur = &cur[part];
            }
            (cur.as_str().unwrap_or_default() == v) == *eq
        })
    }
}

/// The server. Dropping it stops serving.
pub struct ApiServer {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    task: tokio::task::JoinHandle<()>,
    /// With TLS: the CA (PEM) that signed the server's certificate.
    pub ca_pem: Option<String>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Events kept for watches to resume from.
const HISTORY: usize = 1000;

/// A test CA and a server certificate it signed for 127.0.0.1.
fn test_pki() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "kube-api-test-ca");
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    (ca_cert.pem(), config)
}

impl ApiServer {
    /// Plain HTTP, no authentication.
    pub async fn start() -> ApiServer {
        Self::serve(None, None).await
    }

    /// HTTPS (see [`ApiServer::ca_pem`]) accepting only bearer `tokens`.
    pub async fn start_secure(tokens: &[&str]) -> ApiServer {
        let (ca, tls) = test_pki();
        let tokens = tokens.iter().map(|t| t.to_string()).collect();
        Self::serve(Some((ca, tls)), Some(tokens)).await
    }

    async fn serve(
        tls: Option<(String, rustls::ServerConfig)>,
        tokens: Option<Vec<String>>,
    ) -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let store = Arc::new(Mutex::new(Store {
            oldest: 1,
            tokens,
            ..Store::default()
        }));
        let shared = store.clone();
        let ca_pem = tls.as_ref().map(|(ca, _)| ca.clone());
        let acceptor = tls.map(|(_, cfg)| tokio_rustls::TlsAcceptor::from(Arc::new(cfg)));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if shared.lock().unwrap_or_else(|p| p.into_inner()).down {
                    drop(stream);
                    continue;
                }
                let store = shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let store = store.clone();
                        async move { Ok::<_, Infallible>(handle(store, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        ApiServer {
            addr,
            store,
            task,
            ca_pem,
        }
    }

    /// Enforces `rules` on every request from now on, as a real API server enforces
    /// the caller's RBAC: anything else gets 403 Forbidden.
    pub fn enforce_rbac(&self, rules: &[charts::rbac::Rule]) {
        self.lock().rbac = Some(rules.to_vec());
    }

    /// Every (verb, resource) clients asked for so far (`("patch", "pods/status")`).
    pub fn calls(&self) -> BTreeSet<(String, String)> {
        self.lock().calls.clone()
    }

    /// Replaces the accepted bearer tokens (a token rotation, a revocation).
    pub fn set_tokens(&self, tokens: &[&str]) {
        self.lock().tokens = Some(tokens.iter().map(|t| t.to_string()).collect());
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &Path) {
        let cfg = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(path, cfg).expect("write kubeconfig");
    }

    pub fn create_namespace(&self, ns: Namespace) -> Namespace {
        let v = serde_json::to_value(ns).expect("namespace json");
        typed(create(&mut self.lock(), Kind::Namespace, v).expect("create namespace"))
    }

    pub fn create_pod(&self, pod: Pod) -> Pod {
        let v = serde_json::to_value(pod).expect("pod json");
        typed(create(&mut self.lock(), Kind::Pod, v).expect("create pod"))
    }

    /// Applies a JSON merge patch to a namespace (e.g. to change its labels).
    pub fn patch_namespace(&self, name: &str, patch: Value) -> Namespace {
        typed(
            patch_object(&mut self.lock(), Kind::Namespace, "", name, &patch)
                .expect("patch namespace"),
        )
    }

    pub fn patch_pod(&self, ns: &str, name: &str, patch: Value) -> Pod {
        typed(patch_object(&mut self.lock(), Kind::Pod, ns, name, &patch).expect("patch pod"))
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        delete(&mut self.lock(), Kind::Pod, ns, name).expect("delete pod");
    }

    /// A graceful deletion begins (`kubectl delete pod` with a grace period): the
    /// object gets its deletion timestamp and stays until [`ApiServer::delete_pod`].
    pub fn begin_delete_pod(&self, ns: &str, name: &str, grace_seconds: u64) -> Pod {
        self.patch_pod(
            ns,
            name,
            json!({"metadata": {
                "deletionTimestamp": "2026-01-01T00:00:30Z",
                "deletionGracePeriodSeconds": grace_seconds,
            }}),
        )
    }

    /// Sets the pod's phase and addresses, as kubelet reports them.
    pub fn set_pod_status(
        &self,
        ns: &str,
        name: &str,
        phase: &str,
        ips: &[std::net::IpAddr],
    ) -> Pod {
        let ip_list: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        self.patch_pod(
            ns,
            name,
            json!({"status": {
                "phase": phase,
                "podIP": ips.first().map(ToString::to_string),
                "podIPs": ip_list,
            }}),
        )
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.lock()
            .objects
            .get(&key(Kind::Pod, ns, name))
            .cloned()
            .map(typed)
    }

    /// Creates a DaemonSet object (`apps/v1`) from its JSON.
    pub fn create_daemonset(&self, ds: Value) {
        create(&mut self.lock(), Kind::DaemonSet, ds).expect("create daemonset");
    }

    /// Deletes a DaemonSet object at once (`helm uninstall`: background propagation).
    pub fn delete_daemonset(&self, ns: &str, name: &str) {
        delete(&mut self.lock(), Kind::DaemonSet, ns, name).expect("delete daemonset");
    }

    /// Creates a Node object from its JSON.
    pub fn create_node(&self, node: Value) {
        create(&mut self.lock(), Kind::Node, node).expect("create node");
    }

    /// The events recorded in `ns` (core/v1 `Event` objects, as posted).
    pub fn events(&self, ns: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((k, n, _), _)| *k == Kind::Event as u8 && n == ns)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The next `n` requests fail with 500.
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// Ends every open watch stream (as a restarting API server would).
    pub fn drop_watches(&self) {
        self.lock().watchers.clear();
    }

    /// Goes down (every watch cut, every new connection closed at once) or comes back,
    /// as an API server restart looks to its clients.
    pub fn set_down(&self, down: bool) {
        let mut s = self.lock();
        s.down = down;
        if down {
            s.watchers.clear();
        }
    }

    /// Forgets the event history: watches from an older version get 410 Expired.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.history.clear();
        s.oldest = s.rv + 1;
    }
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("stored object has the Kubernetes shape")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<WatchBody> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    respond(code, body)
}

fn respond(code: StatusCode, body: Value) -> Response<WatchBody> {
    let mut resp = Response::new(WatchBody::Full(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    resp
}

fn record(s: &mut Store, kind: Kind, kind_name: &'static str, object: Value) {
    let event = Event {
        rv: s.rv,
        kind,
        kind_name,
        object,
    };
    let line = watch_line(&event);
    s.watchers.retain(|w| {
        if w.kind != event.kind || !w.filter.matches(&event.object) {
            return !w.tx.is_closed();
        }
        if let Some(ns) = &w.namespace {
            if event.object["metadata"]["namespace"].as_str() != Some(ns) {
                return !w.tx.is_closed();
            }
        }
        w.tx.send(line.clone()).is_ok()
    });
    s.history.push_back(event);
    while s.history.len() > HISTORY {
        if let Some(e) = s.history.pop_front() {
            s.oldest = e.rv + 1;
        }
    }
}

fn watch_line(e: &Event) -> Bytes {
    Bytes::from(json!({"type": e.kind_name, "object": e.object}).to_string() + "\n")
}

fn create(s: &mut Store, kind: Kind, mut v: Value) -> Result<Value, (StatusCode, String)> {
    let mut name = v["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(prefix) = v["metadata"]["generateName"]
        .as_str()
        .filter(|_| name.is_empty())
    {
        name = format!("{prefix}{:05x}", s.rv + 1);
        v["metadata"]["name"] = json!(name);
    }
    if name.is_empty() {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "metadata.name is required".into(),
        ));
    }
    let ns = if kind.namespaced() {
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string()
    } else {
        String::new()
    };
    if s.objects.contains_key(&key(kind, &ns, &name)) {
        return Err((StatusCode::CONFLICT, format!("{name} already exists")));
    }
    s.rv += 1;
    let meta = &mut v["metadata"];
    if kind.namespaced() {
        meta["namespace"] = json!(ns);
    }
    if meta["uid"].is_null() {
        meta["uid"] = json!(format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            s.rv
        ));
    }
    meta["resourceVersion"] = json!(s.rv.to_string());
    meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    v["apiVersion"] = json!(kind.api_version());
    v["kind"] = json!(kind.name());
    s.objects.insert(key(kind, &ns, &name), v.clone());
    record(s, kind, "ADDED", v.clone());
    Ok(v)
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in fields {
                if v.is_null() {
                    if let Some(obj) = target.as_object_mut() {
                        obj.remove(k);
                    }
                } else {
                    merge(&mut target[k], v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn patch_object(
    s: &mut Store,
    kind: Kind,
    ns: &str,
    name: &str,
    patch: &Value,
) -> Result<Value, (StatusCode, String)> {
    let k = key(kind, ns, name);
    let mut v = s
        .objects
        .get(&k)
        .cloned()
        .ok_or((StatusCode::NOT_FOUND, format!("{name} not found")))?;
    if let Some(want) = patch["metadata"]["uid"].as_str() {
        let have = v["metadata"]["uid"].as_str().unwrap_or_default();
        if want != have {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "Precondition failed: UID in precondition: {want}, UID in object meta: {have}"
                ),
            ));
        }
    }
    merge(&mut v, patch);
    s.rv += 1;
    v["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    s.objects.insert(k, v.clone());
    record(s, kind, "MODIFIED", v.clone());
    Ok(v)
}

/// An update (PUT): the new content replaces the old; identity fields are kept.
fn replace_object(
    s: &mut Store,
    kind: Kind,
    ns: &str,
    name: &str,
    mut new: Value,
) -> Result<Value, (StatusCode, String)> {
    let k = key(kind, ns, name);
    let old = s
        .objects
        .get(&k)
        .ok_or((StatusCode::NOT_FOUND, format!("{name} not found")))?;
    for field in ["uid", "creationTimestamp", "namespace", "name"] {
        new["metadata"][field] = old["metadata"][field].clone();
    }
    new["apiVersion"] = old["apiVersion"].clone();
    new["kind"] = old["kind"].clone();
    s.rv += 1;
    new["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    s.objects.insert(k, new.clone());
    record(s, kind, "MODIFIED", new.clone());
    Ok(new)
}

fn delete(s: &mut Store, kind: Kind, ns: &str, name: &str) -> Result<Value, (StatusCode, String)> {
    let mut v = s
        .objects
        .remove(&key(kind, ns, name))
        .ok_or((StatusCode::NOT_FOUND, format!("{name} not found")))?;
    s.rv += 1;
    v["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    record(s, kind, "DELETED", v.clone());
    Ok(v)
}

/// A response body: a whole JSON document, or a watch stream of JSON lines.
pub enum WatchBody {
    Full(Full<Bytes>),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            WatchBody::Full(full) => Pin::new(full).poll_frame(cx),
            WatchBody::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(store: Arc<Mutex<Store>>, req: Request<Incoming>) -> Response<WatchBody> {
    let lock = || store.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut s = lock();
        if let Some(tokens) = &s.tokens {
            let bearer = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !bearer.is_some_and(|b| tokens.iter().any(|t| t == b)) {
                return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
            }
        }
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "injected failure",
            );
        }
    }
    let full = req.uri().path().to_string();
    let (group, rest) = if let Some(rest) = full.strip_prefix("/apis/apps/v1/") {
        ("apps", rest)
    } else {
        ("", full.trim_start_matches("/api/v1/"))
    };
    let path: Vec<String> = rest.split('/').map(str::to_string).collect();
    let q = query(&req);
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    // (kind, namespace scope, name)
    let (kind, ns, name) = match (group, p.as_slice()) {
        ("apps", ["namespaces", ns, "daemonsets", n]) => (Kind::DaemonSet, Some(*ns), Some(*n)),
        ("apps", _) => return status(StatusCode::NOT_FOUND, "NotFound", "no such resource"),
        (_, ["nodes", n]) => (Kind::Node, None, Some(*n)),
        (_, ["namespaces"]) => (Kind::Namespace, None, None),
        (_, ["namespaces", n]) => (Kind::Namespace, None, Some(*n)),
        (_, ["pods"]) => (Kind::Pod, None, None),
        (_, ["namespaces", ns, "pods"]) => (Kind::Pod, Some(*ns), None),
        (_, ["namespaces", ns, "pods", n]) | (_, ["namespaces", ns, "pods", n, "status"]) => {
            (Kind::Pod, Some(*ns), Some(*n))
        }
        (_, ["namespaces", ns, "events"]) => (Kind::Event, Some(*ns), None),
        _ => return status(StatusCode::NOT_FOUND, "NotFound", "no such resource"),
    };
    let method = req.method().clone();
    // RBAC, with the verbs and resources Kubernetes authorizes by.
    let resource = match (kind, p.last()) {
        (Kind::Pod, Some(&"status")) => "pods/status",
        (Kind::Pod, _) => "pods",
        (Kind::Namespace, _) => "namespaces",
        (Kind::Event, _) => "events",
        (Kind::DaemonSet, _) => "apps/daemonsets",
        (Kind::Node, _) => "nodes",
    };
    let watching = matches!(q.get("watch").map(String::as_str), Some("true") | Some("1"));
    let verb = match (&method, name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::POST, _) => "create",
        (&Method::PATCH, _) => "patch",
        (&Method::PUT, _) => "update",
        (&Method::DELETE, _) => "delete",
        _ => "unknown",
    };
    {
        let mut s = lock();
        s.calls.insert((verb.to_string(), resource.to_string()));
        if let Some(rules) = &s.rbac {
            if !charts::rbac::allows(rules, verb, resource, name) {
                return status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!(
                        "{resource} is forbidden: the chart's ClusterRole does not allow \
                         {verb:?} on {resource:?}"
                    ),
                );
            }
        }
    }
    match (method, name) {
        (Method::GET, Some(name)) => {
            let s = lock();
            match s.objects.get(&key(kind, ns.unwrap_or(""), name)) {
                Some(v) => respond(StatusCode::OK, v.clone()),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                ),
            }
        }
        (Method::GET, None) => {
            let filter = Filter::parse(&q);
            let mut s = lock();
            let in_scope = |v: &Value| {
                ns.is_none_or(|ns| v["metadata"]["namespace"].as_str() == Some(ns))
                    && filter.matches(v)
            };
            if !watching {
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((k, _, _), _)| *k == kind as u8)
                    .map(|(_, v)| v)
                    .filter(|v| in_scope(v))
                    .cloned()
                    .collect();
                return respond(
                    StatusCode::OK,
                    json!({"kind": kind.list_kind(), "apiVersion": "v1",
                           "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
                );
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let from: Option<u64> = q
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0);
            if let Some(from) = from {
                if from + 1 < s.oldest {
                    let expired = json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {from} ({})", s.oldest - 1),
                        "reason": "Expired", "code": 410}});
                    let _ = tx.send(Bytes::from(expired.to_string() + "\n"));
                    drop(tx);
                    return stream_response(rx);
                }
                for e in s.history.iter().filter(|e| e.rv > from && e.kind == kind) {
                    if in_scope(&e.object) {
                        let _ = tx.send(watch_line(e));
                    }
                }
            }
            s.watchers.push(Watcher {
                kind,
                namespace: ns.map(str::to_string),
                filter,
                tx,
            });
            stream_response(rx)
        }
        (Method::POST, None) => {
            let Ok(body) = req.into_body().collect().await else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            };
            let Ok(mut v) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
            };
            if let Some(ns) = ns {
                v["metadata"]["namespace"] = json!(ns);
            }
            match create(&mut lock(), kind, v) {
                Ok(v) => respond(StatusCode::CREATED, v),
                Err((code, msg)) => status(code, "Invalid", &msg),
            }
        }
        (Method::PATCH, Some(name)) | (Method::PUT, Some(name)) => {
            let is_put = req.method() == Method::PUT;
            let Ok(body) = req.into_body().collect().await else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            };
            let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON");
            };
            let mut s = lock();
            let ns = ns.unwrap_or("");
            let result = if is_put {
                replace_object(&mut s, kind, ns, name, patch)
            } else {
                patch_object(&mut s, kind, ns, name, &patch)
            };
            match result {
                Ok(v) => respond(StatusCode::OK, v),
                Err((code, msg)) if code == StatusCode::CONFLICT => status(code, "Conflict", &msg),
                Err((code, msg)) => status(code, "NotFound", &msg),
            }
        }
        (Method::DELETE, Some(name)) => match delete(&mut lock(), kind, ns.unwrap_or(""), name) {
            Ok(v) => respond(StatusCode::OK, v),
            Err((code, msg)) => status(code, "NotFound", &msg),
        },
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported",
        ),
    }
}

fn stream_response(rx: mpsc::UnboundedReceiver<Bytes>) -> Response<WatchBody> {
    let mut resp = Response::new(WatchBody::Stream(rx));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    resp
}
