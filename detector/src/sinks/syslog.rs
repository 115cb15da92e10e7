//! Syslog (RFC 5424) over UDP or TCP (octet counting, RFC 6587 3.4.1).
//!
//! `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [origin …][detector@32473 …] MSG`
//! with MSGID = the finding kind, TIMESTAMP = the finding time, structured
//! data carrying the key fields and MSG = the finding as JSON (or a CEF
//! record). `32473` is the example enterprise number of RFC 5612.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context, Result};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpStream, UdpSocket},
    sync::{mpsc, oneshot},
};

use super::{Item, SinkMetrics, SyslogConfig, SyslogFormat, SyslogTransport, Worker};
use crate::finding::{Finding, Severity};

pub const SD_ID: &str = "detector@32473";

pub(crate) fn facility_number(name: &str) -> Result<u8> {
    const NAMES: [&str; 24] = [
        "kern",
        "user",
        "mail",
        "daemon",
        "auth",
        "syslog",
        "lpr",
        "news",
        "uucp",
        "cron",
        "authpriv",
        "ftp",
        "ntp",
        "security",
        "console",
        "solaris-cron",
        "local0",
        "local1",
        "local2",
        "local3",
        "local4",
        "local5",
        "local6",
        "local7",
    ];
    let n = name.trim().to_ascii_lowercase();
    if let Ok(v) = n.parse::<u8>() {
        if v < 24 {
            return Ok(v);
        }
    }
    match NAMES.iter().position(|x| *x == n) {
        Some(i) => Ok(i as u8),
        None => bail!("unknown syslog facility {name:?}"),
    }
}

/// Syslog severity of a finding severity.
pub fn syslog_severity(s: Severity) -> u8 {
    match s {
        Severity::Critical => 2,
        Severity::High => 3,
        Severity::Medium => 4,
        Severity::Low => 5,
        Severity::Info => 6,
    }
}

/// PRINTUSASCII only, at most `max` characters; `-` when empty.
fn header_field(s: &str, max: usize) -> String {
    let v: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

fn sd_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

fn sd_element(id: &str, params: &[(&str, String)]) -> String {
    let mut o = format!("[{id}");
    for (k, v) in params {
        o.push_str(&format!(" {k}=\"{}\"", sd_escape(v)));
    }
    o.push(']');
    o
}

/// The key fields as SD-PARAMs of the `detector@32473` element.
pub fn sd_params(f: &Finding) -> Vec<(&'static str, String)> {
    let mut p: Vec<(&'static str, String)> = vec![
        ("kind", f.kind.as_str().into()),
        ("severity", sev_str(f.severity).into()),
        ("action", serde_plain(&f.action)),
    ];
    let w = &f.workload;
    for (k, v) in [
        ("intent", &f.intent),
        ("namespace", &w.namespace),
        ("pod", &w.pod),
        ("podUid", &w.pod_uid),
        ("containerId", &w.container_id),
    ] {
        if let Some(v) = v {
            p.push((k, v.clone()));
        }
    }
    p.push(("cgroupId", w.cgroup_id.to_string()));
    p.push(("pid", f.process.pid.to_string()));
    p.push(("comm", f.process.comm.clone()));
    if let Some(e) = &f.process.exe {
        p.push(("exe", e.clone()));
    }
    if let Some(c) = &f.credential {
        p.push(("credentialKind", c.kind.clone()));
        p.push(("credentialPath", c.path.clone()));
    }
    if let Some(d) = &f.destination {
        p.push(("dstIp", d.ip.to_string()));
        p.push(("dstPort", d.port.to_string()));
        p.push(("protocol", d.protocol.clone()));
    }
    if !f.mitre.is_empty() {
        p.push(("mitre", f.mitre.join(",")));
    }
    p.push(("count", f.count.to_string()));
    p
}

fn sev_str(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Low => "low",
        Severity::Medium => "medium",
        Severity::High => "high",
        Severity::Critical => "critical",
    }
}

fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

/// RFC 5424 TIMESTAMP of the finding time (UTC, milliseconds); now when
/// the finding time does not parse.
fn timestamp(time: &str) -> String {
    let t = chrono::DateTime::parse_from_rfc3339(time)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now());
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One RFC 5424 message (without transport framing).
pub fn render_rfc5424(
    f: &Finding,
    format: SyslogFormat,
    facility: u8,
    hostname: &str,
    app_name: &str,
    procid: u32,
) -> String {
    let pri = facility as u32 * 8 + syslog_severity(f.severity) as u32;
    let origin = sd_element(
        "origin",
        &[
            ("software", "detector".into()),
            ("swVersion", env!("CARGO_PKG_VERSION").into()),
        ],
    );
    let sd = sd_element(SD_ID, &sd_params(f));
    let msg = match format {
        SyslogFormat::Rfc5424 => serde_json::to_string(f).expect("a finding always serialises"),
        SyslogFormat::Cef => super::cef::render(f),
    };
    format!(
        "<{pri}>1 {} {} {} {} {} {origin}{sd} {msg}",
        timestamp(&f.time),
        header_field(hostname, 255),
        header_field(app_name, 48),
        procid,
        header_field(f.kind.as_str(), 32),
    )
}

struct Renderer {
    format: SyslogFormat,
    facility: u8,
    hostname: String,
    app_name: String,
    procid: u32,
}

impl Renderer {
    fn render(&self, f: &Finding) -> String {
        render_rfc5424(
            f,
            self.format,
            self.facility,
            &self.hostname,
            &self.app_name,
            self.procid,
        )
    }
}

const BATCH: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn spawn(c: &SyslogConfig, rx: mpsc::Receiver<Item>, m: SinkMetrics) -> Result<Worker> {
    let r = Renderer {
        format: c.format,
        facility: facility_number(&c.facility)?,
        hostname: c.hostname.clone().unwrap_or_else(super::node_name),
        app_name: c.app_name.clone(),
        procid: std::process::id(),
    };
    // Resolve now so that a bad address is a configuration error; resolved
    // again on every reconnect.
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&c.address)
        .with_context(|| format!("resolve {}", c.address))?
        .next()
        .with_context(|| format!("no address for {}", c.address))?;
    let rt =
        tokio::runtime::Handle::try_current().context("the syslog sink needs a tokio runtime")?;
    let (done_tx, done) = oneshot::channel();
    let address = c.address.clone();
    let task = match c.transport {
        SyslogTransport::Udp => rt.spawn(async move {
            udp_loop(addr, rx, r, m).await;
            let _ = done_tx.send(());
        }),
        SyslogTransport::Tcp => rt.spawn(async move {
            tcp_loop(address, addr, rx, r, m).await;
            let _ = done_tx.send(());
        }),
    };
    Ok(Worker {
        done: Some(done),
        tasks: vec![task],
    })
}

async fn recv_batch(rx: &mut mpsc::Receiver<Item>, m: &SinkMetrics) -> Option<Vec<Item>> {
    let mut batch = Vec::new();
    if rx.recv_many(&mut batch, BATCH).await == 0 {
        return None;
    }
    m.queue_depth.set(rx.len() as i64);
    Some(batch)
}

async fn udp_loop(addr: SocketAddr, mut rx: mpsc::Receiver<Item>, r: Renderer, m: SinkMetrics) {
    let mut sock: Option<UdpSocket> = None;
    while let Some(batch) = recv_batch(&mut rx, &m).await {
        for f in batch {
            let msg = r.render(&f);
            let mut ok = false;
            // A previous datagram's ICMP error surfaces on the next send:
            // try twice, then count the loss.
            for _ in 0..2 {
                if sock.is_none() {
                    sock = udp_connect(addr).await.ok();
                }
                let Some(s) = &sock else { break };
                match s.send(msg.as_bytes()).await {
                    Ok(_) => {
                        ok = true;
                        break;
                    }
                    Err(e) => {
                        m.failed.inc();
                        tracing::debug!(error = %e, "syslog udp send");
                        if e.kind() != std::io::ErrorKind::ConnectionRefused {
                            sock = None;
                        }
                    }
                }
            }
            if ok {
                m.sent.inc();
            } else {
                m.dropped_error.inc();
            }
        }
    }
}

