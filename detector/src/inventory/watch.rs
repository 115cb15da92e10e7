//! The inventory kept up to date.
//!
//! A dedicated thread (no tokio runtime needed; the receiver is a tokio
//! channel) rescans the node whenever something that can change the result
//! changes, and diffs the result against what it reported before:
//! - inotify on the pods dir, each pod dir, its `volumes/`, each plugin dir
//!   and each credential volume dir (kubelet's `..data` swap is a rename in
//!   the volume dir), and the parents of `extra_files`, each watched by the
//!   scan just before it lists the directory;
//! - the mount table (`/proc/self/mountinfo` polls with POLLPRI on change):
//!   kubelet mounts a tmpfs over a projected volume dir *after* creating it,
//!   which a watch on the old directory inode would never see;
//! - a full rescan every `rescan_interval`, the safety net.
//!
//! Events are debounced (20 ms of quiet, at most 200 ms), so a kubelet
//! rotation yields an `Upsert` of the new inode well within a second.
//! A credential that disappears (rotated away, pod directory removed) gets
//! its `Remove` only after `rotation_grace`, and not at all if it comes back
//! meanwhile. Warnings are logged (tracing `warn`) once while they persist.
//!
//! A pass streams into the state (no list of its files or directories is
//! built), so a periodic rescan of an unchanged node allocates next to
//! nothing: on a large node those bursts were most of the daemon's RSS swing.

use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use inotify::{Inotify, WatchMask};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{scan_into, CredentialFile, InventoryConfig, ScanSink};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InventoryUpdate {
    /// A credential appeared or its description changed.
    Upsert(CredentialFile),
    /// A credential is gone since `rotation_grace`.
    Remove(CredentialFile),
    /// The initial scan has been reported completely (sent once, after the
    /// initial `Upsert`s): the inventory is loaded.
    Synced,
}

const DEBOUNCE: Duration = Duration::from_millis(20);
const DEBOUNCE_MAX: Duration = Duration::from_millis(200);

/// Start watching; drop the receiver to stop the thread.
pub fn spawn_watcher(cfg: InventoryConfig) -> mpsc::Receiver<InventoryUpdate> {
    let (tx, rx) = mpsc::channel(4096);
    let spawned = std::thread::Builder::new()
        .name("inventory".into())
        .spawn(move || run(cfg, tx));
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the inventory watcher thread");
    }
    rx
}

/// What has been reported, and what waits out its grace period.
#[derive(Default)]
pub(crate) struct State {
    /// Each credential with the pass that last found it.
    current: HashMap<(u64, u64), (CredentialFile, u64)>,
    pending: HashMap<(u64, u64), (Instant, CredentialFile)>,
    pass: u64,
}

impl State {
    /// A whole pass at once (see [`State::begin`]).
    #[cfg(test)]
    pub(crate) fn apply(
        &mut self,
        files: Vec<CredentialFile>,
        now: Instant,
        grace: Duration,
    ) -> Vec<InventoryUpdate> {
        self.begin();
        let out = files.into_iter().filter_map(|f| self.offer(f)).collect();
        self.finish(now, grace);
        out
    }

    /// A pass starts: [`State::offer`] each file it finds, then
    /// [`State::finish`]. An unchanged credential costs no allocation, so a
    /// periodic rescan of a large node leaves the heap as it was.
    pub(crate) fn begin(&mut self) {
        self.pass += 1;
    }

    /// A file found by this pass; an update if it is new or changed.
    pub(crate) fn offer(&mut self, f: CredentialFile) -> Option<InventoryUpdate> {
        let k = f.key();
        self.pending.remove(&k);
        match self.current.entry(k) {
            Entry::Occupied(o) => {
                let (cur, seen) = o.into_mut();
                *seen = self.pass;
                if *cur == f {
                    return None;
                }
                *cur = f.clone();
            }
            Entry::Vacant(v) => {
                v.insert((f.clone(), self.pass));
            }
        }
        Some(InventoryUpdate::Upsert(f))
    }

    /// The pass is over: what it did not find waits out its grace period.
    pub(crate) fn finish(&mut self, now: Instant, grace: Duration) {
        let (pass, pending) = (self.pass, &mut self.pending);
        self.current.retain(|k, (f, seen)| {
            if *seen != pass {
                pending
                    .entry(*k)
                    .or_insert_with(|| (now + grace, f.clone()));
            }
            *seen == pass
        });
    }

