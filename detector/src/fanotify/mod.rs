//! Credential access through fanotify permission events: the open-family
//! sensor that needs no syscall tracepoint (any attached syscall
//! tracepoint puts every syscall of every task on the kernel's slow path).
//!
//! # Design
//! A `FAN_CLASS_CONTENT` group with `FAN_OPEN_PERM` marks on the credential
//! files only, so opening any other file costs nothing. The opener of a
//! credential blocks in open(2) until we answer. Meanwhile it is alive and
//! its pid cannot be reused, so we read who it is from /proc and, when the
//! new descriptor can read, insert its thread group (and its parent, when
//! in the same cgroup, as the kernel sensor does) into the kernel's
//! `HOLDERS` map *before* answering. Its very next connect is therefore
//! judged as a holder's by the cgroup programs: blocking stays race-free.
//! We always answer `FAN_ALLOW`. Re-opens within `--credential-dedup-ms`
//! are folded into the kernel's `CRED_SEEN` like the open tracepoints fold
//! them (the report carries `repeats`, the exit what is left), and a known
//! holder thread's re-open is answered without reading /proc again
//! (`Responder::repeat_of_known_holder`). A `FAN_CLASS_NOTIF` + `FAN_OPEN` group
//! would not make the opener wait, but the opener's connect can then run
//! before we have seen the open (and it may be gone by the time we look):
//! see docs/BENCHMARKS.md for both measured.
//!
//! # Never hold an opener forever
//! - A dedicated thread answers; it never waits on the tokio runtime. Events
//!   go to the pipeline through a bounded channel (`try_send`: a full
//!   channel loses the event, counted, never the answer). Like the kernel's
//!   ring buffer for bulk events, it wakes nobody: enforcement is already in
//!   the kernel maps, and the daemon drains it on its 10 ms poll.
//! - Every path through the handling of an event answers `FAN_ALLOW` (a
//!   guard answers on drop), also when /proc cannot be read.
//! - A watchdog thread answers for the responder if one event takes longer
//!   than `Config::watchdog`.
//! - If the responder thread ends (error, panic), it closes the group; if
//!   the daemon dies, the kernel closes it. Closing a group answers every
//!   pending permission event with allow.
//!
//! # Marks
//! - A projected or secret volume that kubelet mounted as a tmpfs of its own
//!   gets one `FAN_MARK_FILESYSTEM` mark: every inode of that volume,
//!   present and future. An open of an inode the inventory does not know
//!   yet whose name is one of the volume's credential names (`token`) is a
//!   credential at once: a rotated token is covered from its creation, with
//!   no gap until the inventory's next scan, and an unlinked old token that
//!   a process re-opens through `/proc/<pid>/fd/N` stays covered during the
//!   grace period.
//! - Any other credential file gets an inode mark (added and removed as the
//!   inventory changes). The kernel drops an inode's marks when its last
//!   link is unlinked.
//!
//! # With leases (`--open-sensor hybrid`, `Config::hybrid`)
//! A filesystem mark makes the kernel walk the group's marks on every open
//! of that filesystem, an ignored inode's too: about 12 % of an open+close
//! (docs/BENCHMARKS.md). So where the lease sensor sees the opens, no mark
//! of ours is on their way:
//! - every credential inode gets an inode mark, which the lease sensor
//!   takes off while it holds the file's lease and puts back before giving
//!   the lease up (`InodeMarks`);
//! - a volume gets a `FAN_MARK_MOUNT` mark on the mount its writer uses
//!   (kubelet's, in the host's mount namespace: `writer_view`), not on the
//!   filesystem. Pods open through bind mounts of it, which that mark does
//!   not cover; kubelet's open that creates a rotated token does, and the
//!   new inode gets its inode mark before kubelet may write it;
//! - whoever opened the new inode in between (before the mark, while it
//!   was empty) is found through its open counts and reported
//!   (`Responder::report_earlier_openers`).
//!
//! # What it covers
//! Every way of opening the file: any path (symlink, hardlink, bind mount,
//! `/proc/<pid>/root`), `open`, `openat`, `openat2`, `creat`,
//! `open_by_handle_at`, and io_uring `IORING_OP_OPENAT`/`OPENAT2` (which no
//! syscall tracepoint sees). Not `pidfd_getfd(2)`, which copies an already
//! open descriptor without opening anything.

mod opener;
mod sys;
mod volume;

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    ffi::OsString,
    io,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex, MutexGuard, RwLock,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, IterableMap, Map, MapData};
use detector_common::{
    kernel_dev_from_user, CredSeen, CredSeenKey, CredentialInfo, CredentialKey, Holder, OpenCounts,
};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry};
use tracing::{debug, error, info, warn};

pub use sys::Group;

use crate::{
    credentials::{kernel_value, CredentialTable},
    events::{Common, CredentialAccess},
    finding::Credential,
    inventory::{CredentialFile, InventoryUpdate},
};

/// Ids the responder gives credentials it finds itself; the inventory's
/// table counts up from 1, so the ranges never meet.
const FIRST_DISCOVERED_ID: u32 = 0x8000_0000;

/// `bpf_map_update_elem` flag: only if the key is absent.
const BPF_NOEXIST: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fanotify permission events are unavailable: {0} (needs CONFIG_FANOTIFY_ACCESS_PERMISSIONS and CAP_SYS_ADMIN)")]
    Unavailable(io::Error),
    #[error("cannot use the kernel's HOLDERS or CRED_SEEN map: {0}")]
    Holders(String),
    #[error("cannot start the fanotify responder: {0}")]
    Start(io::Error),
}

