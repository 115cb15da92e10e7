//! A private containerd with its CRI plugin (../shared/RUNTIME.md): config,
//! root, state and socket under a fresh tmpfs, `restrict_oom_score_adj`,
//! a CNI bridge in 169.254.201.0/24, the cgroupfs driver, and busybox
//! images built here as docker-archive tars (one is also the sandbox image
//! `registry.k8s.io/pause:3.6`). Tests act as kubelet through
//! `detector::attribution::cri::CriClient`.
//!
//! Everything is removed on drop, also when a test fails: sandboxes are
//! stopped and removed over CRI, leftover tasks killed with `ctr`,
//! containerd and its shims stopped by PID, mounts under the directory
//! unmounted, the bridge deleted, the pod cgroups this harness was told
//! about removed in every hierarchy, the directory removed.

use std::{
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use detector::attribution::cri::{v1, CriClient};

use crate::unique;

pub const NAMESPACE: &str = "k8s.io";
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.6";
pub const BUSYBOX_IMAGE: &str = "docker.io/detector-test/busybox:1";
const SUBNET: &str = "169.254.201.0/24";

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub bridge: String,
    child: Option<Child>,
    /// Pod UIDs whose `/kubepods/besteffort/pod<uid>` cgroups to remove.
    pods: Vec<String>,
    mounted: bool,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Set `key = value` in TOML `section` of containerd's default config
/// (the section's own lines, up to the next header).
fn set_key(config: &mut String, section: &str, key: &str, value: &str) -> Result<()> {
    let header = format!("[{section}]");
    let mut out = Vec::new();
    let mut inside = false;
    let mut done = false;
    for line in config.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            inside = t == header;
        } else if inside && !done {
            if let Some(rest) = t.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    let indent = &line[..line.len() - t.len()];
                    out.push(format!("{indent}{key} = {value}"));
                    done = true;
                    continue;
                }
            }
        }
        out.push(line.to_string());
    }
    anyhow::ensure!(done, "{key} in {header} of the containerd config");
    *config = out.join("\n") + "\n";
    Ok(())
}

