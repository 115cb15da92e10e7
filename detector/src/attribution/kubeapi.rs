//! Pods of this node from the Kubernetes API: service account and labels
//! (and name and namespace when CRI is not available), by pod UID.
//!
//! - [`KubeApiHandle::spawn`] (inside a tokio runtime) starts one task that
//!   lists `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>` (in pages),
//!   then watches from the list's `resourceVersion` (`watch=true`, bookmarks,
//!   a server-side timeout, resumed from the last version seen). `410 Gone`
//!   relists at once; any other error relists after an exponential backoff
//!   with jitter (1 s .. 30 s).
//! - Only this node's pods and only the fields used are kept: a custom
//!   visitor skips every annotation but the static-pod mirror one, so memory
//!   follows the node's pod count, not the cluster's nor the pods' specs.
//! - Nothing waits for it: lookups read the current cache and find nothing
//!   until the first list has answered. No API server, 401/403, a bad
//!   certificate: one warning per streak of failures (repeated at most every
//!   5 minutes while it lasts), `detector_kube_api_up` 0 and
//!   `detector_kube_api_errors_total{reason}`.
//! - The service-account token is re-read from its file for every request
//!   (kubelet rotates it), sent only over https, marked sensitive, and never
//!   logged.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use reqwest::{
    header::{HeaderValue, ACCEPT, AUTHORIZATION},
    Url,
};
use serde::{de, Deserialize, Deserializer};
use tracing::{debug, info, warn};

use super::WorkloadInfo;

/// Where kubelet mounts a pod's service-account token and the cluster CA.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The annotation of a mirror pod naming its static pod's UID (the one in
/// the cgroup path).
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

const LIST_TIMEOUT: Duration = Duration::from_secs(30);
const PAGE_SIZE: &str = "500";
const MAX_PAGES: usize = 1000;
/// A list page or one watch event larger than this is refused.
const MAX_BODY: usize = 32 << 20;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const WARN_AGAIN: Duration = Duration::from_secs(300);
const WARN_NEW_REASON: Duration = Duration::from_secs(60);
/// A second 410 within this long is treated as an error (backoff).
const GONE_AGAIN: Duration = Duration::from_secs(10);
/// A watch the server ends sooner than this (and without an error) is
/// resumed only after a backoff step, so a proxy that closes every stream
/// at once cannot make us spin.
const SHORT_WATCH: Duration = Duration::from_secs(1);
/// A watch that lasted this long proves the API healthy: backoff reset.
const HEALTHY_WATCH: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Configuration

/// `--kube-api`: `auto` (in-cluster configuration when the pod environment
/// has it), `off`, or the API server's URL (`http://` or `https://`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KubeApiMode {
    #[default]
    Auto,
    Off,
    Url(Url),
}

impl KubeApiMode {
    pub fn parse(s: &str) -> Result<KubeApiMode, String> {
        match s.trim() {
            "auto" => Ok(KubeApiMode::Auto),
            "off" | "false" => Ok(KubeApiMode::Off),
            u => {
                let url = Url::parse(u)
                    .map_err(|e| format!("expected auto, off or an http(s) URL, got {u:?}: {e}"))?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(format!(
                        "expected auto, off or an http(s) URL with a host, got {u:?}"
                    ));
                }
                if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
                    return Err(format!(
                        "the API URL takes no query and no user info, got {u:?}"
                    ));
                }
                Ok(KubeApiMode::Url(url))
            }
        }
    }
}

impl<'de> Deserialize<'de> for KubeApiMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `kube_api: off` may reach us as a YAML 1.1 boolean.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(false) => Ok(KubeApiMode::Off),
            Raw::Bool(true) => Ok(KubeApiMode::Auto),
            Raw::Text(s) => KubeApiMode::parse(&s).map_err(de::Error::custom),
        }
    }
}

/// The `run` settings of the enrichment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeApiConfig {
    pub mode: KubeApiMode,
    /// This node's name (`--node-name`, else `NODE_NAME`).
    pub node_name: Option<String>,
    /// Bearer token file [default: the in-cluster one, for https].
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) for https [default: the in-cluster `ca.crt` when it
    /// exists, else the system's roots].
    pub ca_file: Option<PathBuf>,
}

/// Where and how to reach the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub base: Url,
    pub node: String,
    /// `None` over plain http: the token is never sent in clear text.
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

/// Why there is no enrichment (said once at start-up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disabled {
    Off,
    NotInCluster,
    NoNodeName,
}

impl fmt::Display for Disabled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Disabled::Off => "Kubernetes API enrichment off (--kube-api off)",
            Disabled::NotInCluster => {
                "not running in a pod (no KUBERNETES_SERVICE_HOST/PORT): Kubernetes API enrichment off; \
                 --kube-api URL enables it"
            }
            Disabled::NoNodeName => {
                "no node name (--node-name or NODE_NAME from the downward API): Kubernetes API \
                 enrichment off, as listing every pod of the cluster would not be bounded"
            }
        })
    }
}

impl KubeApiConfig {
    /// The endpoint, from the settings and the process environment `env`.
    pub fn endpoint(&self, env: impl Fn(&str) -> Option<String>) -> Result<Endpoint, Disabled> {
        let sa = Path::new(SA_DIR);
        let base = match &self.mode {
            KubeApiMode::Off => return Err(Disabled::Off),
            KubeApiMode::Url(u) => u.clone(),
            KubeApiMode::Auto => {
                let host = env("KUBERNETES_SERVICE_HOST").filter(|h| !h.trim().is_empty());
                let port = env("KUBERNETES_SERVICE_PORT").filter(|p| !p.trim().is_empty());
                let (Some(host), Some(port)) = (host, port) else {
                    return Err(Disabled::NotInCluster);
                };
                let host = host.trim();
                let host = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]")
                } else {
                    host.to_string()
                };
                Url::parse(&format!("https://{host}:{}", port.trim()))
                    .map_err(|_| Disabled::NotInCluster)?
            }
        };
        let node = self
            .node_name
            .clone()
            .or_else(|| env("NODE_NAME"))
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .ok_or(Disabled::NoNodeName)?;
        let https = base.scheme() == "https";
        let in_cluster = |name: &str| Some(sa.join(name)).filter(|p| p.exists());
        let token_file = if !https {
            None
        } else {
            self.token_file.clone().or_else(|| in_cluster("token"))
        };
        let ca_file = if !https {
            None
        } else {
            self.ca_file.clone().or_else(|| in_cluster("ca.crt"))
        };
        Ok(Endpoint {
            base,
            node,
            token_file,
            ca_file,
        })
    }
}