/// Settings of the sensor.
#[derive(Clone, Debug)]
pub struct Config {
    /// The cgroup-v2 mount (`/sys/fs/cgroup/unified` on hybrid hosts).
    pub cgroup_root: PathBuf,
    /// Events waiting for the pipeline; beyond it they are lost (counted).
    pub queue: usize,
    /// Longest the responder may spend on one event before the watchdog
    /// answers it.
    pub watchdog: Duration,
    /// `--credential-dedup-ms`: a process's re-opens of a credential within
    /// it are counted, not reported one by one (zero: every open reported).
    pub dedup: Duration,
    /// The lease sensor sees what it has leased (`--open-sensor hybrid`):
    /// volumes get a mount mark on their writer's mount, not a filesystem
    /// mark, and the inodes their own marks (see the module's doc).
    pub hybrid: bool,
}

impl Config {
    pub fn new(cgroup_root: &Path) -> Config {
        Config {
            cgroup_root: cgroup_root.to_path_buf(),
            queue: 8192,
            watchdog: Duration::from_secs(1),
            dedup: Duration::ZERO,
            hybrid: false,
        }
    }
}

/// Counters of the sensor, exported as Prometheus metrics.
struct Stats {
    permission_events: IntCounter,
    credential_opens: IntCounter,
    watchdog_answers: IntCounter,
    errors: IntCounter,
    lost: IntCounter,
    marks: IntGaugeVec,
    /// From reading an event to answering it.
    answer_seconds: Histogram,
}

impl Stats {
    fn new(registry: &Registry, lost: IntCounter) -> prometheus::Result<Stats> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let marks = IntGaugeVec::new(
            Opts::new(
                "detector_fanotify_marks",
                "fanotify marks on credential files and volumes, by scope (with --open-sensor hybrid a leased file has no inode mark).",
            ),
            &["scope"],
        )?;
        registry.register(Box::new(marks.clone()))?;
        for scope in [
            sys::MarkScope::Inode,
            sys::MarkScope::Filesystem,
            sys::MarkScope::Mount,
        ] {
            marks.with_label_values(&[scope.name()]);
        }
        let answer_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "detector_fanotify_answer_seconds",
                "Time an opener of a watched file waited on the responder (read to answer).",
            )
            .buckets(vec![
                0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1, 1.0,
            ]),
        )?;
        registry.register(Box::new(answer_seconds.clone()))?;
        Ok(Stats {
            permission_events: counter(
                "detector_fanotify_permission_events_total",
                "Open permission events answered (credential files and others on a marked filesystem).",
            )?,
            credential_opens: counter(
                "detector_fanotify_credential_opens_total",
                "Opens of a watched credential file seen by fanotify.",
            )?,
            watchdog_answers: counter(
                "detector_fanotify_watchdog_answers_total",
                "Permission events the watchdog answered because the responder took too long.",
            )?,
            errors: counter(
                "detector_fanotify_errors_total",
                "Permission events whose opener could not be read from /proc (answered, allowed).",
            )?,
            lost,
            marks,
            answer_seconds,
        })
    }
}

/// The event being handled, for the watchdog.
struct Inflight {
    fd: RawFd,
    since: Instant,
    answered: bool,
}

struct Shared {
    /// `None` once the responder has ended (closing the group releases
    /// every waiting opener).
    group: RwLock<Option<Group>>,
    /// Wakes the responder's poll to stop.
    wake: OwnedFd,
    stop: AtomicBool,
    /// (st_dev as stat gives it, ino) -> credential id.
    credentials: RwLock<StdHashMap<(u64, u64), u32>>,
    /// Filesystems marked whole (st_dev) -> credential file names on them.
    volumes: RwLock<StdHashMap<u64, Volume>>,
    /// Credentials the responder found by name, for the pipeline's table.
    discovered: Mutex<Vec<Discovered>>,
    /// Credentials the lease sensor holds a lease on (hybrid): it reports
    /// their opens, we don't.
    leased: RwLock<HashSet<(u64, u64)>>,
    next_id: AtomicU32,
    inflight: Mutex<Inflight>,
    stats: Stats,
}

impl Shared {
    fn new(group: Group, wake: OwnedFd, stats: Stats) -> Shared {
        Shared {
            group: RwLock::new(Some(group)),
            wake,
            stop: AtomicBool::new(false),
            credentials: RwLock::new(StdHashMap::new()),
            volumes: RwLock::new(StdHashMap::new()),
            discovered: Mutex::new(Vec::new()),
            leased: RwLock::new(HashSet::new()),
            next_id: AtomicU32::new(FIRST_DISCOVERED_ID),
            inflight: Mutex::new(Inflight {
                fd: -1,
                since: Instant::now(),
                answered: true,
            }),
            stats,
        }
    }
}

/// A volume on a filesystem of its own: its credential file names, each
/// with the description a new inode of that name gets.
#[derive(Clone, Debug, Default)]
struct Volume {
    names: StdHashMap<OsString, Credential>,
}

/// A credential the responder found before the inventory did.
#[derive(Clone, Debug)]
struct Discovered {
    user_key: (u64, u64),
    id: u32,
    meta: Credential,
}

