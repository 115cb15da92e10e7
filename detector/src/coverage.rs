//! Coverage: which workloads lost kernel events. The kernel counts, per
//! cgroup, events it did not deliver (over the cgroup's budget, or the ring
//! buffer was full); a workload with such losses cannot be called clean, so
//! it is reported as `coverage_degraded` with the exact number lost.

use std::collections::HashMap;

use aya::maps::{MapData, PerCpuHashMap};
use detector_common::CgroupBudget;

use crate::finding::{Action, Finding, FindingKind, Process, Severity, Workload};

/// Events of one cgroup lost since the previous poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    pub cgroup_id: u64,
    pub dropped: u64,
    /// ... of which security-relevant (credential reads, holders' connects).
    pub dropped_urgent: u64,
}

/// Remembers the kernel's running totals to turn them into increments.
#[derive(Default)]
pub struct Coverage {
    seen: HashMap<u64, (u64, u64)>,
}

impl Coverage {
    /// New losses, from the kernel's per-cgroup, per-CPU totals.
    pub fn poll(&mut self, budget: &PerCpuHashMap<MapData, u64, CgroupBudget>) -> Vec<Loss> {
        let totals = budget.iter().filter_map(Result::ok).map(|(id, per_cpu)| {
            let (d, u) = per_cpu.iter().fold((0u64, 0u64), |(d, u), b| {
                (d + b.dropped, u + b.dropped_urgent)
            });
            (id, d, u)
        });
        self.diff(totals)
    }

    /// The increments of `totals` over what was seen before. A total below
    /// the last one means the kernel's LRU evicted and re-created the entry:
    /// all of it is new. Cgroups absent from `totals` are forgotten.
    pub fn diff(&mut self, totals: impl IntoIterator<Item = (u64, u64, u64)>) -> Vec<Loss> {
        let mut next = HashMap::with_capacity(self.seen.len());
        let mut out = Vec::new();
        for (id, dropped, urgent) in totals {
            let (d0, u0) = self.seen.get(&id).copied().unwrap_or((0, 0));
            let (dd, du) = if dropped < d0 {
                (dropped, urgent)
            } else {
                (dropped - d0, urgent.saturating_sub(u0))
            };
            if dd > 0 {
                out.push(Loss {
                    cgroup_id: id,
                    dropped: dd,
                    dropped_urgent: du,
                });
            }
            next.insert(id, (dropped, urgent));
        }
        self.seen = next;
        out
    }
}

/// The finding for one loss. `count` is the number of events lost, so the
/// aggregator's sums stay exact.
pub fn finding(loss: &Loss, workload: Workload, time: String) -> Finding {
    let place = match (&workload.namespace, &workload.pod, &workload.pod_uid) {
        (Some(ns), Some(pod), _) => format!("pod {ns}/{pod}"),
        (_, _, Some(uid)) => format!("pod {uid}"),
        _ => format!(
            "cgroup {}",
            workload.cgroup_path.as_deref().unwrap_or("(unknown)")
        ),
    };
    Finding {
        time,
        kind: FindingKind::CoverageDegraded,
        severity: Severity::Medium,
        action: Action::Alerted,
        intent: None,
        message: format!(
            "{} kernel events of {place} were not delivered ({} security-relevant): \
             over its per-cgroup event budget or the ring buffer was full; its \
             activity in this period is not fully observed (in-kernel blocking \
             and kills still applied)",
            loss.dropped, loss.dropped_urgent
        ),
        workload,
        process: Process::default(),
        credential: None,
        destination: None,
        mitre: FindingKind::CoverageDegraded
            .mitre()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        count: loss.dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_increments_once() {
        let mut c = Coverage::default();
        assert_eq!(c.diff([(7, 0, 0)]), vec![]);
        assert_eq!(
            c.diff([(7, 10, 2)]),
            vec![Loss {
                cgroup_id: 7,
                dropped: 10,
                dropped_urgent: 2
            }]
        );
        assert_eq!(c.diff([(7, 10, 2)]), vec![], "no new loss, no report");
        assert_eq!(
            c.diff([(7, 15, 2), (8, 1, 1)]),
            vec![
                Loss {
                    cgroup_id: 7,
                    dropped: 5,
                    dropped_urgent: 0
                },
                Loss {
                    cgroup_id: 8,
                    dropped: 1,
                    dropped_urgent: 1
                }
            ]
        );
    }

    #[test]
    fn an_evicted_entry_starts_over() {
        let mut c = Coverage::default();
        c.diff([(7, 100, 0)]);
        assert_eq!(
            c.diff([(7, 3, 0)]),
            vec![Loss {
                cgroup_id: 7,
                dropped: 3,
                dropped_urgent: 0
            }]
        );
        c.diff([]);
        assert!(c.seen.is_empty(), "gone cgroups are forgotten");
    }
}