/// A docker-archive tar of a busybox rootfs, tagged `tags`, running `cmd`.
pub fn build_image(dir: &Path, name: &str, tags: &[&str], cmd: &[&str]) -> Result<PathBuf> {
    let work = dir.join(format!("img-{name}"));
    let rootfs = work.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "var/run/secrets"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("copy busybox")?;
    for app in [
        "sh", "sleep", "cat", "ls", "true", "head", "nc", "wget", "echo", "stat",
    ] {
        symlink("busybox", rootfs.join("bin").join(app))?;
    }
    let layer = work.join("layer.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    let sha = run(Command::new("sha256sum").arg(&layer))?;
    let sha = sha
        .split_whitespace()
        .next()
        .context("sha256sum")?
        .to_string();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{sha}")]},
    });
    std::fs::write(work.join("config.json"), serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!([{
        "Config": "config.json", "RepoTags": tags, "Layers": ["layer.tar"],
    }]);
    std::fs::write(work.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    let tar = dir.join(format!("{name}.tar"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&work)
        .arg("-cf")
        .arg(&tar)
        .args(["manifest.json", "config.json", "layer.tar"]))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(tar)
}

impl Containerd {
    /// Start containerd, wait for its CRI to answer, import the images.
    pub fn start() -> Result<Containerd> {
        anyhow::ensure!(
            Path::new("/usr/bin/containerd").exists(),
            "containerd missing (apt-get install containerd containernetworking-plugins)"
        );
        let dir = std::env::temp_dir().join(unique("detector-containerd"));
        std::fs::create_dir_all(&dir)?;
        let bridge = format!("dtcd{}", std::process::id() % 100_000);
        let mut me = Containerd {
            socket: dir.join("containerd.sock"),
            dir: dir.clone(),
            bridge: bridge.clone(),
            child: None,
            pods: Vec::new(),
            mounted: false,
        };
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512m,mode=0755", "tmpfs"])
            .arg(&dir))?;
        me.mounted = true;
        let cni_conf = dir.join("cni-conf");
        std::fs::create_dir_all(&cni_conf)?;
        std::fs::create_dir_all(dir.join("logs"))?;
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0", "name": "detector-test",
            "plugins": [{
                "type": "bridge", "bridge": bridge, "isGateway": false, "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                         "dataDir": dir.join("cni-ipam")},
            }],
        });
        std::fs::write(
            cni_conf.join("10-detector-test.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        let mut config = run(Command::new("containerd").args(["config", "default"]))?;
        let q = |p: &Path| format!("\"{}\"", p.display());
        // Top-level keys.
        config = config.replacen(
            "root = \"/var/lib/containerd\"",
            &format!("root = {}", q(&dir.join("root"))),
            1,
        );
        config = config.replacen(
            "state = \"/run/containerd\"",
            &format!("state = {}", q(&dir.join("state"))),
            1,
        );
        set_key(&mut config, "grpc", "address", &q(&me.socket))?;
        set_key(
            &mut config,
            "plugins.\"io.containerd.grpc.v1.cri\"",
            "restrict_oom_score_adj",
            "true",
        )?;
        set_key(
            &mut config,
            "plugins.\"io.containerd.grpc.v1.cri\"",
            "sandbox_image",
            &format!("\"{PAUSE_IMAGE}\""),
        )?;
        set_key(
            &mut config,
            "plugins.\"io.containerd.grpc.v1.cri\".cni",
            "bin_dir",
            "\"/usr/lib/cni\"",
        )?;
        set_key(
            &mut config,
            "plugins.\"io.containerd.grpc.v1.cri\".cni",
            "conf_dir",
            &q(&cni_conf),
        )?;
        std::fs::write(dir.join("config.toml"), &config)?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn containerd")?;
        me.child = Some(child);
        // Wait for the CRI to answer.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("containerd exited with {st}: {}", me.log());
            }
            if me.socket.exists()
                && me
                    .block_on(|mut c| async move { c.version().await })
                    .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("containerd CRI not ready in 30 s: {}", me.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let pause = build_image(&dir, "pause", &[PAUSE_IMAGE], &["/bin/sleep", "2147483647"])?;
        let busybox = build_image(&dir, "busybox", &[BUSYBOX_IMAGE], &["/bin/sh"])?;
        for tar in [pause, busybox] {
            run(me.ctr().args(["images", "import"]).arg(&tar))?;
        }
        Ok(me)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket).args(["-n", NAMESPACE]);
        c
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Run `f` with a fresh CRI client on a private runtime in its own
    /// thread (usable from sync code, async code and `Drop`).
    pub fn block_on<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(CriClient) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let socket = self.socket.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let c = CriClient::connect(&socket).await?;
                f(c).await
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("CRI thread panicked"))?
    }

    /// The cgroup parent kubelet would give a besteffort pod (cgroupfs driver).
    pub fn cgroup_parent(pod_uid: &str) -> String {
        format!("/kubepods/besteffort/pod{pod_uid}")
    }

    /// A sandbox config as kubelet makes it (with its `io.kubernetes.pod.*` labels).
    pub fn sandbox_config(
        &mut self,
        name: &str,
        namespace: &str,
        uid: &str,
        labels: &[(&str, &str)],
    ) -> v1::PodSandboxConfig {
        self.pods.push(uid.to_string());
        let mut l: std::collections::HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("io.kubernetes.pod.name".into(), name.into());
        l.insert("io.kubernetes.pod.namespace".into(), namespace.into());
        l.insert("io.kubernetes.pod.uid".into(), uid.into());
        let logs = self.dir.join("logs").join(uid);
        let _ = std::fs::create_dir_all(&logs);
        v1::PodSandboxConfig {
            metadata: Some(v1::PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: logs.display().to_string(),
            labels: l,
            annotations: Default::default(),
            linux: Some(v1::LinuxPodSandboxConfig {
                cgroup_parent: Self::cgroup_parent(uid),
            }),
        }
    }

    /// A container config as kubelet makes it.
    pub fn container_config(
        sandbox: &v1::PodSandboxConfig,
        name: &str,
        args: &[&str],
        mounts: Vec<v1::Mount>,
    ) -> v1::ContainerConfig {
        let mut labels = std::collections::HashMap::new();
        let md = sandbox.metadata.clone().unwrap_or_default();
        labels.insert("io.kubernetes.container.name".to_string(), name.to_string());
        labels.insert("io.kubernetes.pod.name".into(), md.name);
        labels.insert("io.kubernetes.pod.namespace".into(), md.namespace);
        labels.insert("io.kubernetes.pod.uid".into(), md.uid);
        v1::ContainerConfig {
            metadata: Some(v1::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(v1::ImageSpec {
                image: BUSYBOX_IMAGE.into(),
            }),
            command: args.iter().map(|s| s.to_string()).collect(),
            args: Vec::new(),
            mounts,
            labels,
        }
    }

    /// Stop and remove every sandbox (and with them their containers) over CRI.
    pub fn remove_all_pods(&self) -> Result<()> {
        self.block_on(|mut c| async move {
            for ctr in c.list_containers().await? {
                let _ = c.stop_container(&ctr.id, 0).await;
                let _ = c.remove_container(&ctr.id).await;
            }
            for s in c.list_pod_sandbox().await? {
                c.stop_pod_sandbox(&s.id).await?;
                c.remove_pod_sandbox(&s.id).await?;
            }
            Ok(())
        })
    }

    /// PIDs of this containerd's shims (their command line names our socket).
    fn shim_pids(&self) -> Vec<i32> {
        let sock = self.socket.display().to_string();
        let mut pids = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.starts_with("/usr/bin/containerd-shim") && cmd.contains(&sock) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let alive = self
            .child
            .as_mut()
            .map(|c| c.try_wait().ok().flatten().is_none())
            .unwrap_or(false);
        if alive {
            if let Err(e) = self.remove_all_pods() {
                eprintln!("containerd cleanup over CRI: {e:#}");
            }
            // Anything CRI did not take down.
            if let Ok(out) = self.ctr().args(["tasks", "ls", "-q"]).output() {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = self
                        .ctr()
                        .args(["tasks", "kill", "-s", "SIGKILL", id])
                        .output();
                    std::thread::sleep(Duration::from_millis(100));
                    let _ = self.ctr().args(["tasks", "delete", "-f", id]).output();
                }
            }
            if let Ok(out) = self.ctr().args(["containers", "ls", "-q"]).output() {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = self.ctr().args(["containers", "delete", id]).output();
                }
            }
        }
        let shims = self.shim_pids();
        if let Some(child) = self.child.as_mut() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in shims {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Mounts under our directory (rootfs snapshots, shm), deepest first.
        let dir = self.dir.display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
            .filter(|m| m.starts_with(&format!("{dir}/")))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        for uid in &self.pods {
            for m in crate::runc::cgroup_mounts() {
                let pod = m.join(Self::cgroup_parent(uid).trim_start_matches('/'));
                if let Ok(rd) = std::fs::read_dir(&pod) {
                    for e in rd.flatten() {
                        if e.path().is_dir() {
                            let _ = std::fs::remove_dir(e.path());
                        }
                    }
                }
                let _ = std::fs::remove_dir(&pod);
                // Shared parents only if empty (others may use them).
                let _ = std::fs::remove_dir(m.join("kubepods/besteffort"));
                let _ = std::fs::remove_dir(m.join("kubepods"));
            }
        }
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        if std::thread::panicking() {
            eprintln!("containerd log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
