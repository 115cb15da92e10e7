//! Real receivers for the sink tests, on loopback only, each stopped and
//! cleaned up on drop (also when a test panics):
//! - [`Rsyslog`]: the Debian `rsyslogd` with a generated configuration,
//!   listening on UDP and TCP, writing what it parsed to a file;
//! - [`HttpReceiver`]: a small axum server that can be stopped and started
//!   again on the same port;
//! - parsers that turn what they received back into findings (CEF, RFC 5424
//!   structured data), and a generator of varied findings.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use detector::finding::*;
use serde_json::Value;

use crate::wait_for;

/// `n` findings with every optional field both set and unset, IPv4 and IPv6
/// destinations, and characters that need escaping in syslog SD, CEF and
/// JSON (`"`, `\`, `]`, `=`, `|`, spaces, non-ASCII).
pub fn sample_findings(n: usize) -> Vec<Finding> {
    let kinds = [
        FindingKind::UnexpectedReader,
        FindingKind::UnexpectedDestination,
        FindingKind::ForeignCredential,
        FindingKind::StaleReuse,
        FindingKind::CoverageDegraded,
    ];
    let sev = [
        Severity::Info,
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];
    let act = [Action::Alerted, Action::Blocked, Action::Killed];
    (0..n)
        .map(|i| {
            let kind = kinds[i % kinds.len()];
            let full = i % 3 != 2;
            let pod_uid = format!("0b7c6a38-4d1e-4c52-9a7e-{:012x}", i);
            Finding {
                time: format!(
                    "2026-11-23T{:02}:{:02}:{:02}.{:03}Z",
                    10 + (i / 3600) % 10,
                    (i / 60) % 60,
                    i % 60,
                    (i * 7) % 1000
                ),
                kind,
                severity: sev[i % sev.len()],
                action: act[i % act.len()],
                intent: full.then(|| format!("payments/payments-api-{i}")),
                workload: Workload {
                    pod_uid: full.then(|| pod_uid.clone()),
                    namespace: full.then(|| "payments".into()),
                    pod: full.then(|| format!("payments-api-7d9f-{i}")),
                    container_id: full.then(|| format!("{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15)),
                    cgroup_id: 1000 + i as u64,
                    cgroup_path: full.then(|| format!("/kubepods.slice/kubepods-pod{i}.slice/cri-containerd-{i}.scope")),
                    ..Default::default()
                },
                process: Process {
                    pid: 4000 + i as u32,
                    ppid: 1 + (i % 5) as u32,
                    exe: full.then(|| format!("/tmp/odd dir/\"q\" [x]=y|z\\w-é-{i}")),
                    comm: if i % 4 == 0 { "sh".into() } else { format!("curl-{i}") },
                    ancestry: if full { vec!["/bin/sh".into(), "/app/server with space".into()] } else { vec![] },
                    uid: full.then_some(1000 + i as u32),
                },
                credential: (i % 5 != 4).then(|| Credential {
                    kind: "kubernetes-serviceaccount".into(),
                    path: format!(
                        "/var/lib/kubelet/pods/{pod_uid}/volumes/kubernetes.io~projected/kube-api-access-{i}/token"
                    ),
                    owner_pod_uid: full.then(|| pod_uid.clone()),
                    inode: 7 + i as u64,
                    dev: 39,
                }),
                destination: (kind == FindingKind::UnexpectedDestination || i % 7 == 0).then(|| Destination {
                    ip: if i % 2 == 0 {
                        format!("10.0.{}.{}", i / 256 % 256, i % 256).parse().unwrap()
                    } else {
                        format!("fd00::{:x}", i + 1).parse().unwrap()
                    },
                    port: 443 + (i % 3) as u16,
                    protocol: if i % 2 == 0 { "tcp".into() } else { "udp".into() },
                }),
                mitre: kind.mitre().iter().map(|s| s.to_string()).collect(),
                count: 1 + (i % 4) as u64,
                message: format!("finding {i}: curl read the token = \"bad\" | [x] \\ ünïcode"),
            }
        })
        .collect()
}

// ---------------------------------------------------------------- rsyslog

/// A private `rsyslogd -n` listening on 127.0.0.1 UDP and TCP (octet-counted
/// framing is on by default), writing the fields it parsed from each message
/// (PRI, VERSION, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID,
/// STRUCTURED-DATA, MSG) as one JSON object per line (`jsonf`).
/// Killed, and its directory removed, on drop.
pub struct Rsyslog {
    child: Option<Child>,
    bin: &'static str,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub output: PathBuf,
    dir: tempfile::TempDir,
}

/// One message as rsyslog parsed it.
#[derive(Debug, Clone)]
pub struct SyslogLine {
    pub pri: u32,
    pub version: String,
    pub timestamp: String,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
    pub msgid: String,
    pub structured_data: String,
    pub msg: String,
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Rsyslog {
    pub fn start() -> Result<Rsyslog> {
        let bin = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .context("rsyslogd not installed (Debian package rsyslog)")?;
        let dir = tempfile::Builder::new()
            .prefix("detector-rsyslog-")
            .tempdir()?;
        let d = dir.path();
        let output = d.join("received.log");
        let udp: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse()?;
        let tcp: SocketAddr = format!("127.0.0.1:{}", crate::free_port()).parse()?;
        let conf = d.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{d}" maxMessageSize="64k")
module(load="imudp")
module(load="imtcp")
template(name="fields" type="list" option.jsonf="on") {{
  property(outname="pri" name="pri" format="jsonf")
  property(outname="version" name="protocol-version" format="jsonf")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app_name" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="structured_data" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
ruleset(name="detector") {{
  action(type="omfile" file="{out}" template="fields")
}}
input(type="imudp" address="127.0.0.1" port="{up}" ruleset="detector")
input(type="imtcp" address="127.0.0.1" port="{tp}" ruleset="detector")
"#,
                d = d.display(),
                out = output.display(),
                up = udp.port(),
                tp = tcp.port(),
            ),
        )?;
        let mut r = Rsyslog {
            child: None,
            bin,
            udp,
            tcp,
            output,
            dir,
        };
        r.start_again()?;
        Ok(r)
    }

    /// Stop rsyslogd (SIGTERM; SIGKILL after 5 s): its ports then refuse.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let gone = wait_for(Duration::from_secs(5), || c.try_wait().ok().flatten());
            if gone.is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Start rsyslogd (again) on the same ports and output file.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("rsyslogd.log"))?;
        let child = Command::new(self.bin)
            .arg("-n")
            .arg("-f")
            .arg(d.join("rsyslog.conf"))
            .arg("-i")
            .arg(d.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn rsyslogd")?;
        self.child = Some(child);
        self.wait_ready()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rsyslogd.log")).unwrap_or_default()
    }

    /// Ready when a probe sent over each transport has been written.
    fn wait_ready(&mut self) -> Result<()> {
        let before = self.lines().len();
        let probe = |tag: &str| format!("<14>1 - - probe - {tag} - ready");
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let ok = wait_for(Duration::from_secs(20), || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("rsyslogd exited with {st}: {}", self.log());
            }
            let _ = udp.send_to(probe("udp").as_bytes(), self.udp);
            if let Ok(mut s) = TcpStream::connect_timeout(&self.tcp, Duration::from_millis(200)) {
                let m = probe("tcp");
                let _ = write!(s, "{} {m}", m.len());
            }
            let lines = self.lines();
            let seen = |t: &str| {
                lines[before.min(lines.len())..]
                    .iter()
                    .any(|l| l.app_name == "probe" && l.msgid == t)
            };
            (seen("udp") && seen("tcp")).then_some(())
        });
        if ok.is_none() {
            bail!("rsyslogd did not receive probes; log:\n{}", self.log());
        }
        Ok(())
    }

    /// Every message received so far, in file order.
    pub fn lines(&self) -> Vec<SyslogLine> {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                let f = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                Some(SyslogLine {
                    pri: f("pri").parse().unwrap_or(u32::MAX),
                    version: f("version"),
                    timestamp: f("timestamp"),
                    hostname: f("hostname"),
                    app_name: f("app_name"),
                    procid: f("procid"),
                    msgid: f("msgid"),
                    structured_data: f("structured_data"),
                    msg: f("msg"),
                })
            })
            .collect()
    }

    /// Wait until `n` messages of `app_name` arrived; returns them.
    pub fn wait_app(&self, app_name: &str, n: usize, timeout: Duration) -> Vec<SyslogLine> {
        let got = wait_for(timeout, || {
            let v: Vec<SyslogLine> = self
                .lines()
                .into_iter()
                .filter(|l| l.app_name == app_name)
                .collect();
            (v.len() >= n).then_some(v)
        });
        got.unwrap_or_else(|| {
            let have = self
                .lines()
                .into_iter()
                .filter(|l| l.app_name == app_name)
                .count();
            panic!(
                "rsyslog got {have} of {n} messages of {app_name} in {timeout:?}; log:\n{}",
                self.log()
            )
        })
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("rsyslog log:\n{}", self.log());
        }
    }
}

