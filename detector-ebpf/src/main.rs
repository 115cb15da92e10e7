//! Kernel programs of the detector.
//!
//! * credential access: syscall-exit tracepoints of every call that returns a
//!   new file descriptor; fd -> file -> inode -> (dev, ino) is looked up in
//!   `CREDENTIALS`, so the path string used never matters.
//! * lineage: fork copies holder state to the child, exec and exit report.
//! * egress: cgroup/connect4|6 and sendmsg4|6 at the cgroup-v2 root report
//!   destinations and apply the verdict (`decide`) in the kernel.
//!
//! Kernel struct offsets arrive in the `OFFSETS` global from userspace (read
//! from BTF at start-up): rustc emits no CO-RE relocations.
#![no_std]
#![no_main]

use core::{mem::size_of, ptr::addr_of_mut};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_task_btf,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_map_lookup_percpu_elem,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes, bpf_probe_read_user,
        bpf_send_signal, bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, cgroup_sock_addr, map, raw_tracepoint, tracepoint},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, SockAddrContext, TracePointContext},
    EbpfContext,
};
use detector_common::{
    decide, v4_mapped, AccessRoute, AllowKey4, AllowKey6, AllowPorts, CgroupBudget, CgroupEvent,
    CgroupPolicy, ConnectEvent, ConnectSeenKey, CredSeen, CredSeenKey, CredentialAccessEvent,
    CredentialInfo, CredentialKey, DecisionInput, DenyRule, EgressHook, EventHeader, EventKind,
    ExecEvent, ExitEvent, ForkEvent, Holder, KernelOffsets, OpenCounts, PolicyAction,
    ProgramConfig, Verdict, AF_INET, AF_INET6, COMM_LEN, EVENT_KINDS, FILENAME_LEN, MAX_CPUS,
};

// ---- configuration written by userspace before load -------------------------

#[no_mangle]
static OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };
#[no_mangle]
static CONFIG: ProgramConfig = unsafe { core::mem::zeroed() };

/// `v`, through a pointer the compiler cannot see into: the statics are
/// patched into .rodata at load time, so their compile-time zeros must not
/// be folded. Laundering the pointer (not copying the value out with a
/// volatile read) leaves each field a plain load where it is used, and
/// only the fields a program uses are loaded: the verifier still knows
/// the pointer as one into the frozen .rodata map, so what it loads there
/// are known constants to it.
#[inline(always)]
fn patched<T>(v: &'static T) -> &'static T {
    let p: *const T = v;
    unsafe { &*core::ptr::read_volatile(&p) }
}

#[inline(always)]
fn offsets() -> &'static KernelOffsets {
    patched(&OFFSETS)
}

#[inline(always)]
fn config() -> &'static ProgramConfig {
    patched(&CONFIG)
}

// ---- maps -------------------------------------------------------------------

/// Ordinary events: exec, fork, exit, cgroups, non-holders' connects.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);
/// Security-relevant events: credential reads, holders' and denied connects,
/// holders' execs. A flood of ordinary events cannot crowd them out.
#[map]
static ALERTS: RingBuf = RingBuf::with_byte_size(2 << 20, 0);
/// Per-cgroup, per-CPU event budget and drop counts (see `admit`).
#[map]
static BUDGET: LruPerCpuHashMap<u64, CgroupBudget> = LruPerCpuHashMap::with_max_entries(16384, 0);
/// Credential-read aggregation: (tgid, credential) -> last report.
#[map]
static CRED_SEEN: LruHashMap<CredSeenKey, CredSeen> = LruHashMap::with_max_entries(65536, 0);
/// The lease sensor's per-CPU memory of the last credential read reported
/// or folded here (see `fold_cached`).
#[map]
static READ_CACHE: PerCpuArray<ReadCache> = PerCpuArray::with_max_entries(1, 0);
#[map]
static CREDENTIALS: HashMap<CredentialKey, CredentialInfo> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);
#[map]
static HOLDERS: LruHashMap<u32, Holder> = LruHashMap::with_max_entries(65536, 0);
#[map]
static CGROUP_POLICY: HashMap<u64, CgroupPolicy> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);
#[map]
static ALLOW4: LpmTrie<AllowKey4, AllowPorts> = LpmTrie::with_max_entries(65536, BPF_F_NO_PREALLOC);
#[map]
static ALLOW6: LpmTrie<AllowKey6, AllowPorts> = LpmTrie::with_max_entries(65536, BPF_F_NO_PREALLOC);
#[map]
static DENY_CGROUP: HashMap<u64, DenyRule> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
static DENY_TGID: HashMap<u32, DenyRule> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
static CONNECT_SEEN: LruHashMap<ConnectSeenKey, u64> = LruHashMap::with_max_entries(65536, 0);
/// Per CPU, the last `CONNECT_SEEN` entry used here (see `connect_seen`).
#[map]
static CONNECT_LAST: PerCpuArray<ConnectLast> = PerCpuArray::with_max_entries(1, 0);
/// Open counts of the inodes leases were last asked for on (see
/// `generic_add_lease`).
#[map]
static OPEN_COUNTS: LruHashMap<CredentialKey, OpenCounts> = LruHashMap::with_max_entries(1024, 0);
/// Events that could not be delivered (ring buffer full), per kind.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_KINDS, 0);
/// Events delivered, per kind.
#[map]
static EMITTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_KINDS, 0);

