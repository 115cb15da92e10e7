//! Loads the kernel programs, hands them the BTF offsets and the runtime
//! configuration, attaches them, and owns the maps userspace talks to.
//!
//! By default every attachment is a bpf_link owned by this process: when the
//! daemon exits (cleanly or killed) the kernel detaches everything.
//!
//! With a pin directory (`--pin-dir`, on bpffs) the links and the state maps
//! are pinned instead, so enforcement and holder tracking stay in force
//! while the daemon is down (crash, upgrade), and events that happen
//! meanwhile wait in the pinned ring buffers. A restart adopts the maps; it
//! keeps the pinned links when they run the very same programs and
//! configuration, else it attaches its own and only then detaches the old
//! ones. `detector unpin` removes everything.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        BtfTracePoint, CgroupAttachMode, CgroupSockAddr, RawTracePoint, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use detector_common::{
    names, AllowKey4, AllowKey6, AllowPorts, CgroupBudget, CgroupPolicy, CredSeen, CredSeenKey,
    CredentialInfo, CredentialKey, DenyRule, EventKind, Holder, KernelOffsets, OpenCounts,
    ProgramConfig, MAX_CPUS,
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
    pub cred_dedup_ns: u64,
    /// Per cgroup and CPU, per second; 0 = unlimited.
    pub cgroup_event_budget: u32,
    pub cgroup_alert_budget: u32,
    /// Pin links and state maps here (a bpffs directory); `None`: own them.
    pub pin_dir: Option<PathBuf>,
    /// Attach the open-family syscall tracepoints (`FD_TRACEPOINTS`). Off
    /// when the fanotify sensor sees credential opens instead: any syscall
    /// tracepoint slows every syscall of every task.
    pub open_tracepoints: bool,
    /// Attach raw_tp `leases_conflict` (the lease sensor): credential
    /// opens seen through the read leases the daemon holds on them.
    pub lease_tracepoint: bool,
    /// Deny rules will be written (`--deny-cgroup`); without, the egress
    /// programs skip the two deny-map lookups.
    pub deny_rules: bool,
}

/// Maps whose contents must survive a daemon restart when pinning.
const STATE_MAPS: &[&str] = &[
    names::EVENTS,
    names::ALERTS,
    names::CREDENTIALS,
    names::HOLDERS,
    names::CGROUP_POLICY,
    names::ALLOW4,
    names::ALLOW6,
    names::DENY_CGROUP,
    names::DENY_TGID,
    names::CONNECT_SEEN,
    names::CRED_SEEN,
    names::BUDGET,
    names::LOST,
    names::EMITTED,
    // Not state, but read by userspace: an adopted program must write the
    // map the new daemon reads.
    names::OPEN_COUNTS,
];

/// Bump when a state map changes meaning (sizes are hashed in anyway): a
/// daemon then starts from fresh maps instead of adopting incompatible ones.
const MAP_LAYOUT_VERSION: u64 = 1;

/// FNV-1a: a stable content hash (std's hasher may change between releases).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: plain-old-data `#[repr(C)]` values, read as bytes.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// Where the pinned maps and links of this build live.
struct PinLayout {
    maps: PathBuf,
    links: PathBuf,
}

impl PinLayout {
    fn new(
        root: &Path,
        config: &ProgramConfig,
        offsets: &KernelOffsets,
        open_probes: u8,
    ) -> PinLayout {
        use std::mem::size_of;
        let sizes = [
            size_of::<CredentialKey>(),
            size_of::<CredentialInfo>(),
            size_of::<Holder>(),
            size_of::<CgroupPolicy>(),
            size_of::<AllowKey4>(),
            size_of::<AllowKey6>(),
            size_of::<AllowPorts>(),
            size_of::<DenyRule>(),
            size_of::<CgroupBudget>(),
            size_of::<detector_common::CredSeen>(),
            size_of::<detector_common::ConnectSeenKey>(),
        ]
        .map(|n| n as u64);
        let maps = fnv(&[&MAP_LAYOUT_VERSION.to_le_bytes(), bytes_of(&sizes)]);
        let links = fnv(&[OBJECT, bytes_of(config), bytes_of(offsets), &[open_probes]]);
        PinLayout {
            maps: root.join(format!("maps-{maps:016x}")),
            links: root.join(format!("links-{links:016x}")),
        }
    }
}