    pub(crate) fn expire(&mut self, now: Instant) -> Vec<InventoryUpdate> {
        let due: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, (t, _))| *t <= now)
            .map(|(k, _)| *k)
            .collect();
        due.into_iter()
            .filter_map(|k| self.pending.remove(&k))
            .map(|(_, f)| InventoryUpdate::Remove(f))
            .collect()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|(t, _)| *t).min()
    }
}

/// The inotify watches. Every directory the scan lists is watched just
/// before it is listed, so what is created in it afterwards is an event,
/// and nothing is kept per directory (the kernel drops the watch of a
/// removed directory by itself).
struct Watches {
    inotify: Option<Inotify>,
    /// Directories left unwatched in this pass (watch limit reached).
    over_limit: usize,
    /// Warned about the limit since the last pass without it.
    warned_limit: bool,
}

impl Watches {
    fn mask() -> WatchMask {
        WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR
    }

    /// Adding an existing watch is cheap (same descriptor); a path now
    /// covered by a mount gets a new watch on the mounted directory.
    fn add(&mut self, d: &Path) {
        let Some(ino) = self.inotify.as_mut() else {
            return;
        };
        match ino.watches().add(d, Self::mask()) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => self.over_limit += 1,
            Err(e) => debug!(dir = %d.display(), error = %e, "cannot watch"),
        }
    }

    /// Before a pass: while kubelet is not (yet) there, watch for the pods
    /// dir being created (before the scan looks for it: no window).
    fn begin_pass(&mut self, cfg: &InventoryConfig) {
        if !cfg.pods_dir().is_dir() {
            let parent = cfg.kubelet_dir.parent().map(PathBuf::from);
            if let Some(d) = [Some(cfg.kubelet_dir.clone()), parent]
                .into_iter()
                .flatten()
                .find(|d| d.is_dir())
            {
                self.add(&d);
            }
        }
    }

    /// After a pass: report the watch limit once while it lasts.
    fn end_pass(&mut self) {
        if self.over_limit > 0 && !self.warned_limit {
            warn!(
                unwatched = self.over_limit,
                "inotify watch limit reached (fs.inotify.max_user_watches); relying on the periodic rescan"
            );
        }
        self.warned_limit = self.over_limit > 0;
        self.over_limit = 0;
    }
}

/// One pass of the watcher: watches and state updated as the scan goes.
struct Pass<'a> {
    watches: &'a mut Watches,
    state: &'a mut State,
    updates: Vec<InventoryUpdate>,
}

impl ScanSink for Pass<'_> {
    fn dir(&mut self, path: &Path) {
        self.watches.add(path);
    }
    fn file(&mut self, f: CredentialFile) {
        self.updates.extend(self.state.offer(f));
    }
}

