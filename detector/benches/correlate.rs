//! Correlation throughput on one core (`cargo bench -p detector --bench
//! correlate`; run by `cargo xtask bench`, which puts the numbers in
//! docs/BENCHMARKS.md). Not a test: nothing asserts timings.
//!
//! A synthetic node: `--workloads` pods, each with a container shim, one app
//! process, one service-account credential and one cgroup (cgroupfs layout,
//! fed to the daemon's `Attributor` as the kernel's mkdir events would), and
//! `--intents` declared WorkloadIntents (namespace + app label selectors, the
//! app as the only reader, the API server and a database subnet as
//! destinations). Pods not selected by a declared intent are judged by the
//! learner (embedded default), whose window is over (profiles learned from a
//! warm-up pass). The runtime's names and labels (CRI) are added to what the
//! `Attributor` resolves, the way `CriHandle::enrich` does.
//!
//! The event mix (per 100 events, all benign, pods picked at random):
//! - 50 connects of non-holders (sidecars, other processes),
//! - 30 process events of non-holders: fork, exec (`/bin/sh`, a probe),
//!   exit — 10 each, pids recycled,
//! - 10 credential reads by the expected reader (the app),
//! - 10 holder connects to allowed destinations (kernel verdict allowed).
//!
//! Measured, each repeated `--reps` times (reported: best and median):
//! - `decode`: `detector::events::decode` of raw `#[repr(C)]` records built
//!   from detector-common's structs;
//! - `correlate`: `Correlator::on_event` alone on decoded events;
//! - `daemon`: what `daemon::Pipeline::handle_record` does per record —
//!   decode, the event and latency metrics, the credential-read metric,
//!   `Correlator::on_event` through the daemon's own `Resolver`
//!   (`Attributor` + `CredentialTable`) with the declared intents behind a
//!   `Versioned` judge and the learner, then the `Aggregator` and the
//!   findings metric. Not included: the `--debug-events` stream (off by
//!   default), kernel-map updates on cgroup mkdir (none in the mix) and the
//!   sinks, which serialize and write on their own threads;
//! - `findings`: the same `daemon` path with every event a credential read
//!   by an unexpected reader (a shell), to price the finding path; repeats
//!   fold in the aggregator (60 s window) as in the daemon.
//!
//! Output: one `RESULT name=<case> events=<n> best_eps=<x> median_eps=<y>
//! ns_per_event=<z> findings_per_pass=<f>` line per case (parsed by xtask),
//! and the set-up on stderr (`correlate bench: ...`).

use std::{collections::HashMap, hint::black_box, path::Path, time::Instant};

use detector::{
    aggregate::Aggregator,
    attribution::Attributor,
    correlate::{new_generation, Correlator, Judge, Lookup, Versioned, WorkloadCtx},
    credentials::CredentialTable,
    daemon::Resolver,
    events::{decode, Event},
    finding::{Credential, Finding},
    learn::Learner,
    observe::Metrics,
    policy::{load_str, DnsTable, IntentSet},
};
use detector_common::{
    AccessRoute, ConnectEvent, CredentialAccessEvent, CredentialKey, EgressHook, EventHeader,
    EventKind, ExecEvent, ExitEvent, ForkEvent, Verdict, VerdictReason, AF_INET, COMM_LEN,
    EVENT_KINDS, FILENAME_LEN, IPPROTO_TCP,
};

struct Opts {
    workloads: usize,
    intents: usize,
    events: usize,
    reps: usize,
    /// Cases to run (all when empty), e.g. for profiling one of them.
    cases: Vec<String>,
}

