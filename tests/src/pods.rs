//! "Pods" as a kubelet would leave them on a node, for the intent and
//! enforcement tests and the demo (../shared/RUNTIME.md):
//!
//! - a kubelet directory on its own tmpfs ([`Node`]) holding, per pod, a
//!   projected service-account volume exactly as kubelet's atomic writer lays
//!   it out: `pods/<uid>/volumes/kubernetes.io~projected/kube-api-access-xxxxx/`
//!   with `..<timestamp>/{token,ca.crt,namespace}`, `..data -> ..<timestamp>`
//!   and `token -> ..data/token`;
//! - a runc container in `/kubepods/besteffort/pod<uid>/<64-hex id>` whose
//!   `/var/run/secrets/kubernetes.io/serviceaccount` is a read-only bind mount
//!   of that volume directory (as kubelet mounts it: same inode inside and
//!   out);
//! - its own network namespace with a veth: host side `169.254.X.1/30`, pod
//!   side `169.254.X.2/30` (listeners for tests go on the host side; nothing
//!   else is ever addressed);
//! - optionally the tiny static "app" (tests/fixtures/app.c, built with
//!   `gcc -static`) at `/app/server`, a hostPath mount of the kubelet pods
//!   directory at `/host/pods`, or the host's pid namespace (hostPID).
//!
//! Everything is removed on drop, also when a test fails: the container
//! (`runc kill`, `runc delete -f`), the cgroup directories runc created in
//! every hierarchy (bottom-up), the veth, the pod's kubelet directory, the
//! bundle, and the claim on the 169.254.X.0/30 subnet.

use std::{
    fs::File,
    io::Write,
    net::Ipv4Addr,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{
    runc::{
        cgroup_mounts, cgroup_path, kill_and_delete, new_container_id, new_pod_uid,
        remove_cgroup_dirs, runc, Layout, TOKEN_PATH,
    },
    unique, Tmpfs,
};

/// Where kubelet mounts the service-account volume in every container.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The hostPath mount of `<kubelet>/pods` in pods made with [`PodSpec::host_kubelet`].
pub const HOST_PODS: &str = "/host/pods";
const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "sleep", "cat", "ls", "true", "false", "head", "nc", "wget", "echo", "dd", "kill",
    "timeout",
];

/// A kubelet directory (`<dir>/pods/...`) on its own tmpfs.
pub struct Node {
    pub kubelet: Tmpfs,
}

impl Node {
    pub fn new() -> Node {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_stale);
        let kubelet = Tmpfs::new("kubelet");
        std::fs::create_dir_all(kubelet.dir.join("pods")).expect("mkdir pods");
        Node { kubelet }
    }

    pub fn dir(&self) -> &Path {
        &self.kubelet.dir
    }

    pub fn dir_str(&self) -> &str {
        self.kubelet.dir.to_str().expect("utf-8 temp dir")
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.kubelet.dir.join("pods")
    }
}

impl Default for Node {
    fn default() -> Self {
        Node::new()
    }
}

/// What a pod looks like.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    /// Copy the static app to `/app/server`.
    pub app: bool,
    /// Share the host's pid namespace (hostPID: true).
    pub host_pid: bool,
    /// Mount the node's `<kubelet>/pods` read-only at [`HOST_PODS`] (a hostPath volume).
    pub host_kubelet: bool,
}

impl PodSpec {
    pub fn new(name: &str) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: "default".into(),
            app: false,
            host_pid: false,
            host_kubelet: false,
        }
    }
    pub fn app(mut self) -> PodSpec {
        self.app = true;
        self
    }
    pub fn host_pid(mut self) -> PodSpec {
        self.host_pid = true;
        self
    }
    pub fn host_kubelet(mut self) -> PodSpec {
        self.host_kubelet = true;
        self
    }
}

