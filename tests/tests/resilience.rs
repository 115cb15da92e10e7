//! Resilience end to end: a flooding workload cannot hide another one's
//! attack, its own losses are reported, and in-kernel aggregation keeps read
//! counts exact. (Issue: benchmarks and resilience.)

use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    time::Duration,
};

use detector_tests::{net::CountingListener, require_root, u, wait_for, Daemon, TestCgroup, Tmpfs};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_probe");
const WAIT: Duration = Duration::from_secs(20);

/// Start the probe in `cg` and wait until it printed its first line. Its
/// stdin is a pipe: closing it tells a flood to stop.
fn spawn_probe(cg: &TestCgroup, args: &[&str]) -> (Child, String) {
    let mut child = cg
        .command(PROBE)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

fn run_probe(cg: &TestCgroup, args: &[&str]) -> (u32, String) {
    let (pid, out) = cg.run(PROBE, args);
    assert!(
        out.status.success(),
        "probe {args:?} failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn a_flooding_pod_does_not_hide_another_pods_attack() {
    require_root();
    let fs = Tmpfs::new("flood");
    let tok_a = fs.dir.join("token-a");
    let tok_b = fs.dir.join("token-b");
    std::fs::write(&tok_a, "a").unwrap();
    std::fs::write(&tok_b, "b").unwrap();
    let (a, b) = (TestCgroup::new("flooder"), TestCgroup::new("victim"));
    // Small budgets so a bounded flood exceeds them within a second.
    let d = Daemon::start(&[
        "--credential-file",
        tok_a.to_str().unwrap(),
        "--credential-file",
        tok_b.to_str().unwrap(),
        "--cgroup-event-budget",
        "2000",
        "--cgroup-alert-budget",
        "500",
        // Every coverage finding at once, so their counts add up here.
        "--aggregate-window",
        "0s",
    ])
    .unwrap();
    let target = CountingListener::bind("127.0.0.1:0");

    // Pod A floods: one holder connecting to distinct destinations
    // (security-relevant events) and one non-holder doing the same
    // (ordinary events): each at least 20,000, and on until told to stop
    // after the attack (bounded by the probe).
    let (holder_flood, l1) = spawn_probe(&a, &["connect-flood", tok_a.to_str().unwrap(), "20000"]);
    let (plain_flood, l2) = spawn_probe(&a, &["connect-flood", "-", "20000"]);
    assert_eq!((l1.trim(), l2.trim()), ("started", "started"));

    // Meanwhile pod B is attacked: its token is read and used elsewhere.
    std::thread::sleep(Duration::from_millis(200));
    let (attacker, out) = run_probe(
        &b,
        &[
            "read-connect",
            tok_b.to_str().unwrap(),
            "127.0.0.1",
            &target.addr.port().to_string(),
        ],
    );
    assert_eq!(out.trim(), "connected");
    let mut floods = [holder_flood, plain_flood];
    assert!(
        floods.iter_mut().all(|f| f.try_wait().unwrap().is_none()),
        "a flood ended before the attack did; the test proves nothing"
    );
    // Stop the floods (stdin closed) and count what they made.
    let total: u64 = floods
        .into_iter()
        .map(|mut f| {
            drop(f.stdin.take());
            let out = f.wait_with_output().unwrap();
            assert!(out.status.success());
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.trim()
                .strip_prefix("done=")
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("flood printed {text:?}"))
        })
        .sum();
    assert!(total >= 40_000, "{total} connects");

    // B's attack is fully visible: the read and the holder's connect.
    let read = d.wait_events(WAIT, |e| {
        e["event"] == "credential_access" && u(e, "tgid") == attacker as u64
    });
    assert_eq!(u(&read[0], "cgroup_id"), b.id);
    let conn = d.wait_events(WAIT, |e| {
        e["event"] == "connect"
            && u(e, "tgid") == attacker as u64
            && u(e, "port") == target.addr.port() as u64
    });
    assert_ne!(
        u(&conn[0], "holder_credential"),
        0,
        "the connect of a holder"
    );

    // A's losses are counted, attributed to A, and reported as degraded
    // coverage; B is not.
    let degraded = d.wait_findings(WAIT, |f| {
        f["kind"] == "coverage_degraded" && u(&f["workload"], "cgroup_id") == a.id
    });
    assert!(u(&degraded[0], "count") > 0);
    let connects_of_a = || {
        d.events()
            .iter()
            .filter(|e| e["event"] == "connect" && u(e, "cgroup_id") == a.id)
            .count() as u64
    };
    let lost_of = |id: u64| -> u64 {
        d.findings()
            .iter()
            .filter(|f| f["kind"] == "coverage_degraded" && u(&f["workload"], "cgroup_id") == id)
            .map(|f| u(f, "count"))
            .sum()
    };
    // Exact accounting: each of A's connects was either delivered or
    // counted as lost (A's few exec/exit events may be among the lost too).
    let (delivered_a, lost_a) = wait_for(WAIT, || {
        let (delivered, lost) = (connects_of_a(), lost_of(a.id));
        (delivered + lost >= total).then_some((delivered, lost))
    })
    .unwrap_or_else(|| {
        panic!(
            "A: {} delivered + {} reported lost < {total}",
            connects_of_a(),
            lost_of(a.id)
        )
    });
    assert!(
        delivered_a + lost_a <= total + 8,
        "A: {delivered_a} delivered, {lost_a} reported lost of {total}"
    );
    assert!(delivered_a < total, "the budget held A back");
    assert_eq!(lost_of(b.id), 0, "the victim lost nothing");
    assert!(metric(&d.metrics_text(), "detector_events_dropped_total") >= lost_a);
    eprintln!(
        "flooder: {total} connects, {delivered_a} events delivered, {lost_a} dropped and reported"
    );
}

#[test]
fn repeated_reads_are_aggregated_in_the_kernel_with_exact_counts() {
    repeated_reads_are_aggregated_with_exact_counts("tracepoint");
}

/// The fanotify responder folds re-opens into the kernel's CRED_SEEN too
/// (and answers a known holder's re-open on a short path): same counts.
#[test]
fn repeated_reads_are_aggregated_by_the_fanotify_sensor_with_exact_counts() {
    repeated_reads_are_aggregated_with_exact_counts("fanotify");
}

/// The lease sensor folds re-opens in the kernel as the tracepoints do, and
/// a task's re-open of the inode it read last on this CPU takes a shorter
/// path (its per-CPU read cache): same counts.
#[test]
fn repeated_reads_are_aggregated_by_the_lease_sensor_with_exact_counts() {
    repeated_reads_are_aggregated_with_exact_counts("lease");
}

fn repeated_reads_are_aggregated_with_exact_counts(open_sensor: &str) {
    require_root();
    let fs = Tmpfs::new("agg");
    let tok = fs.dir.join("token");
    std::fs::write(&tok, "t").unwrap();
    let cg = TestCgroup::new("reader");
    let d = Daemon::start(&[
        "--credential-file",
        tok.to_str().unwrap(),
        "--open-sensor",
        open_sensor,
    ])
    .unwrap();

    const N: u64 = 30_000;
    let (pid, _) = run_probe(&cg, &["open-loop", tok.to_str().unwrap(), &N.to_string()]);
    // Every open is accounted for: the reports plus what they stand for,
    // plus what the exit carried out of the still-open window.
    let counted = wait_for(WAIT, || {
        let ev = d.events();
        let exit = ev
            .iter()
            .find(|e| e["event"] == "exit" && u(e, "tgid") == pid as u64)?;
        let reads: Vec<&Value> = ev
            .iter()
            .filter(|e| e["event"] == "credential_access" && u(e, "tgid") == pid as u64)
            .collect();
        let sum: u64 = reads.iter().map(|e| 1 + u(e, "repeats")).sum();
        Some((reads.len() as u64, sum + u(exit, "unreported_reads")))
    })
    .expect("the reader's events");
    assert_eq!(counted.1, N, "every open counted exactly once");
    assert!(
        counted.0 < N / 10,
        "aggregated in the kernel: {} reports for {N} opens",
        counted.0
    );
    // The metric counts every read too.
    let m = wait_for(WAIT, || {
        let m = metric(&d.metrics_text(), "detector_credential_reads_total");
        (m >= N).then_some(m)
    });
    assert_eq!(m, Some(N));
    assert!(
        !d.findings()
            .iter()
            .any(|f| f["kind"] == "coverage_degraded" && u(&f["workload"], "cgroup_id") == cg.id),
        "aggregation loses nothing"
    );
}
