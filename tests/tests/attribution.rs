//! Attribution of real runc containers in kubepods cgroups (both layouts):
//! as a library (the cgroup-v2 tree), and through the daemon, where the
//! kernel's cgroup mkdir/rmdir events let a container that is already gone
//! be attributed after the fact.

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use detector::attribution::{parse_cgroup_path, Attributor, Runtime};
use detector_tests::{
    cgroup2_root, require_root,
    runc::{
        cgroup_path, kubelet_atomic_write, new_container_id, new_pod_uid, Container, Layout, Spec,
        TOKEN_PATH,
    },
    Daemon, Tmpfs,
};
use serde_json::Value;

fn token_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("token-of-{name}")).unwrap();
    p
}

#[test]
fn runc_containers_in_both_layouts_resolve() {
    require_root();
    let tmp = Tmpfs::new("attr-lib");
    let mut attr = Attributor::new(cgroup2_root());
    attr.min_rescan = Duration::ZERO;
    for layout in [Layout::Cgroupfs, Layout::Systemd] {
        let tok = token_file(&tmp.dir, &format!("{layout:?}"));
        let c = Container::start(Spec::new(layout, &["sleep", "30"]).token(&tok))
            .expect("runc container");
        // The process is where the layout says, in cgroup v2.
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", c.pid)).unwrap();
        assert!(
            own.lines().any(|l| l == format!("0::{}", c.cgroup_path)),
            "{own}"
        );
        // The token is the host file, same inode.
        let out = c.exec(&["stat", "-L", "-c", "%i", TOKEN_PATH]).unwrap();
        assert!(
            out.status.success(),
            "runc exec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let inside: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("stat inside");
        assert_eq!(inside, std::fs::metadata(&tok).unwrap().ino());

        let id = c.cgroup_id.expect("cgroup id");
        // A miss: the attributor rescans the tree and finds it.
        let w = attr.resolve(id).expect("resolved");
        assert_eq!(w.cgroup_path, c.cgroup_path);
        assert!(w.live);
        let pod = w.pod.clone().expect("a pod cgroup");
        assert_eq!(pod.pod_uid, c.spec.pod_uid);
        assert_eq!(
            pod.container_id.as_deref(),
            Some(c.spec.container_id.as_str())
        );
        assert_eq!(pod.qos.as_deref(), Some("besteffort"));
        assert_eq!(
            pod.runtime,
            if layout == Layout::Systemd {
                Some(Runtime::Containerd)
            } else {
                None
            }
        );
        let fw = w.to_workload();
        assert_eq!(
            (fw.pod_uid.as_deref(), fw.cgroup_id),
            (Some(c.spec.pod_uid.as_str()), id)
        );
        // The pod-level cgroup is the pod, without a container.
        let pod_dir = c.cgroup2_dir().parent().unwrap().to_path_buf();
        let pw = attr
            .resolve(std::fs::metadata(&pod_dir).unwrap().ino())
            .unwrap();
        let pp = pw.pod.unwrap();
        assert_eq!(
            (pp.pod_uid.as_str(), pp.container_id),
            (c.spec.pod_uid.as_str(), None)
        );
        // Gone: an rmdir the attributor did not see is noticed by a rescan;
        // the entry stays resolvable (events may be in flight).
        let path = c.cgroup_path.clone();
        drop(c);
        assert!(!cgroup2_root().join(path.trim_start_matches('/')).exists());
        attr.rescan();
        let w = attr.resolve(id).expect("still resolvable after removal");
        assert!(!w.live);
        assert_eq!(w.pod.unwrap().pod_uid, pod.pod_uid);
    }
}

#[test]
fn hostile_cgroup_paths_are_not_pods() {
    require_root();
    let root = cgroup2_root();
    let base = root.join(detector_tests::unique("kubepods-hostile"));
    let odd = base
        .join("kubepods")
        .join("besteffort")
        .join("podnot-a-uid")
        .join("x y");
    std::fs::create_dir_all(&odd).unwrap();
    struct Rm(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let mut p = self.0.clone();
            while p.starts_with(&self.1) {
                let _ = std::fs::remove_dir(&p);
                p = p.parent().unwrap().to_path_buf();
            }
        }
    }
    let _rm = Rm(odd.clone(), base.clone());
    let mut attr = Attributor::new(&root);
    let w = attr
        .resolve(std::fs::metadata(&odd).unwrap().ino())
        .expect("known cgroup");
    assert!(w.pod.is_none(), "{w:?}");
    assert!(w.cgroup_path.ends_with("/podnot-a-uid/x y"));
    assert!(parse_cgroup_path(&w.cgroup_path).is_none());
    assert!(attr.resolve(u64::MAX - 7).is_none());
}

