//! The daemon's config file (`detector run --config FILE`, with its
//! `sinks:` section): generated configs parse to the values they were
//! built from; mutated ones give `file:line:` errors naming the field, and
//! never a panic.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use detector::{
    cli::{ConfigFile, KillScope, LogFormat, Mode, MAX_DURATION},
    sinks::{
        PayloadFormat, SyslogFormat, SyslogTransport, MAX_BATCH, MAX_KEEP, MAX_QUEUE_CAPACITY,
    },
};
use proptest::{prelude::*, test_runner::TestCaseError};

use crate::{
    check,
    harness::fuzz,
    yamlgen::{self, apply, quote, Doc, Kind, Mutation},
};

const FILE: &str = "fuzz/config.yaml";

#[derive(Clone, Debug)]
struct WebhookM {
    url: String,
    batch_max: Option<usize>,
    flush_interval: Option<Duration>,
    timeout: Option<Duration>,
    spool_dir: Option<String>,
    spool_max_bytes: Option<u64>,
    headers: BTreeMap<String, String>,
    format: Option<&'static str>,
    retry_initial: Option<Duration>,
    retry_max: Option<Duration>,
}

#[derive(Clone, Debug)]
struct SyslogM {
    address: String,
    transport: Option<&'static str>,
    format: Option<&'static str>,
    app_name: Option<String>,
    facility: Option<String>,
    hostname: Option<String>,
}

#[derive(Clone, Debug)]
enum JsonlM {
    Absent,
    Null,
    Set {
        path: Option<String>,
        max_bytes: Option<u64>,
        keep: Option<u32>,
    },
}

#[derive(Clone, Debug)]
struct SinksM {
    queue_capacity: Option<usize>,
    jsonl: JsonlM,
    webhook: Option<WebhookM>,
    syslog: Option<SyslogM>,
    ocsf: Option<(String, Option<u64>, Option<u32>)>,
}

#[derive(Clone, Debug, Default)]
struct ConfigM {
    policy: Vec<String>,
    kubelet_dir: Option<String>,
    cgroup_root: Option<String>,
    alerts: Option<String>,
    metrics_addr: Option<SocketAddr>,
    mode: Option<&'static str>,
    credential_file: Vec<String>,
    deny_cgroup: Vec<String>,
    debug_events: Option<String>,
    connect_dedup_ms: Option<u64>,
    log_format: Option<&'static str>,
    learn_window: Option<Duration>,
    learn_output: Option<String>,
    kill_scope: Option<&'static str>,
    aggregate_window: Option<Duration>,
    trusted_host_reader: Vec<String>,
    rotation_grace: Option<Duration>,
    cri_socket: Option<String>,
    sinks: Option<SinksM>,
}

/// Paths and other free text: unicode, spaces, YAML-significant characters.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "/[a-z0-9_./-]{1,20}",
        "\\PC{1,16}",
        proptest::collection::vec(any::<char>(), 1..10).prop_map(|v| v.into_iter().collect()),
        Just("-".to_string()),
        Just("yes".to_string()),
        Just("~".to_string()),
        Just("1e3".to_string()),
    ]
}

fn paths() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(text(), 0..3)
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..=MAX_DURATION.as_secs()).prop_map(Duration::from_secs),
        (0u64..=MAX_DURATION.as_nanos() as u64).prop_map(Duration::from_nanos),
        (0u64..10_000).prop_map(Duration::from_millis),
    ]
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>())
            .prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p)),
        (any::<u128>(), any::<u16>())
            .prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p)),
    ]
}

