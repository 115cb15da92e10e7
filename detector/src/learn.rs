//! Learned intents: the embedded default when no intent is declared.
//!
//! For each workload, the readers of its credential and the destinations its
//! holders reach during a learning window become its intent; after the
//! window, anything else is a finding (alert only: a learned profile never
//! blocks). Learning stops at the window's end, so an attacker who arrives
//! later is not learned. Profiles render as WorkloadIntent YAML
//! (`detector learn`) which, applied back, keeps the same workload quiet.
//!
//! Workload key: `namespace/<pod name without its generated suffix>` when the
//! runtime told us the pod's name (so every replica shares one profile),
//! else the pod UID, else the cgroup path.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use detector_common::PolicyAction;
use serde::Serialize;

use crate::correlate::{IntentRef, Judge, WorkloadCtx};

/// Sorted, de-duplicated and small (most workloads have one reader and a
/// few destinations): a sorted `Vec` costs a fraction of a B-tree node per
/// workload, which adds up over 10,000 pods.
#[derive(Clone, Debug)]
struct SortedSet<T>(Vec<T>);

impl<T> Default for SortedSet<T> {
    fn default() -> Self {
        SortedSet(Vec::new())
    }
}

impl<T: Ord> SortedSet<T> {
    fn find<Q: Ord + ?Sized>(&self, q: &Q) -> Result<usize, usize>
    where
        T: std::borrow::Borrow<Q>,
    {
        self.0.binary_search_by(|x| x.borrow().cmp(q))
    }
    fn contains<Q: Ord + ?Sized>(&self, q: &Q) -> bool
    where
        T: std::borrow::Borrow<Q>,
    {
        self.find(q).is_ok()
    }
    fn insert_with<Q: Ord + ?Sized>(&mut self, q: &Q, make: impl FnOnce() -> T)
    where
        T: std::borrow::Borrow<Q>,
    {
        if let Err(at) = self.find(q) {
            self.0.insert(at, make());
        }
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

#[derive(Clone, Debug, Default)]
struct Profile {
    first_seen_ns: u64,
    readers: SortedSet<Box<str>>,
    destinations: SortedSet<(IpAddr, u16)>,
    /// Shared with the correlator's cache of the cgroup's workload.
    ctx: Arc<WorkloadCtx>,
}

pub struct Learner {
    /// Unique per learner: the correlator caches profile slots per cgroup
    /// under it.
    id: u64,
    window_ns: u64,
    /// Profiles by workload key; `IntentRef::index` is the key's slot.
    keys: Vec<Arc<str>>,
    slots: HashMap<Arc<str>, usize>,
    profiles: Vec<Profile>,
}

/// Strip a generated pod-name suffix: `api-7d9f8b6c5-x2k4q` -> `api`,
/// `web-0` (StatefulSet ordinal) stays `web-0`.
pub fn pod_base_name(pod: &str) -> &str {
    let parts: Vec<&str> = pod.rsplitn(3, '-').collect();
    let hashy = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars().any(|c| c.is_ascii_lowercase())
    };
    match parts.as_slice() {
        [pod_hash, rs_hash, base] if hashy(pod_hash, 5, 5) && hashy(rs_hash, 6, 10) => base,
        [pod_hash, rest @ ..] if hashy(pod_hash, 5, 5) && !rest.is_empty() => {
            &pod[..pod.len() - pod_hash.len() - 1]
        }
        _ => pod,
    }
}

pub fn workload_key(w: &WorkloadCtx) -> Option<String> {
    let wl = &w.workload;
    match (&wl.namespace, &wl.pod, &wl.pod_uid, &wl.cgroup_path) {
        (Some(ns), Some(pod), _, _) => Some(format!("{ns}/{}", pod_base_name(pod))),
        (_, _, Some(uid), _) => Some(format!("pod:{uid}")),
        (_, _, _, Some(path)) => Some(format!("cgroup:{path}")),
        _ => None,
    }
}

impl Learner {
    pub fn new(window_ns: u64) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Learner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            window_ns,
            keys: Vec::new(),
            slots: HashMap::new(),
            profiles: Vec::new(),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The profile slot of `w`'s workload, created (first seen at `now_ns`)
    /// if new; `None` for a workload with no key. Slots are never reused, so
    /// a caller may keep one for as long as `w` stays the same.
    pub fn slot_for(&mut self, w: &Arc<WorkloadCtx>, now_ns: u64) -> Option<usize> {
        let key = workload_key(w)?;
        if let Some(&i) = self.slots.get(key.as_str()) {
            return Some(i);
        }
        let i = self.profiles.len();
        self.profiles.push(Profile {
            first_seen_ns: now_ns,
            ctx: w.clone(),
            ..Default::default()
        });
        let key: Arc<str> = Arc::from(key);
        self.keys.push(key.clone());
        self.slots.insert(key, i);
        Some(i)
    }

