//! Kernel sensors end to end: the real daemon, real cgroups, real syscalls.
//! (Issue: kernel sensors, loader and build.)

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    process::{Command, Output, Stdio},
    time::Duration,
};

use detector_tests::{
    kernel, net::CountingListener, require_root, u, wait_for, Daemon, TestCgroup, Tmpfs,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(10);

/// Run the probe inside `cg`; returns (pid, output).
fn probe(cg: &TestCgroup, args: &[&str]) -> (u32, Output) {
    cg.run(PROBE, args)
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "probe failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn accesses_of(d: &Daemon, pid: u32) -> Vec<Value> {
    d.events()
        .into_iter()
        .filter(|e| e["event"] == "credential_access" && u(e, "tgid") == pid as u64)
        .collect()
}

/// Starts `cmd` with piped stdin and stdout and waits for its first line;
/// the child then waits on its stdin, which the caller closes to end it.
fn until_first_line(mut cmd: Command) -> (std::process::Child, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    (child, line)
}

/// `sh -c script` in `cg`, up to its first line (see `until_first_line`).
fn shell_until_line(cg: &TestCgroup, script: &str) -> (std::process::Child, String) {
    let mut cmd = cg.command("/bin/sh");
    cmd.arg("-c").arg(script);
    until_first_line(cmd)
}

/// A credential on a tmpfs with a hardlink, a symlink and a bind mount of it.
struct CredFixture {
    fs: Tmpfs,
    token: String,
    writable: String,
    plain: String,
    bind_target: String,
}

impl CredFixture {
    fn new() -> Self {
        let fs = Tmpfs::new("cred");
        let d = fs.dir.clone();
        std::fs::create_dir_all(d.join("sa")).unwrap();
        std::fs::write(d.join("sa/token"), b"not-a-real-token").unwrap();
        std::fs::write(d.join("sa/writable-token"), b"x").unwrap();
        std::fs::write(d.join("plain.txt"), b"ordinary").unwrap();
        std::fs::hard_link(d.join("sa/token"), d.join("hardlink")).unwrap();
        std::os::unix::fs::symlink(d.join("sa/token"), d.join("symlink")).unwrap();
        std::fs::write(d.join("bind-target"), b"").unwrap();
        let st = Command::new("mount")
            .arg("--bind")
            .arg(d.join("sa/token"))
            .arg(d.join("bind-target"))
            .status()
            .unwrap();
        assert!(st.success(), "bind mount");
        let s = |p: &str| d.join(p).to_str().unwrap().to_string();
        CredFixture {
            token: s("sa/token"),
            writable: s("sa/writable-token"),
            plain: s("plain.txt"),
            bind_target: s("bind-target"),
            fs,
        }
    }
}

impl Drop for CredFixture {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.bind_target).status();
    }
}

/// The three credential-open sensors (`--open-sensor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sensor {
    Tracepoint,
    Fanotify,
    Lease,
    Hybrid,
}