fn webhook() -> impl Strategy<Value = WebhookM> {
    (
        (
            (
                "https?",
                // No all-digit last label (the URL parser reads that as
                // IPv4), no `xn--` label (punycode, checked as such).
                "[a-z][a-z0-9]{0,8}(\\.[a-z][a-z0-9]{0,8}){0,2}",
                proptest::option::of(1u16..),
                "(/[a-zA-Z0-9_.~-]{0,8}){0,3}",
            )
                .prop_map(|(s, h, p, path)| match p {
                    Some(p) => format!("{s}://{h}:{p}{path}"),
                    None => format!("{s}://{h}{path}"),
                }),
            proptest::option::of(1usize..=MAX_BATCH),
            proptest::option::of(duration()),
            proptest::option::of(duration()),
            proptest::option::of(text()),
        ),
        (
            proptest::option::of(any::<u64>()),
            proptest::collection::btree_map("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,20}", 0..3),
            prop::sample::select(vec![None, Some("finding"), Some("ocsf")]),
            proptest::option::of(duration()),
            proptest::option::of(duration()),
        ),
    )
        .prop_map(
            |(
                (url, batch_max, flush_interval, timeout, spool_dir),
                (spool_max_bytes, headers, format, retry_initial, retry_max),
            )| WebhookM {
                url,
                batch_max,
                flush_interval,
                timeout,
                spool_dir,
                spool_max_bytes,
                // Header values are trimmed by HTTP; keep them without edge spaces.
                headers: headers
                    .into_iter()
                    .map(|(k, v)| (k, v.trim().to_string()))
                    .collect(),
                format,
                retry_initial,
                retry_max,
            },
        )
}

fn syslog() -> impl Strategy<Value = SyslogM> {
    (
        "[a-z0-9.-]{1,12}:[0-9]{1,5}",
        prop::sample::select(vec![None, Some("udp"), Some("tcp")]),
        prop::sample::select(vec![None, Some("rfc5424"), Some("cef")]),
        proptest::option::of(text()),
        proptest::option::of(prop_oneof![
            prop::sample::select(vec![
                "auth", "authpriv", "local0", "local7", "kern", "daemon", "LOCAL3"
            ])
            .prop_map(str::to_string),
            (0u8..24).prop_map(|n| n.to_string()),
        ]),
        proptest::option::of(text()),
    )
        .prop_map(
            |(address, transport, format, app_name, facility, hostname)| SyslogM {
                address,
                transport,
                format,
                app_name,
                facility,
                hostname,
            },
        )
}

