//! Correlation throughput on one core (`cargo bench -p detector --bench
//! correlate`; run by `cargo xtask bench`, which puts the numbers in
//! docs/BENCHMARKS.md). Not a test: nothing asserts timings.
//!
//! A synthetic node: `--workloads` pods, each with one app process (a child
//! of its container shim), one service-account credential and one cgroup,
//! and `--intents` declared WorkloadIntents (namespace + app label selectors,
//! the app as the only reader, the API server and a database subnet as
//! destinations). Pods not selected by a declared intent are judged by the
//! learner (embedded default), whose window is over (profiles learned from a
//! warm-up pass). The event mix (per 100 events, all benign):
//! - 40 connects of non-holders,
//! - 20 holder connects to allowed destinations (kernel verdict allowed),
//! - 20 credential reads by the expected reader,
//! - 20 process events: fork, exec, exit (each 6-7 of 100; pids recycle).
//!
//! Measured, each repeated `--reps` times (reported: best and median):
//! - `decode`: `detector::events::decode` of raw `#[repr(C)]` records built
//!   from detector-common's structs;
//! - `correlate`: `Correlator::on_event` on decoded events (lookup with an
//!   in-memory map of CRI-enriched workloads, the way the daemon caches them);
//! - `full`: decode + on_event;
//! - `full_attributor`: decode + on_event with the daemon's own
//!   `Attributor` (cgroup path parsed per lookup, no CRI names) and
//!   `CredentialTable` as the lookup;
//! - `findings`: credential reads by an unexpected reader (every event a
//!   finding), to price the finding path.
//!
//! Output: one `RESULT name=<case> events=<n> best_eps=<x> median_eps=<y>
//! ns_per_event=<z>` line per case (parsed by xtask), plus a human summary.

use std::{collections::HashMap, hint::black_box, path::Path, time::Instant};

use detector::{
    attribution::Attributor,
    correlate::{Correlator, Judge, Lookup, WorkloadCtx},
    credentials::CredentialTable,
    events::{decode, Event},
    finding::{Credential, Workload},
    learn::Learner,
    policy::{load_str, DnsTable, IntentSet},
};
use detector_common::{
    AccessRoute, ConnectEvent, CredentialAccessEvent, CredentialKey, EgressHook, EventHeader,
    EventKind, ExecEvent, ExitEvent, ForkEvent, Verdict, VerdictReason, AF_INET, COMM_LEN,
    FILENAME_LEN, IPPROTO_TCP,
};

