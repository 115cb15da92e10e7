//! Hot reload: watch the intent files and directories (inotify on the
//! directories, so editors' rename-over-writes and ConfigMap `..data` symlink
//! swaps are seen, plus a periodic check that also catches what inotify
//! cannot, e.g. a path that appears later or a watch that failed) and swap in
//! the new [`IntentSet`] when it loads cleanly. A set with any error is
//! rejected: its errors are logged as `file:line: message` and the previous
//! set stays in force.
//!
//! Change detection compares a hash of the contents of every file the paths
//! stand for, so a touch without a change does not reload, and a failed
//! version is reported once, not on every check.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, watch};

use super::{dns::DnsTable, load, load::expand, IntentSet, PolicyError};

/// Errors kept in [`ReloadStatus::errors`].
const KEPT_ERRORS: usize = 20;

/// The outcome of the latest load attempt (for metrics and /readyz).
#[derive(Clone, Debug)]
pub struct ReloadStatus {
    /// The latest attempt loaded cleanly (the set in force is the files' content).
    pub ok: bool,
    /// When the latest attempt finished.
    pub time: SystemTime,
    /// Errors of the latest attempt (0 when ok).
    pub error_count: usize,
    /// The first errors, as `file:line: message`.
    pub errors: Vec<String>,
    /// Intents in force (from the latest good load; 0 before any).
    pub intents: usize,
    /// Successful loads (including the first).
    pub loads: u64,
    /// Rejected loads.
    pub failures: u64,
}

impl ReloadStatus {
    pub fn unix_seconds(&self) -> f64 {
        self.time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}

/// The live intents and the reload status.
pub struct PolicyWatch {
    pub intents: watch::Receiver<Arc<IntentSet>>,
    pub status: watch::Receiver<ReloadStatus>,
    pub dns: Arc<DnsTable>,
    task: tokio::task::JoinHandle<()>,
}

impl PolicyWatch {
    /// The set in force now.
    pub fn current(&self) -> Arc<IntentSet> {
        Arc::clone(&self.intents.borrow())
    }
    pub fn status(&self) -> ReloadStatus {
        self.status.borrow().clone()
    }
}

impl Drop for PolicyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Content hash of every file `paths` stand for (and of the errors finding
/// them, so a path that appears or vanishes counts as a change).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut errs = Vec::new();
    let files = expand(paths, &mut errs);
    let mut h = DefaultHasher::new();
    for e in &errs {
        e.file.hash(&mut h);
        e.message.hash(&mut h);
    }
    for f in files {
        f.hash(&mut h);
        let mut buf = Vec::new();
        match std::fs::File::open(&f).and_then(|file| {
            file.take(super::load::MAX_FILE_BYTES + 1)
                .read_to_end(&mut buf)
        }) {
            Ok(_) => buf.hash(&mut h),
            Err(e) => e.kind().hash(&mut h),
        }
    }
    h.finish()
}

fn log_errors(errors: &[PolicyError], what: &str) {
    for e in errors {
        tracing::error!(file = %e.file.display(), line = e.line, "{e}");
    }
    tracing::error!(errors = errors.len(), "{what}");
}

/// Load now (synchronously), then keep reloading on change. Returns at once
/// with the first result in force: if the first load fails, an empty set is
/// in force and `status.ok` is false (the caller decides whether to go on).
/// `check_every` is the periodic check (inotify wakes it earlier). Needs a
/// tokio runtime.
pub fn spawn_reloader(
    paths: Vec<PathBuf>,
    dns: Arc<DnsTable>,
    check_every: Duration,
) -> PolicyWatch {
    let mut status = ReloadStatus {
        ok: true,
        time: SystemTime::now(),
        error_count: 0,
        errors: Vec::new(),
        intents: 0,
        loads: 0,
        failures: 0,
    };
    let mut last_print = fingerprint(&paths);
    let first = match load(&paths, &dns) {
        Ok(set) => {
            tracing::info!(intents = set.len(), files = set.files, "intents loaded");
            for w in &set.warnings {
                tracing::warn!(file = %w.file.display(), line = w.line, "{w}");
            }
            status.loads = 1;
            status.intents = set.len();
            set
        }
        Err(e) => {
            log_errors(&e.errors, "intents rejected; no intent in force");
            status.ok = false;
            status.failures = 1;
            status.error_count = e.errors.len();
            status.errors = e
                .errors
                .iter()
                .take(KEPT_ERRORS)
                .map(|e| e.to_string())
                .collect();
            IntentSet::default()
        }
    };
    let (set_tx, set_rx) = watch::channel(Arc::new(first));
    let (status_tx, status_rx) = watch::channel(status);

    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    spawn_inotify(&paths, wake_tx);

    let task_dns = Arc::clone(&dns);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(()) = wake_rx.recv() => {
                    // Let a burst of writes (editor, kubelet swap) settle.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    while wake_rx.try_recv().is_ok() {}
                }
            }
            let p = paths.clone();
            let d = Arc::clone(&task_dns);
            let prev = last_print;
            let Ok(Some((print, result))) = tokio::task::spawn_blocking(move || {
                let print = fingerprint(&p);
                (print != prev).then(|| (print, load(&p, &d)))
            })
            .await
            else {
                continue;
            };
            last_print = print;
            let mut st = status_tx.borrow().clone();
            st.time = SystemTime::now();
            match result {
                Ok(set) => {
                    tracing::info!(intents = set.len(), files = set.files, "intents reloaded");
                    for w in &set.warnings {
                        tracing::warn!(file = %w.file.display(), line = w.line, "{w}");
                    }
                    st.ok = true;
                    st.error_count = 0;
                    st.errors.clear();
                    st.intents = set.len();
                    st.loads += 1;
                    set_tx.send_replace(Arc::new(set));
                }
                Err(e) => {
                    log_errors(
                        &e.errors,
                        "new intents rejected; the previous intents stay in force",
                    );
                    st.ok = false;
                    st.error_count = e.errors.len();
                    st.errors = e
                        .errors
                        .iter()
                        .take(KEPT_ERRORS)
                        .map(|e| e.to_string())
                        .collect();
                    st.failures += 1;
                }
            }
            status_tx.send_replace(st);
        }
    });
    PolicyWatch {
        intents: set_rx,
        status: status_rx,
        dns,
        task,
    }
}

