//! `cargo xtask bench`: what the kernel sensors cost ordinary syscalls.
//!
//! Configurations, measured side by side in one run:
//! - `none`: nothing of ours attached;
//! - `detector`: `target/release/detector run --open-sensor tracepoint`
//!   with a kubelet directory holding one pod's token volume, alerts to
//!   /dev/null, metrics on loopback; we measure once `/readyz` answers 200
//!   (every probe attached);
//! - `detector (fanotify)`: the same with `--open-sensor fanotify` (no
//!   syscall tracepoint; credential opens wait for the daemon's answer);
//! - `bpftrace`: a classic one-liner on `sys_enter_openat` filtering the
//!   service-account token path.
//!
//! Each workload is a bounded loop in a fresh `xtask bench-worker` process
//! (so e.g. becoming a credential holder never leaks into the next
//! workload). Rounds interleave the configurations (rotated order) to cancel
//! drift on a shared machine; we report medians and ratios vs `none`.
//! Network traffic is loopback only. Nothing here is a test: no assertion
//! on timings anywhere.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs::File,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::unix::io::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    daemon::{http_get, start_daemon, tail, Daemon},
    detector_bin,
    guards::{Cgroup, Proc, TempDir},
    is_root, repo_root,
    worker::Workload,
};

const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

fn bpftrace_program() -> String {
    format!(
        r#"tracepoint:syscalls:sys_enter_openat /str(args->filename) == "{TOKEN_PATH}"/ {{ @[comm] = count(); }}"#
    )
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Rounds; each round measures every workload once under every
    /// configuration, in rotated order.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Multiply every iteration count (e.g. 0.1 for a quick look).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Don't run setup and `cargo build --release -p detector` first.
    #[arg(long)]
    no_build: bool,
    /// Where to write the report [default: docs/BENCHMARKS.md]; an SVG
    /// chart goes next to it with the extension .svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only print the results; don't write the report.
    #[arg(long)]
    no_write: bool,
    /// The detector binary [default: target/release/detector].
    #[arg(long)]
    detector: Option<PathBuf>,
    /// Don't pin the workload processes to one CPU.
    #[arg(long)]
    no_pin: bool,
    /// Skip the per-program eBPF run-time pass (bpf_stats).
    #[arg(long)]
    no_bpf_stats: bool,
    /// Seconds to wait for the detector's /readyz.
    #[arg(long, default_value_t = 180)]
    ready_timeout: u64,
    /// Correlation throughput, daemon latencies and memory (bench_correlate.rs).
    #[command(flatten)]
    correlate: crate::bench_correlate::Args,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    None,
    Detector,
    DetectorFanotify,
    DetectorLease,
    DetectorHybrid,
    Bpftrace,
}

impl Config {
    const ALL: [Config; 6] = [
        Config::None,
        Config::Detector,
        Config::DetectorFanotify,
        Config::DetectorLease,
        Config::DetectorHybrid,
        Config::Bpftrace,
    ];
    const DETECTORS: [Config; 4] = [
        Config::Detector,
        Config::DetectorFanotify,
        Config::DetectorLease,
        Config::DetectorHybrid,
    ];
    fn name(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Detector => "detector",
            Config::DetectorFanotify => "fanotify",
            Config::DetectorLease => "lease",
            Config::DetectorHybrid => "hybrid",
            Config::Bpftrace => "bpftrace",
        }
    }

    /// `--open-sensor` of a detector configuration.
    fn open_sensor(self) -> Option<&'static str> {
        match self {
            Config::Detector => Some("tracepoint"),
            Config::DetectorFanotify => Some("fanotify"),
            Config::DetectorLease => Some("lease"),
            Config::DetectorHybrid => Some("hybrid"),
            _ => None,
        }
    }
}

struct Case {
    label: &'static str,
    short: &'static str,
    workload: Workload,
    iters: u64,
    /// Open the credential file (not the ordinary one).
    credential: bool,
    /// Open the credential file once before the loop.
    hold: bool,
}

const CASES: &[Case] = &[
    Case {
        label: "(a) open+close, ordinary file (tmpfs)",
        short: "open ordinary",
        workload: Workload::Open,
        iters: 200_000,
        credential: false,
        hold: false,
    },
    Case {
        label: "(b) open+close, a pod's token (projected volume, via the pod's bind mount)",
        short: "open credential",
        workload: Workload::Open,
        iters: 200_000,
        credential: true,
        hold: false,
    },
    Case {
        label: "(c) TCP socket+connect+close to 127.0.0.1",
        short: "connect",
        workload: Workload::Connect,
        iters: 20_000,
        credential: false,
        hold: false,
    },
    Case {
        label: "(c') same, by a credential holder (opened the credential file once first)",
        short: "connect (holder)",
        workload: Workload::Connect,
        iters: 20_000,
        credential: false,
        hold: true,
    },
    Case {
        label: "(e) UDP socket+connect+close to 127.0.0.1 (same connect4 program; no handshake, no listener)",
        short: "udp connect",
        workload: Workload::Udp,
        iters: 100_000,
        credential: false,
        hold: false,
    },
    Case {
        label: "(e') same, by a credential holder",
        short: "udp (holder)",
        workload: Workload::Udp,
        iters: 100_000,
        credential: false,
        hold: true,
    },
    Case {
        label: "(d) fork+execve(/bin/true)+waitpid",
        short: "fork+exec",
        workload: Workload::Exec,
        iters: 2_000,
        credential: false,
        hold: false,
    },
];

/// A service-account token laid out as on a node: kubelet's projected
/// volume, a tmpfs of its own under `<kubelet>/pods/<uid>/volumes/…`, with
/// kubelet's `..<timestamp>/token` + `..data` layout, and the pod's view of
/// it, a bind mount (as the runtime makes one for each container). The
/// workloads open the token through the pod's view, as a pod does: the
/// sensors' volume marks sit on kubelet's mount (hybrid) or on the whole
/// filesystem (fanotify).
struct PodVolume {
    /// The token's file through the pod's view (its `..<timestamp>` path,
    /// so the symlinks are not part of what is measured).
    token: PathBuf,
    mounts: Vec<PathBuf>,
}