impl Sensor {
    fn start(self, args: &[&str]) -> Daemon {
        let mut all = vec![
            "--open-sensor",
            match self {
                Sensor::Tracepoint => "tracepoint",
                Sensor::Fanotify => "fanotify",
                Sensor::Lease => "lease",
                Sensor::Hybrid => "hybrid",
            },
        ];
        all.extend_from_slice(args);
        let d = Daemon::start(&all).unwrap();
        let names = kernel::program_names_of(d.child.id());
        let syscall_tps: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with("sys_exit_"))
            .collect();
        match self {
            // The point of the fanotify sensor: no syscall tracepoint at all.
            Sensor::Fanotify => {
                assert!(
                    syscall_tps.is_empty(),
                    "syscall tracepoints loaded: {syscall_tps:?}"
                );
                assert!(
                    kernel::has_fanotify_group(d.child.id()),
                    "the daemon holds no fanotify group; log:\n{}",
                    d.log()
                );
            }
            Sensor::Tracepoint => assert!(
                names.contains("sys_exit_openat"),
                "tracepoint sensor without sys_exit_openat: {names:?}"
            ),
            // No syscall tracepoint either: the lease check in the open path.
            Sensor::Lease => {
                assert!(
                    syscall_tps.is_empty(),
                    "syscall tracepoints loaded: {syscall_tps:?}"
                );
                assert!(
                    names.contains("leases_conflict"),
                    "lease sensor without leases_conflict: {names:?}"
                );
            }
            // Both: the lease check, and a fanotify group for the rest.
            Sensor::Hybrid => {
                assert!(
                    syscall_tps.is_empty(),
                    "syscall tracepoints loaded: {syscall_tps:?}"
                );
                assert!(
                    names.contains("leases_conflict"),
                    "hybrid sensor without leases_conflict: {names:?}"
                );
                assert!(
                    kernel::has_fanotify_group(d.child.id()),
                    "the daemon holds no fanotify group; log:\n{}",
                    d.log()
                );
            }
        }
        d
    }
}