// ---------------------------------------------------------------------------
// The API's JSON (only the fields used; unknown ones are skipped)

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default, deserialize_with = "null_as_default")]
    resource_version: String,
    #[serde(default, rename = "continue", deserialize_with = "null_as_default")]
    continue_token: String,
}

#[derive(Debug, Default, Deserialize)]
struct PodList {
    #[serde(default, deserialize_with = "null_as_default")]
    metadata: ListMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    items: Vec<RawPod>,
}

/// Of all annotations, only the mirror one (no map of every annotation is
/// ever built: `last-applied-configuration` alone can be large).
#[derive(Debug, Default)]
struct Annotations {
    mirror: Option<String>,
}

impl<'de> Deserialize<'de> for Annotations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Annotations;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of annotations")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Annotations, E> {
                Ok(Annotations::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<Annotations, E> {
                Ok(Annotations::default())
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Annotations, A::Error> {
                let mut out = Annotations::default();
                while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                    if k == MIRROR_ANNOTATION {
                        out.mirror = m.next_value::<Option<String>>()?;
                    } else {
                        m.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default, deserialize_with = "null_as_default")]
    uid: String,
    #[serde(default, deserialize_with = "null_as_default")]
    name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    namespace: String,
    #[serde(default, deserialize_with = "null_as_default")]
    resource_version: String,
    #[serde(default, deserialize_with = "null_as_default")]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: Annotations,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    service_account_name: String,
    /// Deprecated alias of `serviceAccountName`, still set by the API.
    #[serde(default, deserialize_with = "null_as_default")]
    service_account: String,
    #[serde(default, deserialize_with = "null_as_default")]
    node_name: String,
}

#[derive(Debug, Default, Deserialize)]
struct RawPod {
    #[serde(default, deserialize_with = "null_as_default")]
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    spec: RawSpec,
}

/// A watch event's object: a Pod, or a Status for `ERROR`.
#[derive(Debug, Default, Deserialize)]
struct WatchObject {
    #[serde(default, deserialize_with = "null_as_default")]
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    spec: RawSpec,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, deserialize_with = "null_as_default")]
    object: WatchObject,
}

/// What is kept of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiPod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// For a mirror pod: the static pod's UID (the one kubelet and the
    /// cgroup paths use).
    pub mirror_of: Option<String>,
}

impl ApiPod {
    fn from_raw(meta: ObjectMeta, spec: RawSpec) -> Option<ApiPod> {
        if meta.uid.is_empty() {
            return None;
        }
        let sa = if spec.service_account_name.is_empty() {
            spec.service_account
        } else {
            spec.service_account_name
        };
        Some(ApiPod {
            uid: meta.uid,
            name: meta.name,
            namespace: meta.namespace,
            service_account: Some(sa).filter(|s| !s.is_empty()),
            labels: meta.labels,
            mirror_of: meta.annotations.mirror.filter(|m| !m.is_empty()),
        })
    }
}

// ---------------------------------------------------------------------------
// The cache

/// This node's pods by UID, plus static-pod UIDs of mirror pods.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<String, ApiPod>,
    mirrors: HashMap<String, String>,
    /// Bumped on every change, so caches of enriched workloads know when to
    /// resolve again. Shared with the handle: the daemon reads it for every
    /// event, without taking the lock.
    generation: Arc<AtomicU64>,
}

impl PodIndex {
    pub fn replace(&mut self, pods: Vec<ApiPod>) {
        self.generation.fetch_add(1, Ordering::Release);
        self.pods.clear();
        self.mirrors.clear();
        for p in pods {
            self.upsert(p);
        }
        self.pods.shrink_to_fit();
    }

    pub fn upsert(&mut self, p: ApiPod) {
        self.generation.fetch_add(1, Ordering::Release);
        if let Some(old) = self.pods.get(&p.uid).and_then(|o| o.mirror_of.clone()) {
            self.mirrors.remove(&old);
        }
        if let Some(m) = &p.mirror_of {
            self.mirrors.insert(m.clone(), p.uid.clone());
        }
        self.pods.insert(p.uid.clone(), p);
    }

    pub fn remove(&mut self, uid: &str) {
        self.generation.fetch_add(1, Ordering::Release);
        if let Some(m) = self.pods.remove(uid).and_then(|p| p.mirror_of) {
            self.mirrors.remove(&m);
        }
    }