/// The result of a command run in a pod.
#[derive(Debug)]
pub struct Exec {
    /// Host pid of the process `runc exec` started (0 if it never started).
    pub pid: u32,
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Exec {
    pub fn text(&self) -> String {
        format!(
            "exit={:?} timed_out={} stdout={:?} stderr={:?}",
            self.status, self.timed_out, self.stdout, self.stderr
        )
    }
}

/// A running pod: its kubelet files, its container and its network.
pub struct Pod {
    pub spec: PodSpec,
    pub uid: String,
    pub container_id: String,
    /// Projected volume directory in the kubelet dir.
    pub volume_dir: PathBuf,
    /// `<volume_dir>/token`, the path kubelet users see (a symlink chain).
    pub token: PathBuf,
    /// The token file itself (`<volume_dir>/..<timestamp>/token`).
    pub token_file: PathBuf,
    /// Host pid of the container's init.
    pub pid: u32,
    /// Cgroup path relative to every hierarchy's root.
    pub cgroup_path: String,
    /// Cgroup-v2 id of the container.
    pub cgroup_id: u64,
    /// Host side of the pod's veth (listeners go here).
    pub host_ip: Ipv4Addr,
    /// The pod's own address.
    pub pod_ip: Ipv4Addr,
    bundle: PathBuf,
    state_root: PathBuf,
    pod_dir: PathBuf,
    veth: String,
    slot: Option<NetSlot>,
    created_dirs: Vec<PathBuf>,
    started: bool,
}

/// The static app (tests/fixtures/app.c), built once per process into
/// `target/detector-fixtures/` with `gcc -static`.
pub fn app_binary() -> &'static Path {
    static APP: OnceLock<PathBuf> = OnceLock::new();
    APP.get_or_init(|| build_app().unwrap_or_else(|e| panic!("building the test app: {e:#}")))
}

fn build_app() -> Result<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = here.join("fixtures/app.c");
    let out_dir = here.join("../target/detector-fixtures");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("app-server");
    let tmp = out_dir.join(unique("app-server.tmp"));
    let o = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .context("running gcc (apt-get install gcc libc6-dev)")?;
    if !o.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "gcc -static {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// `..2026_11_23_10_00_00.123456789`, kubelet's atomic-writer directory name.
fn timestamp_dir_name() -> String {
    let now = chrono::Utc::now();
    format!(
        "{}{:09}",
        now.format("..%Y_%m_%d_%H_%M_%S."),
        now.timestamp_subsec_nanos()
    )
}

fn short_random() -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let id = new_container_id();
    id.as_bytes()[..5]
        .iter()
        .map(|b| ALPHA[*b as usize % ALPHA.len()] as char)
        .collect()
}