/// Detach and unpin every pinned link and map under `root` except the
/// directories in `keep`; then remove what is empty.
fn remove_pins(root: &Path, keep: &[&Path]) {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return;
    };
    for dir in dirs.flatten().map(|e| e.path()) {
        if keep.contains(&dir.as_path()) {
            continue;
        }
        let is_links = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("links-"));
        for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = f.path();
            if is_links {
                // Unpinning and dropping the last fd detaches the link.
                match PinnedLink::from_pin(&path).map(|l| l.unpin()) {
                    Ok(Ok(_fd_link)) => continue,
                    Ok(Err(e)) => warn!(path = %path.display(), error = %e, "cannot unpin link"),
                    Err(e) => warn!(path = %path.display(), error = %e, "not a pinned link"),
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        let _ = std::fs::remove_dir(&dir);
        info!(dir = %dir.display(), "removed pinned programs/maps of another build or configuration");
    }
}

/// `detector unpin`: detach everything pinned under `root` and remove it.
pub fn unpin_all(root: &Path) -> Result<()> {
    anyhow::ensure!(
        root.is_dir(),
        "{} is not a directory (nothing pinned there)",
        root.display()
    );
    remove_pins(root, &[]);
    std::fs::remove_dir(root).with_context(|| format!("removing {}", root.display()))?;
    Ok(())
}

/// The kernel counts budgets per window of this length.
const BUDGET_WINDOW_NS: u64 = 100_000_000;

/// A per-second budget as a per-window limit (0 stays "unlimited").
fn per_window(per_second: u32) -> u32 {
    if per_second == 0 {
        return 0;
    }
    let windows = (1_000_000_000 / BUDGET_WINDOW_NS) as u32;
    (per_second / windows).max(1)
}

/// The two event rings: security-relevant events first.
pub struct Rings {
    pub alerts: RingBuf<MapData>,
    pub events: RingBuf<MapData>,
}

/// Maps userspace reads and writes.
pub struct KernelMaps {
    pub credentials: HashMap<MapData, CredentialKey, CredentialInfo>,
    pub holders: HashMap<MapData, u32, Holder>,
    /// Credential-read aggregation (the fanotify sensor folds re-reads
    /// into it as the open tracepoints do).
    pub cred_seen: HashMap<MapData, CredSeenKey, CredSeen>,
    pub cgroup_policy: HashMap<MapData, u64, CgroupPolicy>,
    pub allow4: LpmTrie<MapData, AllowKey4, AllowPorts>,
    pub allow6: LpmTrie<MapData, AllowKey6, AllowPorts>,
    pub deny_cgroup: HashMap<MapData, u64, DenyRule>,
    pub deny_tgid: HashMap<MapData, u32, DenyRule>,
    pub lost: PerCpuArray<MapData, u64>,
    pub emitted: PerCpuArray<MapData, u64>,
    /// Per-cgroup event budgets and drop counts (coverage).
    pub budget: PerCpuHashMap<MapData, u64, CgroupBudget>,
    /// Open counts at lease requests (the hybrid sensor's check of a new
    /// credential inode).
    pub open_counts: HashMap<MapData, CredentialKey, OpenCounts>,
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
    /// The state maps came from a previous daemon (pinned): their contents
    /// are live state to adopt, not empty maps.
    pub adopted: bool,
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
    pub fn load(offsets: KernelOffsets, cfg: &SensorConfig) -> Result<(Sensors, Rings)> {
        raise_memlock();
        ensure_tracefs();
        let program_config = ProgramConfig {
            enabled: 1,
            enforce: cfg.enforce as u32,
            connect_dedup_ns: cfg.connect_dedup_ns,
            wakeup_bytes: 256 * 1024,
            cred_dedup_ns: cfg.cred_dedup_ns,
            budget_window_ns: if cfg.cgroup_event_budget == 0 && cfg.cgroup_alert_budget == 0 {
                0
            } else {
                BUDGET_WINDOW_NS
            },
            budget_bulk: per_window(cfg.cgroup_event_budget),
            budget_urgent: per_window(cfg.cgroup_alert_budget),
            deny_rules: cfg.deny_rules as u32,
            nr_cpus: aya::util::nr_cpus()
                .map_or(MAX_CPUS, |n| n as u32)
                .min(MAX_CPUS),
        };
        let pins = match &cfg.pin_dir {
            Some(root) => {
                let layout = PinLayout::new(
                    root,
                    &program_config,
                    &offsets,
                    cfg.open_tracepoints as u8 | (cfg.lease_tracepoint as u8) << 1,
                );
                for d in [&layout.maps, &layout.links] {
                    std::fs::create_dir_all(d).with_context(|| {
                        format!("creating pin directory {} (is it on bpffs?)", d.display())
                    })?;
                }
                Some(layout)
            }
            None => None,
        };
        let adopted = pins
            .as_ref()
            .is_some_and(|p| p.maps.join(names::HOLDERS).exists());
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::OFFSETS, &offsets, true)
            .override_global(names::CONFIG, &program_config, true);
        if let Some(p) = &pins {
            for name in STATE_MAPS {
                // Opens the pinned map if there is one, else creates and pins it.
                loader.map_pin_path(name, p.maps.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
        let links_dir = pins.as_ref().map(|p| p.links.clone());
        // A pinned link of this very build and configuration: keep it.
        let pinned = |name: &str| -> bool {
            let Some(dir) = &links_dir else {
                return false;
            };
            let path = dir.join(name);
            path.exists()
                && match PinnedLink::from_pin(&path) {
                    Ok(_) => true,
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "stale pin; re-attaching");
                        let _ = std::fs::remove_file(&path);
                        false
                    }
                }
        };
        // Only called with a pin directory (links are taken only then).
        let pin = |name: &str, link: FdLink| -> Result<()> {
            if let Some(dir) = &links_dir {
                link.pin(dir.join(name))
                    .with_context(|| format!("pinning the link of {name}"))?;
            }
            Ok(())
        };

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
            attached.push(format!("tracepoint/{category}/{name}"));
            if pinned(name) {
                return Ok(());
            }
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            let id = prog
                .attach(category, name)
                .with_context(|| format!("attaching {category}/{name}"))?;
            if links_dir.is_some() {
                let link: FdLink = prog.take_link(id)?.try_into()?;
                pin(name, link)?;
            }
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
            attached.push(format!("raw_tracepoint/{name}"));
            if pinned(name) {
                continue;
            }
            let prog: &mut RawTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            let id = prog
                .attach(name)
                .with_context(|| format!("attaching raw_tp/{name}"))?;
            if links_dir.is_some() {
                pin(name, prog.take_link(id)?.into())?;
            }
        }