    /// By the UID in a cgroup path (a static pod's is its mirror's alias).
    pub fn get(&self, uid: &str) -> Option<&ApiPod> {
        self.pods
            .get(uid)
            .or_else(|| self.mirrors.get(uid).and_then(|u| self.pods.get(u)))
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Fill `info` from `pod_uid`'s API data; false if the pod is unknown.
    /// The API is the source of the service account and of the labels (the
    /// pod's current ones; CRI's sandbox labels are a copy from creation plus
    /// kubelet's own); name and namespace only fill what CRI left empty, and
    /// container name and image stay CRI's.
    pub fn enrich(&self, pod_uid: &str, info: &mut WorkloadInfo) -> bool {
        let Some(p) = self.get(pod_uid) else {
            return false;
        };
        if p.service_account.is_some() {
            info.service_account = p.service_account.clone();
        }
        info.labels = p.labels.clone();
        if info.namespace.is_none() && !p.namespace.is_empty() {
            info.namespace = Some(p.namespace.clone());
        }
        if info.pod_name.is_none() && !p.name.is_empty() {
            info.pod_name = Some(p.name.clone());
        }
        true
    }
}

/// The shared cache, filled by the background task. Cheap to clone.
#[derive(Clone)]
pub struct KubeApiHandle {
    index: Arc<RwLock<PodIndex>>,
    generation: Arc<AtomicU64>,
}

impl Default for KubeApiHandle {
    fn default() -> Self {
        let index = PodIndex::default();
        let generation = index.generation.clone();
        KubeApiHandle {
            index: Arc::new(RwLock::new(index)),
            generation,
        }
    }
}

impl KubeApiHandle {
    /// Start the list/watch task if the settings and the environment give
    /// an endpoint; says why not otherwise. Needs a tokio runtime. Never
    /// waits for the API.
    pub fn spawn(cfg: &KubeApiConfig, registry: &Registry) -> Option<KubeApiHandle> {
        let ep = match cfg.endpoint(|k| std::env::var(k).ok()) {
            Ok(ep) => ep,
            Err(why @ Disabled::NoNodeName) => {
                warn!("{why}");
                return None;
            }
            Err(why) => {
                info!("{why}");
                return None;
            }
        };
        if cfg.token_file.is_some() && ep.token_file.is_none() {
            warn!(url = %ep.base, "the API URL is plain http: the token file is not used (a token is only sent over https)");
        }
        let metrics = KubeApiMetrics::new();
        if let Err(e) = metrics.register(registry) {
            warn!(error = %e, "cannot register the detector_kube_api_* metrics");
        }
        info!(url = %ep.base, node = %ep.node, token = ep.token_file.is_some(), ca = ?ep.ca_file, "Kubernetes API enrichment: listing and watching this node's pods");
        let h = KubeApiHandle::default();
        let index = h.index.clone();
        tokio::spawn(async move { Watcher { ep, index, metrics }.run().await });
        Some(h)
    }

    /// See [`PodIndex::enrich`].
    pub fn enrich(&self, pod_uid: &str, info: &mut WorkloadInfo) -> bool {
        self.index
            .read()
            .map(|i| i.enrich(pod_uid, info))
            .unwrap_or(false)
    }

    /// Changes so far (see [`PodIndex`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn pod(&self, uid: &str) -> Option<ApiPod> {
        self.index.read().ok()?.get(uid).cloned()
    }

    pub fn len(&self) -> usize {
        self.index.read().map(|i| i.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------
// Metrics

/// `reason` label values of `detector_kube_api_errors_total`.
pub const ERROR_REASONS: [&str; 9] = [
    "connect",
    "tls",
    "timeout",
    "unauthorized",
    "forbidden",
    "gone",
    "http",
    "decode",
    "credentials",
];

/// `detector_kube_api_*`: registered only when the enrichment is on, so an
/// agent without it never looks "down".
pub struct KubeApiMetrics {
    up: IntGauge,
    errors: IntCounterVec,
    pods: IntGauge,
}

impl Default for KubeApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl KubeApiMetrics {
    pub fn new() -> KubeApiMetrics {
        let up = IntGauge::new(
            "detector_kube_api_up",
            "1 while this node's pods are listed and watched from the Kubernetes API, 0 when the last attempt failed.",
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "detector_kube_api_errors_total",
                "Failed Kubernetes API requests and watches, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for r in ERROR_REASONS {
            errors.with_label_values(&[r]);
        }
        let pods = IntGauge::new(
            "detector_kube_api_pods",
            "Pods of this node known from the Kubernetes API.",
        )
        .expect("valid metric");
        KubeApiMetrics { up, errors, pods }
    }

    pub fn register(&self, r: &Registry) -> prometheus::Result<()> {
        r.register(Box::new(self.up.clone()))?;
        r.register(Box::new(self.errors.clone()))?;
        r.register(Box::new(self.pods.clone()))
    }
}

// ---------------------------------------------------------------------------
// Errors

#[derive(Debug, thiserror::Error)]
pub enum KubeApiError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS failed (is the CA right? --kube-api-ca-file): {0}")]
    Tls(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("401 Unauthorized: the token was rejected (expired, or from another cluster?)")]
    Unauthorized,
    #[error("403 Forbidden: the agent's service account needs get, list and watch on pods (deploy/kubernetes/10-rbac.yaml): {0}")]
    Forbidden(String),
    #[error("410 Gone: resource version too old")]
    Gone,
    #[error("HTTP {0}: {1}")]
    Http(u16, String),
    #[error("unexpected answer: {0}")]
    Decode(String),
    #[error("{0}")]
    Credentials(String),
}

impl KubeApiError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::Timeout(_) => "timeout",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::Gone => "gone",
            Self::Http(..) => "http",
            Self::Decode(_) => "decode",
            Self::Credentials(_) => "credentials",
        }
    }
}

/// The error and its causes on one line (reqwest's own message is terse).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A rustls error somewhere in the chain. Connectors wrap it in
/// `io::Error`s, possibly nested (`io::Error::other(tls_io_error)`), and an
/// `io::Error`'s `source()` skips its content, so look inside those.
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    let mut depth = 0;
    while let Some(c) = cur {
        depth += 1;
        if depth > 32 {
            return false;
        }
        if c.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|i| is_tls(i)) {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

fn classify(e: reqwest::Error) -> KubeApiError {
    let msg = chain(&e);
    // The text as a last resort, should a layer hide the rustls error.
    let lower = msg.to_ascii_lowercase();
    if is_tls(&e) || lower.contains("certificate") || lower.contains("tls handshake") {
        KubeApiError::Tls(msg)
    } else if e.is_timeout() {
        KubeApiError::Timeout(msg)
    } else if e.is_connect() || e.is_request() || e.is_body() {
        KubeApiError::Connect(msg)
    } else {
        KubeApiError::Decode(msg)
    }
}

// ---------------------------------------------------------------------------
// The list/watch loop

/// Splits a watch stream into lines, across chunk boundaries.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
    scanned: usize,
}

