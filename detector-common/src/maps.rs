//! Keys and values of the maps shared by the kernel programs and userspace,
//! plus the start-up configuration userspace hands to the programs.

/// Key of the credentials map: file identity, independent of any path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CredentialKey {
    /// Kernel-internal `dev_t` of the superblock (`MAJOR << 20 | MINOR`).
    pub dev: u64,
    pub ino: u64,
}

/// Value of the credentials map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CredentialInfo {
    /// Non-zero id; userspace keeps the rich description (kind, owner pod…).
    pub id: u32,
    pub flags: u32,
}

/// Value of the holders map (key: tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    /// The credential most recently obtained (or inherited).
    pub credential_id: u32,
    /// The tgid that obtained it first-hand (itself, or an ancestor).
    pub origin_tgid: u32,
    /// When it was obtained or inherited (`bpf_ktime_get_boot_ns`).
    pub since_ns: u64,
}

/// Kernel-side policy for one cgroup (key: cgroup id), written by userspace
/// from the intents. The kernel consults it on every connect of a holder.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupPolicy {
    /// Index into the allow-lists (`AllowKey4::policy_id`).
    pub policy_id: u32,
    /// [`PolicyAction`](crate::PolicyAction) as u32.
    pub action: u32,
}

/// Key of the IPv4 destination allow-list (an LPM trie). The prefix length
/// counts the 32 bits of `policy_id` plus the address prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowKey4 {
    /// Big-endian so the trie matches it as the leading bits.
    pub policy_id_be: [u8; 4],
    pub addr: [u8; 4],
}

/// Key of the IPv6 destination allow-list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowKey6 {
    pub policy_id_be: [u8; 4],
    pub addr: [u8; 16],
}

/// Ports allowed for one destination prefix. `count == 0` means any port.
pub const MAX_PORTS: usize = 16;

/// The most CPUs whose per-CPU slots an exit looks through (the verifier
/// walks that loop once per CPU); `ProgramConfig::nr_cpus` is capped here.
pub const MAX_CPUS: u32 = 1024;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowPorts {
    pub count: u32,
    pub _pad: u32,
    pub ports: [u16; MAX_PORTS],
}

impl AllowPorts {
    pub const ANY: AllowPorts = AllowPorts {
        count: 0,
        _pad: 0,
        ports: [0; MAX_PORTS],
    };

    /// Verifier-friendly: constant bound, no slicing.
    #[inline(always)]
    pub fn allows(&self, port: u16) -> bool {
        if self.count == 0 {
            return true;
        }
        let mut i = 0;
        while i < MAX_PORTS {
            if (i as u32) < self.count && self.ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Manual deny list entry (key: cgroup id or tgid): deny every connect,
/// optionally killing the caller.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyRule {
    /// [`PolicyAction`](crate::PolicyAction) as u32 (Block or Kill).
    pub action: u32,
    pub _pad: u32,
}

/// Kernel struct field offsets, read from `/sys/kernel/btf/vmlinux` at
/// start-up and written into the programs' read-only globals, so one binary
/// runs on every kernel (rustc emits no CO-RE relocations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_f_inode: u32,
    pub file_f_mode: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub super_block_s_dev: u32,
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    /// `struct file_lease` (6.9+; `struct file_lock` before) -> the leased
    /// `struct file *`, for the lease sensor. 0 when BTF has neither.
    pub lease_file: u32,
    /// The breaker's type (F_RDLCK/F_WRLCK), in the same struct.
    pub lease_type: u32,
    /// Its `flc_flags` (`fl_flags`): which kind of break (an open's lease
    /// break, or a delegation break by unlink, rename, link, setattr).
    pub lease_flags: u32,
    /// 1 when the kernel is x86_64: the lease sensor reads the syscall and
    /// its open flags from the saved user registers (`struct pt_regs`),
    /// whose layout is that architecture's. 0 = the syscall is not named.
    pub regs_x86_64: u32,
    /// `inode.i_readcount` and `inode.i_writecount` (atomic_t): an inode's
    /// read-only and writing opens, for the hybrid sensor's check that
    /// nobody had a new credential open before it was marked. 0 when BTF
    /// lacks them (the check is then skipped).
    pub inode_i_readcount: u32,
    pub inode_i_writecount: u32,
}

/// `OPEN_COUNTS` value: an inode's open counts when a lease was last asked
/// for on it (`filelock:generic_add_lease`, which fires before the kernel
/// checks them for a conflict, so also when the lease is refused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenCounts {
    /// Read-only opens (`i_readcount`).
    pub readers: i32,
    /// Writing opens (`i_writecount`; negative: denied to writers).
    pub writers: i32,
}

