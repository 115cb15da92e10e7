//! Workload intents: who may obtain a workload's credential and where its
//! holders may connect (the `WorkloadIntent` contract in ../shared/DESIGN.md).
//!
//! - [`load`] reads files and directories into a validated [`IntentSet`],
//!   collecting every error as `file:line: message` ([`PolicyError`]);
//!   [`check_cli`] is `detector policy check`.
//! - [`IntentSet::select`] picks the intent of a workload; [`Intent`] answers
//!   the reader and destination questions (also through the correlation
//!   [`Judge`](crate::correlate::Judge) trait).
//! - [`kernel::compile`] turns an intent into the kernel map entries.
//! - [`dns`] resolves `host` destinations and keeps them fresh.
//! - [`reload`] watches the files and swaps the set in when it is valid.
//!
//! # Semantics (decided here; `detector policy check` enforces them)
//! - `apiVersion` must be `detector.dev/v1alpha1` and `kind` `WorkloadIntent`.
//!   Unknown fields anywhere are errors (a typo must not silently widen an
//!   intent). `metadata` may carry `labels` and `annotations` (string maps,
//!   ignored) like any Kubernetes object.
//! - `metadata.name` is required (DNS subdomain); `metadata.namespace`
//!   defaults to `default`. `namespace/name` must be unique across all loaded
//!   files.
//! - `spec.selector` is required and needs at least one field; an empty
//!   `podLabels` does not count. Every given field must match.
//! - `spec.readers`: omitted = any reader is fine (the intent only constrains
//!   destinations); `[]` = no process may obtain the credential. Entries are
//!   normalized absolute paths; a trailing `*` matches a prefix
//!   (`/usr/bin/python3*`).
//! - `spec.destinations`: omitted = holders may connect anywhere; `[]` =
//!   nowhere. Each entry has exactly one of `cidr` (an address or a network
//!   without host bits set; a bare address means /32 or /128) or `host` (a DNS
//!   name, resolved by the system resolver), and optional `ports` (omitted =
//!   any port; a non-empty list of integers in 1..=65535).
//! - An intent must have `readers` or `destinations` (else it constrains
//!   nothing, which is almost certainly a mistake).
//! - `spec.action`: `alert` (default), `block` or `kill`.
//! - A `null` value is an error, not "omitted": `readers:` with nothing
//!   after it says neither "any" nor "none".
//! - Selection when several intents match a workload: the most specific wins
//!   — an intent with `podUID` beats any without; then more selector fields
//!   (each pod label counts as one); then a longer literal `cgroupPath`
//!   prefix; then `namespace/name` in lexical order. So the choice never
//!   depends on file order.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use detector_common::PolicyAction;
use ipnet::IpNet;

use crate::correlate::{IntentRef, Judge, WorkloadCtx};

pub mod dns;
pub mod kernel;
mod load;
pub mod reload;

pub use dns::{spawn_resolver, DnsTable};
pub use load::{check_cli, load, load_str, LoadError};
pub use reload::{spawn_reloader, PolicyWatch, ReloadStatus};

pub const API_VERSION: &str = "detector.dev/v1alpha1";
pub const KIND: &str = "WorkloadIntent";

/// One error, reported as `file:line: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based line of the offending field (or of the document when the
    /// problem is the document as a whole).
    pub line: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// What an intent does when a workload steps outside it.
pub type Action = PolicyAction;

pub fn action_name(a: Action) -> &'static str {
    match a {
        PolicyAction::Alert => "alert",
        PolicyAction::Block => "block",
        PolicyAction::Kill => "kill",
    }
}

/// A compiled `cgroupPath` glob (`*` stays within one path component, `**`
/// crosses `/`).
#[derive(Clone, Debug)]
pub struct CgroupGlob {
    pattern: String,
    matcher: globset::GlobMatcher,
}

impl CgroupGlob {
    pub fn new(pattern: &str) -> Result<Self, String> {
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| e.kind().to_string())?;
        Ok(CgroupGlob {
            pattern: pattern.to_string(),
            matcher: glob.compile_matcher(),
        })
    }
    pub fn as_str(&self) -> &str {
        &self.pattern
    }
    pub fn is_match(&self, path: &str) -> bool {
        self.matcher.is_match(path)
    }
    /// Length of the literal prefix (before the first glob character).
    fn literal_len(&self) -> usize {
        self.pattern
            .find(['*', '?', '[', '{', '\\'])
            .unwrap_or(self.pattern.len())
    }
}