fn sh(cmd: &str) -> Result<()> {
    let o = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !o.status.success() {
        bail!("`{cmd}` failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

impl Pod {
    /// Lay out the pod's kubelet files, start its container, wire its network.
    pub fn start(node: &Node, spec: PodSpec) -> Result<Pod> {
        anyhow::ensure!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} missing (apt-get install busybox-static)"
        );
        let uid = new_pod_uid();
        let container_id = new_container_id();
        let cgroup_path = cgroup_path(Layout::Cgroupfs, "besteffort", &uid, &container_id);
        let bundle = std::env::temp_dir().join(unique("detector-pod"));
        let pod_dir = node.pods_dir().join(&uid);
        let mut pod = Pod {
            spec: spec.clone(),
            uid: uid.clone(),
            container_id,
            volume_dir: PathBuf::new(),
            token: PathBuf::new(),
            token_file: PathBuf::new(),
            pid: 0,
            cgroup_path,
            cgroup_id: 0,
            host_ip: Ipv4Addr::UNSPECIFIED,
            pod_ip: Ipv4Addr::UNSPECIFIED,
            bundle,
            state_root: PathBuf::new(),
            pod_dir,
            veth: String::new(),
            slot: None,
            created_dirs: Vec::new(),
            started: false,
        };
        // From here on, Drop cleans up whatever was made.
        pod.write_kubelet_files(&spec)?;
        pod.write_bundle(node, &spec)?;
        pod.run()?;
        pod.wire_network()?;
        Ok(pod)
    }

    fn write_kubelet_files(&mut self, spec: &PodSpec) -> Result<()> {
        for d in ["containers", "plugins", "volumes"] {
            std::fs::create_dir_all(self.pod_dir.join(d))?;
        }
        std::fs::write(
            self.pod_dir.join("etc-hosts"),
            format!("127.0.0.1 localhost\n169.254.0.2 {}\n", spec.name),
        )?;
        let vol = self
            .pod_dir
            .join("volumes/kubernetes.io~projected")
            .join(format!("kube-api-access-{}", short_random()));
        std::fs::create_dir_all(&vol)?;
        std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o777))?;
        let ts_name = timestamp_dir_name();
        let ts = vol.join(&ts_name);
        std::fs::create_dir(&ts)?;
        std::fs::set_permissions(&ts, std::fs::Permissions::from_mode(0o755))?;
        // Not a real JWT, but shaped like one (and never anything secret).
        let token = format!(
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6{}.test-signature-{}",
            spec.namespace, self.uid
        );
        for (name, content) in [
            ("token", token.as_str()),
            (
                "ca.crt",
                "-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n",
            ),
            ("namespace", spec.namespace.as_str()),
        ] {
            std::fs::write(ts.join(name), content)?;
            std::fs::set_permissions(ts.join(name), std::fs::Permissions::from_mode(0o644))?;
        }
        symlink(&ts_name, vol.join("..data_tmp"))?;
        std::fs::rename(vol.join("..data_tmp"), vol.join("..data"))?;
        for name in ["token", "ca.crt", "namespace"] {
            symlink(format!("..data/{name}"), vol.join(name))?;
        }
        self.token = vol.join("token");
        self.token_file = ts.join("token");
        self.volume_dir = vol;
        Ok(())
    }

    fn write_bundle(&mut self, node: &Node, spec: &PodSpec) -> Result<()> {
        let rootfs = self.bundle.join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "app"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).context("copy busybox")?;
        for app in APPLETS {
            symlink("busybox", rootfs.join("bin").join(app))?;
        }
        if spec.app {
            std::fs::copy(app_binary(), rootfs.join("app/server")).context("copy app")?;
            std::fs::set_permissions(
                rootfs.join("app/server"),
                std::fs::Permissions::from_mode(0o755),
            )?;
        }
        std::fs::write(rootfs.join("etc/hostname"), format!("{}\n", spec.name))?;
        let st = Command::new("runc")
            .arg("spec")
            .current_dir(&self.bundle)
            .status()
            .context("runc spec")?;
        anyhow::ensure!(st.success(), "runc spec failed");
        let cfg_path = self.bundle.join("config.json");
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
        cfg["process"]["terminal"] = json!(false);
        cfg["process"]["args"] = json!(["/bin/sleep", "100000"]);
        cfg["hostname"] = json!(spec.name);
        cfg["root"]["readonly"] = json!(true);
        cfg["linux"]["cgroupsPath"] = json!(self.cgroup_path);
        let mounts = cfg["mounts"].as_array_mut().context("mounts")?;
        // kubelet bind-mounts the whole projected volume directory.
        mounts.push(json!({"destination": SA_DIR, "type": "bind", "source": self.volume_dir, "options": ["rbind", "ro"]}));
        if spec.host_kubelet {
            mounts.push(json!({"destination": HOST_PODS, "type": "bind", "source": node.pods_dir(), "options": ["rbind", "ro"]}));
        }
        if spec.host_pid {
            let ns = cfg["linux"]["namespaces"]
                .as_array_mut()
                .context("namespaces")?;
            ns.retain(|n| n["type"] != "pid");
        }
        debug_assert!(TOKEN_PATH.starts_with(SA_DIR));
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
        // Which cgroup directories runc will create (to remove them after).
        for m in cgroup_mounts() {
            let mut p = m.clone();
            let mut fresh = Vec::new();
            for c in self.cgroup_path.split('/').filter(|c| !c.is_empty()) {
                p = p.join(c);
                if !p.exists() {
                    fresh.push(p.clone());
                }
            }
            fresh.reverse();
            self.created_dirs.extend(fresh);
        }
        self.state_root = self.bundle.join("state");
        std::fs::create_dir_all(&self.state_root)?;
        Ok(())
    }

    /// runc's name for the container (short; the 64-hex id is the cgroup's).
    pub fn runc_name(&self) -> String {
        format!("dtp-{}", &self.container_id[..16])
    }

    fn run(&mut self) -> Result<()> {
        let pid_file = self.bundle.join("init.pid");
        self.started = true;
        // Not a pipe: the detached init inherits runc's stdio and would hold
        // a pipe open (and `output()` waiting) for as long as it runs.
        let err_path = self.bundle.join("runc-run.log");
        let st = runc(&self.state_root)
            .args(["run", "-d", "--pid-file"])
            .arg(&pid_file)
            .arg(self.runc_name())
            .current_dir(&self.bundle)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&err_path)?)
            .status()
            .context("runc run")?;
        if !st.success() {
            bail!(
                "runc run -d failed: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        self.pid = std::fs::read_to_string(&pid_file)?.trim().parse()?;
        self.cgroup_id = crate::inode_of(&self.cgroup2_dir());
        Ok(())
    }

    fn wire_network(&mut self) -> Result<()> {
        let slot = NetSlot::claim()?;
        let x = slot.x;
        self.slot = Some(slot);
        self.veth = format!("dtp{x}h");
        let peer = format!("dtp{x}c");
        // A veth left behind by a crashed run on this (now free) slot.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .status();
        self.host_ip = Ipv4Addr::new(169, 254, x, 1);
        self.pod_ip = Ipv4Addr::new(169, 254, x, 2);
        sh(&format!(
            "ip link add {} type veth peer name {peer}",
            self.veth
        ))?;
        sh(&format!("ip link set {peer} netns {}", self.pid))?;
        sh(&format!(
            "ip addr add {}/30 dev {} && ip link set {} up",
            self.host_ip, self.veth, self.veth
        ))?;
        sh(&format!(
            "nsenter -t {pid} -n sh -c 'ip link set {peer} name eth0 && ip addr add {ip}/30 dev eth0 && ip link set eth0 up && ip link set lo up'",
            pid = self.pid,
            ip = self.pod_ip
        ))?;
        Ok(())
    }

    pub fn cgroup2_dir(&self) -> PathBuf {
        crate::cgroup2_root().join(self.cgroup_path.trim_start_matches('/'))
    }

    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.spec.namespace, self.spec.name)
    }

    /// Run `args` in the pod (`runc exec`), wait at most `timeout`.
    /// The host pid of the started process comes from runc's pid file.
    pub fn exec(&self, args: &[&str], timeout: Duration) -> Result<Exec> {
        let dir = self.bundle.join(unique("exec"));
        std::fs::create_dir_all(&dir)?;
        let pid_file = dir.join("pid");
        let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
        let mut child = runc(&self.state_root)
            .arg("exec")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(self.runc_name())
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out_path)?)
            .stderr(File::create(&err_path)?)
            .spawn()
            .context("runc exec")?;
        let deadline = Instant::now() + timeout;
        let mut pid = 0;
        let (status, timed_out) = loop {
            if pid == 0 {
                pid = std::fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
            }
            if let Some(st) = child.try_wait()? {
                break (st.code(), false);
            }
            if Instant::now() > deadline {
                if pid != 0 {
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                let _ = child.kill();
                let st = child.wait()?;
                break (st.code(), true);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if pid == 0 {
            pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
        }
        let r = Exec {
            pid,
            status,
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
            timed_out,
        };
        let _ = std::fs::remove_dir_all(&dir);
        Ok(r)
    }

    /// `sh -c script` in the pod.
    pub fn sh(&self, script: &str, timeout: Duration) -> Result<Exec> {
        self.exec(&["/bin/sh", "-c", script], timeout)
    }

    /// Start `args` detached in the pod; output goes to `log`. Returns the host pid.
    pub fn spawn(&self, args: &[&str], log: &Path) -> Result<u32> {
        let pid_file = self.bundle.join(unique("spawn.pid"));
        let logf = File::create(log)?;
        let st = runc(&self.state_root)
            .args(["exec", "-d", "--pid-file"])
            .arg(&pid_file)
            .arg(self.runc_name())
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .status()
            .context("runc exec -d")?;
        if !st.success() {
            bail!(
                "runc exec -d {args:?} failed: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        Ok(std::fs::read_to_string(&pid_file)?.trim().parse()?)
    }

    /// kubelet's token rotation: a new `..<timestamp>` directory with a new
    /// token (new inode), `..data` swapped atomically, the old directory removed.
    pub fn rotate_token(&mut self) -> Result<()> {
        let old = std::fs::read_link(self.volume_dir.join("..data"))?;
        let ts_name = timestamp_dir_name();
        let ts = self.volume_dir.join(&ts_name);
        std::fs::create_dir(&ts)?;
        for (name, content) in [
            (
                "token",
                format!("eyJhbGciOiJSUzI1NiJ9.rotated.{}", self.uid),
            ),
            ("ca.crt", "-----BEGIN CERTIFICATE-----\n".into()),
            ("namespace", self.spec.namespace.clone()),
        ] {
            let mut f = File::create(ts.join(name))?;
            f.write_all(content.as_bytes())?;
        }
        let _ = std::fs::remove_file(self.volume_dir.join("..data_tmp"));
        symlink(&ts_name, self.volume_dir.join("..data_tmp"))?;
        std::fs::rename(
            self.volume_dir.join("..data_tmp"),
            self.volume_dir.join("..data"),
        )?;
        std::fs::remove_dir_all(self.volume_dir.join(old))?;
        self.token_file = ts.join("token");
        Ok(())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.started {
            kill_and_delete(&self.state_root, &self.runc_name());
        }
        // Processes a test exec'd detached may still be in the cgroup.
        let kill = self.cgroup2_dir().join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, b"1");
        }
        // Another pod keeps shared parents busy.
        remove_cgroup_dirs(&self.created_dirs);
        if !self.veth.is_empty() {
            // Usually gone with the netns already.
            let _ = Command::new("ip")
                .args(["link", "del", &self.veth])
                .stderr(Stdio::null())
                .status();
        }
        self.slot.take();
        let _ = std::fs::remove_dir_all(&self.pod_dir);
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

/// A claim on 169.254.X.0/30 (X in 150..=199), shared by every test process
/// on the machine through lock files in /run/detector-tests/net/.
struct NetSlot {
    x: u8,
    lock: PathBuf,
}

const NET_LOCKS: &str = "/run/detector-tests/net";

impl NetSlot {
    fn claim() -> Result<NetSlot> {
        std::fs::create_dir_all(NET_LOCKS)?;
        // Start at a pid-dependent slot so parallel processes rarely collide.
        let start = (std::process::id() % 50) as u8;
        for i in 0..50u8 {
            let x = 150 + (start + i) % 50;
            let lock = Path::new(NET_LOCKS).join(x.to_string());
            for _ in 0..2 {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&lock)
                {
                    Ok(mut f) => {
                        let _ = write!(f, "{}", std::process::id());
                        if address_in_use(x) {
                            // Someone outside our locking uses it: leave it alone.
                            drop(f);
                            let _ = std::fs::remove_file(&lock);
                            break;
                        }
                        return Ok(NetSlot { x, lock });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let owner: i32 = std::fs::read_to_string(&lock)
                            .ok()
                            .and_then(|s| s.trim().parse().ok())
                            .unwrap_or(0);
                        // A claim of a dead process is stale.
                        if owner > 0 && unsafe { libc::kill(owner, 0) } != 0 {
                            let _ = std::fs::remove_file(&lock);
                            continue;
                        }
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        bail!("no free 169.254.X.0/30 slot (X in 150..=199)")
    }
}

fn address_in_use(x: u8) -> bool {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output();
    let needle = format!(" 169.254.{x}.");
    out.map(|o| String::from_utf8_lossy(&o.stdout).contains(&needle))
        .unwrap_or(false)
}

impl Drop for NetSlot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// Exactly what a test's daemon sees of the kubelet layout, for messages.
pub fn describe(pod: &Pod) -> String {
    format!(
        "pod {} uid={} container={} cgroup={} (id {}) init pid={} ip={} host side={}",
        pod.full_name(),
        pod.uid,
        &pod.container_id[..12],
        pod.cgroup_path,
        pod.cgroup_id,
        pod.pid,
        pod.pod_ip,
        pod.host_ip
    )
}

/// The captured output of a finished process, for assertion messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "{} stdout={:?} stderr={:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// True if `pid` names a live process.
fn alive(pid: i32) -> bool {
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The pid in `<prefix><pid>-<n>` (names made by [`unique`]).
fn owner_pid(name: &str, prefix: &str) -> Option<i32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

/// Remove what test processes that died without running their destructors
/// (SIGKILL, Ctrl-C, a timeout) left behind: their containers, the cgroup
/// directories of those containers, their pod bundles and their kubelet
/// tmpfs mounts. Only things named after a process that no longer exists.
pub fn sweep_stale() {
    let tmp = std::env::temp_dir();
    let Ok(dir) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name, "detector-pod-") else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        let bundle = entry.path();
        let state = bundle.join("state");
        for c in std::fs::read_dir(&state).into_iter().flatten().flatten() {
            let id = c.file_name().to_string_lossy().into_owned();
            let _ = runc(&state)
                .args(["kill", &id, "KILL"])
                .stderr(Stdio::null())
                .status();
            let _ = runc(&state)
                .args(["delete", "-f", &id])
                .stderr(Stdio::null())
                .status();
        }
        let cgroup = std::fs::read_to_string(bundle.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["linux"]["cgroupsPath"].as_str().map(str::to_string));
        if let Some(cg) = cgroup.filter(|c| c.starts_with("/kubepods/")) {
            let rel = cg.trim_start_matches('/');
            let _ = std::fs::write(crate::cgroup2_root().join(rel).join("cgroup.kill"), b"1");
            std::thread::sleep(Duration::from_millis(50));
            for m in cgroup_mounts() {
                let leaf = m.join(rel);
                let _ = std::fs::remove_dir(&leaf);
                if let Some(pod) = leaf.parent() {
                    let _ = std::fs::remove_dir(pod); // fails while another container uses it
                }
            }
        }
        eprintln!(
            "pods: removed leftovers of dead test process {pid}: {}",
            bundle.display()
        );
        let _ = std::fs::remove_dir_all(&bundle);
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let Some(mp) = line.split(' ').nth(1) else {
            continue;
        };
        let Some(name) = Path::new(mp)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            continue;
        };
        if Path::new(mp).parent() != Some(tmp.as_path()) {
            continue;
        }
        let Some(pid) = owner_pid(&name, "detector-tmpfs-kubelet-") else {
            continue;
        };
        if !alive(pid) {
            let _ = Command::new("umount").arg("-l").arg(mp).status();
            let _ = std::fs::remove_dir_all(mp);
        }
    }
}