fn events_of(d: &Daemon, kind: &str) -> Vec<Value> {
    d.events()
        .into_iter()
        .filter(|e| e["event"] == kind)
        .collect()
}

/// Pods A and B on a kubelet layout; A's projected volume mounted into
/// short-lived containers of A (own token: quiet) and B (foreign token:
/// a finding naming B's pod and container). Both containers are gone
/// before anything is resolved.
#[test]
fn short_lived_containers_attributed_through_the_daemon() {
    require_root();
    let kubelet = Tmpfs::new("attr-kubelet");
    let uid_a = new_pod_uid();
    let vol = kubelet
        .dir
        .join("pods")
        .join(&uid_a)
        .join("volumes/kubernetes.io~projected/kube-api-access-aaaaa");
    std::fs::create_dir_all(&vol).unwrap();
    kubelet_atomic_write(
        &vol,
        &[("token", "token-a"), ("ca.crt", "ca"), ("namespace", "a")],
    );
    let ino = std::fs::metadata(vol.join("token")).unwrap().ino();
    let kdir = kubelet.dir.display().to_string();
    let d = Daemon::start(&["--kubelet-dir", &kdir]).expect("daemon");
    detector_tests::wait_for(Duration::from_secs(10), || {
        d.log().contains("watching credential").then_some(())
    })
    .unwrap_or_else(|| panic!("credential not watched; log:\n{}", d.log()));

    let read = ["cat", TOKEN_PATH];
    let own = Spec::new(Layout::Cgroupfs, &read).pod(&uid_a).volume(&vol);
    let (ca, out_a, took_a) = Container::run_to_end(own).unwrap();
    assert!(
        out_a.status.success(),
        "{}",
        String::from_utf8_lossy(&out_a.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out_a.stdout), "token-a");
    let foreign = Spec::new(Layout::Systemd, &read).volume(&vol);
    let (cb, out_b, took_b) = Container::run_to_end(foreign).unwrap();
    assert!(
        out_b.status.success(),
        "{}",
        String::from_utf8_lossy(&out_b.stderr)
    );
    eprintln!("runc run took {took_a:?} and {took_b:?}");
    for c in [&ca, &cb] {
        assert!(!c.cgroup2_dir().exists(), "container cgroup should be gone");
    }

    // The finding: B read A's token.
    let f = d.wait_findings(Duration::from_secs(10), |f| {
        f["kind"] == "foreign_credential"
    });
    let f = &f[0];
    assert_eq!(f["workload"]["pod_uid"], cb.spec.pod_uid.as_str(), "{f}");
    assert_eq!(
        f["workload"]["container_id"],
        cb.spec.container_id.as_str(),
        "{f}"
    );
    assert_eq!(f["workload"]["cgroup_path"], cb.cgroup_path.as_str(), "{f}");
    assert_eq!(f["credential"]["owner_pod_uid"], uid_a.as_str(), "{f}");
    assert_eq!(f["credential"]["inode"], ino, "{f}");
    d.settle();
    let findings = d.findings();
    assert_eq!(
        findings
            .iter()
            .filter(|f| f["kind"] == "foreign_credential")
            .count(),
        1,
        "A reading its own token must not be foreign: {findings:#?}"
    );

    // The same from the raw kernel events, resolved after the fact as the
    // daemon does: the cgroups were created and removed before this runs.
    let accesses: Vec<Value> = events_of(&d, "credential_access")
        .into_iter()
        .filter(|e| e["ino"] == ino)
        .collect();
    assert!(accesses.len() >= 2, "{accesses:#?}");
    let mut attr = Attributor::new("/nonexistent"); // only kernel events, no tree
    let mut lifetimes = Vec::new();
    let mut made = std::collections::HashMap::new();
    for e in d.events() {
        match e["event"].as_str() {
            Some("cgroup_mkdir") => {
                attr.observe_mkdir(e["id"].as_u64().unwrap(), e["path"].as_str().unwrap());
                made.insert(e["id"].as_u64().unwrap(), e["time_ns"].as_u64().unwrap());
            }
            Some("cgroup_rmdir") => {
                let id = e["id"].as_u64().unwrap();
                attr.observe_rmdir(id);
                if let Some(t0) = made.get(&id) {
                    lifetimes.push((
                        e["path"].as_str().unwrap_or("").to_string(),
                        e["time_ns"].as_u64().unwrap() - t0,
                    ));
                }
            }
            _ => {}
        }
    }
    for c in [&ca, &cb] {
        let e = accesses
            .iter()
            .find(|e| {
                attr.resolve(e["cgroup_id"].as_u64().unwrap())
                    .and_then(|w| w.pod)
                    .map(|p| p.pod_uid)
                    == Some(c.spec.pod_uid.clone())
            })
            .unwrap_or_else(|| {
                panic!(
                    "no access attributed to pod {}: {accesses:#?}",
                    c.spec.pod_uid
                )
            });
        let w = attr.resolve(e["cgroup_id"].as_u64().unwrap()).unwrap();
        assert!(!w.live);
        assert_eq!(
            w.pod.unwrap().container_id.as_deref(),
            Some(c.spec.container_id.as_str())
        );
        let life = lifetimes
            .iter()
            .find(|(p, _)| *p == c.cgroup_path)
            .map(|(_, ns)| Duration::from_nanos(*ns));
        eprintln!("container {} cgroup lived {life:?}", c.cgroup_path);
        let life = life.expect("mkdir and rmdir events of the container cgroup");
        // runc's own start and stop take most of this (~90 ms on an idle
        // 2-CPU machine, several times that under load); what matters above
        // is that the cgroup was gone before anything was resolved.
        assert!(life < Duration::from_secs(2), "container lived {life:?}");
    }
    let _ = Instant::now();
}