/// One SD-ELEMENT: its SD-ID and its (name, unescaped value) parameters.
pub type SdElement = (String, Vec<(String, String)>);

/// RFC 5424 STRUCTURED-DATA → its elements, in order.
pub fn parse_structured_data(sd: &str) -> Result<Vec<SdElement>> {
    let mut out = Vec::new();
    if sd == "-" {
        return Ok(out);
    }
    let mut it = sd.chars().peekable();
    while let Some(c) = it.next() {
        if c != '[' {
            bail!("expected [ in {sd:?}");
        }
        let mut id = String::new();
        while let Some(&c) = it.peek() {
            if c == ' ' || c == ']' {
                break;
            }
            id.push(c);
            it.next();
        }
        let mut params = Vec::new();
        loop {
            match it.next() {
                Some(']') => break,
                Some(' ') => {}
                other => bail!("unexpected {other:?} in {sd:?}"),
            }
            let mut name = String::new();
            for c in it.by_ref() {
                if c == '=' {
                    break;
                }
                name.push(c);
            }
            if it.next() != Some('"') {
                bail!("expected \" in {sd:?}");
            }
            let mut v = String::new();
            loop {
                match it.next() {
                    Some('\\') => match it.next() {
                        Some(c @ ('"' | '\\' | ']')) => v.push(c),
                        Some(c) => {
                            v.push('\\');
                            v.push(c);
                        }
                        None => bail!("unterminated value in {sd:?}"),
                    },
                    Some('"') => break,
                    Some(c) => v.push(c),
                    None => bail!("unterminated value in {sd:?}"),
                }
            }
            params.push((name, v));
            if it.peek() == Some(&']') {
                it.next();
                break;
            }
        }
        out.push((id, params));
    }
    Ok(out)
}

