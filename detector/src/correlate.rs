//! Correlation: kernel events x workload intents -> findings.
//!
//! The kernel already decided every connect (block / kill / flag) from the
//! maps `policy` wrote; here we explain what happened (who, which
//! credential, where to) and judge what the kernel cannot: readers, foreign
//! credentials, and intents not (yet) in the kernel maps.
//!
//! Rules:
//! 1. `foreign_credential`: a process obtains a credential owned by another
//!    pod, or a host process (not a trusted node agent such as kubelet)
//!    obtains a pod's credential. Always reported, with or without intents.
//! 2. `unexpected_reader`: the workload's intent (declared or learned) does
//!    not list the executable that obtained its credential.
//! 3. `unexpected_destination`: a holder (first-hand or inherited from an
//!    ancestor) connects outside its intent's destinations.
//!
//! Per event only hash lookups: the workload of each cgroup is cached
//! (resolved again after [`WORKLOAD_REFRESH_UNNAMED_NS`] while the runtime
//! has not named the pod, else [`WORKLOAD_REFRESH_NS`], and at once when the
//! kernel reports the cgroup created or removed), and with it the declared
//! intent selected for it (until the judge's [`Judge::generation`] changes:
//! the daemon takes a new one whenever it installs intents) and its learned
//! profile's slot.

use std::{
    collections::{hash_map::Entry, BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use detector_common::{PolicyAction, Verdict};

use crate::{
    events::{Connect, CredentialAccess, Event},
    finding::{Action, Credential, Destination, Finding, FindingKind, Process, Severity, Workload},
    learn::Learner,
    process::{exe_matches, ProcessTable},
};

/// Hash map for the per-event maps keyed by integers (pid, cgroup id):
/// foldhash is several times cheaper than SipHash there and still seeded
/// per process.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What correlation knows about the cgroup an event came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadCtx {
    pub workload: Workload,
    pub service_account: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl WorkloadCtx {
    pub fn is_pod(&self) -> bool {
        self.workload.pod_uid.is_some()
    }
}

/// The intent that judges a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntentRef {
    /// `namespace/name`, or `learned:<workload>` for learned profiles.
    pub name: String,
    pub action: PolicyAction,
    /// Opaque handle for the judge's own lookups.
    pub index: usize,
}

/// The questions correlation asks of an intent source (declared intents,
/// learned profiles).
pub trait Judge {
    fn intent_for(&self, w: &WorkloadCtx) -> Option<IntentRef>;
    fn allows_reader(&self, intent: &IntentRef, exe: &str) -> bool;
    fn allows_destination(&self, intent: &IntentRef, ip: IpAddr, port: u16) -> bool;
    /// While this stays the same (and the workload does not change), the
    /// answer of `intent_for` may be remembered per cgroup. `None`: ask
    /// every time.
    fn generation(&self) -> Option<u64> {
        None
    }
}

/// A fresh, process-wide unique judge generation (see [`Versioned`]).
pub fn new_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A judge whose intent selection the correlator may cache until
/// `generation` changes: take a [`new_generation`] whenever the judge's
/// intents (or anything its selection depends on) change.
pub struct Versioned<'a> {
    pub judge: &'a dyn Judge,
    pub generation: u64,
}

impl Judge for Versioned<'_> {
    fn intent_for(&self, w: &WorkloadCtx) -> Option<IntentRef> {
        self.judge.intent_for(w)
    }
    fn allows_reader(&self, intent: &IntentRef, exe: &str) -> bool {
        self.judge.allows_reader(intent, exe)
    }
    fn allows_destination(&self, intent: &IntentRef, ip: IpAddr, port: u16) -> bool {
        self.judge.allows_destination(intent, ip, port)
    }
    fn generation(&self) -> Option<u64> {
        Some(self.generation)
    }
}

/// No declared intents.
pub struct NoIntents;

impl Judge for NoIntents {
    fn intent_for(&self, _: &WorkloadCtx) -> Option<IntentRef> {
        None
    }
    fn allows_reader(&self, _: &IntentRef, _: &str) -> bool {
        true
    }
    fn allows_destination(&self, _: &IntentRef, _: IpAddr, _: u16) -> bool {
        true
    }
    fn generation(&self) -> Option<u64> {
        Some(0) // never selects anything
    }
}

