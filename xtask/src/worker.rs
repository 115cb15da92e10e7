//! `xtask bench-worker`: one timed, bounded workload loop in a fresh process
//! (so no state — e.g. being a credential holder — leaks between workloads).
//! Prints `ns_per_op=<f64>` on stdout.

use std::{
    ffi::CString, net::SocketAddrV4, os::unix::ffi::OsStrExt, path::PathBuf, process::ExitCode,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// open(O_RDONLY) + close of --path.
    Open,
    /// socket + connect + close (RST via SO_LINGER 0) to --addr.
    Connect,
    /// UDP socket + connect + close to --addr: the same cgroup connect4
    /// program runs, but no handshake and no listener thread take part,
    /// so the program's share of the time is far larger.
    Udp,
    /// fork + execve(/bin/true) + waitpid.
    Exec,
    /// open+close of --path and of --control in alternating batches of
    /// 1000 (order flipped every pair): the ratio of the two in each pair
    /// is free of the machine's drift, which on a shared VM is larger than
    /// the effects measured. Prints `pair_ratio=` (median over pairs) too.
    OpenPair,
    /// TCP connects (as `connect`) in alternating batches with the
    /// daemon's `connect4` attached and detached (`--daemon-pid`,
    /// `--cgroup`; see `connect_ab`): `pair_ratio=` is on/off. With
    /// `--control-only` (or without `--daemon-pid`) nothing is attached:
    /// the A/A control of the method.
    ConnectPair,
    /// The same with UDP connects (as `udp`).
    UdpPair,
}

impl Workload {
    /// The `--workload` value naming it.
    pub fn arg(self) -> &'static str {
        match self {
            Workload::Open => "open",
            Workload::Connect => "connect",
            Workload::Udp => "udp",
            Workload::Exec => "exec",
            Workload::OpenPair => "open-pair",
            Workload::ConnectPair => "connect-pair",
            Workload::UdpPair => "udp-pair",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    pub workload: Workload,
    #[arg(long)]
    pub iters: u64,
    /// File to open (open workload).
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// The other file of the open-pair workload.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// 127.0.0.1:port to connect to (connect workload).
    #[arg(long)]
    pub addr: Option<SocketAddrV4>,
    /// Open and close this file once before the loop (to become a
    /// credential holder).
    #[arg(long)]
    pub hold: Option<PathBuf>,
    /// The daemon whose `connect4` the pair workloads toggle.
    #[arg(long, requires = "cgroup")]
    pub daemon_pid: Option<u32>,
    /// A cgroup-v2 directory to move into first, before `--hold`: the
    /// bench's own process must not share the worker's cgroup, or a
    /// credential read by the worker makes it a holder too (the detector
    /// counts a reader's parent in the same cgroup as one), and every
    /// worker it forks after that inherits the status.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Pair workloads: take the daemon's `connect4` over but never attach
    /// it, so both sides of each pair run without it (the A/A control).
    #[arg(long, requires = "daemon_pid")]
    pub control_only: bool,
    /// Pin this worker to one CPU (the bench's daemon may run anywhere).
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// sched_setaffinity(0, {cpu}).
fn pin(cpu: usize) -> Result<()> {
    set_affinity(std::iter::once(cpu)).with_context(|| format!("cpu {cpu}"))
}

/// sched_setaffinity(0, every CPU but `cpu`) (the calling thread only).
pub fn pin_except(cpu: usize) -> Result<()> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    set_affinity((0..n).filter(|c| *c != cpu)).with_context(|| format!("all but cpu {cpu}"))
}

fn set_affinity(cpus: impl Iterator<Item = usize>) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET bounds-checks
    // against the set size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn cstring(p: &std::path::Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("path contains NUL")
}

fn open_close(path: &CString) -> Result<()> {
    // SAFETY: valid NUL-terminated path; fd closed right away.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            bail!("open {:?}: {}", path, std::io::Error::last_os_error());
        }
        libc::close(fd);
    }
    Ok(())
}

/// `socket` + `connect` + `close` of one socket of type `ty` to `addr`: the
/// connect's outcome, and how long the `connect` call took when `timed`
/// (else 0: the overhead workloads time whole loops). A TCP socket closes
/// with RST (`SO_LINGER` 0): no TIME_WAIT, so bounded loops never exhaust
/// ports. Err only when no socket could be made.
pub fn connect_once(
    addr: &libc::sockaddr_in,
    ty: libc::c_int,
    timed: bool,
) -> Result<(std::io::Result<()>, u64)> {
    // SAFETY: plain socket calls on an fd we own; addr is a valid sockaddr_in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        if ty == libc::SOCK_STREAM {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        let t0 = if timed { mono_ns() } else { 0 };
        let r = libc::connect(
            fd,
            addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let took = if timed { mono_ns() - t0 } else { 0 };
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        Ok((if r == 0 { Ok(()) } else { Err(err) }, took))
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn udp_connect_close(addr: &libc::sockaddr_in) -> Result<()> {
    connect_once(addr, libc::SOCK_DGRAM, false)?
        .0
        .context("connect (udp)")
}

fn connect_close(addr: &libc::sockaddr_in) -> Result<()> {
    connect_once(addr, libc::SOCK_STREAM, false)?
        .0
        .context("connect")
}

struct ExecArgs {
    path: CString,
    argv: [*const libc::c_char; 2],
    envp: [*const libc::c_char; 1],
}

fn fork_exec(a: &ExecArgs) -> Result<()> {
    // SAFETY: this worker is single-threaded; the child only calls
    // async-signal-safe functions (execve, _exit).
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            libc::execve(a.path.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
            libc::_exit(127);
        }
        let mut status = 0;
        if libc::waitpid(pid, &mut status, 0) != pid {
            bail!("waitpid: {}", std::io::Error::last_os_error());
        }
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            bail!("/bin/true exited with status {status:#x}");
        }
    }
    Ok(())
}