    fn learning(&self, i: usize, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.profiles[i].first_seen_ns) < self.window_ns
    }

    /// Record a credential reader; true while the workload is still learning.
    pub fn observe_reader(&mut self, w: &WorkloadCtx, exe: &str, now_ns: u64) -> bool {
        match self.slot_for(&Arc::new(w.clone()), now_ns) {
            Some(i) => self.observe_reader_in(i, exe, now_ns),
            None => false,
        }
    }

    /// [`Self::observe_reader`] by slot.
    pub fn observe_reader_in(&mut self, slot: usize, exe: &str, now_ns: u64) -> bool {
        if slot >= self.profiles.len() || !self.learning(slot, now_ns) {
            return false;
        }
        self.profiles[slot]
            .readers
            .insert_with(exe, || Box::from(exe));
        true
    }

    /// Record a holder's destination; true while the workload is still learning.
    pub fn observe_destination(
        &mut self,
        w: &WorkloadCtx,
        ip: IpAddr,
        port: u16,
        now_ns: u64,
    ) -> bool {
        match self.slot_for(&Arc::new(w.clone()), now_ns) {
            Some(i) => self.observe_destination_in(i, ip, port, now_ns),
            None => false,
        }
    }

    /// [`Self::observe_destination`] by slot.
    pub fn observe_destination_in(
        &mut self,
        slot: usize,
        ip: IpAddr,
        port: u16,
        now_ns: u64,
    ) -> bool {
        if slot >= self.profiles.len() || !self.learning(slot, now_ns) {
            return false;
        }
        self.profiles[slot]
            .destinations
            .insert_with(&(ip, port), || (ip, port));
        true
    }

    /// Did the profile in `slot` learn `exe` as a reader?
    pub fn allows_reader_in(&self, slot: usize, exe: &str) -> bool {
        self.profiles
            .get(slot)
            .is_some_and(|p| p.readers.contains(exe))
    }

    /// Did the profile in `slot` learn `(ip, port)` as a destination?
    pub fn allows_destination_in(&self, slot: usize, ip: IpAddr, port: u16) -> bool {
        self.profiles
            .get(slot)
            .is_some_and(|p| p.destinations.contains(&(ip, port)))
    }

    /// The learned intent of `slot`, as findings name it.
    pub fn intent_in(&self, slot: usize) -> IntentRef {
        IntentRef {
            name: format!(
                "learned:{}",
                self.keys.get(slot).map(|k| &**k).unwrap_or("?")
            ),
            action: PolicyAction::Alert,
            index: slot,
        }
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// The learned profiles as WorkloadIntent YAML documents.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for (i, p) in self.profiles.iter().enumerate() {
            if p.readers.is_empty() && p.destinations.is_empty() {
                continue;
            }
            let doc = render(&self.keys[i], p);
            out.push_str("---\n");
            out.push_str(&serde_norway::to_string(&doc).unwrap_or_default());
        }
        out
    }
}

impl Judge for Learner {
    /// Only workloads whose learning window is over have an intent; during
    /// the window they are being learned and stay quiet.
    fn intent_for(&self, w: &WorkloadCtx) -> Option<IntentRef> {
        let key = workload_key(w)?;
        let &i = self.slots.get(key.as_str())?;
        let now = crate::daemon::boottime_ns();
        if self.learning(i, now) {
            return None;
        }
        Some(self.intent_in(i))
    }

    fn allows_reader(&self, intent: &IntentRef, exe: &str) -> bool {
        self.allows_reader_in(intent.index, exe)
    }

    fn allows_destination(&self, intent: &IntentRef, ip: IpAddr, port: u16) -> bool {
        self.allows_destination_in(intent.index, ip, port)
    }
}

