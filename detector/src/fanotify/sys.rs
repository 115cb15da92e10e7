//! Thin, safe wrappers over the fanotify system calls (`fanotify_init`,
//! `fanotify_mark`, reading events, writing responses).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// `fanotify_init` flags of the permission group: permission events
/// (FAN_CLASS_CONTENT), the opener's thread id rather than its tgid (its
/// in-flight syscall is per thread), and no queue limit: every queued
/// permission event is a thread blocked in open(2), so the queue is bounded
/// by the threads that exist, and an overflow would let an open through
/// unseen.
const INIT_FLAGS: libc::c_uint = libc::FAN_CLASS_CONTENT
    | libc::FAN_CLOEXEC
    | libc::FAN_NONBLOCK
    | libc::FAN_REPORT_TID
    | libc::FAN_UNLIMITED_QUEUE
    | libc::FAN_UNLIMITED_MARKS;

/// Flags of the descriptor the kernel opens for us per event. We only
/// `fstat` it; O_RDONLY is the least it can be.
const EVENT_F_FLAGS: libc::c_uint = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_LARGEFILE) as u32;

/// A fanotify permission group.
#[derive(Debug)]
pub struct Group(OwnedFd);

/// Where a mark goes: one inode, every inode of a filesystem, or every
/// open made through one mount (one `vfsmount`: a bind mount of the same
/// filesystem elsewhere is another mount, not covered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkScope {
    Inode,
    Filesystem,
    Mount,
}

impl MarkScope {
    /// The label of the `detector_fanotify_marks` gauge.
    pub fn name(self) -> &'static str {
        match self {
            MarkScope::Inode => "inode",
            MarkScope::Filesystem => "filesystem",
            MarkScope::Mount => "mount",
        }
    }
}

