//! Credential files on the node and their owner pods.
//!
//! # Interface
//! - [`scan`]`(&InventoryConfig) -> (Vec<CredentialFile>, Vec<String>)`: one
//!   pass over the node; the strings are warnings about hostile or malformed
//!   state (never a panic, never an error for a missing kubelet directory).
//! - [`spawn_watcher`]`(InventoryConfig) -> mpsc::Receiver<InventoryUpdate>`:
//!   the same, kept up to date (see `watch.rs`): first an `Upsert` per file
//!   of the initial scan, then `Synced`, then changes. Drop the receiver to
//!   stop it.
//! - [`run_cli`]: `detector inventory` (table, or `--json`).
//!
//! # What counts as a credential
//! Under `<kubelet-dir>/pods/<pod-uid>/volumes/<plugin>/<volume>/`:
//! - `kubernetes.io~projected/<vol>/token` -> `kubernetes-serviceaccount`
//! - `kubernetes.io~secret/<vol>/token` -> `kubernetes-secret-token` (legacy)
//! - the globs of [`default_globs`] (cloud workload identity, Vault agent)
//!   and `extra_globs` (kind `custom`), matched against the path relative to
//!   the pod's `volumes/` directory, e.g. `kubernetes.io~projected/aws-iam-token/token`.
//!
//! Plus `extra_files` (absolute paths, kind `custom`, no owner pod).
//!
//! Identity is the real file: user-visible names such as `token` are
//! symlinks through `..data -> ..2026_11_23_10_00_00.123456789/`; we stat
//! through them, so `dev`/`ino` are those of the file a reader's `open` gets.
//! `dev` is `st_dev` as `stat(2)` returns it (userspace encoding; the kernel
//! map wants `detector_common::kernel_dev_from_user(dev)`).
//!
//! Structural directories (`pods/<uid>`, `volumes`, `<plugin>`, `<volume>`)
//! are never followed through symlinks, and a credential whose real path
//! leaves its volume directory is refused with a warning.

mod watch;

use std::{
    collections::HashSet,
    fmt,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use globset::{Glob, GlobBuilder, GlobMatcher};
use serde::Serialize;

pub use watch::{spawn_watcher, InventoryUpdate};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CredentialKind {
    KubernetesServiceAccount,
    KubernetesSecretToken,
    AwsWebIdentity,
    AzureWorkloadIdentity,
    GcpWorkloadIdentity,
    VaultAgent,
    Custom,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KubernetesServiceAccount => "kubernetes-serviceaccount",
            Self::KubernetesSecretToken => "kubernetes-secret-token",
            Self::AwsWebIdentity => "aws-web-identity",
            Self::AzureWorkloadIdentity => "azure-workload-identity",
            Self::GcpWorkloadIdentity => "gcp-workload-identity",
            Self::VaultAgent => "vault-agent",
            Self::Custom => "custom",
        }
    }
}

/// Serialized as [`CredentialKind::as_str`].
impl Serialize for CredentialKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One credential file. Two `CredentialFile`s with the same `(dev, ino)` are
/// the same credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CredentialFile {
    /// `st_dev` as `stat(2)` gives it.
    pub dev: u64,
    pub ino: u64,
    pub kind: CredentialKind,
    /// The user-visible path (e.g. `.../kube-api-access-x/token`).
    pub path: PathBuf,
    /// Where that path resolves to (e.g. `.../..2026_11_23_.../token`).
    pub real_path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_pod_uid: Option<String>,
    /// Volume name (the directory under the plugin directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