fn run(cfg: InventoryConfig, tx: mpsc::Sender<InventoryUpdate>) {
    let inotify = match Inotify::init() {
        Ok(i) => Some(i),
        Err(e) => {
            warn!(error = %e, "inotify unavailable; credential rotation is only seen by the periodic rescan");
            None
        }
    };
    let mounts = std::fs::File::open("/proc/self/mountinfo").ok();
    let mut watches = Watches {
        inotify,
        over_limit: 0,
        warned_limit: false,
    };
    let mut state = State::default();
    let mut warned: HashSet<String> = HashSet::new();
    let mut buf = vec![0u8; 64 * 1024];

    let rescan = |state: &mut State, watches: &mut Watches, warned: &mut HashSet<String>| {
        state.begin();
        watches.begin_pass(&cfg);
        let mut pass = Pass {
            watches,
            state,
            updates: Vec::new(),
        };
        let warnings = scan_into(&cfg, &mut pass);
        let Pass {
            watches, updates, ..
        } = pass;
        watches.end_pass();
        state.finish(Instant::now(), cfg.rotation_grace);
        let fresh: HashSet<String> = warnings.into_iter().collect();
        for w in fresh.difference(warned) {
            warn!(warning = %w, "credential inventory");
        }
        *warned = fresh;
        updates
    };

    let first = rescan(&mut state, &mut watches, &mut warned);
    info!(credentials = state.current.len(), kubelet_dir = %cfg.kubelet_dir.display(), "credential inventory loaded");
    for u in first.into_iter().chain([InventoryUpdate::Synced]) {
        if tx.blocking_send(u).is_err() {
            return;
        }
    }
    let mut next_full = Instant::now() + cfg.rescan_interval;
    let mut dirty: Option<(Instant, Instant)> = None; // (first event, last event)
    loop {
        if tx.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut wake = next_full.min(now + Duration::from_secs(1));
        if let Some(t) = state.next_deadline() {
            wake = wake.min(t);
        }
        if let Some((first, last)) = dirty {
            wake = wake.min((last + DEBOUNCE).min(first + DEBOUNCE_MAX));
        }
        let timeout = wake.saturating_duration_since(now).as_millis().min(1000) as i32;
        let mut fds = Vec::with_capacity(2);
        if let Some(i) = &watches.inotify {
            fds.push(libc::pollfd {
                fd: i.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Some(m) = &mounts {
            fds.push(libc::pollfd {
                fd: m.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            });
        }
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        let now = Instant::now();
        if n > 0 {
            let mut changed = false;
            for p in &fds {
                if p.revents == 0 {
                    continue;
                }
                if watches
                    .inotify
                    .as_ref()
                    .is_some_and(|i| i.as_raw_fd() == p.fd)
                {
                    if let Some(i) = watches.inotify.as_mut() {
                        // Any event in a watched dir may change the result
                        // (an overflow too); the rescan finds out what.
                        while let Ok(mut evs) = i.read_events(&mut buf) {
                            if evs.next().is_none() {
                                break;
                            }
                            changed = true;
                        }
                    }
                } else {
                    changed = true; // mount table changed
                }
            }
            if changed {
                dirty = Some(match dirty {
                    Some((first, _)) => (first, now),
                    None => (now, now),
                });
            }
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let due = match dirty {
            Some((first, last)) => now >= last + DEBOUNCE || now >= first + DEBOUNCE_MAX,
            None => false,
        };
        let mut updates = Vec::new();
        if due || now >= next_full {
            dirty = None;
            next_full = now + cfg.rescan_interval;
            updates = rescan(&mut state, &mut watches, &mut warned);
        }
        updates.extend(state.expire(Instant::now()));
        for u in updates {
            debug!(update = ?u, "inventory");
            if tx.blocking_send(u).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::CredentialKind;

    fn f(ino: u64, path: &str) -> CredentialFile {
        CredentialFile {
            dev: 1,
            ino,
            kind: CredentialKind::KubernetesServiceAccount,
            path: path.into(),
            real_path: path.into(),
            owner_pod_uid: Some("p".into()),
            volume: None,
        }
    }

    #[test]
    fn removal_waits_out_the_grace_period() {
        let grace = Duration::from_secs(120);
        let t0 = Instant::now();
        let mut s = State::default();
        assert_eq!(
            s.apply(vec![f(1, "/t")], t0, grace),
            vec![InventoryUpdate::Upsert(f(1, "/t"))]
        );
        assert!(
            s.apply(vec![f(1, "/t")], t0, grace).is_empty(),
            "no change, no update"
        );
        // Rotation: new inode now, old one only after the grace.
        assert_eq!(
            s.apply(vec![f(2, "/t")], t0, grace),
            vec![InventoryUpdate::Upsert(f(2, "/t"))]
        );
        assert!(s.expire(t0 + Duration::from_secs(119)).is_empty());
        assert_eq!(
            s.expire(t0 + grace),
            vec![InventoryUpdate::Remove(f(1, "/t"))]
        );
        assert!(s.expire(t0 + grace * 2).is_empty());
        // Gone and back within the grace: no removal.
        s.apply(vec![], t0, grace);
        assert_eq!(
            s.apply(vec![f(2, "/t")], t0, grace),
            vec![InventoryUpdate::Upsert(f(2, "/t"))]
        );
        assert!(s.expire(t0 + grace * 3).is_empty());
        // A changed description is an upsert.
        assert_eq!(
            s.apply(vec![f(2, "/u")], t0, grace),
            vec![InventoryUpdate::Upsert(f(2, "/u"))]
        );
    }
}
