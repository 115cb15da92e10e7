//! Part of `cargo xtask bench`: why the fanotify sensor uses permission
//! events (`FAN_CLASS_CONTENT` + `FAN_OPEN_PERM`) rather than notification
//! events (`FAN_CLASS_NOTIF` + `FAN_OPEN`). Both are measured here with a
//! minimal listener of our own (no daemon), on one marked file:
//!
//! - the cost of an open+close of the marked file;
//! - the race: a thread opens the file and connects to a loopback listener
//!   right away; did the fanotify listener see the open before the connect
//!   started (as it must for the kernel to judge that connect as a
//!   holder's)?
//! - the opener gone: short-lived processes open the file and exit; could
//!   the listener still read the opener's /proc/<pid>/status?
//!
//! Loopback only; every loop is bounded.

use std::{
    ffi::CString,
    fmt::Write as _,
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::unix::ffi::OsStrExt,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Permission,
    Notification,
}

/// A fanotify group on one file and the thread that reads it: answers
/// permission events (allow), reports each event's time and whether the
/// opener's /proc entry was still there.
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    seen: mpsc::Receiver<Seen>,
}

struct Seen {
    at: Instant,
    opener_alive: bool,
}

impl Listener {
    fn start(kind: Kind, file: &Path, check_proc: bool) -> Result<Listener> {
        let class = match kind {
            Kind::Permission => libc::FAN_CLASS_CONTENT,
            Kind::Notification => libc::FAN_CLASS_NOTIF,
        };
        // SAFETY: plain syscall.
        let fd = unsafe {
            libc::fanotify_init(
                class | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK | libc::FAN_REPORT_TID,
                (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_LARGEFILE) as u32,
            )
        };
        if fd < 0 {
            bail!("fanotify_init: {}", std::io::Error::last_os_error());
        }
        let mask = match kind {
            Kind::Permission => libc::FAN_OPEN_PERM,
            Kind::Notification => libc::FAN_OPEN,
        };
        let c = CString::new(file.as_os_str().as_bytes())?;
        // SAFETY: valid path, plain syscall.
        if unsafe { libc::fanotify_mark(fd, libc::FAN_MARK_ADD, mask, libc::AT_FDCWD, c.as_ptr()) }
            != 0
        {
            let e = std::io::Error::last_os_error();
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
            bail!("fanotify_mark: {e}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, seen) = mpsc::channel();
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-fanotify".into())
            .spawn(move || {
                let mut buf = vec![0u64; 1024];
                while !st.load(Ordering::Relaxed) {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
                        continue;
                    }
                    // SAFETY: reads into our buffer.
                    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len() * 8) };
                    if n <= 0 {
                        continue;
                    }
                    let at = Instant::now();
                    let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
                    let bytes =
                        // SAFETY: the kernel wrote n bytes.
                        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
                    let mut off = 0;
                    while off + meta_len <= bytes.len() {
                        // SAFETY: enough bytes for one plain struct.
                        let m: libc::fanotify_event_metadata =
                            unsafe { std::ptr::read_unaligned(bytes[off..].as_ptr().cast()) };
                        if m.event_len as usize == 0 {
                            break;
                        }
                        let opener_alive = !check_proc
                            || std::fs::metadata(format!("/proc/{}/status", m.pid)).is_ok();
                        if m.mask & libc::FAN_OPEN_PERM != 0 {
                            let r = libc::fanotify_response {
                                fd: m.fd,
                                response: libc::FAN_ALLOW,
                            };
                            // SAFETY: writes a plain struct.
                            unsafe {
                                libc::write(
                                    fd,
                                    (&r as *const libc::fanotify_response).cast(),
                                    std::mem::size_of_val(&r),
                                )
                            };
                        }
                        if m.fd >= 0 {
                            // SAFETY: the event's fd is ours to close.
                            unsafe { libc::close(m.fd) };
                        }
                        let _ = tx.send(Seen { at, opener_alive });
                        off += m.event_len as usize;
                    }
                }
                // SAFETY: our group fd; closing allows any pending event.
                unsafe { libc::close(fd) };
            })?;
        Ok(Listener {
            stop,
            thread: Some(thread),
            seen,
        })
    }

    fn drain(&self) {
        while self.seen.try_recv().is_ok() {}
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_close_ns(path: &CString, iters: u64) -> f64 {
    for _ in 0..(iters / 50).max(1) {
        // SAFETY: valid path; fd closed at once.
        unsafe { libc::close(libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC)) };
    }
    let t = Instant::now();
    for _ in 0..iters {
        // SAFETY: as above.
        unsafe { libc::close(libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC)) };
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

/// Results of one listener kind.
pub struct KindResult {
    name: &'static str,
    open_ns: f64,
    race_trials: usize,
    /// Connects that started before the listener had the open event.
    race_lost: usize,
    /// How far behind the connect the listener was, in those trials (median).
    race_lag_us: f64,
    gone_trials: usize,
    /// Events whose opener's /proc entry was already gone.
    gone: usize,
}

pub struct Results {
    none_ns: f64,
    kinds: Vec<KindResult>,
}

/// Measure both kinds on a file in `dir` (tmpfs).
pub fn measure(dir: &Path, scale: f64) -> Result<Results> {
    let file = dir.join("fanotify-mode-file");
    std::fs::write(&file, b"bench: fanotify modes\n")?;
    let c = CString::new(file.as_os_str().as_bytes())?;
    let n = |base: f64| ((base * scale).round() as u64).max(10);
    let none_ns = open_close_ns(&c, n(100_000.0));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("loopback listener")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let mut kinds = Vec::new();
    for kind in [Kind::Permission, Kind::Notification] {
        let name = match kind {
            Kind::Permission => "FAN_CLASS_CONTENT + FAN_OPEN_PERM",
            Kind::Notification => "FAN_CLASS_NOTIF + FAN_OPEN",
        };
        // Cost: the listener only reads (and answers).
        let l = Listener::start(kind, &file, false)?;
        let iters = match kind {
            Kind::Permission => n(20_000.0),
            Kind::Notification => n(100_000.0),
        };
        let open_ns = open_close_ns(&c, iters);
        drop(l);

        // The race: open, then connect at once.
        let l = Listener::start(kind, &file, false)?;
        let trials = n(2_000.0).min(5_000) as usize;
        let mut lost = 0;
        let mut lags = Vec::new();
        for _ in 0..trials {
            l.drain();
            let t0 = Instant::now();
            // SAFETY: valid path.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            let connect_at = t0.elapsed();
            let s = TcpStream::connect(addr);
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
            drop(s);
            let seen = l
                .seen
                .recv_timeout(Duration::from_secs(2))
                .context("the fanotify listener never saw an open")?;
            let seen_at = seen.at.saturating_duration_since(t0);
            if seen_at > connect_at {
                lost += 1;
                lags.push((seen_at - connect_at).as_secs_f64() * 1e6);
            }
        }
        drop(l);

        // The opener gone: short-lived processes open and exit.
        let l = Listener::start(kind, &file, true)?;
        let gone_trials = n(300.0).min(2_000) as usize;
        let mut gone = 0;
        for _ in 0..gone_trials {
            l.drain();
            // SAFETY: the child only calls async-signal-safe functions.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                unsafe {
                    libc::close(libc::open(c.as_ptr(), libc::O_RDONLY));
                    libc::_exit(0);
                }
            }
            if pid < 0 {
                bail!("fork: {}", std::io::Error::last_os_error());
            }
            // Reaped at once, as a shell reaps `$(cat token)`: a zombie
            // would still have its /proc entry. (With permission events the
            // child cannot exit before the listener answered.)
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            let seen = l.seen.recv_timeout(Duration::from_secs(2));
            match seen {
                Ok(s) if !s.opener_alive => gone += 1,
                Ok(_) => {}
                Err(_) => bail!("the fanotify listener never saw the child's open"),
            }
        }
        drop(l);
        lags.sort_by(|a, b| a.total_cmp(b));
        kinds.push(KindResult {
            name,
            open_ns,
            race_trials: trials,
            race_lost: lost,
            race_lag_us: lags.get(lags.len() / 2).copied().unwrap_or(0.0),
            gone_trials,
            gone,
        });
    }
    let _ = std::fs::remove_file(&file);
    Ok(Results { none_ns, kinds })
}

impl Results {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(
            "| fanotify group (minimal listener, no daemon) | open+close of the marked file | \
             connect started before the listener had the open | opener's /proc gone when the event was read |\n",
        );
        s.push_str("|---|---:|---:|---:|\n");
        let _ = writeln!(
            s,
            "| none (no group) | {:.0} ns (1.00×) | – | – |",
            self.none_ns
        );
        for k in &self.kinds {
            let lag = if k.race_lost > 0 {
                format!(" (median {:.0} µs behind)", k.race_lag_us)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "| {} | {:.0} ns ({:.2}×) | {} of {}{} | {} of {} |",
                k.name,
                k.open_ns,
                k.open_ns / self.none_ns,
                k.race_lost,
                k.race_trials,
                lag,
                k.gone,
                k.gone_trials
            );
        }
        s
    }
}