impl Opts {
    fn runs(&self, case: &str) -> bool {
        self.cases.is_empty() || self.cases.iter().any(|c| c == case)
    }
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        workloads: 5000,
        intents: 100,
        events: 1_000_000,
        reps: 5,
        cases: Vec::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| -> usize {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--workloads" => o.workloads = val(i),
            "--intents" => o.intents = val(i),
            "--events" => o.events = val(i),
            "--reps" => o.reps = val(i),
            "--cases" => {
                o.cases = args
                    .get(i + 1)
                    .map(|v| v.split(',').map(str::to_string).collect())
                    .unwrap_or_default()
            }
            // cargo bench passes --bench; ignore anything else.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o.workloads = o.workloads.max(1);
    o.reps = o.reps.max(1);
    o.events = o.events.max(100);
    o
}

// ---- the synthetic node -------------------------------------------------------

const APP_EXE: &str = "/app/server";
/// Pids of synthetic processes live above any real pid_max (4194304), so a
/// /proc fallback can never find a real process.
const PID_BASE: u32 = 5_000_000;
/// Aggregation window of the daemon's default (`--aggregate-window 60s`).
const AGGREGATE_WINDOW_NS: u64 = 60_000_000_000;

struct Pod {
    uid: String,
    namespace: String,
    name: String,
    app: String,
    cgroup_id: u64,
    cgroup_path: String,
    shim_pid: u32,
    app_pid: u32,
    credential_id: u32,
}

fn pod_uid(i: usize) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        0x1000_0000 + i,
        i % 0xffff,
        i % 0xfff,
        (i * 7) % 0xfff,
        i * 2654435761 % (1 << 48)
    )
}

fn pods(n: usize, namespaces: usize) -> Vec<Pod> {
    (0..n)
        .map(|i| {
            let uid = pod_uid(i);
            let cid = format!("{:064x}", (i as u128 + 1) * 0x9e37_79b9_7f4a_7c15);
            let app = format!("app-{}", i % 10);
            Pod {
                namespace: format!("ns-{}", i % namespaces),
                name: format!("{app}-7d9f8b6c5-{:05x}", i % 0xfffff),
                app,
                cgroup_path: format!("/kubepods/burstable/pod{uid}/{cid}"),
                uid,
                cgroup_id: 10_000 + i as u64,
                shim_pid: PID_BASE + 2 * i as u32,
                app_pid: PID_BASE + 2 * i as u32 + 1,
                credential_id: i as u32 + 1,
            }
        })
        .collect()
}

/// The database replica a pod talks to (inside the intents' 10.20.0.0/16).
fn db_addr(p: &Pod) -> [u8; 4] {
    [
        10,
        20,
        (p.cgroup_id % 250) as u8,
        (p.cgroup_id / 250 % 250) as u8 + 1,
    ]
}

fn credential_of(p: &Pod) -> Credential {
    Credential {
        kind: "kubernetes-serviceaccount".into(),
        path: format!(
            "/var/lib/kubelet/pods/{}/volumes/kubernetes.io~projected/kube-api-access-x7k2p/token",
            p.uid
        ),
        owner_pod_uid: Some(p.uid.clone()),
        inode: 1_000_000 + p.credential_id as u64,
        dev: 0x1f,
    }
}

/// Intents select `ns-<k>` + `app: app-<j>`; namespaces beyond the intents
/// are judged by the learner.
fn intents(n: usize) -> IntentSet {
    let mut y = String::new();
    for k in 0..n {
        let (ns, app) = (k / 10, k % 10);
        y.push_str(&format!(
            "---\napiVersion: detector.dev/v1alpha1\nkind: WorkloadIntent\n\
             metadata: {{name: app-{app}, namespace: ns-{ns}}}\n\
             spec:\n  selector:\n    namespace: ns-{ns}\n    podLabels: {{app: app-{app}}}\n\
             \x20 readers: [{APP_EXE}]\n  destinations:\n\
             \x20   - {{cidr: 10.96.0.1/32, ports: [443]}}\n\
             \x20   - {{cidr: 10.20.0.0/16, ports: [5432]}}\n  action: block\n"
        ));
    }
    if n == 0 {
        return IntentSet::default();
    }
    load_str(Path::new("bench-intents.yaml"), &y, &DnsTable::new()).expect("bench intents load")
}

