//! Events the kernel programs write to the ring buffer.
//!
//! Every record starts with [`EventHeader`]; `kind` says which struct follows.
//! Userspace checks the record length against the kind before reading it.

pub const COMM_LEN: usize = 16;
/// Bytes of the exec'd filename the kernel copies (NUL-terminated, truncated).
pub const FILENAME_LEN: usize = 256;

/// Discriminant of a ring-buffer record (`EventHeader::kind`).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    CredentialAccess = 1,
    Exec = 2,
    Fork = 3,
    Exit = 4,
    Connect = 5,
    CgroupMkdir = 6,
    CgroupRmdir = 7,
}

/// Number of slots in per-kind counter arrays (index = `EventKind as u32`).
pub const EVENT_KINDS: u32 = 8;

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::CredentialAccess,
        EventKind::Exec,
        EventKind::Fork,
        EventKind::Exit,
        EventKind::Connect,
        EventKind::CgroupMkdir,
        EventKind::CgroupRmdir,
    ];

    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::CredentialAccess,
            2 => Self::Exec,
            3 => Self::Fork,
            4 => Self::Exit,
            5 => Self::Connect,
            6 => Self::CgroupMkdir,
            7 => Self::CgroupRmdir,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::CredentialAccess => "credential_access",
            Self::Exec => "exec",
            Self::Fork => "fork",
            Self::Exit => "exit",
            Self::Connect => "connect",
            Self::CgroupMkdir => "cgroup_mkdir",
            Self::CgroupRmdir => "cgroup_rmdir",
        }
    }
}

/// Which syscall produced the file descriptor of a credential access.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessRoute {
    Open = 1,
    Openat = 2,
    Openat2 = 3,
    Creat = 4,
    OpenByHandleAt = 5,
    PidfdGetfd = 6,
    /// Seen by the lease sensor inside the kernel's open path: any call that
    /// opens the file (the syscall is not known there; io_uring included).
    AnyOpen = 7,
}

impl AccessRoute {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Open,
            2 => Self::Openat,
            3 => Self::Openat2,
            4 => Self::Creat,
            5 => Self::OpenByHandleAt,
            6 => Self::PidfdGetfd,
            7 => Self::AnyOpen,
            _ => return None,
        })
    }

    pub fn syscall(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Openat => "openat",
            Self::Openat2 => "openat2",
            Self::Creat => "creat",
            Self::OpenByHandleAt => "open_by_handle_at",
            Self::PidfdGetfd => "pidfd_getfd",
            Self::AnyOpen => "open_any",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// [`EventKind`] as u16.
    pub kind: u16,
    pub _pad0: u16,
    /// Thread id (kernel `pid`).
    pub pid: u32,
    /// Process id (kernel `tgid`).
    pub tgid: u32,
    pub _pad1: u32,
    /// `bpf_ktime_get_boot_ns()`: boot-time clock, includes suspend.
    pub time_ns: u64,
    /// cgroup-v2 id (inode number of the cgroup directory).
    pub cgroup_id: u64,
}

/// A process obtained a file descriptor for a credential file.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CredentialAccessEvent {
    pub header: EventHeader,
    /// Parent process id (`real_parent->tgid`).
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Id userspace gave this credential in the credentials map.
    pub credential_id: u32,
    /// Kernel-internal `dev_t` of the file's superblock.
    pub dev: u64,
    pub ino: u64,
    /// `struct file::f_mode` (FMODE_READ = 1, FMODE_WRITE = 2).
    pub f_mode: u32,
    /// [`AccessRoute`] as u16.
    pub route: u16,
    pub _pad0: u16,
    /// The file descriptor number returned to the process.
    pub fd: i32,
    /// Earlier opens of the same credential by the same process that the
    /// kernel aggregated into this report (see `ProgramConfig::cred_dedup_ns`).
    pub repeats: u32,
    pub comm: [u8; COMM_LEN],
}

/// A process called execve successfully.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    pub ppid: u32,
    pub uid: u32,
    /// Credential id the process holds, 0 if none.
    pub holder_credential: u32,
    /// Length copied into `filename`, including the NUL; 0 if unreadable.
    pub filename_len: u32,
    pub comm: [u8; COMM_LEN],
    pub filename: [u8; FILENAME_LEN],
}

/// A new process (not a thread) was created. `header.tgid` is the child.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub header: EventHeader,
    pub parent_tgid: u32,
    /// Credential id the child inherited from its parent, 0 if none.
    pub inherited_credential: u32,
    pub comm: [u8; COMM_LEN],
}

/// A process (thread-group leader) exited.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub header: EventHeader,
    /// Credential id the process held, 0 if none.
    pub holder_credential: u32,
    /// Opens of `holder_credential` aggregated after its last report and
    /// never reported (the kernel's aggregation window was still open).
    pub unreported_reads: u32,
}

/// Address family values used in [`ConnectEvent::family`].
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Which cgroup/sock_addr hook saw the egress.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressHook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
}

impl EgressHook {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Connect4,
            2 => Self::Connect6,
            3 => Self::Sendmsg4,
            4 => Self::Sendmsg6,
            _ => return None,
        })
    }
}

/// A process connected (or sent a datagram) somewhere.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    pub header: EventHeader,
    /// [`AF_INET`] or [`AF_INET6`] after normalisation: a v4-mapped IPv6
    /// destination is reported as AF_INET with the address in `addr[..4]`.
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    /// IPPROTO_TCP / IPPROTO_UDP.
    pub protocol: u8,
    /// [`EgressHook`] as u8.
    pub hook: u8,
    /// [`Verdict`](crate::Verdict) the kernel applied, as u8.
    pub verdict: u8,
    /// Why (see [`crate::VerdictReason`]), as u8.
    pub reason: u8,
    /// Credential id the process holds, 0 if none.
    pub holder_credential: u32,
    /// Destination address in network byte order (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
}

/// A cgroup directory was created or removed (kind CgroupMkdir/CgroupRmdir).
/// Lets userspace name a cgroup that is already gone when its events arrive.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgroupEvent {
    pub header: EventHeader,
    /// The cgroup's id (its cgroup-v2 directory inode for the v2 hierarchy).
    pub id: u64,
    /// Hierarchy id: 0 is the cgroup-v2 (default) hierarchy.
    pub root: i32,
    pub level: i32,
    /// Bytes copied into `path`, including the NUL; 0 if unreadable.
    pub path_len: u32,
    pub _pad: u32,
    /// Path relative to the hierarchy root, e.g. `/kubepods/besteffort/pod…/…`.
    pub path: [u8; FILENAME_LEN],
}

/// Returns the bytes of a NUL-terminated kernel string up to the NUL.
pub fn c_str_bytes(buf: &[u8]) -> &[u8] {
    match buf.iter().position(|&b| b == 0) {
        Some(n) => &buf[..n],
        None => buf,
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for EventHeader {}
    unsafe impl aya::Pod for CredentialAccessEvent {}
    unsafe impl aya::Pod for ExecEvent {}
    unsafe impl aya::Pod for ForkEvent {}
    unsafe impl aya::Pod for ExitEvent {}
    unsafe impl aya::Pod for ConnectEvent {}
    unsafe impl aya::Pod for CgroupEvent {}
}