const FMODE_READ: u32 = 1;
const SIGKILL: u32 = 9;
/// cgroup levels searched for a policy (kubepods/<qos>/pod<uid>/<ctr> is 4).
const MAX_CGROUP_DEPTH: i32 = 8;

// ---- small helpers ----------------------------------------------------------

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, kind: EventKind) {
    if let Some(p) = map.get_ptr_mut(kind as u32) {
        unsafe { *p += 1 };
    }
}

/// Wake-up flags for the ordinary ring: the reader polls on its timer unless
/// the ring is filling up. (The ALERTS ring always wakes it: flags 0.)
#[inline(always)]
fn submit_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > config().wakeup_bytes {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// The ring an event goes to.
#[inline(always)]
fn ring(urgent: bool) -> &'static RingBuf {
    if urgent {
        &ALERTS
    } else {
        &EVENTS
    }
}

#[inline(always)]
fn submit_flags_for(urgent: bool) -> u64 {
    if urgent {
        0
    } else {
        submit_flags()
    }
}

/// Per-cgroup budget: may this cgroup emit one more event in the current
/// window (on this CPU)? Over budget, the event is counted against the cgroup
/// instead, so userspace reports its coverage as degraded. Kernel-side state
/// (holders, verdicts, kills) is updated whether or not the event is admitted.
#[inline(always)]
fn admit(cgroup_id: u64, urgent: bool) -> bool {
    let cfg = config();
    if cfg.budget_window_ns == 0 {
        return true;
    }
    let limit = if urgent {
        cfg.budget_urgent
    } else {
        cfg.budget_bulk
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(b) = BUDGET.get_ptr_mut(&cgroup_id) else {
        let fresh = CgroupBudget {
            window_start_ns: now,
            bulk_used: (!urgent) as u32,
            urgent_used: urgent as u32,
            dropped: 0,
            dropped_urgent: 0,
        };
        let _ = BUDGET.insert(&cgroup_id, &fresh, 0);
        return true;
    };
    // Per-CPU value: no other CPU writes it, plain updates are exact.
    let b = unsafe { &mut *b };
    if now.wrapping_sub(b.window_start_ns) >= cfg.budget_window_ns {
        b.window_start_ns = now;
        b.bulk_used = 0;
        b.urgent_used = 0;
    }
    let used = if urgent {
        &mut b.urgent_used
    } else {
        &mut b.bulk_used
    };
    if limit != 0 && *used >= limit {
        b.dropped += 1;
        if urgent {
            b.dropped_urgent += 1;
        }
        return false;
    }
    *used += 1;
    true
}

/// An admitted event found the ring full: count it per kind and against the
/// cgroup, like an over-budget one.
#[inline(always)]
fn lost(kind: EventKind, cgroup_id: u64, urgent: bool) {
    bump(&LOST, kind);
    if let Some(b) = BUDGET.get_ptr_mut(&cgroup_id) {
        let b = unsafe { &mut *b };
        b.dropped += 1;
        if urgent {
            b.dropped_urgent += 1;
        }
    }
}

#[inline(always)]
unsafe fn read_at<T>(base: *const u8, off: u32) -> Result<T, i64> {
    bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T).map_err(|e| e as i64)
}

#[inline(always)]
fn header(kind: EventKind) -> EventHeader {
    let mut h = header_without_cgroup(kind);
    h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    h
}

/// `header` with `cgroup_id` 0, for a caller that may not need it.
#[inline(always)]
fn header_without_cgroup(kind: EventKind) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u16,
        _pad0: 0,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        _pad1: 0,
        time_ns: unsafe { bpf_ktime_get_boot_ns() },
        cgroup_id: 0,
    }
}

#[inline(always)]
fn comm() -> [u8; COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; COMM_LEN])
}

/// `current->real_parent->tgid`, 0 if unreadable.
#[inline(always)]
fn current_ppid(off: &KernelOffsets) -> u32 {
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        match read_at::<*const u8>(task, off.task_real_parent) {
            Ok(parent) => read_at::<u32>(parent, off.task_tgid).unwrap_or(0),
            Err(_) => 0,
        }
    }
}

// ---- credential access ------------------------------------------------------

/// Resolves fd -> (file, (dev, ino)) in the current task's fd table.
#[inline(always)]
unsafe fn file_identity(off: &KernelOffsets, fd: u64) -> Result<(*const u8, CredentialKey), i64> {
    let task = bpf_get_current_task() as *const u8;
    let files: *const u8 = read_at(task, off.task_files)?;
    let fdt: *const u8 = read_at(files, off.files_fdt)?;
    let max_fds: u32 = read_at(fdt, off.fdtable_max_fds)?;
    if fd >= max_fds as u64 {
        return Err(-1);
    }
    let fd_array: *const *const u8 = read_at(fdt, off.fdtable_fd)?;
    let file: *const u8 = bpf_probe_read_kernel(fd_array.wrapping_add(fd as usize))?;
    Ok((file, file_key(off, file)?))
}