/// Resolves ids carried by events.
pub trait Lookup {
    fn workload(&mut self, cgroup_id: u64) -> WorkloadCtx;
    fn credential(&self, id: u32) -> Option<&Credential>;
    /// Wall-clock RFC 3339 time of a boot-time ns stamp.
    fn wall_time(&self, boot_ns: u64) -> String;
}

/// How long a resolved pod workload without the runtime's names yet is used
/// before it is resolved again (event time): the names (CRI refreshes at
/// most once a second) reach findings within this delay.
pub const WORKLOAD_REFRESH_UNNAMED_NS: u64 = 1_000_000_000;
/// The same for every other workload (named pods, host cgroups), in case
/// what the attribution knows changes (as the daemon re-applies intents to
/// cgroups every 10 s). Cgroup creation and removal invalidate at once.
pub const WORKLOAD_REFRESH_NS: u64 = 10_000_000_000;
/// Cached workloads unused for this long are dropped at the next sweep.
const WORKLOAD_IDLE_NS: u64 = 600_000_000_000;

/// What the correlator remembers about a cgroup between events.
struct CgroupEntry {
    ctx: Arc<WorkloadCtx>,
    resolved_ns: u64,
    /// Resolve again once the event time passes this.
    refresh_ns: u64,
    /// A cgroup the lookup did not know (no path): resolved again at every
    /// event, as it would have been without the cache.
    unknown: bool,
    used_ns: u64,
    /// (judge generation, its selection for `ctx`).
    declared: Option<(u64, Option<IntentRef>)>,
    /// (learner id, profile slot for `ctx`).
    learned: Option<(u64, Option<usize>)>,
}

/// Which intent judged an event.
enum Source {
    /// The declared intent cached in the cgroup's entry.
    Declared,
    /// A declared intent of a judge without generations (not cached).
    Uncached(IntentRef),
    Learned(usize),
}

/// One question put to a workload's intent.
#[derive(Clone, Copy)]
enum Question<'a> {
    Reader(&'a str),
    Destination(IpAddr, u16),
}

pub struct Correlator {
    pub processes: ProcessTable,
    /// Host executables allowed to read any pod's credential (kubelet
    /// compares old and new token contents when it rotates them).
    pub trusted_host_readers: Vec<String>,
    /// Observe mode: nothing was enforced, whatever the intent says.
    pub observe_only: bool,
    cgroups: FastMap<u64, CgroupEntry>,
    /// Sweep idle cgroup entries when the cache reaches this size.
    sweep_at: usize,
}

fn severity_of(kind: FindingKind) -> Severity {
    match kind {
        FindingKind::ForeignCredential => Severity::Critical,
        FindingKind::UnexpectedReader | FindingKind::UnexpectedDestination => Severity::High,
        FindingKind::StaleReuse => Severity::Medium,
        FindingKind::CoverageDegraded => Severity::Medium,
    }
}

fn action_of(v: Verdict) -> Action {
    match v {
        Verdict::Denied => Action::Blocked,
        Verdict::Killed => Action::Killed,
        Verdict::Allowed | Verdict::Flagged => Action::Alerted,
    }
}