struct Opts {
    workloads: usize,
    intents: usize,
    events: usize,
    reps: usize,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        workloads: 5000,
        intents: 100,
        events: 1_000_000,
        reps: 5,
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

struct Pod {
    uid: String,
    namespace: String,
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
            Pod {
                namespace: format!("ns-{}", i % namespaces),
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

fn app_of(i: usize) -> String {
    format!("app-{}", i % 10)
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

/// What the daemon knows after CRI enrichment, cached per cgroup.
struct MapLookup {
    workloads: HashMap<u64, WorkloadCtx>,
    credentials: HashMap<u32, Credential>,
    wall_offset_ns: i128,
}

impl Lookup for MapLookup {
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
    fn credential(&self, id: u32) -> Option<Credential> {
        self.credentials.get(&id).cloned()
    }
    fn wall_time(&self, boot_ns: u64) -> String {
        detector::daemon::rfc3339_ms(boot_ns as i128 + self.wall_offset_ns)
    }
}

fn map_lookup(pods: &[Pod]) -> MapLookup {
    MapLookup {
        workloads: pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let name = format!("{}-7d9f8b6c5-{:05x}", app_of(i), i % 0xfffff);
                let ctx = WorkloadCtx {
                    workload: Workload {
                        pod_uid: Some(p.uid.clone()),
                        namespace: Some(p.namespace.clone()),
                        pod: Some(name),
                        container_id: p.cgroup_path.rsplit('/').next().map(str::to_string),
                        cgroup_id: p.cgroup_id,
                        cgroup_path: Some(p.cgroup_path.clone()),
                        ..Default::default()
                    },
                    service_account: Some("default".into()),
                    labels: [
                        ("app".to_string(), app_of(i)),
                        ("pod-template-hash".to_string(), "7d9f8b6c5".to_string()),
                    ]
                    .into_iter()
                    .collect(),
                };
                (p.cgroup_id, ctx)
            })
            .collect(),
        credentials: pods
            .iter()
            .map(|p| (p.credential_id, credential_of(p)))
            .collect(),
        wall_offset_ns: 1_700_000_000_000_000_000,
    }
}

/// The daemon's own resolver, rebuilt from public parts (daemon.rs keeps
/// its `Resolver` private): `Attributor` (cgroup path parsed per lookup; no
/// CRI here, so no names or labels) and `CredentialTable`.
struct DaemonLookup {
    attribution: Attributor,
    credentials: CredentialTable,
    wall_offset_ns: i128,
}

impl Lookup for DaemonLookup {
    fn workload(&mut self, cgroup_id: u64) -> WorkloadCtx {
        match self.attribution.resolve(cgroup_id) {
            Some(info) => WorkloadCtx {
                workload: info.to_workload(),
                service_account: None,
                labels: info.labels.clone(),
            },
            None => WorkloadCtx {
                workload: Workload {
                    cgroup_id,
                    ..Default::default()
                },
                ..Default::default()
            },
        }
    }
    fn credential(&self, id: u32) -> Option<Credential> {
        self.credentials.by_id(id).map(|w| w.meta.clone())
    }
    fn wall_time(&self, boot_ns: u64) -> String {
        detector::daemon::rfc3339_ms(boot_ns as i128 + self.wall_offset_ns)
    }
}

fn daemon_lookup(pods: &[Pod]) -> DaemonLookup {
    let mut attribution = Attributor::new("/nonexistent-cgroup-root-for-bench");
    let mut credentials = CredentialTable::default();
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
    }
    DaemonLookup {
        attribution,
        credentials,
        wall_offset_ns: 1_700_000_000_000_000_000,
    }
}

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

fn fork(p: &Pod, child: u32, parent: u32, t: u64) -> Vec<u8> {
    // SAFETY: as above.
    let mut e: ForkEvent = unsafe { std::mem::zeroed() };
    e.header = header(EventKind::Fork, child, t, p.cgroup_id);
    e.parent_tgid = parent;
    e.comm = comm("server");
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
    // Children of app processes (fork -> exec -> exit), recycled pids.
    let child_base = PID_BASE + 2 * pods.len() as u32 + 16;
    let mut next_child = 0u32;
    let mut live: Vec<(usize, u32)> = Vec::new();
    for k in 0..n {
        let t = t0 + k as u64 * step_ns;
        let slot = k % 100;
        let pi = rng.below(pods.len());
        let p = &pods[pi];
        let rec = match slot {
            0..=39 => {
                // A non-holder (sidecar) talks to some service.
                let a = [10, 0, (pi % 250) as u8, (rng.below(250) + 1) as u8];
                connect(p, p.app_pid + 1_000_000, t, a, 8080, false)
            }
            40..=59 => {
                if rng.below(2) == 0 {
                    connect(p, p.app_pid, t, [10, 96, 0, 1], 443, true)
                } else {
                    connect(p, p.app_pid, t, db_addr(p), 5432, true)
                }
            }
            60..=79 => access(p, p.app_pid, t),
            _ => match slot % 3 {
                0 => {
                    let child = child_base + (next_child % 50_000);
                    next_child += 1;
                    live.push((pi, child));
                    fork(p, child, p.app_pid, t)
                }
                1 => match live.last() {
                    Some(&(ci, child)) => {
                        exec(&pods[ci], child, pods[ci].app_pid, t, "/usr/bin/curl")
                    }
                    None => exec(p, p.app_pid, p.shim_pid, t, APP_EXE),
                },
                _ => match live.pop() {
                    Some((ci, child)) => exit(&pods[ci], child, t),
                    None => exit(p, child_base + 60_000, t),
                },
            },
        };
        out.push(rec);
    }
    out
}

// ---- running ----------------------------------------------------------------------

struct Setup {
    correlator: Correlator,
    learner: Learner,
}

/// A correlator and learner that have seen the seed records and a learning
/// pass (window over by the time the timed events arrive).
fn setup(
    pods: &[Pod],
    lk: &mut dyn Lookup,
    declared: &dyn Judge,
    t_learn: u64,
    window_ns: u64,
) -> Setup {
    let mut correlator = Correlator::new(vec!["/usr/bin/kubelet".into()], false);
    let mut learner = Learner::new(window_ns);
    for r in seed_records(pods, t_learn) {
        let ev = decode(&r).expect("seed decodes");
        correlator.on_event(&ev, lk, declared, Some(&mut learner));
    }
    // Learning pass: every pod reads its token and reaches both destinations.
    for p in pods {
        for r in [
            access(p, p.app_pid, t_learn),
            connect(p, p.app_pid, t_learn, [10, 96, 0, 1], 443, true),
            connect(p, p.app_pid, t_learn, db_addr(p), 5432, true),
        ] {
            let ev = decode(&r).expect("learn decodes");
            correlator.on_event(&ev, lk, declared, Some(&mut learner));
        }
    }
    Setup {
        correlator,
        learner,
    }
}

struct Stats {
    best_eps: f64,
    median_eps: f64,
    findings: usize,
}

fn stats(rates: &mut [f64], findings: usize) -> Stats {
    rates.sort_by(|a, b| b.total_cmp(a));
    Stats {
        best_eps: rates[0],
        median_eps: rates[rates.len() / 2],
        findings,
    }
}

fn report(name: &str, events: usize, s: &Stats) {
    println!(
        "RESULT name={name} events={events} best_eps={:.0} median_eps={:.0} ns_per_event={:.1} findings_per_pass={}",
        s.best_eps,
        s.median_eps,
        1e9 / s.median_eps,
        s.findings
    );
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
    // 10 µs between events: 100k events/s of kernel time.
    let records = mix(&pods, o.events, now, 10_000, 0x5eed);
    let bytes: usize = records.iter().map(Vec::len).sum();
    eprintln!(
        "correlate bench: {} pods ({} namespaces), {} credentials, {} declared intents \
         (selecting {} pods), {} events ({} MiB of raw records), {} reps",
        pods.len(),
        namespaces,
        pods.len(),
        declared.len(),
        pods.iter()
            .enumerate()
            .filter(|(i, p)| {
                let ns: usize = p.namespace[3..].parse().unwrap();
                ns * 10 + app_of(*i)[4..].parse::<usize>().unwrap() < declared.len()
            })
            .count(),
        o.events,
        bytes >> 20,
        o.reps
    );

    // decode only
    let mut rates = Vec::new();
    for _ in 0..o.reps {
        let t = Instant::now();
        let mut n = 0usize;
        for r in &records {
            if black_box(decode(black_box(r))).is_ok() {
                n += 1;
            }
        }
        assert_eq!(n, records.len());
        rates.push(records.len() as f64 / t.elapsed().as_secs_f64());
    }
    report("decode", records.len(), &stats(&mut rates, 0));

    let decoded: Vec<Event> = records.iter().map(|r| decode(r).unwrap()).collect();

    // correlate only / full, with the map lookup
    for (name, with_decode) in [("correlate", false), ("full", true)] {
        let mut rates = Vec::new();
        let mut findings = 0;
        for _ in 0..o.reps {
            let mut lk = map_lookup(&pods);
            let mut s = setup(&pods, &mut lk, &declared, t_learn, window_ns);
            let t = Instant::now();
            let mut f = 0usize;
            if with_decode {
                for r in &records {
                    let ev = decode(r).unwrap();
                    f += s
                        .correlator
                        .on_event(&ev, &mut lk, &declared, Some(&mut s.learner))
                        .len();
                }
            } else {
                for ev in &decoded {
                    f += s
                        .correlator
                        .on_event(ev, &mut lk, &declared, Some(&mut s.learner))
                        .len();
                }
            }
            rates.push(records.len() as f64 / t.elapsed().as_secs_f64());
            findings = f;
        }
        report(name, records.len(), &stats(&mut rates, findings));
    }

    // full, with the daemon's Attributor + CredentialTable, no declared intents
    {
        let none = IntentSet::default();
        let mut rates = Vec::new();
        let mut findings = 0;
        for _ in 0..o.reps {
            let mut lk = daemon_lookup(&pods);
            let mut s = setup(&pods, &mut lk, &none, t_learn, window_ns);
            let t = Instant::now();
            let mut f = 0usize;
            for r in &records {
                let ev = decode(r).unwrap();
                f += s
                    .correlator
                    .on_event(&ev, &mut lk, &none, Some(&mut s.learner))
                    .len();
            }
            rates.push(records.len() as f64 / t.elapsed().as_secs_f64());
            findings = f;
        }
        report(
            "full_attributor",
            records.len(),
            &stats(&mut rates, findings),
        );
    }

    // the finding path: every event an unexpected reader (a shell)
    {
        let n = (o.events / 10).max(1000);
        let mut rng = Rng(7);
        let shell_base = PID_BASE + 3_000_000;
        let mut recs = Vec::with_capacity(n);
        let mut lk = map_lookup(&pods);
        let mut s = setup(&pods, &mut lk, &declared, t_learn, window_ns);
        for k in 0..n {
            let p = &pods[rng.below(pods.len())];
            let sh = shell_base + (k % 1000) as u32;
            if k < 1000 {
                let ev = decode(&exec(p, sh, p.app_pid, now, "/bin/sh")).unwrap();
                s.correlator
                    .on_event(&ev, &mut lk, &declared, Some(&mut s.learner));
            }
            recs.push(access(p, sh, now + k as u64 * 10_000));
        }
        let mut rates = Vec::new();
        let mut findings = 0;
        for _ in 0..o.reps {
            let t = Instant::now();
            let mut f = 0usize;
            for r in &recs {
                let ev = decode(r).unwrap();
                f +=
                    black_box(
                        s.correlator
                            .on_event(&ev, &mut lk, &declared, Some(&mut s.learner)),
                    )
                    .len();
            }
            rates.push(recs.len() as f64 / t.elapsed().as_secs_f64());
            findings = f;
        }
        report("findings", recs.len(), &stats(&mut rates, findings));
    }
}

fn boottime_ns() -> u64 {
    detector::daemon::boottime_ns()
}