/// file -> inode -> (dev, ino).
#[inline(always)]
unsafe fn file_key(off: &KernelOffsets, file: *const u8) -> Result<CredentialKey, i64> {
    let inode: *const u8 = read_at(file, off.file_f_inode)?;
    let ino: u64 = read_at(inode, off.inode_i_ino)?;
    let sb: *const u8 = read_at(inode, off.inode_i_sb)?;
    let dev: u32 = read_at(sb, off.super_block_s_dev)?;
    Ok(CredentialKey {
        dev: dev as u64,
        ino,
    })
}

/// `TOKEN=$(cat token); curl …`: the reader hands the credential to its
/// parent through a pipe, and the parent starts the next program. A parent in
/// the same cgroup becomes a holder too (unless it already is), at the moment
/// of the read, so what it starts next inherits the credential. The cgroup
/// check keeps container runtimes and other host parents out.
#[inline(always)]
fn taint_parent(off: &KernelOffsets, hdr: &EventHeader, holder: &Holder) {
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let Ok(parent) = read_at::<*const u8>(task, off.task_real_parent) else {
            return;
        };
        let Ok(ptgid) = read_at::<u32>(parent, off.task_tgid) else {
            return;
        };
        if ptgid <= 1 || ptgid == hdr.tgid || HOLDERS.get(&ptgid).is_some() {
            return;
        }
        let Ok(css) = read_at::<*const u8>(parent, off.task_cgroups) else {
            return;
        };
        let Ok(cgrp) = read_at::<*const u8>(css, off.css_set_dfl_cgrp) else {
            return;
        };
        let Ok(kn) = read_at::<*const u8>(cgrp, off.cgroup_kn) else {
            return;
        };
        let Ok(id) = read_at::<u64>(kn, off.kernfs_node_id) else {
            return;
        };
        if id == hdr.cgroup_id {
            let _ = HOLDERS.insert(&ptgid, holder, 0);
        }
    }
}

#[inline(always)]
fn on_fd_returned(ctx: &TracePointContext, route: AccessRoute) -> u32 {
    // sys_exit_*: `long ret` at offset 16 (after common fields and __syscall_nr).
    let ret: i64 = match unsafe { ctx.read_at::<i64>(16) } {
        Ok(r) => r,
        Err(_) => return 0,
    };
    if ret < 0 || config().enabled == 0 {
        return 0;
    }
    let off = offsets();
    let (file, key) = match unsafe { file_identity(&off, ret as u64) } {
        Ok(v) => v,
        Err(_) => return 0,
    };
    let info = match unsafe { CREDENTIALS.get(&key) } {
        Some(i) => *i,
        None => return 0,
    };
    // Only a credential's mode is needed: one read less for every other open.
    let Ok(f_mode) = (unsafe { read_at::<u32>(file, off.file_f_mode) }) else {
        return 0;
    };
    let _ = credential_opened(&off, key, info, f_mode, || route, ret as i32);
    0
}

/// A credential was opened by the current task: holder state, re-read
/// aggregation, and the event.
#[inline(always)]
fn credential_opened(
    off: &KernelOffsets,
    key: CredentialKey,
    info: CredentialInfo,
    f_mode: u32,
    route: impl FnOnce() -> AccessRoute,
    fd: i32,
) -> Option<u64> {
    // The cgroup id is fetched only when needed: not for a folded re-read.
    let mut hdr = header_without_cgroup(EventKind::CredentialAccess);
    // A re-read by a holder of this very credential changes nothing here
    // (its parent was looked at on its first read): one lookup instead of
    // an LRU update and the parent walk on every re-open.
    if f_mode & FMODE_READ != 0
        && !unsafe { HOLDERS.get(&hdr.tgid) }.is_some_and(|h| h.credential_id == info.id)
    {
        hdr.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        let holder = Holder {
            credential_id: info.id,
            origin_tgid: hdr.tgid,
            since_ns: hdr.time_ns,
        };
        let _ = HOLDERS.insert(&hdr.tgid, &holder, 0);
        taint_parent(off, &hdr, &holder);
    }
    // Aggregate re-reads by the same process (client-go's periodic re-read,
    // or a flood) into one report per window; the count stays exact. Only
    // reads: a read must never be folded into a write-only open's report
    // (kubelet's, or an evader's), which is not judged as a read.
    let mut repeats = 0;
    let mut window_start = None;
    let window = config().cred_dedup_ns;
    if window != 0 && f_mode & FMODE_READ != 0 {
        let key = CredSeenKey {
            tgid: hdr.tgid,
            credential_id: info.id,
        };
        match CRED_SEEN.get_ptr_mut(&key) {
            Some(seen) => {
                let seen = unsafe { &mut *seen };
                if hdr.time_ns.wrapping_sub(seen.last_report_ns) < window {
                    seen.suppressed += 1;
                    return Some(seen.last_report_ns);
                }
                repeats = seen.suppressed;
                seen.suppressed = 0;
                seen.last_report_ns = hdr.time_ns;
            }
            None => {
                let seen = CredSeen {
                    last_report_ns: hdr.time_ns,
                    suppressed: 0,
                    _pad: 0,
                };
                let _ = CRED_SEEN.insert(&key, &seen, 0);
            }
        }
        window_start = Some(hdr.time_ns);
    }
    if hdr.cgroup_id == 0 {
        hdr.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    }
    if !admit(hdr.cgroup_id, true) {
        return window_start;
    }
    let Some(mut entry) = ALERTS.reserve::<CredentialAccessEvent>(0) else {
        lost(EventKind::CredentialAccess, hdr.cgroup_id, true);
        return window_start;
    };
    let uid_gid = bpf_get_current_uid_gid();
    entry.write(CredentialAccessEvent {
        header: hdr,
        ppid: current_ppid(off),
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        credential_id: info.id,
        dev: key.dev,
        ino: key.ino,
        f_mode,
        route: route() as u16,
        _pad0: 0,
        fd,
        repeats,
        comm: comm(),
    });
    entry.submit(0);
    bump(&EMITTED, EventKind::CredentialAccess);
    window_start
}