impl PodVolume {
    fn new(kubelet: &Path, view: &Path) -> Result<PodVolume> {
        let vol = kubelet.join(
            "pods/0b5e7c2a-bench-0000-0000-000000000001/volumes/kubernetes.io~projected/kube-api-access-bench",
        );
        std::fs::create_dir_all(&vol)?;
        std::fs::create_dir_all(view)?;
        let mut pv = PodVolume {
            token: PathBuf::new(),
            mounts: Vec::new(),
        };
        mount(Some(Path::new("tmpfs")), &vol, Some("tmpfs"), 0)?;
        pv.mounts.push(vol.clone());
        let ts = "..2026_01_01_00_00_00.000000001";
        std::fs::create_dir(vol.join(ts))?;
        std::fs::write(
            vol.join(ts).join("token"),
            "bench-placeholder-not-a-real-token\n",
        )?;
        std::os::unix::fs::symlink(ts, vol.join("..data"))?;
        std::os::unix::fs::symlink("..data/token", vol.join("token"))?;
        mount(Some(&vol), view, None, libc::MS_BIND)?;
        pv.mounts.push(view.to_path_buf());
        pv.token = view.join(ts).join("token");
        Ok(pv)
    }
}

impl Drop for PodVolume {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: a valid C string; detaching a mount we made.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// mount(2): `source` on `target` (None: no source, no type).
fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes());
    let src = source.map(c).transpose()?;
    let tgt = c(target)?;
    let ty = fstype.map(std::ffi::CString::new).transpose()?;
    // SAFETY: valid C strings or NULL; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            tgt.as_ptr(),
            ty.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting on {}", target.display()));
    }
    Ok(())
}

struct Env {
    dir: PathBuf,
    plain: PathBuf,
    cred: PathBuf,
    kubelet: PathBuf,
    listen: SocketAddrV4,
    worker: PathBuf,
    detector: PathBuf,
    /// CPU the workload processes are pinned to.
    cpu: Option<usize>,
    /// The cgroup every worker moves into first (`--cgroup`): apart from
    /// this process's, so that no worker's credential read makes the bench
    /// a holder whose later workers inherit it.
    workers: Cgroup,
}

impl Env {
    /// `bench-worker --workload W --iters N --cgroup .. [--cpu C]`.
    fn worker(&self, workload: Workload, iters: u64) -> Command {
        let mut cmd = Command::new(&self.worker);
        cmd.args(["bench-worker", "--workload", workload.arg()])
            .args(["--iters", &iters.to_string()])
            .arg("--cgroup")
            .arg(&self.workers.0);
        if let Some(cpu) = self.cpu {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        cmd
    }
}

/// A loopback TCP listener in this process that accepts and closes (its
/// thread lives until the process exits). With `workload_cpu`,
/// its thread stays off that CPU: woken by every connect, it would preempt
/// the workload at random points (inside the connect hook too, which then
/// counts the listener's time as the program's).
pub(crate) fn start_listener(workload_cpu: Option<usize>) -> Result<SocketAddrV4> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    // A deep accept queue, so a burst never drops a SYN (a 1 s retransmit
    // would dwarf what we measure). Re-calling listen() updates the backlog.
    // SAFETY: valid listening socket fd.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    let addr = match l.local_addr()? {
        std::net::SocketAddr::V4(a) => a,
        a => bail!("unexpected listener address {a}"),
    };
    std::thread::Builder::new()
        .name("bench-accept".into())
        .spawn(move || {
            if let Some(w) = workload_cpu {
                let _ = crate::worker::pin_except(w);
            }
            loop {
                if let Ok((s, _)) = l.accept() {
                    drop(s);
                }
            }
        })?;
    Ok(addr)
}

