//! Aggregation of repeated findings, so an attack loop cannot flood the feed
//! while counts stay exact: the first occurrence of a (kind, workload,
//! process image, credential, destination, action) is emitted at once; later
//! ones within the window are folded into one finding whose `count` says how
//! many it stands for, emitted when the window closes. The sum of `count`
//! over everything emitted equals the number of occurrences.

use std::{collections::HashMap, net::IpAddr};

use crate::finding::Finding;

/// What makes two findings "the same".
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AggKey {
    kind: &'static str,
    action: &'static str,
    cgroup_id: u64,
    exe: Option<String>,
    credential: Option<(u64, u64)>,
    destination: Option<(IpAddr, u16, String)>,
}

impl AggKey {
    pub fn of(f: &Finding) -> Self {
        AggKey {
            kind: f.kind.as_str(),
            action: f.action.as_str(),
            cgroup_id: f.workload.cgroup_id,
            exe: f
                .process
                .exe
                .clone()
                .or_else(|| Some(f.process.comm.clone())),
            credential: f.credential.as_ref().map(|c| (c.dev, c.inode)),
            destination: f
                .destination
                .as_ref()
                .map(|d| (d.ip, d.port, d.protocol.clone())),
        }
    }
}

struct Window {
    opened_ns: u64,
    /// Occurrences folded since the first one was emitted.
    suppressed: u64,
    /// The latest occurrence, re-emitted with `count = suppressed`.
    latest: Option<Finding>,
}

pub struct Aggregator {
    window_ns: u64,
    /// SipHash: keys carry attacker-chosen strings (executable paths).
    open: HashMap<AggKey, Window>,
    max_keys: usize,
}

impl Aggregator {
    pub fn new(window_ns: u64) -> Self {
        Aggregator {
            window_ns,
            open: HashMap::new(),
            max_keys: 100_000,
        }
    }

    /// Offer a finding; returns it if it must be emitted now.
    pub fn offer(&mut self, mut f: Finding, now_ns: u64) -> Option<Finding> {
        if self.window_ns == 0 {
            return Some(f);
        }
        let key = AggKey::of(&f);
        match self.open.get_mut(&key) {
            Some(w) if now_ns.saturating_sub(w.opened_ns) < self.window_ns => {
                // A finding may already stand for several occurrences (the
                // kernel aggregates re-reads): add them all.
                w.suppressed += f.count.max(1);
                w.latest = Some(f);
                None
            }
            _ => {
                if self.open.len() >= self.max_keys {
                    // Under a flood of distinct keys, stop aggregating rather
                    // than grow without bound: every finding goes out as is.
                    return Some(f);
                }
                f.count = f.count.max(1);
                self.open.insert(
                    key,
                    Window {
                        opened_ns: now_ns,
                        suppressed: 0,
                        latest: None,
                    },
                );
                Some(f)
            }
        }
    }

    /// Close windows older than the window length; returns the summaries.
    pub fn flush_due(&mut self, now_ns: u64) -> Vec<Finding> {
        let window = self.window_ns;
        self.flush_if(|w| now_ns.saturating_sub(w.opened_ns) >= window)
    }

    /// Close every window (shutdown).
    pub fn flush_all(&mut self) -> Vec<Finding> {
        self.flush_if(|_| true)
    }

    fn flush_if(&mut self, due: impl Fn(&Window) -> bool) -> Vec<Finding> {
        let keys: Vec<AggKey> = self
            .open
            .iter()
            .filter(|(_, w)| due(w))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in keys {
            if let Some(w) = self.open.remove(&k) {
                if let Some(mut f) = w.latest {
                    f.count = w.suppressed;
                    f.message = format!(
                        "{} (x{} more in {}s)",
                        f.message,
                        w.suppressed,
                        self.window_ns / 1_000_000_000
                    );
                    out.push(f);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finding::*;

    fn finding(port: u16) -> Finding {
        Finding {
            time: "t".into(),
            kind: FindingKind::UnexpectedDestination,
            severity: Severity::High,
            action: Action::Blocked,
            intent: None,
            workload: Workload {
                cgroup_id: 7,
                ..Default::default()
            },
            process: Process {
                pid: 1,
                comm: "curl".into(),
                exe: Some("/usr/bin/curl".into()),
                ..Default::default()
            },
            credential: None,
            destination: Some(Destination {
                ip: "127.0.0.1".parse().unwrap(),
                port,
                protocol: "tcp".into(),
            }),
            mitre: vec![],
            count: 1,
            message: "m".into(),
        }
    }

    #[test]
    fn counts_stay_exact_under_a_flood() {
        let mut a = Aggregator::new(10);
        let mut emitted = Vec::new();
        for i in 0..1000u64 {
            emitted.extend(a.offer(finding(80), i / 100));
            emitted.extend(a.flush_due(i / 100));
        }
        emitted.extend(a.flush_all());
        assert_eq!(emitted.iter().map(|f| f.count).sum::<u64>(), 1000);
        assert!(emitted.len() < 50, "aggregated: {}", emitted.len());
    }

    #[test]
    fn different_destinations_are_not_folded() {
        let mut a = Aggregator::new(1_000);
        assert!(a.offer(finding(80), 0).is_some());
        assert!(a.offer(finding(81), 0).is_some());
        assert!(a.offer(finding(80), 1).is_none());
        let rest = a.flush_all();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].count, 1);
    }
}