/// Our bookkeeping of one volume's mark (`FAN_MARK_FILESYSTEM`, or
/// `FAN_MARK_MOUNT` on the writer's mount with `Config::hybrid`).
struct FsMark {
    /// The path marked.
    dir: PathBuf,
    scope: sys::MarkScope,
    /// Inventory credentials on it; the mark goes with the last one.
    keys: HashSet<(u64, u64)>,
    /// Credentials found by name on it that the inventory has not (yet)
    /// confirmed.
    discovered: HashSet<(u64, u64)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// The running sensor. Dropping it stops the responder and closes the group.
pub struct FanotifySensor {
    shared: Arc<Shared>,
    responder: Option<JoinHandle<()>>,
    /// Inode marks we added: credential -> the path marked.
    inode_marks: StdHashMap<(u64, u64), PathBuf>,
    /// Volume marks, by st_dev.
    fs_marks: StdHashMap<u64, FsMark>,
    hybrid: bool,
    /// Logged once: `volume::writer_view` found no kubelet view.
    warned_own_view: bool,
    /// Found credentials whose filesystem mark is gone: to drop from the
    /// pipeline's table at the next drain.
    forgotten: Vec<(u64, u64)>,
    events: std::sync::mpsc::Receiver<CredentialAccess>,
    dead_reported: bool,
}

/// Lets the lease sensor take the inode mark off a leased credential and
/// put it back (`--open-sensor hybrid`): a leased inode's opens are seen
/// by the kernel's lease check, any other by the permission events.
#[derive(Clone)]
pub struct InodeMarks(Arc<Shared>);

impl InodeMarks {
    /// `marked`: opens of the inode open as `file` ask the daemon (or stop
    /// asking). While it is unmarked (leased), an open that still reaches
    /// the responder (through kubelet's mount, whose mark stays) is left
    /// to the lease sensor, so that one open is not counted twice. Fails
    /// once the responder has ended.
    pub fn set(&self, file: &std::fs::File, marked: bool) -> io::Result<()> {
        let md = file.metadata()?;
        let key = (md.dev(), md.ino());
        let group = self.0.group.read().unwrap_or_else(|e| e.into_inner());
        let Some(g) = group.as_ref() else {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        };
        if marked {
            let r = sys::mark_file(g.raw(), true, file.as_raw_fd());
            write(&self.0.leased).remove(&key);
            r
        } else {
            write(&self.0.leased).insert(key);
            sys::mark_file(g.raw(), false, file.as_raw_fd())
        }
    }