impl Lines {
    /// Add a chunk; returns the complete lines it finished (without `\n`).
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, KubeApiError> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + i;
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop();
            self.scanned = 0;
            if !line.iter().all(u8::is_ascii_whitespace) {
                out.push(line);
            }
        }
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_BODY {
            return Err(KubeApiError::Decode(format!(
                "a watch event longer than {MAX_BODY} bytes"
            )));
        }
        Ok(out)
    }

    /// What is left when the stream ends (an event without a final `\n`).
    fn rest(self) -> Option<Vec<u8>> {
        Some(self.buf).filter(|b| !b.iter().all(u8::is_ascii_whitespace))
    }
}

/// What one watch event did to the cache.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    Changed,
    Unchanged,
}

/// Apply one watch event line to `index`, moving `rv` on.
fn apply_event(
    line: &[u8],
    node: &str,
    rv: &mut String,
    index: &RwLock<PodIndex>,
) -> Result<Applied, KubeApiError> {
    let ev: WatchEvent = serde_json::from_slice(line)
        .map_err(|e| KubeApiError::Decode(format!("watch event: {e}")))?;
    let obj = ev.object;
    match ev.kind.as_str() {
        "ADDED" | "MODIFIED" | "DELETED" => {
            if !obj.metadata.resource_version.is_empty() {
                rv.clone_from(&obj.metadata.resource_version);
            }
            let deleted = ev.kind == "DELETED";
            // The field selector should make this moot; stay bounded anyway.
            let elsewhere = !obj.spec.node_name.is_empty() && obj.spec.node_name != node;
            let Some(pod) = ApiPod::from_raw(obj.metadata, obj.spec) else {
                return Ok(Applied::Unchanged);
            };
            let mut w = index.write().unwrap_or_else(|e| e.into_inner());
            if deleted || elsewhere {
                w.remove(&pod.uid);
            } else if w.pods.get(&pod.uid) != Some(&pod) {
                w.upsert(pod);
            } else {
                return Ok(Applied::Unchanged);
            }
            Ok(Applied::Changed)
        }
        "BOOKMARK" => {
            if !obj.metadata.resource_version.is_empty() {
                *rv = obj.metadata.resource_version;
            }
            Ok(Applied::Unchanged)
        }
        "ERROR" => {
            let code = obj.code.unwrap_or(0);
            if code == 410 || obj.reason.as_deref() == Some("Expired") {
                Err(KubeApiError::Gone)
            } else {
                Err(KubeApiError::Http(code, obj.message.unwrap_or_default()))
            }
        }
        other => {
            debug!(kind = other, "unknown watch event type; skipped");
            Ok(Applied::Unchanged)
        }
    }
}

/// Exponential backoff with jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
    /// The delay to wait now: between half and all of the current step.
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

/// One warning per streak of failures, then rarely; an API that flaps
/// (lists, then fails) warns and notes its recovery at most once a minute.
#[derive(Default)]
struct Complaints {
    /// Failures of the current streak.
    failures: u64,
    last_warn: Option<Instant>,
    last_reason: Option<&'static str>,
    last_recovery_note: Option<Instant>,
}

impl Complaints {
    /// Whether this failure deserves a warning (else a debug line).
    fn failed(&mut self, reason: &'static str) -> bool {
        self.failures += 1;
        let now = Instant::now();
        let due = match self.last_warn {
            None => true,
            Some(t) => {
                let since = now.duration_since(t);
                since >= WARN_AGAIN
                    || (since >= WARN_NEW_REASON
                        && (self.failures == 1 || self.last_reason != Some(reason)))
            }
        };
        if due {
            self.last_warn = Some(now);
            self.last_reason = Some(reason);
        }
        due
    }

    /// The streak ended: its number of failures, and whether to say so at
    /// info level (else debug).
    fn recovered(&mut self) -> (u64, bool) {
        let n = std::mem::take(&mut self.failures);
        let now = Instant::now();
        let say = n > 0
            && self
                .last_recovery_note
                .is_none_or(|t| now.duration_since(t) >= WARN_NEW_REASON);
        if say {
            self.last_recovery_note = Some(now);
        }
        (n, say)
    }
}

struct Watcher {
    ep: Endpoint,
    index: Arc<RwLock<PodIndex>>,
    metrics: KubeApiMetrics,
}

/// One connection's worth of client: rebuilt at every relist, so a changed
/// CA file is picked up.
struct Client {
    http: reqwest::Client,
    ep: Endpoint,
}

