//! A minimal Kubernetes API server on 127.0.0.1 for the enrichment tests:
//! `GET /api/v1/pods` as a list (honouring `fieldSelector=spec.nodeName=…`)
//! and as a watch (`watch=true&resourceVersion=…`: the events after that
//! version, then live ones, as newline-delimited `WatchEvent` JSON, ended
//! after `timeoutSeconds`), over plain HTTP or TLS. Every request is
//! recorded (query and `Authorization` header) so tests can assert what the
//! daemon asked for and with which token. It can forget old versions
//! ([`FakeApi::compact`]: resuming a watch from before then gets the API's
//! `410 Gone` ERROR event), close every watch, and answer the next requests
//! with an error status. Dropping it closes the port and every connection.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};

/// One request as received.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub path: String,
    pub query: Vec<(String, String)>,
    pub authorization: Option<String>,
}

impl ApiRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn is_watch(&self) -> bool {
        self.param("watch") == Some("true")
    }
}

/// A pod object as the API serves it, with what the daemon must skip too
/// (status, spec details, a large annotation).
pub fn pod_object(
    uid: &str,
    namespace: &str,
    name: &str,
    node: &str,
    service_account: &str,
    labels: &[(&str, &str)],
) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}".repeat(2000)},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "serviceAccount": service_account,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
        "status": {"phase": "Running", "podIP": "10.0.0.7"},
    })
}

#[derive(Clone)]
struct Event {
    rv: u64,
    kind: &'static str,
    object: Value,
}

fn node_of(pod: &Value) -> &str {
    pod["spec"]["nodeName"].as_str().unwrap_or("")
}

fn uid_of(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().unwrap_or("").to_string()
}

#[derive(Default)]
struct Store {
    rv: u64,
    pods: BTreeMap<String, Value>,
    history: Vec<Event>,
    /// Watches from before this version get `410 Gone`.
    compacted: u64,
    fail_next: u32,
    fail_status: u16,
}

struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<ApiRequest>>,
    live: broadcast::Sender<Event>,
    /// Bumped to end every open watch.
    close_watches: watch::Sender<u64>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            store: Mutex::default(),
            requests: Mutex::default(),
            live: broadcast::channel(4096).0,
            close_watches: watch::channel(0).0,
        }
    }

    fn publish(&self, kind: &'static str, mut object: Value) {
        let mut s = self.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let uid = uid_of(&object);
        if kind == "DELETED" {
            s.pods.remove(&uid);
        } else {
            s.pods.insert(uid, object.clone());
        }
        let ev = Event { rv, kind, object };
        s.history.push(ev.clone());
        // Under the lock: a watch starting now sees it either in the
        // history or live, never both, never neither.
        let _ = self.live.send(ev);
    }
}

fn selected_node(q: &[(String, String)]) -> Option<String> {
    q.iter()
        .find(|(k, _)| k == "fieldSelector")
        .and_then(|(_, v)| v.strip_prefix("spec.nodeName="))
        .map(str::to_string)
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    v.push(b'\n');
    Bytes::from(v)
}

fn gone(rv: u64, compacted: u64) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("too old resource version: {rv} ({compacted})"),
           "reason": "Expired", "code": 410})
}

async fn pods(
    State(st): State<Arc<Shared>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let req = ApiRequest {
        path: "/api/v1/pods".into(),
        query: query.clone(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    st.requests.lock().unwrap().push(req.clone());
    {
        let mut s = st.store.lock().unwrap();
        if s.fail_next > 0 {
            s.fail_next -= 1;
            let code = StatusCode::from_u16(s.fail_status).unwrap_or(StatusCode::UNAUTHORIZED);
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "message": "injected failure", "code": s.fail_status});
            return (code, body.to_string()).into_response();
        }
    }
    let node = selected_node(&query);
    let on_node = |p: &Value| node.as_deref().is_none_or(|n| node_of(p) == n);
    if !req.is_watch() {
        let s = st.store.lock().unwrap();
        let items: Vec<&Value> = s.pods.values().filter(|p| on_node(p)).collect();
        let body = json!({"kind": "PodList", "apiVersion": "v1",
                          "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
        return ([("content-type", "application/json")], body.to_string()).into_response();
    }
    let from: u64 = req
        .param("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        req.param("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1024);
    let (backlog, mut live, compacted) = {
        let s = st.store.lock().unwrap();
        let backlog: Vec<Event> = s
            .history
            .iter()
            .filter(|e| e.rv > from && on_node(&e.object))
            .cloned()
            .collect();
        (backlog, st.live.subscribe(), s.compacted)
    };
    let mut closed = st.close_watches.subscribe();
    tokio::spawn(async move {
        if from < compacted {
            let _ = tx.send(Ok(line("ERROR", &gone(from, compacted)))).await;
            return;
        }
        for e in backlog {
            if tx.send(Ok(line(e.kind, &e.object))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = closed.changed() => return,
                _ = tx.closed() => return,
                e = live.recv() => match e {
                    Ok(e) if e.rv > from && on_node_owned(&node, &e.object) => {
                        if tx.send(Ok(line(e.kind, &e.object))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
            }
        }
    });
    (
        [("content-type", "application/json")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}

fn on_node_owned(node: &Option<String>, p: &Value) -> bool {
    node.as_deref().is_none_or(|n| node_of(p) == n)
}

/// TLS material for [`FakeApi::start_tls`]: a CA and a server certificate
/// for IP 127.0.0.1 it signed, made with the `openssl` command.
pub struct TestPki {
    pub dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> Result<TestPki> {
        let dir = tempfile::Builder::new().prefix("detector-pki-").tempdir()?;
        let d = dir.path();
        let run = |args: &[&str]| -> Result<()> {
            let o = std::process::Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .context("running openssl")?;
            anyhow::ensure!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            Ok(())
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            let subj = format!("/CN=detector-test-{ca}");
            let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
            a.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
            run(&a)?;
        }
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&a)?;
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )?;
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])?;
        Ok(TestPki { dir })
    }
    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.crt")
    }
    /// A CA that did not sign the server's certificate.
    pub fn other_ca(&self) -> std::path::PathBuf {
        self.dir.path().join("other-ca.crt")
    }
    fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(self.dir.path().join("server.crt"))?
                .collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_file(self.dir.path().join("server.key"))?;
        let cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
    }
}

/// TCP + TLS handshake; a failed handshake (the client refused our
/// certificate) is skipped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;
    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            let Ok((s, peer)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let hs = tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(s)).await;
            if let Ok(Ok(tls)) = hs {
                return (tls, peer);
            }
        }
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// The fake API server, on its own runtime so tests can stay synchronous.
pub struct FakeApi {
    pub addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    running: Option<tokio::task::JoinHandle<()>>,
}