fn sinks() -> impl Strategy<Value = SinksM> {
    (
        proptest::option::of(1usize..=MAX_QUEUE_CAPACITY),
        prop_oneof![
            Just(JsonlM::Absent),
            Just(JsonlM::Null),
            (
                proptest::option::of(text()),
                proptest::option::of(any::<u64>()),
                proptest::option::of(0u32..=MAX_KEEP)
            )
                .prop_map(|(path, max_bytes, keep)| JsonlM::Set {
                    path,
                    max_bytes,
                    keep
                }),
        ],
        proptest::option::of(webhook()),
        proptest::option::of(syslog()),
        proptest::option::of((
            text(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(0u32..=MAX_KEEP),
        )),
    )
        .prop_map(|(queue_capacity, jsonl, webhook, syslog, ocsf)| SinksM {
            queue_capacity,
            jsonl,
            webhook,
            syslog,
            ocsf,
        })
}

fn config() -> impl Strategy<Value = ConfigM> {
    (
        (
            paths(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(socket_addr()),
            prop::sample::select(vec![None, Some("observe"), Some("enforce")]),
            paths(),
            paths(),
            proptest::option::of(text()),
            proptest::option::of(any::<u64>()),
        ),
        (
            prop::sample::select(vec![None, Some("human"), Some("json")]),
            proptest::option::of(duration()),
            proptest::option::of(text()),
            prop::sample::select(vec![None, Some("process"), Some("container")]),
            proptest::option::of(duration()),
            paths(),
            proptest::option::of(duration()),
            proptest::option::of(text()),
            proptest::option::of(sinks()),
        ),
    )
        .prop_map(|(a, b)| ConfigM {
            policy: a.0,
            kubelet_dir: a.1,
            cgroup_root: a.2,
            alerts: a.3,
            metrics_addr: a.4,
            mode: a.5,
            credential_file: a.6,
            deny_cgroup: a.7,
            debug_events: a.8,
            connect_dedup_ms: a.9,
            log_format: b.0,
            learn_window: b.1,
            learn_output: b.2,
            kill_scope: b.3,
            aggregate_window: b.4,
            trusted_host_reader: b.5,
            rotation_grace: b.6,
            cri_socket: b.7,
            sinks: b.8,
        })
}

struct R<'a> {
    d: Doc,
    quotes: &'a [u8],
    n: usize,
    flow_lists: bool,
}

impl R<'_> {
    fn q(&mut self, s: &str) -> String {
        self.n += 1;
        quote(s, self.quotes[self.n % self.quotes.len()])
    }
    fn s(&mut self, indent: usize, key: &str, path: &str, v: &Option<String>) {
        if let Some(v) = v {
            let value = self.q(v);
            self.d.field(indent, key, value, path.into(), Kind::Str);
        }
    }
    fn tag(&mut self, indent: usize, key: &str, path: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.d
                .field(indent, key, v.to_string(), path.into(), Kind::Str);
        }
    }
    fn int<T: ToString>(&mut self, indent: usize, key: &str, path: &str, v: Option<T>) {
        if let Some(v) = v {
            self.d
                .field(indent, key, v.to_string(), path.into(), Kind::Int);
        }
    }
    fn dur(&mut self, indent: usize, key: &str, path: &str, v: Option<Duration>) {
        if let Some(v) = v {
            let text = humantime::format_duration(v).to_string();
            let value = self.q(&text);
            self.d
                .field(indent, key, value, path.into(), Kind::Duration);
        }
    }
    fn list(&mut self, indent: usize, key: &str, v: &[String]) {
        if v.is_empty() {
            return;
        }
        if self.flow_lists {
            let items: Vec<String> = v.iter().map(|s| self.q(s)).collect();
            self.d.push(format!(
                "{}{key}: [{}]",
                " ".repeat(indent),
                items.join(", ")
            ));
        } else {
            self.d.push(format!("{}{key}:", " ".repeat(indent)));
            for (i, s) in v.iter().enumerate() {
                let value = self.q(s);
                self.d
                    .field(indent + 2, "", value, format!("{key}[{i}]"), Kind::Str);
            }
        }
    }
}

