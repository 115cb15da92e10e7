//! Harness for the privileged end-to-end tests: real kernel, real cgroups,
//! real processes. Everything a test creates is removed on drop, also when
//! the test fails.
//!
//! The tests drive the real `detector` binary (path in `DETECTOR_BIN`, set by
//! `cargo xtask test`; default `target/release/detector`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod containerd;
pub mod kernel;
pub mod kubeapi;
pub mod net;
pub mod pods;
pub mod receivers;
pub mod runc;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique name for this test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The privileged tests need root; CI runs as root. Never skip silently.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "privileged end-to-end tests must run as root (cargo xtask test does)"
    );
}

/// The cgroup-v2 mount: `/sys/fs/cgroup/unified` on hybrid hosts, else `/sys/fs/cgroup`.
pub fn cgroup2_root() -> PathBuf {
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(p).join("cgroup.procs").exists()
            && std::fs::read_to_string("/proc/mounts")
                .map(|m| {
                    m.lines()
                        .any(|l| l.split(' ').nth(1) == Some(p) && l.contains("cgroup2"))
                })
                .unwrap_or(false)
        {
            return PathBuf::from(p);
        }
    }
    panic!("no cgroup-v2 mount found");
}

pub fn detector_bin() -> PathBuf {
    if let Ok(p) = std::env::var("DETECTOR_BIN") {
        return PathBuf::from(p);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.join("../target/release/detector")
}

/// Inode number of a path (a cgroup-v2 directory's inode is its cgroup id).
pub fn inode_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// A fresh cgroup-v2 child of the root, removed (with its processes killed) on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().join(unique(&format!("detector-test-{name}")));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let id = inode_of(&path);
        TestCgroup { path, id }
    }

    /// A `Command` whose child moves itself into this cgroup before exec.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let procs = self.path.join("cgroup.procs");
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process itself.
                std::fs::write(&procs, b"0")?;
                Ok(())
            });
        }
        cmd
    }

    /// Run `sh -c script` inside the cgroup and wait for it.
    pub fn sh(&self, script: &str) -> std::process::Output {
        self.command("/bin/sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("spawn sh")
    }

    /// Runs `program args` inside the cgroup to its end; returns its pid
    /// (the one the kernel reports) and its output.
    pub fn run(&self, program: &str, args: &[&str]) -> (u32, std::process::Output) {
        let child = self
            .command(program)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let pid = child.id();
        (pid, child.wait_with_output().expect("wait"))
    }

    /// Writes `dir/intent.yaml`: a WorkloadIntent that selects this cgroup
    /// by path and allows only 127.0.0.1:`allowed_port`, with `action`
    /// (`alert`, `block`, `kill`). Returns the file's path.
    pub fn intent_file(&self, dir: &Path, allowed_port: u16, action: &str) -> String {
        let rel = self
            .path
            .strip_prefix(cgroup2_root())
            .expect("under the cgroup-v2 root")
            .display()
            .to_string();
        let path = dir.join("intent.yaml");
        std::fs::write(
            &path,
            format!(
                "apiVersion: detector.dev/v1alpha1\nkind: WorkloadIntent\nmetadata: {{name: test, namespace: tests}}\nspec:\n  selector:\n    cgroupPath: \"/{rel}\"\n  destinations:\n    - {{cidr: 127.0.0.1/32, ports: [{allowed_port}]}}\n  action: {action}\n"
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.display().to_string()
    }

    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, b"1");
        } else {
            for pid in self.pids() {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A tmpfs mounted on an existing directory, as kubelet mounts every
/// projected and secret volume; unmounted (lazily) on drop, as kubelet
/// unmounts before it removes the pod's directory.
pub struct TmpfsOn(pub PathBuf);

impl TmpfsOn {
    pub fn mount(dir: &Path) -> TmpfsOn {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        TmpfsOn(dir.to_path_buf())
    }
}

impl Drop for TmpfsOn {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A bind mount of `src` on the existing directory `dir`, as a runtime
/// makes one of a volume for each container; unmounted (lazily) on drop.
pub struct BindMount(pub PathBuf);

impl BindMount {
    pub fn new(src: &Path, dir: &Path) -> BindMount {
        let st = Command::new("mount")
            .arg("--bind")
            .arg(src)
            .arg(dir)
            .status()
            .expect("mount --bind");
        assert!(st.success(), "bind {} on {}", src.display(), dir.display());
        BindMount(dir.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A tmpfs mounted on a fresh directory, unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(&format!("detector-tmpfs-{name}")));
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `detector run`, stopped with SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    pub metrics: SocketAddr,
    pub events_path: PathBuf,
    pub alerts_path: PathBuf,
    pub log_path: PathBuf,
    pub dir: PathBuf,
    /// The directory belongs to the test (`start_in`): never removed here.
    keep_dir: bool,
}

impl Daemon {
    /// Start the daemon with `args` after `run`, wait for /readyz.
    /// Decoded events go to `events.jsonl`, findings to `alerts.jsonl`,
    /// logs to `daemon.log`, all in a fresh directory.
    pub fn start(args: &[&str]) -> Result<Daemon> {
        let dir = std::env::temp_dir().join(unique("detector-daemon"));
        let mut d = Daemon::start_in(&dir, args)?;
        d.keep_dir = false;
        Ok(d)
    }

    /// Like `start`, with its files in `dir` (created if needed, appended to,
    /// never removed): a restarted daemon writes on where the last one stopped.
    pub fn start_in(dir: &Path, args: &[&str]) -> Result<Daemon> {
        Daemon::spawn(dir, args, false)
    }

    /// Like `start`, in a mount namespace of its own whose mounts are
    /// slaves of ours, as a DaemonSet's container sees the host's kubelet
    /// directory (`hostPath` with `HostToContainer` propagation): the same
    /// files, through copies of our mounts.
    pub fn start_with_own_mounts(args: &[&str]) -> Result<Daemon> {
        let dir = std::env::temp_dir().join(unique("detector-daemon"));
        let mut d = Daemon::spawn(&dir, args, true)?;
        d.keep_dir = false;
        Ok(d)
    }

    fn spawn(dir: &Path, args: &[&str], own_mounts: bool) -> Result<Daemon> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let events_path = dir.join("events.jsonl");
        let alerts_path = dir.join("alerts.jsonl");
        let log_path = dir.join("daemon.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(detector_bin());
        cmd.arg("run")
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--debug-events")
            .arg(&events_path)
            .arg("--alerts")
            .arg(&alerts_path)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if !args.contains(&"--kubelet-dir") {
            // Keep tests independent of whatever this host has in /var/lib/kubelet.
            let empty = dir.join("no-kubelet");
            cmd.arg("--kubelet-dir").arg(empty);
        }
        if own_mounts {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe syscalls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(
                            std::ptr::null(),
                            c"/".as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_SLAVE,
                            std::ptr::null(),
                        ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", detector_bin().display()))?;
        let mut d = Daemon {
            child,
            metrics,
            events_path,
            alerts_path,
            log_path,
            dir,
            keep_dir: true,
        };
        d.wait_ready(Duration::from_secs(60))?;
        Ok(d)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("daemon exited with {st} before ready; log:\n{}", self.log());
            }
            if let Ok((200, _)) = http_get(self.metrics, "/readyz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("daemon not ready in {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last decoded events and findings, for a failure message.
    pub fn tails(&self) -> String {
        let tail = |p: &Path| {
            let s = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "last events ({}):\n{}\nlast findings ({}):\n{}",
            self.events_path.display(),
            tail(&self.events_path),
            self.alerts_path.display(),
            tail(&self.alerts_path)
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<Value> {
        read_jsonl(&self.events_path)
    }

    pub fn findings(&self) -> Vec<Value> {
        read_jsonl(&self.alerts_path)
    }

    /// Wait until an event matching `pred` appears; returns all matching.
    pub fn wait_events(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        wait_for(timeout, || {
            let v: Vec<Value> = self.events().into_iter().filter(|e| pred(e)).collect();
            (!v.is_empty()).then_some(v)
        })
        .unwrap_or_else(|| {
            panic!(
                "no matching event within {timeout:?}; daemon log:\n{}\n{}",
                self.log(),
                self.tails()
            )
        })
    }

    pub fn wait_findings(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        wait_for(timeout, || {
            let v: Vec<Value> = self.findings().into_iter().filter(|e| pred(e)).collect();
            (!v.is_empty()).then_some(v)
        })
        .unwrap_or_else(|| {
            panic!(
                "no matching finding within {timeout:?}; daemon log:\n{}\n{}",
                self.log(),
                self.tails()
            )
        })
    }

    /// Let in-flight events drain (the reader polls every few ms).
    pub fn settle(&self) {
        std::thread::sleep(Duration::from_millis(400));
    }

    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The value of one exported series, `series` being its name and labels
    /// exactly as exposed (`detector_credential_leases{state="held"}`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics_text().lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// How many credential files are in lease `state` (held, waiting, refused).
    pub fn leases(&self, state: &str) -> Option<i64> {
        self.metric(&format!("detector_credential_leases{{state=\"{state}\"}}"))
            .map(|v| v as i64)
    }

    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if self.keep_dir {
            return;
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("daemon files kept in {}", self.dir.display());
        }
    }
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// Poll `f` every 25 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Minimal HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Fields of a JSON event as u64, for terse assertions.
pub fn u(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}
