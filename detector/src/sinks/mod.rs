//! Where findings go: JSON lines (stdout or a rotated file), a webhook with an
//! on-disk spool, syslog (RFC 5424 over UDP or TCP, JSON or CEF payload) and
//! OCSF Detection Findings.
//!
//! [`SinkSet::emit`] never blocks and never does I/O: every sink has its own
//! bounded in-memory queue drained by its own worker (a thread for file
//! sinks and the spool writer, a tokio task for network sinks). When a queue is
//! full the finding is dropped *for that sink* and counted in
//! `detector_sink_dropped_total{reason="queue_full"}`. The webhook's queue only
//! feeds its spool writer, which appends every finding to disk (fsync) before
//! delivery is attempted, so a slow or dead receiver never fills that queue;
//! only the spool's own bound (`spool_max_bytes`) can make it lose findings,
//! and those are counted (`reason="spool_full"`).
//!
//! Configuration (YAML, e.g. a `sinks:` section of the daemon's config file):
//! ```yaml
//! queue_capacity: 4096            # per sink
//! jsonl: {path: /var/log/detector/alerts.jsonl, max_bytes: 104857600, keep: 5}   # omitted: stdout; null: off
//! webhook:
//!   url: https://soc.example/ingest
//!   batch_max: 100
//!   flush_interval: 1s
//!   timeout: 10s
//!   spool_dir: /var/lib/detector/spool/webhook
//!   spool_max_bytes: 268435456
//!   headers: {Authorization: "Bearer …"}
//!   format: finding                # or ocsf
//!   retry_initial: 500ms
//!   retry_max: 60s
//! syslog: {address: "collector:514", transport: tcp, format: cef, app_name: detector, facility: auth}
//! ocsf: {path: /var/log/detector/ocsf.jsonl}
//! ```
//!
//! Metrics (all labelled `sink` ∈ {jsonl, webhook, syslog, ocsf}):
//! `detector_sink_queue_depth`, `detector_sink_queue_capacity`,
//! `detector_sink_sent_total`, `detector_sink_failed_total` (failed delivery
//! attempts), `detector_sink_dropped_total{reason}` (findings lost; reason ∈
//! queue_full, spool_full, rejected, error, corrupt),
//! `detector_sink_spooled_total`, `detector_sink_spool_bytes`.

mod cef;
mod file;
mod ocsf;
mod spool;
mod syslog;
mod webhook;

use std::{collections::BTreeMap, fmt, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::finding::Finding;

pub use cef::render as render_cef;
pub use ocsf::{render as render_ocsf, OCSF_VERSION};
pub use syslog::render_rfc5424;

/// Configuration of all sinks. Every sink is optional. A missing `jsonl`
/// key means JSON lines to stdout (the default of `detector run`); an
/// explicit `jsonl: null` turns it off.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    #[serde(default = "default_jsonl")]
    pub jsonl: Option<JsonlConfig>,
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    #[serde(default)]
    pub syslog: Option<SyslogConfig>,
    #[serde(default)]
    pub ocsf: Option<OcsfConfig>,
    /// Capacity of each sink's in-memory queue, in findings.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
}

impl Default for SinksConfig {
    fn default() -> Self {
        SinksConfig {
            jsonl: default_jsonl(),
            webhook: None,
            syslog: None,
            ocsf: None,
            queue_capacity: default_queue_capacity(),
        }
    }
}

/// Largest `queue_capacity`: a million findings in memory per sink is
/// already far more than a burst needs (tokio's channel would panic near
/// `usize::MAX >> 3`).
pub const MAX_QUEUE_CAPACITY: usize = 1_000_000;
/// Largest `keep` of a rotated file: each rotation renames every kept file.
pub const MAX_KEEP: u32 = 1000;
/// Largest webhook `batch_max`.
pub const MAX_BATCH: usize = 100_000;

