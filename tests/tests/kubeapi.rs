//! Kubernetes API enrichment end to end (issue 3): the real daemon, real runc
//! "pods" (tests/src/pods.rs), and a minimal API server on 127.0.0.1
//! (tests/src/kubeapi.rs) serving pod lists and watch streams.
//!
//! 1. the daemon asks only for its node's pods (`fieldSelector`), sends no
//!    token over plain http, and keeps only its node's pods;
//! 2. a credential read in a pod gives a finding whose workload carries the
//!    service account and labels the API serves, and an intent that selects
//!    by service account judges that pod and not another one;
//! 3. a pod added later through the watch is enriched, a relabelled one gets
//!    its new labels, a watch resumed after compaction (410 Gone) relists,
//!    and a deleted pod is dropped;
//! 4. with no API server the daemon starts, gets ready, still emits
//!    findings, warns once and says `detector_kube_api_up 0`; once the
//!    server is up, the enrichment appears;
//! 5. https: a wrong CA is a TLS error (warned, counted, no request made);
//!    with the right CA the token file's content is sent, re-read after
//!    kubelet rotates it, a 401 is survived, and the token is never logged.
//!
//! CRI is pointed at a missing socket, so names can only come from the API.
//! One daemon at a time; every wait has a deadline.

use std::{
    path::Path,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use detector_tests::{
    free_port,
    kubeapi::{pod_object, write_token, FakeApi, TestPki},
    pods::{Node, Pod, PodSpec, HOST_PODS, SA_DIR},
    require_root,
    runc::new_pod_uid,
    wait_for, Daemon,
};
use serde_json::Value;

const NODE: &str = "node-under-test";
const WAIT: Duration = Duration::from_secs(15);
const EXEC: Duration = Duration::from_secs(15);
/// The daemon retries with a backoff capped at 30 s.
const RECOVER: Duration = Duration::from_secs(75);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An intent selecting by service account only.
fn sa_intent(name: &str, namespace: &str, sa: &str) -> String {
    format!(
        "apiVersion: detector.dev/v1alpha1\n\
         kind: WorkloadIntent\n\
         metadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n\
         \x20 selector:\n\
         \x20   serviceAccount: {sa}\n\
         \x20 readers: [/app/server]\n\
         \x20 action: alert\n"
    )
}

fn start_daemon(node: &Node, policy: Option<&Path>, api: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--kubelet-dir",
        node.dir_str(),
        "--kube-api",
        api,
        "--node-name",
        NODE,
        "--cri-socket",
        "/nonexistent/detector-test-cri.sock",
        "--aggregate-window",
        "0s",
    ];
    if let Some(p) = policy {
        args.extend(["--policy", p.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    Daemon::start(&args).unwrap_or_else(|e| panic!("daemon: {e:#}"))
}

/// A metric's value (`name` with its labels, as exposed).
fn metric(d: &Daemon, series: &str) -> Option<f64> {
    d.metrics_text().lines().find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok())?
    })
}

fn wait_metric(d: &Daemon, series: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    wait_for(timeout, || metric(d, series).filter(|v| ok(*v))).unwrap_or_else(|| {
        panic!(
            "{series} = {:?} after {timeout:?}; log:\n{}",
            metric(d, series),
            d.log()
        )
    })
}

