//! /metrics of a running daemon: valid exposition format (real promtool),
//! and the counters move when a credential is read.

use std::{process::Command, time::Duration};

use detector_tests::{require_root, wait_for, Daemon, TestCgroup, Tmpfs};

/// Value of the sample whose name-and-labels is exactly `series`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

#[test]
fn promtool_accepts_metrics_and_credential_reads_move_counters() {
    require_root();
    let fs = Tmpfs::new("metrics");
    let token = fs.dir.join("token");
    std::fs::write(&token, b"planted").unwrap();
    let d = Daemon::start(&["--credential-file", token.to_str().unwrap()]).unwrap();

    let text = d.metrics_text();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed by cargo xtask setup");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "detector_events_total",
        "detector_events_lost_total",
        "detector_probes_attached",
        "detector_credentials",
        "detector_processing_latency_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(value(&text, "detector_credentials"), 1.0);

    let before = value(&text, "detector_events_total{kind=\"credential_access\"}");
    let cg = TestCgroup::new("metrics");
    for _ in 0..3 {
        assert!(cg
            .sh(&format!("cat {} > /dev/null", token.display()))
            .status
            .success());
    }
    let moved = wait_for(Duration::from_secs(10), || {
        let after = value(
            &d.metrics_text(),
            "detector_events_total{kind=\"credential_access\"}",
        );
        (after >= before + 3.0).then_some(after)
    });
    assert!(
        moved.is_some(),
        "credential_access counter did not move by 3:\n{}",
        d.metrics_text()
    );
    // A live holder (keeps the fd open) is counted per workload namespace
    // ("" for a process outside any pod).
    let mut holder = cg
        .command("/bin/sh")
        .arg("-c")
        .arg(format!("exec 3<{}; sleep 30", token.display()))
        .spawn()
        .unwrap();
    let counted = wait_for(Duration::from_secs(10), || {
        (value(
            &d.metrics_text(),
            "detector_workload_holders{namespace=\"\"}",
        ) >= 1.0)
            .then_some(())
    });
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        counted.is_some(),
        "holder not counted:\n{}",
        d.metrics_text()
    );

    // The planted credential value never shows up in metrics.
    assert!(!d.metrics_text().contains("planted"));
}
