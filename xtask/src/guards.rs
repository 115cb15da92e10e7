//! Things the benches start or create, undone on drop even when a bench
//! fails half-way: child processes (killed and reaped), temporary
//! directories and cgroups (their processes killed, then removed).

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// A child killed (SIGKILL) and reaped on drop unless stopped.
pub struct Proc {
    child: Option<Child>,
    name: &'static str,
}

impl Proc {
    pub fn spawn(mut cmd: Command, name: &'static str) -> Result<Proc> {
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child: Some(child),
            name,
        })
    }
    /// The running child (its pipes), unless stopped.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
    pub fn stop(&mut self, sig: i32, timeout: Duration) -> String {
        let Some(mut child) = self.child.take() else {
            return "not running".into();
        };
        if let Ok(Some(st)) = child.try_wait() {
            return format!("had already exited ({st})");
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return format!("{st}");
            }
            sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        format!(
            "no exit within {}s of signal {sig}; killed",
            timeout.as_secs()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            eprintln!("bench: killing {} (pid {})", self.name, c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A directory removed (recursively) on drop.
pub struct TempDir(pub PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A cgroup-v2 directory: its processes killed and the directory removed on
/// drop.
pub struct Cgroup(pub PathBuf);
impl Cgroup {
    pub fn new(name: &str) -> Result<Cgroup> {
        let root = cgroup2_root()?;
        let p = root.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
        Ok(Cgroup(p))
    }
    pub fn rel(&self) -> String {
        let root = cgroup2_root().unwrap_or_default();
        format!(
            "/{}",
            self.0.strip_prefix(&root).unwrap_or(&self.0).display()
        )
    }
    fn kill_all(&self) {
        let kill = self.0.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, b"1");
        } else {
            for pid in std::fs::read_to_string(self.0.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                // SAFETY: processes of our own test cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        if self.0.exists() {
            eprintln!("bench: could not remove cgroup {}", self.0.display());
        }
    }
}

pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(p) && l.split(' ').nth(2) == Some("cgroup2"))
        {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("no cgroup-v2 mount found")
}