fn labels(f: &Value) -> Vec<(String, String)> {
    f["workload"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn read_own_token(pod: &Pod) -> u32 {
    let r = pod
        .sh(&format!("cat {SA_DIR}/token > /dev/null"), EXEC)
        .unwrap();
    assert_eq!(
        r.status,
        Some(0),
        "read in {}: {}",
        pod.full_name(),
        r.text()
    );
    r.pid
}

/// `reader` reads `owner`'s token through the hostPath of the pods dir.
fn read_foreign_token(node: &Node, reader: &Pod, owner: &Pod) -> u32 {
    let rel = owner.token.strip_prefix(node.pods_dir()).unwrap();
    let r = reader
        .sh(
            &format!("cat {HOST_PODS}/{} > /dev/null", rel.display()),
            EXEC,
        )
        .unwrap();
    assert_eq!(r.status, Some(0), "foreign read: {}", r.text());
    r.pid
}

fn pid_of(f: &Value) -> u64 {
    f["process"]["pid"].as_u64().unwrap_or(0)
}

/// The credential event of `pid` reached the daemon; give it time to judge.
fn processed(d: &Daemon, pid: u32) {
    d.wait_events(WAIT, |e| {
        e["event"] == "credential_access" && e["tgid"].as_u64() == Some(pid as u64)
    });
    d.settle();
}

#[test]
fn service_account_and_labels_from_the_api() {
    let _g = serial();
    require_root();
    let node = Node::new();
    let a = Pod::start(&node, PodSpec::new("payments-api")).unwrap();
    let b = Pod::start(&node, PodSpec::new("frontend")).unwrap();
    let api = FakeApi::start("127.0.0.1:0".parse().unwrap()).unwrap();
    api.add_pod(pod_object(
        &a.uid,
        "payments",
        "payments-api-7d9f-abcde",
        NODE,
        "payments-api",
        &[("app", "payments-api"), ("tier", "backend")],
    ));
    api.add_pod(pod_object(
        &b.uid,
        "web",
        "frontend-5c4b-xyz12",
        NODE,
        "frontend",
        &[("app", "frontend")],
    ));
    // Same service account, another node: the daemon must never see it.
    api.add_pod(pod_object(
        &new_pod_uid(),
        "payments",
        "payments-api-7d9f-other",
        "another-node",
        "payments-api",
        &[("app", "payments-api")],
    ));
    let intents = tempfile::tempdir().unwrap();
    std::fs::write(
        intents.path().join("payments.yaml"),
        sa_intent("payments-api", "payments", "payments-api"),
    )
    .unwrap();
    let d = start_daemon(&node, Some(intents.path()), &api.url(), &[]);

    // (1) Only this node's pods, and no token over plain http.
    api.wait_request(WAIT, |r| r.is_watch())
        .unwrap_or_else(|| panic!("no watch request; log:\n{}", d.log()));
    let reqs = api.requests();
    assert!(reqs.iter().any(|r| !r.is_watch()), "a list first: {reqs:?}");
    for r in &reqs {
        assert_eq!(r.path, "/api/v1/pods");
        assert_eq!(
            r.param("fieldSelector"),
            Some(format!("spec.nodeName={NODE}").as_str()),
            "{r:?}"
        );
        assert_eq!(r.authorization, None, "no token over http: {r:?}");
    }
    wait_metric(&d, "detector_kube_api_up", WAIT, |v| v == 1.0);
    assert_eq!(
        metric(&d, "detector_kube_api_pods"),
        Some(2.0),
        "only this node's pods are kept"
    );

    // (2) A's read: judged by the service-account intent, workload enriched.
    let pid = read_own_token(&a);
    let f = d.wait_findings(WAIT, |f| {
        f["kind"] == "unexpected_reader" && pid_of(f) == pid as u64
    });
    let f = &f[0];
    assert_eq!(f["intent"], "payments/payments-api", "{f}");
    let w = &f["workload"];
    assert_eq!(w["pod_uid"].as_str(), Some(a.uid.as_str()), "{f}");
    assert_eq!(w["container_id"].as_str(), Some(a.container_id.as_str()));
    assert_eq!(w["service_account"], "payments-api", "{f}");
    assert_eq!(
        labels(f),
        kv(&[("app", "payments-api"), ("tier", "backend")]),
        "{f}"
    );
    assert_eq!(
        w["namespace"], "payments",
        "names from the API (no CRI): {f}"
    );
    assert_eq!(w["pod"], "payments-api-7d9f-abcde", "{f}");

    // B has another service account: the intent does not select it (B is
    // being learned, so its read is quiet).
    let pid_b = read_own_token(&b);
    processed(&d, pid_b);
    let on_b: Vec<Value> = d
        .findings()
        .into_iter()
        .filter(|f| f["workload"]["pod_uid"].as_str() == Some(b.uid.as_str()))
        .collect();
    assert!(
        on_b.is_empty(),
        "the payments intent must not judge frontend: {on_b:?}"
    );
}

#[test]
fn pods_follow_the_watch() {
    let _g = serial();
    require_root();
    let node = Node::new();
    let a = Pod::start(&node, PodSpec::new("payments-api")).unwrap();
    let api = FakeApi::start("127.0.0.1:0".parse().unwrap()).unwrap();
    api.add_pod(pod_object(
        &a.uid,
        "payments",
        "payments-api-0",
        NODE,
        "payments-api",
        &[("app", "payments-api")],
    ));
    let d = start_daemon(&node, None, &api.url(), &[]);
    wait_metric(&d, "detector_kube_api_pods", WAIT, |v| v == 1.0);
    api.wait_request(WAIT, |r| r.is_watch())
        .expect("watching after the list");

    // (3) A pod the API learns about after the daemon listed.
    let c = Pod::start(&node, PodSpec::new("batch").host_kubelet()).unwrap();
    let batch = |labels: &[(&str, &str)]| {
        pod_object(&c.uid, "jobs", "batch-28461", NODE, "batch-runner", labels)
    };
    api.add_pod(batch(&[("app", "batch")]));
    wait_metric(&d, "detector_kube_api_pods", WAIT, |v| v == 2.0);
    let pid = read_foreign_token(&node, &c, &a);
    let f = &d.wait_findings(WAIT, |f| {
        f["kind"] == "foreign_credential" && pid_of(f) == pid as u64
    })[0];
    assert_eq!(f["workload"]["pod_uid"].as_str(), Some(c.uid.as_str()));
    assert_eq!(f["workload"]["service_account"], "batch-runner", "{f}");
    assert_eq!(f["workload"]["namespace"], "jobs", "{f}");
    assert_eq!(labels(f), kv(&[("app", "batch")]), "{f}");

    // The watch ends and its version is compacted away: 410 Gone, relist.
    let lists = || api.requests().iter().filter(|r| !r.is_watch()).count();
    let before = lists();
    api.compact();
    api.close_watches();
    wait_for(WAIT, || (lists() > before).then_some(())).unwrap_or_else(|| {
        panic!(
            "no relist after 410 Gone: {:?}; log:\n{}",
            api.requests(),
            d.log()
        )
    });
    wait_metric(
        &d,
        "detector_kube_api_errors_total{reason=\"gone\"}",
        WAIT,
        |v| v >= 1.0,
    );
    wait_metric(&d, "detector_kube_api_up", WAIT, |v| v == 1.0);
    let n_watches = api.requests().iter().filter(|r| r.is_watch()).count();
    wait_for(WAIT, || {
        (api.requests().iter().filter(|r| r.is_watch()).count() > n_watches).then_some(())
    });
    // ...and still follows changes: C is relabelled.
    api.modify_pod(batch(&[("app", "batch"), ("schedule", "nightly")]));
    // The MODIFIED event has no metric of its own: read until it shows.
    let mut f = Value::Null;
    for _ in 0..20 {
        let pid = read_foreign_token(&node, &c, &a);
        f = d.wait_findings(WAIT, |f| {
            f["kind"] == "foreign_credential" && pid_of(f) == pid as u64
        })[0]
            .clone();
        if labels(&f).len() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        labels(&f),
        kv(&[("app", "batch"), ("schedule", "nightly")]),
        "{f}"
    );

    // A deleted pod is dropped: findings still come, without its API data.
    api.delete_pod(&c.uid);
    wait_metric(&d, "detector_kube_api_pods", WAIT, |v| v == 1.0);
    let pid = read_foreign_token(&node, &c, &a);
    let f = &d.wait_findings(WAIT, |f| {
        f["kind"] == "foreign_credential" && pid_of(f) == pid as u64
    })[0];
    assert_eq!(f["workload"]["pod_uid"].as_str(), Some(c.uid.as_str()));
    assert!(
        f["workload"].get("service_account").is_none()
            && f["workload"].get("labels").is_none()
            && f["workload"].get("namespace").is_none(),
        "deleted from the API, so no API data: {f}"
    );
}

#[test]
fn no_api_server_then_one() {
    let _g = serial();
    require_root();
    let node = Node::new();
    let a = Pod::start(&node, PodSpec::new("payments-api")).unwrap();
    let intents = tempfile::tempdir().unwrap();
    std::fs::write(
        intents.path().join("payments.yaml"),
        sa_intent("payments-api", "payments", "payments-api"),
    )
    .unwrap();
    // Nothing listens there (yet).
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let url = format!("http://{addr}");
    // (4) Start-up and /readyz do not wait for the API (start() waits for ready).
    let d = start_daemon(&node, Some(intents.path()), &url, &[]);
    wait_metric(
        &d,
        "detector_kube_api_errors_total{reason=\"connect\"}",
        WAIT,
        |v| v >= 3.0,
    );
    assert_eq!(metric(&d, "detector_kube_api_up"), Some(0.0));
    let warnings = d.log().matches("Kubernetes API unavailable").count();
    assert_eq!(warnings, 1, "one warning, then quiet; log:\n{}", d.log());

    // Findings still flow: a host process reads the pod's token.
    let out = std::process::Command::new("cat")
        .arg(&a.token)
        .output()
        .unwrap();
    assert!(out.status.success());
    let host_pid = d.wait_findings(WAIT, |f| {
        f["kind"] == "foreign_credential"
            && f["credential"]["owner_pod_uid"].as_str() == Some(a.uid.as_str())
            && f["workload"].get("pod_uid").is_none()
    });
    assert_eq!(host_pid.len(), 1, "{host_pid:?}");
    // Without the API nobody knows A's service account: the intent cannot
    // select it, and a shell's read is not judged by it.
    let pid = read_own_token(&a);
    processed(&d, pid);
    let judged: Vec<Value> = d
        .findings()
        .into_iter()
        .filter(|f| f["intent"] == "payments/payments-api")
        .collect();
    assert!(judged.is_empty(), "{judged:?}");
    assert!(
        d.findings()
            .iter()
            .all(|f| f["workload"].get("service_account").is_none()),
        "no service account without the API"
    );

    // The API server comes up: enrichment appears, without a restart.
    let api = FakeApi::start(addr).unwrap();
    api.add_pod(pod_object(
        &a.uid,
        "payments",
        "payments-api-0",
        NODE,
        "payments-api",
        &[("app", "payments-api")],
    ));
    wait_metric(&d, "detector_kube_api_up", RECOVER, |v| v == 1.0);
    assert!(
        d.log().contains("Kubernetes API enrichment available"),
        "{}",
        d.log()
    );
    let pid = read_own_token(&a);
    let f = &d.wait_findings(WAIT, |f| {
        f["kind"] == "unexpected_reader" && pid_of(f) == pid as u64
    })[0];
    assert_eq!(f["intent"], "payments/payments-api", "{f}");
    assert_eq!(f["workload"]["service_account"], "payments-api", "{f}");
    assert_eq!(labels(f), kv(&[("app", "payments-api")]), "{f}");
}

#[test]
fn https_ca_and_rotating_token() {
    let _g = serial();
    require_root();
    let pki = TestPki::new().unwrap();
    let api = FakeApi::start_tls("127.0.0.1:0".parse().unwrap(), &pki).unwrap();
    let uid = new_pod_uid();
    api.add_pod(pod_object(
        &uid,
        "payments",
        "p-0",
        NODE,
        "payments-api",
        &[],
    ));
    let creds = tempfile::tempdir().unwrap();
    let token_file = creds.path().join("token");
    let token1 = format!("test-token-one-{}", new_pod_uid());
    let token2 = format!("test-token-two-{}", new_pod_uid());
    write_token(&token_file, &token1).unwrap();
    let node = Node::new();
    let token_arg = token_file.to_str().unwrap();

    // (5) A CA that did not sign the server's certificate.
    let other_ca = pki.other_ca();
    let mut d = start_daemon(
        &node,
        None,
        &api.url(),
        &[
            "--kube-api-token-file",
            token_arg,
            "--kube-api-ca-file",
            other_ca.to_str().unwrap(),
        ],
    );
    wait_metric(
        &d,
        "detector_kube_api_errors_total{reason=\"tls\"}",
        WAIT,
        |v| v >= 2.0,
    );
    assert_eq!(metric(&d, "detector_kube_api_up"), Some(0.0));
    let log = d.log();
    assert_eq!(
        log.matches("Kubernetes API unavailable").count(),
        1,
        "{log}"
    );
    assert!(log.contains("TLS"), "the warning says TLS: {log}");
    assert!(
        api.requests().is_empty(),
        "no request (and no token) before the server is trusted"
    );
    d.stop();

    // The right CA: the token is sent, re-read after a rotation.
    let ca = pki.ca();
    let d = start_daemon(
        &node,
        None,
        &api.url(),
        &[
            "--kube-api-token-file",
            token_arg,
            "--kube-api-ca-file",
            ca.to_str().unwrap(),
        ],
    );
    wait_metric(&d, "detector_kube_api_pods", WAIT, |v| v == 1.0);
    let bearer = |t: &str| format!("Bearer {t}");
    api.wait_request(WAIT, |r| r.is_watch())
        .expect("a watch request");
    assert!(
        api.requests()
            .iter()
            .all(|r| r.authorization.as_deref() == Some(bearer(&token1).as_str())),
        "{:?}",
        api.requests()
    );
    write_token(&token_file, &token2).unwrap();
    api.close_watches();
    api.wait_request(WAIT, |r| {
        r.authorization.as_deref() == Some(bearer(&token2).as_str())
    })
    .unwrap_or_else(|| panic!("rotated token never sent; log:\n{}", d.log()));

    // A 401 (say the token was revoked) is counted, warned, and survived.
    api.fail_next(1, 401);
    api.close_watches();
    wait_metric(
        &d,
        "detector_kube_api_errors_total{reason=\"unauthorized\"}",
        WAIT,
        |v| v >= 1.0,
    );
    assert!(d.log().contains("401"), "{}", d.log());
    wait_metric(&d, "detector_kube_api_up", RECOVER, |v| v == 1.0);

    // The token never appears in logs or metrics.
    for t in [&token1, &token2] {
        assert!(!d.log().contains(t.as_str()), "token in the log");
        assert!(!d.metrics_text().contains(t.as_str()), "token in metrics");
    }
}
