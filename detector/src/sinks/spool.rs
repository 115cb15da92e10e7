//! A bounded, durable FIFO of JSON lines on disk, for the webhook.
//!
//! Layout of the spool directory:
//! - `<seq>.seg`: append-only segments (20-digit sequence numbers), one JSON
//!   line per finding. The writer fsyncs after every group of appends and
//!   starts a new segment when the current one is large or fully delivered;
//!   after a restart it always starts a new segment, so a torn tail left by a
//!   crash is never appended to.
//! - `ack`: `<seq> <offset>` of the first line not yet delivered, replaced
//!   atomically after each delivered batch. A crash between a delivery and
//!   its ack means that batch is delivered again: at least once.
//! - `lock`: flock'ed by the owner, so two daemons never share a spool.
//!
//! Segments are read oldest first and deleted once delivered. The bound
//! (`max_bytes`, bytes of all segments) refuses the newest findings when hit;
//! the caller counts them.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use super::SinkMetrics;

/// A position in the spool: (segment sequence number, byte offset).
pub(crate) type Cursor = (u64, u64);

struct State {
    /// Segment being appended to.
    active: u64,
    /// Committed (fsynced, whole-line) length of every segment.
    segs: BTreeMap<u64, u64>,
    total: u64,
    /// First byte not yet delivered.
    ack: Cursor,
}

pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    state: Mutex<State>,
    pub notify: Notify,
    m: SinkMetrics,
    _lock: File,
}

/// What [`Spool::read`] found: complete lines from the cursor on, and the
/// cursor after them.
pub(crate) struct Batch {
    pub lines: Vec<Vec<u8>>,
    pub end: Cursor,
}

