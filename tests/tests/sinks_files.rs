//! JSON lines with size-based rotation, and OCSF Detection Findings checked
//! against what class 2004 (OCSF 1.3) requires.

use std::{path::Path, time::Duration};

use detector::{
    finding::Finding,
    sinks::{JsonlConfig, OcsfConfig, SinkSet, SinksConfig},
};
use detector_tests::receivers::sample_findings;
use serde_json::Value;

fn numbered(p: &Path, i: u32) -> std::path::PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".{i}"));
    s.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_rotates_by_size_and_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.jsonl");
    let max_bytes = 8 << 10;
    let cfg = SinksConfig {
        jsonl: Some(JsonlConfig {
            path: path.to_str().unwrap().into(),
            max_bytes,
            keep: 3,
        }),
        queue_capacity: 10_000,
        ..Default::default()
    };
    let registry = prometheus::Registry::new();
    let set = SinkSet::new(&cfg, &registry).unwrap();
    let all = sample_findings(300);
    for f in &all {
        set.emit(f);
    }
    let st = set.stats("jsonl").unwrap();
    set.shutdown(Duration::from_secs(10)).await;
    assert_eq!(st.dropped, 0, "{st:?}");

    // Oldest first: path.3, path.2, path.1, path.
    let mut kept: Vec<Finding> = Vec::new();
    for p in [
        numbered(&path, 3),
        numbered(&path, 2),
        numbered(&path, 1),
        path.clone(),
    ] {
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            text.len() as u64 <= max_bytes,
            "{} is {} bytes",
            p.display(),
            text.len()
        );
        assert!(text.ends_with('\n'));
        for l in text.lines() {
            kept.push(serde_json::from_str(l).unwrap());
        }
    }
    assert!(!numbered(&path, 4).exists(), "keep=3");
    // What is kept is the newest findings, contiguous and in order.
    assert!(kept.len() > 20 && kept.len() < all.len(), "{}", kept.len());
    assert_eq!(kept[..], all[all.len() - kept.len()..]);
}

/// Type checks of an OCSF attribute.
fn int(v: &Value, path: &str) -> i64 {
    v.pointer(path)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("{path} is not an integer in {v}"))
}
fn string<'a>(v: &'a Value, path: &str) -> &'a str {
    v.pointer(path)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{path} is not a string in {v}"))
}
fn object<'a>(v: &'a Value, path: &str) -> &'a serde_json::Map<String, Value> {
    v.pointer(path)
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{path} is not an object in {v}"))
}
fn array<'a>(v: &'a Value, path: &str) -> &'a Vec<Value> {
    v.pointer(path)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{path} is not an array in {v}"))
}

/// Structural validation of an OCSF 1.3 Detection Finding: every attribute
/// the schema requires for class 2004 (base event, finding, the
/// security_control profile) and for the objects present, with their types
/// and enum values.
fn validate_detection_finding(v: &Value, f: &Finding) {
    // base event + classification + occurrence
    assert_eq!(int(v, "/class_uid"), 2004);
    assert_eq!(int(v, "/category_uid"), 2);
    let activity = int(v, "/activity_id");
    assert!([1, 2, 3].contains(&activity));
    assert_eq!(int(v, "/type_uid"), 2004 * 100 + activity);
    let sev = int(v, "/severity_id");
    assert!((0..=6).contains(&sev) || sev == 99);
    let want_sev = match f.severity {
        detector::finding::Severity::Info => 1,
        detector::finding::Severity::Low => 2,
        detector::finding::Severity::Medium => 3,
        detector::finding::Severity::High => 4,
        detector::finding::Severity::Critical => 5,
    };
    assert_eq!(sev, want_sev);
    let time = int(v, "/time");
    let want = chrono::DateTime::parse_from_rfc3339(&f.time)
        .unwrap()
        .timestamp_millis();
    assert_eq!(time, want, "time is epoch milliseconds of the finding time");
    // metadata (required: product, version; product requires vendor_name)
    assert!(string(v, "/metadata/version").starts_with("1."));
    string(v, "/metadata/product/vendor_name");
    string(v, "/metadata/product/name");
    // finding: finding_info (required: uid, title)
    string(v, "/finding_info/uid");
    string(v, "/finding_info/title");
    let types = array(v, "/finding_info/types");
    assert_eq!(types, &vec![Value::from(f.kind.as_str())]);
    let analytic_type = int(v, "/finding_info/analytic/type_id");
    assert!((0..=11).contains(&analytic_type) || analytic_type == 99);
    // security_control profile: action_id required; disposition_id
    let action = int(v, "/action_id");
    assert!([0, 1, 2, 99].contains(&action));
    let expected_action = if f.action == detector::finding::Action::Alerted {
        1
    } else {
        2
    };
    assert_eq!(action, expected_action);
    int(v, "/disposition_id");
    // attacks: one per MITRE id, each with technique or sub_technique uid
    let attacks = array(v, "/attacks");
    assert_eq!(attacks.len(), f.mitre.len());
    for (a, id) in attacks.iter().zip(&f.mitre) {
        let got = a
            .pointer("/sub_technique/uid")
            .or_else(|| a.pointer("/technique/uid"))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("attack without technique: {a}"));
        assert_eq!(got, id);
        if let Some((parent, _)) = id.split_once('.') {
            assert_eq!(string(a, "/technique/uid"), parent);
        }
    }
    // device (host profile): type_id required
    int(v, "/device/type_id");
    string(v, "/device/hostname");
    // actor.process and the evidence
    assert_eq!(int(v, "/actor/process/pid"), f.process.pid as i64);
    let ev = &array(v, "/evidences")[0];
    assert!(!object(ev, "").is_empty());
    assert_eq!(int(ev, "/process/pid"), f.process.pid as i64);
    assert_eq!(string(ev, "/process/name"), f.process.comm);
    assert_eq!(
        int(ev, "/process/parent_process/pid"),
        f.process.ppid as i64
    );
    if let Some(exe) = &f.process.exe {
        assert_eq!(string(ev, "/process/file/path"), exe);
        string(ev, "/process/file/name");
        int(ev, "/process/file/type_id");
    }
    match &f.destination {
        Some(d) => {
            assert_eq!(string(ev, "/dst_endpoint/ip"), d.ip.to_string());
            assert_eq!(int(ev, "/dst_endpoint/port"), d.port as i64);
        }
        None => assert!(ev.get("dst_endpoint").is_none()),
    }
    if let Some(c) = &f.credential {
        assert_eq!(string(ev, "/file/path"), c.path);
        string(ev, "/file/name");
        int(ev, "/file/type_id");
    }
    if let Some(cid) = &f.workload.container_id {
        assert_eq!(string(ev, "/container/uid"), cid);
    }
    // Never credential contents: the only credential data is its identity.
    let text = v.to_string();
    assert!(!text.contains("eyJ"), "no token material");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsf_lines_are_detection_findings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ocsf.jsonl");
    let cfg = SinksConfig {
        jsonl: None,
        ocsf: Some(OcsfConfig {
            path: path.to_str().unwrap().into(),
            max_bytes: 0,
            keep: 0,
        }),
        ..Default::default()
    };
    let registry = prometheus::Registry::new();
    let set = SinkSet::new(&cfg, &registry).unwrap();
    let all = sample_findings(50);
    for f in &all {
        set.emit(f);
    }
    set.shutdown(Duration::from_secs(10)).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), all.len());
    for (v, f) in lines.iter().zip(&all) {
        validate_detection_finding(v, f);
    }
}