/// The daemon's state behind its `Resolver`: the `Attributor` (fed the
/// pods' cgroups as mkdir events) and the `CredentialTable`, plus what the
/// container runtime would name (pod UID -> namespace, name, labels).
struct Node {
    attribution: Attributor,
    credentials: CredentialTable,
    cri: HashMap<String, (String, String, std::collections::BTreeMap<String, String>)>,
}

fn node(pods: &[Pod]) -> Node {
    let mut attribution = Attributor::new("/nonexistent-cgroup-root-for-bench");
    let mut credentials = CredentialTable::default();
    let mut cri = HashMap::new();
    for p in pods {
        attribution.observe_mkdir(p.cgroup_id, &p.cgroup_path);
        let (w, _) = credentials.upsert(
            CredentialKey {
                dev: 0x1f,
                ino: 1_000_000 + p.credential_id as u64,
            },
            credential_of(p),
        );
        assert_eq!(w.id, p.credential_id, "ids are handed out in order");
        cri.insert(
            p.uid.clone(),
            (
                p.namespace.clone(),
                p.name.clone(),
                [
                    ("app".to_string(), p.app.clone()),
                    ("pod-template-hash".to_string(), "7d9f8b6c5".to_string()),
                ]
                .into_iter()
                .collect(),
            ),
        );
    }
    Node {
        attribution,
        credentials,
        cri,
    }
}

/// The daemon's `Resolver`, with the runtime's names filled in the way
/// `CriHandle::enrich` fills them (the bench has no container runtime).
struct NamedResolver<'a> {
    inner: Resolver<'a>,
    cri: &'a HashMap<String, (String, String, std::collections::BTreeMap<String, String>)>,
}

impl Lookup for NamedResolver<'_> {
    fn workload(&mut self, cgroup_id: u64) -> WorkloadCtx {
        let mut w = self.inner.workload(cgroup_id);
        if let Some((ns, name, labels)) = w.workload.pod_uid.as_ref().and_then(|u| self.cri.get(u))
        {
            w.workload.namespace = Some(ns.clone());
            w.workload.pod = Some(name.clone());
            w.labels = labels.clone();
        }
        w
    }
    fn credential(&self, id: u32) -> Option<&Credential> {
        self.inner.credential(id)
    }
    fn wall_time(&self, boot_ns: u64) -> String {
        self.inner.wall_time(boot_ns)
    }
}

const WALL_OFFSET_NS: i128 = 1_700_000_000_000_000_000;

// ---- raw records ----------------------------------------------------------------

fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: plain #[repr(C)] records of integers and byte arrays, built
    // from `zeroed()` so padding bytes are zero.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

fn comm(s: &str) -> [u8; COMM_LEN] {
    let mut c = [0u8; COMM_LEN];
    let n = s.len().min(COMM_LEN - 1);
    c[..n].copy_from_slice(&s.as_bytes()[..n]);
    c
}

fn header(kind: EventKind, tgid: u32, time_ns: u64, cgroup_id: u64) -> EventHeader {
    EventHeader {
        kind: kind as u16,
        pid: tgid,
        tgid,
        time_ns,
        cgroup_id,
        ..Default::default()
    }
}

fn access(p: &Pod, tgid: u32, t: u64) -> Vec<u8> {
    // SAFETY: all-integer record; zero is a valid value for every field.
    let mut e: CredentialAccessEvent = unsafe { std::mem::zeroed() };
    e.header = header(EventKind::CredentialAccess, tgid, t, p.cgroup_id);
    e.ppid = p.shim_pid;
    e.credential_id = p.credential_id;
    e.dev = 0x1f;
    e.ino = 1_000_000 + p.credential_id as u64;
    e.f_mode = 1;
    e.route = AccessRoute::Openat as u16;
    e.fd = 7;
    e.comm = comm("server");
    bytes_of(&e)
}