impl PartialEq for CgroupGlob {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}
impl Eq for CgroupGlob {}

/// Which workloads an intent applies to. At least one field is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod_labels: BTreeMap<String, String>,
    pub pod_uid: Option<String>,
    pub cgroup_path: Option<CgroupGlob>,
}

/// What is known about a workload when choosing its intent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadMeta {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod_uid: Option<String>,
    pub pod_labels: BTreeMap<String, String>,
    pub cgroup_path: Option<String>,
}

/// Borrowed view, so correlation can select without building a
/// [`WorkloadMeta`] per event.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadView<'a> {
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
    pub pod_uid: Option<&'a str>,
    pub pod_labels: &'a BTreeMap<String, String>,
    pub cgroup_path: Option<&'a str>,
}

impl WorkloadMeta {
    pub fn view(&self) -> WorkloadView<'_> {
        WorkloadView {
            namespace: self.namespace.as_deref(),
            service_account: self.service_account.as_deref(),
            pod_uid: self.pod_uid.as_deref(),
            pod_labels: &self.pod_labels,
            cgroup_path: self.cgroup_path.as_deref(),
        }
    }
}

impl<'a> From<&'a WorkloadCtx> for WorkloadView<'a> {
    fn from(w: &'a WorkloadCtx) -> Self {
        WorkloadView {
            namespace: w.workload.namespace.as_deref(),
            service_account: w.service_account.as_deref(),
            pod_uid: w.workload.pod_uid.as_deref(),
            pod_labels: &w.labels,
            cgroup_path: w.workload.cgroup_path.as_deref(),
        }
    }
}

impl Selector {
    /// Every given field must match; a field the workload does not know
    /// (e.g. no service account on a host process) does not match.
    pub fn matches(&self, w: WorkloadView<'_>) -> bool {
        fn eq(want: &Option<String>, have: Option<&str>) -> bool {
            match want {
                None => true,
                Some(v) => have == Some(v.as_str()),
            }
        }
        eq(&self.namespace, w.namespace)
            && eq(&self.service_account, w.service_account)
            && eq(&self.pod_uid, w.pod_uid)
            && self
                .pod_labels
                .iter()
                .all(|(k, v)| w.pod_labels.get(k) == Some(v))
            && match &self.cgroup_path {
                None => true,
                Some(g) => w.cgroup_path.is_some_and(|p| g.is_match(p)),
            }
    }

    /// Higher is more specific (see the module docs).
    pub fn specificity(&self) -> (bool, usize, usize) {
        let fields = self.namespace.is_some() as usize
            + self.service_account.is_some() as usize
            + self.pod_uid.is_some() as usize
            + self.cgroup_path.is_some() as usize
            + self.pod_labels.len();
        (
            self.pod_uid.is_some(),
            fields,
            self.cgroup_path.as_ref().map_or(0, |g| g.literal_len()),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.namespace.is_none()
            && self.service_account.is_none()
            && self.pod_uid.is_none()
            && self.cgroup_path.is_none()
            && self.pod_labels.is_empty()
    }
}

/// An expected reader: an exact absolute path, or a prefix (`/usr/bin/python3*`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reader {
    Exact(String),
    Prefix(String),
}