fn render(m: &ConfigM, quotes: &[u8], flow_lists: bool) -> Doc {
    let mut r = R {
        d: Doc::default(),
        quotes,
        n: 0,
        flow_lists,
    };
    r.d.push("# detector config");
    r.list(0, "policy", &m.policy);
    r.s(0, "kubelet_dir", "kubelet_dir", &m.kubelet_dir);
    r.s(0, "cgroup_root", "cgroup_root", &m.cgroup_root);
    r.s(0, "alerts", "alerts", &m.alerts);
    r.s(
        0,
        "metrics_addr",
        "metrics_addr",
        &m.metrics_addr.map(|a| a.to_string()),
    );
    r.tag(0, "mode", "mode", m.mode);
    r.list(0, "credential_file", &m.credential_file);
    r.list(0, "deny_cgroup", &m.deny_cgroup);
    r.s(0, "debug_events", "debug_events", &m.debug_events);
    r.int(
        0,
        "connect_dedup_ms",
        "connect_dedup_ms",
        m.connect_dedup_ms,
    );
    r.tag(0, "log_format", "log_format", m.log_format);
    r.dur(0, "learn_window", "learn_window", m.learn_window);
    r.s(0, "learn_output", "learn_output", &m.learn_output);
    r.tag(0, "kill_scope", "kill_scope", m.kill_scope);
    r.dur(
        0,
        "aggregate_window",
        "aggregate_window",
        m.aggregate_window,
    );
    r.list(0, "trusted_host_reader", &m.trusted_host_reader);
    r.dur(0, "rotation_grace", "rotation_grace", m.rotation_grace);
    r.s(0, "cri_socket", "cri_socket", &m.cri_socket);
    if let Some(s) = &m.sinks {
        r.d.push("sinks:");
        r.int(
            2,
            "queue_capacity",
            "sinks.queue_capacity",
            s.queue_capacity,
        );
        match &s.jsonl {
            JsonlM::Absent => {}
            JsonlM::Null => r.d.push("  jsonl: null"),
            JsonlM::Set {
                path,
                max_bytes,
                keep,
            } => {
                r.d.push("  jsonl:");
                r.s(4, "path", "sinks.jsonl.path", path);
                r.int(4, "max_bytes", "sinks.jsonl.max_bytes", *max_bytes);
                r.int(4, "keep", "sinks.jsonl.keep", *keep);
                if path.is_none() && max_bytes.is_none() && keep.is_none() {
                    r.d.lines.pop();
                    r.d.push("  jsonl: {}");
                }
            }
        }
        if let Some(w) = &s.webhook {
            r.d.push("  webhook:");
            r.s(4, "url", "sinks.webhook.url", &Some(w.url.clone()));
            r.int(4, "batch_max", "sinks.webhook.batch_max", w.batch_max);
            r.dur(
                4,
                "flush_interval",
                "sinks.webhook.flush_interval",
                w.flush_interval,
            );
            r.dur(4, "timeout", "sinks.webhook.timeout", w.timeout);
            r.s(4, "spool_dir", "sinks.webhook.spool_dir", &w.spool_dir);
            r.int(
                4,
                "spool_max_bytes",
                "sinks.webhook.spool_max_bytes",
                w.spool_max_bytes,
            );
            if !w.headers.is_empty() {
                r.d.push("    headers:");
                for (k, v) in &w.headers {
                    let (k, v) = (r.q(k), r.q(v));
                    r.d.push(format!("      {k}: {v}"));
                }
            }
            r.tag(4, "format", "sinks.webhook.format", w.format);
            r.dur(
                4,
                "retry_initial",
                "sinks.webhook.retry_initial",
                w.retry_initial,
            );
            r.dur(4, "retry_max", "sinks.webhook.retry_max", w.retry_max);
        }
        if let Some(sl) = &s.syslog {
            r.d.push("  syslog:");
            r.s(
                4,
                "address",
                "sinks.syslog.address",
                &Some(sl.address.clone()),
            );
            r.tag(4, "transport", "sinks.syslog.transport", sl.transport);
            r.tag(4, "format", "sinks.syslog.format", sl.format);
            r.s(4, "app_name", "sinks.syslog.app_name", &sl.app_name);
            r.s(4, "facility", "sinks.syslog.facility", &sl.facility);
            r.s(4, "hostname", "sinks.syslog.hostname", &sl.hostname);
        }
        if let Some((path, max_bytes, keep)) = &s.ocsf {
            r.d.push("  ocsf:");
            r.s(4, "path", "sinks.ocsf.path", &Some(path.clone()));
            r.int(4, "max_bytes", "sinks.ocsf.max_bytes", *max_bytes);
            r.int(4, "keep", "sinks.ocsf.keep", *keep);
        }
        if s.queue_capacity.is_none()
            && matches!(s.jsonl, JsonlM::Absent)
            && s.webhook.is_none()
            && s.syslog.is_none()
            && s.ocsf.is_none()
        {
            r.d.lines.pop();
            r.d.push("sinks: {}");
        }
    }
    r.d
}

fn pb(v: &[String]) -> Vec<PathBuf> {
    v.iter().map(PathBuf::from).collect()
}

