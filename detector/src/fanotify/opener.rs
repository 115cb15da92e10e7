//! Who opened the file, read from /proc while the opener is blocked in its
//! open (so it cannot have exited and its pid cannot have been reused):
//! thread group, parent, uid, comm, cgroup, and which syscall with which
//! access mode.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::{FileExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

/// Fields of `/proc/<tid>/status` the event carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub comm: String,
    pub tgid: u32,
    pub ppid: u32,
    /// Real uid and gid, as `bpf_get_current_uid_gid` gives them.
    pub uid: u32,
    pub gid: u32,
}

pub fn parse_status(text: &str) -> Option<Status> {
    let mut s = Status::default();
    let mut seen = 0u8;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let first = || v.split_whitespace().next().and_then(|x| x.parse().ok());
        match k {
            // The name is the rest of the line after one tab (it may
            // contain spaces).
            "Name" => {
                s.comm = v.strip_prefix('\t').unwrap_or(v).to_string();
                seen |= 1;
            }
            "Tgid" => {
                s.tgid = first()?;
                seen |= 2;
            }
            "PPid" => {
                s.ppid = first()?;
                seen |= 4;
            }
            "Uid" => {
                s.uid = first()?;
                seen |= 8;
            }
            "Gid" => {
                s.gid = first()?;
                seen |= 16;
            }
            _ => {}
        }
        if seen == 31 {
            return Some(s);
        }
    }
    None
}

/// (ppid, starttime) of a `/proc/<pid>/stat` line. The name in parentheses
/// may hold anything, so fields are counted after its last `)`.
pub fn parse_stat_ppid_start(text: &str) -> Option<(u32, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After the name: state (field 3), ppid (4), …, starttime (22).
    let ppid = f.nth(1)?.parse().ok()?;
    let start = f.nth(17)?.parse().ok()?;
    Some((ppid, start))
}

/// The cgroup-v2 path (`0::/…` line) of `/proc/<pid>/cgroup`.
pub fn parse_cgroup_v2(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// `/proc/<tid>/syscall` of a thread blocked in a system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syscall {
    pub nr: i64,
    pub args: [u64; 6],
}

/// `None` when the thread is not in a syscall (`running`, or `-1 …` for a
/// kernel-internal wait).
pub fn parse_syscall(text: &str) -> Option<Syscall> {
    let mut it = text.split_whitespace();
    let nr: i64 = it.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some(Syscall { nr, args })
}

/// How the opener got the file: the syscall (the names the tracepoint
/// sensor uses) and whether the new descriptor can read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub route: &'static str,
    pub readable: bool,
    pub writable: bool,
}

impl Access {
    fn from_flags(route: &'static str, flags: u64) -> Access {
        let acc = flags as i32 & libc::O_ACCMODE;
        Access {
            route,
            readable: acc != libc::O_WRONLY,
            writable: acc == libc::O_WRONLY || acc == libc::O_RDWR,
        }
    }

    /// The mode is unknown: count it as a read, so a reader is never
    /// missed as a holder (a write-only open of a credential is rare: the
    /// kubelet writes new files, which are new inodes).
    fn unknown(route: &'static str) -> Access {
        Access {
            route,
            readable: true,
            writable: false,
        }
    }
}

/// Which open-family call `sc` is, and its access mode. `open_how_flags`
/// reads the `flags` of openat2's `struct open_how` at a user address.
pub fn classify(
    sc: Option<Syscall>,
    comm: &str,
    open_how_flags: impl FnOnce(u64) -> Option<u64>,
) -> Access {
    // io_uring opens run in an io-wq worker (`iou-wrk-<tid>`), or inline
    // in io_uring_enter(2); neither shows the SQE's flags.
    if comm.starts_with("iou-wrk-") {
        return Access::unknown("io_uring");
    }
    let Some(sc) = sc else {
        return Access::unknown("unknown");
    };
    match sc.nr {
        #[cfg(target_arch = "x86_64")]
        libc::SYS_open => Access::from_flags("open", sc.args[1]),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_creat => Access::from_flags("creat", libc::O_WRONLY as u64),
        libc::SYS_openat => Access::from_flags("openat", sc.args[2]),
        libc::SYS_openat2 => match open_how_flags(sc.args[2]) {
            Some(f) => Access::from_flags("openat2", f),
            None => Access::unknown("openat2"),
        },
        libc::SYS_open_by_handle_at => Access::from_flags("open_by_handle_at", sc.args[2]),
        libc::SYS_io_uring_enter => Access::unknown("io_uring"),
        libc::SYS_execve | libc::SYS_execveat => Access::unknown("execve"),
        _ => Access::unknown("unknown"),
    }
}