    /// The credential `(st_dev, st_ino)` is gone: no lease, no mark.
    pub fn forget(&self, key: (u64, u64)) {
        write(&self.0.leased).remove(&key);
    }
}

/// Is the permission sensor usable here? Returns the group to use.
pub fn open_group() -> Result<Group, Error> {
    Group::new().map_err(Error::Unavailable)
}

impl FanotifySensor {
    /// Start answering on `group`. `holders` is the kernel's HOLDERS map
    /// (its descriptor is duplicated for the responder thread); `lost`
    /// counts events the pipeline could not take.
    pub fn start(
        group: Group,
        holders: &HashMap<MapData, u32, Holder>,
        cred_seen: &HashMap<MapData, CredSeenKey, CredSeen>,
        open_counts: Option<&HashMap<MapData, CredentialKey, OpenCounts>>,
        cfg: Config,
        registry: &Registry,
        lost: IntCounter,
    ) -> Result<FanotifySensor, Error> {
        let holders = clone_map(holders.map(), Map::LruHashMap)?;
        let cred_seen = clone_map(cred_seen.map(), Map::LruHashMap)?;
        let open_counts = match open_counts.filter(|_| cfg.hybrid) {
            Some(m) => Some(clone_map(m.map(), Map::LruHashMap)?),
            None => None,
        };
        let proc = opener::ProcReader::new(&cfg.cgroup_root).map_err(Error::Start)?;
        let wake = sys::eventfd().map_err(Error::Start)?;
        let stats = Stats::new(registry, lost).map_err(|e| Error::Start(io::Error::other(e)))?;
        let fan = group.raw();
        let shared = Arc::new(Shared::new(group, wake, stats));
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue.max(1));
        let mut ctx = Responder {
            shared: shared.clone(),
            fan,
            holders,
            cred_seen,
            dedup_ns: u64::try_from(cfg.dedup.as_nanos()).unwrap_or(u64::MAX),
            known: StdHashMap::new(),
            proc,
            tx,
            own_tgid: std::process::id(),
            mark_discovered: cfg.hybrid,
            open_counts,
        };
        let s = shared.clone();
        let responder = std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || {
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.run()));
                if outcome.is_err() {
                    error!("the fanotify responder panicked; closing its group (waiting openers are allowed)");
                }
                // Closing the group answers every pending event with allow.
                *s.group.write().unwrap_or_else(|e| e.into_inner()) = None;
            })
            .map_err(Error::Start)?;
        let s = shared.clone();
        let limit = cfg.watchdog;
        std::thread::Builder::new()
            .name("fanotify-watchdog".into())
            .spawn(move || watchdog(s, limit))
            .map_err(Error::Start)?;
        info!("fanotify permission sensor started (FAN_OPEN_PERM on credential files)");
        Ok(FanotifySensor {
            shared,
            responder: Some(responder),
            inode_marks: StdHashMap::new(),
            fs_marks: StdHashMap::new(),
            hybrid: cfg.hybrid,
            warned_own_view: false,
            forgotten: Vec::new(),
            events: rx,
            dead_reported: false,
        })
    }

    /// A handle for the lease sensor on the inode marks (`InodeMarks`).
    pub fn inode_marks(&self) -> InodeMarks {
        InodeMarks(self.shared.clone())
    }

    /// Follow the inventory. Call after the pipeline applied `update` to
    /// `table` (which gives the credential ids); `kernel` is the kernel's
    /// credentials map, kept equal to `table`.
    pub fn apply_inventory(
        &mut self,
        update: &InventoryUpdate,
        table: &mut CredentialTable,
        kernel: &mut HashMap<MapData, CredentialKey, CredentialInfo>,
    ) {
        match update {
            InventoryUpdate::Upsert(f) => {
                let key = CredentialKey {
                    dev: kernel_dev_from_user(f.dev),
                    ino: f.ino,
                };
                match table.get(&key) {
                    Some(w) => self.watch(f, w.id),
                    None => {
                        warn!(path = %f.real_path.display(), "credential not in the table; not watched by fanotify")
                    }
                }
            }
            InventoryUpdate::Remove(f) => self.unwatch(f),
            InventoryUpdate::Synced => {}
        }
        self.drain_discovered(table, kernel);
    }

    /// Watch one credential file (idempotent).
    pub fn watch(&mut self, f: &CredentialFile, id: u32) {
        let k = (f.dev, f.ino);
        // The id first: an event on the new mark must find it.
        write(&self.shared.credentials).insert(k, id);
        // Without leases a volume mark covers its files; with them, pods'
        // opens do not pass the volume's mark: each file needs its own.
        if self.watch_volume(f) && !self.hybrid {
            return;
        }
        if self.inode_marks.contains_key(&k) {
            return;
        }
        let path = &f.real_path;
        if let Err(e) = self.mark(true, sys::MarkScope::Inode, path) {
            error!(path = %path.display(), error = %e, "cannot add a fanotify mark; opens of this credential are not seen");
            return;
        }
        // The path may have been replaced between the inventory's stat and
        // the mark: keep a mark only on the inode the inventory named.
        if key_of(path) != Some(k) {
            let _ = self.mark(false, sys::MarkScope::Inode, path);
            warn!(path = %path.display(), "credential file replaced while marking; the inventory will report the new one");
            return;
        }
        debug!(path = %path.display(), id, "fanotify inode mark added");
        self.inode_marks.insert(k, path.clone());
        self.set_mark_gauge();
    }

    /// The volume mark of `f`'s volume, when kubelet mounted it as a tmpfs
    /// of its own: present already, or added now. False when there is none.
    fn watch_volume(&mut self, f: &CredentialFile) -> bool {
        let k = (f.dev, f.ino);
        if let Some(fs) = self.fs_marks.get_mut(&f.dev) {
            fs.keys.insert(k);
            fs.discovered.remove(&k);
            self.add_volume_name(f);
            return true;
        }
        let Some(dir) = volume::dedicated_tmpfs(f) else {
            return false;
        };
        self.add_volume_name(f);
        let (scope, marked) = if self.hybrid {
            let view = volume::writer_view(&dir).unwrap_or_else(|own| {
                if !self.warned_own_view {
                    self.warned_own_view = true;
                    warn!(volume = %own.display(), "kubelet's view of its volumes is not reachable (no process named kubelet, /proc/1/root not readable): the mount mark goes on this daemon's own view. If that is a copy (a container without hostPID), kubelet creating a rotated token is not seen, and the new token is covered once it is leased (about 30 ms later)");
                }
                own
            });
            (sys::MarkScope::Mount, view)
        } else {
            (sys::MarkScope::Filesystem, dir)
        };
        match self.mark(true, scope, &marked) {
            Ok(()) => {
                info!(volume = %marked.display(), scope = scope.name(), "fanotify mark on a credential volume");
                self.fs_marks.insert(
                    f.dev,
                    FsMark {
                        dir: marked,
                        scope,
                        keys: HashSet::from([k]),
                        discovered: HashSet::new(),
                    },
                );
                self.set_mark_gauge();
                true
            }
            Err(e) => {
                write(&self.shared.volumes).remove(&f.dev);
                warn!(volume = %marked.display(), error = %e, "no volume mark; marking the file only");
                false
            }
        }
    }

    /// The file's name becomes a credential name of its volume.
    fn add_volume_name(&self, f: &CredentialFile) {
        let Some(name) = f.real_path.file_name() else {
            return;
        };
        write(&self.shared.volumes)
            .entry(f.dev)
            .or_default()
            .names
            .insert(name.to_os_string(), f.to_finding());
    }

    fn mark(&self, add: bool, scope: sys::MarkScope, path: &Path) -> io::Result<()> {
        match self
            .shared
            .group
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(g) => g.mark(add, scope, path),
            None => Err(io::Error::other("the fanotify responder has stopped")),
        }
    }

    /// Stop watching one credential file.
    pub fn unwatch(&mut self, f: &CredentialFile) {
        let k = (f.dev, f.ino);
        write(&self.shared.credentials).remove(&k);
        if let Some(fs) = self.fs_marks.get_mut(&f.dev) {
            fs.keys.remove(&k);
            if fs.keys.is_empty() {
                let fs = self.fs_marks.remove(&f.dev).expect("present");
                write(&self.shared.volumes).remove(&f.dev);
                {
                    let mut creds = write(&self.shared.credentials);
                    for d in &fs.discovered {
                        creds.remove(d);
                    }
                }
                self.forgotten.extend(fs.discovered);
                // An unmounted volume took its mark with it.
                if std::fs::metadata(&fs.dir).is_ok_and(|m| m.dev() == f.dev) {
                    if let Err(e) = self.mark(false, fs.scope, &fs.dir) {
                        debug!(volume = %fs.dir.display(), error = %e, "removing a volume mark");
                    }
                }
                info!(volume = %fs.dir.display(), scope = fs.scope.name(), "fanotify volume mark removed");
            }
        }
        if let Some(path) = self.inode_marks.remove(&k) {
            // Gone from its path: the kernel dropped the mark at unlink.
            if key_of(&path) == Some(k) {
                if let Err(e) = self.mark(false, sys::MarkScope::Inode, &path) {
                    debug!(path = %path.display(), error = %e, "removing a fanotify mark");
                }
            }
        }
        self.set_mark_gauge();
    }

    /// Hand the credentials the responder found by name to the pipeline's
    /// table and the kernel map (before their events are handled, and
    /// before an inventory update could give the same file another id),
    /// and drop those whose volume went away.
    pub fn drain_discovered(
        &mut self,
        table: &mut CredentialTable,
        kernel: &mut HashMap<MapData, CredentialKey, CredentialInfo>,
    ) {
        let found = std::mem::take(&mut *lock(&self.shared.discovered));
        for d in found {
            let key = CredentialKey {
                dev: kernel_dev_from_user(d.user_key.0),
                ino: d.user_key.1,
            };
            if let Some(fs) = self.fs_marks.get_mut(&d.user_key.0) {
                if !fs.keys.contains(&d.user_key) {
                    fs.discovered.insert(d.user_key);
                }
            }
            if table.adopt(key, d.id, d.meta.clone()) {
                if let Some(w) = table.get(&key) {
                    let _ = kernel.insert(key, kernel_value(w), 0);
                }
                info!(path = %d.meta.path, kind = %d.meta.kind, pod = d.meta.owner_pod_uid.as_deref().unwrap_or("-"), id = d.id, ino = d.user_key.1, "watching credential (a new inode on a credential volume, found by fanotify before the inventory)");
            }
        }
        for k in std::mem::take(&mut self.forgotten) {
            let key = CredentialKey {
                dev: kernel_dev_from_user(k.0),
                ino: k.1,
            };
            if table.remove(&key).is_some() {
                let _ = kernel.remove(&key);
            }
        }
    }

    /// `detector_fanotify_marks`: inode marks on now (hybrid: not on a
    /// leased file), volume marks by scope. Also after leases change.
    pub fn set_mark_gauge(&self) {
        let m = &self.shared.stats.marks;
        let inode = {
            let leased = read(&self.shared.leased);
            self.inode_marks
                .keys()
                .filter(|k| !leased.contains(k))
                .count()
        };
        m.with_label_values(&[sys::MarkScope::Inode.name()])
            .set(inode as i64);
        for scope in [sys::MarkScope::Filesystem, sys::MarkScope::Mount] {
            let n = self.fs_marks.values().filter(|m| m.scope == scope).count();
            m.with_label_values(&[scope.name()]).set(n as i64);
        }
    }

    /// The next credential access waiting for the pipeline. A credential
    /// the responder found itself is put in `table` (and `kernel`) before
    /// its first access is returned.
    pub fn next_access(
        &mut self,
        table: &mut CredentialTable,
        kernel: &mut HashMap<MapData, CredentialKey, CredentialInfo>,
    ) -> Option<CredentialAccess> {
        let a = self.events.try_recv().ok()?;
        if table.by_id(a.credential_id).is_none() {
            // Found after our last drain; queued before this event was sent.
            self.drain_discovered(table, kernel);
        }
        Some(a)
    }

    /// Is the responder still answering? Logs once when it stopped.
    pub fn check_alive(&mut self) -> bool {
        let alive = read(&self.shared.group).is_some();
        if !alive && !self.dead_reported {
            error!("the fanotify responder has stopped: credential opens are no longer seen (restart the daemon)");
            self.dead_reported = true;
        }
        alive
    }
}

