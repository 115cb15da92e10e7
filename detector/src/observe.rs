//! Prometheus metrics and the health endpoints: `/metrics`, `/healthz`,
//! `/readyz` (200 only once every probe is attached and the inventory and
//! intents are loaded).
//!
//! Label values come from closed sets (event kinds, finding kinds, actions)
//! or from namespaces, so cardinality stays bounded.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All metrics of the daemon, registered in one registry.
pub struct Metrics {
    pub registry: Registry,
    pub events: IntCounterVec,
    pub events_lost: IntCounterVec,
    pub decode_errors: IntCounter,
    pub findings: IntCounterVec,
    pub credentials: IntGauge,
    pub holders: IntGauge,
    pub credential_reads: IntCounterVec,
    pub probes_attached: IntGauge,
    pub policy_reload_success: IntGauge,
    pub intents: IntGauge,
    pub processing_latency: Histogram,
    pub map_entries: IntGaugeVec,
    pub workload_holders: IntGaugeVec,
    pub events_dropped: IntCounterVec,
    pub leases: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let events = counter_vec(
            "detector_events_total",
            "Kernel events received, by kind.",
            &["kind"],
        )?;
        let events_lost = counter_vec(
            "detector_events_lost_total",
            "Kernel events that could not be delivered (ring buffer full), by kind.",
            &["kind"],
        )?;
        let findings = counter_vec(
            "detector_findings_total",
            "Findings emitted, by kind, action and namespace.",
            &["kind", "action", "namespace"],
        )?;
        let credential_reads = counter_vec(
            "detector_credential_reads_total",
            "Credential file accesses seen, by owner namespace.",
            &["namespace"],
        )?;
        let decode_errors = IntCounter::new(
            "detector_decode_errors_total",
            "Ring-buffer records that failed to decode.",
        )?;
        registry.register(Box::new(decode_errors.clone()))?;
        let processing_latency = Histogram::with_opts(
            HistogramOpts::new(
                "detector_processing_latency_seconds",
                "Time from the kernel seeing an event to userspace having handled it.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )?;
        registry.register(Box::new(processing_latency.clone()))?;
        let map_entries = IntGaugeVec::new(
            Opts::new(
                "detector_map_entries",
                "Entries in the kernel maps, by map.",
            ),
            &["map"],
        )?;
        registry.register(Box::new(map_entries.clone()))?;
        let workload_holders = IntGaugeVec::new(
            Opts::new(
                "detector_workload_holders",
                "Processes holding a credential, by workload namespace (\"\" = host).",
            ),
            &["namespace"],
        )?;
        registry.register(Box::new(workload_holders.clone()))?;
        let events_dropped = counter_vec(
            "detector_events_dropped_total",
            "Kernel events not delivered, attributed to the workload they came from \
             (over its per-cgroup budget or ring buffer full), by namespace (\"\" = host).",
            &["namespace"],
        )?;
        let leases = IntGaugeVec::new(
            Opts::new(
                "detector_credential_leases",
                "Lease and hybrid sensors: credential files by lease state \
                 (held: opens seen in the kernel; waiting: a writer has it open, its opens \
                 not seen by lease, seen by fanotify with hybrid; refused: cannot be leased, \
                 the same).",
            ),
            &["state"],
        )?;
        registry.register(Box::new(leases.clone()))?;
        // Every series of a closed label set exists from the start, so
        // `increase()` and absence-based alerts work before the first event.
        for kind in detector_common::EventKind::ALL {
            events.with_label_values(&[kind.name()]);
            events_lost.with_label_values(&[kind.name()]);
        }
        Ok(Arc::new(Metrics {
            events,
            events_lost,
            decode_errors,
            findings,
            credentials: gauge(
                "detector_credentials",
                "Credential files watched in the kernel map.",
            )?,
            holders: gauge(
                "detector_holders",
                "Processes currently holding a credential.",
            )?,
            credential_reads,
            probes_attached: gauge("detector_probes_attached", "Kernel programs attached.")?,
            policy_reload_success: gauge(
                "detector_policy_reload_success",
                "1 if the last intent (re)load succeeded, 0 if it was rejected.",
            )?,
            intents: gauge("detector_intents", "Intents in force.")?,
            processing_latency,
            map_entries,
            workload_holders,
            leases,
            events_dropped,
            registry,
        }))
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Readiness is the conjunction of the parts that must be in place.
#[derive(Default)]
pub struct Readiness {
    pub probes: AtomicBool,
    pub inventory: AtomicBool,
    pub intents: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.probes.load(Ordering::Acquire)
            && self.inventory.load(Ordering::Acquire)
            && self.intents.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.readiness.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Bind the metrics address now (so a bad address fails start-up) and serve
/// in the background.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, readiness });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}