// ---------------------------------------------------------------- CEF

/// A CEF record split into its 7 header fields (unescaped) and extension.
pub struct Cef {
    pub header: Vec<String>,
    pub ext: BTreeMap<String, String>,
}

/// Parse `CEF:0|…|…|…|…|…|…|ext` as the CEF specification defines it.
pub fn parse_cef(s: &str) -> Result<Cef> {
    let s = s.strip_prefix("CEF:").context("no CEF: prefix")?;
    let mut header = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while header.len() < 7 {
        match chars.next() {
            Some('\\') => match chars.next() {
                Some(c @ ('\\' | '|')) => cur.push(c),
                Some(c) => {
                    cur.push('\\');
                    cur.push(c);
                }
                None => bail!("truncated header"),
            },
            Some('|') => header.push(std::mem::take(&mut cur)),
            Some(c) => cur.push(c),
            None => bail!("truncated header: {header:?}"),
        }
    }
    let ext_str: String = chars.collect();
    // Split at unescaped '=': the key is the last word before it.
    let mut ext = BTreeMap::new();
    let mut tokens: Vec<(String, String)> = Vec::new(); // (raw before '=', …)
    let mut buf = String::new();
    let mut it = ext_str.chars();
    let mut parts: Vec<String> = Vec::new();
    while let Some(c) = it.next() {
        match c {
            '\\' => {
                buf.push('\\');
                if let Some(n) = it.next() {
                    buf.push(n);
                }
            }
            '=' => parts.push(std::mem::take(&mut buf)),
            c => buf.push(c),
        }
    }
    parts.push(buf);
    // parts[0] = key0; parts[i] = "value_{i-1} key_i" for 0<i<last; last = value.
    let mut key = parts.first().cloned().unwrap_or_default();
    for (i, p) in parts.iter().enumerate().skip(1) {
        if i == parts.len() - 1 {
            tokens.push((key.clone(), p.clone()));
        } else {
            let (v, k) = p
                .rsplit_once(' ')
                .with_context(|| format!("no key before = in {p:?}"))?;
            tokens.push((key.clone(), v.to_string()));
            key = k.to_string();
        }
    }
    for (k, v) in tokens {
        let mut o = String::new();
        let mut c = v.chars();
        while let Some(ch) = c.next() {
            if ch == '\\' {
                match c.next() {
                    Some('n') => o.push('\n'),
                    Some('r') => o.push('\r'),
                    Some(x) => o.push(x),
                    None => o.push('\\'),
                }
            } else {
                o.push(ch);
            }
        }
        ext.insert(k.trim().to_string(), o);
    }
    Ok(Cef { header, ext })
}