impl CredentialFile {
    pub fn key(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// The finding contract's view (`dev` in the kernel's encoding, as the
    /// kernel map and events use it).
    pub fn to_finding(&self) -> crate::finding::Credential {
        crate::finding::Credential {
            kind: self.kind.as_str().into(),
            path: self.path.display().to_string(),
            owner_pod_uid: self.owner_pod_uid.clone(),
            inode: self.ino,
            dev: detector_common::kernel_dev_from_user(self.dev),
        }
    }
}

#[derive(Clone, Debug)]
pub struct InventoryConfig {
    /// Kubelet state directory (`/var/lib/kubelet`).
    pub kubelet_dir: PathBuf,
    /// Absolute paths of further credential files (kind `custom`).
    pub extra_files: Vec<PathBuf>,
    /// Further globs relative to a pod's `volumes/` dir (kind `custom`).
    pub extra_globs: Vec<String>,
    /// How long a credential that disappeared (rotated away, pod removed)
    /// stays in the map: a process may still read the old file.
    pub rotation_grace: Duration,
    /// Full rescan interval of the watcher, a safety net under inotify.
    pub rescan_interval: Duration,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        InventoryConfig {
            kubelet_dir: PathBuf::from(crate::cli::DEFAULT_KUBELET_DIR),
            extra_files: Vec::new(),
            extra_globs: Vec::new(),
            rotation_grace: Duration::from_secs(120),
            rescan_interval: Duration::from_secs(30),
        }
    }
}

impl InventoryConfig {
    pub fn new(kubelet_dir: impl Into<PathBuf>) -> Self {
        InventoryConfig {
            kubelet_dir: kubelet_dir.into(),
            ..Default::default()
        }
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.kubelet_dir.join("pods")
    }
}

/// Default credential globs, relative to `<kubelet>/pods/<uid>/volumes/`.
///
/// - EKS IRSA: the pod identity webhook adds projected volume `aws-iam-token`
///   (path `token`, mounted at `/var/run/secrets/eks.amazonaws.com/serviceaccount`).
///   EKS Pod Identity: volume `eks-pod-identity-token`, path `eks-pod-identity-token`.
/// - Azure workload identity: the webhook adds projected volume
///   `azure-identity-token` with path `azure-identity-token`
///   (mounted at `/var/run/secrets/azure/tokens`).
/// - GCP workload identity federation (non-GKE clusters): projected volume
///   `gcp-ksa` with path `token` (documented credential-config setup), and
///   the credential configuration JSON naming it.
/// - Vault agent injector: token sink `.vault-token` in the `home-init` /
///   `home-sidecar` emptyDirs, rendered secrets in the `vault-secrets` emptyDir
///   (mounted at `/vault/secrets`).
pub fn default_globs() -> Vec<(&'static str, CredentialKind)> {
    use CredentialKind::*;
    vec![
        (
            "kubernetes.io~projected/aws-iam-token/token",
            AwsWebIdentity,
        ),
        (
            "kubernetes.io~projected/eks-pod-identity-token/eks-pod-identity-token",
            AwsWebIdentity,
        ),
        (
            "kubernetes.io~projected/azure-identity-token/azure-identity-token",
            AzureWorkloadIdentity,
        ),
        ("kubernetes.io~projected/gcp-ksa/token", GcpWorkloadIdentity),
        (
            "kubernetes.io~projected/gcp-ksa/google-application-credentials.json",
            GcpWorkloadIdentity,
        ),
        ("kubernetes.io~empty-dir/home-init/.vault-token", VaultAgent),
        (
            "kubernetes.io~empty-dir/home-sidecar/.vault-token",
            VaultAgent,
        ),
        ("kubernetes.io~empty-dir/vault-secrets/*", VaultAgent),
    ]
}

/// A compiled credential glob, also matched component by component so the
/// walk only descends where a match is possible (an emptyDir may hold a
/// million files).
struct Pattern {
    full: GlobMatcher,
    comps: Vec<Option<GlobMatcher>>, // None = `**`
    kind: CredentialKind,
}

