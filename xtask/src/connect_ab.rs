//! A drift-free A/B of the detector's `connect4` program inside one bench
//! worker: the worker takes the running daemon's program over and attaches
//! it to (and detaches it from) its own cgroup between batches of connects.
//!
//! Why: the program is attached at the cgroup root, so no connect on the
//! machine escapes it and the main table can only compare sessions, which
//! on this VM drift by ±10 % — more than the effect. Here each "on" batch
//! is paired with an "off" batch made seconds apart in the same process.
//!
//! How: the daemon's link of its `connect4` (a cgroup link with attach type
//! `BPF_CGROUP_INET4_CONNECT`) and the program are copied out of the daemon
//! with `pidfd_getfd(2)`; the link is detached for good (`BPF_LINK_DETACH`),
//! so outside "on" batches no `connect4` runs at all (the kernel's static
//! key for the hook is off again), and "on" attaches the very same loaded
//! program, with the daemon's live maps, to the worker's own cgroup
//! (`BPF_PROG_ATTACH`, multi). The daemon must be stopped after the pass:
//! it has lost its connect hook.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use anyhow::{bail, Context, Result};

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<()> {
    // SAFETY: `attr` is a valid, writable buffer of the size we pass.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `fd` of process `pid`, duplicated into this process.
fn steal_fd(pid: u32, fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: plain syscalls; each returned descriptor is owned right away.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            bail!("pidfd_open({pid}): {}", io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as RawFd);
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if dup < 0 {
            bail!("pidfd_getfd({pid}, {fd}): {}", io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(dup as RawFd))
    }
}

/// `key:\tvalue` of an fdinfo text.
fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// The daemon's `connect4` link and program descriptors, by fdinfo.
fn find_connect4(pid: u32) -> Result<(RawFd, RawFd)> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut infos = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let e = e?;
        let Ok(fd) = e.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        infos.push((fd, std::fs::read_to_string(e.path()).unwrap_or_default()));
    }
    let (link_fd, prog_id) = infos
        .iter()
        .find_map(|(fd, t)| {
            let is = field(t, "link_type") == Some("cgroup")
                && field(t, "attach_type") == Some(&BPF_CGROUP_INET4_CONNECT.to_string());
            is.then(|| Some((*fd, field(t, "prog_id")?.to_string())))
                .flatten()
        })
        .with_context(|| format!("process {pid} holds no cgroup link of connect4"))?;
    let prog_fd = infos
        .iter()
        .find(|(_, t)| field(t, "link_type").is_none() && field(t, "prog_id") == Some(&prog_id))
        .map(|(fd, _)| *fd)
        .with_context(|| format!("process {pid} holds no descriptor of program {prog_id}"))?;
    Ok((link_fd, prog_fd))
}

/// The daemon's `connect4`, detached from the root and toggled on this
/// process's cgroup. Dropping it leaves the program detached.
pub struct Connect4 {
    prog: OwnedFd,
    cgroup: File,
    attached: bool,
}

impl Connect4 {
    /// Takes `connect4` over from daemon `pid`, to be toggled on `cgroup`
    /// (the cgroup-v2 directory this process is in, of its own).
    pub fn take_over(pid: u32, cgroup: &Path) -> Result<Self> {
        let (link_fd, prog_fd) = find_connect4(pid)?;
        let link = steal_fd(pid, link_fd).context("the connect4 link")?;
        let prog = steal_fd(pid, prog_fd).context("the connect4 program")?;
        let cgroup = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut attr = [0u8; 16];
        attr[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
        bpf(BPF_LINK_DETACH, &mut attr).context("BPF_LINK_DETACH of the daemon's connect4")?;
        Ok(Self {
            prog,
            cgroup,
            attached: false,
        })
    }

    fn prog_attach(&self, cmd: libc::c_long) -> io::Result<()> {
        let mut attr = [0u8; 32];
        attr[..4].copy_from_slice(&(self.cgroup.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(self.prog.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        if cmd == BPF_PROG_ATTACH {
            attr[12..16].copy_from_slice(&BPF_F_ALLOW_MULTI.to_ne_bytes());
        }
        bpf(cmd, &mut attr)
    }

    pub fn set(&mut self, on: bool) -> Result<()> {
        if on != self.attached {
            let cmd = if on { BPF_PROG_ATTACH } else { BPF_PROG_DETACH };
            self.prog_attach(cmd).with_context(|| {
                format!("{} connect4", if on { "attaching" } else { "detaching" })
            })?;
            self.attached = on;
        }
        Ok(())
    }
}

impl Drop for Connect4 {
    fn drop(&mut self) {
        let _ = self.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn fdinfo_fields_are_matched_by_whole_key() {
        let t = "pos:\t0\nlink_type:\tcgroup\nlink_id:\t7\nprog_id:\t42\nattach_type:\t10\n";
        assert_eq!(field(t, "link_type"), Some("cgroup"));
        assert_eq!(field(t, "prog_id"), Some("42"));
        assert_eq!(field(t, "attach_type"), Some("10"));
        assert_eq!(field(t, "link"), None);
        assert_eq!(field(t, "prog_type"), None);
    }
}