fn enum_from<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    Ok(serde_json::from_value(Value::String(s.to_string()))?)
}

/// Rebuild a finding from its CEF record (the mapping documented in
/// `detector::sinks::render_cef`).
pub fn finding_from_cef(s: &str) -> Result<Finding> {
    let c = parse_cef(s)?;
    let h = &c.header;
    if h[0] != "0" || h[1] != "detector" || h[2] != "detector" {
        bail!("unexpected CEF header {h:?}");
    }
    let e = &c.ext;
    let get = |k: &str| e.get(k).cloned();
    let num =
        |k: &str| -> Result<u64> { Ok(e.get(k).with_context(|| format!("{k} missing"))?.parse()?) };
    let kind: FindingKind = enum_from(&h[4])?;
    let severity: Severity = enum_from(&get("detectorSeverity").context("detectorSeverity")?)?;
    let cef_sev: u8 = h[6].parse()?;
    let want_sev = match severity {
        Severity::Info => 1,
        Severity::Low => 3,
        Severity::Medium => 5,
        Severity::High => 8,
        Severity::Critical => 10,
    };
    if cef_sev != want_sev {
        bail!("CEF severity {cef_sev} does not match {severity:?}");
    }
    let rt = num("rt")? as i64;
    let time = chrono::DateTime::from_timestamp_millis(rt)
        .context("rt")?
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let label = |n: &str, want: &str| -> Result<Option<String>> {
        match get(n) {
            None => Ok(None),
            Some(v) => {
                let l = get(&format!("{n}Label")).unwrap_or_default();
                if l != want {
                    bail!("{n}Label is {l:?}, not {want:?}");
                }
                Ok(Some(v))
            }
        }
    };
    let destination = match (get("dst"), get("c6a3")) {
        (None, None) => None,
        (a, b) => Some(Destination {
            ip: a.or(b).unwrap().parse()?,
            port: num("dpt")? as u16,
            protocol: get("proto").context("proto")?,
        }),
    };
    let credential = match get("filePath") {
        None => None,
        Some(path) => Some(Credential {
            kind: get("fileType").context("fileType")?,
            path,
            owner_pod_uid: get("detectorCredentialOwner"),
            inode: num("fileId")?,
            dev: label("cn3", "credentialDev")?.context("cn3")?.parse()?,
        }),
    };
    let message = if h[5] == h[4] {
        String::new()
    } else {
        h[5].clone()
    };
    Ok(Finding {
        time,
        kind,
        severity,
        action: enum_from(&get("act").context("act")?)?,
        intent: label("cs1", "intent")?,
        workload: Workload {
            namespace: label("cs2", "namespace")?,
            pod: label("cs3", "pod")?,
            pod_uid: label("cs4", "podUid")?,
            container_id: label("cs5", "containerId")?,
            cgroup_id: label("cn1", "cgroupId")?.context("cn1")?.parse()?,
            cgroup_path: get("detectorCgroupPath"),
            ..Default::default()
        },
        process: Process {
            pid: num("spid")? as u32,
            ppid: label("cn2", "ppid")?.context("cn2")?.parse()?,
            exe: get("detectorExe"),
            comm: get("sproc").unwrap_or_default(),
            ancestry: match get("detectorAncestry") {
                Some(a) => serde_json::from_str(&a)?,
                None => Vec::new(),
            },
            uid: get("suid").map(|u| u.parse()).transpose()?,
        },
        credential,
        destination,
        mitre: label("cs6", "mitreTechniques")?
            .map(|m| m.split(',').map(String::from).collect())
            .unwrap_or_default(),
        count: num("cnt")?,
        message,
    })
}