#[tracepoint]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    on_fd_returned(&ctx, AccessRoute::Open)
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    on_fd_returned(&ctx, AccessRoute::Openat)
}

#[tracepoint]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    on_fd_returned(&ctx, AccessRoute::Openat2)
}

#[tracepoint]
pub fn sys_exit_creat(ctx: TracePointContext) -> u32 {
    on_fd_returned(&ctx, AccessRoute::Creat)
}

#[tracepoint]
pub fn sys_exit_open_by_handle_at(ctx: TracePointContext) -> u32 {
    on_fd_returned(&ctx, AccessRoute::OpenByHandleAt)
}

#[tracepoint]
pub fn sys_exit_pidfd_getfd(ctx: TracePointContext) -> u32 {
    on_fd_returned(&ctx, AccessRoute::PidfdGetfd)
}

// ---- credential access: lease sensor ---------------------------------------

const F_RDLCK: u8 = 0;
const FMODE_WRITE: u32 = 2;

/// leases_conflict(bool conflict, lease, breaker), a BTF tracepoint the
/// kernel's open path (`break_lease` in `do_dentry_open`) fires for every
/// lease on the inode being opened, in the opener's context and before the
/// open returns. The daemon holds a read lease on every credential file, and
/// only on those: other opens never get here, so they pay nothing, and no
/// syscall tracepoint is needed.
///
/// tp_btf rather than raw_tp: the arguments are typed kernel pointers, and
/// with the offsets frozen in `.rodata` the verifier sees them as constants,
/// so lease -> file -> inode -> (dev, ino) are plain loads instead of five
/// `bpf_probe_read_kernel` calls (about half of this program's cost).
#[btf_tracepoint(function = "leases_conflict")]
pub fn leases_conflict(ctx: BtfTracePointContext) -> i32 {
    let cfg = config();
    let off = offsets();
    if cfg.enabled == 0 || off.lease_file == 0 {
        return 0;
    }
    let lease: *const u8 = ctx.arg(1);
    let breaker: *const u8 = ctx.arg(2);
    // Only an open (or truncate) breaks a lease as a lease; unlink, rename,
    // link and setattr break delegations, and walk our lease too. kubelet
    // deleting a rotated token is not a read of it. The kinds are compared
    // with our own lease's flags, not with FL_* values (renumbered in newer
    // kernels): an open's breaker is a lease like ours, a delegation
    // break's is not.
    let kind = |l: *const u8| unsafe { load::<u32>(l, off.lease_flags) };
    if kind(breaker) & kind(lease) == 0 {
        return 0;
    }
    // No check that it is a lease (not an nfsd delegation): only the
    // credential map decides, and it holds only files we leased.
    let (inode, key) = unsafe {
        let file: *const u8 = load(lease, off.lease_file);
        let inode: *const u8 = load(file, off.file_f_inode);
        let sb: *const u8 = load(inode, off.inode_i_sb);
        let key = CredentialKey {
            dev: load::<u32>(sb, off.super_block_s_dev) as u64,
            ino: load(inode, off.inode_i_ino),
        };
        (inode, key)
    };
    let read_only = unsafe { load::<u8>(breaker, off.lease_type) } == F_RDLCK;
    if read_only && fold_cached(inode) {
        return 0;
    }
    let Some(info) = (unsafe { CREDENTIALS.get(&key) }).copied() else {
        return 0;
    };
    if read_only {
        // The kernel's own word: read-only. The syscall is looked up only
        // if the open is reported (not for a re-read folded in the kernel).
        flush_read_cache();
        let route = || syscall_open(&off).map_or(AccessRoute::AnyOpen, |(r, _)| r);
        if let Some(window_start) = credential_opened(&off, key, info, FMODE_READ, route, -1) {
            remember_read(inode, info.id, window_start);
        }
    } else {
        // Written to: the syscall's flags say whether it reads too. Not a
        // syscall of the open family (io_uring, exec): it may read, so it
        // counts as a read.
        let (route, mode) = syscall_open(&off).unwrap_or((AccessRoute::AnyOpen, FMODE_READ));
        let _ = credential_opened(&off, key, info, mode | FMODE_WRITE, || route, -1);
    }
    0
}