impl Watcher {
    async fn run(self) {
        let mut backoff = Backoff::new();
        let mut complaints = Complaints::default();
        let mut first = true;
        let mut last_gone: Option<Instant> = None;
        loop {
            let err = match self
                .list_then_watch(&mut complaints, &mut first, &mut backoff)
                .await
            {
                // Normal: the version we resumed from was compacted away.
                // Relist at once, unless it keeps happening (then back off).
                Err(KubeApiError::Gone) if last_gone.is_none_or(|t| t.elapsed() > GONE_AGAIN) => {
                    last_gone = Some(Instant::now());
                    self.metrics.errors.with_label_values(&["gone"]).inc();
                    debug!("watch expired (410 Gone); listing again");
                    continue;
                }
                Err(e) => e,
                Ok(()) => continue,
            };
            self.metrics.up.set(0);
            self.metrics.errors.with_label_values(&[err.reason()]).inc();
            let wait = backoff.step();
            if complaints.failed(err.reason()) {
                warn!(url = %self.ep.base, node = %self.ep.node, error = %err, retry_in = ?wait,
                    "Kubernetes API unavailable: service accounts and API labels missing from findings until it answers (retrying with backoff)");
            } else {
                debug!(url = %self.ep.base, error = %err, retry_in = ?wait, "Kubernetes API still unavailable");
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// List, then watch until an error (returned) or a relist is needed.
    async fn list_then_watch(
        &self,
        complaints: &mut Complaints,
        first: &mut bool,
        backoff: &mut Backoff,
    ) -> Result<(), KubeApiError> {
        let client = Client::new(&self.ep)?;
        let (pods, mut rv) = client.list().await?;
        let n = pods.len();
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(pods);
        self.metrics.pods.set(n as i64);
        self.metrics.up.set(1);
        let (failures, say) = complaints.recovered();
        if *first || say {
            info!(url = %self.ep.base, node = %self.ep.node, pods = n, failed_attempts = failures,
                "Kubernetes API enrichment available: service accounts and labels of this node's pods");
            *first = false;
        } else {
            debug!(
                pods = n,
                failed_attempts = failures,
                "relisted this node's pods"
            );
        }
        // The backoff is reset only by a watch that held: an API that
        // lists but cannot watch must not be relisted in a tight loop.
        loop {
            let started = Instant::now();
            let r = client.watch(&mut rv, &self.index, &self.metrics).await;
            if started.elapsed() >= HEALTHY_WATCH {
                backoff.reset();
            }
            r?;
            debug!(resource_version = %rv, "watch ended by the server; resuming");
            if started.elapsed() < SHORT_WATCH {
                tokio::time::sleep(backoff.step()).await;
            }
        }
    }
}

impl Client {
    fn new(ep: &Endpoint) -> Result<Client, KubeApiError> {
        // reqwest is built without a default TLS crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("detector/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(30));
        if let Some(ca) = &ep.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                KubeApiError::Credentials(format!("reading CA file {}: {e}", ca.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                KubeApiError::Credentials(format!("CA file {}: {}", ca.display(), chain(&e)))
            })?;
            if certs.is_empty() {
                return Err(KubeApiError::Credentials(format!(
                    "CA file {} holds no PEM certificate",
                    ca.display()
                )));
            }
            b = b.tls_certs_only(certs);
        }
        let http = b
            .build()
            .map_err(|e| KubeApiError::Tls(format!("building the HTTP client: {}", chain(&e))))?;
        Ok(Client {
            http,
            ep: ep.clone(),
        })
    }

    /// `<base>/api/v1/pods?fieldSelector=spec.nodeName=<node>`.
    fn pods_url(&self) -> Url {
        let mut u = self.ep.base.clone();
        let path = format!("{}/api/v1/pods", u.path().trim_end_matches('/'));
        u.set_path(&path);
        u.query_pairs_mut()
            .append_pair("fieldSelector", &format!("spec.nodeName={}", self.ep.node));
        u
    }

    /// The token, read now: kubelet rotates the file.
    fn bearer(&self) -> Result<Option<HeaderValue>, KubeApiError> {
        let Some(path) = &self.ep.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            KubeApiError::Credentials(format!("reading token file {}: {e}", path.display()))
        })?;
        let mut v = HeaderValue::from_str(&format!("Bearer {}", text.trim())).map_err(|_| {
            KubeApiError::Credentials(format!(
                "token file {} does not hold a usable token",
                path.display()
            ))
        })?;
        v.set_sensitive(true);
        Ok(Some(v))
    }

    async fn get(&self, url: Url, timeout: Duration) -> Result<reqwest::Response, KubeApiError> {
        let mut req = self
            .http
            .get(url)
            .timeout(timeout)
            .header(ACCEPT, "application/json");
        if let Some(b) = self.bearer()? {
            req = req.header(AUTHORIZATION, b);
        }
        let resp = req.send().await.map_err(classify)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let msg = status_message(resp).await;
        Err(match status.as_u16() {
            401 => KubeApiError::Unauthorized,
            403 => KubeApiError::Forbidden(msg),
            410 => KubeApiError::Gone,
            code => KubeApiError::Http(code, msg),
        })
    }

    /// Every pod of this node, and the list's resource version.
    async fn list(&self) -> Result<(Vec<ApiPod>, String), KubeApiError> {
        let mut pods = Vec::new();
        let mut cont = String::new();
        for _ in 0..MAX_PAGES {
            let mut url = self.pods_url();
            url.query_pairs_mut().append_pair("limit", PAGE_SIZE);
            if !cont.is_empty() {
                url.query_pairs_mut().append_pair("continue", &cont);
            }
            let body = read_bounded(self.get(url, LIST_TIMEOUT).await?).await?;
            let list: PodList = serde_json::from_slice(&body)
                .map_err(|e| KubeApiError::Decode(format!("pod list: {e}")))?;
            pods.extend(
                list.items
                    .into_iter()
                    .filter(|p| p.spec.node_name.is_empty() || p.spec.node_name == self.ep.node)
                    .filter_map(|p| ApiPod::from_raw(p.metadata, p.spec)),
            );
            if list.metadata.continue_token.is_empty() {
                return Ok((pods, list.metadata.resource_version));
            }
            cont = list.metadata.continue_token;
        }
        Err(KubeApiError::Decode(format!(
            "more than {MAX_PAGES} pages of pods"
        )))
    }