// ---- YAML rendering (the WorkloadIntent contract) ----------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    api_version: &'static str,
    kind: &'static str,
    metadata: Meta,
    spec: Spec,
}

#[derive(Serialize)]
struct Meta {
    name: String,
    namespace: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Selector {
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_account: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pod_labels: BTreeMap<String, String>,
    #[serde(rename = "podUID", skip_serializing_if = "Option::is_none")]
    pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_path: Option<String>,
}

#[derive(Serialize)]
struct Dest {
    cidr: String,
    ports: Vec<u16>,
}

#[derive(Serialize)]
struct Spec {
    selector: Selector,
    readers: Vec<String>,
    destinations: Vec<Dest>,
    action: &'static str,
}

fn dns_label(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(63);
    let t = out.trim_matches('-').to_string();
    if t.is_empty() {
        "workload".into()
    } else {
        t
    }
}

fn render(key: &str, p: &Profile) -> Doc {
    let wl = &p.ctx.workload;
    let (name, namespace) = match (&wl.namespace, &wl.pod) {
        (Some(ns), Some(pod)) => (dns_label(pod_base_name(pod)), ns.clone()),
        _ => (dns_label(key), "default".to_string()),
    };
    // Select as the workload, not the pod instance, when we know enough.
    let selector = if wl.namespace.is_some()
        && (!p.ctx.labels.is_empty() || p.ctx.service_account.is_some())
    {
        Selector {
            namespace: wl.namespace.clone(),
            service_account: p.ctx.service_account.clone(),
            pod_labels: p.ctx.labels.clone(),
            pod_uid: None,
            cgroup_path: None,
        }
    } else if let Some(uid) = &wl.pod_uid {
        Selector {
            namespace: None,
            service_account: None,
            pod_labels: BTreeMap::new(),
            pod_uid: Some(uid.clone()),
            cgroup_path: None,
        }
    } else {
        Selector {
            namespace: None,
            service_account: None,
            pod_labels: BTreeMap::new(),
            pod_uid: None,
            cgroup_path: wl.cgroup_path.clone(),
        }
    };
    let mut by_ip: BTreeMap<IpAddr, Vec<u16>> = BTreeMap::new();
    for (ip, port) in p.destinations.iter() {
        by_ip.entry(*ip).or_default().push(*port);
    }
    let destinations = by_ip
        .into_iter()
        .map(|(ip, ports)| Dest {
            cidr: format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 }),
            ports,
        })
        .collect();
    Doc {
        api_version: "detector.dev/v1alpha1",
        kind: "WorkloadIntent",
        metadata: Meta { name, namespace },
        spec: Spec {
            selector,
            readers: p.readers.iter().map(|r| r.to_string()).collect(),
            destinations,
            action: "alert",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finding::Workload;

    fn pod(uid: &str) -> WorkloadCtx {
        WorkloadCtx {
            workload: Workload {
                pod_uid: Some(uid.into()),
                cgroup_id: 3,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn generated_pod_suffixes_are_stripped() {
        assert_eq!(
            pod_base_name("payments-api-7d9f8b6c5-x2k4q"),
            "payments-api"
        );
        assert_eq!(pod_base_name("agent-x2k4q"), "agent");
        assert_eq!(pod_base_name("web-0"), "web-0");
        assert_eq!(pod_base_name("plain"), "plain");
    }

    #[test]
    fn learns_then_judges() {
        let mut l = Learner::new(u64::MAX);
        let w = pod("u1");
        assert!(l.observe_reader(&w, "/app/server", 1));
        assert!(l.observe_destination(&w, "10.96.0.1".parse().unwrap(), 443, 2));
        assert!(l.intent_for(&w).is_none(), "still learning: quiet");
        let yaml = l.to_yaml();
        assert!(
            yaml.contains("podUID: u1")
                && yaml.contains("/app/server")
                && yaml.contains("10.96.0.1/32"),
            "{yaml}"
        );

        let mut done = Learner::new(0);
        done.observe_reader(&w, "/app/server", 1);
        let i = done.intent_for(&w).expect("window over: judged");
        assert!(
            !done.allows_reader(&i, "/app/server"),
            "a zero window learns nothing"
        );
    }
}