        if cfg.lease_tracepoint {
            // tp_btf: typed arguments, so the programs read kernel structs
            // with plain loads (see the programs). generic_add_lease only
            // where BTF names the inode's open counts.
            let with_counts = offsets.inode_i_readcount != 0 && offsets.inode_i_writecount != 0;
            let names = if with_counts {
                &["leases_conflict", "generic_add_lease"][..]
            } else {
                &["leases_conflict"][..]
            };
            for &name in names {
                attached.push(format!("tp_btf/{name}"));
                if pinned(name) {
                    continue;
                }
                let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
                let prog: &mut BtfTracePoint = ebpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("program {name} missing"))?
                    .try_into()?;
                prog.load(name, &btf)
                    .with_context(|| format!("loading {name}"))?;
                let id = prog
                    .attach()
                    .with_context(|| format!("attaching tp_btf/{name}"))?;
                if links_dir.is_some() {
                    pin(name, prog.take_link(id)?.into())?;
                }
            }
        }

        let cgroup = File::open(&cfg.cgroup_root)
            .with_context(|| format!("opening cgroup-v2 root {}", cfg.cgroup_root.display()))?;
        for name in ["connect4", "connect6", "sendmsg4", "sendmsg6"] {
            attached.push(format!("cgroup/{name}"));
            if pinned(name) {
                continue;
            }
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            let id = prog
                .attach(&cgroup, cgroup_attach_mode())
                .with_context(|| {
                    format!("attaching cgroup/{name} at {}", cfg.cgroup_root.display())
                })?;
            if links_dir.is_some() {
                let link: FdLink = prog.take_link(id)?.try_into()?;
                pin(name, link)?;
            }
        }
        // Ours are attached: now detach what other builds or configurations
        // left pinned (brief overlap, never a gap).
        if let (Some(root), Some(p)) = (&cfg.pin_dir, &pins) {
            remove_pins(root, &[&p.maps, &p.links]);
            info!(dir = %root.display(), adopted, "kernel programs and state maps pinned");
        }

        let rings = Rings {
            alerts: take(&mut ebpf, names::ALERTS)?,
            events: take(&mut ebpf, names::EVENTS)?,
        };
        let maps = KernelMaps {
            credentials: take(&mut ebpf, names::CREDENTIALS)?,
            holders: take(&mut ebpf, names::HOLDERS)?,
            cred_seen: take(&mut ebpf, names::CRED_SEEN)?,
            cgroup_policy: take(&mut ebpf, names::CGROUP_POLICY)?,
            allow4: take(&mut ebpf, names::ALLOW4)?,
            allow6: take(&mut ebpf, names::ALLOW6)?,
            deny_cgroup: take(&mut ebpf, names::DENY_CGROUP)?,
            deny_tgid: take(&mut ebpf, names::DENY_TGID)?,
            lost: take(&mut ebpf, names::LOST)?,
            emitted: take(&mut ebpf, names::EMITTED)?,
            budget: take(&mut ebpf, names::BUDGET)?,
            open_counts: take(&mut ebpf, names::OPEN_COUNTS)?,
        };
        Ok((
            Sensors {
                _ebpf: ebpf,
                maps,
                attached,
                adopted,
            },
            rings,
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