fn every_route_to_a_credential_yields_exactly_one_event(sensor: Sensor) {
    require_root();
    let fx = CredFixture::new();
    let cg = TestCgroup::new("routes");
    let d = sensor.start(&[
        "--credential-file",
        &fx.token,
        "--credential-file",
        &fx.writable,
    ]);
    let md = std::fs::metadata(&fx.token).unwrap();

    // Another process's root (the test's own; PID 1 may not be ptrace-readable).
    let proc_root = format!("/proc/{}/root{}", std::process::id(), fx.token);
    let d_dir = fx.fs.dir.to_str().unwrap().to_string();
    let symlink = format!("{d_dir}/symlink");
    let hardlink = format!("{d_dir}/hardlink");
    let mut routes: Vec<(&str, Vec<&str>, &str)> = vec![
        ("absolute", vec!["open-abs", &fx.token], "openat"),
        (
            "relative after chdir",
            vec!["open-rel", &fx.token],
            "openat",
        ),
        ("symlink", vec!["open-abs", &symlink], "openat"),
        ("hardlink", vec!["open-abs", &hardlink], "openat"),
        ("bind mount", vec!["open-abs", &fx.bind_target], "openat"),
        ("/proc/<pid>/root", vec!["open-abs", &proc_root], "openat"),
        ("open(2)", vec!["open-syscall", &fx.token], "open"),
        ("openat2", vec!["openat2", &fx.token], "openat2"),
        (
            "open_by_handle_at",
            vec!["by-handle", &fx.token],
            "open_by_handle_at",
        ),
    ];
    if sensor != Sensor::Tracepoint {
        // No syscall tracepoint sees these (see the tracepoint case below).
        // The lease sensor is in the kernel's open path, not in a syscall
        // of the open family: it names no route for them.
        let route = if matches!(sensor, Sensor::Lease | Sensor::Hybrid) {
            "open_any"
        } else {
            "io_uring"
        };
        routes.push(("io_uring inline", vec!["uring-open", &fx.token], route));
        routes.push((
            "io_uring io-wq worker",
            vec!["uring-open", &fx.token, "async"],
            route,
        ));
    }
    let mut cred_ids = HashSet::new();
    for (what, args, route) in &routes {
        let (pid, out) = probe(&cg, args);
        assert!(
            out.status.success(),
            "{what}: probe failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        wait_for(WAIT, || {
            let v = accesses_of(&d, pid);
            (!v.is_empty()).then_some(v)
        })
        .unwrap_or_else(|| {
            panic!(
                "{what}: no credential_access event for pid {pid}; log:\n{}",
                d.log()
            )
        });
        d.settle();
        let evs = accesses_of(&d, pid);
        assert_eq!(
            evs.len(),
            1,
            "{what}: exactly one event expected, got {evs:?}"
        );
        let e = &evs[0];
        assert_eq!(u(e, "cgroup_id"), cg.id, "{what}: cgroup id");
        if !what.starts_with("io_uring") {
            assert_eq!(u(e, "pid"), pid as u64, "{what}: pid");
        }
        assert_eq!(e["route"], *route, "{what}: route");
        assert_eq!(u(e, "ino"), md.ino(), "{what}: inode");
        assert_eq!(e["readable"], true, "{what}");
        // The fanotify opener waits for us before its fd is installed.
        match sensor {
            Sensor::Tracepoint => assert!(e["fd"].as_i64().unwrap() >= 0, "{what}: {e}"),
            Sensor::Fanotify | Sensor::Lease | Sensor::Hybrid => {
                assert_eq!(e["fd"], -1, "{what}: {e}")
            }
        }
        cred_ids.insert(u(e, "credential_id"));
    }
    assert_eq!(
        cred_ids.len(),
        1,
        "all routes name the same credential id: {cred_ids:?}"
    );

    // creat(2) hands out a write-only fd of a (different) credential file.
    let (pid, out) = probe(&cg, &["creat", &fx.writable]);
    ok(&out);
    let e = &d.wait_events(WAIT, |e| {
        e["event"] == "credential_access" && u(e, "tgid") == pid as u64
    })[0];
    assert_eq!(
        (
            e["route"].as_str(),
            e["writable"].as_bool(),
            e["readable"].as_bool()
        ),
        (Some("creat"), Some(true), Some(false))
    );
    assert!(!cred_ids.contains(&u(e, "credential_id")));

    // pidfd_getfd: a duplicate of another process's credential fd. It opens
    // nothing, so fanotify does not see it (the child's own open it does).
    let (pid, out) = probe(&cg, &["pidfd-getfd", &fx.token]);
    ok(&out);
    let child: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("child=")
        .and_then(|c| c.parse().ok())
        .expect("probe prints child=<pid>");
    d.wait_events(WAIT, |e| {
        e["event"] == "credential_access" && u(e, "tgid") == child
    });
    d.settle();
    let evs = accesses_of(&d, pid);
    match sensor {
        Sensor::Tracepoint => {
            assert_eq!(evs.len(), 1, "{evs:?}");
            assert_eq!(evs[0]["route"], "pidfd_getfd");
        }
        Sensor::Fanotify | Sensor::Lease | Sensor::Hybrid => assert!(evs.is_empty(), "{evs:?}"),
    }

    // io_uring opens are the tracepoint sensor's known gap: no event.
    if sensor == Sensor::Tracepoint {
        let (pid, out) = probe(&cg, &["uring-open", &fx.token, "async"]);
        ok(&out);
        d.settle();
        d.settle();
        assert!(
            accesses_of(&d, pid).is_empty(),
            "io_uring seen by tracepoints?"
        );
    }

    // Ordinary files: no event at all.
    let (pid_plain, out) = probe(&cg, &["open-abs", &fx.plain]);
    ok(&out);
    let (pid_etc, out) = probe(&cg, &["read", "/etc/hostname"]);
    ok(&out);
    d.settle();
    d.settle();
    assert!(
        accesses_of(&d, pid_plain).is_empty() && accesses_of(&d, pid_etc).is_empty(),
        "ordinary files must not produce events"
    );
}

#[test]
fn every_route_to_a_credential_yields_exactly_one_event_tracepoint() {
    every_route_to_a_credential_yields_exactly_one_event(Sensor::Tracepoint);
}

#[test]
fn every_route_to_a_credential_yields_exactly_one_event_fanotify() {
    every_route_to_a_credential_yields_exactly_one_event(Sensor::Fanotify);
}

#[test]
fn every_route_to_a_credential_yields_exactly_one_event_lease() {
    every_route_to_a_credential_yields_exactly_one_event(Sensor::Lease);
}

#[test]
fn every_route_to_a_credential_yields_exactly_one_event_hybrid() {
    every_route_to_a_credential_yields_exactly_one_event(Sensor::Hybrid);
}

