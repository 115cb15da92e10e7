//! Real runc containers in kubepods cgroup paths (../shared/RUNTIME.md):
//! a busybox-static rootfs, `linux.cgroupsPath` in the cgroupfs or the
//! systemd layout, and optionally a host file bind-mounted read-only as the
//! service-account token. Everything is removed on drop, also on failure:
//! the container (`runc kill`, `runc delete -f`), runc's state dir, the
//! bundle, and the cgroup parent directories runc leaves behind in every
//! hierarchy (only those that did not exist before).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::unique;

pub const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const BUSYBOX: &str = "/bin/busybox";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `/kubepods/<qos>/pod<uid>/<container-id>`
    Cgroupfs,
    /// `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope`
    Systemd,
}

/// A fresh random-looking pod UID (RFC 4122 shape).
pub fn new_pod_uid() -> String {
    let n = fastrand_u128();
    let h = format!("{n:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// A 64-hex container id like containerd's.
pub fn new_container_id() -> String {
    format!("{:032x}{:032x}", fastrand_u128(), fastrand_u128())
}

fn fastrand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut v = 0u128;
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(v);
        h.write_u32(std::process::id());
        v = (v << 64) | h.finish() as u128;
    }
    v
}

/// The cgroup path (relative to each hierarchy's root) of a container.
pub fn cgroup_path(layout: Layout, qos: &str, pod_uid: &str, container_id: &str) -> String {
    match layout {
        Layout::Cgroupfs if qos == "guaranteed" => format!("/kubepods/pod{pod_uid}/{container_id}"),
        Layout::Cgroupfs => format!("/kubepods/{qos}/pod{pod_uid}/{container_id}"),
        Layout::Systemd => {
            let u = pod_uid.replace('-', "_");
            format!(
                "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice/cri-containerd-{container_id}.scope"
            )
        }
    }
}

/// Mount points of every cgroup hierarchy (v1 and v2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub layout: Layout,
    pub qos: String,
    pub pod_uid: String,
    pub container_id: String,
    pub args: Vec<String>,
    /// Host file bind-mounted read-only at [`TOKEN_PATH`].
    pub token: Option<PathBuf>,
    /// Host directory (a kubelet projected volume) bind-mounted read-only
    /// at the token's directory, as kubelet mounts volumes: `..data`
    /// swaps are visible inside.
    pub volume: Option<PathBuf>,
}

impl Spec {
    pub fn new(layout: Layout, args: &[&str]) -> Spec {
        Spec {
            layout,
            qos: "besteffort".into(),
            pod_uid: new_pod_uid(),
            container_id: new_container_id(),
            args: args.iter().map(|s| s.to_string()).collect(),
            token: None,
            volume: None,
        }
    }

    pub fn volume(mut self, host_dir: &Path) -> Spec {
        self.volume = Some(host_dir.to_path_buf());
        self
    }

    pub fn token(mut self, host_file: &Path) -> Spec {
        self.token = Some(host_file.to_path_buf());
        self
    }

    pub fn pod(mut self, uid: &str) -> Spec {
        self.pod_uid = uid.into();
        self
    }

    pub fn cgroup_path(&self) -> String {
        cgroup_path(self.layout, &self.qos, &self.pod_uid, &self.container_id)
    }
}

/// A runc container (detached, or already finished for [`Container::run_to_end`]).
pub struct Container {
    pub spec: Spec,
    pub dir: PathBuf,
    pub state_root: PathBuf,
    /// Host PID of the container's init (0 once gone).
    pub pid: u32,
    /// Relative to every hierarchy's root.
    pub cgroup_path: String,
    /// Cgroup-v2 id (inode of the cgroup-v2 directory) while it lived, if seen.
    pub cgroup_id: Option<u64>,
    /// Cgroup dirs that did not exist before, deepest first, in every hierarchy.
    created_dirs: Vec<PathBuf>,
}

pub(crate) fn runc(state_root: &Path) -> Command {
    let mut c = Command::new("runc");
    c.arg("--root").arg(state_root);
    c
}