fn connect(p: &Pod, tgid: u32, t: u64, addr: [u8; 4], port: u16, holder: bool) -> Vec<u8> {
    // SAFETY: as above.
    let mut e: ConnectEvent = unsafe { std::mem::zeroed() };
    e.header = header(EventKind::Connect, tgid, t, p.cgroup_id);
    e.family = AF_INET;
    e.port = port;
    e.protocol = IPPROTO_TCP;
    e.hook = EgressHook::Connect4 as u8;
    e.verdict = Verdict::Allowed as u8;
    e.reason = if holder {
        VerdictReason::AllowedDestination as u8
    } else {
        VerdictReason::None as u8
    };
    e.holder_credential = if holder { p.credential_id } else { 0 };
    e.addr[..4].copy_from_slice(&addr);
    e.comm = comm(if holder { "server" } else { "sidecar" });
    bytes_of(&e)
}

fn exec(p: &Pod, tgid: u32, ppid: u32, t: u64, exe: &str) -> Vec<u8> {
    // SAFETY: as above.
    let mut e: ExecEvent = unsafe { std::mem::zeroed() };
    e.header = header(EventKind::Exec, tgid, t, p.cgroup_id);
    e.ppid = ppid;
    let n = exe.len().min(FILENAME_LEN);
    e.filename[..n].copy_from_slice(&exe.as_bytes()[..n]);
    e.filename_len = n as u32;
    e.comm = comm(exe.rsplit('/').next().unwrap_or(exe));
    bytes_of(&e)
}

fn fork(p: &Pod, child: u32, parent: u32, t: u64, parent_comm: &str) -> Vec<u8> {
    // SAFETY: as above.
    let mut e: ForkEvent = unsafe { std::mem::zeroed() };
    e.header = header(EventKind::Fork, child, t, p.cgroup_id);
    e.parent_tgid = parent;
    e.comm = comm(parent_comm);
    bytes_of(&e)
}

fn exit(p: &Pod, tgid: u32, t: u64) -> Vec<u8> {
    // SAFETY: as above.
    let mut e: ExitEvent = unsafe { std::mem::zeroed() };
    e.header = header(EventKind::Exit, tgid, t, p.cgroup_id);
    bytes_of(&e)
}

/// Cheap deterministic PRNG (xorshift), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Seed records: the shim and app of every pod (exec), so the process table
/// knows them, as /proc seeding plus exec events give the daemon.
fn seed_records(pods: &[Pod], t: u64) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for p in pods {
        v.push(exec(
            p,
            p.shim_pid,
            1,
            t,
            "/usr/bin/containerd-shim-runc-v2",
        ));
        v.push(exec(p, p.app_pid, p.shim_pid, t, APP_EXE));
    }
    v
}

/// The benign mix (see the module docs), `n` records starting at `t0`,
/// one every `step_ns`.
fn mix(pods: &[Pod], n: usize, t0: u64, step_ns: u64, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(n);
    // Probes of the shims (fork -> exec /bin/sh -> exit), recycled pids.
    let child_base = PID_BASE + 2 * pods.len() as u32 + 16;
    let mut next_child = 0u32;
    let mut forked: std::collections::VecDeque<(usize, u32)> = Default::default();
    let mut execd: std::collections::VecDeque<(usize, u32)> = Default::default();
    for k in 0..n {
        let t = t0 + k as u64 * step_ns;
        let slot = k % 100;
        let pi = rng.below(pods.len());
        let p = &pods[pi];
        let rec = match slot {
            0..=49 => {
                // A non-holder (sidecar) talks to some service.
                let a = [10, 0, (pi % 250) as u8, (rng.below(250) + 1) as u8];
                connect(p, p.app_pid + 1_000_000, t, a, 8080, false)
            }
            50..=59 => {
                if rng.below(2) == 0 {
                    connect(p, p.app_pid, t, [10, 96, 0, 1], 443, true)
                } else {
                    connect(p, p.app_pid, t, db_addr(p), 5432, true)
                }
            }
            60..=69 => access(p, p.app_pid, t),
            _ => match slot % 3 {
                0 => {
                    let child = child_base + (next_child % 50_000);
                    next_child += 1;
                    forked.push_back((pi, child));
                    fork(p, child, p.shim_pid, t, "containerd-shim")
                }
                1 => match forked.pop_front() {
                    Some((ci, child)) => {
                        execd.push_back((ci, child));
                        exec(&pods[ci], child, pods[ci].shim_pid, t, "/bin/sh")
                    }
                    None => exec(p, p.shim_pid, 1, t, "/usr/bin/containerd-shim-runc-v2"),
                },
                _ => match execd.pop_front() {
                    Some((ci, child)) => exit(&pods[ci], child, t),
                    None => exit(p, child_base + 60_000, t),
                },
            },
        };
        out.push(rec);
    }
    out
}