fn a_forked_child_of_a_holder_is_a_holder_and_exit_cleans_up(sensor: Sensor) {
    require_root();
    let fx = CredFixture::new();
    let cg = TestCgroup::new("lineage");
    let d = sensor.start(&["--credential-file", &fx.token]);
    let daemon_pid = d.child.id();

    let mut cmd = cg.command(PROBE);
    cmd.args(["hold-fork", &fx.token]);
    let (mut child, line) = until_first_line(cmd);
    let pids: Vec<u32> = line
        .split_whitespace()
        .filter_map(|w| w.split('=').nth(1)?.parse().ok())
        .collect();
    let (parent, kid) = (pids[0], pids[1]);

    let holders = wait_for(WAIT, || {
        let h = kernel::holders_of(daemon_pid);
        (h.contains_key(&parent) && h.contains_key(&kid)).then_some(h)
    })
    .unwrap_or_else(|| {
        panic!(
            "parent and child must both be holders: {:?}",
            kernel::holders_of(daemon_pid)
        )
    });
    assert_eq!(holders[&kid].credential_id, holders[&parent].credential_id);
    assert_eq!(
        holders[&kid].origin_tgid, parent,
        "the child inherited from its parent"
    );
    // The opener's parent is this test process, in another cgroup: never a holder.
    assert!(
        !holders.contains_key(&std::process::id()),
        "a parent in another cgroup became a holder"
    );
    let fork = &d.wait_events(WAIT, |e| e["event"] == "fork" && u(e, "tgid") == kid as u64)[0];
    assert_eq!(u(fork, "parent_tgid"), parent as u64);
    assert_eq!(
        u(fork, "inherited_credential"),
        holders[&parent].credential_id as u64
    );

    drop(child.stdin.take()); // the probe kills its child and exits
    child.wait().unwrap();
    let gone = wait_for(WAIT, || {
        let h = kernel::holders_of(daemon_pid);
        (!h.contains_key(&parent) && !h.contains_key(&kid)).then_some(())
    });
    assert!(
        gone.is_some(),
        "holder entries must be removed at exit: {:?}",
        kernel::holders_of(daemon_pid)
    );
    let exits = d.wait_events(WAIT, |e| {
        e["event"] == "exit" && (u(e, "tgid") == parent as u64 || u(e, "tgid") == kid as u64)
    });
    assert!(
        exits.iter().all(|e| u(e, "holder_credential") != 0),
        "{exits:?}"
    );
}

#[test]
fn a_forked_child_of_a_holder_is_a_holder_and_exit_cleans_up_tracepoint() {
    a_forked_child_of_a_holder_is_a_holder_and_exit_cleans_up(Sensor::Tracepoint);
}

#[test]
fn a_forked_child_of_a_holder_is_a_holder_and_exit_cleans_up_fanotify() {
    a_forked_child_of_a_holder_is_a_holder_and_exit_cleans_up(Sensor::Fanotify);
}

#[test]
fn a_forked_child_of_a_holder_is_a_holder_and_exit_cleans_up_lease() {
    a_forked_child_of_a_holder_is_a_holder_and_exit_cleans_up(Sensor::Lease);
}

#[test]
fn a_forked_child_of_a_holder_is_a_holder_and_exit_cleans_up_hybrid() {
    a_forked_child_of_a_holder_is_a_holder_and_exit_cleans_up(Sensor::Hybrid);
}