/// generic_add_lease(inode, lease): a lease is asked for, before the kernel
/// checks the inode's opens for a conflict. The hybrid sensor asks for one
/// on a new credential inode at the moment it marks it, while the open
/// that created it waits (nothing written yet): the counts then tell
/// whether anybody else already had it open. Fires for lease requests
/// only, which are rare.
#[btf_tracepoint(function = "generic_add_lease")]
pub fn generic_add_lease(ctx: BtfTracePointContext) -> i32 {
    let cfg = config();
    let off = offsets();
    if cfg.enabled == 0 || off.inode_i_readcount == 0 || off.inode_i_writecount == 0 {
        return 0;
    }
    let inode: *const u8 = ctx.arg(0);
    let (key, counts) = unsafe {
        let sb: *const u8 = load(inode, off.inode_i_sb);
        (
            CredentialKey {
                dev: load::<u32>(sb, off.super_block_s_dev) as u64,
                ino: load(inode, off.inode_i_ino),
            },
            OpenCounts {
                readers: load(inode, off.inode_i_readcount),
                writers: load(inode, off.inode_i_writecount),
            },
        )
    };
    let _ = OPEN_COUNTS.insert(&key, &counts, 0);
    0
}

/// What `READ_CACHE` holds: this task (of process `tgid`) read this inode
/// (credential `credential_id`) and was recorded as its holder; until
/// `until_ns` (the end of its `CRED_SEEN` window) its re-reads are counted
/// in `count`, which goes to `CRED_SEEN` when the slot is reused and to the
/// exit event when the process ends.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ReadCache {
    task: u64,
    inode: u64,
    until_ns: u64,
    tgid: u32,
    credential_id: u32,
    count: u32,
    _pad: u32,
}

/// A read-only re-open by the task whose read of the same inode this CPU
/// saw last, within that read's aggregation window: counted in this CPU's
/// slot, with no helper call but the clock and no hash lookup. Sound
/// because the slot is written only after `credential_opened` recorded
/// this very task as a holder. The task pointer, not the pid, names the
/// task: a recycled pid is a new task and misses.
#[inline(always)]
fn fold_cached(inode: *const u8) -> bool {
    let Some(c) = READ_CACHE.get_ptr_mut(0) else {
        return false;
    };
    let c = unsafe { &mut *c };
    if c.inode != inode as u64
        || c.task != unsafe { bpf_get_current_task() }
        || unsafe { bpf_ktime_get_boot_ns() } >= c.until_ns
    {
        return false;
    }
    c.count += 1;
    true
}

/// Before the slot is reused: its count joins `CRED_SEEN`, so the next
/// report (or the exit) carries it.
#[inline(always)]
fn flush_read_cache() {
    let Some(c) = READ_CACHE.get_ptr_mut(0) else {
        return;
    };
    let c = unsafe { &mut *c };
    if c.count != 0 {
        let key = CredSeenKey {
            tgid: c.tgid,
            credential_id: c.credential_id,
        };
        match CRED_SEEN.get_ptr_mut(&key) {
            Some(seen) => unsafe { (*seen).suppressed += c.count },
            None => {
                // Evicted meanwhile: a window long past, reported next.
                let seen = CredSeen {
                    last_report_ns: 0,
                    suppressed: c.count,
                    _pad: 0,
                };
                let _ = CRED_SEEN.insert(&key, &seen, 0);
            }
        }
    }
    c.count = 0;
    c.task = 0;
}

/// After a read-only open went through `credential_opened`, whose window
/// started at `window_start`.
#[inline(always)]
fn remember_read(inode: *const u8, credential_id: u32, window_start: u64) {
    if let Some(c) = READ_CACHE.get_ptr_mut(0) {
        unsafe {
            *c = ReadCache {
                task: bpf_get_current_task(),
                inode: inode as u64,
                until_ns: window_start.wrapping_add(config().cred_dedup_ns),
                tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
                credential_id,
                count: 0,
                _pad: 0,
            }
        };
    }
}

/// At a holder's exit: what the per-CPU slots still count for it (of its
/// credential `holder`), and the slots freed.
#[inline(always)]
fn take_cached_reads(tgid: u32, holder: u32) -> u32 {
    let cpus = config().nr_cpus;
    let mut total = 0u32;
    let mut cpu = 0u32;
    while cpu < cpus && cpu < MAX_CPUS {
        let key = 0u32;
        let p = unsafe {
            bpf_map_lookup_percpu_elem(
                &READ_CACHE as *const _ as *mut core::ffi::c_void,
                &key as *const u32 as *const core::ffi::c_void,
                cpu,
            )
        } as *mut ReadCache;
        if !p.is_null() {
            let c = unsafe { &mut *p };
            if c.tgid == tgid && c.task != 0 {
                if c.credential_id == holder {
                    total += c.count;
                }
                c.count = 0;
                c.task = 0;
            }
        }
        cpu += 1;
    }
    total
}

/// A direct load of `*(base + off)` from a BTF-typed kernel pointer (the
/// tp_btf program's arguments, `bpf_get_current_task_btf()` and what they
/// point to; a fault reads as zero). `off` must be a verifier-known constant, as
/// the `.rodata` offsets are, and name a field of exactly `T`'s size.
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, off: u32) -> T {
    core::ptr::read_volatile(base.wrapping_add(off as usize) as *const T)
}

/// x86_64 syscall numbers of the open family.
const NR_OPEN: u64 = 2;
const NR_CREAT: u64 = 85;
const NR_OPENAT: u64 = 257;
const NR_OPEN_BY_HANDLE_AT: u64 = 304;
const NR_OPENAT2: u64 = 437;
/// Offsets in x86_64's `struct pt_regs` (a fixed ABI) of orig_ax, si, dx.
const REG_ORIG_AX: u32 = 15 * 8;
const REG_SI: u32 = 13 * 8;
const REG_DX: u32 = 12 * 8;
const O_ACCMODE: u64 = 3;

