//! ArcSight Common Event Format (CEF:0) rendering of a finding.
//!
//! `CEF:0|detector|detector|<version>|<kind>|<message>|<severity 0-10>|<extension>`
//!
//! Header fields escape `\` and `|`; extension values escape `\`, `=` and
//! line breaks (`\n`, `\r`). Every field of the finding is carried, so a
//! record can be parsed back into the same finding:
//!
//! | finding | CEF key |
//! |---|---|
//! | time (ms since the epoch) | `rt` |
//! | action | `act` |
//! | count | `cnt` |
//! | severity | `detectorSeverity` (and the header's 0-10 number) |
//! | intent | `cs1` (`cs1Label=intent`) |
//! | workload.namespace / pod / pod_uid / container_id | `cs2` / `cs3` / `cs4` / `cs5` |
//! | mitre (comma-separated) | `cs6` |
//! | workload.cgroup_id | `cn1` |
//! | process.ppid | `cn2` |
//! | credential.dev | `cn3` |
//! | workload.cgroup_path | `detectorCgroupPath` |
//! | process.pid / comm / exe / uid | `spid` / `sproc` / `detectorExe` / `suid` |
//! | process.ancestry (JSON array) | `detectorAncestry` |
//! | credential.kind / path / inode / owner_pod_uid | `fileType` / `filePath` / `fileId` / `detectorCredentialOwner` |
//! | destination.ip / port / protocol | `dst` (IPv4) or `c6a3` (IPv6) / `dpt` / `proto` |

use std::fmt::Write;

use crate::finding::{Finding, Severity};

/// CEF severity (0-10) of a finding severity.
pub fn severity_number(s: Severity) -> u8 {
    match s {
        Severity::Info => 1,
        Severity::Low => 3,
        Severity::Medium => 5,
        Severity::High => 8,
        Severity::Critical => 10,
    }
}

fn escape_header(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '|' => o.push_str("\\|"),
            // Line breaks are not allowed in the header.
            '\r' | '\n' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

fn escape_ext(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '=' => o.push_str("\\="),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            c => o.push(c),
        }
    }
    o
}

/// Milliseconds since the epoch of an RFC 3339 time (None if unparsable).
pub(crate) fn epoch_millis(time: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(time)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The CEF record of a finding (one line, no trailing newline).
pub fn render(f: &Finding) -> String {
    let name = if f.message.is_empty() {
        f.kind.as_str()
    } else {
        &f.message
    };
    let mut o = format!(
        "CEF:0|detector|detector|{}|{}|{}|{}|",
        escape_header(env!("CARGO_PKG_VERSION")),
        f.kind.as_str(),
        escape_header(name),
        severity_number(f.severity)
    );
    let mut ext: Vec<(&str, String)> = Vec::with_capacity(32);
    let mut kv = |k: &'static str, v: String| ext.push((k, v));
    let rt = epoch_millis(&f.time).unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    kv("rt", rt.to_string());
    kv("act", ser(&f.action));
    kv("cnt", f.count.to_string());
    kv("detectorSeverity", ser(&f.severity));
    if let Some(i) = &f.intent {
        kv("cs1Label", "intent".into());
        kv("cs1", i.clone());
    }
    let w = &f.workload;
    for (n, label_key, label, v) in [
        ("cs2", "cs2Label", "namespace", &w.namespace),
        ("cs3", "cs3Label", "pod", &w.pod),
        ("cs4", "cs4Label", "podUid", &w.pod_uid),
        ("cs5", "cs5Label", "containerId", &w.container_id),
    ] {
        if let Some(v) = v {
            kv(label_key, label.into());
            kv(n, v.clone());
        }
    }
    if !f.mitre.is_empty() {
        kv("cs6Label", "mitreTechniques".into());
        kv("cs6", f.mitre.join(","));
    }
    kv("cn1Label", "cgroupId".into());
    kv("cn1", w.cgroup_id.to_string());
    if let Some(p) = &w.cgroup_path {
        kv("detectorCgroupPath", p.clone());
    }
    let p = &f.process;
    kv("spid", p.pid.to_string());
    kv("cn2Label", "ppid".into());
    kv("cn2", p.ppid.to_string());
    kv("sproc", p.comm.clone());
    if let Some(e) = &p.exe {
        kv("detectorExe", e.clone());
    }
    if let Some(u) = p.uid {
        kv("suid", u.to_string());
    }
    if !p.ancestry.is_empty() {
        kv(
            "detectorAncestry",
            serde_json::to_string(&p.ancestry).expect("strings serialise"),
        );
    }
    if let Some(c) = &f.credential {
        kv("fileType", c.kind.clone());
        kv("filePath", c.path.clone());
        kv("fileId", c.inode.to_string());
        kv("cn3Label", "credentialDev".into());
        kv("cn3", c.dev.to_string());
        if let Some(o) = &c.owner_pod_uid {
            kv("detectorCredentialOwner", o.clone());
        }
    }
    if let Some(d) = &f.destination {
        match d.ip {
            std::net::IpAddr::V4(ip) => kv("dst", ip.to_string()),
            std::net::IpAddr::V6(ip) => {
                kv("c6a3Label", "destinationIPv6".into());
                kv("c6a3", ip.to_string());
            }
        }
        kv("dpt", d.port.to_string());
        kv("proto", d.protocol.clone());
    }
    for (i, (k, v)) in ext.iter().enumerate() {
        if i > 0 {
            o.push(' ');
        }
        let _ = write!(o, "{k}={}", escape_ext(v));
    }
    o
}

/// A unit enum's serde name (`blocked`, `high`).
fn ser<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::testutil::sample;

    #[test]
    fn escaping() {
        assert_eq!(escape_header(r"a|b\c"), r"a\|b\\c");
        assert_eq!(escape_header("a\nb"), "a b");
        assert_eq!(escape_ext("a=b\\c|d\ne"), r"a\=b\\c|d\ne");
    }

    #[test]
    fn header_and_extension() {
        let mut f = sample(1);
        f.message = "x|y=z".into();
        f.process.exe = Some("/tmp/a b=c\\d".into());
        let r = render(&f);
        let prefix = format!(
            "CEF:0|detector|detector|{}|unexpected_destination|x\\|y=z|8|rt=",
            env!("CARGO_PKG_VERSION")
        );
        assert!(r.starts_with(&prefix), "{r}");
        assert!(r.contains(r" detectorExe=/tmp/a b\=c\\d "), "{r}");
        assert!(r.contains(" dst=10.0.0.7 dpt=443 proto=tcp"), "{r}");
        assert!(
            r.contains(" cs6Label=mitreTechniques cs6=T1528,T1550.001 "),
            "{r}"
        );
        assert!(!r.contains('\n'));
    }
}