/// `TOKEN=$(cat token); …`: the reader's parent in the same cgroup becomes
/// a holder at the moment of the read, so what it starts next inherits it.
fn a_readers_parent_in_the_same_cgroup_is_a_holder(sensor: Sensor) {
    require_root();
    let fx = CredFixture::new();
    let cg = TestCgroup::new("parent");
    let d = sensor.start(&["--credential-file", &fx.token]);
    let daemon_pid = d.child.id();
    let (mut sh, line) = shell_until_line(&cg, &format!("T=$(cat {}); echo $$; read x", fx.token));
    let shell: u32 = line.trim().parse().unwrap();
    let h = kernel::holders_of(daemon_pid);
    let entry = h.get(&shell).unwrap_or_else(|| {
        panic!(
            "the reader's parent shell {shell} is not a holder: {h:?}; log:\n{}",
            d.log()
        )
    });
    assert_ne!(
        entry.origin_tgid, shell,
        "it got the credential from its child"
    );
    drop(sh.stdin.take());
    sh.wait().unwrap();
}

#[test]
fn a_readers_parent_in_the_same_cgroup_is_a_holder_tracepoint() {
    a_readers_parent_in_the_same_cgroup_is_a_holder(Sensor::Tracepoint);
}

#[test]
fn a_readers_parent_in_the_same_cgroup_is_a_holder_fanotify() {
    a_readers_parent_in_the_same_cgroup_is_a_holder(Sensor::Fanotify);
}

#[test]
fn a_readers_parent_in_the_same_cgroup_is_a_holder_lease() {
    a_readers_parent_in_the_same_cgroup_is_a_holder(Sensor::Lease);
}

#[test]
fn a_readers_parent_in_the_same_cgroup_is_a_holder_hybrid() {
    a_readers_parent_in_the_same_cgroup_is_a_holder(Sensor::Hybrid);
}

/// The fanotify sensor names the opener's cgroup from /proc; it must be the
/// id the kernel's programs see (`bpf_get_current_cgroup_id`), here that of
/// the same process's connect event.
#[test]
fn fanotify_cgroup_id_is_the_kernels() {
    require_root();
    let fx = CredFixture::new();
    let cg = TestCgroup::new("cgid");
    let d = Sensor::Fanotify.start(&["--credential-file", &fx.token, "--connect-dedup-ms", "0"]);
    let l = CountingListener::bind("127.0.0.1:0");
    let (pid, out) = probe(
        &cg,
        &[
            "open-connect",
            &fx.token,
            "127.0.0.1",
            &l.addr.port().to_string(),
        ],
    );
    ok(&out);
    let access = &d.wait_events(WAIT, |e| {
        e["event"] == "credential_access" && u(e, "tgid") == pid as u64
    })[0];
    let connect = &d.wait_events(WAIT, |e| {
        e["event"] == "connect" && u(e, "tgid") == pid as u64
    })[0];
    assert_eq!(u(access, "cgroup_id"), u(connect, "cgroup_id"));
    assert_eq!(u(access, "cgroup_id"), cg.id);
    // The connect right after the open was already a holder's.
    assert_eq!(
        u(connect, "holder_credential"),
        u(access, "credential_id"),
        "{connect}"
    );
}

/// An opener waits for the daemon's answer. If the daemon dies meanwhile
/// (here: stopped, then SIGKILLed), the kernel lets the open through.
#[test]
fn fanotify_waiters_are_released_when_the_daemon_is_killed() {
    require_root();
    let fx = CredFixture::new();
    let cg = TestCgroup::new("release");
    let mut d = Sensor::Fanotify.start(&["--credential-file", &fx.token]);
    let dpid = d.child.id() as i32;
    unsafe { libc::kill(dpid, libc::SIGSTOP) };
    let mut reader = cg
        .command(PROBE)
        .args(["read", &fx.token])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // It stays blocked in open(2) while nobody answers.
    std::thread::sleep(Duration::from_millis(500));
    let waiting = reader.try_wait().unwrap().is_none();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", reader.id())).unwrap_or_default();
    unsafe { libc::kill(dpid, libc::SIGKILL) };
    let _ = d.child.wait();
    let st = wait_for(WAIT, || reader.try_wait().ok().flatten());
    assert!(
        waiting,
        "the reader did not wait for the stopped daemon: {stat}"
    );
    assert!(
        st.is_some_and(|s| s.success()),
        "the reader must complete its read once the daemon is gone: {st:?}"
    );
}