fn same(m: &ConfigM, text: &str) -> Result<(), TestCaseError> {
    let c = match ConfigFile::parse(Path::new(FILE), text) {
        Ok(c) => c,
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "valid config rejected:\n{e}\n---\n{text}"
            )))
        }
    };
    let opt_pb = |v: &Option<String>| v.as_ref().map(PathBuf::from);
    check!(c.policy == pb(&m.policy), "policy {:?}", c.policy);
    check!(
        c.kubelet_dir == opt_pb(&m.kubelet_dir),
        "kubelet_dir {:?}",
        c.kubelet_dir
    );
    check!(
        c.cgroup_root == opt_pb(&m.cgroup_root),
        "cgroup_root {:?}",
        c.cgroup_root
    );
    check!(c.alerts == m.alerts, "alerts {:?}", c.alerts);
    check!(
        c.metrics_addr == m.metrics_addr,
        "metrics_addr {:?}",
        c.metrics_addr
    );
    let mode = m.mode.map(|s| {
        if s == "observe" {
            Mode::Observe
        } else {
            Mode::Enforce
        }
    });
    check!(c.mode == mode, "mode {:?}", c.mode);
    check!(
        c.credential_file == pb(&m.credential_file),
        "credential_file {:?}",
        c.credential_file
    );
    check!(
        c.deny_cgroup == pb(&m.deny_cgroup),
        "deny_cgroup {:?}",
        c.deny_cgroup
    );
    check!(
        c.debug_events == m.debug_events,
        "debug_events {:?}",
        c.debug_events
    );
    check!(
        c.connect_dedup_ms == m.connect_dedup_ms,
        "connect_dedup_ms {:?}",
        c.connect_dedup_ms
    );
    let lf = m.log_format.map(|s| {
        if s == "json" {
            LogFormat::Json
        } else {
            LogFormat::Human
        }
    });
    check!(c.log_format == lf, "log_format {:?}", c.log_format);
    check!(
        c.learn_window == m.learn_window,
        "learn_window {:?} != {:?}",
        c.learn_window,
        m.learn_window
    );
    check!(
        c.learn_output == opt_pb(&m.learn_output),
        "learn_output {:?}",
        c.learn_output
    );
    let ks = m.kill_scope.map(|s| {
        if s == "container" {
            KillScope::Container
        } else {
            KillScope::Process
        }
    });
    check!(c.kill_scope == ks, "kill_scope {:?}", c.kill_scope);
    check!(
        c.aggregate_window == m.aggregate_window,
        "aggregate_window {:?}",
        c.aggregate_window
    );
    check!(
        c.trusted_host_reader == m.trusted_host_reader,
        "trusted_host_reader {:?}",
        c.trusted_host_reader
    );
    check!(
        c.rotation_grace == m.rotation_grace,
        "rotation_grace {:?}",
        c.rotation_grace
    );
    check!(
        c.cri_socket == opt_pb(&m.cri_socket),
        "cri_socket {:?}",
        c.cri_socket
    );
    let Some(sm) = &m.sinks else {
        check!(c.sinks.is_none(), "sinks appeared");
        return Ok(());
    };
    let s = c
        .sinks
        .as_ref()
        .ok_or_else(|| TestCaseError::fail("sinks missing"))?;
    check!(
        s.queue_capacity == sm.queue_capacity.unwrap_or(4096),
        "queue_capacity {}",
        s.queue_capacity
    );
    match (&sm.jsonl, &s.jsonl) {
        (JsonlM::Absent, Some(j)) => check!(j.path == "-", "default jsonl {j:?}"),
        (JsonlM::Null, None) => {}
        (
            JsonlM::Set {
                path,
                max_bytes,
                keep,
            },
            Some(j),
        ) => {
            check!(
                j.path == path.clone().unwrap_or_else(|| "-".into()),
                "jsonl.path {:?}",
                j.path
            );
            check!(
                j.max_bytes == max_bytes.unwrap_or(100 << 20),
                "jsonl.max_bytes {}",
                j.max_bytes
            );
            check!(j.keep == keep.unwrap_or(5), "jsonl.keep {}", j.keep);
        }
        (w, g) => return Err(TestCaseError::fail(format!("jsonl {g:?} for {w:?}"))),
    }
    match (&sm.webhook, &s.webhook) {
        (None, None) => {}
        (Some(w), Some(g)) => {
            check!(g.url == w.url, "url {:?}", g.url);
            check!(
                g.batch_max == w.batch_max.unwrap_or(100),
                "batch_max {}",
                g.batch_max
            );
            check!(
                g.flush_interval == w.flush_interval.unwrap_or(Duration::from_secs(1)),
                "flush_interval {:?}",
                g.flush_interval
            );
            check!(
                g.timeout == w.timeout.unwrap_or(Duration::from_secs(10)),
                "timeout {:?}",
                g.timeout
            );
            let spool = w
                .spool_dir
                .clone()
                .unwrap_or_else(|| "/var/lib/detector/spool/webhook".into());
            check!(
                g.spool_dir == Path::new(&spool),
                "spool_dir {:?}",
                g.spool_dir
            );
            check!(
                g.spool_max_bytes == w.spool_max_bytes.unwrap_or(256 << 20),
                "spool_max_bytes"
            );
            check!(g.headers == w.headers, "headers differ");
            let fmt = if w.format == Some("ocsf") {
                PayloadFormat::Ocsf
            } else {
                PayloadFormat::Finding
            };
            check!(g.format == fmt, "format {:?}", g.format);
            check!(
                g.retry_initial == w.retry_initial.unwrap_or(Duration::from_millis(500)),
                "retry_initial"
            );
            check!(
                g.retry_max == w.retry_max.unwrap_or(Duration::from_secs(60)),
                "retry_max"
            );
        }
        (w, g) => return Err(TestCaseError::fail(format!("webhook {g:?} for {w:?}"))),
    }
    match (&sm.syslog, &s.syslog) {
        (None, None) => {}
        (Some(w), Some(g)) => {
            check!(g.address == w.address, "address {:?}", g.address);
            let t = if w.transport == Some("tcp") {
                SyslogTransport::Tcp
            } else {
                SyslogTransport::Udp
            };
            check!(g.transport == t, "transport {:?}", g.transport);
            let f = if w.format == Some("cef") {
                SyslogFormat::Cef
            } else {
                SyslogFormat::Rfc5424
            };
            check!(g.format == f, "format {:?}", g.format);
            check!(
                g.app_name == w.app_name.clone().unwrap_or_else(|| "detector".into()),
                "app_name"
            );
            check!(
                g.facility == w.facility.clone().unwrap_or_else(|| "auth".into()),
                "facility"
            );
            check!(g.hostname == w.hostname, "hostname {:?}", g.hostname);
        }
        (w, g) => return Err(TestCaseError::fail(format!("syslog {g:?} for {w:?}"))),
    }
    match (&sm.ocsf, &s.ocsf) {
        (None, None) => {}
        (Some((path, max_bytes, keep)), Some(g)) => {
            check!(&g.path == path, "ocsf.path {:?}", g.path);
            check!(
                g.max_bytes == max_bytes.unwrap_or(100 << 20),
                "ocsf.max_bytes"
            );
            check!(g.keep == keep.unwrap_or(5), "ocsf.keep");
        }
        (w, g) => return Err(TestCaseError::fail(format!("ocsf {g:?} for {w:?}"))),
    }
    Ok(())
}