#[allow(clippy::too_many_arguments)]
fn finding(
    lk: &dyn Lookup,
    time_ns: u64,
    kind: FindingKind,
    action: Action,
    intent: Option<&IntentRef>,
    w: &WorkloadCtx,
    process: Process,
    credential: Option<Credential>,
    destination: Option<Destination>,
) -> Finding {
    let who = process.exe.clone().unwrap_or_else(|| process.comm.clone());
    let place = match (&w.workload.namespace, &w.workload.pod, &w.workload.pod_uid) {
        (Some(ns), Some(pod), _) => format!("pod {ns}/{pod}"),
        (_, _, Some(uid)) => format!("pod {uid}"),
        _ => format!(
            "host cgroup {}",
            w.workload.cgroup_path.as_deref().unwrap_or("?")
        ),
    };
    let message = match kind {
        FindingKind::UnexpectedReader => format!(
            "{who} in {place} obtained credential {} not expected by its intent",
            credential.as_ref().map(|c| c.path.as_str()).unwrap_or("?")
        ),
        FindingKind::UnexpectedDestination => format!(
            "{who} in {place} holds credential {} and connected to {} outside its intent ({})",
            credential.as_ref().map(|c| c.path.as_str()).unwrap_or("?"),
            destination
                .as_ref()
                .map(|d| format!("{}:{}/{}", d.ip, d.port, d.protocol))
                .unwrap_or_default(),
            action.as_str(),
        ),
        FindingKind::ForeignCredential => format!(
            "{who} in {place} obtained credential {} owned by pod {}",
            credential.as_ref().map(|c| c.path.as_str()).unwrap_or("?"),
            credential
                .as_ref()
                .and_then(|c| c.owner_pod_uid.clone())
                .unwrap_or_default()
        ),
        FindingKind::StaleReuse | FindingKind::CoverageDegraded => kind.as_str().to_string(),
    };
    Finding {
        time: lk.wall_time(time_ns),
        kind,
        severity: severity_of(kind),
        action,
        intent: intent.map(|i| i.name.clone()),
        workload: w.workload.clone(),
        process,
        credential,
        destination,
        mitre: kind.mitre().iter().map(|s| s.to_string()).collect(),
        count: 1,
        message,
    }
}

fn refresh_of(w: &WorkloadCtx) -> u64 {
    if w.workload.pod_uid.is_some() && w.workload.pod.is_none() {
        WORKLOAD_REFRESH_UNNAMED_NS
    } else {
        WORKLOAD_REFRESH_NS
    }
}

/// The cache entry of `cgroup_id`, (re)resolved through `lk` when missing,
/// stale or unknown; idle entries are swept when the cache has doubled.
fn cgroup_entry<'m>(
    cgroups: &'m mut FastMap<u64, CgroupEntry>,
    sweep_at: &mut usize,
    cgroup_id: u64,
    now_ns: u64,
    lk: &mut dyn Lookup,
) -> &'m mut CgroupEntry {
    if cgroups.len() >= *sweep_at {
        cgroups.retain(|_, e| now_ns.saturating_sub(e.used_ns) < WORKLOAD_IDLE_NS);
        *sweep_at = (cgroups.len() * 2).max(4096);
    }
    match cgroups.entry(cgroup_id) {
        Entry::Occupied(o) => {
            let e = o.into_mut();
            if e.unknown || now_ns.saturating_sub(e.resolved_ns) >= e.refresh_ns {
                let fresh = lk.workload(cgroup_id);
                if *e.ctx != fresh {
                    e.unknown = fresh.workload.cgroup_path.is_none();
                    e.refresh_ns = refresh_of(&fresh);
                    e.ctx = Arc::new(fresh);
                    e.declared = None;
                    e.learned = None;
                }
                e.resolved_ns = now_ns;
            }
            e.used_ns = e.used_ns.max(now_ns);
            e
        }
        Entry::Vacant(v) => {
            let ctx = lk.workload(cgroup_id);
            v.insert(CgroupEntry {
                unknown: ctx.workload.cgroup_path.is_none(),
                refresh_ns: refresh_of(&ctx),
                ctx: Arc::new(ctx),
                resolved_ns: now_ns,
                used_ns: now_ns,
                declared: None,
                learned: None,
            })
        }
    }
}

impl Correlator {
    pub fn new(trusted_host_readers: Vec<String>, observe_only: bool) -> Self {
        Correlator {
            processes: ProcessTable::default(),
            trusted_host_readers,
            observe_only,
            cgroups: FastMap::default(),
            sweep_at: 4096,
        }
    }

    /// Findings name the process (tgid), not the thread.
    fn process(&mut self, tgid: u32, ppid: u32, comm: &str, uid: Option<u32>) -> Process {
        let exe = self.processes.exe_of(tgid).map(|e| e.to_string());
        Process {
            pid: tgid,
            ppid: if ppid != 0 {
                ppid
            } else {
                self.processes.get(tgid).map(|p| p.ppid).unwrap_or(0)
            },
            exe,
            comm: comm.to_string(),
            ancestry: self.processes.ancestry(tgid),
            uid,
        }
    }