impl Drop for FanotifySensor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.shared.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(h) = self.responder.take() {
            let _ = h.join();
        }
    }
}

fn key_of(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The event of `o`'s access to credential `id` (`key`) through `fd`.
fn access_event(
    o: opener::Opener,
    now: u64,
    id: u32,
    key: CredentialKey,
    fd: i32,
    repeats: u32,
) -> CredentialAccess {
    CredentialAccess {
        common: Common {
            time_ns: now,
            pid: o.tid,
            tgid: o.status.tgid,
            cgroup_id: o.cgroup_id,
        },
        ppid: o.status.ppid,
        uid: o.status.uid,
        gid: o.status.gid,
        comm: o.status.comm,
        credential_id: id,
        dev: key.dev,
        ino: key.ino,
        route: o.access.route,
        fd,
        readable: o.access.readable,
        writable: o.access.writable,
        repeats,
    }
}

/// A handle of our own on a kernel map (a duplicated fd), for the
/// responder thread.
fn clone_map<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    kind: fn(MapData) -> Map,
) -> Result<HashMap<MapData, K, V>, Error> {
    use std::os::fd::AsFd;
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::Holders(e.to_string()))?;
    let data = MapData::from_fd(fd).map_err(|e| Error::Holders(e.to_string()))?;
    HashMap::try_from(kind(data)).map_err(|e| Error::Holders(e.to_string()))
}

/// Boot-time clock in ns (what `bpf_ktime_get_boot_ns` and events use).
fn boottime_ns() -> u64 {
    crate::daemon::boottime_ns()
}

/// Answers the permission event `fd` exactly once, at the latest on drop,
/// and closes our descriptor of the file.
struct Pending<'a> {
    shared: &'a Shared,
    fan: RawFd,
    fd: RawFd,
}