#[test]
fn connects_are_reported_with_destination_and_cgroup() {
    require_root();
    let cg = TestCgroup::new("egress");
    let d = Daemon::start(&["--connect-dedup-ms", "0"]).unwrap();
    let l = CountingListener::bind("127.0.0.1:0");
    let port = l.addr.port().to_string();

    let (pid, out) = probe(&cg, &["connect", "127.0.0.1", &port]);
    ok(&out);
    let e = &d.wait_events(WAIT, |e| {
        e["event"] == "connect" && u(e, "tgid") == pid as u64
    })[0];
    assert_eq!(
        (
            e["addr"].as_str(),
            u(e, "port"),
            e["protocol"].as_str(),
            e["hook"].as_str()
        ),
        (
            Some("127.0.0.1"),
            l.addr.port() as u64,
            Some("tcp"),
            Some("connect4")
        )
    );
    assert_eq!(u(e, "cgroup_id"), cg.id);
    assert_eq!(e["verdict"], "allowed");

    // An IPv4-mapped IPv6 destination is reported as IPv4.
    let (pid6, out) = probe(&cg, &["connect", "::ffff:127.0.0.1", &port]);
    ok(&out);
    let e = &d.wait_events(WAIT, |e| {
        e["event"] == "connect" && u(e, "tgid") == pid6 as u64
    })[0];
    assert_eq!(
        (e["addr"].as_str(), e["hook"].as_str()),
        (Some("127.0.0.1"), Some("connect6"))
    );

    // UDP datagrams through sendmsg.
    let (pidu, out) = probe(&cg, &["udp", "127.0.0.1", "9"]);
    ok(&out);
    let e = &d.wait_events(WAIT, |e| {
        e["event"] == "connect" && u(e, "tgid") == pidu as u64
    })[0];
    assert_eq!(
        (e["protocol"].as_str(), e["hook"].as_str(), u(e, "port")),
        (Some("udp"), Some("sendmsg4"), 9)
    );

    // A native IPv6 destination keeps its 16 bytes, in order (loopback).
    let (pidv6, out) = probe(&cg, &["udp", "::1", "9"]);
    ok(&out);
    let e = &d.wait_events(WAIT, |e| {
        e["event"] == "connect" && u(e, "tgid") == pidv6 as u64
    })[0];
    assert_eq!(
        (e["addr"].as_str(), e["hook"].as_str(), u(e, "port")),
        (Some("::1"), Some("sendmsg6"), 9)
    );
    assert_eq!(l.accepted(), 2);
}

/// The kernel reports an ordinary (non-holder, allowed) connect once per
/// process, cgroup and destination per `--connect-dedup-ms` window; the
/// per-CPU copy of the last entry must answer exactly as the LRU would.
#[test]
fn a_repeated_connect_is_reported_once_per_window_per_process_and_destination() {
    require_root();
    let cg = TestCgroup::new("dedup");
    let d = Daemon::start(&["--connect-dedup-ms", "500"]).unwrap();
    let a = CountingListener::bind("127.0.0.1:0");
    let b = CountingListener::bind("127.0.0.1:0");
    let (pa, pb) = (a.addr.port().to_string(), b.addr.port().to_string());
    // A, then B (the per-CPU copy now holds B), then A again within the
    // window (answered by the LRU), then A after the window.
    let (pid, out) = probe(
        &cg,
        &[
            "connect-seq",
            "127.0.0.1",
            &format!("{pa}x20"),
            &format!("{pb}x20"),
            &format!("{pa}x20"),
            "+800",
            &format!("{pa}x3"),
        ],
    );
    ok(&out);
    // Another process to the same destination has its own entry.
    let (pid2, out) = probe(&cg, &["connect-seq", "127.0.0.1", &format!("{pa}x5")]);
    ok(&out);
    // Both are ordinary events of one ring, drained in order: once the
    // second process's report is there, so are all of the first's.
    d.wait_events(WAIT, |e| {
        e["event"] == "connect" && u(e, "tgid") == pid2 as u64
    });
    let events = d.events();
    let count = |pid: u32, port: &str| {
        events
            .iter()
            .filter(|e| {
                e["event"] == "connect"
                    && u(e, "tgid") == pid as u64
                    && u(e, "port").to_string() == port
            })
            .count()
    };
    assert_eq!(
        (count(pid, &pa), count(pid, &pb), count(pid2, &pa)),
        (2, 1, 1),
        "reports per (process, destination): A twice (once per window), B once, \
         the second process once"
    );
}