/// Removes the cgroup directories a test made, deepest first, even when
/// the test fails (only the ones it made: `kubepods` may be shared).
struct MadeCgroups(Vec<std::path::PathBuf>);

impl Drop for MadeCgroups {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A workload gone within 50 ms: a container cgroup (the cgroupfs layout's
/// kubepods path, as runc names it) is made, one `cat` of another pod's
/// token runs in it, and the cgroup is removed. No runc: its own start and
/// stop take longer than 50 ms here. The daemon may come to the event only
/// after the cgroup is gone (it then names it from the kernel's mkdir
/// event); either way the finding must name the pod and the container.
#[test]
fn a_workload_gone_within_50ms_is_attributed() {
    require_root();
    let kubelet = Tmpfs::new("attr-50ms");
    let uid_a = new_pod_uid();
    let vol = kubelet
        .dir
        .join("pods")
        .join(&uid_a)
        .join("volumes/kubernetes.io~projected/kube-api-access-fifty");
    std::fs::create_dir_all(&vol).unwrap();
    kubelet_atomic_write(
        &vol,
        &[("token", "token-a"), ("ca.crt", "ca"), ("namespace", "a")],
    );
    let token = vol.join("token");
    let kdir = kubelet.dir.display().to_string();
    let d = Daemon::start(&["--kubelet-dir", &kdir]).expect("daemon");

    // A loaded machine may stretch one attempt past 50 ms: try a few.
    let mut short = None;
    let mut made = MadeCgroups(Vec::new());
    for _ in 0..5 {
        let (uid, cid) = (new_pod_uid(), new_container_id());
        let rel = cgroup_path(Layout::Cgroupfs, "besteffort", &uid, &cid);
        let dir = cgroup2_root().join(rel.trim_start_matches('/'));
        let t0 = Instant::now();
        for a in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if a.starts_with(cgroup2_root()) && !a.exists() {
                std::fs::create_dir(a).unwrap_or_else(|e| panic!("mkdir {}: {e}", a.display()));
                made.0.push(a.to_path_buf());
            }
        }
        let procs = dir.join("cgroup.procs");
        let mut cat = std::process::Command::new("cat");
        cat.arg(&token);
        // SAFETY: only a write(2) of "0" to a file between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cat.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        let out = cat.output().expect("cat");
        std::fs::remove_dir(&dir).unwrap_or_else(|e| panic!("rmdir {}: {e}", dir.display()));
        let life = t0.elapsed();
        made.0.retain(|p| p != &dir);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "token-a", "{out:?}");
        eprintln!("cgroup {rel} lived {life:?}");
        if life < Duration::from_millis(50) {
            short = Some((uid, cid, rel));
            break;
        }
    }
    drop(made);
    let (uid, cid, rel) = short.expect("no attempt made a cgroup that lived under 50 ms");

    let f = d.wait_findings(Duration::from_secs(10), |f| {
        f["kind"] == "foreign_credential" && f["workload"]["container_id"] == cid.as_str()
    });
    let f = &f[0];
    assert_eq!(f["workload"]["pod_uid"], uid.as_str(), "{f}");
    assert_eq!(f["workload"]["cgroup_path"], rel.as_str(), "{f}");
    assert_eq!(f["credential"]["owner_pod_uid"], uid_a.as_str(), "{f}");
    assert_eq!(f["process"]["comm"], "cat", "{f}");
}