impl<'a> Pending<'a> {
    fn start(shared: &'a Shared, fan: RawFd, fd: RawFd) -> Pending<'a> {
        *lock(&shared.inflight) = Inflight {
            fd,
            since: Instant::now(),
            answered: false,
        };
        Pending { shared, fan, fd }
    }

    fn answer_locked(&self, inf: &mut Inflight) {
        if !inf.answered {
            self.shared
                .stats
                .answer_seconds
                .observe(inf.since.elapsed().as_secs_f64());
            if let Err(e) = sys::allow(self.fan, self.fd) {
                // ENOENT: the group no longer knows the event (cannot be
                // for a live group). Nothing else to do: never deny.
                warn!(error = %e, "answering a fanotify permission event");
                self.shared.stats.errors.inc();
            }
            inf.answered = true;
        }
    }

    fn answer(&self) {
        let mut inf = lock(&self.shared.inflight);
        self.answer_locked(&mut inf);
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        // Under the lock: the watchdog never answers a closed (and maybe
        // reused) descriptor number.
        let mut inf = lock(&self.shared.inflight);
        self.answer_locked(&mut inf);
        // SAFETY: the kernel gave us this descriptor with the event; we
        // close it exactly once.
        unsafe { libc::close(self.fd) };
        inf.fd = -1;
        inf.answered = true;
    }
}

fn watchdog(shared: Arc<Shared>, limit: Duration) {
    let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    while !shared.stop.load(Ordering::Acquire) {
        std::thread::sleep(tick);
        let mut inf = lock(&shared.inflight);
        if inf.fd < 0 || inf.answered || inf.since.elapsed() < limit {
            continue;
        }
        let group = shared.group.read().unwrap_or_else(|e| e.into_inner());
        let Some(g) = group.as_ref() else { return };
        match sys::allow(g.raw(), inf.fd) {
            Ok(()) => {
                shared.stats.watchdog_answers.inc();
                warn!(after = ?inf.since.elapsed(), "fanotify responder too slow; the watchdog allowed the open");
            }
            Err(e) => warn!(error = %e, "watchdog answer failed"),
        }
        inf.answered = true;
    }
}

/// A thread that opened a credential and was reported: enough to know it
/// again on its next open without reading /proc in full.
#[derive(Debug)]
struct KnownThread {
    tgid: u32,
    ppid: u32,
    /// `starttime` of /proc/<tgid>/task/<tid>/stat: with the path, it
    /// tells a reused thread id from the thread we saw.
    start: u64,
    /// A pidfd of the thread (`PIDFD_THREAD`): while it does not poll
    /// readable, the thread lives, so its id names it and no other.
    /// `None` where the kernel has no thread pidfds (before 6.9).
    pidfd: Option<OwnedFd>,
}

/// Threads remembered at most (then forgotten all at once: a cache; each
/// holds a descriptor).
const KNOWN_THREADS: usize = 512;

/// pidfd_open(2) flag: a pidfd of one thread, readable when it exits.
const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

fn thread_pidfd(tid: u32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid as libc::pid_t, PIDFD_THREAD) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fresh descriptor we own.
    Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

/// Has the thread of `pidfd` exited (or can we not tell)?
fn thread_gone(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n != 0
}

/// The responder thread's state.
struct Responder {
    shared: Arc<Shared>,
    fan: RawFd,
    holders: HashMap<MapData, u32, Holder>,
    /// The kernel's CRED_SEEN: re-opens within `dedup_ns` are counted
    /// there, and a process's exit carries what is still unreported.
    cred_seen: HashMap<MapData, CredSeenKey, CredSeen>,
    dedup_ns: u64,
    known: StdHashMap<u32, KnownThread>,
    proc: opener::ProcReader,
    tx: std::sync::mpsc::SyncSender<CredentialAccess>,
    own_tgid: u32,
    /// `Config::hybrid`: a credential found on a volume's mount mark gets
    /// an inode mark at once, so that pods' opens of it are seen too.
    mark_discovered: bool,
    /// The kernel's OPEN_COUNTS (hybrid, where BTF names the counts): who
    /// else had a new credential inode open before its mark.
    open_counts: Option<HashMap<MapData, CredentialKey, OpenCounts>>,
}

impl Responder {
    fn run(&mut self) {
        opener::join_host_cgroup_ns_if_needed();
        // Room for many events per read; u64 for the metadata's alignment.
        let mut buf = vec![0u64; 4096];
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.fan,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.shared.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds on the stack.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!(error = %e, "poll on the fanotify group failed; stopping the sensor");
                return;
            }
            if fds[0].revents == 0 {
                continue;
            }
            loop {
                let bytes = buf.len() * 8;
                // SAFETY: reads at most `bytes` into our buffer.
                let n = unsafe { libc::read(self.fan, buf.as_mut_ptr().cast(), bytes) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => break,
                        Some(libc::EINTR) => continue,
                        _ => {
                            error!(error = %e, "reading the fanotify group failed; stopping the sensor");
                            return;
                        }
                    }
                }
                // SAFETY: the kernel wrote `n` bytes of our u64 buffer.
                let data =
                    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
                let (events, err) = sys::parse(data);
                for ev in events {
                    self.handle(ev);
                }
                if let Some(e) = err {
                    // Events after this point cannot be found: stop, and
                    // closing the group allows every one of them.
                    error!(error = %e, "unreadable fanotify event; stopping the sensor");
                    return;
                }
            }
        }
    }

    fn handle(&mut self, ev: sys::RawEvent) {
        if ev.fd < 0 {
            // FAN_NOFD: a queue overflow (cannot happen with our
            // unlimited queue, but never ignore it silently).
            self.shared.stats.lost.inc();
            warn!("fanotify queue overflow: credential opens may have been missed");
            return;
        }
        let shared = self.shared.clone();
        let pending = Pending::start(&shared, self.fan, ev.fd);
        self.shared.stats.permission_events.inc();
        if ev.mask & libc::FAN_OPEN_PERM == 0 {
            return;
        }
        let st = match sys::fstat(ev.fd) {
            Ok(st) => st,
            Err(e) => {
                debug!(error = %e, "fstat of a fanotify event fd");
                self.shared.stats.errors.inc();
                return;
            }
        };
        let (dev, ino) = (st.st_dev, st.st_ino);
        if read(&self.shared.leased).contains(&(dev, ino)) {
            return; // the lease check reports it, in the opener's context
        }
        let known = read(&self.shared.credentials).get(&(dev, ino)).copied();
        let Some(id) = known.or_else(|| self.discover(ev.fd, &st)) else {
            return; // another file on a marked filesystem, or just unwatched
        };
        if known.is_none() && self.mark_discovered {
            // Before the answer: kubelet's open that created the file waits
            // for it, so nothing has been written to it yet.
            if let Err(e) = sys::mark_file(self.fan, true, ev.fd) {
                error!(ino, error = %e, "cannot mark a new credential inode; pods' opens of it are not seen until it is leased");
            }
            self.report_earlier_openers(ev.fd, &st, id);
        }
        let now = boottime_ns();
        let tid = ev.tid as u32;
        if self.repeat_of_known_holder(tid, id, now) {
            return; // counted; `pending` answers on drop
        }
        let o = match self.proc.opener(tid) {
            Ok(o) => o,
            Err(e) => {
                debug!(tid, error = %e, "reading the opener of a credential");
                self.shared.stats.errors.inc();
                return;
            }
        };
        if o.status.tgid == self.own_tgid {
            return;
        }
        if o.access.readable {
            self.make_holders(&o, id, now);
        }
        self.shared.stats.credential_opens.inc();
        if o.access.readable {
            self.remember(tid, &o);
        }
        // Like the open tracepoints: within the window, count re-reads,
        // don't report them. A write-only open is always reported and never
        // starts a window a read could be folded into.
        let repeats = if o.access.readable {
            match self.fold(o.status.tgid, id, now) {
                Some(r) => r,
                None => return,
            }
        } else {
            0
        };
        // fd: not installed yet while the opener waits for us.
        let key = CredentialKey {
            dev: kernel_dev_from_user(dev),
            ino,
        };
        let ev = access_event(o, now, id, key, -1, repeats);
        // Queued before the answer: whatever the opener does next (exec,
        // connect) reaches the kernel's rings after this open is in the
        // queue, so the daemon puts both in order (daemon::drain).
        match self.tx.try_send(ev) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => self.shared.stats.lost.inc(),
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {}
        }
        pending.answer();
    }

    /// A new credential inode has just been marked while the open that
    /// created it waits (so nothing is written to it yet). Whoever opened it
    /// before the mark would read the token once written, unseen. A lease
    /// request on the event's descriptor makes the kernel record the
    /// inode's open counts (`generic_add_lease` fires before its conflict
    /// check; the request is refused while the creator writes). Beyond our
    /// descriptor and the waiting open, somebody has it open: they are
    /// found in /proc and reported as holders before the creator goes on.
    fn report_earlier_openers(&mut self, fd: RawFd, st: &libc::stat, id: u32) {
        let Some(counts) = self.open_counts.as_mut() else {
            return;
        };
        let key = CredentialKey {
            dev: kernel_dev_from_user(st.st_dev),
            ino: st.st_ino,
        };
        let _ = counts.remove(&key);
        // SAFETY: fcntl on the event's descriptor, which we own; no pointers.
        if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } == 0 {
            // Granted (nobody writes it): give it back before the answer.
            // SAFETY: as above.
            unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        }
        let Ok(c) = counts.get(&key, 0) else {
            debug!(ino = st.st_ino, "no open counts for a new credential inode");
            return;
        };
        // Ours (read-only) and the waiting open (either count).
        if c.readers.max(0) + c.writers.max(0) <= 2 {
            return;
        }
        let now = boottime_ns();
        let found: Vec<(u32, u32)> = opener::fds_of(st.st_dev, st.st_ino)
            .into_iter()
            .filter(|(pid, _)| *pid != self.own_tgid)
            .collect();
        warn!(
            ino = st.st_ino,
            readers = c.readers,
            writers = c.writers,
            found = found.len(),
            "a new credential inode was open before the daemon marked it: reporting who has it"
        );
        for (pid, fdn) in found {
            let o = match self.proc.holder_of(pid, fdn) {
                Ok(o) => o,
                Err(e) => {
                    debug!(pid, error = %e, "reading an earlier opener");
                    continue;
                }
            };
            if o.access.readable {
                self.make_holders(&o, id, now);
            }
            self.shared.stats.credential_opens.inc();
            let ev = access_event(o, now, id, key, fdn as i32, 0);
            if let Err(std::sync::mpsc::TrySendError::Full(_)) = self.tx.try_send(ev) {
                self.shared.stats.lost.inc();
            }
        }
    }

    /// `CRED_SEEN` as the kernel's `on_fd_returned` keeps it: `None` when
    /// this open falls in the window of the process's last report (counted
    /// there), else the count of opens the report stands for besides
    /// itself. Only this thread writes the map while the open tracepoints
    /// are not attached (the kernel's exit program only removes).
    fn fold(&mut self, tgid: u32, id: u32, now: u64) -> Option<u32> {
        if self.dedup_ns == 0 {
            return Some(0);
        }
        let key = CredSeenKey {
            tgid,
            credential_id: id,
        };
        let mut repeats = 0;
        if let Ok(mut seen) = self.cred_seen.get(&key, 0) {
            if now.wrapping_sub(seen.last_report_ns) < self.dedup_ns {
                seen.suppressed = seen.suppressed.saturating_add(1);
                if self.cred_seen.insert(key, seen, 0).is_ok() {
                    return None;
                }
                // Could not count it: report it instead.
                return Some(0);
            }
            repeats = seen.suppressed;
        }
        let fresh = CredSeen {
            last_report_ns: now,
            suppressed: 0,
            _pad: 0,
        };
        if let Err(e) = self.cred_seen.insert(key, fresh, 0) {
            debug!(tgid, error = %e, "CRED_SEEN update");
        }
        Some(repeats)
    }

    /// The fast path of a re-open (client-go re-reads its token, a loop
    /// reads it again): the thread is one we saw, its process is still the
    /// kernel's holder of this credential and the open falls in the window
    /// of its last report. Then the open is only counted (as the kernel
    /// counts a re-open it aggregates) and answered after a poll of the
    /// thread's pidfd (or one /proc read) instead of four /proc reads. Its
    /// holder state is already in the kernel map, so the answer still comes
    /// after HOLDERS says "holder". Any doubt (a reused thread id, the
    /// window over, another credential) takes the full path. Unlike the
    /// full path it does not look at the parent again: a reader reparented
    /// to a process of its cgroup makes that one a holder at its next
    /// reported open, at most one window later.
    fn repeat_of_known_holder(&mut self, tid: u32, id: u32, now: u64) -> bool {
        if self.dedup_ns == 0 {
            return false;
        }
        let Some(k) = self.known.get(&tid) else {
            return false;
        };
        let (tgid, ppid, start) = (k.tgid, k.ppid, k.start);
        let same = match &k.pidfd {
            Some(fd) => !thread_gone(fd),
            None => false,
        };
        let key = CredSeenKey {
            tgid,
            credential_id: id,
        };
        let Ok(mut seen) = self.cred_seen.get(&key, 0) else {
            return false;
        };
        if now.wrapping_sub(seen.last_report_ns) >= self.dedup_ns {
            return false;
        }
        if !self
            .holders
            .get(&tgid, 0)
            .is_ok_and(|h| h.credential_id == id)
        {
            return false;
        }
        // A live thread's id is its own. Without a pidfd, the path names
        // the thread group (a thread id reused by another process does not
        // resolve) and the start time the thread.
        let same = same
            || matches!(self.thread_stat(tgid, tid), Some((p, st)) if p == ppid && st == start);
        if !same {
            self.known.remove(&tid);
            return false;
        }
        seen.suppressed = seen.suppressed.saturating_add(1);
        if self.cred_seen.insert(key, seen, 0).is_err() {
            return false;
        }
        self.shared.stats.credential_opens.inc();
        true
    }

    /// (ppid, starttime) of the thread `tid` of process `tgid`.
    fn thread_stat(&mut self, tgid: u32, tid: u32) -> Option<(u32, u64)> {
        let text = self.proc.read(tgid, &format!("task/{tid}/stat")).ok()?;
        opener::parse_stat_ppid_start(&text)
    }

    /// Remember a reported reader's thread for `repeat_of_known_holder`.
    fn remember(&mut self, tid: u32, o: &opener::Opener) {
        if self.dedup_ns == 0 {
            return;
        }
        let Some((ppid, start)) = self.thread_stat(o.status.tgid, tid) else {
            return;
        };
        if ppid != o.status.ppid {
            return; // reparented while we looked: don't cache
        }
        if self.known.len() >= KNOWN_THREADS {
            self.known.clear();
        }
        self.known.insert(
            tid,
            KnownThread {
                tgid: o.status.tgid,
                ppid,
                start,
                pidfd: thread_pidfd(tid),
            },
        );
    }

    /// An inode we do not know on a credential volume's filesystem: a
    /// credential if its name is one of the volume's credential names
    /// (kubelet's rotation creates `..<timestamp>/token`). Returns its new id.
    fn discover(&self, fd: RawFd, st: &libc::stat) -> Option<u32> {
        // A regular file still linked: an unlinked old token (re-opened
        // through /proc/<pid>/fd/N) past its grace period stays forgotten.
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink == 0 {
            return None;
        }
        let meta = {
            let volumes = read(&self.shared.volumes);
            let vol = volumes.get(&st.st_dev)?;
            let path = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
            vol.names.get(path.file_name()?)?.clone()
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let key = (st.st_dev, st.st_ino);
        let meta = Credential {
            inode: st.st_ino,
            dev: kernel_dev_from_user(st.st_dev),
            ..meta
        };
        // Another open of the same new inode may have raced us here.
        let id = *write(&self.shared.credentials).entry(key).or_insert(id);
        lock(&self.shared.discovered).push(Discovered {
            user_key: key,
            id,
            meta,
        });
        Some(id)
    }

    /// What the kernel sensor does at syscall exit: the reader's thread
    /// group holds the credential, and so does its parent when in the same
    /// cgroup (`TOKEN=$(cat token); curl …`) and not a holder already.
    fn make_holders(&mut self, o: &opener::Opener, id: u32, now: u64) {
        let tgid = o.status.tgid;
        let holder = Holder {
            credential_id: id,
            origin_tgid: tgid,
            since_ns: now,
        };
        if let Err(e) = self.holders.insert(tgid, holder, 0) {
            error!(tgid, error = %e, "cannot record a credential holder in the kernel map");
        }
        let p = o.status.ppid;
        if p <= 1 || p == tgid || self.holders.get(&p, 0).is_ok() {
            return;
        }
        if o.cgroup_id == 0 {
            return; // our own view of its cgroup failed; don't guess
        }
        match self.proc.cgroup_path(p) {
            Ok(path) if path == o.cgroup_path => {
                // NOEXIST: never overwrite what the kernel recorded meanwhile.
                let _ = self.holders.insert(p, holder, BPF_NOEXIST);
            }
            _ => {}
        }
    }
}

