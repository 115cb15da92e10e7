//! The credential inventory through the real daemon: a kubelet-exact
//! rotation (new `..<timestamp>` dir, `..data` swapped by rename, old dir
//! removed) while a container of the owner pod reads the token in a loop,
//! a read of the old inode within the grace period, the kernel's
//! CREDENTIALS map after the grace, and a pod directory removed.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use detector_common::kernel_dev_from_user;
use detector_tests::{
    kernel::credentials_of,
    require_root,
    runc::{kubelet_atomic_write, new_pod_uid, Container, Layout, Spec, TOKEN_PATH},
    wait_for, Daemon, Tmpfs, TmpfsOn,
};
use serde_json::Value;

fn key_of(p: &Path) -> (u64, u64) {
    let md = std::fs::metadata(p).unwrap();
    (kernel_dev_from_user(md.dev()), md.ino())
}

/// `pod=` of the "watching credential" log line with `id=<id>`.
fn logged_owner(log: &str, id: u32) -> Option<String> {
    let want = format!("id={id}");
    log.lines()
        .filter(|l| l.contains("watching credential"))
        .map(strip_ansi)
        .find(|l| l.split_whitespace().any(|w| w == want))
        .and_then(|l| {
            l.split_whitespace().find_map(|w| {
                w.strip_prefix("pod=")
                    .map(|p| p.trim_matches('"').to_string())
            })
        })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        if esc {
            if c.is_ascii_alphabetic() {
                esc = false;
            }
        } else if c == '\x1b' {
            esc = true;
        } else {
            out.push(c);
        }
    }
    out
}

fn accesses(d: &Daemon, cgroup_id: u64) -> Vec<Value> {
    d.events()
        .into_iter()
        .filter(|e| e["event"] == "credential_access" && e["cgroup_id"] == cgroup_id)
        .collect()
}

const GRACE: Duration = Duration::from_secs(4);

#[test]
fn rotation_through_the_daemon_and_pod_removal() {
    rotation("tracepoint", false);
}

/// No gap with the fanotify sensor: kubelet's volume is a tmpfs of its own,
/// whose filesystem mark sees the new token from its creation on (named by
/// the volume's credential file name), before the inventory's upsert.
#[test]
fn rotation_has_no_detection_gap() {
    rotation("fanotify", true);
}

/// The lease sensor across a rotation: reads of the old inode are seen; the
/// new one's before its lease are its known gap (not asserted). kubelet's
/// removal of the old token (an unlink, which walks the leases as a
/// delegation break) must not be taken for a read of it.
#[test]
fn rotation_with_the_lease_sensor() {
    rotation("lease", false);
}

/// Nor with the hybrid sensor: kubelet's open that creates the new token
/// passes the mount mark on kubelet's mount, and the new inode gets an
/// inode mark before kubelet writes it, so the container's reads (through
/// its bind mount, which no volume mark covers) ask the daemon until the
/// inode is leased.
#[test]
fn rotation_has_no_detection_gap_hybrid() {
    rotation("hybrid", true);
}

/// The tracepoint sensor's known gap: a read of the new token in the ~30 ms
/// between kubelet's `..data` swap and the inventory's map update has no
/// event (the kernel only knows inodes already in CREDENTIALS).
#[test]
#[ignore = "known gap of --open-sensor tracepoint: reads of a rotated token before the inventory upsert (~30 ms) are not seen"]
fn rotation_has_no_detection_gap_tracepoint() {
    rotation("tracepoint", true);
}