impl SinksConfig {
    /// Values that parse but would break a sink or the daemon, as (field
    /// path relative to `sinks`, why). Checked when the config file is read,
    /// so the error names the file and line rather than failing at start-up.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut bad = |path: &str, why: String| out.push((path.to_string(), why));
        if self.queue_capacity == 0 || self.queue_capacity > MAX_QUEUE_CAPACITY {
            bad(
                "queue_capacity",
                format!(
                    "{} is out of range; expected 1 to {MAX_QUEUE_CAPACITY}",
                    self.queue_capacity
                ),
            );
        }
        let keep = |name: &str, keep: u32, bad: &mut dyn FnMut(&str, String)| {
            if keep > MAX_KEEP {
                bad(
                    &format!("{name}.keep"),
                    format!("{keep} is out of range; expected 0 to {MAX_KEEP}"),
                );
            }
        };
        if let Some(j) = &self.jsonl {
            keep("jsonl", j.keep, &mut bad);
        }
        if let Some(o) = &self.ocsf {
            keep("ocsf", o.keep, &mut bad);
        }
        if let Some(w) = &self.webhook {
            match reqwest::Url::parse(&w.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(u) => bad(
                    "webhook.url",
                    format!("scheme {:?}; expected http or https", u.scheme()),
                ),
                Err(e) => bad("webhook.url", format!("not a URL: {e}")),
            }
            if w.batch_max == 0 || w.batch_max > MAX_BATCH {
                bad(
                    "webhook.batch_max",
                    format!("{} is out of range; expected 1 to {MAX_BATCH}", w.batch_max),
                );
            }
            for (name, d) in [
                ("flush_interval", w.flush_interval),
                ("timeout", w.timeout),
                ("retry_initial", w.retry_initial),
                ("retry_max", w.retry_max),
            ] {
                if let Err(why) = crate::cli::check_duration(d) {
                    bad(&format!("webhook.{name}"), why);
                }
            }
            for (k, v) in &w.headers {
                if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                    bad("webhook.headers", format!("invalid header name {k:?}"));
                }
                // The value may be a secret: never echo it.
                if http::HeaderValue::from_str(v).is_err() {
                    bad(
                        "webhook.headers",
                        format!("invalid value of header {k:?} (not shown)"),
                    );
                }
            }
        }
        if let Some(sl) = &self.syslog {
            if let Err(e) = syslog::facility_number(&sl.facility) {
                bad("syslog.facility", e.to_string());
            }
            if sl.address.trim().is_empty() {
                bad("syslog.address", "must not be empty (host:port)".into());
            }
        }
        out
    }
}

fn default_jsonl() -> Option<JsonlConfig> {
    Some(JsonlConfig::default())
}
fn default_queue_capacity() -> usize {
    4096
}

/// JSON lines, one finding per line.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// File path, or `-` for stdout.
    #[serde(default = "dash")]
    pub path: String,
    /// Rotate when the file would grow beyond this many bytes (0 = never).
    /// Ignored for stdout.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept: `path.1` (newest) … `path.<keep>`.
    #[serde(default = "default_keep")]
    pub keep: u32,
}

impl Default for JsonlConfig {
    fn default() -> Self {
        JsonlConfig {
            path: dash(),
            max_bytes: default_max_bytes(),
            keep: default_keep(),
        }
    }
}

impl JsonlConfig {
    /// JSON lines to `path` (`-` = stdout) with the default rotation.
    pub fn new(path: impl Into<String>) -> Self {
        JsonlConfig {
            path: path.into(),
            ..Default::default()
        }
    }
}

fn dash() -> String {
    "-".into()
}
fn default_max_bytes() -> u64 {
    100 << 20
}
fn default_keep() -> u32 {
    5
}

/// OCSF 1.x Detection Findings (class 2004) as JSON lines.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OcsfConfig {
    /// File path, or `-` for stdout.
    pub path: String,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_keep")]
    pub keep: u32,
}

/// What the webhook posts: a JSON array of findings as in the contract, or of
/// OCSF Detection Findings.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    #[default]
    Finding,
    Ocsf,
}

/// HTTP POST of JSON arrays, in batches, through an on-disk spool.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Findings per POST, at most.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// How long a partial batch waits for more findings (e.g. `1s`, `250ms`).
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Timeout of one POST, connection included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Directory of the spool (created if missing). One webhook per directory.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// Bound of the spool on disk; findings beyond it are counted as dropped.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Extra request headers (e.g. an `Authorization` for the SOC's
    /// collector). Never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub format: PayloadFormat,
    /// First retry delay; doubles up to `retry_max`, with jitter.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
}

impl WebhookConfig {
    pub fn new(url: impl Into<String>, spool_dir: impl Into<PathBuf>) -> Self {
        WebhookConfig {
            url: url.into(),
            batch_max: default_batch_max(),
            flush_interval: default_flush_interval(),
            timeout: default_timeout(),
            spool_dir: spool_dir.into(),
            spool_max_bytes: default_spool_max_bytes(),
            headers: BTreeMap::new(),
            format: PayloadFormat::Finding,
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
        }
    }
}