pub fn worker(args: WorkerArgs) -> Result<ExitCode> {
    if let Some(cg) = &args.cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("moving into cgroup {}", cg.display()))?;
    }
    if let Some(cpu) = args.cpu {
        pin(cpu)?;
    }
    if let Some(h) = &args.hold {
        open_close(&cstring(h)?)?;
    }
    let warmup = (args.iters / 50).max(1);
    let ns = match args.workload {
        Workload::Open => {
            let p = cstring(args.path.as_deref().context("--path is required")?)?;
            time_loop(warmup, args.iters, || open_close(&p))?
        }
        Workload::Connect => {
            let sa = sockaddr(&args)?;
            time_loop(warmup, args.iters, || connect_close(&sa))?
        }
        Workload::Udp => {
            let sa = sockaddr(&args)?;
            time_loop(warmup, args.iters, || udp_connect_close(&sa))?
        }
        Workload::OpenPair => {
            let p = cstring(args.path.as_deref().context("--path is required")?)?;
            let c = cstring(args.control.as_deref().context("--control is required")?)?;
            let (ns, control, ratio) = time_pairs(args.iters, 1000, |first, n| {
                batch(n, || open_close(if first { &p } else { &c }))
            })?;
            print_pairs(control, ratio);
            ns
        }
        Workload::ConnectPair | Workload::UdpPair => {
            let sa = sockaddr(&args)?;
            let op: fn(&libc::sockaddr_in) -> Result<()> = if args.workload == Workload::UdpPair {
                udp_connect_close
            } else {
                connect_close
            };
            let mut hook = match (args.daemon_pid, &args.cgroup) {
                (Some(pid), Some(cg)) => Some(crate::connect_ab::Connect4::take_over(pid, cg)?),
                _ => None,
            };
            // ~20 ms batches: long enough to dwarf the toggle, short enough
            // that the machine does not drift within a pair.
            let size = if args.workload == Workload::UdpPair {
                2000
            } else {
                500
            };
            let (ns, control, ratio) = time_pairs(args.iters, size, |on, n| {
                if let Some(h) = hook.as_mut() {
                    h.set(on && !args.control_only)?;
                }
                // Untimed: the first connects after a toggle run cold.
                for _ in 0..10 {
                    op(&sa)?;
                }
                batch(n, || op(&sa))
            })?;
            drop(hook);
            print_pairs(control, ratio);
            ns
        }
        Workload::Exec => {
            let path = CString::new("/bin/true").expect("no NUL");
            let ea = ExecArgs {
                argv: [path.as_ptr(), std::ptr::null()],
                envp: [std::ptr::null()],
                path,
            };
            time_loop(warmup, args.iters, || fork_exec(&ea))?
        }
    };
    println!("ns_per_op={ns:.1}");
    Ok(ExitCode::SUCCESS)
}

fn sockaddr(args: &WorkerArgs) -> Result<libc::sockaddr_in> {
    Ok(sockaddr_in(args.addr.context("--addr is required")?))
}

pub fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn print_pairs(control_ns: f64, ratio: f64) {
    println!("control_ns_per_op={control_ns:.1}");
    println!("pair_ratio={ratio:.4}");
}

/// Mean ns of `n` timed calls of `op`.
fn batch(n: u64, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..n {
        op()?;
    }
    Ok(start.elapsed().as_nanos() as f64 / n as f64)
}

/// `iters` operations of each side in alternating batches of `size`
/// (`run(side_a, n)` times one batch; the order flips every pair, one pair
/// of warm-up first): (mean ns of a, mean ns of b, median over pairs of a/b).
fn time_pairs(
    iters: u64,
    size: u64,
    mut run: impl FnMut(bool, u64) -> Result<f64>,
) -> Result<(f64, f64, f64)> {
    run(true, size)?;
    run(false, size)?;
    let pairs = (iters / size).max(1);
    let (mut sum_a, mut sum_b, mut ratios) = (0.0, 0.0, Vec::new());
    for i in 0..pairs {
        let (ta, tb) = if i % 2 == 0 {
            let ta = run(true, size)?;
            (ta, run(false, size)?)
        } else {
            let tb = run(false, size)?;
            (run(true, size)?, tb)
        };
        sum_a += ta;
        sum_b += tb;
        ratios.push(ta / tb);
    }
    ratios.sort_by(f64::total_cmp);
    let n = pairs as f64;
    Ok((sum_a / n, sum_b / n, ratios[ratios.len() / 2]))
}

fn time_loop(warmup: u64, iters: u64, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        op()?;
    }
    let start = Instant::now();
    for _ in 0..iters {
        op()?;
    }
    Ok(start.elapsed().as_nanos() as f64 / iters.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::Workload;

    #[test]
    fn every_workload_is_named_as_clap_parses_it() {
        for w in Workload::value_variants() {
            assert_eq!(Workload::from_str(w.arg(), false), Ok(*w));
        }
    }
}