/// The open-family syscall the current task is in, and the access mode its
/// flags ask for (FMODE_READ / FMODE_WRITE), from its saved user registers.
/// None for anything else (io_uring's workers, exec).
#[inline(always)]
fn syscall_open(off: &KernelOffsets) -> Option<(AccessRoute, u32)> {
    if off.regs_x86_64 == 0 {
        return None;
    }
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        let nr: u64 = load(regs, REG_ORIG_AX);
        let (route, flags) = match nr {
            NR_OPEN => (AccessRoute::Open, load::<u64>(regs, REG_SI)),
            NR_OPENAT => (AccessRoute::Openat, load::<u64>(regs, REG_DX)),
            NR_OPEN_BY_HANDLE_AT => (AccessRoute::OpenByHandleAt, load::<u64>(regs, REG_DX)),
            NR_CREAT => (AccessRoute::Creat, 1),
            NR_OPENAT2 => {
                // struct open_how { u64 flags; ... } in user memory.
                let how: *const u64 = load(regs, REG_DX);
                (AccessRoute::Openat2, bpf_probe_read_user(how).ok()?)
            }
            _ => return None,
        };
        let mode = match flags & O_ACCMODE {
            0 => FMODE_READ,
            1 => FMODE_WRITE,
            _ => FMODE_READ | FMODE_WRITE,
        };
        Some((route, mode))
    }
}

// ---- lineage ----------------------------------------------------------------

/// raw_tp sched_process_fork(struct task_struct *parent, struct task_struct *child)
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    if config().enabled == 0 {
        return 0;
    }
    let off = offsets();
    let parent: *const u8 = ctx.arg(0);
    let child: *const u8 = ctx.arg(1);
    let (child_pid, child_tgid, parent_tgid) = unsafe {
        match (
            read_at::<u32>(child, off.task_pid),
            read_at::<u32>(child, off.task_tgid),
            read_at::<u32>(parent, off.task_tgid),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            _ => return 0,
        }
    };
    if child_pid != child_tgid {
        return 0; // a new thread shares its process's holder state already
    }
    let mut inherited = 0;
    if let Some(h) = unsafe { HOLDERS.get(&parent_tgid) } {
        let h = *h;
        inherited = h.credential_id;
        let _ = HOLDERS.insert(&child_tgid, &h, 0);
    }
    let mut hdr = header(EventKind::Fork);
    hdr.pid = child_pid;
    hdr.tgid = child_tgid;
    if !admit(hdr.cgroup_id, false) {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<ForkEvent>(0) else {
        lost(EventKind::Fork, hdr.cgroup_id, false);
        return 0;
    };
    entry.write(ForkEvent {
        header: hdr,
        parent_tgid,
        inherited_credential: inherited,
        comm: comm(),
    });
    entry.submit(submit_flags());
    bump(&EMITTED, EventKind::Fork);
    0
}

/// tracepoint sched/sched_process_exec: `__data_loc char[] filename` at 8.
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    if config().enabled == 0 {
        return 0;
    }
    let off = offsets();
    let hdr = header(EventKind::Exec);
    let holder = unsafe { HOLDERS.get(&hdr.tgid) }
        .map(|h| h.credential_id)
        .unwrap_or(0);
    let loc: u32 = unsafe { ctx.read_at(8) }.unwrap_or(0);
    let urgent = holder != 0;
    if !admit(hdr.cgroup_id, urgent) {
        return 0;
    }
    let Some(mut entry) = ring(urgent).reserve::<ExecEvent>(0) else {
        lost(EventKind::Exec, hdr.cgroup_id, urgent);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    let uid_gid = bpf_get_current_uid_gid();
    unsafe {
        addr_of_mut!((*ev).header).write(hdr);
        addr_of_mut!((*ev).ppid).write(current_ppid(&off));
        addr_of_mut!((*ev).uid).write(uid_gid as u32);
        addr_of_mut!((*ev).holder_credential).write(holder);
        addr_of_mut!((*ev).comm).write(comm());
        let name = &mut *addr_of_mut!((*ev).filename);
        let src = (ctx.as_ptr() as *const u8).wrapping_add((loc & 0xffff) as usize);
        let len = match bpf_probe_read_kernel_str_bytes(src, name) {
            Ok(s) => s.len() as u32 + 1,
            Err(_) => {
                name[0] = 0;
                0
            }
        };
        addr_of_mut!((*ev).filename_len).write(len);
    }
    entry.submit(submit_flags_for(urgent));
    bump(&EMITTED, EventKind::Exec);
    0
}

