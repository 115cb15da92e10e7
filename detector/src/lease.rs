//! The lease sensor's userspace half: a read lease on every credential file.
//!
//! The kernel's open path calls `break_lease` for an inode that carries a
//! lease, and that fires `filelock:leases_conflict` in the opener's context,
//! before the open returns (the kernel program `leases_conflict` in
//! detector-ebpf). So with a lease on exactly the credential files, their
//! opens are seen, by any route (open, openat2, open_by_handle_at, io_uring,
//! a `/proc/<pid>/fd` re-open), synchronously and without a syscall
//! tracepoint; every other open pays nothing.
//!
//! A read lease is broken by an open for writing: the writer waits until the
//! holder gives the lease up. We give it up as soon as SIGIO says so, and take
//! it again once no writer has the file open (`retry`, every few seconds).
//! Until then, opens of that one file are not seen (counted in `waiting`).

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use tracing::{debug, info, warn};

/// `(st_dev, st_ino)` as `stat(2)` gives them (the inventory's key).
pub type FileKey = (u64, u64);

/// Why the lease sensor cannot run on this node.
pub fn unavailable(lease_file_offset: u32) -> Option<String> {
    if lease_file_offset == 0 {
        return Some("kernel BTF has neither file_lease.c.flc_file nor file_lock.fl_file".into());
    }
    match std::fs::read_to_string("/proc/sys/fs/leases-enable") {
        Ok(s) if s.trim() == "0" => Some("fs.leases-enable is 0".into()),
        _ => None,
    }
}

struct Lease {
    file: File,
    path: PathBuf,
    /// Whether the read lease is in place (else waiting for writers to close).
    held: bool,
}

#[derive(Default)]
pub struct Leases {
    files: HashMap<FileKey, Lease>,
    /// Credentials that cannot carry a lease (cannot be opened, or their
    /// filesystem takes no lease): warned about once each.
    refused: HashSet<FileKey>,
    /// `--open-sensor hybrid`: the fanotify group that sees every credential
    /// open this sensor does not; its inode mark is off while we hold the
    /// lease.
    fanotify: Option<crate::fanotify::InodeMarks>,
}

fn set_lease(f: &File, kind: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, kind) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Lease {
    /// The lease is in place (`true`) or given up: the fanotify group, if
    /// any, has its inode mark on the file only while it is not. The lease
    /// is taken before the mark comes off and given up after it is back,
    /// so between the two both sensors see an open (the second report
    /// folds into the first as a repeat) and neither ever misses one.
    fn fanotify_leased(&self, fanotify: Option<&crate::fanotify::InodeMarks>, leased: bool) {
        if let Some(f) = fanotify {
            if let Err(e) = f.set(&self.file, !leased) {
                warn!(path = %self.path.display(), error = %e, leased, "cannot change the fanotify mark of a leased credential");
            }
        }
    }
}

impl Leases {
    /// Leases whose inodes `fanotify` leaves unmarked while leased (hybrid
    /// sensor).
    pub fn with_fanotify(fanotify: crate::fanotify::InodeMarks) -> Leases {
        Leases {
            fanotify: Some(fanotify),
            ..Leases::default()
        }
    }

    /// Takes a read lease on the credential `key` at `path` (idempotent).
    pub fn add(&mut self, key: FileKey, path: &Path) {
        if self.files.contains_key(&key) || self.refused.contains(&key) {
            return;
        }
        // O_NONBLOCK: never wait on somebody else's lease. Not O_NOFOLLOW:
        // kubelet's `token` is a symlink into the current `..data`.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            // Gone already: the inventory reports its removal next.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                self.refuse(key, path, &e);
                return;
            }
        };
        match file.metadata() {
            Ok(m) if (m.dev(), m.ino()) == key => {}
            // Rotated between the inventory's stat and our open: the
            // inventory reports the new inode next.
            _ => return,
        }
        let held = match set_lease(&file, libc::F_RDLCK) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => false,
            Err(e) => {
                self.refuse(key, path, &e);
                return;
            }
        };
        if !held {
            info!(path = %path.display(), "credential open for writing: leased once the writer closes it");
        }
        let lease = Lease {
            file,
            path: path.to_path_buf(),
            held,
        };
        if held {
            lease.fanotify_leased(self.fanotify.as_ref(), true);
        }
        self.files.insert(key, lease);
    }

    fn refuse(&mut self, key: FileKey, path: &Path, e: &io::Error) {
        warn!(path = %path.display(), error = %e, "cannot lease this credential file: its opens are not seen by the lease sensor");
        self.refused.insert(key);
    }

    /// Drops the lease of a credential that is gone (closing the file ends
    /// it). No fanotify mark goes back on: the file is no credential now.
    pub fn remove(&mut self, key: FileKey) {
        if self.files.remove(&key).is_some() {
            if let Some(f) = &self.fanotify {
                f.forget(key);
            }
        }
        self.refused.remove(&key);
    }

    /// After SIGIO: give up every lease a writer is breaking, so the writer
    /// goes on at once. Returns how many.
    pub fn release_broken(&mut self) -> usize {
        let mut released = 0;
        for l in self.files.values_mut().filter(|l| l.held) {
            // SAFETY: fcntl on a descriptor we own; no pointers.
            let now = unsafe { libc::fcntl(l.file.as_raw_fd(), libc::F_GETLEASE) };
            if now == libc::F_RDLCK as libc::c_int {
                continue;
            }
            l.fanotify_leased(self.fanotify.as_ref(), false);
            let _ = set_lease(&l.file, libc::F_UNLCK);
            l.held = false;
            released += 1;
            if self.fanotify.is_some() {
                info!(path = %l.path.display(), "credential opened for writing: lease given up until the writer closes it (its opens go to fanotify meanwhile)");
            } else {
                info!(path = %l.path.display(), "credential opened for writing: lease given up until the writer closes it (its opens are not seen meanwhile)");
            }
        }
        released
    }

    /// Takes the lease again on files no writer has open any more.
    pub fn retry(&mut self) {
        for l in self.files.values_mut().filter(|l| !l.held) {
            if set_lease(&l.file, libc::F_RDLCK).is_ok() {
                l.held = true;
                l.fanotify_leased(self.fanotify.as_ref(), true);
                debug!(path = %l.path.display(), "credential leased again");
            }
        }
    }

    /// (leased, waiting for a writer to close, refused).
    pub fn counts(&self) -> (usize, usize, usize) {
        let held = self.files.values().filter(|l| l.held).count();
        (held, self.files.len() - held, self.refused.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Privileged: a lease on a tmpfs file, broken by a writer and released.
    #[test]
    fn a_writer_breaks_the_lease_and_it_is_taken_again_after() {
        let dir = std::env::temp_dir().join(format!("detector-lease-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, b"x").unwrap();
        let m = std::fs::metadata(&path).unwrap();
        let mut leases = Leases::default();
        // SIGIO would end the test process: this test takes it.
        // SAFETY: installing SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
        leases.add((m.dev(), m.ino()), &path);
        assert_eq!(leases.counts(), (1, 0, 0));
        // A non-blocking write open of a leased file fails with EWOULDBLOCK
        // and starts the break.
        let e = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK));
        assert_eq!(leases.release_broken(), 1);
        assert_eq!(leases.counts(), (0, 1, 0));
        let w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        leases.retry();
        assert_eq!(leases.counts(), (0, 1, 0), "a writer still has it open");
        drop(w);
        leases.retry();
        assert_eq!(leases.counts(), (1, 0, 0));
        leases.remove((m.dev(), m.ino()));
        assert_eq!(leases.counts(), (0, 0, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
