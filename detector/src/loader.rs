//! Loads the kernel programs, hands them the BTF offsets and the runtime
//! configuration, attaches them, and owns the maps userspace talks to.
//!
//! Every attachment is a bpf_link or perf-event fd owned by this process:
//! when the daemon exits (cleanly or killed) the kernel detaches everything.

use std::{fs::File, path::Path};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSockAddr, RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use detector_common::{
    names, AllowKey4, AllowKey6, AllowPorts, CgroupPolicy, CredentialInfo, CredentialKey, DenyRule,
    EventKind, Holder, KernelOffsets, ProgramConfig,
};
use tracing::{info, warn};

/// The object built by detector-ebpf (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detector"));

/// Syscall-exit tracepoints that hand out a new fd (credential access).
const FD_TRACEPOINTS: &[&str] = &[
    "sys_exit_open",
    "sys_exit_openat",
    "sys_exit_openat2",
    "sys_exit_creat",
    "sys_exit_open_by_handle_at",
    "sys_exit_pidfd_getfd",
];

/// Programs every node must have; anything else is optional.
const REQUIRED: &[&str] = &[
    "sys_exit_openat",
    "sched_process_fork",
    "connect4",
    "connect6",
];

#[derive(Clone, Debug)]
pub struct SensorConfig {
    pub cgroup_root: std::path::PathBuf,
    pub enforce: bool,
    pub connect_dedup_ns: u64,
    /// Attach the open-family syscall tracepoints (`FD_TRACEPOINTS`). Off
    /// when the fanotify sensor sees credential opens instead: any syscall
    /// tracepoint slows every syscall of every task.
    pub open_tracepoints: bool,
}

/// Maps userspace reads and writes.
pub struct KernelMaps {
    pub credentials: HashMap<MapData, CredentialKey, CredentialInfo>,
    pub holders: HashMap<MapData, u32, Holder>,
    pub cgroup_policy: HashMap<MapData, u64, CgroupPolicy>,
    pub allow4: LpmTrie<MapData, AllowKey4, AllowPorts>,
    pub allow6: LpmTrie<MapData, AllowKey6, AllowPorts>,
    pub deny_cgroup: HashMap<MapData, u64, DenyRule>,
    pub deny_tgid: HashMap<MapData, u32, DenyRule>,
    pub lost: PerCpuArray<MapData, u64>,
    pub emitted: PerCpuArray<MapData, u64>,
}

impl KernelMaps {
    /// Events lost (ring buffer full) per kind, summed over CPUs.
    pub fn lost_by_kind(&self) -> Vec<(EventKind, u64)> {
        sum_per_kind(&self.lost)
    }

    pub fn emitted_by_kind(&self) -> Vec<(EventKind, u64)> {
        sum_per_kind(&self.emitted)
    }
}

fn sum_per_kind(map: &PerCpuArray<MapData, u64>) -> Vec<(EventKind, u64)> {
    EventKind::ALL
        .iter()
        .map(|&k| {
            let total = map.get(&(k as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
            (k, total)
        })
        .collect()
}

/// Loaded and attached programs. Dropping it detaches everything.
pub struct Sensors {
    // Owns the programs and their links.
    _ebpf: Ebpf,
    pub maps: KernelMaps,
    pub attached: Vec<String>,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn raise_memlock() {
    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the memcg.
    if matches!(aya::util::KernelVersion::current(), Ok(v) if v >= aya::util::KernelVersion::new(5, 11, 0))
    {
        return;
    }
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        warn!("could not raise RLIMIT_MEMLOCK; map creation may fail on old kernels");
    }
}

/// Make sure tracefs is reachable: tracepoint attach needs its event ids.
fn ensure_tracefs() {
    let base = Path::new("/sys/kernel/tracing");
    if base.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return;
    }
    let _ = std::fs::create_dir_all(base);
    let src = std::ffi::CString::new("nodev").unwrap();
    let dst = std::ffi::CString::new("/sys/kernel/tracing").unwrap();
    let fstype = std::ffi::CString::new("tracefs").unwrap();
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        info!("mounted tracefs at /sys/kernel/tracing");
    } else {
        warn!(error = %std::io::Error::last_os_error(), "tracefs is not mounted and mounting it failed");
    }
}