/// The route of a descriptor found open on a new credential inode that
/// nobody was seen opening (see `fds_of`).
pub const OPENED_BEFORE_MARK: &str = "open_before_mark";

/// Every `(pid, fd)` whose descriptor is the file `(st_dev, st_ino)`: a
/// walk of /proc/*/fd, for the rare case that needs it (it costs about a
/// microsecond per descriptor on the node).
pub fn fds_of(dev: u64, ino: u64) -> Vec<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for f in fds.flatten() {
            let Some(fd) = f.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // stat follows the magic link to the open file itself.
            if std::fs::metadata(f.path()).is_ok_and(|m| (m.dev(), m.ino()) == (dev, ino)) {
                out.push((pid, fd));
            }
        }
    }
    out
}

/// Everything the event needs about the opener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opener {
    pub tid: u32,
    pub status: Status,
    /// cgroup-v2 path relative to the hierarchy root (`/kubepods/…`).
    pub cgroup_path: String,
    /// Inode of that directory: the id `bpf_get_current_cgroup_id` gives.
    pub cgroup_id: u64,
    pub access: Access,
}

/// How often /proc/<tid>/syscall is read while it says `running` (a
/// spurious wake-up of the blocked opener; about a millisecond in all).
const SYSCALL_ATTEMPTS: usize = 20;

/// Reads /proc with one reusable buffer.
pub struct ProcReader {
    proc_dir: OwnedFd,
    cgroup_root: PathBuf,
    buf: Vec<u8>,
}