impl Reader {
    pub fn matches(&self, exe: &str) -> bool {
        match self {
            Reader::Exact(p) => exe == p,
            Reader::Prefix(p) => exe.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reader::Exact(p) => f.write_str(p),
            Reader::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Allowed ports: any, or a sorted, de-duplicated, non-empty list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    Any,
    List(Vec<u16>),
}

impl Ports {
    pub fn allows(&self, port: u16) -> bool {
        match self {
            Ports::Any => true,
            Ports::List(l) => l.binary_search(&port).is_ok(),
        }
    }
}

/// Where a destination entry points.
#[derive(Clone, Debug)]
pub enum Target {
    Cidr(IpNet),
    /// A DNS name (lower case, no trailing dot) and its latest resolution.
    Host(Arc<dns::HostEntry>),
}

#[derive(Clone, Debug)]
pub struct Destination {
    pub target: Target,
    pub ports: Ports,
}

impl Destination {
    pub fn allows(&self, ip: IpAddr, port: u16) -> bool {
        if !self.ports.allows(port) {
            return false;
        }
        match &self.target {
            Target::Cidr(net) => net.contains(&ip),
            Target::Host(h) => h.addrs().contains(&ip),
        }
    }
}

/// A validated intent.
#[derive(Clone, Debug)]
pub struct Intent {
    pub name: String,
    pub namespace: String,
    /// Where it was defined (the line of `metadata.name`).
    pub file: PathBuf,
    pub line: usize,
    pub selector: Selector,
    /// `None`: any reader is fine.
    pub readers: Option<Vec<Reader>>,
    /// `None`: holders may connect anywhere.
    pub destinations: Option<Vec<Destination>>,
    pub action: Action,
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) are judged as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Intent {
    /// `namespace/name`, as findings name it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn allows_reader(&self, exe: &str) -> bool {
        match &self.readers {
            None => true,
            Some(rs) => rs.iter().any(|r| r.matches(exe)),
        }
    }

    pub fn allows_destination(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical(ip);
        match &self.destinations {
            None => true,
            Some(ds) => ds.iter().any(|d| d.allows(ip, port)),
        }
    }

    /// DNS names this intent's destinations depend on.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.destinations
            .iter()
            .flatten()
            .filter_map(|d| match &d.target {
                Target::Host(h) => Some(h.name()),
                Target::Cidr(_) => None,
            })
    }
}

/// A consistent set of intents (names unique), in load order.
#[derive(Clone, Debug, Default)]
pub struct IntentSet {
    intents: Vec<Intent>,
    /// Number of files read to build it.
    pub files: usize,
    /// Things that load but deserve a word (e.g. more ports on one prefix
    /// than the kernel holds), as `file:line: message`.
    pub warnings: Vec<PolicyError>,
}

impl IntentSet {
    pub fn new(intents: Vec<Intent>) -> Self {
        IntentSet {
            intents,
            files: 0,
            warnings: Vec::new(),
        }
    }
    pub fn len(&self) -> usize {
        self.intents.len()
    }
    pub fn is_empty(&self) -> bool {
        self.intents.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Intent> {
        self.intents.iter()
    }
    pub fn get(&self, index: usize) -> Option<&Intent> {
        self.intents.get(index)
    }

    /// The most specific matching intent (see the module docs).
    pub fn select(&self, w: &WorkloadMeta) -> Option<&Intent> {
        self.select_index(w.view()).map(|i| &self.intents[i])
    }

    /// Index of the most specific intent matching `w`.
    pub fn select_index(&self, w: WorkloadView<'_>) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, intent) in self.intents.iter().enumerate() {
            if !intent.selector.matches(w) {
                continue;
            }
            best = match best {
                None => Some(i),
                Some(b) => {
                    let (cur, new) = (&self.intents[b], intent);
                    let better = match new.selector.specificity().cmp(&cur.selector.specificity()) {
                        std::cmp::Ordering::Greater => true,
                        std::cmp::Ordering::Less => false,
                        std::cmp::Ordering::Equal => {
                            (&new.namespace, &new.name) < (&cur.namespace, &cur.name)
                        }
                    };
                    Some(if better { i } else { b })
                }
            };
        }
        best
    }

    /// Every DNS name the set depends on (sorted, unique).
    pub fn hosts(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .intents
            .iter()
            .flat_map(|i| i.hosts().map(str::to_string))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Declared intents as the correlation engine's judge. `IntentRef::index`
/// is the intent's index in this set: keep one `Arc<IntentSet>` for the
/// whole handling of an event (a reload swaps in a new set).
impl Judge for IntentSet {
    fn intent_for(&self, w: &WorkloadCtx) -> Option<IntentRef> {
        let i = self.select_index(WorkloadView::from(w))?;
        let intent = &self.intents[i];
        Some(IntentRef {
            name: intent.id(),
            action: intent.action,
            index: i,
        })
    }
    fn allows_reader(&self, intent: &IntentRef, exe: &str) -> bool {
        self.intents
            .get(intent.index)
            .is_none_or(|i| i.allows_reader(exe))
    }
    fn allows_destination(&self, intent: &IntentRef, ip: IpAddr, port: u16) -> bool {
        self.intents
            .get(intent.index)
            .is_none_or(|i| i.allows_destination(ip, port))
    }
}

/// Convenience for tests and callers holding a path list.
pub fn paths_of<P: AsRef<Path>>(paths: &[P]) -> Vec<PathBuf> {
    paths.iter().map(|p| p.as_ref().to_path_buf()).collect()
}

#[cfg(test)]
mod tests;
