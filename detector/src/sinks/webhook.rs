//! Webhook: HTTP POST of JSON arrays (findings or OCSF), in batches, through
//! the on-disk spool.
//!
//! `emit` → bounded queue → writer thread (appends to the spool, fsync) →
//! delivery task (reads the spool oldest first, POSTs, acks). A POST that
//! fails (connection error, timeout, 5xx, 3xx, 401, 403, 404, 408, 429) is
//! retried with exponential backoff and jitter, without limit: the findings
//! stay in the spool meanwhile, also across a restart. Other 4xx answers
//! reject the batch: it is dropped and counted (`reason="rejected"`) so that
//! one bad batch cannot stall the feed forever.

use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::{mpsc, oneshot};

use super::{
    spool::{Batch, Cursor, Spool, SpoolWriter},
    Item, PayloadFormat, SinkMetrics, WebhookConfig, Worker,
};
use crate::finding::Finding;

const WRITE_BATCH: usize = 512;
const MAX_READ: usize = 8 << 20;

pub(crate) fn spawn(c: &WebhookConfig, rx: mpsc::Receiver<Item>, m: SinkMetrics) -> Result<Worker> {
    let url = reqwest::Url::parse(&c.url).with_context(|| format!("webhook url {:?}", c.url))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("webhook url must be http or https, not {}", url.scheme());
    }
    if c.batch_max == 0 {
        bail!("webhook batch_max must be at least 1");
    }
    let rt =
        tokio::runtime::Handle::try_current().context("the webhook sink needs a tokio runtime")?;
    // reqwest is built without a default TLS crypto provider: use ring unless
    // the process already chose one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in &c.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .with_context(|| format!("webhook header name {k:?}"))?;
        // The value may be a secret: never echo it.
        let mut value = HeaderValue::from_str(v)
            .map_err(|_| anyhow::anyhow!("invalid value of webhook header {k}"))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("detector/", env!("CARGO_PKG_VERSION")))
        .timeout(c.timeout)
        .connect_timeout(c.timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("webhook http client")?;

    let (spool, writer) = Spool::open(&c.spool_dir, c.spool_max_bytes, m.clone())
        .with_context(|| format!("webhook spool {}", c.spool_dir.display()))?;

    let (done_tx, done) = oneshot::channel();
    let wm = m.clone();
    std::thread::Builder::new()
        .name("sink-webhook-spool".into())
        .spawn(move || {
            write_loop(rx, writer, &wm);
            let _ = done_tx.send(());
        })
        .context("spawn the spool writer")?;

    let d = Delivery {
        client,
        url,
        format: c.format,
        batch_max: c.batch_max,
        flush_interval: c.flush_interval,
        retry_initial: c.retry_initial,
        retry_max: c.retry_max.max(c.retry_initial),
        host: super::node_name(),
        spool,
        m,
    };
    let task = rt.spawn(d.run());
    Ok(Worker {
        done: Some(done),
        tasks: vec![task],
    })
}

/// Moves findings from the queue into the spool until the queue closes.
fn write_loop(mut rx: mpsc::Receiver<Item>, mut w: SpoolWriter, m: &SinkMetrics) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while let Some(f) = rx.blocking_recv() {
        batch.push(f);
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        m.queue_depth.set(rx.len() as i64);
        let lines: Vec<Vec<u8>> = batch
            .drain(..)
            .map(|f| {
                let mut l = serde_json::to_vec(&*f).expect("a finding always serialises");
                l.push(b'\n');
                l
            })
            .collect();
        match w.append(&lines) {
            Ok(r) => {
                m.spooled.inc_by(r.stored);
                if r.full > 0 {
                    m.dropped_spool_full.inc_by(r.full);
                    tracing::warn!(dropped = r.full, "webhook spool full: findings dropped");
                }
            }
            Err(e) => {
                m.failed.inc();
                m.dropped_error.inc_by(lines.len() as u64);
                tracing::warn!(error = %e, dropped = lines.len(), "webhook spool write failed: findings dropped");
            }
        }
    }
}

struct Delivery {
    client: reqwest::Client,
    url: reqwest::Url,
    format: PayloadFormat,
    batch_max: usize,
    flush_interval: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    host: String,
    spool: Arc<Spool>,
    m: SinkMetrics,
}

enum PostError {
    Retry(String),
    Rejected(reqwest::StatusCode),
}