/// Whatever the input: no panic, and an error has our file, a line inside
/// the text, and a message.
fn errors_are_located(text: &str) -> Result<Option<Vec<(usize, String)>>, TestCaseError> {
    let lines = yamlgen::line_count(text);
    match ConfigFile::parse(Path::new(FILE), text) {
        Ok(_) => Ok(None),
        Err(e) => {
            check!(!e.0.is_empty(), "an error without errors");
            for err in &e.0 {
                check!(
                    err.file == Path::new(FILE),
                    "error names file {}",
                    err.file.display()
                );
                check!(
                    err.line >= 1 && err.line <= lines,
                    "error at line {} of {lines}: {err}\n--- text:\n{text:?}",
                    err.line
                );
                check!(
                    !err.message.chars().any(char::is_control),
                    "control character in {err:?}"
                );
                check!(
                    !err.message.trim().is_empty(),
                    "empty message at line {}",
                    err.line
                );
            }
            Ok(Some(
                e.0.iter().map(|e| (e.line, e.message.clone())).collect(),
            ))
        }
    }
}

fn strategy() -> impl Strategy<Value = (ConfigM, Vec<u8>, bool)> {
    (
        config(),
        proptest::collection::vec(any::<u8>(), 64),
        any::<bool>(),
    )
}

