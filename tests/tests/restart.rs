//! Restart resilience: with `--pin-dir`, killing the daemon (SIGKILL) leaves
//! enforcement in force; what happens while it is down is reported after the
//! restart; no finding already written is lost or written twice; and
//! `detector unpin` removes everything. (Issue: benchmarks and resilience.)

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use detector_tests::{
    detector_bin, net::CountingListener, read_jsonl, require_root, u, unique, Daemon, TestCgroup,
    Tmpfs,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(15);

/// In `cg`: read the credential (becoming a holder), then connect.
fn read_then_connect(cg: &TestCgroup, token: &str, port: u16) -> (u32, String) {
    let child = cg
        .command(PROBE)
        .args(["read-connect", token, "127.0.0.1", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    (pid, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Removes the test's pins even when the test fails.
struct Pins(PathBuf);

impl Pins {
    fn unpin(&self) -> std::process::Output {
        Command::new(detector_bin())
            .args(["unpin", "--pin-dir"])
            .arg(&self.0)
            .output()
            .expect("run detector unpin")
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = self.unpin();
        }
    }
}

fn blocked_findings_of(findings: &[Value], pid: u32) -> usize {
    findings
        .iter()
        .filter(|f| {
            f["kind"] == "unexpected_destination"
                && f["action"] == "blocked"
                && u(&f["process"], "pid") == pid as u64
        })
        .count()
}

#[test]
fn enforcement_survives_a_daemon_kill_and_nothing_is_lost_or_duplicated() {
    require_root();
    let fs = Tmpfs::new("restart");
    let token = fs.dir.join("token");
    std::fs::write(&token, b"t").unwrap();
    let token = token.to_str().unwrap().to_string();
    let cg = TestCgroup::new("pinned");
    let allowed = CountingListener::bind("127.0.0.1:0");
    let other = CountingListener::bind("127.0.0.1:0");
    let policy = cg.intent_file(&fs.dir, allowed.addr.port(), "block");
    let pins = Pins(PathBuf::from("/sys/fs/bpf").join(unique("detector-test-pins")));
    let pin_dir = pins.0.to_str().unwrap().to_string();
    let files = fs.dir.join("daemon"); // alerts, events and log of both runs
    let args = [
        "--credential-file",
        &token,
        "--policy",
        &policy,
        "--connect-dedup-ms",
        "0",
        // One finding per process, not one per 60 s window.
        "--aggregate-window",
        "0s",
        "--pin-dir",
        &pin_dir,
        // New credential reads while the daemon is down are seen only by
        // the pinned kernel tracepoints (a fanotify listener dies with it).
        "--open-sensor",
        "tracepoint",
    ];

    let mut first = Daemon::start_in(&files, &args).unwrap();
    let (p1, out) = read_then_connect(&cg, &token, other.addr.port());
    assert_eq!(out, format!("errno={}", libc::EPERM));
    first.wait_findings(WAIT, |f| {
        blocked_findings_of(std::slice::from_ref(f), p1) == 1
    });
    first.settle();

    // SIGKILL: no clean-up code runs.
    unsafe { libc::kill(first.child.id() as i32, libc::SIGKILL) };
    first.child.wait().unwrap();
    let written = std::fs::read_to_string(&first.alerts_path).unwrap();
    assert!(!written.is_empty());

    // While no daemon runs: a new holder is still blocked in the kernel, and
    // the allowed destination still works.
    let (p2, out) = read_then_connect(&cg, &token, other.addr.port());
    assert_eq!(
        out,
        format!("errno={}", libc::EPERM),
        "enforcement in force while the daemon is down"
    );
    let (_, out) = read_then_connect(&cg, &token, allowed.addr.port());
    assert_eq!(out, "connected");
    assert_eq!(
        other.accepted(),
        0,
        "the blocked listener never saw a connection"
    );

    // Restart: the attack made while it was down is reported now.
    let second = Daemon::start_in(&files, &args).unwrap();
    assert!(
        second.log().contains("adopted pinned kernel state"),
        "{}",
        second.log()
    );
    let down = second.wait_findings(WAIT, |f| {
        blocked_findings_of(std::slice::from_ref(f), p2) == 1
    });
    // Judged with the inventory loaded: the credential is named, not just
    // known to the kernel by inode.
    assert_eq!(
        down[0]["credential"]["path"], token,
        "the read made while the daemon was down names its credential: {down:#?}"
    );
    let (p3, out) = read_then_connect(&cg, &token, other.addr.port());
    assert_eq!(out, format!("errno={}", libc::EPERM));
    second.wait_findings(WAIT, |f| {
        blocked_findings_of(std::slice::from_ref(f), p3) == 1
    });
    second.settle();

    // What was written before the kill is intact, and nothing is doubled.
    let all = std::fs::read_to_string(&second.alerts_path).unwrap();
    assert!(
        all.starts_with(&written),
        "findings written before the kill were changed"
    );
    let findings = read_jsonl(&second.alerts_path);
    for pid in [p1, p2, p3] {
        assert_eq!(
            blocked_findings_of(&findings, pid),
            1,
            "exactly one blocked finding for pid {pid}: {findings:#?}"
        );
    }
    let lines: Vec<&str> = all.lines().collect();
    let unique_lines: std::collections::HashSet<&&str> = lines.iter().collect();
    assert_eq!(unique_lines.len(), lines.len(), "a finding was duplicated");
    drop(second);

    // `detector unpin` detaches everything: a holder connects freely again.
    let out = pins.unpin();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.0.exists());
    let (_, out) = read_then_connect(&cg, &token, other.addr.port());
    assert_eq!(out, "connected", "nothing of ours is attached any more");
    drop(first);
}
