//! Per-program run time of the detector's eBPF programs (the kernel's
//! `bpf_stats`: `run_time_ns` and `run_cnt` of each program), the cleanest
//! number for what a program costs: no scheduler, no other tenant in it.
//!
//! Statistics are switched on with `BPF_ENABLE_STATS` for as long as we hold
//! the returned descriptor (so they switch off again even if the bench
//! dies), never through the global sysctl. The programs are found through
//! the daemon's own descriptors (`/proc/<pid>/fdinfo` gives `prog_id`), so
//! other detectors on the machine are not counted.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{FromRawFd, OwnedFd},
};

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// The leading part of `struct bpf_prog_info` up to `run_cnt` (uapi
/// layout; the kernel fills at most the size we pass).
#[repr(C)]
#[derive(Clone, Copy)]
struct ProgInfo {
    head: [u8; 64],
    name: [u8; 16],
    mid: [u8; 192 - 80],
    run_time_ns: u64,
    run_cnt: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, writable buffer of the size we pass.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Holds run-time statistics on while alive.
pub struct Enabled(#[allow(dead_code)] OwnedFd);

pub fn enable() -> io::Result<Enabled> {
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
    let fd = bpf(BPF_ENABLE_STATS, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor.
    Ok(Enabled(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// Program name -> (run_time_ns, run_cnt), summed over programs of that
/// name held by `pid`.
pub type Snapshot = BTreeMap<String, (u64, u64)>;

fn prog_info(id: u32) -> io::Result<ProgInfo> {
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: plain-data struct; all-zero is valid.
    let mut info: ProgInfo = unsafe { std::mem::zeroed() };
    let mut attr = [0u8; 16];
    use std::os::fd::AsRawFd;
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(std::mem::size_of::<ProgInfo>() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(&mut info as *mut ProgInfo as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The programs `pid` holds descriptors of, by name.
pub fn snapshot(pid: u32) -> Snapshot {
    let mut out = Snapshot::new();
    let mut ids = std::collections::BTreeSet::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for e in rd.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        if let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            ids.insert(id);
        }
    }
    for id in ids {
        let Ok(info) = prog_info(id) else { continue };
        let end = info.name.iter().position(|&b| b == 0).unwrap_or(16);
        let mut name = String::from_utf8_lossy(&info.name[..end]).into_owned();
        // Names are cut at 15 bytes: sched_process_exec (a tracepoint) and
        // sched_process_exit (a raw tracepoint) differ only in type.
        let prog_type = u32::from_ne_bytes(info.head[..4].try_into().expect("4 bytes"));
        if prog_type == BPF_PROG_TYPE_RAW_TRACEPOINT {
            name.insert_str(0, "raw_tp/");
        }
        let e = out.entry(name).or_insert((0, 0));
        e.0 += info.run_time_ns;
        e.1 += info.run_cnt;
    }
    out
}

/// Per program: (runs, ns) between two snapshots, programs that ran only.
pub fn delta(before: &Snapshot, after: &Snapshot) -> Vec<(String, u64, u64)> {
    after
        .iter()
        .filter_map(|(name, (t, c))| {
            let (t0, c0) = before.get(name).copied().unwrap_or((0, 0));
            let runs = c.saturating_sub(c0);
            (runs > 0).then(|| (name.clone(), runs, t.saturating_sub(t0)))
        })
        .collect()
}