impl fmt::Debug for WebhookConfig {
    // Header values may be secrets (collector tokens): never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("batch_max", &self.batch_max)
            .field("flush_interval", &self.flush_interval)
            .field("timeout", &self.timeout)
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .field(
                "headers",
                &self
                    .headers
                    .keys()
                    .map(|k| (k, "<redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("format", &self.format)
            .field("retry_initial", &self.retry_initial)
            .field("retry_max", &self.retry_max)
            .finish()
    }
}

fn default_batch_max() -> usize {
    100
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("/var/lib/detector/spool/webhook")
}
fn default_spool_max_bytes() -> u64 {
    256 << 20
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(500)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyslogTransport {
    #[default]
    Udp,
    /// TCP with octet-counting framing (RFC 6587 3.4.1).
    Tcp,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyslogFormat {
    /// RFC 5424 with structured data; MSG is the finding as JSON.
    #[default]
    Rfc5424,
    /// RFC 5424 header and structured data; MSG is a CEF record.
    Cef,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// `host:port` of the collector.
    pub address: String,
    #[serde(default)]
    pub transport: SyslogTransport,
    #[serde(default)]
    pub format: SyslogFormat,
    #[serde(default = "default_app_name")]
    pub app_name: String,
    /// Facility name (`auth`, `authpriv`, `local0` … `local7`, …) or number.
    #[serde(default = "default_facility")]
    pub facility: String,
    /// HOSTNAME field; default `$NODE_NAME`, else the kernel's host name.
    #[serde(default)]
    pub hostname: Option<String>,
}

impl SyslogConfig {
    pub fn new(
        address: impl Into<String>,
        transport: SyslogTransport,
        format: SyslogFormat,
    ) -> Self {
        SyslogConfig {
            address: address.into(),
            transport,
            format,
            app_name: default_app_name(),
            facility: default_facility(),
            hostname: None,
        }
    }
}

fn default_app_name() -> String {
    "detector".into()
}
fn default_facility() -> String {
    "auth".into()
}

/// Name of the node, for syslog HOSTNAME and OCSF `device.hostname`.
pub(crate) fn node_name() -> String {
    if let Ok(n) = std::env::var("NODE_NAME") {
        if !n.trim().is_empty() {
            return n.trim().to_string();
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The `sink` label values.
pub const SINK_NAMES: [&str; 4] = ["jsonl", "webhook", "syslog", "ocsf"];

/// Per-sink collectors, registered once per [`SinkSet`].
#[derive(Clone)]
struct Collectors {
    queue_depth: IntGaugeVec,
    queue_capacity: IntGaugeVec,
    sent: IntCounterVec,
    failed: IntCounterVec,
    dropped: IntCounterVec,
    spooled: IntCounterVec,
    spool_bytes: IntGaugeVec,
}

impl Collectors {
    fn new() -> Result<Self> {
        let gauge = |n: &str, h: &str| IntGaugeVec::new(Opts::new(n, h), &["sink"]);
        let counter = |n: &str, h: &str, l: &[&str]| IntCounterVec::new(Opts::new(n, h), l);
        Ok(Collectors {
            queue_depth: gauge("detector_sink_queue_depth", "Findings waiting in the sink's in-memory queue.")?,
            queue_capacity: gauge("detector_sink_queue_capacity", "Capacity of the sink's in-memory queue.")?,
            sent: counter("detector_sink_sent_total", "Findings delivered by the sink.", &["sink"])?,
            failed: counter(
                "detector_sink_failed_total",
                "Failed delivery attempts (a failed write, connection or POST; may be retried).",
                &["sink"],
            )?,
            dropped: counter(
                "detector_sink_dropped_total",
                "Findings the sink lost, by reason (queue_full, spool_full, rejected, error, corrupt).",
                &["sink", "reason"],
            )?,
            spooled: counter("detector_sink_spooled_total", "Findings written to the sink's on-disk spool.", &["sink"])?,
            spool_bytes: gauge("detector_sink_spool_bytes", "Bytes of the sink's on-disk spool.")?,
        })
    }

    fn boxed(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.queue_depth.clone()),
            Box::new(self.queue_capacity.clone()),
            Box::new(self.sent.clone()),
            Box::new(self.failed.clone()),
            Box::new(self.dropped.clone()),
            Box::new(self.spooled.clone()),
            Box::new(self.spool_bytes.clone()),
        ]
    }

    fn for_sink(&self, sink: &'static str) -> SinkMetrics {
        let dropped = |r: &str| self.dropped.with_label_values(&[sink, r]);
        SinkMetrics {
            queue_depth: self.queue_depth.with_label_values(&[sink]),
            sent: self.sent.with_label_values(&[sink]),
            failed: self.failed.with_label_values(&[sink]),
            dropped_queue_full: dropped("queue_full"),
            dropped_error: dropped("error"),
            dropped_spool_full: dropped("spool_full"),
            dropped_rejected: dropped("rejected"),
            dropped_corrupt: dropped("corrupt"),
            spooled: self.spooled.with_label_values(&[sink]),
            spool_bytes: self.spool_bytes.with_label_values(&[sink]),
        }
    }
}

/// The counters of one sink, shared by `emit` and its worker.
#[derive(Clone)]
pub(crate) struct SinkMetrics {
    pub queue_depth: IntGauge,
    pub sent: IntCounter,
    pub failed: IntCounter,
    pub dropped_queue_full: IntCounter,
    pub dropped_error: IntCounter,
    pub dropped_spool_full: IntCounter,
    pub dropped_rejected: IntCounter,
    pub dropped_corrupt: IntCounter,
    pub spooled: IntCounter,
    pub spool_bytes: IntGauge,
}

/// A snapshot of one sink's counters (the same numbers as its metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Findings in the in-memory queue now.
    pub queue_depth: i64,
    pub sent: u64,
    pub failed: u64,
    /// All reasons together.
    pub dropped: u64,
    pub dropped_queue_full: u64,
    pub dropped_spool_full: u64,
    /// Rejected by the receiver (webhook 4xx other than 401/403/404/408/429).
    pub dropped_rejected: u64,
    pub spooled: u64,
    pub spool_bytes: i64,
}

impl SinkMetrics {
    fn stats(&self) -> SinkStats {
        let dropped_queue_full = self.dropped_queue_full.get();
        let dropped_spool_full = self.dropped_spool_full.get();
        let dropped_rejected = self.dropped_rejected.get();
        SinkStats {
            queue_depth: self.queue_depth.get(),
            sent: self.sent.get(),
            failed: self.failed.get(),
            dropped: dropped_queue_full
                + dropped_spool_full
                + self.dropped_error.get()
                + dropped_rejected
                + self.dropped_corrupt.get(),
            dropped_queue_full,
            dropped_spool_full,
            dropped_rejected,
            spooled: self.spooled.get(),
            spool_bytes: self.spool_bytes.get(),
        }
    }
}

type Item = Arc<Finding>;

/// How a worker ends: a thread or task signals `done` when it has drained its
/// queue; `tasks` are aborted after that (or on drop), e.g. webhook delivery
/// or a syslog task still retrying.
struct Worker {
    done: Option<oneshot::Receiver<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Sink {
    name: &'static str,
    tx: Option<mpsc::Sender<Item>>,
    metrics: SinkMetrics,
    worker: Worker,
}

/// The configured sinks. Create one with [`SinkSet::new`], hand findings to
/// [`SinkSet::emit`], and call [`SinkSet::shutdown`] on exit to flush.
pub struct SinkSet {
    sinks: Vec<Sink>,
    registry: Registry,
    collectors: Collectors,
}

impl SinkSet {
    /// Open every configured sink and register the `detector_sink_*`
    /// collectors in `registry` (they are unregistered when the set is
    /// dropped, so a set can be re-created on the same registry).
    ///
    /// Must be called inside a tokio runtime when a webhook or syslog sink is
    /// configured (their workers are tasks). Errors on a bad configuration or
    /// a file, directory or address that cannot be opened.
    pub fn new(config: &SinksConfig, registry: &Registry) -> Result<SinkSet> {
        let collectors = Collectors::new()?;
        let boxed = collectors.boxed();
        for (i, c) in boxed.into_iter().enumerate() {
            if let Err(e) = registry.register(c) {
                for c in collectors.boxed().into_iter().take(i) {
                    let _ = registry.unregister(c);
                }
                return Err(e).context("register the detector_sink_* metrics");
            }
        }
        // From here on, dropping `set` (also on an error) unregisters the
        // collectors and stops the workers already started.
        let mut set = SinkSet {
            sinks: Vec::new(),
            registry: registry.clone(),
            collectors,
        };
        let cap = config.queue_capacity.max(1);
        let mk = |set: &SinkSet, name: &'static str| {
            set.collectors
                .queue_capacity
                .with_label_values(&[name])
                .set(cap as i64);
            set.collectors.for_sink(name)
        };
        if let Some(c) = &config.jsonl {
            let m = mk(&set, "jsonl");
            let (tx, rx) = mpsc::channel(cap);
            let worker = file::spawn(
                "jsonl",
                &c.path,
                c.max_bytes,
                c.keep,
                file::Render::Json,
                rx,
                m.clone(),
            )
            .context("jsonl sink")?;
            set.sinks.push(Sink {
                name: "jsonl",
                tx: Some(tx),
                metrics: m,
                worker,
            });
        }
        if let Some(c) = &config.ocsf {
            let m = mk(&set, "ocsf");
            let (tx, rx) = mpsc::channel(cap);
            let worker = file::spawn(
                "ocsf",
                &c.path,
                c.max_bytes,
                c.keep,
                file::Render::Ocsf,
                rx,
                m.clone(),
            )
            .context("ocsf sink")?;
            set.sinks.push(Sink {
                name: "ocsf",
                tx: Some(tx),
                metrics: m,
                worker,
            });
        }
        if let Some(c) = &config.syslog {
            let m = mk(&set, "syslog");
            let (tx, rx) = mpsc::channel(cap);
            let worker = syslog::spawn(c, rx, m.clone()).context("syslog sink")?;
            set.sinks.push(Sink {
                name: "syslog",
                tx: Some(tx),
                metrics: m,
                worker,
            });
        }
        if let Some(c) = &config.webhook {
            let m = mk(&set, "webhook");
            let (tx, rx) = mpsc::channel(cap);
            let worker = webhook::spawn(c, rx, m.clone()).context("webhook sink")?;
            set.sinks.push(Sink {
                name: "webhook",
                tx: Some(tx),
                metrics: m,
                worker,
            });
        }
        Ok(set)
    }

    /// Hand a finding to every sink. Never blocks and never does I/O: a
    /// sink whose queue is full drops it and counts the drop.
    pub fn emit(&self, finding: &Finding) {
        if self.sinks.is_empty() {
            return;
        }
        let item = Arc::new(finding.clone());
        for s in &self.sinks {
            let Some(tx) = &s.tx else { continue };
            if tx.try_send(item.clone()).is_err() {
                s.metrics.dropped_queue_full.inc();
            }
            s.metrics
                .queue_depth
                .set((tx.max_capacity() - tx.capacity()) as i64);
        }
    }

    /// Names of the configured sinks (`jsonl`, `webhook`, `syslog`, `ocsf`).
    pub fn names(&self) -> Vec<&'static str> {
        self.sinks.iter().map(|s| s.name).collect()
    }

    /// Counters of one sink, if configured.
    pub fn stats(&self, sink: &str) -> Option<SinkStats> {
        self.sinks
            .iter()
            .find(|s| s.name == sink)
            .map(|s| s.metrics.stats())
    }

    /// Close the queues and wait (at most `timeout`) until every sink has
    /// written or spooled what it holds. The webhook's undelivered findings
    /// stay in its spool for the next start.
    pub async fn shutdown(mut self, timeout: Duration) {
        for s in &mut self.sinks {
            s.tx = None;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        for s in &mut self.sinks {
            if let Some(done) = s.worker.done.take() {
                if tokio::time::timeout_at(deadline, done).await.is_err() {
                    tracing::warn!(
                        sink = s.name,
                        "sink did not drain before the shutdown timeout"
                    );
                }
            }
        }
        for s in &mut self.sinks {
            for t in s.worker.tasks.drain(..) {
                t.abort();
                let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), t).await;
            }
        }
    }
}

impl Drop for SinkSet {
    fn drop(&mut self) {
        for s in &mut self.sinks {
            s.tx = None;
            for t in &s.worker.tasks {
                t.abort();
            }
        }
        for c in self.collectors.boxed() {
            let _ = self.registry.unregister(c);
        }
    }
}

/// Exponential backoff with jitter: `initial * 2^attempt`, capped at `max`,
/// then a uniformly random delay in [d/2, d].
pub(crate) fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let d = initial
        .saturating_mul(1u32 << attempt.min(20))
        .min(max)
        .max(Duration::from_millis(1));
    let half = d / 2;
    half + Duration::from_nanos(fastrand::u64(0..=(d - half).as_nanos() as u64))
}

#[cfg(test)]
pub(crate) mod testutil {
    use crate::finding::*;