/// raw_tp sched_process_exit runs in the exiting task's context.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    if config().enabled == 0 {
        return 0;
    }
    let hdr = header(EventKind::Exit);
    if hdr.pid != hdr.tgid {
        return 0; // a thread, not the process
    }
    let holder = unsafe { HOLDERS.get(&hdr.tgid) }
        .map(|h| h.credential_id)
        .unwrap_or(0);
    let mut unreported = 0;
    if holder != 0 {
        let _ = HOLDERS.remove(&hdr.tgid);
        // Reads still inside the aggregation window leave with the process.
        let key = CredSeenKey {
            tgid: hdr.tgid,
            credential_id: holder,
        };
        if let Some(seen) = unsafe { CRED_SEEN.get(&key) } {
            unreported = seen.suppressed;
            let _ = CRED_SEEN.remove(&key);
        }
        // Only the lease sensor's program fills the per-CPU slots.
        if offsets().lease_file != 0 {
            unreported += take_cached_reads(hdr.tgid, holder);
        }
    }
    // A deny rule names a process, not a pid number that will be reused.
    if config().deny_rules != 0 {
        let _ = DENY_TGID.remove(&hdr.tgid);
    }
    let urgent = unreported != 0;
    if !admit(hdr.cgroup_id, urgent) {
        return 0;
    }
    let Some(mut entry) = ring(urgent).reserve::<ExitEvent>(0) else {
        lost(EventKind::Exit, hdr.cgroup_id, urgent);
        return 0;
    };
    entry.write(ExitEvent {
        header: hdr,
        holder_credential: holder,
        unreported_reads: unreported,
    });
    entry.submit(submit_flags_for(urgent));
    bump(&EMITTED, EventKind::Exit);
    0
}

/// tracepoint cgroup/cgroup_mkdir|rmdir: root@8, level@12, id@16, path@24.
#[inline(always)]
fn on_cgroup(ctx: &TracePointContext, kind: EventKind) -> u32 {
    if config().enabled == 0 {
        return 0;
    }
    let root: i32 = unsafe { ctx.read_at(8) }.unwrap_or(-1);
    if root != 0 {
        return 0; // cgroup-v1 hierarchies: ids there are not what events carry
    }
    let hdr = header(kind);
    if !admit(hdr.cgroup_id, false) {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<CgroupEvent>(0) else {
        lost(kind, hdr.cgroup_id, false);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        addr_of_mut!((*ev).header).write(hdr);
        addr_of_mut!((*ev).id).write(ctx.read_at::<u64>(16).unwrap_or(0));
        addr_of_mut!((*ev).root).write(root);
        addr_of_mut!((*ev).level).write(ctx.read_at::<i32>(12).unwrap_or(0));
        addr_of_mut!((*ev)._pad).write(0);
        let loc: u32 = ctx.read_at(24).unwrap_or(0);
        let path = &mut *addr_of_mut!((*ev).path);
        let src = (ctx.as_ptr() as *const u8).wrapping_add((loc & 0xffff) as usize);
        let len = match bpf_probe_read_kernel_str_bytes(src, path) {
            Ok(s) => s.len() as u32 + 1,
            Err(_) => {
                path[0] = 0;
                0
            }
        };
        addr_of_mut!((*ev).path_len).write(len);
    }
    entry.submit(submit_flags());
    bump(&EMITTED, kind);
    0
}

#[tracepoint]
pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    on_cgroup(&ctx, EventKind::CgroupMkdir)
}

#[tracepoint]
pub fn cgroup_rmdir(ctx: TracePointContext) -> u32 {
    on_cgroup(&ctx, EventKind::CgroupRmdir)
}

// ---- egress -----------------------------------------------------------------

#[inline(always)]
fn rule_action(rule: Option<&DenyRule>) -> Option<PolicyAction> {
    rule.map(|r| PolicyAction::from_u32(r.action))
}

/// Deepest cgroup policy on the path from the root to the current cgroup.
/// A policy set on a pod's cgroup covers containers created after it, before
/// userspace has seen them.
#[inline(always)]
fn policy_for(leaf: u64) -> Option<CgroupPolicy> {
    if let Some(p) = unsafe { CGROUP_POLICY.get(&leaf) } {
        return Some(*p);
    }
    let mut found = None;
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == leaf {
            break;
        }
        if let Some(p) = unsafe { CGROUP_POLICY.get(&id) } {
            found = Some(*p);
        }
        level += 1;
    }
    found
}

/// The current process's tgid and cgroup-v2 id (`bpf_get_current_cgroup_id`'s
/// value: `task->cgroups->dfl_cgrp->kn->id`) by direct loads from the BTF
/// task pointer: on the path every connect of the node takes, two helper
/// calls fewer (each ~80 ns on this VM, where every return goes through
/// the SRSO thunk; the task pointer itself is inlined by the JIT).
#[inline(always)]
fn current_tgid_and_cgroup(off: &KernelOffsets) -> (u32, u64) {
    unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        let tgid: u32 = load(task, off.task_tgid);
        let css: *const u8 = load(task, off.task_cgroups);
        let cgrp: *const u8 = load(css, off.css_set_dfl_cgrp);
        let kn: *const u8 = load(cgrp, off.cgroup_kn);
        (tgid, load(kn, off.kernfs_node_id))
    }
}