impl Delivery {
    async fn read(&self, cursor: Cursor) -> Batch {
        let mut attempt = 0;
        loop {
            let spool = self.spool.clone();
            let max = self.batch_max;
            match tokio::task::spawn_blocking(move || spool.read(cursor, max, MAX_READ)).await {
                Ok(Ok(b)) => return b,
                Ok(Err(e)) => tracing::warn!(error = %e, "webhook spool read failed"),
                Err(e) => tracing::warn!(error = %e, "webhook spool read task failed"),
            }
            self.m.failed.inc();
            tokio::time::sleep(super::backoff(
                Duration::from_millis(100),
                Duration::from_secs(10),
                attempt,
            ))
            .await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// The next batch: `batch_max` findings, or fewer once the oldest of them
    /// has waited `flush_interval`.
    async fn next_batch(&self, cursor: &mut Cursor) -> Batch {
        let mut deadline = None;
        loop {
            let b = self.read(*cursor).await;
            if b.lines.is_empty() {
                *cursor = b.end;
                // New data wakes us; the timeout is only a safety net.
                let _ = tokio::time::timeout(Duration::from_secs(5), self.spool.notify.notified())
                    .await;
                continue;
            }
            let d =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.flush_interval);
            if b.lines.len() >= self.batch_max || tokio::time::Instant::now() >= d {
                return b;
            }
            tokio::select! {
                _ = self.spool.notify.notified() => {}
                _ = tokio::time::sleep_until(d) => {}
            }
        }
    }

    /// The JSON array to POST and how many findings it holds.
    fn payload(&self, lines: &[Vec<u8>]) -> (Vec<u8>, u64) {
        let mut body = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        let mut n = 0u64;
        for l in lines {
            let f: Finding = match serde_json::from_slice(l) {
                Ok(f) => f,
                Err(e) => {
                    self.m.dropped_corrupt.inc();
                    tracing::warn!(error = %e, "unreadable record in the webhook spool, skipped");
                    continue;
                }
            };
            if n > 0 {
                body.push(b',');
            }
            match self.format {
                // Exactly the bytes that were spooled.
                PayloadFormat::Finding => body.extend_from_slice(l),
                PayloadFormat::Ocsf => {
                    serde_json::to_writer(&mut body, &super::ocsf::render(&f, &self.host))
                        .expect("a value always serialises")
                }
            }
            n += 1;
        }
        body.push(b']');
        (body, n)
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), PostError> {
        let resp = self
            .client
            .post(self.url.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| PostError::Retry(e.without_url().to_string()))?;
        let status = resp.status();
        // Read (a bounded part of) the answer so the connection can be reused.
        let mut resp = resp;
        for _ in 0..16 {
            match resp.chunk().await {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        if status.is_success() {
            return Ok(());
        }
        let code = status.as_u16();
        if status.is_client_error() && !matches!(code, 401 | 403 | 404 | 408 | 429) {
            return Err(PostError::Rejected(status));
        }
        Err(PostError::Retry(format!("HTTP {status}")))
    }

    async fn run(self) {
        let mut cursor = self.spool.cursor();
        let mut failures = 0u32;
        loop {
            let batch = self.next_batch(&mut cursor).await;
            let (body, n) = self.payload(&batch.lines);
            if n > 0 {
                loop {
                    match self.post(body.clone()).await {
                        Ok(()) => {
                            self.m.sent.inc_by(n);
                            if failures > 0 {
                                tracing::info!(
                                    after_failures = failures,
                                    "webhook delivering again"
                                );
                            }
                            failures = 0;
                            break;
                        }
                        Err(PostError::Rejected(status)) => {
                            self.m.failed.inc();
                            self.m.dropped_rejected.inc_by(n);
                            tracing::warn!(%status, dropped = n, "webhook rejected a batch: findings dropped");
                            break;
                        }
                        Err(PostError::Retry(e)) => {
                            self.m.failed.inc();
                            if failures == 0 || failures.is_power_of_two() {
                                tracing::warn!(error = %e, failures = failures + 1, spool_bytes = self.spool.bytes(), "webhook delivery failed; retrying");
                            }
                            let d = super::backoff(self.retry_initial, self.retry_max, failures);
                            failures = failures.saturating_add(1);
                            tokio::time::sleep(d).await;
                        }
                    }
                }
            }
            cursor = batch.end;
            let spool = self.spool.clone();
            match tokio::task::spawn_blocking(move || spool.ack(cursor)).await {
                Ok(Ok(())) => {}
                // Not fatal: after a restart this batch comes again.
                Ok(Err(e)) => tracing::warn!(error = %e, "webhook spool ack failed"),
                Err(e) => tracing::warn!(error = %e, "webhook spool ack task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::{testutil::sample, SinkSet, SinksConfig};

    /// An https webhook builds its TLS client (ring provider) and, with the
    /// receiver unreachable, keeps everything in the spool.
    #[tokio::test]
    async fn https_client_builds_and_spools() {
        let dir = crate::sinks::testutil::TempDir::new("webhook");
        let mut w = WebhookConfig::new("https://127.0.0.1:9/ingest", &dir.0);
        w.retry_initial = Duration::from_millis(10);
        let cfg = SinksConfig {
            jsonl: None,
            webhook: Some(w),
            ..Default::default()
        };
        let reg = prometheus::Registry::new();
        let set = SinkSet::new(&cfg, &reg).unwrap();
        set.emit(&sample(1));
        for _ in 0..500 {
            if set.stats("webhook").unwrap().failed > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let st = set.stats("webhook").unwrap();
        assert_eq!((st.spooled, st.sent), (1, 0), "{st:?}");
        assert!(st.failed > 0, "{st:?}");
        set.shutdown(Duration::from_secs(5)).await;
    }

    #[test]
    fn bad_urls_are_config_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let reg = prometheus::Registry::new();
        for url in ["ftp://x/", "not a url"] {
            let cfg = SinksConfig {
                jsonl: None,
                webhook: Some(WebhookConfig::new(url, "/nonexistent/spool")),
                ..Default::default()
            };
            assert!(SinkSet::new(&cfg, &reg).is_err(), "{url}");
        }
    }
}
