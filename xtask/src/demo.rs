//! `cargo xtask demo`: two real runc "pods" on a kubelet-exact layout, one
//! attacked (a shell reads its service-account token and tries to reach
//! another service), one a bystander; the daemon with an intent for the
//! attacked pod, the findings printed readably, then the same attack with
//! `action: block` (connection refused in the kernel) and `action: kill`
//! (process killed). Everything is torn down at the end, also on failure.
//!
//! The scenario is the `demo` test of tests/tests/intent_e2e.rs (ignored in
//! ordinary test runs), so it shares the pod fixture the end-to-end tests
//! use; this task builds, runs it alone and shows only its own output.
//! Loopback and 169.254.X.0/30 addresses on the pods' own veths only.

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{describe, detector_bin, is_root, repo_root};

/// Upper bound for the whole scenario once built (it takes ~10-20 s).
const DEMO_TIMEOUT: Duration = Duration::from_secs(300);

pub fn demo() -> Result<ExitCode> {
    if !is_root() {
        bail!(
            "the demo starts containers and loads eBPF programs and must run as root \
             (try: sudo -E cargo xtask demo)"
        );
    }
    for tool in ["runc", "gcc", "ip", "nsenter"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` not found (apt-get install runc busybox-static gcc libc6-dev iproute2 util-linux)");
        }
    }
    if !std::path::Path::new("/bin/busybox").exists() {
        bail!("/bin/busybox not found (apt-get install busybox-static)");
    }
    crate::setup::setup()?;
    crate::build()?;

    println!("xtask: building the demo (the pod fixture of the end-to-end tests)");
    let mut cmd = Command::new("cargo");
    cmd.args([
        "test",
        "--release",
        "--quiet",
        "-p",
        "detector-tests",
        "--test",
        "intent_e2e",
        "--",
        "--ignored",
        "--exact",
        "demo",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("DETECTOR_BIN", detector_bin())
    .current_dir(repo_root())
    .stdout(Stdio::piped());
    let what = describe(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let pid = child.id();
    // The scenario bounds each of its steps; this is a last resort.
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(DEMO_TIMEOUT);
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    });
    drop(watchdog);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            // Only the scenario's own lines, not the test harness's.
            let t = line.trim();
            if t.starts_with("running ")
                || t.starts_with("test result:")
                || t.starts_with("test demo ...")
                || t == "."
                || t == "ok"
            {
                continue;
            }
            println!("{}", line.strip_prefix("test demo ... ").unwrap_or(&line));
        }
    }
    let status = child.wait().context("waiting for the demo")?;
    if !status.success() {
        bail!("the demo failed ({status}); see the output above");
    }
    Ok(ExitCode::SUCCESS)
}