/// Directories to watch: each directory given, and the parent of each file.
fn watch_dirs(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            if p.is_dir() {
                p.clone()
            } else {
                match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                }
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// A thread blocked on inotify that wakes the reloader; it ends when the
/// reloader is gone. Failing to set up inotify is not fatal (the periodic
/// check remains).
fn spawn_inotify(paths: &[PathBuf], wake: mpsc::Sender<()>) {
    use inotify::{Inotify, WatchMask};
    let dirs = watch_dirs(paths);
    let mut ino = match Inotify::init() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; intents are checked periodically only");
            return;
        }
    };
    let mask = WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    let mut any = false;
    for d in &dirs {
        match ino.watches().add(d, mask) {
            Ok(_) => any = true,
            Err(e) => {
                tracing::warn!(dir = %Path::new(d).display(), error = %e, "cannot watch; checked periodically")
            }
        }
    }
    if !any {
        return;
    }
    let spawned = std::thread::Builder::new().name("policy-inotify".into()).spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match ino.read_events_blocking(&mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "inotify read failed; intents are checked periodically only");
                    return;
                }
            }
            match wake.try_send(()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => return,
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the inotify thread; intents are checked periodically only");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_A: &str = "apiVersion: detector.dev/v1alpha1\nkind: WorkloadIntent\nmetadata: {name: a, namespace: n}\nspec:\n  selector: {namespace: n}\n  readers: [/app/a]\n";
    const GOOD_B: &str = "apiVersion: detector.dev/v1alpha1\nkind: WorkloadIntent\nmetadata: {name: b, namespace: n}\nspec:\n  selector: {namespace: m}\n  readers: [/app/b]\n";
    const BAD_B: &str = "apiVersion: detector.dev/v1alpha1\nkind: WorkloadIntent\nmetadata: {name: b, namespace: n}\nspec:\n  selector: {namespace: m}\n  destinations:\n    - {cidr: 10.0.0.300/32}\n";

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "detector-policy-{tag}-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Write through a temporary file and a rename, like editors and kubectl do.
    fn write(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp~");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    async fn wait_for(w: &PolicyWatch, what: &str, f: impl Fn(&ReloadStatus) -> bool) {
        let mut rx = w.status.clone();
        let r = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s))).await;
        assert!(
            r.is_ok(),
            "timed out waiting for {what}; status {:?}",
            w.status()
        );
    }

    async fn scenario(check_every: Duration) {
        let dir = TempDir::new("reload");
        std::fs::write(dir.0.join("a.yaml"), GOOD_A).unwrap();
        let w = spawn_reloader(vec![dir.0.clone()], DnsTable::new(), check_every);
        assert!(w.status().ok);
        assert_eq!(w.current().len(), 1);

        // A bad new file is rejected with file:line; the old set stays.
        write(&dir.0.join("b.yaml"), BAD_B);
        wait_for(&w, "rejection", |s| !s.ok).await;
        let st = w.status();
        assert_eq!((st.error_count, st.failures, st.intents), (1, 1, 1));
        let want = format!(
            "{}:7: spec.destinations[0].cidr: invalid CIDR \"10.0.0.300/32\"",
            dir.0.join("b.yaml").display()
        );
        assert_eq!(st.errors, vec![want]);
        assert_eq!(w.current().len(), 1, "previous intents stay in force");

        // Fixed: swapped in.
        write(&dir.0.join("b.yaml"), GOOD_B);
        wait_for(&w, "reload", |s| s.ok && s.loads == 2).await;
        assert_eq!(w.current().len(), 2);
        assert_eq!(w.status().error_count, 0);

        // Removing a file is a change too.
        std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
        wait_for(&w, "reload after delete", |s| s.loads == 3).await;
        assert_eq!(
            w.current()
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            vec!["b"]
        );
    }

    #[tokio::test]
    async fn inotify_reloads_without_waiting_for_the_periodic_check() {
        scenario(Duration::from_secs(3600)).await;
    }

    #[tokio::test]
    async fn periodic_check_reloads_too() {
        scenario(Duration::from_millis(100)).await;
    }

    #[tokio::test]
    async fn a_bad_first_load_puts_no_intent_in_force() {
        let dir = TempDir::new("first");
        std::fs::write(dir.0.join("b.yaml"), BAD_B).unwrap();
        let w = spawn_reloader(
            vec![dir.0.clone(), dir.0.join("missing.yaml")],
            DnsTable::new(),
            Duration::from_secs(3600),
        );
        let st = w.status();
        assert!(!st.ok);
        assert_eq!(st.error_count, 2, "{:?}", st.errors);
        assert!(w.current().is_empty());
    }
}
