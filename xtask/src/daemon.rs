//! The detector daemon as the benches run it: started on a free loopback
//! metrics port, ready once /readyz answers 200, stopped with SIGTERM; and
//! the small HTTP and log helpers that go with it.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::guards::Proc;

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// A running daemon.
pub struct Daemon {
    pub proc: Proc,
    pub port: u16,
    pub log: PathBuf,
    /// From spawn to the first 200 from /readyz.
    pub ready_after: Duration,
}

/// Starts `bin run ARGS --metrics-addr 127.0.0.1:<free port>`, logging to
/// `log`, and waits up to `timeout` for /readyz.
pub fn start_daemon(bin: &Path, args: &[String], log: &Path, timeout: Duration) -> Result<Daemon> {
    let port = free_port()?;
    let logf = File::create(log)?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .args(args)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    let t0 = Instant::now();
    let mut proc = Proc::spawn(cmd, "detector")?;
    loop {
        if let Some(st) = proc.exited() {
            bail!(
                "detector exited before /readyz ({st}); log tail:\n{}",
                tail(log, 30)
            );
        }
        if let Ok((200, _)) = http_get(port, "/readyz") {
            break;
        }
        if t0.elapsed() > timeout {
            proc.stop(libc::SIGTERM, Duration::from_secs(10));
            bail!(
                "detector not ready after {}s; log tail:\n{}",
                timeout.as_secs(),
                tail(log, 30)
            );
        }
        sleep(Duration::from_millis(100));
    }
    Ok(Daemon {
        proc,
        port,
        log: log.to_path_buf(),
        ready_after: t0.elapsed(),
    })
}

impl Daemon {
    pub fn metrics(&self) -> String {
        match http_get(self.port, "/metrics") {
            Ok((200, b)) => b,
            _ => String::new(),
        }
    }
    /// SIGTERM (SIGKILL after 30 s); how it ended.
    pub fn stop(mut self) -> String {
        let how = self.proc.stop(libc::SIGTERM, Duration::from_secs(30));
        if !how.contains("exit status: 0") {
            eprintln!(
                "bench: detector stop: {how}; log tail:\n{}",
                tail(&self.log, 20)
            );
        }
        how
    }
}