impl Container {
    fn prepare(spec: Spec) -> Result<Container> {
        anyhow::ensure!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} missing (apt-get install busybox-static)"
        );
        let dir = std::env::temp_dir().join(unique("detector-runc"));
        let rootfs = dir.join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).context("copy busybox")?;
        for app in [
            "sh", "sleep", "cat", "ls", "true", "head", "nc", "wget", "echo", "dd", "stat",
        ] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(app))?;
        }
        let st = Command::new("runc")
            .arg("spec")
            .current_dir(&dir)
            .status()
            .context("runc spec")?;
        anyhow::ensure!(st.success(), "runc spec failed");
        let cfg_path = dir.join("config.json");
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
        cfg["process"]["terminal"] = json!(false);
        cfg["process"]["args"] = json!(spec.args);
        cfg["root"]["readonly"] = json!(true);
        let cgroup_path = spec.cgroup_path();
        cfg["linux"]["cgroupsPath"] = json!(cgroup_path);
        if let Some(tok) = &spec.token {
            cfg["mounts"].as_array_mut().context("mounts")?.push(json!({
                "destination": TOKEN_PATH, "type": "bind",
                "source": tok, "options": ["rbind", "ro"]
            }));
        }
        if let Some(dir) = &spec.volume {
            cfg["mounts"].as_array_mut().context("mounts")?.push(json!({
                "destination": Path::new(TOKEN_PATH).parent().unwrap(), "type": "bind",
                "source": dir, "options": ["rbind", "ro"]
            }));
        }
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
        // Remember which cgroup directories runc will create.
        let mut created_dirs = Vec::new();
        for m in cgroup_mounts() {
            let mut p = m.clone();
            let mut fresh = Vec::new();
            for c in cgroup_path.split('/').filter(|c| !c.is_empty()) {
                p = p.join(c);
                if !p.exists() {
                    fresh.push(p.clone());
                }
            }
            fresh.reverse();
            created_dirs.extend(fresh);
        }
        let state_root = dir.join("state");
        std::fs::create_dir_all(&state_root)?;
        {
            let mut g = CREATED.lock().unwrap_or_else(|e| e.into_inner());
            g.0 += 1;
            g.1.extend(created_dirs.iter().cloned());
        }
        Ok(Container {
            spec,
            dir,
            state_root,
            pid: 0,
            cgroup_path,
            cgroup_id: None,
            created_dirs,
        })
    }

    fn name(&self) -> String {
        // runc ids are at most 1024 chars; keep it short and unique.
        format!("dt-{}", &self.spec.container_id[..16])
    }

    /// Start detached; returns once the init process runs.
    pub fn start(spec: Spec) -> Result<Container> {
        let mut c = Container::prepare(spec)?;
        let pid_file = c.dir.join("pid");
        // The container inherits stdio: a pipe would keep `output()` waiting
        // for the container to end, so stderr goes to a file.
        let log = c.dir.join("runc.log");
        let st = runc(&c.state_root)
            .args(["run", "-d", "--pid-file"])
            .arg(&pid_file)
            .arg(c.name())
            .current_dir(&c.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .status()
            .context("runc run")?;
        if !st.success() {
            bail!(
                "runc run -d failed: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        c.pid = std::fs::read_to_string(&pid_file)?.trim().parse()?;
        c.cgroup_id =
            std::fs::metadata(crate::cgroup2_root().join(c.cgroup_path.trim_start_matches('/')))
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        Ok(c)
    }

    /// Run in the foreground to the end (runc deletes the container and its
    /// cgroup when it exits). Returns the container (for cleanup) and its output.
    pub fn run_to_end(spec: Spec) -> Result<(Container, std::process::Output, Duration)> {
        let c = Container::prepare(spec)?;
        let t = Instant::now();
        let out = runc(&c.state_root)
            .arg("run")
            .arg(c.name())
            .current_dir(&c.dir)
            .stdin(Stdio::null())
            .output()
            .context("runc run")?;
        Ok((c, out, t.elapsed()))
    }

    /// Run a command inside the running container.
    pub fn exec(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(runc(&self.state_root)
            .arg("exec")
            .arg(self.name())
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    pub fn cgroup2_dir(&self) -> PathBuf {
        crate::cgroup2_root().join(self.cgroup_path.trim_start_matches('/'))
    }
}

/// Cgroup dirs created by containers of this process, and how many of its
/// containers live: parents shared by concurrent tests (`/kubepods/besteffort`)
/// are removed when the last container goes.
static CREATED: std::sync::Mutex<(usize, Vec<PathBuf>)> = std::sync::Mutex::new((0, Vec::new()));

/// Removes the cgroup directories, deepest first; one another container
/// still uses (ENOTEMPTY) is left to it.
pub(crate) fn remove_cgroup_dirs(dirs: &[PathBuf]) {
    let mut dirs = dirs.to_vec();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.dedup();
    for d in &dirs {
        for _ in 0..40 {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => break,
                Err(_) => std::thread::sleep(Duration::from_millis(25)),
            }
        }
    }
}

/// SIGKILLs container `name` and deletes it (retried for up to 5 s while
/// runc still sees it running).
pub(crate) fn kill_and_delete(state_root: &Path, name: &str) {
    let _ = runc(state_root)
        .args(["kill", name, "KILL"])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = runc(state_root)
            .args(["delete", "-f", name])
            .stderr(Stdio::null())
            .status();
        let gone = !state_root.join(name).exists();
        if st.map(|s| s.success()).unwrap_or(false) || gone || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        kill_and_delete(&self.state_root, &self.name());
        remove_cgroup_dirs(&self.created_dirs);
        let last = {
            let mut g = CREATED.lock().unwrap_or_else(|e| e.into_inner());
            g.0 = g.0.saturating_sub(1);
            (g.0 == 0).then(|| std::mem::take(&mut g.1))
        };
        if let Some(all) = last {
            remove_cgroup_dirs(&all);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kubelet's AtomicWriter, exactly: a new `..<timestamp>` dir with the
/// payload, a `..data_tmp` symlink renamed over `..data`, user-visible
/// symlinks created once, then the previous timestamped dir removed.
/// Returns the new timestamped dir.
pub fn kubelet_atomic_write(vol: &Path, files: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let old = std::fs::read_link(vol.join("..data")).ok();
    let now = chrono::Utc::now();
    let name = format!(
        "{}{:09}",
        now.format("..%Y_%m_%d_%H_%M_%S."),
        now.timestamp_subsec_nanos()
    );
    let ts = vol.join(&name);
    std::fs::create_dir(&ts).unwrap();
    std::fs::set_permissions(&ts, std::fs::Permissions::from_mode(0o750)).unwrap();
    for (n, content) in files {
        std::fs::write(ts.join(n), content).unwrap();
        std::fs::set_permissions(ts.join(n), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let _ = std::fs::remove_file(vol.join("..data_tmp"));
    symlink(&name, vol.join("..data_tmp")).unwrap();
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
    for (n, _) in files {
        if std::fs::symlink_metadata(vol.join(n)).is_err() {
            symlink(format!("..data/{n}"), vol.join(n)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(vol.join(old)).unwrap();
    }
    ts
}