impl ProcReader {
    pub fn new(cgroup_root: &Path) -> io::Result<ProcReader> {
        let c = CString::new("/proc").expect("no NUL");
        // SAFETY: plain open of a directory; we own the result.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ProcReader {
            // SAFETY: fresh descriptor.
            proc_dir: unsafe { OwnedFd::from_raw_fd(fd) },
            cgroup_root: cgroup_root.to_path_buf(),
            buf: Vec::with_capacity(4096),
        })
    }

    fn open(&self, pid: u32, file: &str) -> io::Result<File> {
        let c = CString::new(format!("{pid}/{file}")).expect("no NUL");
        // SAFETY: relative path under our /proc fd; we own the result.
        let fd = unsafe {
            libc::openat(
                self.proc_dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// `/proc/<pid>/<file>` as text (lossy; these files are ASCII but for
    /// names). Plain read(2)s into a reused buffer: `read_to_end` would add
    /// a statx and an lseek per file, and the opener waits for every one.
    pub fn read(&mut self, pid: u32, file: &str) -> io::Result<String> {
        let mut f = self.open(pid, file)?;
        self.buf.clear();
        self.buf.resize(4096, 0);
        let mut n = 0;
        loop {
            if n == self.buf.len() {
                self.buf.resize(n * 2, 0);
            }
            let room = self.buf.len() - n;
            match f.read(&mut self.buf[n..]) {
                Ok(0) => break,
                // These procfs files are generated whole on the first read
                // (single_open): a short read is the end.
                Ok(k) if k < room => {
                    n += k;
                    break;
                }
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(String::from_utf8_lossy(&self.buf[..n]).into_owned())
    }

    /// The cgroup-v2 path of `pid`.
    pub fn cgroup_path(&mut self, pid: u32) -> io::Result<String> {
        let text = self.read(pid, "cgroup")?;
        parse_cgroup_v2(&text)
            .map(str::to_string)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no cgroup-v2 line"))
    }

    /// The id of a cgroup-v2 path: its directory's inode.
    pub fn cgroup_id(&self, path: &str) -> io::Result<u64> {
        let rel = path.trim_start_matches('/');
        let dir = if rel.is_empty() {
            self.cgroup_root.clone()
        } else {
            self.cgroup_root.join(rel)
        };
        Ok(std::fs::metadata(dir)?.ino())
    }

    /// 8 bytes of `tid`'s memory at `addr` (openat2's `open_how.flags`).
    fn read_u64(&self, tid: u32, addr: u64) -> Option<u64> {
        let f = self.open(tid, "mem").ok()?;
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, addr).ok()?;
        Some(u64::from_ne_bytes(b))
    }

    /// The system call `tid` is blocked in. The opener waits on the
    /// group's shared wait queue, and every answer to *any* opener wakes
    /// all of them for a moment: /proc then says `running`. It is back
    /// asleep at once (its own answer is still to come), so ask again a
    /// few times rather than take the mode as unknown, which would count
    /// a kubelet's write as a read. `None` only if it never settles or the
    /// file is unreadable (no ptrace access).
    fn blocked_syscall(&mut self, tid: u32) -> Option<Syscall> {
        for attempt in 0..SYSCALL_ATTEMPTS {
            let text = self.read(tid, "syscall").ok()?;
            if let Some(sc) = parse_syscall(&text) {
                return Some(sc);
            }
            if !text.starts_with("running") {
                return None;
            }
            if attempt > 2 {
                std::thread::sleep(std::time::Duration::from_micros(50));
            } else {
                std::thread::yield_now();
            }
        }
        None
    }

    /// Status, cgroup-v2 path and cgroup id of `tid`. A cgroup we cannot
    /// name is reported as 0 (unattributed), not an error: the holder
    /// bookkeeping needs only the tgid.
    fn identity(&mut self, tid: u32) -> io::Result<(Status, String, u64)> {
        let status = parse_status(&self.read(tid, "status")?)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed status"))?;
        let (cgroup_path, cgroup_id) = match self
            .cgroup_path(tid)
            .and_then(|p| Ok((self.cgroup_id(&p)?, p)))
        {
            Ok((id, p)) => (p, id),
            Err(_) => (String::new(), 0),
        };
        Ok((status, cgroup_path, cgroup_id))
    }

    /// Everything about process `pid`, which has the file open on `fd`
    /// already (found by `fds_of`, not waiting in an open): the access
    /// mode is the descriptor's (`/proc/<pid>/fdinfo/<fd>`).
    pub fn holder_of(&mut self, pid: u32, fd: u32) -> io::Result<Opener> {
        let (status, cgroup_path, cgroup_id) = self.identity(pid)?;
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
        let access = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 8).ok())
            .map_or(Access::unknown(OPENED_BEFORE_MARK), |f| {
                Access::from_flags(OPENED_BEFORE_MARK, f)
            });
        Ok(Opener {
            tid: pid,
            status,
            cgroup_path,
            cgroup_id,
            access,
        })
    }

    /// Everything about the thread `tid` that is blocked opening a file.
    pub fn opener(&mut self, tid: u32) -> io::Result<Opener> {
        let (status, cgroup_path, cgroup_id) = self.identity(tid)?;
        let sc = self.blocked_syscall(tid);
        let access = classify(sc, &status.comm, |addr| self.read_u64(tid, addr));
        Ok(Opener {
            tid,
            status,
            cgroup_path,
            cgroup_id,
            access,
        })
    }
}

/// In a container with its own cgroup namespace but the host's pids (a
/// DaemonSet with `hostPID`), `/proc/<pid>/cgroup` shows other processes'
/// paths relative to our namespace (`/../../kubepods/…`), which name no
/// directory under the mounted hierarchy. The calling thread then joins
/// pid 1's cgroup namespace (the host's); a cgroup namespace is per thread,
/// so the rest of the daemon is unaffected.
pub fn join_host_cgroup_ns_if_needed() {
    let init = std::fs::read_to_string("/proc/1/cgroup").unwrap_or_default();
    if !parse_cgroup_v2(&init).is_some_and(|p| p.starts_with("/..")) {
        return;
    }
    let joined = File::open("/proc/1/ns/cgroup").and_then(|f| {
        // SAFETY: setns on a namespace fd we opened; affects this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    });
    match joined {
        Ok(()) => tracing::info!("fanotify responder joined the host's cgroup namespace"),
        Err(e) => {
            tracing::warn!(error = %e, "in a private cgroup namespace and cannot join the host's: credential opens will not name their cgroup")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tmy prog\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\nPid:\t4243\nPPid:\t17\nTracerPid:\t0\nUid:\t1000\t1001\t1002\t1003\nGid:\t50\t51\t52\t53\nFDSize:\t64\n";

    #[test]
    fn status_fields() {
        assert_eq!(
            parse_status(STATUS),
            Some(Status {
                comm: "my prog".into(),
                tgid: 4242,
                ppid: 17,
                uid: 1000,
                gid: 50
            })
        );
        assert_eq!(parse_status("Name:\tx\nTgid:\t1\n"), None, "incomplete");
        assert_eq!(parse_status("Name:\tx\nTgid:\tabc\nPPid:\t1\n"), None);
    }

    #[test]
    fn stat_ppid_and_start_time() {
        let line =
            "4243 (a) b) c) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 2 0 98765 1000 10";
        assert_eq!(parse_stat_ppid_start(line), Some((17, 98765)));
        assert_eq!(parse_stat_ppid_start("1 (x) S 0"), None, "short");
        // Our own, against status.
        let me = std::process::id();
        let text = std::fs::read_to_string(format!("/proc/{me}/task/{me}/stat")).unwrap();
        let (ppid, start) = parse_stat_ppid_start(&text).unwrap();
        assert_eq!(ppid, std::os::unix::process::parent_id());
        assert!(start > 0);
    }

    #[test]
    fn cgroup_line_on_hybrid_hosts() {
        let text =
            "12:pids:/user.slice\n1:name=systemd:/user.slice/x\n0::/kubepods/besteffort/podab/c1\n";
        assert_eq!(parse_cgroup_v2(text), Some("/kubepods/besteffort/podab/c1"));
        assert_eq!(parse_cgroup_v2("1:cpu:/\n"), None);
    }

    #[test]
    fn syscall_lines() {
        let openat = "257 0xffffff9c 0x7fffe96fcae6 0x0 0x0 0x0 0x78 0x7fffe96fb6c0 0x7f0247be6218";
        let sc = parse_syscall(openat).unwrap();
        assert_eq!((sc.nr, sc.args[2]), (257, 0));
        assert_eq!(parse_syscall("running"), None);
        assert_eq!(parse_syscall("-1 0x7ffd 0x7f00"), None);
        assert_eq!(parse_syscall("257 0x1 0x2"), None, "short");
    }

    fn sc(nr: i64, args: [u64; 6]) -> Option<Syscall> {
        Some(Syscall { nr, args })
    }

    #[test]
    fn routes_and_modes() {
        let none = |_| None;
        let w = libc::O_WRONLY as u64;
        let rw = libc::O_RDWR as u64;
        let a = classify(sc(libc::SYS_openat, [0, 0, 0, 0, 0, 0]), "cat", none);
        assert_eq!((a.route, a.readable, a.writable), ("openat", true, false));
        let a = classify(sc(libc::SYS_openat, [0, 0, w, 0, 0, 0]), "x", none);
        assert_eq!((a.readable, a.writable), (false, true));
        let a = classify(
            sc(libc::SYS_open_by_handle_at, [0, 0, rw, 0, 0, 0]),
            "x",
            none,
        );
        assert_eq!(
            (a.route, a.readable, a.writable),
            ("open_by_handle_at", true, true)
        );
        // openat2 reads open_how.flags from the opener's memory.
        let a = classify(
            sc(libc::SYS_openat2, [0, 0, 0x1000, 24, 0, 0]),
            "x",
            |addr| {
                assert_eq!(addr, 0x1000);
                Some(w)
            },
        );
        assert_eq!((a.route, a.readable), ("openat2", false));
        let a = classify(sc(libc::SYS_openat2, [0; 6]), "x", none);
        assert_eq!(
            (a.route, a.readable),
            ("openat2", true),
            "unknown mode is a read"
        );
        let a = classify(sc(libc::SYS_io_uring_enter, [0; 6]), "x", none);
        assert_eq!(a.route, "io_uring");
        let a = classify(None, "iou-wrk-77", none);
        assert_eq!((a.route, a.readable), ("io_uring", true));
        assert_eq!(classify(None, "x", none).route, "unknown");
        #[cfg(target_arch = "x86_64")]
        {
            let a = classify(sc(libc::SYS_creat, [0; 6]), "x", none);
            assert_eq!((a.route, a.readable, a.writable), ("creat", false, true));
            let a = classify(sc(libc::SYS_open, [0, 0, 0, 0, 0, 0]), "x", none);
            assert_eq!(a.route, "open");
        }
    }

    #[test]
    fn reads_our_own_process() {
        let root = crate::loader::find_cgroup2_root().unwrap_or_else(|_| "/sys/fs/cgroup".into());
        let mut r = ProcReader::new(&root).unwrap();
        let me = std::process::id();
        let st = parse_status(&r.read(me, "status").unwrap()).unwrap();
        assert_eq!(st.tgid, me);
        assert_eq!(st.ppid, std::os::unix::process::parent_id());
        // SAFETY: getuid has no preconditions.
        assert_eq!(st.uid, unsafe { libc::getuid() });
    }
}
