//! `detector learn` writes intents that, applied back, keep the same benign
//! workload quiet, while a deviation from it is still reported.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use detector_tests::{
    detector_bin, free_port, http_get, net::CountingListener, require_root, u, wait_for, Daemon,
    TestCgroup, Tmpfs,
};

const PROBE: &str = env!("CARGO_BIN_EXE_probe");

/// The benign workload: read the credential, then (as a holder) connect.
fn benign(cg: &TestCgroup, token: &str, port: u16) {
    let out = cg.sh(&format!(
        "{PROBE} read {token} && exec {PROBE} connect 127.0.0.1 {port}"
    ));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "connected");
}

#[test]
fn learned_intents_applied_back_produce_no_findings_for_the_same_workload() {
    require_root();
    let fs = Tmpfs::new("learn");
    let token = fs.dir.join("token");
    std::fs::write(&token, b"t").unwrap();
    let tok = token.to_str().unwrap();
    let out = fs.dir.join("learned.yaml");
    let cg = TestCgroup::new("learn");
    let api = CountingListener::bind("127.0.0.1:0");
    let metrics = format!("127.0.0.1:{}", free_port());

    let mut learn = Command::new(detector_bin())
        .args([
            "learn",
            "--duration",
            "4s",
            "--output",
            out.to_str().unwrap(),
            "--credential-file",
            tok,
        ])
        .args(["--metrics-addr", &metrics, "--alerts", "/dev/null"])
        .arg("--kubelet-dir")
        .arg(fs.dir.join("no-kubelet"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = wait_for(Duration::from_secs(30), || {
        matches!(http_get(metrics.parse().unwrap(), "/readyz"), Ok((200, _))).then_some(())
    });
    assert!(ready.is_some(), "learn mode never became ready");
    for _ in 0..3 {
        benign(&cg, tok, api.addr.port());
    }
    let status = learn.wait().unwrap();
    assert!(status.success(), "detector learn exited with {status}");
    let yaml = std::fs::read_to_string(&out).expect("learned intents written");
    assert!(
        yaml.contains("kind: WorkloadIntent")
            && yaml.contains(PROBE)
            && yaml.contains("127.0.0.1/32"),
        "{yaml}"
    );

    // The learned file is a valid intent file.
    let check = Command::new(detector_bin())
        .args(["policy", "check", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "policy check: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let d = Daemon::start(&[
        "--credential-file",
        tok,
        "--policy",
        out.to_str().unwrap(),
        "--connect-dedup-ms",
        "0",
        "--learn-window",
        "0s",
    ])
    .unwrap();
    for _ in 0..3 {
        benign(&cg, tok, api.addr.port());
    }
    // A deviation is still seen: the intent is in force, not ignored.
    let other = CountingListener::bind("127.0.0.1:0");
    let child = cg
        .command("/bin/sh")
        .arg("-c")
        .arg(format!(
            "{PROBE} read {tok} && exec {PROBE} connect 127.0.0.1 {}",
            other.addr.port()
        ))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    child.wait_with_output().unwrap();
    let f = &d.wait_findings(Duration::from_secs(10), |f| {
        u(&f["process"], "pid") == pid as u64
    })[0];
    assert_eq!(
        (f["kind"].as_str(), f["action"].as_str()),
        (Some("unexpected_destination"), Some("alerted"))
    );
    d.settle();
    let others: Vec<_> = d
        .findings()
        .into_iter()
        .filter(|f| u(&f["process"], "pid") != pid as u64)
        .collect();
    assert!(
        others.is_empty(),
        "the learned benign workload produced findings: {others:#?}"
    );
}
