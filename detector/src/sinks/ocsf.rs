//! OCSF 1.3 Detection Finding (category 2 Findings, class_uid 2004) of a
//! finding, with the `host`, `security_control` and `container` profiles.
//!
//! Mapping: `time` (epoch ms) from the finding time; `severity_id` from the
//! severity; `action_id`/`disposition_id` from the action (alerted: Allowed /
//! Alert, blocked: Denied / Blocked, killed: Denied / Other "Killed");
//! `finding_info` {uid (stable hash of the finding), title, desc, types [kind],
//! analytic (Rule, the finding kind), attacks}; top-level `attacks` (MITRE
//! ATT&CK technique / sub-technique / tactic); `device` (the node);
//! `actor.process` and `evidences[0]` {process, container, file (the credential
//! file: identity only), dst_endpoint, connection_info}; Kubernetes details
//! without an OCSF attribute go to `unmapped`.

use serde_json::{json, Map, Value};

use crate::finding::{Action, Finding, FindingKind, Severity};

pub const OCSF_VERSION: &str = "1.3.0";

fn severity(s: Severity) -> (u8, &'static str) {
    match s {
        Severity::Info => (1, "Informational"),
        Severity::Low => (2, "Low"),
        Severity::Medium => (3, "Medium"),
        Severity::High => (4, "High"),
        Severity::Critical => (5, "Critical"),
    }
}

fn title(k: FindingKind) -> &'static str {
    match k {
        FindingKind::UnexpectedReader => "Unexpected reader of a workload credential",
        FindingKind::UnexpectedDestination => {
            "Workload credential holder connected to an unexpected destination"
        }
        FindingKind::ForeignCredential => "Credential of another workload obtained",
        FindingKind::StaleReuse => "Credential used outside the workload's usual pattern",
        FindingKind::CoverageDegraded => "Detection coverage degraded: events lost",
    }
}

/// Names of the ATT&CK techniques the detector reports, and their tactics.
fn technique_info(
    id: &str,
) -> (
    Option<&'static str>,
    &'static [(&'static str, &'static str)],
) {
    const CRED: (&str, &str) = ("TA0006", "Credential Access");
    const EVASION: (&str, &str) = ("TA0005", "Defense Evasion");
    const LATERAL: (&str, &str) = ("TA0008", "Lateral Movement");
    const PRIVESC: (&str, &str) = ("TA0004", "Privilege Escalation");
    match id {
        "T1528" => (Some("Steal Application Access Token"), &[CRED]),
        "T1552" => (Some("Unsecured Credentials"), &[CRED]),
        "T1552.001" => (Some("Credentials In Files"), &[CRED]),
        "T1552.007" => (Some("Container API"), &[CRED]),
        "T1550" => (
            Some("Use Alternate Authentication Material"),
            &[EVASION, LATERAL],
        ),
        "T1550.001" => (Some("Application Access Token"), &[EVASION, LATERAL]),
        "T1611" => (Some("Escape to Host"), &[PRIVESC]),
        "T1562" => (Some("Impair Defenses"), &[EVASION]),
        "T1562.001" => (Some("Disable or Modify Tools"), &[EVASION]),
        _ => (None, &[]),
    }
}

fn entity(uid: &str, name: Option<&str>) -> Value {
    let mut m = Map::new();
    m.insert("uid".into(), uid.into());
    if let Some(n) = name {
        m.insert("name".into(), n.into());
    }
    Value::Object(m)
}

/// OCSF attack objects for ATT&CK technique ids (`T1550.001` becomes
/// technique T1550 with sub_technique T1550.001).
pub fn attacks(mitre: &[String]) -> Vec<Value> {
    mitre
        .iter()
        .map(|id| {
            let mut a = Map::new();
            let (name, tactics) = technique_info(id);
            if let Some((parent, _)) = id.split_once('.') {
                a.insert("technique".into(), entity(parent, technique_info(parent).0));
                a.insert("sub_technique".into(), entity(id, name));
            } else {
                a.insert("technique".into(), entity(id, name));
            }
            if let Some((uid, n)) = tactics.first() {
                a.insert("tactic".into(), entity(uid, Some(n)));
            }
            if !tactics.is_empty() {
                a.insert(
                    "tactics".into(),
                    tactics.iter().map(|(u, n)| entity(u, Some(n))).collect(),
                );
            }
            a.insert("version".into(), "v15".into());
            Value::Object(a)
        })
        .collect()
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().filter(|s| !s.is_empty()).unwrap_or(p)
}

/// A stable identifier of a finding (FNV-1a over its JSON form).
pub fn finding_uid(f: &Finding) -> String {
    let bytes = serde_json::to_vec(f).expect("a finding always serialises");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn insert_opt(m: &mut Map<String, Value>, k: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(k.into(), v);
    }
}