fn run_case(env: &Env, case: &Case, scale: f64) -> Result<f64> {
    let iters = ((case.iters as f64 * scale).round() as u64).max(1);
    let mut cmd = env.worker(case.workload, iters);
    match case.workload {
        Workload::Open => {
            cmd.arg("--path").arg(if case.credential {
                &env.cred
            } else {
                &env.plain
            });
        }
        Workload::Connect | Workload::Udp | Workload::ConnectPair | Workload::UdpPair => {
            cmd.args(["--addr", &env.listen.to_string()]);
        }
        Workload::Exec | Workload::OpenPair => {}
    }
    if case.hold {
        cmd.arg("--hold").arg(&env.cred);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running bench-worker")?;
    if !out.status.success() {
        bail!("bench-worker {} failed: {}", case.short, out.status);
    }
    worker_value(&out.stdout, "ns_per_op")
}

/// The number a bench-worker printed as `key=<f64>`.
fn worker_value(stdout: &[u8], key: &str) -> Result<f64> {
    let text = String::from_utf8_lossy(stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("bench-worker printed no {key}: {text:?}"))
}

/// (min, max) of `v`.
fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// A running configuration, stopped by `finish`.
enum Session {
    None,
    Detector {
        daemon: Daemon,
        cpu_at_ready: Option<f64>,
    },
    Bpftrace {
        guard: Proc,
        out: PathBuf,
        sentinel: String,
    },
}

struct SessionResult {
    note: String,
    /// Detector: CPU seconds (user+sys) it used between ready and stop.
    cpu_s: Option<f64>,
    /// Metric lines scraped from the detector right before stopping it.
    metrics: Vec<String>,
    /// bpftrace: the probe fired for a sentinel open made before measuring.
    verified: bool,
}

fn start(cfg: Config, env: &Env, round: usize, ready_timeout: Duration) -> Result<Session> {
    match cfg {
        Config::None => Ok(Session::None),
        Config::Detector
        | Config::DetectorFanotify
        | Config::DetectorLease
        | Config::DetectorHybrid => {
            let log = env.dir.join(format!("{}-{round}.log", cfg.name()));
            let args: Vec<String> = [
                "--open-sensor",
                cfg.open_sensor().unwrap_or("auto"),
                "--kubelet-dir",
                &env.kubelet.to_string_lossy(),
                "--alerts",
                "/dev/null",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let daemon = start_daemon(&env.detector, &args, &log, ready_timeout)?;
            let cpu_at_ready = cpu_seconds(daemon.proc.pid());
            Ok(Session::Detector {
                daemon,
                cpu_at_ready,
            })
        }
        Config::Bpftrace => {
            let out = env.dir.join(format!("bpftrace-{round}.out"));
            let f = File::create(&out)?;
            let mut cmd = Command::new("bpftrace");
            cmd.args(["-e", &bpftrace_program()])
                .stdin(Stdio::null())
                .stdout(f.try_clone()?)
                .stderr(f);
            let t0 = Instant::now();
            let mut guard = Proc::spawn(cmd, "bpftrace")?;
            loop {
                if let Some(st) = guard.exited() {
                    bail!("bpftrace exited ({st}):\n{}", tail(&out, 30));
                }
                if std::fs::read_to_string(&out)
                    .unwrap_or_default()
                    .contains("Attaching")
                {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(120) {
                    bail!("bpftrace did not attach within 120 s:\n{}", tail(&out, 30));
                }
                sleep(Duration::from_millis(50));
            }
            sleep(Duration::from_millis(500));
            // A sentinel open of the token path from a thread with a unique
            // comm: if bpftrace's map counts it, the probe was attached
            // before we measured.
            let sentinel = format!("btpre{round}");
            sentinel_open(&sentinel);
            Ok(Session::Bpftrace {
                guard,
                out,
                sentinel,
            })
        }
    }
}

/// Credential open against an ordinary open of a file in the same
/// directory, interleaved in batches inside one worker (`open-pair`), one
/// session per configuration per round (rotated). The per-pair ratio
/// cancels the drift between sessions that blurs the main table; `none`'s
/// ratio is the control (the two files are not exactly alike), so the
/// credential open's own cost under a configuration is its ratio / none's.
fn pair_pass(env: &Env, rounds: usize, scale: f64, ready_timeout: Duration) -> Result<String> {
    let configs = [
        Config::None,
        Config::Detector,
        Config::DetectorFanotify,
        Config::DetectorLease,
        Config::DetectorHybrid,
    ];
    let iters = ((100_000.0 * scale).round() as u64).max(1000);
    let mut ratios = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..configs.len()).collect();
        order.rotate_left(round % configs.len());
        for i in order {
            let session = start(configs[i], env, 2000 + round, ready_timeout)?;
            let out = env
                .worker(Workload::OpenPair, iters)
                .arg("--path")
                .arg(&env.cred)
                .arg("--control")
                .arg(&env.plain)
                .stderr(Stdio::inherit())
                .output();
            finish(session);
            let out = out.context("running bench-worker open-pair")?;
            if !out.status.success() {
                bail!("bench-worker open-pair failed: {}", out.status);
            }
            let r = worker_value(&out.stdout, "pair_ratio")?;
            println!(
                "bench: pair round {}/{rounds} {:<8} credential/ordinary {r:.3}",
                round + 1,
                configs[i].name()
            );
            ratios[i].push(r);
        }
    }
    let control = median(&ratios[0]);
    let mut t = String::from(
        "| Configuration | credential open / ordinary open (median over rounds; min–max) | credential open's cost: ÷ `none`'s |\n|---|---:|---:|\n",
    );
    for (i, cfg) in configs.iter().enumerate() {
        let v = &ratios[i];
        let (lo, hi) = range(v);
        let m = median(v);
        let _ = writeln!(
            t,
            "| {} | {m:.3} ({lo:.3}–{hi:.3}) | {} |",
            cfg.name(),
            if i == 0 {
                "(control)".to_string()
            } else {
                format!("**{:.2}×**", m / control)
            }
        );
    }
    Ok(t)
}

/// The daemon's `connect4` attached and detached between batches of
/// connects inside one worker (`connect-pair`, `udp-pair`; see
/// `connect_ab`): the connect's cost free of the drift between sessions,
/// which on this VM exceeds the effect in the main table. One daemon
/// (fanotify open sensor) per round; the workloads' order rotates. The A/A
/// rows toggle nothing: the method's own bias and resolution.
fn connect_pair_pass(
    env: &Env,
    rounds: usize,
    scale: f64,
    ready_timeout: Duration,
) -> Result<String> {
    struct Row {
        label: &'static str,
        workload: Workload,
        iters: u64,
        hold: bool,
        control: bool,
    }
    const ROWS: [Row; 6] = [
        Row {
            label: "TCP connect: A/A control (nothing attached on either side)",
            workload: Workload::ConnectPair,
            iters: 20_000,
            hold: false,
            control: true,
        },
        Row {
            label: "TCP connect",
            workload: Workload::ConnectPair,
            iters: 20_000,
            hold: false,
            control: false,
        },
        Row {
            label: "TCP connect by a credential holder (every connect reported)",
            workload: Workload::ConnectPair,
            iters: 20_000,
            hold: true,
            control: false,
        },
        Row {
            label: "UDP connect: A/A control",
            workload: Workload::UdpPair,
            iters: 100_000,
            hold: false,
            control: true,
        },
        Row {
            label: "UDP connect",
            workload: Workload::UdpPair,
            iters: 100_000,
            hold: false,
            control: false,
        },
        Row {
            label: "UDP connect by a credential holder",
            workload: Workload::UdpPair,
            iters: 100_000,
            hold: true,
            control: false,
        },
    ];
    // Per row: (pair ratio, ns per op on, ns per op off) per round.
    let mut got: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); ROWS.len()];
    for round in 0..rounds {
        let session = start(Config::DetectorFanotify, env, 3000 + round, ready_timeout)?;
        let Session::Detector { daemon, .. } = &session else {
            unreachable!("a detector configuration")
        };
        let pid = daemon.proc.pid();
        let mut order: Vec<usize> = (0..ROWS.len()).collect();
        order.rotate_left(round % ROWS.len());
        for i in order {
            let row = &ROWS[i];
            let iters = ((row.iters as f64 * scale).round() as u64).max(2000);
            let mut cmd = env.worker(row.workload, iters);
            cmd.args(["--addr", &env.listen.to_string()])
                .args(["--daemon-pid", &pid.to_string()]);
            if row.hold {
                cmd.arg("--hold").arg(&env.cred);
            }
            if row.control {
                cmd.arg("--control-only");
            }
            // On an error the session's guard kills the daemon.
            let out = cmd
                .stderr(Stdio::inherit())
                .output()
                .context("running bench-worker")?;
            if !out.status.success() {
                bail!("bench-worker {} failed: {}", row.label, out.status);
            }
            let num = |key| worker_value(&out.stdout, key);
            let r = (
                num("pair_ratio")?,
                num("ns_per_op")?,
                num("control_ns_per_op")?,
            );
            println!(
                "bench: connect A/B round {}/{rounds} {:<60} on/off {:.4}",
                round + 1,
                row.label,
                r.0
            );
            got[i].push(r);
        }
        finish(session);
    }
    let mut t = String::from(
        "| Workload | with `connect4` / without (median over rounds; min–max) | added per connect (median of on − off) |\n|---|---:|---:|\n",
    );
    for (row, v) in ROWS.iter().zip(&got) {
        let ratios: Vec<f64> = v.iter().map(|r| r.0).collect();
        let added: Vec<f64> = v.iter().map(|r| r.1 - r.2).collect();
        let (lo, hi) = range(&ratios);
        let m = median(&ratios);
        let _ = writeln!(
            t,
            "| {} | {} ({lo:.3}–{hi:.3}) | {} |",
            row.label,
            if row.control {
                format!("{m:.3}")
            } else {
                format!("**{m:.3}×**")
            },
            if row.control {
                "(control)".to_string()
            } else {
                format!("{:.0} ns", median(&added))
            }
        );
    }
    Ok(t)
}