impl Pattern {
    fn new(glob: &str, kind: CredentialKind) -> Result<Pattern, String> {
        let glob = glob.trim_start_matches('/');
        let full = GlobBuilder::new(glob)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("bad credential glob {glob:?}: {e}"))?
            .compile_matcher();
        let mut comps = Vec::new();
        for c in glob.split('/') {
            if c == "**" {
                comps.push(None);
            } else {
                let g = Glob::new(c).map_err(|e| format!("bad credential glob {glob:?}: {e}"))?;
                comps.push(Some(g.compile_matcher()));
            }
        }
        Ok(Pattern { full, comps, kind })
    }

    /// May a file below the directory `dir` (components relative to
    /// `volumes/`) match?
    fn may_match_below(&self, dir: &[&str]) -> bool {
        for (i, d) in dir.iter().enumerate() {
            match self.comps.get(i) {
                Some(None) => return true,
                Some(Some(m)) if i + 1 < self.comps.len() => {
                    if !m.is_match(d) {
                        return false;
                    }
                }
                _ => return false,
            }
        }
        true
    }
}

struct Matcher {
    patterns: Vec<Pattern>,
}

impl Matcher {
    fn new(cfg: &InventoryConfig, warnings: &mut Vec<String>) -> Matcher {
        let mut patterns = Vec::new();
        let extra = cfg
            .extra_globs
            .iter()
            .map(|g| (g.as_str(), CredentialKind::Custom));
        for (g, kind) in default_globs().into_iter().chain(extra) {
            match Pattern::new(g, kind) {
                Ok(p) => patterns.push(p),
                Err(w) => warnings.push(w),
            }
        }
        Matcher { patterns }
    }

    fn kind_of(&self, rel: &str) -> Option<CredentialKind> {
        self.patterns
            .iter()
            .find(|p| p.full.is_match(rel))
            .map(|p| p.kind)
    }

    fn descend(&self, dir: &[&str]) -> bool {
        self.patterns.iter().any(|p| p.may_match_below(dir))
    }
}

const PROJECTED: &str = "kubernetes.io~projected";
const SECRET: &str = "kubernetes.io~secret";
/// Depth below a volume directory the glob walk goes.
const MAX_DEPTH: usize = 4;
/// Entries read per directory; more is hostile or not a credential volume.
/// High enough for `pods/` on the largest nodes plus orphaned pod dirs.
const MAX_ENTRIES: usize = 65536;

/// One pass over the node. See the module docs.
pub fn scan(cfg: &InventoryConfig) -> (Vec<CredentialFile>, Vec<String>) {
    struct Collect(Vec<CredentialFile>);
    impl ScanSink for Collect {
        fn dir(&mut self, _: &Path) {}
        fn file(&mut self, f: CredentialFile) {
            self.0.push(f);
        }
    }
    let mut out = Collect(Vec::new());
    let warnings = scan_into(cfg, &mut out);
    (out.0, warnings)
}

/// Where a scan reports what it finds, as it goes: the watcher keeps no
/// copy of a whole pass (10,000 pods are 50,000 directories).
pub(crate) trait ScanSink {
    /// A directory whose changes can change the result (for inotify),
    /// reported before it is listed.
    fn dir(&mut self, path: &Path);
    /// A credential, each `(dev, ino)` once per pass.
    fn file(&mut self, f: CredentialFile);
}

/// One pass over the node into `sink`; returns the warnings.
pub(crate) fn scan_into(cfg: &InventoryConfig, sink: &mut dyn ScanSink) -> Vec<String> {
    let mut s = Scan {
        sink,
        warnings: Vec::new(),
        seen: HashSet::new(),
    };
    let matcher = Matcher::new(cfg, &mut s.warnings);
    let pods = cfg.pods_dir();
    match std::fs::symlink_metadata(&pods) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => s.warn(format!(
            "cannot stat pods directory {}: {e}",
            pods.display()
        )),
        Ok(md) if !md.is_dir() => s.warn(format!(
            "{} is not a directory; no pods scanned",
            pods.display()
        )),
        Ok(_) => {
            s.sink.dir(&pods);
            for name in s.list(&pods) {
                let path = pods.join(&name);
                s.scan_pod(&matcher, &name, &path);
            }
        }
    }
    for f in &cfg.extra_files {
        let parent = f.parent().unwrap_or(Path::new("/"));
        s.sink.dir(parent);
        s.add_file(f, parent, CredentialKind::Custom, None, None, false);
    }
    s.warnings
}

struct Scan<'s> {
    sink: &'s mut dyn ScanSink,
    warnings: Vec<String>,
    seen: HashSet<(u64, u64)>,
}