// ---------------------------------------------------------------- HTTP

/// A webhook receiver on 127.0.0.1 that records every element of every JSON
/// array POSTed to it, in arrival order. [`stop`](Self::stop) closes the
/// listener and every connection (the port then refuses connections);
/// [`start_again`](Self::start_again) serves on the same port again.
pub struct HttpReceiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

#[derive(Default)]
struct ReceiverState {
    items: Mutex<Vec<Value>>,
    requests: AtomicUsize,
    /// Answer this many of the next requests with `fail_status`.
    fail_next: AtomicU32,
    fail_status: std::sync::atomic::AtomicU16,
    /// Headers of the last request (name, value), lower-case names.
    last_headers: Mutex<Vec<(String, String)>>,
}

async fn receive(
    axum::extract::State(st): axum::extract::State<Arc<ReceiverState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    st.requests.fetch_add(1, Ordering::SeqCst);
    *st.last_headers.lock().unwrap() = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    if st
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let code = st.fail_status.load(Ordering::SeqCst);
        return axum::http::StatusCode::from_u16(code)
            .unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE);
    }
    match serde_json::from_slice::<Vec<Value>>(&body) {
        Ok(v) => {
            st.items.lock().unwrap().extend(v);
            axum::http::StatusCode::OK
        }
        Err(_) => axum::http::StatusCode::BAD_REQUEST,
    }
}

impl HttpReceiver {
    /// Serve on `addr` (port 0: any free port).
    pub async fn start(addr: SocketAddr) -> Result<HttpReceiver> {
        let mut r = HttpReceiver {
            addr,
            state: Arc::default(),
            running: None,
        };
        r.serve().await?;
        Ok(r)
    }

    async fn serve(&mut self) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("bind {}", self.addr))?;
        self.addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route("/", axum::routing::post(receive))
            .route("/{*path}", axum::routing::post(receive))
            .with_state(self.state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        self.running = Some((tx, task));
        Ok(())
    }

    /// Close the listener and all connections; wait until they are closed.
    pub async fn stop(&mut self) {
        if let Some((tx, task)) = self.running.take() {
            let _ = tx.send(());
            let mut task = task;
            if tokio::time::timeout(Duration::from_secs(10), &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
    }

    pub async fn start_again(&mut self) -> Result<()> {
        if self.running.is_none() {
            self.serve().await?;
        }
        Ok(())
    }

    /// Every element received, in arrival order.
    pub fn received(&self) -> Vec<Value> {
        self.state.items.lock().unwrap().clone()
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// A header of the last request.
    pub fn last_header(&self, name: &str) -> Option<String> {
        let h = self.state.last_headers.lock().unwrap();
        h.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    /// Answer the next `n` requests with 503 Service Unavailable.
    pub fn fail_next(&self, n: u32) {
        self.fail_next_with(n, 503);
    }

    /// Answer the next `n` requests with HTTP `status`.
    pub fn fail_next_with(&self, n: u32, status: u16) {
        self.state.fail_status.store(status, Ordering::SeqCst);
        self.state.fail_next.store(n, Ordering::SeqCst);
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        if let Some((tx, task)) = self.running.take() {
            let _ = tx.send(());
            task.abort();
        }
    }
}

/// A loopback address on which nothing listens (connections are refused).
pub fn refusing_addr() -> SocketAddr {
    format!("127.0.0.1:{}", crate::free_port()).parse().unwrap()
}