    /// A fresh directory under the temp dir, removed on drop (also when
    /// the test panics).
    pub struct TempDir(pub std::path::PathBuf);

    impl TempDir {
        pub fn new(name: &str) -> Self {
            let d =
                std::env::temp_dir().join(format!("detector-{name}-unit-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub fn sample(i: u32) -> Finding {
        Finding {
            time: format!("2026-11-23T10:00:{:02}.{:03}Z", i % 60, i % 1000),
            kind: FindingKind::UnexpectedDestination,
            severity: Severity::High,
            action: Action::Blocked,
            intent: Some("payments/payments-api".into()),
            workload: Workload {
                pod_uid: Some("0b7c6a38-4d1e-4c52-9a7e-2f1d3c4b5a69".into()),
                namespace: Some("payments".into()),
                pod: Some("payments-api-7d9f".into()),
                container_id: Some("3f2a".repeat(16)),
                cgroup_id: 123,
                cgroup_path: Some("/kubepods.slice/x.scope".into()),
                ..Default::default()
            },
            process: Process {
                pid: 42 + i,
                ppid: 1,
                exe: Some("/usr/bin/curl".into()),
                comm: "curl".into(),
                ancestry: vec!["/bin/sh".into(), "/app/server".into()],
                uid: Some(1000),
            },
            credential: Some(Credential {
                kind: "kubernetes-serviceaccount".into(),
                path:
                    "/var/lib/kubelet/pods/x/volumes/kubernetes.io~projected/kube-api-access/token"
                        .into(),
                owner_pod_uid: Some("0b7c6a38-4d1e-4c52-9a7e-2f1d3c4b5a69".into()),
                inode: 7,
                dev: 39,
            }),
            destination: Some(Destination {
                ip: "10.0.0.7".parse().unwrap(),
                port: 443,
                protocol: "tcp".into(),
            }),
            mitre: vec!["T1528".into(), "T1550.001".into()],
            count: 1,
            message: format!(
                "curl (pid {}) used the payments-api token towards 10.0.0.7:443",
                42 + i
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_yaml() {
        let c: SinksConfig = serde_norway::from_str("{}").unwrap();
        assert_eq!(c.jsonl, Some(JsonlConfig::default()));
        assert!(c.webhook.is_none());
        let c: SinksConfig = serde_norway::from_str(
            "jsonl: null\nwebhook: {url: 'http://127.0.0.1:9/x', flush_interval: 250ms, spool_dir: /tmp/s, headers: {Authorization: secret}}\nsyslog: {address: '127.0.0.1:514', transport: tcp, format: cef}\nocsf: {path: /tmp/o.jsonl}\n",
        )
        .unwrap();
        assert!(c.jsonl.is_none());
        let w = c.webhook.unwrap();
        assert_eq!(w.flush_interval, Duration::from_millis(250));
        assert_eq!(w.batch_max, 100);
        assert!(!format!("{w:?}").contains("secret"));
        let s = c.syslog.unwrap();
        assert_eq!(
            (s.transport, s.format),
            (SyslogTransport::Tcp, SyslogFormat::Cef)
        );
        assert!(serde_norway::from_str::<SinksConfig>("bogus: 1").is_err());
    }

    #[test]
    fn sink_set_is_shareable() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<SinkSet>();
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(5));
        for a in 0..40 {
            let d = backoff(i, m, a);
            let full = i.saturating_mul(1 << a.min(20)).min(m);
            assert!(d >= full / 2 && d <= full, "{a}: {d:?}");
        }
    }

    #[tokio::test]
    async fn emit_to_a_full_queue_counts_drops() {
        let dir = testutil::TempDir::new("sinks");
        let path = dir.0.join("a.jsonl");
        let reg = Registry::new();
        let cfg = SinksConfig {
            jsonl: Some(JsonlConfig::new(path.to_str().unwrap())),
            queue_capacity: 4,
            ..Default::default()
        };
        let set = SinkSet::new(&cfg, &reg).unwrap();
        for i in 0..1000 {
            set.emit(&testutil::sample(i));
        }
        let st = set.stats("jsonl").unwrap();
        set.shutdown(Duration::from_secs(10)).await;
        let lines = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        assert_eq!(st.dropped_queue_full + lines, 1000, "{st:?}");
        assert!(reg.gather().is_empty(), "collectors unregistered on drop");
        // The registry accepts a new set after the old one is gone.
        let set = SinkSet::new(&cfg, &reg).unwrap();
        assert!(reg
            .gather()
            .iter()
            .any(|m| m.name() == "detector_sink_sent_total"));
        drop(set);
    }
}