impl Scan<'_> {
    /// Control characters (a newline in a hostile file name) are escaped:
    /// one warning is one log line.
    fn warn(&mut self, w: String) {
        let clean = if w.chars().any(char::is_control) {
            w.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        } else {
            w
        };
        self.warnings.push(clean);
    }

    /// Entries of a directory (names as UTF-8; others are warned about and
    /// skipped), sorted. Names only: `pods/` may hold 10,000 entries.
    fn list(&mut self, dir: &Path) -> Vec<String> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) => {
                self.warn(format!("cannot list {}: {e}", dir.display()));
                return Vec::new();
            }
        };
        let mut v = Vec::new();
        for ent in rd {
            let ent = match ent {
                Ok(e) => e,
                Err(e) => {
                    self.warn(format!("error listing {}: {e}", dir.display()));
                    break;
                }
            };
            if v.len() >= MAX_ENTRIES {
                self.warn(format!(
                    "{} has more than {MAX_ENTRIES} entries; the rest is ignored",
                    dir.display()
                ));
                break;
            }
            match ent.file_name().into_string() {
                Ok(n) => v.push(n),
                Err(n) => self.warn(format!(
                    "skipping non-UTF-8 name {:?} in {}",
                    n,
                    dir.display()
                )),
            }
        }
        v.sort();
        v
    }

    /// A structural directory: must be a real directory, not a symlink.
    fn real_dir(&mut self, path: &Path) -> bool {
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.is_dir() => true,
            Ok(md) if md.file_type().is_symlink() => {
                self.warn(format!(
                    "{} is a symlink where kubelet keeps a directory; not followed",
                    path.display()
                ));
                false
            }
            Ok(_) => {
                self.warn(format!("{} is not a directory", path.display()));
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                self.warn(format!("cannot stat {}: {e}", path.display()));
                false
            }
        }
    }

    fn scan_pod(&mut self, m: &Matcher, uid: &str, pod_dir: &Path) {
        if !self.real_dir(pod_dir) {
            return;
        }
        self.sink.dir(pod_dir);
        if !plausible_pod_uid(uid) {
            self.warn(format!(
                "pod directory name {uid:?} is not a pod UID; scanned anyway"
            ));
        }
        let volumes = pod_dir.join("volumes");
        if !volumes.exists() || !self.real_dir(&volumes) {
            return;
        }
        self.sink.dir(&volumes);
        for plugin in self.list(&volumes) {
            let plugin_dir = volumes.join(&plugin);
            let builtin = plugin == PROJECTED || plugin == SECRET;
            if plugin.starts_with("..") || !(builtin || m.descend(&[&plugin])) {
                continue;
            }
            if !self.real_dir(&plugin_dir) {
                continue;
            }
            self.sink.dir(&plugin_dir);
            for vol in self.list(&plugin_dir) {
                let vol_dir = plugin_dir.join(&vol);
                let globbed = m.descend(&[&plugin, &vol]);
                if vol.starts_with("..") || !(builtin || globbed) || !self.real_dir(&vol_dir) {
                    continue;
                }
                self.sink.dir(&vol_dir);
                if builtin {
                    let token = vol_dir.join("token");
                    let rel = format!("{plugin}/{vol}/token");
                    if m.kind_of(&rel).is_none() && std::fs::symlink_metadata(&token).is_ok() {
                        let kind = if plugin == PROJECTED {
                            CredentialKind::KubernetesServiceAccount
                        } else {
                            CredentialKind::KubernetesSecretToken
                        };
                        self.add_file(&token, &vol_dir, kind, Some(uid), Some(&vol), true);
                    }
                }
                if globbed {
                    let mut comps = vec![plugin.clone(), vol.clone()];
                    self.walk(m, uid, &vol, &vol_dir, &vol_dir, &mut comps);
                }
            }
        }
    }

    /// Walk a volume for glob matches, following symlinks (kubelet's
    /// user-visible names are symlinks) but never into `..`-prefixed
    /// internals, at most `MAX_DEPTH` deep.
    fn walk(
        &mut self,
        m: &Matcher,
        uid: &str,
        vol: &str,
        vol_dir: &Path,
        dir: &Path,
        comps: &mut Vec<String>,
    ) {
        if comps.len() >= 2 + MAX_DEPTH {
            return;
        }
        for name in self.list(dir) {
            let path = dir.join(&name);
            if name.starts_with("..") {
                continue;
            }
            comps.push(name);
            let rel = comps.join("/");
            match std::fs::metadata(&path) {
                Ok(md) if md.is_dir() => {
                    let refs: Vec<&str> = comps.iter().map(|s| s.as_str()).collect();
                    if m.descend(&refs) {
                        self.sink.dir(&path);
                        self.walk(m, uid, vol, vol_dir, &path, comps);
                    } else if m.kind_of(&rel).is_some() {
                        self.warn(format!(
                            "credential path {} is a directory, not a file",
                            path.display()
                        ));
                    }
                }
                _ => {
                    if let Some(kind) = m.kind_of(&rel) {
                        self.add_file(&path, vol_dir, kind, Some(uid), Some(vol), true);
                    }
                }
            }
            comps.pop();
        }
    }

    /// Stat a credential path through its symlinks and record it.
    fn add_file(
        &mut self,
        path: &Path,
        confine: &Path,
        kind: CredentialKind,
        owner: Option<&str>,
        volume: Option<&str>,
        confined: bool,
    ) {
        let real = match std::fs::canonicalize(path) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                self.warn(format!(
                    "credential path {} is a symlink loop; ignored",
                    path.display()
                ));
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !confined => {
                self.warn(format!(
                    "credential file {} does not exist (yet)",
                    path.display()
                ));
                return;
            }
            Err(e) => {
                self.warn(format!(
                    "cannot resolve credential path {}: {e}",
                    path.display()
                ));
                return;
            }
        };
        if confined {
            match std::fs::canonicalize(confine) {
                Ok(c) if real.starts_with(&c) => {}
                _ => {
                    self.warn(format!(
                        "credential path {} resolves to {} outside its volume; ignored",
                        path.display(),
                        real.display()
                    ));
                    return;
                }
            }
        }
        let md = match std::fs::metadata(&real) {
            Ok(md) => md,
            Err(e) => {
                self.warn(format!(
                    "cannot stat credential file {}: {e}",
                    real.display()
                ));
                return;
            }
        };
        if md.is_dir() {
            self.warn(format!(
                "credential path {} is a directory, not a file; ignored",
                path.display()
            ));
            return;
        }
        if !md.is_file() {
            self.warn(format!(
                "credential path {} is not a regular file; ignored",
                path.display()
            ));
            return;
        }
        if !self.seen.insert((md.dev(), md.ino())) {
            return; // the same file under two names: first wins
        }
        self.sink.file(CredentialFile {
            dev: md.dev(),
            ino: md.ino(),
            kind,
            path: path.to_path_buf(),
            real_path: real,
            owner_pod_uid: owner.map(str::to_string),
            volume: volume.map(str::to_string),
        });
    }
}