#[test]
fn valid_configs_round_trip() {
    fuzz("config/round-trip", strategy(), |(m, quotes, flow)| {
        same(&m, &render(&m, &quotes, flow).text())
    });
}

/// Values out of the range the daemon can live with, per field.
fn out_of_range(path: &str) -> Option<&'static str> {
    Some(match path.rsplit('.').next()? {
        "queue_capacity" => "0",
        "batch_max" => "0",
        "keep" => "4294967295",
        "learn_window" | "aggregate_window" | "rotation_grace" | "flush_interval" | "timeout"
        | "retry_initial" | "retry_max" => "5000years",
        "url" => "ftp://collector/x",
        "facility" => "local9",
        _ => return None,
    })
}

/// One wrong-typed, out-of-range or unknown field in an otherwise valid
/// config: the error is at that field's line and names it.
#[test]
fn a_wrong_field_is_reported_at_its_line() {
    let s = (
        strategy(),
        any::<usize>(),
        any::<usize>(),
        0u8..3,
        "[a-z]{3,8}_bogus",
    );
    fuzz(
        "config/wrong-field",
        s,
        |((m, quotes, flow), f, v, how, key)| {
            let doc = render(&m, &quotes, flow);
            if doc.fields.is_empty() {
                return Ok(());
            }
            let (line, field) = &doc.fields[f % doc.fields.len()];
            let name = field.key.clone().unwrap_or_else(|| field.path.clone());
            let (mutation, want) = match (how, &field.key, out_of_range(&field.path)) {
                (0, Some(_), _) => (Mutation::RenameKey(f, key.clone()), key.clone()),
                (1, _, Some(bad)) => (Mutation::Value(f, bad.to_string()), name),
                _ => {
                    // A string field accepts any scalar text except null-like
                    // values; give it a collection instead.
                    let values: &[&str] = match field.kind {
                        Kind::Str => &["[a, b]", "{x: 1}", "[]", "{}"],
                        k => yamlgen::wrong_values(k),
                    };
                    let value = values[v % values.len()].to_string();
                    (Mutation::Value(f, value), name)
                }
            };
            let text = apply(&doc, &[mutation]);
            let errors = errors_are_located(&text)?
                .ok_or_else(|| TestCaseError::fail(format!("accepted:\n{text}")))?;
            // List items are named by their list (`policy[1]` → `policy`).
            let want = want.split('[').next().unwrap_or(&want).to_string();
            check!(
                errors
                    .iter()
                    .any(|(l, m)| *l == line + 1 && m.contains(&want)),
                "no error naming `{want}` at line {}; got {errors:?}\n---\n{text}",
                line + 1
            );
            Ok(())
        },
    );
}

#[test]
fn mutated_configs_fail_cleanly() {
    let s = (
        strategy(),
        proptest::collection::vec(yamlgen::mutation(), 1..5),
    );
    fuzz("config/mutations", s, |((m, quotes, flow), muts)| {
        let text = apply(&render(&m, &quotes, flow), &muts);
        errors_are_located(&text)?;
        Ok(())
    });
}