impl FakeApi {
    /// Plain HTTP on `addr` (port 0: any free port).
    pub fn start(addr: SocketAddr) -> Result<FakeApi> {
        Self::start_with(addr, None)
    }

    /// HTTPS with `pki`'s server certificate.
    pub fn start_tls(addr: SocketAddr, pki: &TestPki) -> Result<FakeApi> {
        Self::start_with(addr, Some(pki.acceptor()?))
    }

    fn start_with(addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<FakeApi> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut api = FakeApi {
            addr,
            rt,
            shared: Arc::new(Shared::new()),
            tls,
            running: None,
        };
        api.serve()?;
        Ok(api)
    }

    fn serve(&mut self) -> Result<()> {
        let app = axum::Router::new()
            .route("/api/v1/pods", axum::routing::get(pods))
            .with_state(self.shared.clone());
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .with_context(|| format!("bind {}", self.addr))?;
        self.addr = listener.local_addr()?;
        let task = match self.tls.clone() {
            None => self.rt.spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
            Some(acceptor) => self.rt.spawn(async move {
                let _ = axum::serve(
                    TlsListener {
                        tcp: listener,
                        acceptor,
                    },
                    app,
                )
                .await;
            }),
        };
        self.running = Some(task);
        Ok(())
    }

    /// `http://127.0.0.1:PORT` or `https://…`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Create a pod (an ADDED event).
    pub fn add_pod(&self, pod: Value) {
        self.shared.publish("ADDED", pod);
    }

    pub fn modify_pod(&self, pod: Value) {
        self.shared.publish("MODIFIED", pod);
    }

    pub fn delete_pod(&self, uid: &str) {
        let pod = self.shared.store.lock().unwrap().pods.get(uid).cloned();
        if let Some(p) = pod {
            self.shared.publish("DELETED", p);
        }
    }

    /// Forget every version up to now: a watch resumed from an older one
    /// gets `410 Gone`, as after etcd compaction. The version moves on by
    /// one first (another object changed: versions are cluster-wide), so a
    /// fresh list gives a version that can be watched again.
    pub fn compact(&self) {
        let mut s = self.shared.store.lock().unwrap();
        s.rv += 1;
        s.compacted = s.rv;
        s.history.clear();
    }

    /// End every open watch (the client resumes with a new request).
    pub fn close_watches(&self) {
        self.shared.close_watches.send_modify(|n| *n += 1);
    }

    /// Answer the next `n` requests with `status` (a `Status` body).
    pub fn fail_next(&self, n: u32, status: u16) {
        let mut s = self.shared.store.lock().unwrap();
        s.fail_next = n;
        s.fail_status = status;
    }

    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Wait until a request matching `pred` arrived.
    pub fn wait_request(
        &self,
        timeout: Duration,
        pred: impl Fn(&ApiRequest) -> bool,
    ) -> Option<ApiRequest> {
        crate::wait_for(timeout, || self.requests().into_iter().find(|r| pred(r)))
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.close_watches();
        if let Some(t) = self.running.take() {
            t.abort();
        }
        // Dropping the runtime then ends every connection task.
    }
}

/// Write `token` to `path` as kubelet does (new file renamed over).
pub fn write_token(path: &Path, token: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
