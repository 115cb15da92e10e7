//! Intents enforced in the kernel: a holder in a cgroup selected by an
//! intent is denied (EPERM) outside the intent's destinations, before any
//! packet leaves; allowed ones pass; non-holders are untouched. The intent
//! selects by cgroup path here (the runc-pod variants are in intent_e2e.rs).

use std::{process::Stdio, time::Duration};

use detector_tests::{net::CountingListener, require_root, u, Daemon, TestCgroup, Tmpfs};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(10);

/// In `cg`: open the credential (becoming a holder), then connect.
fn read_then_connect(cg: &TestCgroup, token: &str, ip: &str, port: u16) -> (u32, String) {
    let script = format!("{PROBE} read {token} && exec {PROBE} connect {ip} {port}");
    let child = cg
        .command("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    (pid, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn a_holder_is_denied_outside_its_intent_and_allowed_inside() {
    require_root();
    let fs = Tmpfs::new("enforce");
    let token = fs.dir.join("token");
    std::fs::write(&token, b"t").unwrap();
    let cg = TestCgroup::new("enforce");
    let allowed = CountingListener::bind("127.0.0.1:0");
    let other = CountingListener::bind("127.0.0.1:0");
    let policy = cg.intent_file(&fs.dir, allowed.addr.port(), "block");
    // A dead webhook receiver (refused connections) must not delay enforcement.
    let config = fs.dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "sinks:\n  webhook:\n    url: http://127.0.0.1:{}/findings\n    spool_dir: {}\n",
            detector_tests::free_port(),
            fs.dir.join("spool").display()
        ),
    )
    .unwrap();
    let d = Daemon::start(&[
        "--config",
        config.to_str().unwrap(),
        "--credential-file",
        token.to_str().unwrap(),
        "--policy",
        &policy,
        "--connect-dedup-ms",
        "0",
    ])
    .unwrap();
    let token = token.to_str().unwrap();

    let (pid, out) = read_then_connect(&cg, token, "127.0.0.1", other.addr.port());
    assert_eq!(
        out,
        format!("errno={}", libc::EPERM),
        "a holder outside its intent gets EPERM"
    );
    assert_eq!(other.accepted(), 0, "the listener never saw it");
    let f = &d.wait_findings(WAIT, |f| {
        f["kind"] == "unexpected_destination" && u(&f["process"], "pid") == pid as u64
    })[0];
    assert_eq!(
        (f["action"].as_str(), f["intent"].as_str()),
        (Some("blocked"), Some("tests/test"))
    );
    assert_eq!(u(&f["destination"], "port"), other.addr.port() as u64);
    assert_eq!(u(&f["workload"], "cgroup_id"), cg.id);

    let (_, out) = read_then_connect(&cg, token, "127.0.0.1", allowed.addr.port());
    assert_eq!(out, "connected", "an allowed destination passes");
    assert_eq!(allowed.accepted(), 1);

    // The webhook really was configured, and failing, meanwhile.
    let webhook_active = detector_tests::wait_for(WAIT, || {
        let m = d.metrics_text();
        m.lines()
            .any(|l| {
                l.starts_with("detector_sink_failed_total{sink=\"webhook\"}") && !l.ends_with(" 0")
            })
            .then_some(())
    });
    assert!(
        webhook_active.is_some(),
        "webhook sink not failing:\n{}",
        d.metrics_text()
    );

    // Not a holder: the intent does not apply.
    let non_holder = cg
        .command(PROBE)
        .args(["connect", "127.0.0.1", &other.addr.port().to_string()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&non_holder.stdout).trim(),
        "connected"
    );
}