/// Pod UIDs are RFC 4122 UUIDs; static pods get a 32-hex-digit hash.
pub fn plausible_pod_uid(s: &str) -> bool {
    let b = s.as_bytes();
    match b.len() {
        32 => b.iter().all(u8::is_ascii_hexdigit),
        36 => b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        }),
        _ => false,
    }
}

/// `detector inventory`: the node's credential files, their owner pods and
/// the pods' workloads (cgroups, and names from CRI when a runtime answers).
pub fn run_cli(args: &crate::cli::InventoryArgs) -> anyhow::Result<()> {
    let kubelet = args
        .kubelet_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::cli::DEFAULT_KUBELET_DIR));
    let cfg = InventoryConfig::new(&kubelet);
    let (files, warnings) = scan(&cfg);
    let cgroup_root = match &args.cgroup_root {
        Some(r) => Some(r.clone()),
        None => crate::loader::find_cgroup2_root().ok(),
    };
    let workloads = match &cgroup_root {
        Some(root) => crate::attribution::workloads_under(root),
        None => Vec::new(),
    };
    let names = crate::attribution::cri::snapshot_blocking(None);
    let pod_name = |uid: &str| {
        names
            .as_ref()
            .and_then(|s| s.pods.get(uid))
            .map(|p| format!("{}/{}", p.namespace, p.name))
    };
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            kubelet_dir: &'a Path,
            credentials: Vec<serde_json::Value>,
            workloads: Vec<serde_json::Value>,
            warnings: &'a [String],
        }
        let credentials = files
            .iter()
            .map(|f| {
                let mut v = serde_json::to_value(f).unwrap_or_default();
                if let Some(p) = f.owner_pod_uid.as_deref().and_then(pod_name) {
                    v["owner_pod"] = p.into();
                }
                v
            })
            .collect();
        let workloads = workloads
            .iter()
            .map(|w| {
                let mut v = serde_json::to_value(w).unwrap_or_default();
                if let Some(p) = w.pod.as_ref().and_then(|p| pod_name(&p.pod_uid)) {
                    v["pod"] = p.into();
                }
                v
            })
            .collect();
        let out = Out {
            kubelet_dir: &kubelet,
            credentials,
            workloads,
            warnings: &warnings,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if !kubelet.join("pods").exists() {
        println!(
            "no kubelet pods directory under {} (not a Kubernetes node?)",
            kubelet.display()
        );
    }
    println!("CREDENTIALS ({})", files.len());
    println!(
        "{:<26} {:<36} {:<28} {:<24} {:<14} PATH",
        "KIND", "OWNER POD UID", "POD", "VOLUME", "DEV:INO"
    );
    for f in &files {
        let uid = f.owner_pod_uid.as_deref().unwrap_or("-");
        println!(
            "{:<26} {:<36} {:<28} {:<24} {:<14} {}",
            f.kind.as_str(),
            uid,
            pod_name(uid).unwrap_or_else(|| "-".into()),
            f.volume.as_deref().unwrap_or("-"),
            format!("{}:{}", f.dev, f.ino),
            f.path.display()
        );
    }
    println!();
    println!("WORKLOADS ({})", workloads.len());
    println!(
        "{:<36} {:<28} {:<12} {:<10} {:<16} CGROUP",
        "POD UID", "POD", "QOS", "RUNTIME", "CONTAINER"
    );
    for w in &workloads {
        let Some(p) = &w.pod else { continue };
        println!(
            "{:<36} {:<28} {:<12} {:<10} {:<16} {}",
            p.pod_uid,
            pod_name(&p.pod_uid).unwrap_or_else(|| "-".into()),
            p.qos.as_deref().unwrap_or("-"),
            p.runtime.map(|r| r.as_str()).unwrap_or("-"),
            p.container_id
                .as_deref()
                .map(|c| &c[..c.len().min(13)])
                .unwrap_or("(pod)"),
            w.cgroup_path
        );
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_render() {
        assert_eq!(
            CredentialKind::KubernetesServiceAccount.as_str(),
            "kubernetes-serviceaccount"
        );
        assert_eq!(
            serde_json::to_value(CredentialKind::AwsWebIdentity).unwrap(),
            "aws-web-identity"
        );
        assert_eq!(
            serde_json::to_value(CredentialKind::KubernetesServiceAccount).unwrap(),
            "kubernetes-serviceaccount"
        );
    }

    #[test]
    fn pod_uids() {
        assert!(plausible_pod_uid("0b5f4a0c-1d2e-4f3a-9b8c-7d6e5f4a3b2c"));
        assert!(plausible_pod_uid("8d5d9d1c6f3f0a7f2b1e4c3d2a1b0c9d"));
        assert!(!plausible_pod_uid("0b5f4a0c_1d2e_4f3a_9b8c_7d6e5f4a3b2c"));
        assert!(!plausible_pod_uid("../etc"));
        assert!(!plausible_pod_uid(""));
    }

    #[test]
    fn patterns_prune_and_match() {
        let mut w = Vec::new();
        let cfg = InventoryConfig {
            extra_globs: vec!["kubernetes.io~empty-dir/creds/**/*.json".into()],
            ..Default::default()
        };
        let m = Matcher::new(&cfg, &mut w);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            m.kind_of("kubernetes.io~projected/aws-iam-token/token"),
            Some(CredentialKind::AwsWebIdentity)
        );
        assert_eq!(
            m.kind_of("kubernetes.io~projected/azure-identity-token/azure-identity-token"),
            Some(CredentialKind::AzureWorkloadIdentity)
        );
        assert_eq!(
            m.kind_of("kubernetes.io~empty-dir/vault-secrets/db-creds"),
            Some(CredentialKind::VaultAgent)
        );
        assert_eq!(m.kind_of("kubernetes.io~empty-dir/vault-secrets/a/b"), None);
        assert_eq!(
            m.kind_of("kubernetes.io~empty-dir/creds/x/y/z.json"),
            Some(CredentialKind::Custom)
        );
        assert!(m.descend(&["kubernetes.io~empty-dir"]));
        assert!(m.descend(&["kubernetes.io~empty-dir", "vault-secrets"]));
        assert!(!m.descend(&["kubernetes.io~empty-dir", "cache"]));
        assert!(!m.descend(&["kubernetes.io~empty-dir", "vault-secrets", "sub"]));
        assert!(m.descend(&["kubernetes.io~empty-dir", "creds", "a", "b"]));
        assert!(!m.descend(&["kubernetes.io~configmap"]));
        let bad = InventoryConfig {
            extra_globs: vec!["a/[".into()],
            ..Default::default()
        };
        let mut w = Vec::new();
        Matcher::new(&bad, &mut w);
        assert_eq!(w.len(), 1, "{w:?}");
    }

    /// Kubelet's atomic-writer layout in a temp dir (no privileges needed).
    #[test]
    fn scan_resolves_through_data_symlinks() {
        use std::os::unix::fs::symlink;
        let root = std::env::temp_dir().join(format!("detector-inv-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let uid = "0b5f4a0c-1d2e-4f3a-9b8c-7d6e5f4a3b2c";
        let vol = root
            .join("pods")
            .join(uid)
            .join("volumes")
            .join(PROJECTED)
            .join("kube-api-access-abcde");
        let ts = vol.join("..2026_11_23_10_00_00.123456789");
        std::fs::create_dir_all(&ts).unwrap();
        std::fs::write(ts.join("token"), "x").unwrap();
        std::fs::write(ts.join("ca.crt"), "x").unwrap();
        symlink("..2026_11_23_10_00_00.123456789", vol.join("..data")).unwrap();
        symlink("..data/token", vol.join("token")).unwrap();
        symlink("..data/ca.crt", vol.join("ca.crt")).unwrap();
        let irsa = root
            .join("pods")
            .join(uid)
            .join("volumes")
            .join(PROJECTED)
            .join("aws-iam-token");
        std::fs::create_dir_all(&irsa).unwrap();
        std::fs::write(irsa.join("token"), "x").unwrap();
        let (files, warnings) = scan(&InventoryConfig::new(&root));
        std::fs::remove_dir_all(&root).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(files.len(), 2, "{files:?}");
        let sa = files
            .iter()
            .find(|f| f.kind == CredentialKind::KubernetesServiceAccount)
            .unwrap();
        assert_eq!(sa.owner_pod_uid.as_deref(), Some(uid));
        assert_eq!(sa.volume.as_deref(), Some("kube-api-access-abcde"));
        assert!(
            sa.real_path
                .ends_with("..2026_11_23_10_00_00.123456789/token"),
            "{sa:?}"
        );
        assert!(files
            .iter()
            .any(|f| f.kind == CredentialKind::AwsWebIdentity));
    }

    #[test]
    fn missing_kubelet_dir_is_quiet() {
        let (files, warnings) = scan(&InventoryConfig::new("/nonexistent/kubelet"));
        assert!(files.is_empty() && warnings.is_empty());
    }
}