impl Group {
    /// A permission group, or the reason there is none (ENOSYS: no
    /// fanotify; EPERM: no CAP_SYS_ADMIN; EINVAL: a flag this kernel lacks).
    pub fn new() -> io::Result<Group> {
        // SAFETY: plain syscall; the result is a new fd we own, or -1.
        let fd = unsafe { libc::fanotify_init(INIT_FLAGS, EVENT_F_FLAGS) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Group(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Add (or remove) an FAN_OPEN_PERM mark on `path` (symlinks followed).
    pub fn mark(&self, add: bool, scope: MarkScope, path: &Path) -> io::Result<()> {
        mark(self.raw(), add, scope, path)
    }
}

pub fn mark(group: RawFd, add: bool, scope: MarkScope, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut flags = if add {
        libc::FAN_MARK_ADD
    } else {
        libc::FAN_MARK_REMOVE
    };
    flags |= match scope {
        MarkScope::Inode => 0,
        MarkScope::Filesystem => libc::FAN_MARK_FILESYSTEM,
        MarkScope::Mount => libc::FAN_MARK_MOUNT,
    };
    // SAFETY: valid NUL-terminated path, plain syscall.
    let rc = unsafe {
        libc::fanotify_mark(
            group,
            flags,
            libc::FAN_OPEN_PERM,
            libc::AT_FDCWD,
            c.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Add (or remove) an inode mark of `FAN_OPEN_PERM` on the inode open as
/// `file` (not on a path, which may name another inode by now). Removing
/// a mark that is not there is not an error.
pub fn mark_file(group: RawFd, add: bool, file: RawFd) -> io::Result<()> {
    let flags = if add {
        libc::FAN_MARK_ADD
    } else {
        libc::FAN_MARK_REMOVE
    };
    // SAFETY: plain syscall; a NULL path marks the object `file` refers to.
    let rc =
        unsafe { libc::fanotify_mark(group, flags, libc::FAN_OPEN_PERM, file, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if !add && e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Answer a permission event. We only ever allow: detection and the
/// holder bookkeeping happen before the answer, never a denial.
pub fn allow(group: RawFd, event_fd: RawFd) -> io::Result<()> {
    let r = libc::fanotify_response {
        fd: event_fd,
        response: libc::FAN_ALLOW,
    };
    let len = std::mem::size_of::<libc::fanotify_response>();
    // SAFETY: writes a plain struct of `len` bytes from the stack.
    let n = unsafe { libc::write(group, (&r as *const libc::fanotify_response).cast(), len) };
    if n != len as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One event as the kernel wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent {
    pub mask: u64,
    /// Our descriptor of the opened file (FAN_NOFD on queue overflow).
    pub fd: RawFd,
    /// The opener's thread id (FAN_REPORT_TID), in our pid namespace.
    pub tid: i32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("fanotify metadata version {0}, expected {exp}", exp = libc::FANOTIFY_METADATA_VERSION)]
    Version(u8),
    #[error("truncated fanotify event ({0} bytes left)")]
    Truncated(usize),
}

/// Split a buffer returned by read(2) on the group into events. On an
/// error, the events decoded so far are returned too: their descriptors
/// must still be answered and closed.
pub fn parse(buf: &[u8]) -> (Vec<RawEvent>, Option<ParseError>) {
    let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        if rest.len() < meta_len {
            return (out, Some(ParseError::Truncated(rest.len())));
        }
        // SAFETY: at least `meta_len` bytes; the struct is plain integers
        // (any bit pattern is valid); read_unaligned needs no alignment.
        let m: libc::fanotify_event_metadata =
            unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
        if m.vers != libc::FANOTIFY_METADATA_VERSION {
            return (out, Some(ParseError::Version(m.vers)));
        }
        let len = m.event_len as usize;
        if len < meta_len || len > rest.len() {
            return (out, Some(ParseError::Truncated(rest.len())));
        }
        out.push(RawEvent {
            mask: m.mask,
            fd: m.fd,
            tid: m.pid,
        });
        off += len;
    }
    (out, None)
}

/// An eventfd to wake the responder's poll.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall returning a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is ours for the duration of the call.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(vers: u8, len: u32, fd: i32, pid: i32) -> Vec<u8> {
        let m = libc::fanotify_event_metadata {
            event_len: len,
            vers,
            reserved: 0,
            metadata_len: 24,
            mask: libc::FAN_OPEN_PERM,
            fd,
            pid,
        };
        // SAFETY: bytes of a plain repr(C) struct.
        unsafe {
            std::slice::from_raw_parts(
                (&m as *const libc::fanotify_event_metadata).cast::<u8>(),
                std::mem::size_of_val(&m),
            )
        }
        .to_vec()
    }

    #[test]
    fn parses_events_and_stops_at_garbage() {
        let mut b = meta(libc::FANOTIFY_METADATA_VERSION, 24, 7, 100);
        b.extend(meta(libc::FANOTIFY_METADATA_VERSION, 24, 8, 101));
        let (evs, err) = parse(&b);
        assert_eq!(err, None);
        assert_eq!(
            evs.iter().map(|e| (e.fd, e.tid)).collect::<Vec<_>>(),
            vec![(7, 100), (8, 101)]
        );
        // A bad version after one good event: the good one is still returned.
        let mut b = meta(libc::FANOTIFY_METADATA_VERSION, 24, 7, 100);
        b.extend(meta(2, 24, 9, 1));
        let (evs, err) = parse(&b);
        assert_eq!((evs.len(), err), (1, Some(ParseError::Version(2))));
        // An event length pointing past the buffer, or a short tail.
        let (evs, err) = parse(&meta(libc::FANOTIFY_METADATA_VERSION, 4096, 7, 1));
        assert!(evs.is_empty() && matches!(err, Some(ParseError::Truncated(24))));
        let (_, err) = parse(&[0u8; 10]);
        assert_eq!(err, Some(ParseError::Truncated(10)));
        let (_, err) = parse(&meta(libc::FANOTIFY_METADATA_VERSION, 0, 7, 1));
        assert!(
            matches!(err, Some(ParseError::Truncated(_))),
            "zero length must not loop"
        );
    }
}