// ---- the daemon's per-record path ---------------------------------------------------

/// The per-record state of `daemon::Pipeline`, minus the kernel maps.
struct Daemon {
    metrics: std::sync::Arc<Metrics>,
    events_by_kind: Vec<Option<prometheus::IntCounter>>,
    correlator: Correlator,
    learner: Learner,
    aggregator: Aggregator,
    generation: u64,
    node: Node,
}

impl Daemon {
    /// A daemon that has seen the seed records and a learning pass (window
    /// over by the time the timed events arrive).
    fn new(pods: &[Pod], declared: &dyn Judge, t_learn: u64, window_ns: u64) -> Daemon {
        let mut d = Daemon {
            metrics: Metrics::new().expect("metrics"),
            events_by_kind: vec![None; EVENT_KINDS as usize],
            correlator: Correlator::new(vec!["/usr/bin/kubelet".into()], false),
            learner: Learner::new(window_ns),
            aggregator: Aggregator::new(AGGREGATE_WINDOW_NS),
            generation: new_generation(),
            node: node(pods),
        };
        let mut warm = seed_records(pods, t_learn);
        // Learning pass: every pod reads its token and reaches both destinations.
        for p in pods {
            warm.push(access(p, p.app_pid, t_learn));
            warm.push(connect(p, p.app_pid, t_learn, [10, 96, 0, 1], 443, true));
            warm.push(connect(p, p.app_pid, t_learn, db_addr(p), 5432, true));
        }
        for r in &warm {
            d.handle(r, declared, t_learn);
        }
        d
    }

    /// `daemon::Pipeline::handle_record` for one record; returns the number
    /// of findings correlation produced (before aggregation folds repeats).
    fn handle(&mut self, bytes: &[u8], declared: &dyn Judge, now_ns: u64) -> usize {
        let Ok(event) = decode(bytes) else {
            self.metrics.decode_errors.inc();
            return 0;
        };
        self.correlate(&event, declared, now_ns)
    }

    fn correlate(&mut self, event: &Event, declared: &dyn Judge, now_ns: u64) -> usize {
        let kind = event.kind();
        if let Some(slot) = self.events_by_kind.get_mut(kind as usize) {
            let events = &self.metrics.events;
            slot.get_or_insert_with(|| events.with_label_values(&[kind.name()]))
                .inc();
        }
        let t = event.common().time_ns;
        if now_ns >= t {
            self.metrics
                .processing_latency
                .observe((now_ns - t) as f64 / 1e9);
        }
        let mut resolver = NamedResolver {
            inner: Resolver {
                credentials: &self.node.credentials,
                attribution: &mut self.node.attribution,
                wall_offset_ns: WALL_OFFSET_NS,
            },
            cri: &self.node.cri,
        };
        if let Event::CredentialAccess(a) = event {
            let w = self
                .correlator
                .workload(a.common.cgroup_id, t, &mut resolver);
            let ns = w.workload.namespace.as_deref().unwrap_or("");
            self.metrics.credential_reads.with_label_values(&[ns]).inc();
        }
        let declared = Versioned {
            judge: declared,
            generation: self.generation,
        };
        let findings =
            self.correlator
                .on_event(event, &mut resolver, &declared, Some(&mut self.learner));
        let n = findings.len();
        for f in findings {
            if let Some(f) = self.aggregator.offer(f, t) {
                self.emit(&f);
            }
        }
        n
    }