    /// Watch from `rv` until the server ends the stream (Ok) or an error.
    async fn watch(
        &self,
        rv: &mut String,
        index: &RwLock<PodIndex>,
        metrics: &KubeApiMetrics,
    ) -> Result<(), KubeApiError> {
        // Spread the reconnects of many agents, as client-go does.
        let timeout_s = 300 + fastrand::u64(0..300);
        let mut url = self.pods_url();
        url.query_pairs_mut()
            .append_pair("watch", "true")
            .append_pair("allowWatchBookmarks", "true")
            .append_pair("resourceVersion", rv)
            .append_pair("timeoutSeconds", &timeout_s.to_string());
        let mut resp = self.get(url, Duration::from_secs(timeout_s + 30)).await?;
        let mut lines = Lines::default();
        let apply = |line: &[u8], rv: &mut String| -> Result<(), KubeApiError> {
            if apply_event(line, &self.ep.node, rv, index)? == Applied::Changed {
                let n = index.read().map(|i| i.len()).unwrap_or(0);
                metrics.pods.set(n as i64);
            }
            Ok(())
        };
        while let Some(chunk) = resp.chunk().await.map_err(classify)? {
            for line in lines.push(&chunk)? {
                apply(&line, rv)?;
            }
        }
        if let Some(line) = lines.rest() {
            apply(&line, rv)?;
        }
        Ok(())
    }
}

/// The body, refusing more than [`MAX_BODY`] bytes.
async fn read_bounded(mut resp: reqwest::Response) -> Result<Vec<u8>, KubeApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(classify)? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_BODY {
            return Err(KubeApiError::Decode(format!(
                "an answer longer than {MAX_BODY} bytes"
            )));
        }
    }
    Ok(body)
}

