//! The webhook against a real HTTP receiver on loopback: an outage, a
//! restart of the sink set with a non-empty spool, and a receiver that
//! refuses connections.

use std::{path::Path, time::Duration};

use detector::{
    finding::Finding,
    sinks::{PayloadFormat, SinkSet, SinksConfig, WebhookConfig},
};
use detector_tests::{
    receivers::{refusing_addr, sample_findings, HttpReceiver},
    wait_for,
};
use serde_json::Value;

fn webhook(url: String, spool: &Path) -> WebhookConfig {
    let mut w = WebhookConfig::new(url, spool);
    w.batch_max = 25;
    w.flush_interval = Duration::from_millis(50);
    w.timeout = Duration::from_secs(5);
    w.retry_initial = Duration::from_millis(20);
    w.retry_max = Duration::from_millis(300);
    w
}

fn config(w: WebhookConfig) -> SinksConfig {
    SinksConfig {
        jsonl: None,
        webhook: Some(w),
        ..Default::default()
    }
}

fn as_values(f: &[Finding]) -> Vec<Value> {
    f.iter().map(|f| serde_json::to_value(f).unwrap()).collect()
}

/// Every emitted finding arrived, unchanged, oldest first; at-least-once
/// delivery may repeat a batch, so compare the first occurrences.
fn assert_all_in_order(received: &[Value], sent: &[Value]) {
    let mut firsts: Vec<&Value> = Vec::new();
    for v in received {
        assert!(sent.contains(v), "received something never emitted: {v}");
        if !firsts.contains(&v) {
            firsts.push(v);
        }
    }
    assert_eq!(firsts.len(), sent.len(), "missing findings");
    for (i, (a, b)) in firsts.iter().zip(sent).enumerate() {
        assert_eq!(*a, b, "finding {i} out of order");
    }
}