/// `--open-sensor`: the fanotify group to use, or `None` for the
/// tracepoints. `auto` falls back (with a warning) where fanotify
/// permission events are unavailable; `fanotify` insists.
pub fn select(kind: crate::cli::OpenSensor) -> Result<Option<Group>, Error> {
    use crate::cli::OpenSensor;
    match kind {
        OpenSensor::Tracepoint | OpenSensor::Lease => Ok(None),
        OpenSensor::Fanotify | OpenSensor::Hybrid => open_group().map(Some),
        OpenSensor::Auto => match open_group() {
            Ok(g) => Ok(Some(g)),
            Err(e) => {
                warn!(error = %e, "falling back to the open-family syscall tracepoints (every syscall pays for them)");
                Ok(None)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Privileged (fanotify permission events need CAP_SYS_ADMIN); `cargo
    /// xtask test` runs as root.
    #[test]
    fn the_watchdog_answers_for_a_stuck_responder() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root: fanotify permission events"
        );
        let path = std::env::temp_dir().join(format!("detector-watchdog-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let group = Group::new().unwrap();
        group.mark(true, sys::MarkScope::Inode, &path).unwrap();
        let fan = group.raw();
        let registry = Registry::new();
        let lost = IntCounter::new("lost", "lost").unwrap();
        let stats = Stats::new(&registry, lost).unwrap();
        let shared = Arc::new(Shared::new(group, sys::eventfd().unwrap(), stats));
        let s = shared.clone();
        std::thread::spawn(move || watchdog(s, Duration::from_millis(100)));

        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || done_tx.send(std::fs::read(&p).is_ok()).unwrap());
        // Take the event like the responder, then never answer it.
        let mut pfd = libc::pollfd {
            fd: fan,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "no event");
        let mut buf = vec![0u64; 512];
        // SAFETY: reads into our buffer.
        let n = unsafe { libc::read(fan, buf.as_mut_ptr().cast(), buf.len() * 8) };
        assert!(n > 0);
        // SAFETY: the kernel wrote n bytes.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
        let (events, err) = sys::parse(bytes);
        assert_eq!((events.len(), err), (1, None));
        let pending = Pending::start(&shared, fan, events[0].fd);
        let opened = done_rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(opened, Ok(true), "the watchdog let the opener through");
        // The watchdog counts right after its answer; the opener may run first.
        let counted = Instant::now();
        while shared.stats.watchdog_answers.get() == 0 && counted.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(shared.stats.watchdog_answers.get(), 1);
        drop(pending); // answered already: no second answer
        assert_eq!(shared.stats.errors.get(), 0);
        shared.stop.store(true, Ordering::Release);
        let _ = std::fs::remove_file(&path);
    }
}
