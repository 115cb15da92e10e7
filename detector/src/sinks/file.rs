//! JSON lines (findings or OCSF) to stdout or a file with size-based
//! rotation: `path` → `path.1` → … → `path.<keep>`.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};

use super::{Item, SinkMetrics, Worker};
use crate::finding::Finding;

#[derive(Clone, Copy)]
pub(crate) enum Render {
    Json,
    Ocsf,
}

impl Render {
    pub(crate) fn line(self, f: &Finding, host: &str) -> Vec<u8> {
        let mut v = match self {
            Render::Json => serde_json::to_vec(f),
            Render::Ocsf => serde_json::to_vec(&super::ocsf::render(f, host)),
        }
        .expect("a finding always serialises");
        v.push(b'\n');
        v
    }
}

enum Out {
    Stdout(io::Stdout),
    File(io::BufWriter<File>),
}

/// Appends lines to stdout or to a file that is rotated before a line would
/// make it exceed `max_bytes` (a line longer than `max_bytes` gets a file of
/// its own; `max_bytes == 0` never rotates).
pub struct RotatingWriter {
    path: Option<PathBuf>,
    max_bytes: u64,
    keep: u32,
    out: Out,
    size: u64,
}

impl RotatingWriter {
    /// `-` is stdout.
    pub fn open(path: &str, max_bytes: u64, keep: u32) -> io::Result<Self> {
        if path == "-" {
            return Ok(RotatingWriter {
                path: None,
                max_bytes: 0,
                keep,
                out: Out::Stdout(io::stdout()),
                size: 0,
            });
        }
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let (out, size) = Self::open_file(&path)?;
        Ok(RotatingWriter {
            path: Some(path),
            max_bytes,
            keep,
            out,
            size,
        })
    }

    fn open_file(path: &Path) -> io::Result<(Out, u64)> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        let size = f.metadata()?.len();
        Ok((Out::File(io::BufWriter::with_capacity(64 << 10, f)), size))
    }

    fn numbered(path: &Path, i: u32) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{i}"));
        PathBuf::from(s)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        self.flush()?;
        if self.keep == 0 {
            std::fs::remove_file(&path).or_else(ignore_missing)?;
        } else {
            std::fs::remove_file(Self::numbered(&path, self.keep)).or_else(ignore_missing)?;
            for i in (1..self.keep).rev() {
                std::fs::rename(Self::numbered(&path, i), Self::numbered(&path, i + 1))
                    .or_else(ignore_missing)?;
            }
            std::fs::rename(&path, Self::numbered(&path, 1)).or_else(ignore_missing)?;
        }
        let (out, size) = Self::open_file(&path)?;
        self.out = out;
        self.size = size;
        Ok(())
    }

    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.max_bytes > 0 && self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        match &mut self.out {
            Out::Stdout(s) => s.lock().write_all(line)?,
            Out::File(f) => f.write_all(line)?,
        }
        self.size += line.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Out::Stdout(s) => s.flush(),
            Out::File(f) => f.flush(),
        }
    }

    /// After a write error: drop the buffered bytes and reopen the file.
    fn reopen(&mut self) -> io::Result<()> {
        if let Some(path) = &self.path {
            let (out, size) = Self::open_file(path)?;
            if let Out::File(old) = std::mem::replace(&mut self.out, out) {
                // Discard what could not be written; never retry a partial line.
                let _ = old.into_parts();
            }
            self.size = size;
        }
        Ok(())
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Most findings written between two flushes.
const BATCH: usize = 512;

pub(crate) fn spawn(
    name: &'static str,
    path: &str,
    max_bytes: u64,
    keep: u32,
    render: Render,
    mut rx: mpsc::Receiver<Item>,
    m: SinkMetrics,
) -> Result<Worker> {
    let mut w =
        RotatingWriter::open(path, max_bytes, keep).with_context(|| format!("open {path}"))?;
    let host = super::node_name();
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("sink-{name}"))
        .spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            while let Some(f) = rx.blocking_recv() {
                batch.push(f);
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(f) => batch.push(f),
                        Err(_) => break,
                    }
                }
                m.queue_depth.set(rx.len() as i64);
                let mut written = 0u64;
                let mut result = Ok(());
                for f in batch.drain(..) {
                    if result.is_ok() {
                        result = w.write_line(&render.line(&f, &host));
                        if result.is_ok() {
                            written += 1;
                            continue;
                        }
                    }
                    m.dropped_error.inc();
                }
                let result = result.and_then(|_| w.flush());
                match result {
                    Ok(()) => m.sent.inc_by(written),
                    Err(e) => {
                        m.failed.inc();
                        // What was buffered since the last flush is lost.
                        m.dropped_error.inc_by(written);
                        tracing::warn!(sink = name, error = %e, "write failed; findings dropped");
                        if let Err(e) = w.reopen() {
                            tracing::warn!(sink = name, error = %e, "reopen failed");
                        }
                    }
                }
            }
            let _ = w.flush();
            let _ = done_tx.send(());
        })
        .context("spawn sink thread")?;
    Ok(Worker {
        done: Some(done),
        tasks: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = crate::sinks::testutil::TempDir::new("rot");
        let path = dir.0.join("out.jsonl");
        let mut w = RotatingWriter::open(path.to_str().unwrap(), 100, 2).unwrap();
        for i in 0..10u8 {
            // 40 bytes each: two lines per file.
            let mut line = vec![b'a' + i; 39];
            line.push(b'\n');
            w.write_line(&line).unwrap();
        }
        w.flush().unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        let cur = read(path.clone());
        assert_eq!(cur.len(), 80);
        assert!(cur.starts_with(&"i".repeat(39)));
        assert!(read(RotatingWriter::numbered(&path, 1)).starts_with(&"g".repeat(39)));
        assert!(read(RotatingWriter::numbered(&path, 2)).starts_with(&"e".repeat(39)));
        assert!(!RotatingWriter::numbered(&path, 3).exists());
    }
}