/// The `message` of a `Status` error body, else its first bytes as text.
async fn status_message(mut resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(c)) = resp.chunk().await {
        body.extend_from_slice(&c);
        if body.len() > 4096 {
            break;
        }
    }
    #[derive(Deserialize)]
    struct Status {
        message: Option<String>,
    }
    let msg = serde_json::from_slice::<Status>(&body)
        .ok()
        .and_then(|s| s.message)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
    msg.chars().take(512).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1e0c7a-2b3d-4e5f-8a9b-0c1d2e3f4a5b";
    const STATIC_HASH: &str = "8d5d9d1c6f3f0a7f2b1e4c3d2a1b0c9d";

    /// A pod as the API serves it (trimmed, but with the parts that must be
    /// skipped: status, a big annotation, unknown fields, nulls).
    fn pod_json(uid: &str, name: &str, sa: &str, rv: &str) -> serde_json::Value {
        serde_json::json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {
                "name": name, "namespace": "payments", "uid": uid, "resourceVersion": rv,
                "generateName": "payments-api-7d9f-", "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app": "payments-api", "pod-template-hash": "7d9f"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(10_000),
                    "prometheus.io/scrape": "true"
                },
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "payments-api-7d9f", "uid": "x", "controller": true}],
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
                "finalizers": null
            },
            "spec": {
                "serviceAccountName": sa, "serviceAccount": sa, "nodeName": "node-a",
                "containers": [{"name": "app", "image": "registry/app:1", "env": [{"name": "A", "value": "b"}]}],
                "volumes": [{"name": "kube-api-access-abcde", "projected": {"sources": []}}],
                "tolerations": null
            },
            "status": {"phase": "Running", "podIP": "10.0.0.7", "conditions": []}
        })
    }

    #[test]
    fn pod_list_keeps_only_what_is_used() {
        let list = serde_json::json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": "12345", "continue": ""},
            "items": [
                pod_json(UID, "payments-api-7d9f-abcde", "payments-api", "100"),
                // A mirror pod of a static pod, and a pod with nulls everywhere.
                {"metadata": {"name": "etcd-node-a", "namespace": "kube-system", "uid": "mirror-uid",
                              "annotations": {"kubernetes.io/config.mirror": STATIC_HASH, "kubernetes.io/config.hash": STATIC_HASH},
                              "labels": {"component": "etcd"}},
                 "spec": {"nodeName": "node-a", "serviceAccountName": null, "serviceAccount": "legacy"}},
                {"metadata": {"name": "bare", "uid": "bare-uid", "labels": null, "annotations": null}, "spec": null},
                {"metadata": {"name": "no-uid"}}
            ]
        });
        let list: PodList = serde_json::from_value(list).unwrap();
        assert_eq!(list.metadata.resource_version, "12345");
        assert!(list.metadata.continue_token.is_empty());
        let pods: Vec<ApiPod> = list
            .items
            .into_iter()
            .filter_map(|p| ApiPod::from_raw(p.metadata, p.spec))
            .collect();
        assert_eq!(pods.len(), 3, "a pod without uid is skipped: {pods:?}");
        assert_eq!(
            pods[0],
            ApiPod {
                uid: UID.into(),
                name: "payments-api-7d9f-abcde".into(),
                namespace: "payments".into(),
                service_account: Some("payments-api".into()),
                labels: [
                    ("app".to_string(), "payments-api".to_string()),
                    ("pod-template-hash".into(), "7d9f".into())
                ]
                .into(),
                mirror_of: None,
            }
        );
        assert_eq!(pods[1].mirror_of.as_deref(), Some(STATIC_HASH));
        assert_eq!(
            pods[1].service_account.as_deref(),
            Some("legacy"),
            "the deprecated field when serviceAccountName is null"
        );
        assert_eq!(pods[2].service_account, None);
        assert!(pods[2].labels.is_empty());

        let mut idx = PodIndex::default();
        idx.replace(pods);
        assert_eq!(idx.len(), 3);
        assert_eq!(
            idx.get(STATIC_HASH).map(|p| p.name.as_str()),
            Some("etcd-node-a"),
            "a static pod's cgroup UID finds its mirror pod"
        );
        idx.remove("mirror-uid");
        assert!(idx.get(STATIC_HASH).is_none() && idx.get("mirror-uid").is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"not json"[..],
            b"{\"type\": 3}",
            b"{\"type\": \"ADDED\", \"object\": {\"metadata\": {\"labels\": [1]}}}",
            b"{\"type\": \"ADDED\", \"object\": {\"metadata\": {\"annotations\": 7}}}",
        ] {
            let idx = RwLock::new(PodIndex::default());
            let mut rv = "1".to_string();
            let r = apply_event(bad, "node-a", &mut rv, &idx);
            assert!(
                matches!(r, Err(KubeApiError::Decode(_))),
                "{:?}: {r:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(serde_json::from_slice::<PodList>(b"{\"items\": {}}").is_err());
    }

    fn ev(kind: &str, obj: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"type": kind, "object": obj})).unwrap()
    }

    #[test]
    fn watch_events_update_the_cache_and_the_version() {
        let idx = RwLock::new(PodIndex::default());
        let mut rv = "10".to_string();
        let apply = |line: &[u8], rv: &mut String| apply_event(line, "node-a", rv, &idx);
        let added = ev("ADDED", pod_json(UID, "web-1", "web", "11"));
        assert_eq!(apply(&added, &mut rv).unwrap(), Applied::Changed);
        assert_eq!(rv, "11");
        assert_eq!(
            idx.read()
                .unwrap()
                .get(UID)
                .unwrap()
                .service_account
                .as_deref(),
            Some("web")
        );
        // The same pod again (a status change): nothing we keep changed.
        let same = ev("MODIFIED", pod_json(UID, "web-1", "web", "12"));
        assert_eq!(apply(&same, &mut rv).unwrap(), Applied::Unchanged);
        assert_eq!(rv, "12");
        let mut relabelled = pod_json(UID, "web-1", "web", "13");
        relabelled["metadata"]["labels"] = serde_json::json!({"app": "web", "tier": "front"});
        assert_eq!(
            apply(&ev("MODIFIED", relabelled), &mut rv).unwrap(),
            Applied::Changed
        );
        assert_eq!(
            idx.read()
                .unwrap()
                .get(UID)
                .unwrap()
                .labels
                .get("tier")
                .map(String::as_str),
            Some("front")
        );
        let bookmark = ev(
            "BOOKMARK",
            serde_json::json!({"kind": "Pod", "metadata": {"resourceVersion": "20"}}),
        );
        assert_eq!(apply(&bookmark, &mut rv).unwrap(), Applied::Unchanged);
        assert_eq!(rv, "20");
        // A pod of another node (field selector ignored) is never kept.
        let mut other = pod_json("other-uid", "x", "x", "21");
        other["spec"]["nodeName"] = "node-b".into();
        apply(&ev("ADDED", other), &mut rv).unwrap();
        assert!(idx.read().unwrap().get("other-uid").is_none());
        let deleted = ev("DELETED", pod_json(UID, "web-1", "web", "22"));
        assert_eq!(apply(&deleted, &mut rv).unwrap(), Applied::Changed);
        assert!(idx.read().unwrap().is_empty());
        assert_eq!(rv, "22");
        let gone = ev(
            "ERROR",
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": "too old resource version: 1 (22)", "reason": "Expired", "code": 410}),
        );
        assert!(matches!(apply(&gone, &mut rv), Err(KubeApiError::Gone)));
        let other_err = ev(
            "ERROR",
            serde_json::json!({"kind": "Status", "code": 500, "message": "etcd down"}),
        );
        match apply(&other_err, &mut rv) {
            Err(KubeApiError::Http(500, m)) => assert_eq!(m, "etcd down"),
            r => panic!("{r:?}"),
        }
        let unknown = ev("FUTURE", serde_json::json!({}));
        assert_eq!(apply(&unknown, &mut rv).unwrap(), Applied::Unchanged);
    }

    #[test]
    fn lines_across_chunks() {
        let mut l = Lines::default();
        assert!(l.push(b"{\"a\":").unwrap().is_empty());
        assert!(l.push(b"1}").unwrap().is_empty());
        let got = l.push(b"\n\n{\"b\":2}\n{\"c\"").unwrap();
        assert_eq!(got, vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        assert!(l.push(b":3}").unwrap().is_empty());
        assert_eq!(l.rest(), Some(b"{\"c\":3}".to_vec()));
        let mut l = Lines::default();
        l.push(b"x\n  \n").unwrap();
        assert_eq!(l.rest(), None);
    }

    fn info(namespace: Option<&str>, pod: Option<&str>) -> WorkloadInfo {
        WorkloadInfo {
            cgroup_id: 7,
            cgroup_path: "/kubepods/x".into(),
            live: true,
            namespace: namespace.map(Into::into),
            pod_name: pod.map(Into::into),
            labels: [
                ("io.kubernetes.pod.uid".to_string(), UID.to_string()),
                ("app".into(), "old".into()),
            ]
            .into(),
            container_name: Some("app".into()),
            image: Some("registry/app:1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn merge_with_cri() {
        let mut idx = PodIndex::default();
        idx.replace(vec![ApiPod {
            uid: UID.into(),
            name: "api-name".into(),
            namespace: "api-ns".into(),
            service_account: Some("payments-api".into()),
            labels: [("app".to_string(), "payments-api".to_string())].into(),
            mirror_of: None,
        }]);
        // CRI knew the pod: names stay CRI's, SA and labels are the API's.
        let mut w = info(Some("cri-ns"), Some("cri-name"));
        assert!(idx.enrich(UID, &mut w));
        assert_eq!(w.service_account.as_deref(), Some("payments-api"));
        assert_eq!(
            w.labels,
            [("app".to_string(), "payments-api".to_string())].into()
        );
        assert_eq!(
            (w.namespace.as_deref(), w.pod_name.as_deref()),
            (Some("cri-ns"), Some("cri-name"))
        );
        assert_eq!(
            (w.container_name.as_deref(), w.image.as_deref()),
            (Some("app"), Some("registry/app:1"))
        );
        // No CRI: the API names the pod.
        let mut w = info(None, None);
        idx.enrich(UID, &mut w);
        assert_eq!(
            (w.namespace.as_deref(), w.pod_name.as_deref()),
            (Some("api-ns"), Some("api-name"))
        );
        // An unknown pod is left as it was.
        let before = info(Some("cri-ns"), None);
        let mut w = before.clone();
        assert!(!idx.enrich("unknown", &mut w));
        assert_eq!(w, before);
        // And the finding's workload carries them.
        let mut w = info(None, None);
        w.pod =
            crate::attribution::parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/abc"));
        idx.enrich(UID, &mut w);
        let f = w.to_workload();
        assert_eq!(f.service_account.as_deref(), Some("payments-api"));
        assert_eq!(
            f.labels.get("app").map(String::as_str),
            Some("payments-api")
        );
    }

    #[test]
    fn endpoints() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let cfg = KubeApiConfig::default();
        assert_eq!(cfg.endpoint(env(&[])), Err(Disabled::NotInCluster));
        let in_cluster = env(&[
            ("KUBERNETES_SERVICE_HOST", "fd00::1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("NODE_NAME", "node-a"),
        ]);
        let ep = cfg.endpoint(in_cluster).unwrap();
        assert_eq!(ep.base.as_str(), "https://[fd00::1]/");
        assert_eq!(ep.node, "node-a");
        let ep = KubeApiConfig {
            node_name: Some("node-b".into()),
            ..Default::default()
        }
        .endpoint(in_cluster)
        .unwrap();
        assert_eq!(ep.node, "node-b", "--node-name wins over NODE_NAME");
        assert_eq!(
            cfg.endpoint(env(&[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "6443"),
            ])),
            Err(Disabled::NoNodeName)
        );
        let off = KubeApiConfig {
            mode: KubeApiMode::Off,
            ..Default::default()
        };
        assert_eq!(off.endpoint(in_cluster), Err(Disabled::Off));
        // Plain http never carries a token, even one given explicitly.
        let http = KubeApiConfig {
            mode: KubeApiMode::parse("http://127.0.0.1:8001").unwrap(),
            token_file: Some("/tmp/token".into()),
            ca_file: Some("/tmp/ca.crt".into()),
            node_name: Some("n".into()),
        };
        let ep = http.endpoint(env(&[])).unwrap();
        assert_eq!((ep.token_file, ep.ca_file), (None, None));
        let https = KubeApiConfig {
            mode: KubeApiMode::parse("https://api.example:6443/prefix/").unwrap(),
            token_file: Some("/tmp/token".into()),
            node_name: Some("n".into()),
            ..Default::default()
        };
        let ep = https.endpoint(env(&[])).unwrap();
        assert_eq!(ep.token_file.as_deref(), Some(Path::new("/tmp/token")));
        let c = Client::new(&ep).unwrap();
        let u = c.pods_url();
        assert_eq!(u.path(), "/prefix/api/v1/pods");
        assert_eq!(
            u.query_pairs().collect::<Vec<_>>(),
            vec![("fieldSelector".into(), "spec.nodeName=n".into())]
        );
        for bad in [
            "ftp://x",
            "localhost:8080",
            "http://x?a=b",
            "https://u:p@x",
            "",
        ] {
            assert!(KubeApiMode::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(KubeApiMode::parse("off"), Ok(KubeApiMode::Off));
        let m: KubeApiMode = serde_norway::from_str("false").unwrap();
        assert_eq!(m, KubeApiMode::Off);
        let m: KubeApiMode = serde_norway::from_str("\"auto\"").unwrap();
        assert_eq!(m, KubeApiMode::Auto);
        assert!(serde_norway::from_str::<KubeApiMode>("\"nope\"").is_err());
    }

    #[test]
    fn complaints_are_rate_limited() {
        let mut c = Complaints::default();
        assert!(c.failed("connect"), "the first failure warns");
        assert!(!c.failed("connect"), "the next ones do not");
        assert!(
            !c.failed("unauthorized"),
            "a new reason only after a minute"
        );
        c.last_warn = Some(Instant::now() - WARN_NEW_REASON);
        assert!(c.failed("unauthorized"));
        assert!(!c.failed("unauthorized"));
        c.last_warn = Some(Instant::now() - WARN_AGAIN);
        assert!(c.failed("unauthorized"), "again after 5 minutes");
        assert_eq!(c.recovered(), (6, true), "the first recovery is told");
        // Flapping: list works, the watch fails, again and again.
        assert!(
            !c.failed("connect"),
            "a new streak within a minute is quiet"
        );
        assert_eq!(c.recovered(), (1, false), "and so is its recovery");
        c.last_warn = Some(Instant::now() - WARN_NEW_REASON);
        c.last_recovery_note = Some(Instant::now() - WARN_NEW_REASON);
        assert!(c.failed("connect"), "a new streak a minute later warns");
        assert_eq!(c.recovered(), (1, true));
        assert_eq!(c.recovered(), (0, false), "no streak, nothing to tell");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new();
        let steps: Vec<Duration> = (0..10).map(|_| b.step()).collect();
        assert!(steps[0] >= BACKOFF_MIN / 2 && steps[0] <= BACKOFF_MIN);
        assert!(steps.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(steps[9] >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.step() <= BACKOFF_MIN);
    }

    #[test]
    fn tls_errors_are_told_apart() {
        let inner = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(is_tls(&inner));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!is_tls(&plain));
        // Nested, as hyper-rustls hands tokio-rustls' error on.
        let nested = std::io::Error::other(inner);
        assert!(is_tls(&nested));
        assert!(!is_tls(&std::io::Error::other(plain)));
    }
}