/// The hybrid sensor's price on a leased token is the lease check alone:
/// no fanotify mark is on the way of a pod's open of it. The volume has a
/// mount mark (kubelet's mount, which pods' bind mounts are not), no
/// filesystem mark (the kernel would walk it on every open of the volume),
/// and the token no inode mark while it is leased. While a writer holds the
/// token, the lease is given up and the inode mark is back; once the writer
/// closes, the lease is back and the mark is off again.
#[test]
fn hybrid_puts_no_fanotify_mark_in_the_way_of_a_leased_token() {
    use detector_tests::kernel::{fanotify_marks_of, FanotifyMark};
    require_root();
    let kubelet = Tmpfs::new("invd-marks");
    let uid = new_pod_uid();
    let vol = kubelet
        .dir
        .join("pods")
        .join(&uid)
        .join("volumes/kubernetes.io~projected/kube-api-access-m4rk5");
    std::fs::create_dir_all(&vol).unwrap();
    let _vol_mount = TmpfsOn::mount(&vol);
    kubelet_atomic_write(&vol, &[("token", "token-1"), ("ca.crt", "ca")]);
    let token = vol.join("token");
    let ino = std::fs::metadata(&token).unwrap().ino();
    let kdir = kubelet.dir.display().to_string();
    let d = Daemon::start(&["--open-sensor", "hybrid", "--kubelet-dir", &kdir]).expect("daemon");
    let pid = d.child.id();
    let token_marked = |marks: &[FanotifyMark]| {
        marks
            .iter()
            .any(|m| matches!(m, FanotifyMark::Inode { ino: i, .. } if *i == ino))
    };
    let settle = |state: &str, marked: bool, what: &str| {
        wait_for(Duration::from_secs(10), || {
            let marks = fanotify_marks_of(pid);
            (d.leases(state) == Some(1) && token_marked(&marks) == marked).then_some(marks)
        })
        .unwrap_or_else(|| {
            panic!(
                "{what}: leases held={:?} waiting={:?}, marks {:?}\n{}",
                d.leases("held"),
                d.leases("waiting"),
                fanotify_marks_of(pid),
                d.log()
            )
        })
    };
    // What an SRE sees of it: detector_fanotify_marks by scope.
    let gauges = |inode: f64, what: &str| {
        wait_for(Duration::from_secs(10), || {
            (d.metric(r#"detector_fanotify_marks{scope="inode"}"#) == Some(inode)
                && d.metric(r#"detector_fanotify_marks{scope="mount"}"#) == Some(1.0)
                && d.metric(r#"detector_fanotify_marks{scope="filesystem"}"#) == Some(0.0))
            .then_some(())
        })
        .unwrap_or_else(|| panic!("{what}:\n{}", d.metrics_text()))
    };
    let marks = settle("held", false, "the leased token still has an inode mark");
    gauges(0.0, "the gauge counts the lifted inode mark");
    assert_eq!(
        marks
            .iter()
            .filter(|m| matches!(m, FanotifyMark::Mount { .. }))
            .count(),
        1,
        "one mount mark for the volume: {marks:?}"
    );
    assert!(
        !marks.contains(&FanotifyMark::Filesystem),
        "no filesystem mark in hybrid mode: {marks:?}"
    );
    assert!(
        !marks.iter().any(|m| matches!(
            m,
            FanotifyMark::Inode {
                ignored_only: true,
                ..
            }
        )),
        "no ignore marks: {marks:?}"
    );

    // A host process opens the leased token through kubelet's mount, whose
    // mark stays: the responder is asked but leaves the open to the lease
    // check, so the one open is reported once and counted once.
    let metric = |name: &str| {
        d.metric(name)
            .unwrap_or_else(|| panic!("no {name} in the metrics"))
    };
    const ASKED: &str = "detector_fanotify_permission_events_total";
    const REPORTED: &str = "detector_fanotify_credential_opens_total";
    let (asked, reported) = (metric(ASKED), metric(REPORTED));
    let cat = std::process::Command::new("cat")
        .arg(&token)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let cat_pid = cat.id() as u64;
    assert!(cat.wait_with_output().unwrap().status.success());
    // Its reports plus what they stand for plus what its exit carried out
    // of the open window: one open.
    let (reports, counted) = wait_for(Duration::from_secs(5), || {
        let ev = d.events();
        let exit = ev
            .iter()
            .find(|e| e["event"] == "exit" && e["tgid"] == cat_pid)?;
        let reads: Vec<&Value> = ev
            .iter()
            .filter(|e| e["event"] == "credential_access" && e["tgid"] == cat_pid)
            .collect();
        let sum: u64 = reads
            .iter()
            .map(|e| 1 + e["repeats"].as_u64().unwrap_or(0))
            .sum();
        Some((
            reads.len(),
            sum + exit["unreported_reads"].as_u64().unwrap_or(0),
        ))
    })
    .unwrap_or_else(|| {
        panic!(
            "the host's read of the leased token or its exit is not seen\n{}",
            d.log()
        )
    });
    assert_eq!(
        (reports, counted),
        (1, 1),
        "one open, reported and counted once"
    );
    assert!(metric(ASKED) > asked, "kubelet's mount is marked");
    assert_eq!(
        metric(REPORTED),
        reported,
        "the responder reported a leased open"
    );

    // A writer breaks the lease: the mark goes back on first.
    let writer = std::fs::OpenOptions::new()
        .append(true)
        .open(&token)
        .unwrap();
    settle(
        "waiting",
        true,
        "a token given up to a writer has no inode mark",
    );
    gauges(1.0, "the gauge misses the inode mark put back");
    drop(writer);
    settle("held", false, "the mark stays after the lease is back");
}

/// The hybrid sensor's race on a rotated token, closed: a process that got
/// the new token's file open before the daemon marked it (here it is
/// created through a pod's bind mount, which no mark covers, standing for
/// the microseconds between kubelet's create and the mark) and waits for
/// the content. kubelet's open through its own (marked) mount makes the
/// daemon mark the inode; the inode's open counts then show one opener too
/// many, and the daemon finds it in /proc and reports it as a holder before
/// kubelet may write.
#[test]
fn hybrid_reports_a_process_that_opened_a_new_token_before_it_was_marked() {
    use detector_tests::{kernel::holders_of, BindMount};
    use std::io::BufRead;
    require_root();
    let kubelet = Tmpfs::new("invd-early");
    let uid = new_pod_uid();
    let vol = kubelet
        .dir
        .join("pods")
        .join(&uid)
        .join("volumes/kubernetes.io~projected/kube-api-access-e4rly");
    std::fs::create_dir_all(&vol).unwrap();
    let _vol_mount = TmpfsOn::mount(&vol);
    kubelet_atomic_write(&vol, &[("token", "token-1")]);
    let view = kubelet.dir.join("pod-view");
    std::fs::create_dir_all(&view).unwrap();
    let _view = BindMount::new(&vol, &view);
    let kdir = kubelet.dir.display().to_string();
    let d = Daemon::start(&["--open-sensor", "hybrid", "--kubelet-dir", &kdir]).expect("daemon");
    wait_for(Duration::from_secs(10), || {
        (d.leases("held") == Some(1)).then_some(())
    })
    .unwrap_or_else(|| panic!("no lease held\n{}", d.log()));

    // The next rotation's token file, created and opened early.
    let ts = "..2030_01_01_00_00_00.000000001";
    std::fs::create_dir(vol.join(ts)).unwrap();
    let early = view.join(ts).join("token");
    drop(std::fs::File::create(&early).unwrap());
    let mut reader = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3<{}; echo opened; read x", early.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(reader.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "opened");
    let rpid = reader.id() as u64;

    // kubelet writes the token through its own mount.
    std::fs::write(vol.join(ts).join("token"), "token-2").unwrap();
    let ino = std::fs::metadata(&early).unwrap().ino();
    let seen = wait_for(Duration::from_secs(5), || {
        let v: Vec<Value> = d
            .events()
            .into_iter()
            .filter(|e| e["event"] == "credential_access" && e["tgid"] == rpid)
            .collect();
        (!v.is_empty()).then_some(v)
    })
    .unwrap_or_else(|| panic!("the early opener is not reported\n{}", d.log()));
    assert_eq!(
        (
            seen.len(),
            &seen[0]["ino"],
            &seen[0]["fd"],
            &seen[0]["route"],
            &seen[0]["readable"]
        ),
        (
            1,
            &Value::from(ino),
            &Value::from(3),
            &Value::from("open_before_mark"),
            &Value::Bool(true)
        ),
        "{seen:?}"
    );
    assert!(
        holders_of(d.child.id()).contains_key(&(rpid as u32)),
        "the early opener is not a holder"
    );
    drop(reader.stdin.take());
    let _ = reader.wait();
}

/// As a DaemonSet runs it: the daemon in a mount namespace of its own, which
/// sees kubelet's volumes through copies of kubelet's mounts. Kubelet (here
/// the test, next to a process named `kubelet` in the test's mount
/// namespace) creates the rotated token through its own mount, so the
/// hybrid sensor must mark kubelet's mount (through `/proc/<kubelet>/root`),
/// not the daemon's copy, or the new inode goes unseen until it is leased.
#[test]
fn rotation_has_no_detection_gap_hybrid_with_the_daemon_in_its_own_mount_namespace() {
    require_root();
    let _kubelet = NamedProcess::start("kubelet");
    rotation_with("hybrid", true, true);
}

/// A `sleep` whose `comm` is `name` (run through a symlink of that name),
/// killed on drop.
struct NamedProcess {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl NamedProcess {
    fn start(name: &str) -> NamedProcess {
        let dir = std::env::temp_dir().join(format!("named-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join(name);
        let _ = std::fs::remove_file(&exe);
        std::os::unix::fs::symlink("/bin/sleep", &exe).unwrap();
        let child = std::process::Command::new(&exe).arg("600").spawn().unwrap();
        NamedProcess { child, dir }
    }
}

impl Drop for NamedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rotation(sensor: &str, strict_gap: bool) {
    rotation_with(sensor, strict_gap, false);
}

fn rotation_with(sensor: &str, strict_gap: bool, own_mounts: bool) {
    require_root();
    let kubelet = Tmpfs::new("invd-kubelet");
    let uid = new_pod_uid();
    let pod_dir = kubelet.dir.join("pods").join(&uid);
    let vol = pod_dir.join("volumes/kubernetes.io~projected/kube-api-access-r0t8x");
    std::fs::create_dir_all(&vol).unwrap();
    let vol_mount = TmpfsOn::mount(&vol);
    std::fs::create_dir_all(pod_dir.join("containers/app")).unwrap();
    let sa = |t: &'static str| [("token", t), ("ca.crt", "ca"), ("namespace", "default")];
    kubelet_atomic_write(&vol, &sa("token-1"));
    let k1 = key_of(&vol.join("token"));

    let kdir = kubelet.dir.display().to_string();
    let grace = format!("{}s", GRACE.as_secs());
    let args = [
        "--open-sensor",
        sensor,
        "--kubelet-dir",
        &kdir,
        "--rotation-grace",
        &grace,
    ];
    let d = if own_mounts {
        Daemon::start_with_own_mounts(&args)
    } else {
        Daemon::start(&args)
    }
    .expect("daemon");
    let dpid = d.child.id();
    if own_mounts {
        assert_ne!(
            std::fs::read_link(format!("/proc/{dpid}/ns/mnt")).unwrap(),
            std::fs::read_link("/proc/self/ns/mnt").unwrap(),
            "the daemon should have a mount namespace of its own"
        );
    }
    let creds = credentials_of(dpid);
    let id1 = *creds
        .get(&k1)
        .unwrap_or_else(|| panic!("token not in CREDENTIALS at ready: {creds:?}\n{}", d.log()));
    assert_eq!(logged_owner(&d.log(), id1).as_deref(), Some(uid.as_str()));

    // The owner pod's container: its init keeps the token open on fd 3.
    let c = Container::start(
        Spec::new(
            Layout::Cgroupfs,
            &[
                "sh",
                "-c",
                &format!("exec 3<{TOKEN_PATH}; while true; do sleep 1; done"),
            ],
        )
        .pod(&uid)
        .volume(&vol),
    )
    .expect("runc container");
    let cg = c.cgroup_id.expect("container cgroup id");
    // The init's open is seen (fd 3 on the first token; the fanotify and
    // lease sensors see the open before the fd exists and report -1).
    let init_fd = if sensor == "tracepoint" { 3 } else { -1 };
    let init_open = d.wait_events(Duration::from_secs(5), |e| {
        e["event"] == "credential_access" && e["cgroup_id"] == cg && e["fd"] == init_fd
    });
    assert_eq!(init_open[0]["ino"], k1.1, "{init_open:?}");

    // A reader loop across the rotation: one `cat` (one open) per line.
    let n = 1500;
    let script = format!("i=0; while [ $i -lt {n} ]; do cat {TOKEN_PATH}; echo; i=$((i+1)); done");
    let reader = {
        let state_root = c.state_root.clone();
        let name = format!("dt-{}", &c.spec.container_id[..16]);
        std::thread::spawn(move || {
            std::process::Command::new("runc")
                .arg("--root")
                .arg(state_root)
                .args(["exec", &name, "sh", "-c", &script])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("runc exec reader")
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let t_rot = Instant::now();
    let ts2 = kubelet_atomic_write(&vol, &sa("token-2"));
    let k2 = key_of(&vol.join("token"));
    assert_ne!(k1, k2, "rotation must give a new inode");
    assert!(ts2.is_dir() && !vol.join("..data_tmp").exists());
    // Within the grace: the old inode through the init's descriptor.
    let old = c
        .exec(&["head", "-c", "64", "/proc/1/fd/3"])
        .expect("runc exec head");
    let old_at = t_rot.elapsed();
    assert_eq!(String::from_utf8_lossy(&old.stdout), "token-1", "{old:?}");
    assert!(
        old_at < GRACE,
        "old-inode read at {old_at:?}, grace {GRACE:?}"
    );

    let out = reader.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let r1 = text.lines().filter(|l| *l == "token-1").count();
    let r2 = text.lines().filter(|l| *l == "token-2").count();
    eprintln!(
        "reads: {r1} of token-1, {r2} of token-2, loop ended {:?} after the rotation",
        t_rot.elapsed()
    );
    assert_eq!(r1 + r2, n, "every read returned a token");
    assert!(r1 > 0 && r2 > 0, "the rotation fell inside the reader loop");
    d.settle();

    // No gap: every `cat` open produced an event, on the inode it read.
    // (On a loaded machine the last events may still be in flight: wait.)
    let old_reads_seen = |ev: &[Value]| {
        ev.iter()
            .filter(|e| e["comm"] == "cat" && e["ino"] == k1.1)
            .count()
    };
    let _ = wait_for(Duration::from_secs(10), || {
        (old_reads_seen(&accesses(&d, cg)) >= r1).then_some(())
    });
    let ev = accesses(&d, cg);
    let cats = |ino: u64| {
        ev.iter()
            .filter(|e| e["comm"] == "cat" && e["ino"] == ino && e["route"] == "openat")
            .count()
    };
    let (e1, e2) = (cats(k1.1), cats(k2.1));
    eprintln!("events: {e1} on the old inode, {e2} on the new inode");
    let t = |ino: u64, last: bool| {
        let it = ev
            .iter()
            .filter(|e| e["comm"] == "cat" && e["ino"] == ino)
            .map(|e| e["time_ns"].as_u64().unwrap());
        if last {
            it.max()
        } else {
            it.min()
        }
    };
    let window_ms = match (t(k1.1, true), t(k2.1, false)) {
        (Some(a), Some(b)) => (b as f64 - a as f64) / 1e6,
        _ => f64::NAN,
    };
    eprintln!("last old-inode event to first new-inode event: {window_ms:.1} ms");
    let creds = credentials_of(dpid);
    let id2 = *creds.get(&k2).expect("new token in CREDENTIALS");
    assert_eq!(logged_owner(&d.log(), id2).as_deref(), Some(uid.as_str()));
    assert!(ev
        .iter()
        .filter(|e| e["ino"] == k2.1)
        .all(|e| e["credential_id"] == id2));

    // The old inode's read within the grace: an event, the old credential
    // (owned by this pod), from this pod's container.
    let h: Vec<&Value> = ev.iter().filter(|e| e["comm"] == "head").collect();
    assert_eq!(h.len(), 1, "{h:#?}");
    assert_eq!(
        (h[0]["ino"].as_u64(), h[0]["dev"].as_u64()),
        (Some(k1.1), Some(k1.0))
    );
    assert_eq!(h[0]["credential_id"], id1);
    let mut attr = detector::attribution::Attributor::new(detector_tests::cgroup2_root());
    let w = attr.resolve(cg).expect("container cgroup resolves");
    assert_eq!(w.pod.map(|p| p.pod_uid), Some(uid.clone()));

    // Reading its own token (old or new) is never foreign.
    let findings = d.findings();
    assert!(
        !findings.iter().any(|f| f["kind"] == "foreign_credential"),
        "{findings:#?}"
    );

    // After the grace the old inode leaves the kernel map; the new one stays.
    let gone = wait_for(GRACE + Duration::from_secs(3), || {
        let m = credentials_of(dpid);
        (!m.contains_key(&k1)).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "old inode still in CREDENTIALS after the grace\n{}",
            d.log()
        )
    });
    eprintln!(
        "old inode left the map {:?} after the rotation",
        t_rot.elapsed()
    );
    assert!(t_rot.elapsed() >= GRACE);
    assert!(gone.contains_key(&k2));
    // ...and reading it is no longer an event.
    let before = accesses(&d, cg).len();
    let late = c.exec(&["head", "-c", "64", "/proc/1/fd/3"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&late.stdout), "token-1");
    let probe = c.exec(&["cat", TOKEN_PATH]).unwrap(); // a marker that is an event
    assert_eq!(String::from_utf8_lossy(&probe.stdout), "token-2");
    d.wait_events(Duration::from_secs(5), |e| {
        e["event"] == "credential_access"
            && e["cgroup_id"] == cg
            && e["ino"] == k2.1
            && e["comm"] == "cat"
    });
    d.settle();
    let after: Vec<Value> = accesses(&d, cg).into_iter().skip(before).collect();
    assert!(
        after.iter().all(|e| e["ino"] != k1.1),
        "the expired inode still produces events: {after:#?}"
    );

    // Positive control: another pod reading this token is a finding, so
    // the absence above means something.
    let foreign = Spec::new(Layout::Cgroupfs, &["cat", TOKEN_PATH]).volume(&vol);
    let (cf, out_f, _) = Container::run_to_end(foreign).unwrap();
    assert_eq!(String::from_utf8_lossy(&out_f.stdout), "token-2");
    let f = d.wait_findings(Duration::from_secs(10), |f| {
        f["kind"] == "foreign_credential"
    });
    assert_eq!(
        f[0]["workload"]["pod_uid"],
        cf.spec.pod_uid.as_str(),
        "{f:?}"
    );
    assert_eq!(f[0]["credential"]["owner_pod_uid"], uid.as_str(), "{f:?}");
    drop(cf);

    // The pod goes: its containers first, then kubelet removes the directory.
    drop(c);
    let t_rm = Instant::now();
    drop(vol_mount);
    std::fs::remove_dir_all(&pod_dir).unwrap();
    let m = credentials_of(dpid);
    assert!(m.contains_key(&k2), "removed before the grace: {m:?}");
    wait_for(GRACE + Duration::from_secs(3), || {
        (!credentials_of(dpid).contains_key(&k2)).then_some(())
    })
    .unwrap_or_else(|| panic!("removed pod's token still in CREDENTIALS\n{}", d.log()));
    let took = t_rm.elapsed();
    eprintln!("removed pod's token left the map after {took:?}");
    assert!(took >= GRACE, "left after {took:?} < grace");
    let m = credentials_of(dpid);
    assert!(m.is_empty(), "stale credentials in the kernel map: {m:?}");
    assert!(d.log().contains("credential gone"));

    // Every read of the old inode, and reads of the new one once the
    // inventory has it, are seen.
    assert_eq!(e1, r1, "every read of the old token has an event");
    assert!(e2 > 0, "reads of the new token are detected");
    if !strict_gap {
        eprintln!(
            "known gap: {} of {r2} reads of the new token had no event",
            r2.saturating_sub(e2)
        );
        return;
    }
    // Checked last, so everything above is verified too: no gap.
    assert_eq!(
        (e1, e2),
        (r1, r2),
        "(events, reads) differ: {} reads of the new token had no event (the new inode was not in the kernel map yet; {window_ms:.1} ms between the last old-inode and first new-inode event)",
        r2.saturating_sub(e2)
    );
}

/// One pod's projected service-account volume in a kubelet directory on
/// tmpfs, the volume on a tmpfs of its own (as kubelet mounts it).
struct PodVolume {
    // Dropped first: unmounted before the kubelet directory goes.
    _mount: TmpfsOn,
    kubelet: Tmpfs,
    uid: String,
    vol: std::path::PathBuf,
}

impl PodVolume {
    fn new(name: &str, volume: &str) -> PodVolume {
        let kubelet = Tmpfs::new(name);
        let uid = new_pod_uid();
        let vol = kubelet
            .dir
            .join("pods")
            .join(&uid)
            .join("volumes/kubernetes.io~projected")
            .join(volume);
        std::fs::create_dir_all(&vol).unwrap();
        let _mount = TmpfsOn::mount(&vol);
        PodVolume {
            _mount,
            kubelet,
            uid,
            vol,
        }
    }

    /// kubelet's atomic write of a token (with ca.crt and namespace).
    fn write(&self, token: &str) {
        kubelet_atomic_write(
            &self.vol,
            &[("token", token), ("ca.crt", "ca"), ("namespace", "default")],
        );
    }

    fn kubelet_dir(&self) -> String {
        self.kubelet.dir.display().to_string()
    }

    fn token(&self) -> std::path::PathBuf {
        self.vol.join("token")
    }
}

/// kubelet's creating writes of a rotated token are writes, even while
/// other processes open the same volume's token at full speed. (Each
/// answer to a fanotify opener briefly wakes every other waiting opener;
/// the sensor must still read the writer's blocked `openat` and its
/// O_WRONLY, never count the write as a read, never call kubelet foreign.)
#[test]
fn kubelet_writes_racing_reads_are_not_reads() {
    require_root();
    let pv = PodVolume::new("invd-writes", "kube-api-access-w7q2z");
    pv.write("token-0");
    let kdir = pv.kubelet_dir();
    let d = Daemon::start(&["--open-sensor", "fanotify", "--kubelet-dir", &kdir]).expect("daemon");

    // Readers on another cgroup: a bounded loop of opens of the token.
    let readers = detector_tests::TestCgroup::new("invd-readers");
    let token = pv.token();
    let mut loops: Vec<std::process::Child> = (0..2)
        .map(|_| {
            readers
                .command("/bin/sh")
                .arg("-c")
                .arg(format!(
                    "i=0; while [ $i -lt 4000 ]; do cat {} >/dev/null; i=$((i+1)); done",
                    token.display()
                ))
                .spawn()
                .expect("reader loop")
        })
        .collect();
    // kubelet: rotations while the readers run.
    let me = std::process::id();
    let mut rotations = 0;
    while rotations < 60 && loops.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        rotations += 1;
        pv.write(&format!("token-{rotations}"));
        std::thread::sleep(Duration::from_millis(10));
    }
    for c in &mut loops {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(
        rotations >= 20,
        "only {rotations} rotations overlapped the readers"
    );
    // Positive control: the test process itself reading the token is a
    // foreign read, so the absence below means something.
    assert!(std::fs::read_to_string(&token)
        .unwrap()
        .starts_with("token-"));
    let control = d.wait_findings(Duration::from_secs(10), |f| {
        f["kind"] == "foreign_credential" && f["process"]["pid"] == me
    });
    d.settle();

    let mine: Vec<Value> = d
        .events()
        .into_iter()
        .filter(|e| e["event"] == "credential_access" && e["tgid"] == me)
        .collect();
    let reads = mine.iter().filter(|e| e["readable"] == true).count();
    let writes = mine.iter().filter(|e| e["writable"] == true).count();
    eprintln!(
        "{rotations} rotations: {writes} creating writes and {reads} read(s) by the test process seen; reader events: {}",
        d.events()
            .iter()
            .filter(|e| e["event"] == "credential_access" && e["cgroup_id"] == readers.id)
            .count()
    );
    assert!(
        writes >= rotations,
        "every creating write of a token is an event: {mine:#?}"
    );
    assert_eq!(reads, 1, "only the control read is a read: {mine:#?}");
    let foreign: Vec<Value> = d
        .findings()
        .into_iter()
        .filter(|f| f["kind"] == "foreign_credential" && f["process"]["pid"] == me)
        .collect();
    let count: u64 = foreign
        .iter()
        .map(|f| f["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(
        count, 1,
        "kubelet's writes were called foreign reads: {foreign:#?}\n{control:#?}"
    );
}

/// A credential open is judged with its process as it was at the open:
/// a shell that opens a pod's token and at once execs another program is
/// reported as the shell, never as the program it became (the fanotify
/// sensor's open and the kernel's exec event reach the daemon by two
/// routes; the daemon must put them back in order).
#[test]
fn an_open_then_exec_is_reported_as_the_opener() {
    require_root();
    let pv = PodVolume::new("invd-order", "kube-api-access-o5d3r");
    pv.write("t");
    let kdir = pv.kubelet_dir();
    let d = Daemon::start(&[
        "--open-sensor",
        "fanotify",
        "--kubelet-dir",
        &kdir,
        "--aggregate-window",
        "1s",
    ])
    .expect("daemon");

    // Host processes (foreign to the pod), each: open, then exec at once.
    let host = detector_tests::TestCgroup::new("invd-order");
    let token = pv.token();
    let n = 40;
    let out = host.sh(&format!(
        "i=0; while [ $i -lt {n} ]; do /bin/sh -c 'exec 3<{}; exec /bin/true'; i=$((i+1)); done",
        token.display()
    ));
    assert!(out.status.success(), "{out:?}");
    // Repeats are aggregated (one finding now, the count at the window's end).
    let mine = || -> Vec<Value> {
        d.findings()
            .into_iter()
            .filter(|f| f["kind"] == "foreign_credential" && f["workload"]["cgroup_id"] == host.id)
            .collect()
    };
    let total = |v: &[Value]| -> u64 { v.iter().map(|f| f["count"].as_u64().unwrap_or(1)).sum() };
    let _ = wait_for(Duration::from_secs(10), || {
        (total(&mine()) >= n).then_some(())
    });
    d.settle();
    let mine = mine();
    let count = total(&mine);
    let exes: BTreeSet<&str> = mine
        .iter()
        .filter_map(|f| f["process"]["exe"].as_str())
        .collect();
    eprintln!("{count} foreign reads, by {exes:?}");
    assert_eq!(count, n, "every open is one foreign read: {mine:#?}");
    assert!(
        exes.iter().all(|e| !e.ends_with("/true")),
        "an open was attributed to the program its opener exec'd next: {mine:#?}"
    );
}

/// A write-only open of a pod's token and then a read by the same process,
/// within the re-read aggregation window: the read must still be reported
/// (as a foreign read), never folded into the write's report, which is
/// not judged as a read. Both sensors aggregate re-reads.
fn a_write_open_does_not_hide_a_following_read(sensor: &str) {
    require_root();
    let pv = PodVolume::new("invd-wr", "kube-api-access-wr9x1");
    pv.write("t");
    let kdir = pv.kubelet_dir();
    let d = Daemon::start(&[
        "--open-sensor",
        sensor,
        "--kubelet-dir",
        &kdir,
        "--credential-dedup-ms",
        "60000",
    ])
    .expect("daemon");
    let host = detector_tests::TestCgroup::new("invd-wr");
    // One shell process: fd 3 write-only, then fd 4 for reading.
    let out = host.sh(&format!(
        "exec 3>>{0}; exec 4<{0}; exit 0",
        pv.token().display()
    ));
    assert!(out.status.success(), "{out:?}");
    let f = d.wait_findings(Duration::from_secs(10), |f| {
        f["kind"] == "foreign_credential" && f["workload"]["cgroup_id"] == host.id
    });
    assert_eq!(
        f[0]["credential"]["owner_pod_uid"],
        pv.uid.as_str(),
        "{f:#?}"
    );
}

#[test]
fn a_write_open_does_not_hide_a_following_read_fanotify() {
    a_write_open_does_not_hide_a_following_read("fanotify");
}

#[test]
fn a_write_open_does_not_hide_a_following_read_tracepoint() {
    a_write_open_does_not_hide_a_following_read("tracepoint");
}
