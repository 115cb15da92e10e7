//! A real rsyslog receives findings over UDP and TCP, as RFC 5424 with the
//! finding as JSON and as CEF, and what it parsed turns back into the same
//! findings.

use std::time::Duration;

use detector::{
    finding::Finding,
    sinks::{SinkSet, SinksConfig, SyslogConfig, SyslogFormat, SyslogTransport},
};
use detector_tests::receivers::{
    finding_from_cef, parse_structured_data, sample_findings, Rsyslog, SyslogLine,
};

const N: usize = 60;

async fn send(
    rsyslog: &Rsyslog,
    transport: SyslogTransport,
    format: SyslogFormat,
    app: &str,
) -> Vec<SyslogLine> {
    let addr = match transport {
        SyslogTransport::Udp => rsyslog.udp,
        SyslogTransport::Tcp => rsyslog.tcp,
    };
    let mut sc = SyslogConfig::new(addr.to_string(), transport, format);
    sc.app_name = app.into();
    sc.hostname = Some("node-a".into());
    sc.facility = "local3".into();
    let cfg = SinksConfig {
        jsonl: None,
        syslog: Some(sc),
        ..Default::default()
    };
    let registry = prometheus::Registry::new();
    let set = SinkSet::new(&cfg, &registry).expect("sink set");
    for f in sample_findings(N) {
        set.emit(&f);
        if transport == SyslogTransport::Udp {
            // Loopback UDP does not lose datagrams unless rsyslog's socket
            // buffer overflows: pace the burst a little.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let st = set.stats("syslog").unwrap();
    set.shutdown(Duration::from_secs(10)).await;
    assert_eq!(st.dropped, 0, "{st:?}");
    let lines = rsyslog.wait_app(app, N, Duration::from_secs(20));
    assert_eq!(lines.len(), N, "no duplicates");
    lines
}

/// The header and structured data rsyslog parsed match the finding.
fn check_envelope(l: &SyslogLine, f: &Finding) {
    let sev = match f.severity {
        detector::finding::Severity::Critical => 2,
        detector::finding::Severity::High => 3,
        detector::finding::Severity::Medium => 4,
        detector::finding::Severity::Low => 5,
        detector::finding::Severity::Info => 6,
    };
    assert_eq!(l.pri, 19 * 8 + sev, "local3 and the severity: {l:?}");
    assert_eq!(l.version, "1");
    assert_eq!(l.hostname, "node-a");
    assert_eq!(l.msgid, f.kind.as_str());
    assert_eq!(l.procid, std::process::id().to_string());
    assert_eq!(l.timestamp, f.time, "TIMESTAMP is the finding time");
    let sd = parse_structured_data(&l.structured_data).expect("valid structured data");
    let (_, params) = sd
        .iter()
        .find(|(id, _)| id == "detector@32473")
        .expect("detector SD element");
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("kind"), Some(f.kind.as_str()));
    assert_eq!(get("pid"), Some(f.process.pid.to_string().as_str()));
    assert_eq!(
        get("exe"),
        f.process.exe.as_deref(),
        "SD escaping round-trips"
    );
    assert_eq!(get("namespace"), f.workload.namespace.as_deref());
    assert_eq!(get("mitre").map(String::from), Some(f.mitre.join(",")));
    assert_eq!(
        get("dstIp").map(String::from),
        f.destination.as_ref().map(|d| d.ip.to_string())
    );
}

fn check_json(lines: &[SyslogLine], sent: &[Finding]) {
    for (l, f) in lines.iter().zip(sent) {
        check_envelope(l, f);
        let back: Finding =
            serde_json::from_str(&l.msg).unwrap_or_else(|e| panic!("{e}: {}", l.msg));
        assert_eq!(&back, f);
    }
}

fn check_cef(lines: &[SyslogLine], sent: &[Finding]) {
    for (l, f) in lines.iter().zip(sent) {
        check_envelope(l, f);
        assert!(l.msg.starts_with("CEF:0|detector|detector|"), "{}", l.msg);
        let back = finding_from_cef(&l.msg).unwrap_or_else(|e| panic!("{e}: {}", l.msg));
        assert_eq!(&back, f, "CEF: {}", l.msg);
    }
}

/// Order over TCP is preserved; over UDP it is on loopback too, but match
/// by pid to stay independent of it.
fn in_sent_order(mut lines: Vec<SyslogLine>, sent: &[Finding]) -> Vec<SyslogLine> {
    let sd_pid = |l: &SyslogLine| {
        parse_structured_data(&l.structured_data).unwrap()[1]
            .1
            .iter()
            .find(|(k, _)| k == "pid")
            .map(|(_, v)| v.parse::<u32>().unwrap())
            .unwrap()
    };
    lines.sort_by_key(|l| {
        sent.iter()
            .position(|f| f.process.pid == sd_pid(l))
            .expect("a sent pid")
    });
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsyslog_receives_findings_over_udp_and_tcp_as_json_and_cef() {
    let rsyslog = Rsyslog::start().expect("start rsyslogd");
    let sent = sample_findings(N);

    let tcp_json = send(
        &rsyslog,
        SyslogTransport::Tcp,
        SyslogFormat::Rfc5424,
        "det-tcp-json",
    )
    .await;
    check_json(&tcp_json, &sent);

    let tcp_cef = send(
        &rsyslog,
        SyslogTransport::Tcp,
        SyslogFormat::Cef,
        "det-tcp-cef",
    )
    .await;
    check_cef(&tcp_cef, &sent);

    let udp_json = send(
        &rsyslog,
        SyslogTransport::Udp,
        SyslogFormat::Rfc5424,
        "det-udp-json",
    )
    .await;
    check_json(&in_sent_order(udp_json, &sent), &sent);

    let udp_cef = send(
        &rsyslog,
        SyslogTransport::Udp,
        SyslogFormat::Cef,
        "det-udp-cef",
    )
    .await;
    check_cef(&in_sent_order(udp_cef, &sent), &sent);
}

/// A TCP collector that goes away and comes back on the same port: the
/// sink notices the closed connection, counts the failed attempts, keeps
/// what it holds and delivers it after reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_tcp_reconnects_after_the_collector_restarts() {
    let mut rsyslog = Rsyslog::start().expect("start rsyslogd");
    let mut sc = SyslogConfig::new(
        rsyslog.tcp.to_string(),
        SyslogTransport::Tcp,
        SyslogFormat::Rfc5424,
    );
    sc.app_name = "det-reconnect".into();
    let cfg = SinksConfig {
        jsonl: None,
        syslog: Some(sc),
        ..Default::default()
    };
    let registry = prometheus::Registry::new();
    let set = SinkSet::new(&cfg, &registry).unwrap();
    let sent = sample_findings(10);
    for f in &sent[..5] {
        set.emit(f);
    }
    rsyslog.wait_app("det-reconnect", 5, Duration::from_secs(20));
    rsyslog.stop();
    for f in &sent[5..] {
        set.emit(f);
    }
    detector_tests::wait_for(Duration::from_secs(20), || {
        (set.stats("syslog").unwrap().failed > 0).then_some(())
    })
    .expect("failed attempts are counted while the collector is down");
    rsyslog.start_again().expect("restart rsyslogd");
    let lines = rsyslog.wait_app("det-reconnect", 10, Duration::from_secs(30));
    let got: Vec<Finding> = lines
        .iter()
        .map(|l| serde_json::from_str(&l.msg).unwrap())
        .collect();
    assert_eq!(got, sent, "all delivered, in order, none twice");
    let st = set.stats("syslog").unwrap();
    assert_eq!((st.sent, st.dropped), (10, 0), "{st:?}");
    set.shutdown(Duration::from_secs(5)).await;
}