async fn wait_received(r: &HttpReceiver, n: usize, timeout: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = r.received();
        let distinct = {
            let mut d: Vec<&Value> = Vec::new();
            for v in &got {
                if !d.contains(&v) {
                    d.push(v);
                }
            }
            d.len()
        };
        if distinct >= n {
            return got;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("receiver has {distinct} of {n} findings after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_outage_loses_nothing() {
    let spool = tempfile::tempdir().unwrap();
    let mut rx = HttpReceiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let registry = prometheus::Registry::new();
    let set = SinkSet::new(
        &config(webhook(format!("http://{}/ingest", rx.addr), spool.path())),
        &registry,
    )
    .unwrap();
    let all = sample_findings(400);
    let sent = as_values(&all);

    for f in &all[..100] {
        set.emit(f);
    }
    wait_received(&rx, 100, Duration::from_secs(20)).await;

    // Outage: the port refuses connections while findings keep coming.
    rx.stop().await;
    for f in &all[100..350] {
        set.emit(f);
    }
    let st = wait_for(Duration::from_secs(20), || {
        let st = set.stats("webhook").unwrap();
        (st.spooled == 350 && st.failed >= 2).then_some(st)
    })
    .unwrap_or_else(|| {
        panic!(
            "not spooled / no failed attempts: {:?}",
            set.stats("webhook")
        )
    });
    assert!(st.spool_bytes > 0, "{st:?}");
    assert_eq!(st.sent, 100, "{st:?}");

    // Back, but answering 503 to the first requests: retried as well.
    rx.fail_next(3);
    rx.start_again().await.unwrap();
    for f in &all[350..] {
        set.emit(f);
    }
    let got = wait_received(&rx, 400, Duration::from_secs(30)).await;
    assert_all_in_order(&got, &sent);

    let st = set.stats("webhook").unwrap();
    assert_eq!(st.dropped, 0, "{st:?}");
    assert!(st.sent >= 400, "{st:?}");
    // The metrics are in the registry under the agreed names.
    let names: Vec<String> = registry
        .gather()
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    for n in [
        "detector_sink_sent_total",
        "detector_sink_spool_bytes",
        "detector_sink_dropped_total",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
    }
    set.shutdown(Duration::from_secs(5)).await;
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_survives_a_restart_of_the_sink_set() {
    let spool = tempfile::tempdir().unwrap();
    let addr = refusing_addr();
    let url = format!("http://{addr}/");
    let registry = prometheus::Registry::new();
    let all = sample_findings(200);

    // First run: the receiver is down the whole time.
    let set = SinkSet::new(&config(webhook(url.clone(), spool.path())), &registry).unwrap();
    for f in &all {
        set.emit(f);
    }
    wait_for(Duration::from_secs(20), || {
        (set.stats("webhook").unwrap().spooled == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("{:?}", set.stats("webhook")));
    assert_eq!(set.stats("webhook").unwrap().sent, 0);
    set.shutdown(Duration::from_secs(5)).await;
    let on_disk: u64 = std::fs::read_dir(spool.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(on_disk > 0, "the spool holds the findings after shutdown");

    // Second run, same spool, receiver up: the backlog is delivered.
    let rx = HttpReceiver::start(addr).await.unwrap();
    let set = SinkSet::new(&config(webhook(url, spool.path())), &registry).unwrap();
    assert!(
        set.stats("webhook").unwrap().spool_bytes > 0,
        "recovered spool is accounted"
    );
    let got = wait_received(&rx, 200, Duration::from_secs(30)).await;
    assert_all_in_order(&got, &as_values(&all));
    let st = wait_for(Duration::from_secs(10), || {
        let st = set.stats("webhook").unwrap();
        (st.spool_bytes == 0).then_some(st)
    });
    assert!(
        st.is_some(),
        "delivered segments are removed: {:?}",
        set.stats("webhook")
    );
    set.shutdown(Duration::from_secs(5)).await;
}

/// 10k findings against a port that refuses connections, with a tiny queue
/// and spool: every `emit` returns at once (the loop completes), and every
/// finding is accounted for — spooled, or dropped with a reason — none
/// silently lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_never_block_emit() {
    let spool = tempfile::tempdir().unwrap();
    let mut w = webhook(format!("http://{}/", refusing_addr()), spool.path());
    w.spool_max_bytes = 16 << 10;
    let mut cfg = config(w);
    cfg.queue_capacity = 64;
    let registry = prometheus::Registry::new();
    let set = SinkSet::new(&cfg, &registry).unwrap();
    let all = sample_findings(100);
    for i in 0..10_000 {
        set.emit(&all[i % all.len()]);
        let st = set.stats("webhook").unwrap();
        assert!(st.queue_depth <= 64, "the queue stays bounded: {st:?}");
    }
    // Each finding ends up spooled or dropped with a counted reason.
    let accounted = |st: &detector::sinks::SinkStats| {
        st.spooled + st.dropped_spool_full + st.dropped_queue_full
    };
    let st = wait_for(Duration::from_secs(20), || {
        let st = set.stats("webhook").unwrap();
        (accounted(&st) == 10_000).then_some(st)
    })
    .unwrap_or_else(|| panic!("not all findings accounted for: {:?}", set.stats("webhook")));
    assert_eq!(st.queue_depth, 0);
    assert_eq!(st.sent, 0);
    assert_eq!(
        st.dropped,
        st.dropped_spool_full + st.dropped_queue_full,
        "no other loss: {st:?}"
    );
    assert!(
        st.dropped_spool_full > 0,
        "the spool bound was hit and counted: {st:?}"
    );
    assert!(st.spool_bytes as u64 <= 16 << 10, "{st:?}");
    wait_for(Duration::from_secs(20), || {
        (set.stats("webhook").unwrap().failed > 0).then_some(())
    })
    .expect("refused connections are counted as failures");
    set.shutdown(Duration::from_secs(5)).await;
}

/// The OCSF payload option: arrays of Detection Findings, with the
/// configured headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsf_payload_with_headers() {
    let spool = tempfile::tempdir().unwrap();
    let rx = HttpReceiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut w = webhook(format!("http://{}/", rx.addr), spool.path());
    w.format = PayloadFormat::Ocsf;
    w.headers
        .insert("Authorization".into(), "Splunk test-collector-token".into());
    let registry = prometheus::Registry::new();
    let set = SinkSet::new(&config(w), &registry).unwrap();
    let all = sample_findings(30);
    for f in &all {
        set.emit(f);
    }
    let got = wait_received(&rx, 30, Duration::from_secs(20)).await;
    for (v, f) in got.iter().zip(&all) {
        assert_eq!(v["class_uid"], 2004);
        assert_eq!(v["type_uid"], 200401);
        assert_eq!(v["actor"]["process"]["pid"], f.process.pid);
        assert_eq!(v["finding_info"]["types"][0], f.kind.as_str());
    }
    assert_eq!(
        rx.last_header("authorization").as_deref(),
        Some("Splunk test-collector-token")
    );
    assert_eq!(
        rx.last_header("content-type").as_deref(),
        Some("application/json")
    );
    set.shutdown(Duration::from_secs(5)).await;
}

/// A 4xx answer that retrying cannot fix drops the batch, counted as
/// rejected, and the feed goes on; 5xx/429 are retried (see the outage test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_batch_is_counted_and_the_feed_goes_on() {
    let spool = tempfile::tempdir().unwrap();
    let rx = HttpReceiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let registry = prometheus::Registry::new();
    let set = SinkSet::new(
        &config(webhook(format!("http://{}/", rx.addr), spool.path())),
        &registry,
    )
    .unwrap();
    let all = sample_findings(10);
    rx.fail_next_with(1, 400);
    for f in &all[..5] {
        set.emit(f);
    }
    let st = wait_for(Duration::from_secs(20), || {
        let st = set.stats("webhook").unwrap();
        (st.dropped_rejected == 5).then_some(st)
    })
    .unwrap_or_else(|| panic!("{:?}", set.stats("webhook")));
    assert_eq!(st.dropped, 5, "{st:?}");
    for f in &all[5..] {
        set.emit(f);
    }
    let got = wait_received(&rx, 5, Duration::from_secs(20)).await;
    assert_all_in_order(&got, &as_values(&all[5..]));
    set.shutdown(Duration::from_secs(5)).await;
}