fn tracepoint_exists(category: &str, name: &str) -> bool {
    [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .iter()
    .any(|base| Path::new(base).join(category).join(name).exists())
}

impl Sensors {
    /// Loads and attaches everything; returns the sensors and their event ring.
    pub fn load(offsets: KernelOffsets, cfg: &SensorConfig) -> Result<(Sensors, RingBuf<MapData>)> {
        raise_memlock();
        ensure_tracefs();
        let program_config = ProgramConfig {
            enabled: 1,
            enforce: cfg.enforce as u32,
            connect_dedup_ns: cfg.connect_dedup_ns,
            wakeup_bytes: 256 * 1024,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::OFFSETS, &offsets, true)
            .override_global(names::CONFIG, &program_config, true)
            .load(OBJECT)
            .context("loading the eBPF object")?;

        let mut attached = Vec::new();
        let mut attach_tp = |ebpf: &mut Ebpf, category: &str, name: &str| -> Result<()> {
            if !tracepoint_exists(category, name) {
                if REQUIRED.contains(&name) {
                    return Err(anyhow!(
                        "required tracepoint {category}/{name} does not exist"
                    ));
                }
                info!(tracepoint = %format!("{category}/{name}"), "not present on this kernel; skipped");
                return Ok(());
            }
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            prog.attach(category, name)
                .with_context(|| format!("attaching {category}/{name}"))?;
            attached.push(format!("tracepoint/{category}/{name}"));
            Ok(())
        };
        if cfg.open_tracepoints {
            for name in FD_TRACEPOINTS {
                attach_tp(&mut ebpf, "syscalls", name)?;
            }
        }
        attach_tp(&mut ebpf, "sched", "sched_process_exec")?;
        attach_tp(&mut ebpf, "cgroup", "cgroup_mkdir")?;
        attach_tp(&mut ebpf, "cgroup", "cgroup_rmdir")?;

        for name in ["sched_process_fork", "sched_process_exit"] {
            let prog: &mut RawTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            prog.attach(name)
                .with_context(|| format!("attaching raw_tp/{name}"))?;
            attached.push(format!("raw_tracepoint/{name}"));
        }

        let cgroup = File::open(&cfg.cgroup_root)
            .with_context(|| format!("opening cgroup-v2 root {}", cfg.cgroup_root.display()))?;
        for name in ["connect4", "connect6", "sendmsg4", "sendmsg6"] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            prog.attach(&cgroup, cgroup_attach_mode())
                .with_context(|| {
                    format!("attaching cgroup/{name} at {}", cfg.cgroup_root.display())
                })?;
            attached.push(format!("cgroup/{name}"));
        }

        let events = take(&mut ebpf, names::EVENTS)?;
        let maps = KernelMaps {
            credentials: take(&mut ebpf, names::CREDENTIALS)?,
            holders: take(&mut ebpf, names::HOLDERS)?,
            cgroup_policy: take(&mut ebpf, names::CGROUP_POLICY)?,
            allow4: take(&mut ebpf, names::ALLOW4)?,
            allow6: take(&mut ebpf, names::ALLOW6)?,
            deny_cgroup: take(&mut ebpf, names::DENY_CGROUP)?,
            deny_tgid: take(&mut ebpf, names::DENY_TGID)?,
            lost: take(&mut ebpf, names::LOST)?,
            emitted: take(&mut ebpf, names::EMITTED)?,
        };
        Ok((
            Sensors {
                _ebpf: ebpf,
                maps,
                attached,
            },
            events,
        ))
    }
}

/// We must co-exist with other programs at the cgroup root (Cilium, …).
/// Since 5.7 aya attaches with a bpf_link, which the kernel always attaches
/// in multi mode and for which it rejects any flag (aya would pass
/// BPF_F_ALLOW_MULTI and get EINVAL), so pass none. Older kernels use
/// BPF_PROG_ATTACH, where the flag must be explicit.
fn cgroup_attach_mode() -> CgroupAttachMode {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

/// The cgroup-v2 mount: `/sys/fs/cgroup/unified` on hybrid hosts, else the
/// first cgroup2 mount in /proc/self/mounts.
pub fn find_cgroup2_root() -> Result<std::path::PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mut found: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then_some(dir)
        })
        .collect();
    found.sort_by_key(|d| d.len());
    found
        .first()
        .map(|d| std::path::PathBuf::from(*d))
        .ok_or_else(|| anyhow!("no cgroup2 filesystem is mounted; pass --cgroup-root"))
}