#[test]
fn kill_action_kills_the_holder_before_it_connects_and_observe_only_alerts() {
    require_root();
    let fs = Tmpfs::new("kill");
    let token = fs.dir.join("token");
    std::fs::write(&token, b"t").unwrap();
    let cg = TestCgroup::new("kill");
    let l = CountingListener::bind("127.0.0.1:0");
    let policy = cg.intent_file(&fs.dir, 1, "kill");
    let tok = token.to_str().unwrap();
    {
        let d = Daemon::start(&[
            "--credential-file",
            tok,
            "--policy",
            &policy,
            "--connect-dedup-ms",
            "0",
        ])
        .unwrap();
        let child = cg
            .command("/bin/sh")
            .arg("-c")
            .arg(format!(
                "{PROBE} read {tok} && exec {PROBE} connect 127.0.0.1 {}",
                l.addr.port()
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "the holder is killed: {out:?}"
        );
        assert_eq!(l.accepted(), 0, "no connection was established");
        let f = &d.wait_findings(WAIT, |f| {
            f["kind"] == "unexpected_destination" && u(&f["process"], "pid") == pid as u64
        })[0];
        assert_eq!(f["action"], "killed");
    }
    // Observe mode: the same intent only alerts; the connection goes through.
    let d = Daemon::start(&[
        "--credential-file",
        tok,
        "--policy",
        &policy,
        "--mode",
        "observe",
        "--connect-dedup-ms",
        "0",
    ])
    .unwrap();
    let (pid, out) = read_then_connect(&cg, tok, "127.0.0.1", l.addr.port());
    assert_eq!(out, "connected");
    assert_eq!(l.accepted(), 1);
    let f = &d.wait_findings(WAIT, |f| {
        f["kind"] == "unexpected_destination" && u(&f["process"], "pid") == pid as u64
    })[0];
    assert_eq!(f["action"], "alerted");
}

#[test]
fn kill_scope_container_ends_every_process_of_the_cgroup() {
    require_root();
    let fs = Tmpfs::new("killc");
    let token = fs.dir.join("token");
    std::fs::write(&token, b"t").unwrap();
    let tok = token.to_str().unwrap();
    let cg = TestCgroup::new("killc");
    let l = CountingListener::bind("127.0.0.1:0");
    let policy = cg.intent_file(&fs.dir, 1, "kill");
    let d = Daemon::start(&[
        "--credential-file",
        tok,
        "--policy",
        &policy,
        "--kill-scope",
        "container",
    ])
    .unwrap();
    let mut bystander = cg.command("/bin/sleep").arg("60").spawn().unwrap();
    let out = cg.sh(&format!(
        "{PROBE} read {tok} && exec {PROBE} connect 127.0.0.1 {}",
        l.addr.port()
    ));
    assert!(!out.status.success());
    assert_eq!(l.accepted(), 0);
    let f = &d.wait_findings(WAIT, |f| {
        f["kind"] == "unexpected_destination" && f["action"] == "killed"
    })[0];
    assert!(
        f["message"].as_str().unwrap().contains("container killed"),
        "{f}"
    );
    let st = detector_tests::wait_for(WAIT, || bystander.try_wait().ok().flatten());
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        st.and_then(|s| s.signal()),
        Some(libc::SIGKILL),
        "the rest of the container is killed too"
    );
}

/// The race an asynchronous sensor would lose: one process opens the
/// credential and connects right away, nothing in between. The holder
/// state must already be in the kernel when the connect runs, every time.
fn an_immediate_connect_after_the_open_is_blocked(sensor: &str) {
    require_root();
    let fs = Tmpfs::new("immediate");
    let token = fs.dir.join("token");
    std::fs::write(&token, b"t").unwrap();
    let tok = token.to_str().unwrap();
    let cg = TestCgroup::new("immediate");
    let l = CountingListener::bind("127.0.0.1:0");
    let policy = cg.intent_file(&fs.dir, 1, "block");
    let d = Daemon::start(&[
        "--open-sensor",
        sensor,
        "--credential-file",
        tok,
        "--policy",
        &policy,
        "--connect-dedup-ms",
        "0",
    ])
    .unwrap();
    let port = l.addr.port().to_string();
    let rounds = 20;
    for i in 0..rounds {
        let out = cg
            .command(PROBE)
            .args(["open-connect", tok, "127.0.0.1", &port])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("errno={}", libc::EPERM),
            "round {i}: the connect right after the open must be denied"
        );
    }
    assert_eq!(l.accepted(), 0, "no connection reached the listener");
    let blocked = d.wait_findings(WAIT, |f| {
        f["kind"] == "unexpected_destination" && f["action"] == "blocked"
    });
    assert!(!blocked.is_empty());
    // Not a holder (never opened it): the intent does not apply.
    let out = cg
        .command(PROBE)
        .args(["connect", "127.0.0.1", &port])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "connected");
}

#[test]
fn an_immediate_connect_after_the_open_is_blocked_tracepoint() {
    an_immediate_connect_after_the_open_is_blocked("tracepoint");
}

#[test]
fn an_immediate_connect_after_the_open_is_blocked_fanotify() {
    an_immediate_connect_after_the_open_is_blocked("fanotify");
}