fn seg_name(seq: u64) -> String {
    format!("{seq:020}.seg")
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn lock_dir(dir: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    // A previous owner in this process may still be shutting down.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || Instant::now() > deadline {
            return Err(io::Error::new(
                e.kind(),
                format!("spool {} is in use: {e}", dir.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Spool {
    /// Open (or create) the spool in `dir` and recover what a previous run
    /// left there.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        m: SinkMetrics,
    ) -> io::Result<(Arc<Spool>, SpoolWriter)> {
        std::fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        let mut segs = BTreeMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            segs.insert(seq, e.metadata()?.len());
        }
        let ack = std::fs::read_to_string(dir.join("ack"))
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|x| x.parse::<u64>());
                Some((it.next()?.ok()?, it.next()?.ok()?))
            })
            .unwrap_or((0, 0));
        // Segments before the acked one were delivered.
        let delivered: Vec<u64> = segs.range(..ack.0).map(|(s, _)| *s).collect();
        for s in delivered {
            std::fs::remove_file(dir.join(seg_name(s))).or_else(ignore_missing)?;
            segs.remove(&s);
        }
        let cursor = match segs.first_key_value() {
            Some((&s, &len)) if s == ack.0 => (s, ack.1.min(len)),
            Some((&s, _)) => (s, 0),
            None => (ack.0, 0),
        };
        let active = segs
            .last_key_value()
            .map(|(s, _)| *s)
            .unwrap_or(0)
            .max(ack.0)
            + 1;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(dir.join(seg_name(active)))?;
        fsync_dir(dir)?;
        segs.insert(active, 0);
        let total = segs.values().sum();
        let spool = Arc::new(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: (max_bytes / 16).clamp(64 << 10, 16 << 20),
            state: Mutex::new(State {
                active,
                segs,
                total,
                ack: cursor,
            }),
            notify: Notify::new(),
            m,
            _lock: lock,
        });
        spool.m.spool_bytes.set(total as i64);
        let w = SpoolWriter {
            spool: spool.clone(),
            file,
            seq: active,
            len: 0,
        };
        Ok((spool, w))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where delivery starts.
    pub fn cursor(&self) -> Cursor {
        self.state().ack
    }

    /// Undelivered bytes (what the bound applies to is the bytes on disk).
    pub fn bytes(&self) -> u64 {
        self.state().total
    }

    /// Up to `max` complete lines from `cursor` (blocking file I/O). Deletes
    /// segments that were delivered entirely. `corrupt` counts lines lost to
    /// a torn tail.
    pub fn read(&self, mut cursor: Cursor, max: usize, max_read: usize) -> io::Result<Batch> {
        loop {
            let (limit, active, next) = {
                let st = self.state();
                let Some((&seq, &len)) = st.segs.range(cursor.0..).next() else {
                    return Ok(Batch {
                        lines: Vec::new(),
                        end: cursor,
                    });
                };
                if seq != cursor.0 {
                    cursor = (seq, 0);
                }
                (
                    len,
                    seq == st.active,
                    st.segs.range(seq + 1..).next().map(|(s, _)| *s),
                )
            };
            if cursor.1 >= limit {
                if active {
                    return Ok(Batch {
                        lines: Vec::new(),
                        end: cursor,
                    });
                }
                // Delivered entirely and no longer written: remove.
                std::fs::remove_file(self.dir.join(seg_name(cursor.0))).or_else(ignore_missing)?;
                let mut st = self.state();
                if let Some(len) = st.segs.remove(&cursor.0) {
                    st.total -= len;
                }
                self.m.spool_bytes.set(st.total as i64);
                cursor = (next.unwrap_or(cursor.0 + 1), 0);
                st.ack = cursor;
                continue;
            }
            let mut f = File::open(self.dir.join(seg_name(cursor.0)))?;
            f.seek(SeekFrom::Start(cursor.1))?;
            let want = (limit - cursor.1).min(max_read as u64);
            let mut buf = Vec::with_capacity(want as usize);
            f.take(want).read_to_end(&mut buf)?;
            let mut lines = Vec::new();
            let mut used = 0usize;
            for l in buf.split_inclusive(|b| *b == b'\n') {
                if lines.len() >= max || !l.ends_with(b"\n") {
                    break;
                }
                used += l.len();
                if l.len() > 1 {
                    lines.push(l[..l.len() - 1].to_vec());
                }
            }
            if used == 0 {
                if (buf.len() as u64) < want || buf.is_empty() {
                    // The file is shorter than its committed length: it was
                    // changed behind our back. Skip the rest of it.
                    tracing::warn!(segment = cursor.0, "spool segment shorter than expected");
                    self.truncate_seg(cursor.0, cursor.1 + buf.len() as u64);
                    continue;
                }
                // A line without its newline: the torn tail of a crash (only
                // in segments of an earlier run) or a line over `max_read`.
                self.m.dropped_corrupt.inc();
                tracing::warn!(
                    segment = cursor.0,
                    offset = cursor.1,
                    "skipping an incomplete spool record"
                );
                cursor.1 += buf.len() as u64;
                continue;
            }
            if lines.is_empty() {
                // Only empty lines.
                cursor.1 += used as u64;
                continue;
            }
            cursor.1 += used as u64;
            return Ok(Batch { lines, end: cursor });
        }
    }

    fn truncate_seg(&self, seq: u64, len: u64) {
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(l) = st.segs.get_mut(&seq) {
            st.total -= *l - len.min(*l);
            *l = len.min(*l);
        }
    }

    /// Record that everything before `cursor` was delivered.
    pub fn ack(&self, cursor: Cursor) -> io::Result<()> {
        self.state().ack = cursor;
        let tmp = self.dir.join("ack.tmp");
        let mut f = File::create(&tmp)?;
        writeln!(f, "{} {}", cursor.0, cursor.1)?;
        f.sync_data()?;
        std::fs::rename(&tmp, self.dir.join("ack"))
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// The single appender of a spool (owned by the webhook's writer thread).
pub(crate) struct SpoolWriter {
    spool: Arc<Spool>,
    file: File,
    seq: u64,
    len: u64,
}

/// Outcome of [`SpoolWriter::append`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Appended {
    pub stored: u64,
    /// Refused: the spool is at its bound.
    pub full: u64,
}

impl SpoolWriter {
    fn roll(&mut self) -> io::Result<()> {
        let seq = self.seq + 1;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(self.spool.dir.join(seg_name(seq)))?;
        fsync_dir(&self.spool.dir)?;
        self.file = file;
        self.seq = seq;
        self.len = 0;
        let mut st = self.spool.state();
        st.active = seq;
        st.segs.insert(seq, 0);
        Ok(())
    }

    /// Append lines (each ending in `\n`), durably, as far as the bound
    /// allows; lines beyond it are refused (newest first), never silently.
    pub fn append(&mut self, lines: &[Vec<u8>]) -> io::Result<Appended> {
        let (caught_up, mut room) = {
            let st = self.spool.state();
            (
                st.ack == (self.seq, self.len),
                self.spool.max_bytes.saturating_sub(st.total),
            )
        };
        if self.len >= self.spool.segment_bytes || (caught_up && self.len > 0) {
            // Large, or delivered entirely: let the reader delete it.
            self.roll()?;
        }
        let mut out = Vec::new();
        let mut res = Appended::default();
        for l in lines {
            if (l.len() as u64) <= room {
                room -= l.len() as u64;
                out.extend_from_slice(l);
                res.stored += 1;
            } else {
                res.full += 1;
            }
        }
        if out.is_empty() {
            return Ok(res);
        }
        if let Err(e) = self
            .file
            .write_all(&out)
            .and_then(|_| self.file.sync_data())
        {
            // Part of it may be on disk past the committed length; continue
            // in a fresh segment so that it is never read.
            let _ = self.roll();
            return Err(e);
        }
        self.len += out.len() as u64;
        {
            let mut st = self.spool.state();
            st.segs.insert(self.seq, self.len);
            st.total += out.len() as u64;
            self.spool.m.spool_bytes.set(st.total as i64);
        }
        self.spool.notify.notify_one();
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::Collectors;

    fn metrics() -> SinkMetrics {
        Collectors::new().unwrap().for_sink("webhook")
    }

    fn lines(r: std::ops::Range<u32>) -> Vec<Vec<u8>> {
        r.map(|i| format!("{{\"n\":{i}}}\n").into_bytes()).collect()
    }

    fn drain(s: &Spool, c: &mut Cursor, batch: usize) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..10_000 {
            let b = s.read(*c, batch, 1 << 20).unwrap();
            *c = b.end;
            if b.lines.is_empty() {
                break;
            }
            got.extend(b.lines.into_iter().map(|l| String::from_utf8(l).unwrap()));
            s.ack(*c).unwrap();
        }
        got
    }

    #[test]
    fn fifo_across_restart_bound_and_torn_tail() {
        let tmp = crate::sinks::testutil::TempDir::new("spool");
        let dir = tmp.0.join("spool");
        let m = metrics();
        {
            let (s, mut w) = Spool::open(&dir, 1 << 20, m.clone()).unwrap();
            assert_eq!(w.append(&lines(0..10)).unwrap().stored, 10);
            let mut c = s.cursor();
            let b = s.read(c, 4, 1 << 20).unwrap();
            assert_eq!(b.lines.len(), 4);
            c = b.end;
            s.ack(c).unwrap();
            // Not acked: must come again after a restart.
            let _ = s.read(c, 3, 1 << 20).unwrap();
            assert_eq!(w.append(&lines(10..12)).unwrap().stored, 2);
        }
        // A crash left a torn line in an old segment.
        let last = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".seg"))
            .max()
            .unwrap();
        OpenOptions::new()
            .append(true)
            .open(dir.join(&last))
            .unwrap()
            .write_all(b"{\"n\":99")
            .unwrap();
        let (s, mut w) = Spool::open(&dir, 1 << 20, m.clone()).unwrap();
        w.append(&lines(12..13)).unwrap();
        let mut c = s.cursor();
        let got = drain(&s, &mut c, 3);
        let want: Vec<String> = (4..13).map(|i| format!("{{\"n\":{i}}}")).collect();
        assert_eq!(got, want);
        assert_eq!(m.dropped_corrupt.get(), 1);
        // Everything delivered: the next append rolls, the reader deletes.
        w.append(&lines(13..14)).unwrap();
        assert_eq!(drain(&s, &mut c, 3), vec!["{\"n\":13}".to_string()]);
        let segs = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("seg".as_ref()))
            .count();
        assert_eq!(segs, 1, "delivered segments are deleted");
        drop((s, w));

        // The bound refuses the newest lines and says how many.
        let _ = std::fs::remove_dir_all(&dir);
        let (_s, mut w) = Spool::open(&dir, 100, m).unwrap();
        let r = w.append(&lines(0..20)).unwrap();
        // 10 lines of 8 bytes, 2 of 9: 98 bytes.
        assert_eq!(
            r,
            Appended {
                stored: 12,
                full: 8
            }
        );
    }
}