#[test]
fn a_deny_verdict_blocks_one_cgroup_in_the_kernel_and_not_another() {
    require_root();
    let denied = TestCgroup::new("denied");
    let other = TestCgroup::new("allowed");
    let d = Daemon::start(&[
        "--deny-cgroup",
        denied.path.to_str().unwrap(),
        "--connect-dedup-ms",
        "0",
    ])
    .unwrap();
    let l = CountingListener::bind("127.0.0.1:0");
    let port = l.addr.port().to_string();

    let (pid, out) = probe(&denied, &["connect", "127.0.0.1", &port]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("errno={}", libc::EPERM),
        "connect must fail with EPERM"
    );
    assert_eq!(
        l.accepted(),
        0,
        "the listener never sees the denied connection"
    );
    let e = &d.wait_events(WAIT, |e| {
        e["event"] == "connect" && u(e, "tgid") == pid as u64
    })[0];
    assert_eq!(
        (e["verdict"].as_str(), e["reason"].as_str()),
        (Some("denied"), Some("deny_cgroup"))
    );

    let (_, out) = probe(&other, &["connect", "127.0.0.1", &port]);
    ok(&out);
    assert_eq!(l.accepted(), 1, "another cgroup still connects");
}

#[test]
fn killing_the_daemon_leaves_no_program_attached() {
    require_root();
    let mut d = Daemon::start(&[]).unwrap();
    let pid = d.child.id();
    let ours = kernel::program_ids_of(pid);
    // 9 with the fanotify open sensor (no syscall tracepoints), 15 without.
    assert!(ours.len() >= 9, "the daemon holds its programs: {ours:?}");
    assert!(ours.is_subset(&kernel::loaded_program_ids()));
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    d.child.wait().unwrap();
    let gone = wait_for(Duration::from_secs(10), || {
        let loaded = kernel::loaded_program_ids();
        ours.iter().all(|id| !loaded.contains(id)).then_some(())
    });
    assert!(
        gone.is_some(),
        "programs still loaded after SIGKILL: {:?}",
        ours.intersection(&kernel::loaded_program_ids())
            .collect::<Vec<_>>()
    );

    // A cgroup connect still works with no daemon (nothing left denying).
    let cg = TestCgroup::new("after-kill");
    let l = CountingListener::bind("127.0.0.1:0");
    let (_, out) = probe(&cg, &["connect", "127.0.0.1", &l.addr.port().to_string()]);
    ok(&out);
}

/// Wait until exactly one credential file is in lease `state`.
fn wait_lease(d: &Daemon, state: &str, what: &str) {
    wait_for(WAIT, || (d.leases(state) == Some(1)).then_some(()))
        .unwrap_or_else(|| panic!("{what}; log:\n{}", d.log()));
}

/// Wait for `pid`'s credential accesses; all of them once there is one.
fn wait_accesses(d: &Daemon, pid: u32, what: &str) -> Vec<Value> {
    wait_for(WAIT, || {
        let v = accesses_of(d, pid);
        (!v.is_empty()).then_some(v)
    })
    .unwrap_or_else(|| panic!("{what}; log:\n{}", d.log()))
}