async fn udp_connect(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind).await?;
    s.connect(addr).await?;
    Ok(s)
}

/// Has the peer closed (or reset) an idle connection? A syslog receiver
/// never sends, so anything readable means the connection is gone.
fn peer_closed(s: &TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.try_read(&mut b) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

async fn tcp_loop(
    address: String,
    mut addr: SocketAddr,
    mut rx: mpsc::Receiver<Item>,
    r: Renderer,
    m: SinkMetrics,
) {
    let mut conn: Option<TcpStream> = None;
    let mut attempt = 0u32;
    while let Some(batch) = recv_batch(&mut rx, &m).await {
        let mut frames = Vec::with_capacity(batch.len() * 512);
        for f in &batch {
            let msg = r.render(f);
            frames.extend_from_slice(format!("{} ", msg.len()).as_bytes());
            frames.extend_from_slice(msg.as_bytes());
        }
        // Retry the batch until it is written; meanwhile the queue fills and
        // `emit` counts what it cannot queue. Shutdown aborts this loop.
        loop {
            if conn.as_ref().is_some_and(peer_closed) {
                conn = None;
            }
            if conn.is_none() {
                if let Ok(Some(a)) = tokio::net::lookup_host(&address)
                    .await
                    .map(|mut i| i.next())
                {
                    addr = a;
                }
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        conn = Some(s);
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, %addr, "syslog tcp connect"),
                    Err(_) => tracing::debug!(%addr, "syslog tcp connect timed out"),
                }
            }
            if let Some(s) = &mut conn {
                match tokio::time::timeout(WRITE_TIMEOUT, s.write_all(&frames)).await {
                    Ok(Ok(())) => {
                        m.sent.inc_by(batch.len() as u64);
                        attempt = 0;
                        break;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "syslog tcp write"),
                    Err(_) => tracing::debug!("syslog tcp write timed out"),
                }
                // A partial write may have reached the receiver: resending
                // the batch on a new connection can duplicate, never lose.
                conn = None;
            }
            m.failed.inc();
            let d = super::backoff(Duration::from_millis(200), Duration::from_secs(10), attempt);
            attempt = attempt.saturating_add(1);
            if attempt == 1 || attempt.is_power_of_two() {
                tracing::warn!(%addr, attempts = attempt, "syslog receiver unreachable; retrying");
            }
            tokio::time::sleep(d).await;
        }
    }
    if let Some(mut s) = conn {
        let _ = s.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::testutil::sample;

    #[test]
    fn rfc5424_layout() {
        let mut f = sample(5);
        f.process.exe = Some("/tmp/x\"]\\y".into());
        let m = render_rfc5424(
            &f,
            SyslogFormat::Rfc5424,
            facility_number("auth").unwrap(),
            "node 1",
            "detector",
            7,
        );
        // auth (4) * 8 + err (3)
        let want = "<35>1 2026-11-23T10:00:05.005Z node1 detector 7 unexpected_destination [origin software=\"detector\"";
        assert!(m.starts_with(want), "{m}");
        assert!(m.contains(r#" exe="/tmp/x\"\]\\y""#), "{m}");
        let json = m.split_once("] {").map(|(_, j)| format!("{{{j}")).unwrap();
        assert_eq!(serde_json::from_str::<Finding>(&json).unwrap(), f);
        assert_eq!(facility_number("local7").unwrap(), 23);
        assert_eq!(facility_number("10").unwrap(), 10);
        assert!(facility_number("bogus").is_err());
    }
}