    /// `Pipeline::emit` without the sinks (their own threads and queues).
    fn emit(&self, f: &Finding) {
        let ns = f.workload.namespace.as_deref().unwrap_or("");
        self.metrics
            .findings
            .with_label_values(&[f.kind.as_str(), f.action.as_str(), ns])
            .inc_by(f.count.max(1));
        black_box(f);
    }
}

// ---- running ----------------------------------------------------------------------

/// CPU time of this thread: on a shared machine the wall clock also counts
/// the time other work had the core.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One timed pass: wall clock and thread CPU time.
struct Timer(Instant, u64);

impl Timer {
    fn start() -> Timer {
        Timer(Instant::now(), thread_cpu_ns())
    }
    /// (events per wall second, events per CPU second)
    fn rates(&self, events: usize) -> (f64, f64) {
        let wall = self.0.elapsed().as_secs_f64();
        let cpu = (thread_cpu_ns() - self.1) as f64 / 1e9;
        (events as f64 / wall, events as f64 / cpu.max(1e-9))
    }
}

struct Stats {
    best_eps: f64,
    median_eps: f64,
    cpu_median_eps: f64,
    findings: usize,
}

fn stats(rates: &mut [(f64, f64)], findings: usize) -> Stats {
    let mut wall: Vec<f64> = rates.iter().map(|r| r.0).collect();
    let mut cpu: Vec<f64> = rates.iter().map(|r| r.1).collect();
    wall.sort_by(|a, b| b.total_cmp(a));
    cpu.sort_by(|a, b| b.total_cmp(a));
    Stats {
        best_eps: wall[0],
        median_eps: wall[wall.len() / 2],
        cpu_median_eps: cpu[cpu.len() / 2],
        findings,
    }
}

fn report(name: &str, events: usize, s: &Stats) {
    println!(
        "RESULT name={name} events={events} best_eps={:.0} median_eps={:.0} ns_per_event={:.1} \
         cpu_median_eps={:.0} cpu_ns_per_event={:.1} findings_per_pass={}",
        s.best_eps,
        s.median_eps,
        1e9 / s.median_eps,
        s.cpu_median_eps,
        1e9 / s.cpu_median_eps,
        s.findings
    );
}

/// The daemon drains at most 65536 records per wake-up and reads the clock
/// once per drain.
const DRAIN: usize = 65536;

fn run_daemon(d: &mut Daemon, records: &[Vec<u8>], declared: &dyn Judge) -> usize {
    let mut f = 0;
    for chunk in records.chunks(DRAIN) {
        let now = boottime_ns();
        for r in chunk {
            f += d.handle(r, declared, now);
        }
    }
    f
}