/// One more session of each detector configuration with the kernel's
/// per-program statistics on: what each program costs per run, and how
/// often it runs per operation of each workload.
fn bpf_stats_pass(env: &Env, scale: f64, ready_timeout: Duration) -> Result<String> {
    use crate::bpf_stats;
    let mut t = String::from(
        "| Configuration | Workload | BPF ns per op | per program: runs per op × mean ns per run |\n|---|---|---:|---|\n",
    );
    for cfg in Config::DETECTORS {
        let session = start(cfg, env, 1000 + cfg as usize, ready_timeout)?;
        let Session::Detector { daemon, .. } = &session else {
            unreachable!("a detector configuration")
        };
        let pid = daemon.proc.pid();
        let on = bpf_stats::enable().context("BPF_ENABLE_STATS")?;
        for case in CASES {
            let iters = ((case.iters as f64 * scale).round() as u64).max(1) as f64;
            let before = bpf_stats::snapshot(pid);
            let r = run_case(env, case, scale);
            let after = bpf_stats::snapshot(pid);
            if let Err(e) = r {
                finish(session);
                return Err(e);
            }
            let d = bpf_stats::delta(&before, &after);
            let total: u64 = d.iter().map(|(_, _, ns)| ns).sum();
            let per = d
                .iter()
                .map(|(n, runs, ns)| {
                    format!(
                        "`{n}` {:.2} × {:.0}",
                        *runs as f64 / iters,
                        *ns as f64 / *runs as f64
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                t,
                "| {} | {} | {:.0} | {} |",
                cfg.name(),
                case.short,
                total as f64 / iters,
                per
            );
        }
        drop(on);
        finish(session);
    }
    Ok(t)
}

fn sentinel_open(comm: &str) {
    let _ = std::thread::Builder::new()
        .name(comm.to_string())
        .spawn(|| {
            let _ = File::open(TOKEN_PATH);
        })
        .map(|h| h.join());
}

fn finish(session: Session) -> SessionResult {
    match session {
        Session::None => SessionResult {
            note: String::new(),
            cpu_s: None,
            metrics: vec![],
            verified: true,
        },
        Session::Detector {
            daemon,
            cpu_at_ready,
        } => {
            let metrics = match http_get(daemon.port, "/metrics") {
                Ok((200, body)) => body
                    .lines()
                    .filter(|l| {
                        !l.starts_with('#')
                            && [
                                "detector_events_total",
                                "detector_events_lost_total",
                                "detector_findings_total",
                                "detector_credential_reads",
                                "detector_probes_attached",
                                "detector_decode_errors",
                                "detector_fanotify_",
                            ]
                            .iter()
                            .any(|p| l.starts_with(p))
                    })
                    .map(str::to_string)
                    .collect(),
                Ok((code, _)) => vec![format!("/metrics answered {code}")],
                Err(e) => vec![format!("/metrics failed: {e:#}")],
            };
            let pid = daemon.proc.pid();
            let ready_after = daemon.ready_after;
            let cpu_s = cpu_seconds(pid).zip(cpu_at_ready).map(|(b, a)| b - a);
            // Logs its tail itself unless it exits cleanly.
            let how = daemon.stop();
            let note =
                format!(
                "detector pid {pid}: ready after {:.1}s; CPU while measured {}; SIGTERM -> {how}",
                ready_after.as_secs_f64(),
                cpu_s.map(|c| format!("{c:.2}s")).unwrap_or_else(|| "?".into())
            );
            SessionResult {
                note,
                cpu_s,
                metrics,
                verified: true,
            }
        }
        Session::Bpftrace {
            mut guard,
            out,
            sentinel,
        } => {
            let how = guard.stop(libc::SIGINT, Duration::from_secs(30));
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            let verified = text.contains(&format!("@[{sentinel}]"));
            SessionResult {
                cpu_s: None,
                note: format!("bpftrace: SIGINT -> {how}"),
                metrics: vec![],
                verified,
            }
        }
    }
}

/// Other processes that may have BPF programs attached (other engineers'
/// detectors or tracers on this shared machine).
fn other_tracers(ours: &[u32]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if ours.contains(&pid) {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if matches!(
            comm,
            "detector" | "bpftrace" | "bpftool" | "tetragon" | "falco"
        ) {
            found.insert(format!("{comm}[{pid}]"));
        }
    }
    found
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, utime 14 and stime 15 (1-based).
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (hz > 0.0).then(|| ticks / hz)
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// Quantile `q` (0..=1, linear interpolation) of the finite values.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// Median of the finite values (NaN marks a missing sample).
fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 100_000.0 {
        format!("{:.0} µs", ns / 1000.0)
    } else if ns >= 10_000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

#[allow(clippy::needless_range_loop)]
pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    if !is_root() {
        bail!("bench attaches eBPF programs (detector, bpftrace) and must run as root");
    }
    if args.rounds == 0 || args.scale.is_nan() || args.scale <= 0.0 {
        bail!("--rounds must be >= 1 and --scale > 0");
    }
    if !args.no_build {
        crate::setup::setup()?;
        println!("xtask: cargo build --release -p detector");
        crate::run_checked(Command::new("cargo").args(["build", "--release", "-p", "detector"]))?;
    }
    let bin = args.detector.clone().unwrap_or_else(detector_bin);
    if !bin.exists() {
        bail!("{} does not exist; run `cargo xtask build`", bin.display());
    }
    if args.correlate.correlate_only {
        let out = args.out.as_deref();
        return crate::bench_correlate::standalone(
            &args.correlate,
            &bin,
            out,
            args.no_write,
            args.scale,
        );
    }

    // Files on tmpfs, so (a) and (b) differ only in being a credential.
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("detector-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = TempDir(dir.clone());
    let plain = dir.join("ordinary-file");
    std::fs::write(&plain, "bench: an ordinary file\n")?;
    let kubelet = dir.join("kubelet");
    let pod = PodVolume::new(&kubelet, &dir.join("pod-view"))?;
    let cred = pod.token.clone();
    // The last CPU: the workload always runs on the same one, the daemon
    // (and everything else) wherever the scheduler puts it, and the
    // loopback listener off it.
    let workload_cpu = (!args.no_pin)
        .then(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .filter(|n| *n >= 2)
        .map(|n| n - 1);
    let env = Env {
        dir: dir.clone(),
        plain,
        cred,
        kubelet,
        listen: start_listener(workload_cpu)?,
        worker: std::env::current_exe().context("current_exe")?,
        cpu: workload_cpu,
        workers: Cgroup::new("detector-bench-workers")?,
        // A private copy: others may rebuild target/release/detector while
        // the bench runs; every round must start the same binary.
        detector: {
            let copy = dir.join("detector");
            std::fs::copy(&bin, &copy)
                .with_context(|| format!("copying {} to {}", bin.display(), copy.display()))?;
            copy
        },
    };

    let started = cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let ready_timeout = Duration::from_secs(args.ready_timeout);
    let ncases = CASES.len();
    // samples[config][case][round]; NaN = none (discarded round)
    let mut samples = vec![vec![vec![f64::NAN; args.rounds]; ncases]; Config::ALL.len()];
    // detector CPU seconds / wall seconds of the workloads, per session
    let mut det_cpu = Vec::new();
    let mut notes = Vec::new();
    let mut last_metrics = Vec::new();
    let mut others = BTreeSet::new();
    let mut bt_verified = 0usize;
    let mut bt_rounds = 0usize;
    let t_all = Instant::now();

    for round in 0..args.rounds {
        let mut order = Config::ALL.to_vec();
        order.rotate_left(round % Config::ALL.len());
        for cfg in order {
            let session = start(cfg, &env, round, ready_timeout)?;
            let ours: Vec<u32> = match &session {
                Session::Detector { daemon, .. } => vec![daemon.proc.pid()],
                Session::Bpftrace { guard, .. } => vec![guard.pid()],
                Session::None => vec![],
            };
            let seen = other_tracers(&ours);
            if !seen.is_empty() {
                notes.push(format!(
                    "round {round}: {}: other tracers/detectors running: {}",
                    cfg.name(),
                    seen.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            others.extend(seen);
            let mut this = vec![f64::NAN; ncases];
            let t_work = Instant::now();
            for k in 0..ncases {
                let i = (k + round) % ncases;
                this[i] = match run_case(&env, &CASES[i], args.scale) {
                    Ok(v) => v,
                    Err(e) => {
                        finish(session);
                        return Err(e);
                    }
                };
            }
            let wall = t_work.elapsed().as_secs_f64();
            let res = finish(session);
            if let Some(c) = res.cpu_s {
                det_cpu.push((cfg, c, wall));
            }
            if cfg == Config::Bpftrace {
                bt_rounds += 1;
                if res.verified {
                    bt_verified += 1;
                } else {
                    eprintln!("bench: round {round}: bpftrace sentinel not counted; discarding its samples");
                }
            }
            if res.verified {
                for (i, v) in this.iter().enumerate() {
                    samples[cfg as usize][i][round] = *v;
                }
            }
            if cfg.open_sensor().is_some() {
                last_metrics.retain(|(c, _)| *c != cfg);
                last_metrics.push((cfg, res.metrics));
            }
            if !res.note.is_empty() {
                notes.push(format!("round {round}: {}", res.note));
            }
            println!(
                "bench: round {}/{} {:<8} {}",
                round + 1,
                args.rounds,
                cfg.name(),
                this.iter()
                    .zip(CASES)
                    .map(|(v, c)| format!("{}={}", c.short, fmt_ns(*v)))
                    .collect::<Vec<_>>()
                    .join("  ")
            );
        }
    }
    let bpf_table = if args.no_bpf_stats {
        "(skipped: `--no-bpf-stats`)".to_string()
    } else {
        match bpf_stats_pass(&env, args.scale, ready_timeout) {
            Ok(t) => {
                println!("\n{t}");
                t
            }
            Err(e) => format!("(not measured: {e:#})"),
        }
    };
    let pair_table = match pair_pass(&env, args.rounds, args.scale, ready_timeout) {
        Ok(t) => {
            println!("\n{t}");
            t
        }
        Err(e) => format!("(not measured: {e:#})"),
    };
    let connect_table = match connect_pair_pass(&env, args.rounds, args.scale, ready_timeout) {
        Ok(t) => {
            println!("\n{t}");
            t
        }
        Err(e) => format!("(not measured: {e:#})"),
    };
    let fanotify_modes = match crate::bench_fanotify::measure(&env.dir, args.scale) {
        Ok(r) => {
            let t = r.markdown();
            println!("\n{t}");
            t
        }
        Err(e) => format!("(not measured: {e:#})"),
    };
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let elapsed = t_all.elapsed();

    // ---- report
    let med: Vec<Vec<f64>> = samples
        .iter()
        .map(|c| c.iter().map(|s| median(s)).collect())
        .collect();
    // ratio[config][case]: median over rounds of (config / none of the same
    // round), so slow drift of the machine cancels out.
    let pairs: Vec<Vec<Vec<f64>>> = Config::ALL
        .iter()
        .map(|c| {
            (0..ncases)
                .map(|i| {
                    (0..args.rounds)
                        .map(|r| samples[*c as usize][i][r] / samples[Config::None as usize][i][r])
                        .collect()
                })
                .collect()
        })
        .collect();
    let ratio: Vec<Vec<f64>> = pairs
        .iter()
        .map(|c| c.iter().map(|p| median(p)).collect())
        .collect();
    let mut table = String::new();
    table.push_str(
        "| Workload | iterations | none | detector (tracepoints) | detector (fanotify) | detector (lease) | detector (hybrid) | bpftrace one-liner |\n",
    );
    table.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, case) in CASES.iter().enumerate() {
        let iters = ((case.iters as f64 * args.scale).round() as u64).max(1);
        let none = med[Config::None as usize][i];
        let cell = |c: Config| {
            let m = med[c as usize][i];
            if m.is_nan() {
                "n/a".to_string()
            } else {
                let p = &pairs[c as usize][i];
                format!(
                    "{} (**{:.2}×**; IQR {:.2}–{:.2}, min {:.2})",
                    fmt_ns(m),
                    ratio[c as usize][i],
                    quantile(p, 0.25),
                    quantile(p, 0.75),
                    quantile(p, 0.0)
                )
            }
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            case.label,
            iters,
            fmt_ns(none),
            cell(Config::Detector),
            cell(Config::DetectorFanotify),
            cell(Config::DetectorLease),
            cell(Config::DetectorHybrid),
            cell(Config::Bpftrace)
        );
    }
    let mut raw = String::new();
    for (ci, cfg) in Config::ALL.iter().enumerate() {
        for (i, case) in CASES.iter().enumerate() {
            let s = &samples[ci][i];
            let _ = writeln!(
                raw,
                "{:<9} {:<17} {}",
                cfg.name(),
                case.short,
                s.iter()
                    .map(|v| if v.is_nan() {
                        "-".to_string()
                    } else {
                        format!("{v:.0}")
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }

    let mut det_cpu_line = String::new();
    for cfg in Config::DETECTORS {
        let mine: Vec<(f64, f64)> = det_cpu
            .iter()
            .filter(|(c, _, _)| *c == cfg)
            .map(|(_, c, w)| (*c, *w))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let pct: Vec<f64> = mine.iter().map(|(c, w)| 100.0 * c / w).collect();
        let _ = writeln!(
            det_cpu_line,
            "CPU used by the `{}` detector process itself (user+sys) while the workloads ran: median {:.1} % of \
             one CPU (per round: {}). It runs beside the workload on this 2-CPU machine, so it is not all \
             visible in the times above.\n",
            cfg.name(),
            median(&pct),
            mine.iter()
                .map(|(c, w)| format!("{c:.2} s in {w:.1} s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("\n{table}\n{det_cpu_line}");
    let kernel = cmd_out("uname", &["-r"]);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let commit = cmd_out("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = cmd_out(
        "git",
        &[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "detector",
            "detector-ebpf",
            "detector-common",
        ],
    );
    let bt_version = cmd_out("bpftrace", &["--version"]);
    let others_s = if others.is_empty() {
        "none seen".to_string()
    } else {
        others.iter().cloned().collect::<Vec<_>>().join(", ")
    };

    let mut md = String::new();
    let _ = write!(
        md,
        r#"# Benchmarks: cost of the kernel sensors

Generated by `cargo xtask bench` — do not edit by hand; re-run it instead.

- Date: {started}; {rounds} rounds, total {secs:.0} s
- Commit: `{commit}`{dirty_note}
- Kernel {kernel}; {cpu}; {ncpu} CPUs (shared with other work); {pinning}
- Load average before / after: {lb} / {la}
- Other tracers/detectors running during the run (not ours): {others_s}
- bpftrace: {bt_version}; attachment verified in {bt_verified}/{bt_rounds} rounds

## Results

Median time per operation over the rounds; in parentheses the ratio to `none` (1.00× = no overhead),
computed as the median over rounds of (this configuration / `none` in the same round), then the
interquartile range and the minimum of those per-round ratios (the spread the shared machine adds).

{table}
{det_cpu_line}

### Credential open, interleaved with an ordinary open

The machine's speed drifts by more than the effects measured here between the sessions the table above
compares (the same binary, timed seconds apart, varies by ±10 %). So the credential open is also measured
against an ordinary open inside one worker process: `open`+`close` of the credential file and of the
ordinary file in the same directory, in alternating batches of 1000 ({pair_iters} of each), the ratio taken
per pair of batches and its median reported; one session per configuration per round, {rounds} rounds.
Under `none` the ratio is the control (two files are never exactly alike). Dividing by it gives what
watching the file adds to its open. For `fanotify`, `lease` and `hybrid`, whose programs do not run on ordinary
opens (see the bpf_stats table), that is the credential open's cost relative to no detector; the
tracepoint sensor's program runs on both files, so there it is only the credential-specific part, on
top of its ordinary-open ratio above.

{pair_table}

### Connect, with and without the detector's `connect4`, interleaved

For the same reason, the connect's cost is also measured inside one worker: the bench starts the daemon
(fanotify open sensor; connect4 is the same program with every sensor), and the worker copies the daemon's `connect4` program and its root link out of
the daemon (`pidfd_getfd`), detaches the link, moves itself into a cgroup of its own and attaches the
very same program, with the daemon's live maps, to that cgroup for one batch of connects and detaches
it for the next (TCP batches of 500, UDP of 2000, order flipped every pair, 10 untimed connects after
each switch). When detached, no `connect4` runs at all: the hook's static key is off, as on a machine
without the detector. The ratio is taken per pair of batches and its median reported; one daemon per
round, {rounds} rounds. With the fanotify, lease or hybrid sensor, `connect4` is the only program of the detector
that runs on a connect (bpf_stats table above), so this is the detector's whole cost on a connect. The
A/A rows take the program over but attach it on neither side.

{connect_table}

## Method

- **Workloads** — each a bounded loop in a fresh process (`xtask bench-worker`, a debug build; the loop
  body is direct libc calls, so its own cost is the syscalls), with a short warm-up (2 % of the
  iterations) before the timed loop:
  - (a) `open(O_RDONLY)` + `close` of an ordinary file on tmpfs (`/dev/shm`);
  - (b) the same on a pod's service-account token laid out as on a node: kubelet's projected volume is
    a tmpfs of its own under `<kubelet>/pods/<uid>/volumes/kubernetes.io~projected/`, with kubelet's
    `..<timestamp>/token` and `..data` layout, found by the daemon's inventory (`--kubelet-dir`); the
    workload opens the token's `..<timestamp>/token` path through a bind mount of the volume, as a
    container does (the fanotify sensor's filesystem mark and the hybrid sensor's mount mark on
    kubelet's mount are where they are on a node);
  - (c) `socket` + `connect` + `close` to a listener on 127.0.0.1 inside the bench process (the client
    closes with `SO_LINGER` 0, so no TIME_WAIT accumulates); (c') the same from a process that opened
    the credential file once before the loop, i.e. a credential *holder* for the detector;
  - (e) `socket(SOCK_DGRAM)` + `connect` + `close` to the same address: the same cgroup `connect4`
    program runs, but no handshake, no softirq and no listener thread, so the program's cost is a far
    larger share of the time; (e') the same by a credential holder;
  - (d) `fork` + `execve("/bin/true")` + `waitpid`.
- **Pinning** — every workload process is pinned to the last CPU (`sched_setaffinity`, unless
  `--no-pin`) and the bench's loopback listener thread to the others: woken by every connect, it would
  otherwise preempt the workload at random points, inside the connect hook too (where the kernel's
  per-program statistics then count its time as the program's). The daemon and bpftrace run wherever
  the scheduler puts them (on this 2-CPU machine, mostly on the other CPU).
- **Cgroup** — every worker first moves itself into a cgroup of its own, apart from the bench process.
  The detector counts the parent of a credential reader in the same cgroup as a holder too (a shell
  that runs `cat token`), and a holder's forks inherit the status: before this, the credential-open
  workload made the bench a holder and every connect workload after it in the session measured a
  holder's connect (an event per connect), not an ordinary one.
- **Configurations**:
  - `none` — nothing of ours attached;
  - `detector` (tracepoints) — `target/release/detector run --open-sensor tracepoint --kubelet-dir
    <the kubelet directory above> --metrics-addr 127.0.0.1:<port> --alerts /dev/null` (default mode, no
    intents), measured once `/readyz` answers 200, stopped with SIGTERM after the round's workloads;
  - `detector (fanotify)` (raw samples: `fanotify`) — the same with `--open-sensor fanotify`: no syscall
    tracepoint attached; an open of the credential file waits until the daemon has recorded the opener
    as a holder and answered. The loop (b) re-opens the file from one thread: after the first open
    (the full path: /proc read, HOLDERS update, event queued), each re-open within
    `--credential-dedup-ms` (default 1000 ms) by that known holder thread is answered after a poll of
    its pidfd and counted in the kernel's `CRED_SEEN`, as the tracepoint sensor counts it;
  - `detector (lease)` (raw samples: `lease`) — the same with `--open-sensor lease`: the daemon holds a
    read lease on the credential file, and the kernel's lease check in the open path fires
    `filelock:leases_conflict` for opens of that file only; the program runs in the opener's context
    (holder recorded before the open returns), with no syscall tracepoint and no round trip;
  - `detector (hybrid)` (raw samples: `hybrid`) — `--open-sensor hybrid`: the lease as above, and the
    fanotify group of `fanotify`, whose marks stay out of the leased file's way: a mount mark on
    kubelet's mount of the volume (the pod's bind mount is another mount) and no inode mark while the
    lease is held. The open of the leased token pays the lease check, no round trip, and what any mark
    on the same filesystem costs the kernel's open path (about 2.5 % of an open+close, measured alone);
  - `bpftrace` — `bpftrace -e '{bt_prog}'`, measured once it printed `Attaching 1 probe...` plus 0.5 s;
    a sentinel open of the token path from a thread with a unique name must appear in its map at exit,
    else that round's bpftrace samples are discarded.
- **Interleaving** — each round runs every configuration once, in an order rotated every round, and the
  workloads in a rotated order; each (configuration, workload) gets one sample per round. Reported:
  median per cell; ratio = median / median of `none`.
- The machine is shared (other builds and tests may run at the same time), so single runs are noisy;
  compare ratios, look at the raw samples below, and re-run when in doubt.
- Benchmarks are not tests: nothing in `cargo xtask test` asserts timings.

## Raw samples (ns/op, in round order)

```
{raw}```

## fanotify: permission events vs notification events

Why the fanotify sensor makes credential opens wait (`FAN_OPEN_PERM`) instead of being told afterwards
(`FAN_OPEN`): measured here with a minimal listener thread of the bench itself (no daemon; it only reads,
answers and closes), on one marked file on tmpfs. "Connect started before the listener had the open": a
thread opens the file and connects to a loopback listener right away, repeated; counted when the
listener's `read(2)` returned the event only after the connect had started, i.e. even a sensor with zero
processing time could not have made the connect a holder's. "Opener gone": a forked child opens the file
and exits, and is reaped at once (as a shell reaps `$(cat token)`); counted when the listener, on reading the event, found `/proc/<pid>/status` already gone
(nothing left to attribute). With permission events both are 0 by construction (the opener is blocked
until answered); the price is the round trip on every open of a credential file.

{fanotify_modes}

## Run time of the detector's eBPF programs (bpf_stats)

A separate pass after the rounds (statistics on cost a little themselves): one more session per detector
configuration with `BPF_ENABLE_STATS` on, each workload run once, and the kernel's `run_time_ns` /
`run_cnt` of each of the daemon's programs read before and after. "BPF ns per op" is the programs' total
run time divided by the workload's iterations; runs per op above 1 (or programs that the workload does not
trigger) are other processes on the shared machine running the same hooks meanwhile. Program names are
the kernel's (cut at 15 bytes; `raw_tp/` marks a raw tracepoint). The time a syscall tracepoint costs
outside the program (the syscall slow path taken by every syscall of every task) is not in these numbers.

{bpf_table}

## Detector metrics at the end of its last session

```
{metrics}
```

## Session log

```
{notes}
```
"#,
        rounds = args.rounds,
        pair_iters = ((100_000.0 * args.scale).round() as u64).max(1000),
        secs = elapsed.as_secs_f64(),
        dirty_note = if dirty.is_empty() || dirty == "?" {
            String::new()
        } else {
            " (detector sources had uncommitted changes in the working tree)".to_string()
        },
        lb = load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        la = load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        bt_prog = bpftrace_program(),
        pinning = match env.cpu {
            Some(c) =>
                format!("workload processes pinned to CPU {c}, the loopback listener off it, the daemon and bpftrace not pinned"),
            None => "nothing pinned".to_string(),
        },
        det_cpu_line = det_cpu_line,
        metrics = if last_metrics.is_empty() {
            "(none scraped)".to_string()
        } else {
            last_metrics
                .iter()
                .map(|(c, m)| {
                    format!(
                        "# {} (--open-sensor {})\n{}",
                        c.name(),
                        c.open_sensor().unwrap_or("?"),
                        m.join("\n")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n\n")
        },
        notes = notes.join("\n"),
        fanotify_modes = fanotify_modes,
        bpf_table = bpf_table,
    );

    let out = args.out.as_deref();
    crate::bench_correlate::append(
        &args.correlate,
        &env.detector,
        out,
        args.no_write,
        args.scale,
        &mut md,
    );

    if !args.no_write {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| repo_root().join("docs/BENCHMARKS.md"));
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p)?;
        }
        let svg_path = out.with_extension("svg");
        std::fs::write(&svg_path, svg_chart(&ratio))?;
        let name = svg_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        md = md.replacen(
            "## Method",
            &format!("![overhead ratio vs none]({name})\n\n## Method"),
            1,
        );
        std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
        println!("bench: wrote {} and {}", out.display(), svg_path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// A small horizontal bar chart of the ratios vs `none` (hand-written SVG,
/// no plotting dependency).
fn svg_chart(ratio: &[Vec<f64>]) -> String {
    let shown = [
        Config::Detector,
        Config::DetectorFanotify,
        Config::DetectorLease,
        Config::DetectorHybrid,
        Config::Bpftrace,
    ];
    let colors = ["#d95f02", "#1b9e77", "#e7298a", "#66a61e", "#7570b3"];
    let ratios: Vec<Vec<f64>> = shown.iter().map(|c| ratio[*c as usize].clone()).collect();
    let max = ratios
        .iter()
        .flatten()
        .copied()
        .filter(|r| r.is_finite())
        .fold(1.0f64, f64::max);
    let xmax = (max * 1.1).max(1.2);
    let (left, width, bar, gap) = (230.0, 440.0, 14.0, 14.0);
    let group = bar * shown.len() as f64 + gap;
    let height = 50.0 + group * CASES.len() as f64 + 30.0;
    let x = |r: f64| left + width * r / xmax;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = left + width + 70.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">Time per operation relative to no sensor (1.0 = no overhead)</text>"#
    );
    for (k, c) in shown.iter().enumerate() {
        let lx = left + k as f64 * 110.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="30" width="12" height="12" fill="{}"/><text x="{}" y="40">{}</text>"#,
            colors[k],
            lx + 16.0,
            c.name()
        );
    }
    for (i, case) in CASES.iter().enumerate() {
        let y0 = 50.0 + group * i as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y0 + bar + 4.0,
            case.short
        );
        for (k, r) in ratios.iter().map(|v| v[i]).enumerate() {
            if !r.is_finite() {
                continue;
            }
            let y = y0 + bar * k as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{left}" y="{y}" width="{:.1}" height="{}" fill="{}"/><text x="{:.1}" y="{:.1}">{r:.2}×</text>"#,
                (x(r) - left).max(0.5),
                bar - 2.0,
                colors[k],
                x(r) + 4.0,
                y + bar - 4.0
            );
        }
    }
    let bottom = 50.0 + group * CASES.len() as f64;
    let _ = writeln!(
        s,
        r##"<line x1="{0:.1}" x2="{0:.1}" y1="45" y2="{bottom}" stroke="#333" stroke-dasharray="4 3"/>"##,
        x(1.0)
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">1.0</text>"#,
        x(1.0),
        bottom + 15.0
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{left}" y1="45" y2="{bottom}" stroke="black"/>"#
    );
    s.push_str("</svg>\n");
    s
}