/// Runtime switches for the programs (a read-only global).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramConfig {
    /// Non-zero once userspace has filled `KernelOffsets`; the programs do
    /// nothing before that.
    pub enabled: u32,
    /// 1 = enforce (block/kill as the maps say), 0 = observe only: the
    /// verdict is computed and reported but the connect is allowed.
    pub enforce: u32,
    /// Suppress repeated connect events of the same (tgid, destination) for
    /// this long; 0 = report every connect. Holders' connects and denied
    /// connects are always reported.
    pub connect_dedup_ns: u64,
    /// Ring-buffer bytes pending above which a low-priority event forces a
    /// wake-up of the reader (below it, the reader polls on a timer).
    pub wakeup_bytes: u64,
    /// In-kernel aggregation of credential reads: the same process re-opening
    /// the same credential within this long is counted, not reported; the
    /// count rides on its next report (`repeats`) or its exit event. 0 = off.
    pub cred_dedup_ns: u64,
    /// Per-cgroup event budget: at most `budget_bulk` ordinary and
    /// `budget_urgent` security-relevant events per window and CPU; the rest
    /// is dropped and counted against the cgroup (coverage degraded), so one
    /// flooding pod cannot crowd out another's events. 0 = unlimited.
    pub budget_window_ns: u64,
    pub budget_bulk: u32,
    pub budget_urgent: u32,
    /// Non-zero when userspace wrote deny rules (`--deny-cgroup`): only
    /// then do egress programs look them up, and exits clean them up.
    pub deny_rules: u32,
    /// Possible CPUs: how many per-CPU slots an exit looks through.
    pub nr_cpus: u32,
}

/// Value of the per-cgroup, per-CPU event budget (key: cgroup id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupBudget {
    pub window_start_ns: u64,
    pub bulk_used: u32,
    pub urgent_used: u32,
    /// Events of this cgroup not delivered (over budget or ring buffer full).
    pub dropped: u64,
    /// ... of which security-relevant (credential reads, holders' connects).
    pub dropped_urgent: u64,
}

/// Key of the credential-read aggregation LRU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CredSeenKey {
    pub tgid: u32,
    pub credential_id: u32,
}

/// Value of the credential-read aggregation LRU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CredSeen {
    /// When this (process, credential) was last reported.
    pub last_report_ns: u64,
    /// Opens since then that were counted but not reported.
    pub suppressed: u32,
    pub _pad: u32,
}

/// Key of the connect de-duplication LRU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectSeenKey {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub port: u16,
    pub family: u16,
    pub addr: [u8; 16],
}

/// Map names, shared so the loader and the programs cannot drift apart.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    /// Second ring for security-relevant events, so bulk floods cannot starve them.
    pub const ALERTS: &str = "ALERTS";
    pub const BUDGET: &str = "BUDGET";
    pub const CRED_SEEN: &str = "CRED_SEEN";
    pub const CREDENTIALS: &str = "CREDENTIALS";
    pub const HOLDERS: &str = "HOLDERS";
    pub const CGROUP_POLICY: &str = "CGROUP_POLICY";
    pub const ALLOW4: &str = "ALLOW4";
    pub const ALLOW6: &str = "ALLOW6";
    pub const DENY_CGROUP: &str = "DENY_CGROUP";
    pub const DENY_TGID: &str = "DENY_TGID";
    pub const LOST: &str = "LOST";
    pub const EMITTED: &str = "EMITTED";
    pub const CONNECT_SEEN: &str = "CONNECT_SEEN";
    pub const OPEN_COUNTS: &str = "OPEN_COUNTS";
    pub const OFFSETS: &str = "OFFSETS";
    pub const CONFIG: &str = "CONFIG";
}

/// Convert a userspace `st_dev` (glibc/new_encode_dev encoding) to the
/// kernel-internal `dev_t` found in `super_block::s_dev`.
pub fn kernel_dev_from_user(st_dev: u64) -> u64 {
    // glibc: major = bits 8..20 and 32..44, minor = bits 0..8 and 20..32.
    let major = ((st_dev >> 8) & 0xfff) | ((st_dev >> 32) & !0xfff);
    let minor = (st_dev & 0xff) | ((st_dev >> 12) & !0xff);
    ((major & 0xfff) << 20) | (minor & 0xfffff)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for CredentialKey {}
    unsafe impl aya::Pod for CredentialInfo {}
    unsafe impl aya::Pod for Holder {}
    unsafe impl aya::Pod for CgroupPolicy {}
    unsafe impl aya::Pod for AllowKey4 {}
    unsafe impl aya::Pod for AllowKey6 {}
    unsafe impl aya::Pod for AllowPorts {}
    unsafe impl aya::Pod for DenyRule {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for ProgramConfig {}
    unsafe impl aya::Pod for ConnectSeenKey {}
    unsafe impl aya::Pod for CgroupBudget {}
    unsafe impl aya::Pod for CredSeenKey {}
    unsafe impl aya::Pod for CredSeen {}
    unsafe impl aya::Pod for OpenCounts {}
}