/// The OCSF Detection Finding of `f`; `host` is the node name.
pub fn render(f: &Finding, host: &str) -> Value {
    let (sev_id, sev) = severity(f.severity);
    let (action_id, action, disp_id, disp) = match f.action {
        Action::Alerted => (1, "Allowed", 19, "Alert"),
        Action::Blocked => (2, "Denied", 2, "Blocked"),
        Action::Killed => (2, "Denied", 99, "Killed"),
    };
    let time =
        super::cef::epoch_millis(&f.time).unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let w = &f.workload;
    let container = (w.container_id.is_some() || w.pod.is_some()).then(|| {
        let mut c = Map::new();
        insert_opt(&mut c, "uid", w.container_id.clone().map(Value::from));
        if w.container_id.is_none() {
            insert_opt(&mut c, "name", w.pod.clone().map(Value::from));
        }
        insert_opt(&mut c, "pod_uuid", w.pod_uid.clone().map(Value::from));
        c.insert("orchestrator".into(), "Kubernetes".into());
        Value::Object(c)
    });

    let p = &f.process;
    let mut process = Map::new();
    process.insert("pid".into(), p.pid.into());
    process.insert("name".into(), p.comm.clone().into());
    if let Some(exe) = &p.exe {
        process.insert(
            "file".into(),
            json!({"path": exe, "name": basename(exe), "type_id": 1, "type": "Regular File"}),
        );
    }
    process.insert("parent_process".into(), json!({"pid": p.ppid}));
    if let Some(uid) = p.uid {
        process.insert("user".into(), json!({"uid": uid.to_string()}));
    }
    if !p.ancestry.is_empty() {
        process.insert("lineage".into(), p.ancestry.clone().into());
    }
    insert_opt(&mut process, "container", container.clone());
    let process = Value::Object(process);

    let mut evidence = Map::new();
    evidence.insert("process".into(), process.clone());
    insert_opt(&mut evidence, "container", container);
    if let Some(c) = &f.credential {
        // The credential file's identity, never its contents.
        evidence.insert(
            "file".into(),
            json!({
                "path": c.path, "name": basename(&c.path), "type_id": 1, "type": "Regular File",
                "uid": format!("{}:{}", c.dev, c.inode),
            }),
        );
    }
    if let Some(d) = &f.destination {
        evidence.insert(
            "dst_endpoint".into(),
            json!({"ip": d.ip.to_string(), "port": d.port}),
        );
        evidence.insert(
            "connection_info".into(),
            json!({"protocol_name": d.protocol, "direction_id": 2, "direction": "Outbound"}),
        );
    }

    let mut unmapped = Map::new();
    insert_opt(&mut unmapped, "intent", f.intent.clone().map(Value::from));
    insert_opt(
        &mut unmapped,
        "k8s_namespace",
        w.namespace.clone().map(Value::from),
    );
    insert_opt(&mut unmapped, "k8s_pod", w.pod.clone().map(Value::from));
    insert_opt(
        &mut unmapped,
        "k8s_pod_uid",
        w.pod_uid.clone().map(Value::from),
    );
    unmapped.insert("cgroup_id".into(), w.cgroup_id.into());
    insert_opt(
        &mut unmapped,
        "cgroup_path",
        w.cgroup_path.clone().map(Value::from),
    );
    if let Some(c) = &f.credential {
        unmapped.insert("credential_kind".into(), c.kind.clone().into());
        insert_opt(
            &mut unmapped,
            "credential_owner_pod_uid",
            c.owner_pod_uid.clone().map(Value::from),
        );
        unmapped.insert("credential_inode".into(), c.inode.into());
        unmapped.insert("credential_dev".into(), c.dev.into());
    }

    let attacks = attacks(&f.mitre);
    let message = if f.message.is_empty() {
        title(f.kind).to_string()
    } else {
        f.message.clone()
    };
    json!({
        "activity_id": 1,
        "activity_name": "Create",
        "category_uid": 2,
        "category_name": "Findings",
        "class_uid": 2004,
        "class_name": "Detection Finding",
        "type_uid": 200401,
        "type_name": "Detection Finding: Create",
        "time": time,
        "count": f.count,
        "severity_id": sev_id,
        "severity": sev,
        "status_id": 1,
        "status": "New",
        "action_id": action_id,
        "action": action,
        "disposition_id": disp_id,
        "disposition": disp,
        "message": message,
        "finding_info": {
            "uid": finding_uid(f),
            "title": title(f.kind),
            "desc": message,
            "types": [f.kind.as_str()],
            "created_time": time,
            "analytic": {"uid": f.kind.as_str(), "name": f.kind.as_str(), "type_id": 1, "type": "Rule"},
            "attacks": attacks,
        },
        "attacks": attacks,
        "device": {"hostname": host, "name": host, "type_id": 1, "type": "Server"},
        "actor": {"process": process},
        "evidences": [Value::Object(evidence)],
        "metadata": {
            "version": OCSF_VERSION,
            "profiles": ["host", "security_control", "container"],
            "product": {"name": "detector", "vendor_name": "detector", "version": env!("CARGO_PKG_VERSION")},
            "original_time": f.time,
        },
        "unmapped": Value::Object(unmapped),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::testutil::sample;

    #[test]
    fn detection_finding_shape() {
        let f = sample(3);
        let v = render(&f, "node-1");
        assert_eq!(v["class_uid"], 2004);
        assert_eq!(v["type_uid"], 200401);
        assert_eq!(v["severity_id"], 4);
        assert_eq!(v["action_id"], 2);
        assert_eq!(v["disposition_id"], 2);
        assert_eq!(v["time"], super::super::cef::epoch_millis(&f.time).unwrap());
        assert_eq!(v["attacks"][1]["technique"]["uid"], "T1550");
        assert_eq!(v["attacks"][1]["sub_technique"]["uid"], "T1550.001");
        assert_eq!(v["attacks"][0]["tactic"]["uid"], "TA0006");
        assert_eq!(v["evidences"][0]["dst_endpoint"]["port"], 443);
        assert_eq!(v["actor"]["process"]["file"]["path"], "/usr/bin/curl");
        assert_eq!(v["device"]["hostname"], "node-1");
        assert_eq!(v["finding_info"]["types"][0], "unexpected_destination");
        assert_eq!(finding_uid(&f), finding_uid(&f.clone()));
        assert_ne!(finding_uid(&f), finding_uid(&sample(4)));
    }
}