/// Decide, report and enforce one egress. Returns 1 (allow) or 0 (EPERM).
#[inline(always)]
fn on_egress(ctx: &SockAddrContext, hook: EgressHook) -> i32 {
    let cfg = config();
    if cfg.enabled == 0 {
        return 1;
    }
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    // Built as words, not bytes: a zeroed byte array costs a call to a
    // byte-by-byte memset subprogram on every connect.
    let words = match hook {
        EgressHook::Connect4 | EgressHook::Sendmsg4 => [sa.user_ip4, 0, 0, 0],
        EgressHook::Connect6 | EgressHook::Sendmsg6 => sa.user_ip6,
    };
    // SAFETY: [u32; 4] and [u8; 16] have the same size; any bytes are valid.
    let mut addr: [u8; 16] = unsafe { core::mem::transmute(words) };
    let mut family = AF_INET;
    if matches!(hook, EgressHook::Connect6 | EgressHook::Sendmsg6) {
        match v4_mapped(&addr) {
            Some(_) => addr = unsafe { core::mem::transmute([words[3], 0, 0, 0]) },
            None => family = AF_INET6,
        }
    }
    let protocol = sa.protocol as u8;
    let (tgid, cgroup_id) = current_tgid_and_cgroup(&offsets());

    let holder = unsafe { HOLDERS.get(&tgid) }
        .map(|h| h.credential_id)
        .unwrap_or(0);
    let policy = if holder != 0 {
        policy_for(cgroup_id)
    } else {
        None
    };
    let allowed: Option<&AllowPorts> = match policy {
        None => None,
        Some(p) if family == AF_INET => {
            let key = Key::new(
                64,
                AllowKey4 {
                    policy_id_be: p.policy_id.to_be_bytes(),
                    addr: [addr[0], addr[1], addr[2], addr[3]],
                },
            );
            ALLOW4.get(&key)
        }
        Some(p) => {
            let key = Key::new(
                160,
                AllowKey6 {
                    policy_id_be: p.policy_id.to_be_bytes(),
                    addr,
                },
            );
            ALLOW6.get(&key)
        }
    };
    // Two hash lookups saved on every connect where no rule exists.
    let (deny_process, deny_cgroup) = if cfg.deny_rules != 0 {
        (
            rule_action(unsafe { DENY_TGID.get(&tgid) }),
            rule_action(unsafe { DENY_CGROUP.get(&cgroup_id) }),
        )
    } else {
        (None, None)
    };
    let (verdict, reason) = decide(&DecisionInput {
        enforce: cfg.enforce != 0,
        deny_process,
        deny_cgroup,
        is_holder: holder != 0,
        policy: policy.map(|p| PolicyAction::from_u32(p.action)),
        allowed,
        port,
    });

    let notable = holder != 0 || verdict != Verdict::Allowed;
    if !notable && cfg.connect_dedup_ns != 0 {
        let key = ConnectSeenKey {
            cgroup_id,
            tgid,
            port,
            family,
            addr,
        };
        if connect_seen(&key, cfg.connect_dedup_ns) {
            return 1;
        }
    }

    if verdict == Verdict::Killed {
        unsafe { bpf_send_signal(SIGKILL) };
    }
    if !admit(cgroup_id, notable) {
        return allow_or_deny(verdict);
    }
    match ring(notable).reserve::<ConnectEvent>(0) {
        Some(mut entry) => {
            let mut hdr = header_without_cgroup(EventKind::Connect);
            hdr.cgroup_id = cgroup_id;
            entry.write(ConnectEvent {
                header: hdr,
                family,
                port,
                protocol,
                hook: hook as u8,
                verdict: verdict as u8,
                reason: reason as u8,
                holder_credential: holder,
                addr,
                comm: comm(),
            });
            entry.submit(submit_flags_for(notable));
            bump(&EMITTED, EventKind::Connect);
        }
        None => lost(EventKind::Connect, cgroup_id, notable),
    }
    allow_or_deny(verdict)
}

/// A copy of one `CONNECT_SEEN` entry: `key` was last reported at `seen_ns`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectLast {
    key: ConnectSeenKey,
    seen_ns: u64,
}

/// Whether this ordinary connect repeats one reported less than `window`
/// ago (then it is not reported again); otherwise it is recorded as
/// reported now. A process repeating one connect, the common case, is
/// answered from this CPU's copy of its entry without the LRU lookup (a
/// helper call, ~80 ns here). The copy only ever holds what `CONNECT_SEEN`
/// holds for its key (nothing else writes that map), so the answer is the
/// same as the map's.
#[inline(always)]
fn connect_seen(key: &ConnectSeenKey, window: u64) -> bool {
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let slot = CONNECT_LAST.get_ptr_mut(0);
    if let Some(c) = slot {
        let c = unsafe { &*c };
        if c.key == *key && now.wrapping_sub(c.seen_ns) < window {
            return true;
        }
    }
    let (seen, seen_ns) = match unsafe { CONNECT_SEEN.get(key) } {
        Some(last) if now.wrapping_sub(*last) < window => (true, *last),
        _ => {
            let _ = CONNECT_SEEN.insert(key, &now, 0);
            (false, now)
        }
    };
    if let Some(c) = slot {
        unsafe {
            *c = ConnectLast { key: *key, seen_ns };
        }
    }
    seen
}

#[inline(always)]
fn allow_or_deny(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Denied | Verdict::Killed => 0,
        _ => 1,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    on_egress(&ctx, EgressHook::Connect4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    on_egress(&ctx, EgressHook::Connect6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    on_egress(&ctx, EgressHook::Sendmsg4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    on_egress(&ctx, EgressHook::Sendmsg6)
}

// Keep the event layouts in sync with the reader's length checks.
const _: () = assert!(size_of::<ExecEvent>() == 48 + 16 + FILENAME_LEN);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