    /// The workload of `cgroup_id` at event time `now_ns`, resolved through
    /// `lk` when not cached or older than [`WORKLOAD_REFRESH_NS`].
    pub fn workload(
        &mut self,
        cgroup_id: u64,
        now_ns: u64,
        lk: &mut dyn Lookup,
    ) -> Arc<WorkloadCtx> {
        cgroup_entry(&mut self.cgroups, &mut self.sweep_at, cgroup_id, now_ns, lk)
            .ctx
            .clone()
    }

    /// What is known about workloads changed (e.g. the Kubernetes API data):
    /// resolve every cached workload again at its next event.
    pub fn invalidate_workloads(&mut self) {
        for e in self.cgroups.values_mut() {
            e.resolved_ns = 0;
        }
    }

    /// Number of cgroups whose workload is cached.
    pub fn cached_workloads(&self) -> usize {
        self.cgroups.len()
    }

    /// Judge one event. A declared intent decides when one selects the
    /// workload; otherwise the learner learns (quietly, during its window)
    /// or judges with what it learned.
    pub fn on_event(
        &mut self,
        ev: &Event,
        lk: &mut dyn Lookup,
        declared: &dyn Judge,
        learner: Option<&mut Learner>,
    ) -> Vec<Finding> {
        self.processes.observe(ev);
        match ev {
            Event::CredentialAccess(a) => self.on_access(a, lk, declared, learner),
            Event::Connect(c) if c.holder_credential != 0 => {
                self.on_holder_connect(c, lk, declared, learner)
            }
            Event::CgroupMkdir(c) | Event::CgroupRmdir(c) => {
                self.cgroups.remove(&c.id);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Ask the workload's intent (declared, else learned) `q`: `None` when
    /// nothing judges it (no intent, or still learning), else whether `q`
    /// is allowed and by which intent. Selections are cached per cgroup.
    fn judge(
        entry: &mut CgroupEntry,
        now_ns: u64,
        declared: &dyn Judge,
        learner: Option<&mut Learner>,
        q: Question<'_>,
    ) -> Option<(bool, Source)> {
        let mut uncached = None;
        let intent = match declared.generation() {
            Some(g) => {
                if !matches!(entry.declared, Some((have, _)) if have == g) {
                    entry.declared = Some((g, declared.intent_for(&entry.ctx)));
                }
                entry.declared.as_ref().and_then(|(_, i)| i.as_ref())
            }
            None => {
                uncached = declared.intent_for(&entry.ctx);
                uncached.as_ref()
            }
        };
        if let Some(i) = intent {
            let ok = match q {
                Question::Reader(exe) => declared.allows_reader(i, exe),
                Question::Destination(ip, port) => declared.allows_destination(i, ip, port),
            };
            let source = match &uncached {
                Some(i) => Source::Uncached(i.clone()),
                None => Source::Declared,
            };
            return Some((ok, source));
        }
        let l = learner?;
        let slot = match entry.learned {
            Some((id, slot)) if id == l.id() => slot,
            _ => {
                let slot = l.slot_for(&entry.ctx, now_ns);
                entry.learned = Some((l.id(), slot));
                slot
            }
        }?;
        let learning = match q {
            Question::Reader(exe) => l.observe_reader_in(slot, exe, now_ns),
            Question::Destination(ip, port) => l.observe_destination_in(slot, ip, port, now_ns),
        };
        if learning {
            return None;
        }
        let ok = match q {
            Question::Reader(exe) => l.allows_reader_in(slot, exe),
            Question::Destination(ip, port) => l.allows_destination_in(slot, ip, port),
        };
        Some((ok, Source::Learned(slot)))
    }

    /// The intent behind a judgement, for a finding.
    fn intent_of(
        entry: &CgroupEntry,
        source: Source,
        learner: Option<&Learner>,
    ) -> Option<IntentRef> {
        match source {
            Source::Declared => entry.declared.as_ref().and_then(|(_, i)| i.clone()),
            Source::Uncached(i) => Some(i),
            Source::Learned(slot) => learner.map(|l| l.intent_in(slot)),
        }
    }

    fn on_access(
        &mut self,
        a: &CredentialAccess,
        lk: &mut dyn Lookup,
        declared: &dyn Judge,
        mut learner: Option<&mut Learner>,
    ) -> Vec<Finding> {
        if !a.readable {
            return Vec::new(); // kubelet writing a rotated token, not a read
        }
        let (cg, t) = (a.common.cgroup_id, a.common.time_ns);
        let entry = cgroup_entry(&mut self.cgroups, &mut self.sweep_at, cg, t, lk);
        let Some(cred) = lk.credential(a.credential_id) else {
            return Vec::new(); // no longer watched
        };
        let w = entry.ctx.clone();
        // The full `Process` (ancestry walk, clones) only when there is a
        // finding: most reads are the expected reader and produce none.
        let exe = self.processes.exe_of(a.common.tgid);
        let exe = exe.as_deref().unwrap_or_default();

        if let Some(owner) = cred.owner_pod_uid.as_deref() {
            let foreign = match &w.workload.pod_uid {
                Some(uid) => uid != owner,
                None => !exe_matches(exe, &self.trusted_host_readers),
            };
            if foreign {
                let cred = Some(cred.clone());
                let process = self.process(a.common.tgid, a.ppid, &a.comm, Some(a.uid));
                return vec![finding(
                    &*lk,
                    t,
                    FindingKind::ForeignCredential,
                    Action::Alerted,
                    None,
                    &w,
                    process,
                    cred,
                    None,
                )];
            }
        }
        let judged = Self::judge(
            entry,
            t,
            declared,
            learner.as_deref_mut(),
            Question::Reader(exe),
        );
        let Some((false, source)) = judged else {
            return Vec::new();
        };
        let intent = Self::intent_of(entry, source, learner.as_deref());
        let cred = Some(cred.clone());
        let process = self.process(a.common.tgid, a.ppid, &a.comm, Some(a.uid));
        vec![finding(
            &*lk,
            t,
            FindingKind::UnexpectedReader,
            Action::Alerted,
            intent.as_ref(),
            &w,
            process,
            cred,
            None,
        )]
    }

    fn on_holder_connect(
        &mut self,
        c: &Connect,
        lk: &mut dyn Lookup,
        declared: &dyn Judge,
        mut learner: Option<&mut Learner>,
    ) -> Vec<Finding> {
        let (cg, t) = (c.common.cgroup_id, c.common.time_ns);
        let entry = cgroup_entry(&mut self.cgroups, &mut self.sweep_at, cg, t, lk);
        let judged = Self::judge(
            entry,
            t,
            declared,
            learner.as_deref_mut(),
            Question::Destination(c.addr, c.port),
        );
        let kernel_judged = c.reason == "unexpected_destination";
        let outside = kernel_judged || matches!(judged, Some((false, _)));
        if !outside && c.verdict_typed == Verdict::Allowed {
            return Vec::new();
        }
        let intent =
            judged.and_then(|(_, source)| Self::intent_of(entry, source, learner.as_deref()));
        let w = entry.ctx.clone();
        let cred = lk.credential(c.holder_credential).cloned();
        let destination = Destination {
            ip: c.addr,
            port: c.port,
            protocol: c.protocol.as_str().to_string(),
        };
        // Deny-list verdicts (manual quarantine) are reported as such too.
        let kind = FindingKind::UnexpectedDestination;
        let action = if self.observe_only {
            Action::Alerted
        } else {
            action_of(c.verdict_typed)
        };
        let process = self.process(c.common.tgid, 0, &c.comm, None);
        vec![finding(
            &*lk,
            t,
            kind,
            action,
            intent.as_ref(),
            &w,
            process,
            cred,
            Some(destination),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Common, Exec, Protocol};

    struct Fixed {
        workloads: BTreeMap<u64, WorkloadCtx>,
        creds: BTreeMap<u32, Credential>,
    }

    impl Lookup for Fixed {
        fn workload(&mut self, cgroup_id: u64) -> WorkloadCtx {
            self.workloads
                .get(&cgroup_id)
                .cloned()
                .unwrap_or_else(|| WorkloadCtx {
                    workload: Workload {
                        cgroup_id,
                        ..Default::default()
                    },
                    ..Default::default()
                })
        }
        fn credential(&self, id: u32) -> Option<&Credential> {
            self.creds.get(&id)
        }
        fn wall_time(&self, _: u64) -> String {
            "2026-11-23T10:00:00.000Z".into()
        }
    }

    struct OneIntent;
    impl Judge for OneIntent {
        fn intent_for(&self, w: &WorkloadCtx) -> Option<IntentRef> {
            (w.workload.pod_uid.as_deref() == Some("pod-a")).then(|| IntentRef {
                name: "ns/a".into(),
                action: PolicyAction::Block,
                index: 0,
            })
        }
        fn allows_reader(&self, _: &IntentRef, exe: &str) -> bool {
            exe == "/app/server"
        }
        fn allows_destination(&self, _: &IntentRef, ip: IpAddr, port: u16) -> bool {
            ip == IpAddr::from([10, 96, 0, 1]) && port == 443
        }
    }

    fn fixture() -> Fixed {
        let pod = |uid: &str, id: u64| WorkloadCtx {
            workload: Workload {
                pod_uid: Some(uid.into()),
                cgroup_id: id,
                ..Default::default()
            },
            ..Default::default()
        };
        Fixed {
            workloads: [(1, pod("pod-a", 1)), (2, pod("pod-b", 2))]
                .into_iter()
                .collect(),
            creds: [(
                7,
                Credential {
                    kind: "kubernetes-serviceaccount".into(),
                    path: "/t".into(),
                    owner_pod_uid: Some("pod-a".into()),
                    inode: 1,
                    dev: 1,
                },
            )]
            .into_iter()
            .collect(),
        }
    }

    fn common(tgid: u32, cg: u64) -> Common {
        Common {
            time_ns: 1,
            pid: tgid,
            tgid,
            cgroup_id: cg,
        }
    }

    fn exec(c: &mut Correlator, tgid: u32, cg: u64, exe: &str) {
        let ev = Event::Exec(Exec {
            common: common(tgid, cg),
            ppid: 1,
            uid: 0,
            comm: "x".into(),
            filename: exe.into(),
            holder_credential: 0,
        });
        c.on_event(&ev, &mut fixture(), &NoIntents, None);
    }

    fn access(tgid: u32, cg: u64) -> Event {
        Event::CredentialAccess(CredentialAccess {
            common: common(tgid, cg),
            ppid: 1,
            uid: 0,
            gid: 0,
            comm: "x".into(),
            credential_id: 7,
            dev: 1,
            ino: 1,
            route: "openat",
            fd: 3,
            readable: true,
            writable: false,
            repeats: 0,
        })
    }

    fn connect(
        tgid: u32,
        cg: u64,
        ip: [u8; 4],
        port: u16,
        verdict: Verdict,
        reason: &'static str,
    ) -> Event {
        Event::Connect(Connect {
            common: common(tgid, cg),
            comm: "x".into(),
            addr: IpAddr::from(ip),
            port,
            protocol: Protocol::Tcp,
            hook: "connect4",
            verdict: crate::events::verdict_name(verdict),
            reason,
            holder_credential: 7,
            verdict_typed: verdict,
        })
    }

    #[test]
    fn expected_reader_and_destination_are_quiet() {
        let mut c = Correlator::new(vec![], false);
        exec(&mut c, 100, 1, "/app/server");
        assert!(c
            .on_event(&access(100, 1), &mut fixture(), &OneIntent, None)
            .is_empty());
        let ok = connect(
            100,
            1,
            [10, 96, 0, 1],
            443,
            Verdict::Allowed,
            "allowed_destination",
        );
        assert!(c.on_event(&ok, &mut fixture(), &OneIntent, None).is_empty());
    }

    #[test]
    fn shell_reader_and_blocked_destination_are_findings() {
        let mut c = Correlator::new(vec![], false);
        exec(&mut c, 101, 1, "/bin/sh");
        let f = c.on_event(&access(101, 1), &mut fixture(), &OneIntent, None);
        assert_eq!(f.len(), 1);
        assert_eq!(
            (
                f[0].kind,
                f[0].process.exe.as_deref(),
                f[0].intent.as_deref()
            ),
            (FindingKind::UnexpectedReader, Some("/bin/sh"), Some("ns/a"))
        );
        let blocked = connect(
            101,
            1,
            [169, 254, 1, 1],
            8080,
            Verdict::Denied,
            "unexpected_destination",
        );
        let f = c.on_event(&blocked, &mut fixture(), &OneIntent, None);
        assert_eq!(
            (f[0].kind, f[0].action),
            (FindingKind::UnexpectedDestination, Action::Blocked)
        );
        assert_eq!(f[0].destination.as_ref().unwrap().port, 8080);
        let mut observe = Correlator::new(vec![], true);
        let f = observe.on_event(
            &connect(
                101,
                1,
                [169, 254, 1, 1],
                8080,
                Verdict::Flagged,
                "unexpected_destination",
            ),
            &mut fixture(),
            &OneIntent,
            None,
        );
        assert_eq!(f[0].action, Action::Alerted);
    }

    #[test]
    fn userspace_judges_what_the_kernel_did_not() {
        // No kernel policy yet (reason none), but the intent forbids it.
        let mut c = Correlator::new(vec![], false);
        let f = c.on_event(
            &connect(102, 1, [1, 2, 3, 4], 80, Verdict::Allowed, "none"),
            &mut fixture(),
            &OneIntent,
            None,
        );
        assert_eq!(
            (f[0].kind, f[0].action),
            (FindingKind::UnexpectedDestination, Action::Alerted)
        );
    }

    #[test]
    fn foreign_credentials() {
        let mut c = Correlator::new(vec!["/usr/bin/kubelet".into()], false);
        exec(&mut c, 103, 2, "/app/server");
        let f = c.on_event(&access(103, 2), &mut fixture(), &OneIntent, None);
        assert_eq!(
            f[0].kind,
            FindingKind::ForeignCredential,
            "pod b reading pod a's token"
        );
        exec(&mut c, 104, 99, "/usr/bin/cat");
        assert_eq!(
            c.on_event(&access(104, 99), &mut fixture(), &NoIntents, None)[0].kind,
            FindingKind::ForeignCredential,
            "host process"
        );
        exec(&mut c, 105, 99, "/usr/bin/kubelet");
        assert!(
            c.on_event(&access(105, 99), &mut fixture(), &NoIntents, None)
                .is_empty(),
            "kubelet is trusted"
        );
    }

    #[test]
    fn learner_is_quiet_while_learning_and_judges_after() {
        let mut c = Correlator::new(vec![], false);
        exec(&mut c, 106, 1, "/app/server");
        let mut learning = Learner::new(u64::MAX);
        assert!(c
            .on_event(
                &access(106, 1),
                &mut fixture(),
                &NoIntents,
                Some(&mut learning)
            )
            .is_empty());
        let to = connect(106, 1, [1, 1, 1, 1], 53, Verdict::Allowed, "none");
        assert!(c
            .on_event(&to, &mut fixture(), &NoIntents, Some(&mut learning))
            .is_empty());
        // A learner whose window is over judges: nothing was learned, so the
        // reader is unexpected (an attacker arriving after the window).
        let mut done = Learner::new(0);
        let f = c.on_event(&access(106, 1), &mut fixture(), &NoIntents, Some(&mut done));
        assert_eq!(f[0].kind, FindingKind::UnexpectedReader);
        assert!(f[0].intent.as_deref().unwrap().starts_with("learned:"));
    }

    /// Resolves a pod cgroup, counting the resolves; the runtime's names
    /// appear when `named` is set.
    struct Counting {
        resolves: usize,
        named: bool,
    }

    impl Lookup for Counting {
        fn workload(&mut self, cgroup_id: u64) -> WorkloadCtx {
            self.resolves += 1;
            WorkloadCtx {
                workload: Workload {
                    pod_uid: Some("pod-a".into()),
                    pod: self.named.then(|| "a-0".to_string()),
                    cgroup_id,
                    cgroup_path: Some("/kubepods/poda".into()),
                    ..Default::default()
                },
                ..Default::default()
            }
        }
        fn credential(&self, _: u32) -> Option<&Credential> {
            None
        }
        fn wall_time(&self, _: u64) -> String {
            String::new()
        }
    }

    #[test]
    fn cached_workloads_are_refreshed_and_invalidated() {
        let mut c = Correlator::new(vec![], false);
        let mut lk = Counting {
            resolves: 0,
            named: false,
        };
        let t = 1_000;
        assert!(c.workload(5, t, &mut lk).workload.pod.is_none());
        c.workload(5, t + 1_000_000, &mut lk);
        assert_eq!(lk.resolves, 1, "cached");
        lk.named = true;
        c.workload(5, t + WORKLOAD_REFRESH_UNNAMED_NS - 1, &mut lk);
        assert_eq!(lk.resolves, 1, "still cached");
        let w = c.workload(5, t + WORKLOAD_REFRESH_UNNAMED_NS, &mut lk);
        assert_eq!(
            (lk.resolves, w.workload.pod.as_deref()),
            (2, Some("a-0")),
            "an unnamed pod is resolved again after a second"
        );
        let t2 = t + WORKLOAD_REFRESH_UNNAMED_NS;
        c.workload(5, t2 + WORKLOAD_REFRESH_UNNAMED_NS, &mut lk);
        assert_eq!(lk.resolves, 2, "a named pod keeps its entry longer");
        c.workload(5, t2 + WORKLOAD_REFRESH_NS, &mut lk);
        assert_eq!(lk.resolves, 3, "and is resolved again after 10 s");
        // The kernel reports the cgroup's removal: the next event resolves.
        let rmdir = Event::CgroupRmdir(crate::events::Cgroup {
            common: common(1, 5),
            id: 5,
            level: 2,
            path: "kubepods/poda".into(),
        });
        c.on_event(&rmdir, &mut lk, &NoIntents, None);
        c.workload(5, t2 + WORKLOAD_REFRESH_NS, &mut lk);
        assert_eq!(lk.resolves, 4, "invalidated by rmdir");
    }

    /// `OneIntent`, counting its selections.
    struct CountingJudge(std::cell::Cell<usize>);
    impl Judge for CountingJudge {
        fn intent_for(&self, w: &WorkloadCtx) -> Option<IntentRef> {
            self.0.set(self.0.get() + 1);
            OneIntent.intent_for(w)
        }
        fn allows_reader(&self, i: &IntentRef, exe: &str) -> bool {
            OneIntent.allows_reader(i, exe)
        }
        fn allows_destination(&self, i: &IntentRef, ip: IpAddr, port: u16) -> bool {
            OneIntent.allows_destination(i, ip, port)
        }
    }

    #[test]
    fn intent_selection_is_cached_per_generation() {
        let mut c = Correlator::new(vec![], false);
        exec(&mut c, 107, 1, "/bin/sh");
        let judge = CountingJudge(Default::default());
        let mut fx = fixture();
        let g1 = new_generation();
        for _ in 0..3 {
            let v = Versioned {
                judge: &judge,
                generation: g1,
            };
            let f = c.on_event(&access(107, 1), &mut fx, &v, None);
            assert_eq!(f[0].intent.as_deref(), Some("ns/a"));
        }
        assert_eq!(judge.0.get(), 1, "selected once for the generation");
        let v = Versioned {
            judge: &judge,
            generation: new_generation(),
        };
        let f = c.on_event(&access(107, 1), &mut fx, &v, None);
        assert_eq!(f[0].intent.as_deref(), Some("ns/a"));
        assert_eq!(judge.0.get(), 2, "a new generation selects again");
        // Without a generation, every event selects.
        c.on_event(&access(107, 1), &mut fx, &judge, None);
        c.on_event(&access(107, 1), &mut fx, &judge, None);
        assert_eq!(judge.0.get(), 4);
    }
}