fn main() {
    let o = parse_opts();
    let now = boottime_ns();
    // Learning happened 10 s ago with a 1 s window; the timed events are
    // stamped from now on.
    let t_learn = now.saturating_sub(10_000_000_000);
    let window_ns = 1_000_000_000;
    let namespaces = (o.workloads / 10).max(1);
    let pods = pods(o.workloads, namespaces);
    let declared = intents(o.intents.min(namespaces * 10));
    // 10 µs between events (100k events/s of kernel time): every cached
    // workload is re-resolved once per second of event time, 10x more often
    // per event than at 1M events/s.
    let records = mix(&pods, o.events, now, 10_000, 0x5eed);
    let bytes: usize = records.iter().map(Vec::len).sum();
    let selected = pods
        .iter()
        .filter(|p| {
            let ns: usize = p.namespace[3..].parse().unwrap();
            ns * 10 + p.app[4..].parse::<usize>().unwrap() < declared.len()
        })
        .count();
    eprintln!(
        "correlate bench: {} pods ({} namespaces), {} credentials, {} declared intents \
         (selecting {} pods; the others learned), {} events ({} MiB of raw records), {} reps",
        pods.len(),
        namespaces,
        pods.len(),
        declared.len(),
        selected,
        o.events,
        bytes >> 20,
        o.reps
    );

    // decode only
    let mut rates = Vec::new();
    for _ in 0..if o.runs("decode") { o.reps } else { 0 } {
        let t = Timer::start();
        let mut n = 0usize;
        for r in &records {
            if black_box(decode(black_box(r))).is_ok() {
                n += 1;
            }
        }
        assert_eq!(n, records.len());
        rates.push(t.rates(records.len()));
    }
    if o.runs("decode") {
        report("decode", records.len(), &stats(&mut rates, 0));
    }

    // Correlator::on_event alone, on decoded events.
    if o.runs("correlate") {
        let decoded: Vec<Event> = records.iter().map(|r| decode(r).unwrap()).collect();
        let mut rates = Vec::new();
        let mut findings = 0;
        for _ in 0..o.reps {
            let mut d = Daemon::new(&pods, &declared, t_learn, window_ns);
            let judge = Versioned {
                judge: &declared,
                generation: d.generation,
            };
            let t = Timer::start();
            let mut f = 0usize;
            for ev in &decoded {
                let mut lk = NamedResolver {
                    inner: Resolver {
                        credentials: &d.node.credentials,
                        attribution: &mut d.node.attribution,
                        wall_offset_ns: WALL_OFFSET_NS,
                    },
                    cri: &d.node.cri,
                };
                f += d
                    .correlator
                    .on_event(ev, &mut lk, &judge, Some(&mut d.learner))
                    .len();
            }
            rates.push(t.rates(records.len()));
            findings = f;
        }
        report("correlate", records.len(), &stats(&mut rates, findings));
    }

    // The daemon's whole per-record path.
    if o.runs("daemon") {
        let mut rates = Vec::new();
        let mut findings = 0;
        for _ in 0..o.reps {
            let mut d = Daemon::new(&pods, &declared, t_learn, window_ns);
            let t = Timer::start();
            let f = run_daemon(&mut d, &records, &declared);
            rates.push(t.rates(records.len()));
            findings = f;
        }
        report("daemon", records.len(), &stats(&mut rates, findings));
    }

    // The finding path: every event an unexpected reader (a shell).
    if o.runs("findings") {
        let n = (o.events / 10).max(1000);
        let mut rng = Rng(7);
        let shell_base = PID_BASE + 3_000_000;
        let mut d = Daemon::new(&pods, &declared, t_learn, window_ns);
        let mut shells = Vec::new();
        for k in 0..1000usize {
            let pi = rng.below(pods.len());
            let p = &pods[pi];
            let sh = shell_base + k as u32;
            d.handle(&exec(p, sh, p.app_pid, now, "/bin/sh"), &declared, now);
            shells.push((pi, sh));
        }
        let recs: Vec<Vec<u8>> = (0..n)
            .map(|k| {
                let (pi, sh) = shells[k % shells.len()];
                access(&pods[pi], sh, now + k as u64 * 10_000)
            })
            .collect();
        let mut rates = Vec::new();
        let mut findings = 0;
        for _ in 0..o.reps {
            let t = Timer::start();
            let f = run_daemon(&mut d, &recs, &declared);
            rates.push(t.rates(recs.len()));
            findings = f;
        }
        report("findings", recs.len(), &stats(&mut rates, findings));
    }
}

fn boottime_ns() -> u64 {
    detector::daemon::boottime_ns()
}