/// The lease sensor's price is writers: an open for writing breaks the lease.
/// The writer must not be held up (the daemon gives the lease up on SIGIO),
/// the open itself is reported, and once the writer closes the lease is back
/// and reads are seen again.
#[test]
fn a_writer_breaks_the_lease_briefly_and_reads_are_seen_again_after() {
    require_root();
    let fx = CredFixture::new();
    let cg = TestCgroup::new("lease-writer");
    let d = Sensor::Lease.start(&["--credential-file", &fx.token]);
    wait_lease(&d, "held", "no lease held");

    let started = std::time::Instant::now();
    let (mut w, line) =
        shell_until_line(&cg, &format!("exec 3>>{}; echo opened; read x", fx.token));
    assert_eq!(line.trim(), "opened");
    let waited = started.elapsed();
    // The kernel would hold the writer for lease-break-time (45 s).
    assert!(
        waited < Duration::from_secs(5),
        "the writer waited {waited:?} for the lease"
    );
    let writer = w.id();
    let e = &d.wait_events(WAIT, |e| {
        e["event"] == "credential_access" && u(e, "tgid") == writer as u64
    })[0];
    assert_eq!(
        (e["writable"].as_bool(), e["readable"].as_bool()),
        (Some(true), Some(false)),
        "{e}"
    );
    wait_lease(&d, "waiting", "the broken lease is not counted as waiting");

    // The writer closes: the lease comes back, and a read is seen again.
    drop(w.stdin.take());
    w.wait().unwrap();
    wait_lease(&d, "held", "lease not taken again");
    let (pid, out) = probe(&cg, &["open-abs", &fx.token]);
    ok(&out);
    let evs = wait_accesses(&d, pid, "a read after the lease came back is not seen");
    assert_eq!(evs[0]["readable"], true);
    assert_eq!(evs[0]["route"], "openat");
}

fn counter(d: &Daemon, name: &str) -> u64 {
    d.metric(name)
        .unwrap_or_else(|| panic!("no {name} in the metrics")) as u64
}

/// The hybrid sensor closes the lease sensor's writer gap: a leased
/// credential's reads are seen by the kernel's lease check alone (no
/// permission event reaches the daemon), and while a writer holds the file
/// (lease given up) a read is still seen, through the fanotify group.
#[test]
fn hybrid_leaves_leased_reads_to_the_kernel_and_sees_reads_while_a_writer_holds_the_file() {
    require_root();
    let fx = CredFixture::new();
    let cg = TestCgroup::new("hybrid-writer");
    let d = Sensor::Hybrid.start(&["--credential-file", &fx.token]);
    wait_lease(&d, "held", "no lease held");
    const PERM: &str = "detector_fanotify_permission_events_total";
    let before = counter(&d, PERM);
    for _ in 0..3 {
        let (pid, out) = probe(&cg, &["open-abs", &fx.token]);
        ok(&out);
        let evs = wait_accesses(&d, pid, "a leased read is not seen");
        assert_eq!(evs.len(), 1, "one event per read: {evs:?}");
    }
    assert_eq!(
        counter(&d, PERM),
        before,
        "leased reads must not go through the daemon's permission events"
    );

    let (mut w, line) =
        shell_until_line(&cg, &format!("exec 3>>{}; echo opened; read x", fx.token));
    assert_eq!(line.trim(), "opened");
    wait_lease(&d, "waiting", "the broken lease is not counted as waiting");
    let (pid, out) = probe(&cg, &["open-abs", &fx.token]);
    ok(&out);
    let evs = wait_accesses(&d, pid, "a read while a writer holds the file is not seen");
    assert_eq!(
        (evs.len(), &evs[0]["readable"]),
        (1, &Value::Bool(true)),
        "{evs:?}"
    );
    assert!(
        counter(&d, PERM) > before,
        "the read while the lease is given up is fanotify's"
    );
    drop(w.stdin.take());
    w.wait().unwrap();
    wait_lease(&d, "held", "lease not taken again");
}
