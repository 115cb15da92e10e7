//! Which workload a cgroup is: cgroup id -> cgroup-v2 path -> pod UID,
//! container id and runtime, enriched with names from the container runtime.
//!
//! # Interface
//! - [`parse_cgroup_path`]`(&str) -> Option<PodRef>`: pure parsing of the
//!   kubelet layouts (cgroupfs and systemd drivers; containerd, CRI-O, Docker
//!   naming). `None` = not a pod cgroup (host process, garbage).
//! - [`Attributor`]: cache cgroup id -> path. Feed it the kernel's cgroup
//!   events ([`Attributor::observe_mkdir`] / [`Attributor::observe_rmdir`]);
//!   entries stay [`Attributor::retention`] after rmdir because events of the
//!   cgroup's processes may still be in flight, so a container that lived
//!   10 ms is still attributed. [`Attributor::resolve`] on a miss rescans
//!   the cgroup-v2 tree (a cgroup-v2 directory's inode number is its cgroup
//!   id), at most every `min_rescan`. It never blocks on the network: CRI
//!   names come from the cache of an optional [`cri::CriHandle`], which is
//!   asked to refresh when a pod is not in it yet (the next resolve of that
//!   cgroup has the names). Service account and labels come from the
//!   Kubernetes API when an optional [`kubeapi::KubeApiHandle`] is given
//!   (this node's pods, listed and watched in the background); the API also
//!   names pods CRI does not know.
//! - [`workloads_under`]: every pod cgroup of a cgroup-v2 tree (CLI).

pub mod cri;
pub mod kubeapi;

use std::{
    collections::{BTreeMap, HashMap},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;
use tracing::{debug, warn};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::Crio => "crio",
            Runtime::Docker => "docker",
        }
    }
}

/// What a kubepods cgroup path says about its workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodRef {
    /// With dashes, as in the API (the systemd layout's underscores undone).
    pub pod_uid: String,
    /// `None` for the pod-level cgroup itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Known from the systemd scope prefix (`cri-containerd-`, `crio-`,
    /// `docker-`) or a cgroupfs `crio-` prefix; `None` when the layout
    /// does not say (cgroupfs containerd/docker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    /// `besteffort`, `burstable` or `guaranteed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
}

fn is_uid_char(c: char) -> bool {
    c.is_ascii_hexdigit() || c == '-'
}

/// A pod UID (36-char UUID or 32-hex static-pod hash), dashes normalised.
fn pod_uid(s: &str) -> Option<String> {
    let s = s.replace('_', "-");
    (s.chars().all(is_uid_char) && crate::inventory::plausible_pod_uid(&s)).then_some(s)
}

/// A container id: 1..=128 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
fn container_id(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(['.', '-'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    ok.then(|| s.to_string())
}

fn qos_name(s: &str) -> Option<String> {
    match s {
        "besteffort" | "burstable" | "guaranteed" => Some(s.to_string()),
        _ => None,
    }
}

/// A systemd container scope `<prefix>-<id>.scope`.
fn scope(c: &str) -> Option<(Option<Runtime>, String)> {
    let base = c.strip_suffix(".scope")?;
    for (prefix, rt) in [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-conmon-", Runtime::Crio),
        ("crio-", Runtime::Crio),
        ("docker-", Runtime::Docker),
    ] {
        if let Some(id) = base.strip_prefix(prefix) {
            return Some((Some(rt), container_id(id)?));
        }
    }
    let (_, id) = base.rsplit_once('-')?;
    Some((None, container_id(id)?))
}

/// Parse a cgroup path (relative to the cgroup-v2 root, leading `/`
/// optional) in either kubelet layout. Prefixes before the `kubepods`
/// component are allowed (a kubelet `--cgroup-root`, nested runtimes);
/// components below the container (a container's own sub-cgroups) are
/// attributed to the container.
pub fn parse_cgroup_path(path: &str) -> Option<PodRef> {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let start = comps.iter().position(|c| {
        *c == "kubepods"
            || (c.ends_with(".slice")
                && c.trim_end_matches(".slice")
                    .split('-')
                    .any(|w| w == "kubepods"))
    })?;
    let first = comps[start];
    if first == "kubepods" {
        // cgroupfs: kubepods[/<qos>]/pod<uid>[/<container>]
        let mut i = start + 1;
        let mut qos = None;
        if let Some(q) = comps.get(i).and_then(|c| qos_name(c)) {
            qos = Some(q);
            i += 1;
        }
        let uid = pod_uid(comps.get(i)?.strip_prefix("pod")?)?;
        let qos = qos.or_else(|| Some("guaranteed".to_string()));
        let (container_id, runtime) = match comps.get(i + 1) {
            None => (None, None),
            Some(c) => {
                if let Some(id) = c.strip_prefix("crio-") {
                    (Some(container_id(id)?), Some(Runtime::Crio))
                } else if let Some((rt, id)) = scope(c) {
                    (Some(id), rt)
                } else {
                    (Some(container_id(c)?), None)
                }
            }
        };
        return Some(PodRef {
            pod_uid: uid,
            container_id,
            runtime,
            qos,
        });
    }
    // systemd: [...]kubepods.slice/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid>.slice/<scope>
    let mut qos = None;
    for (i, c) in comps.iter().enumerate().skip(start) {
        let Some(base) = c.strip_suffix(".slice") else {
            break;
        };
        if let Some((pre, uid)) = base.rsplit_once("-pod") {
            let uid = pod_uid(uid)?;
            if !pre.split('-').any(|w| w == "kubepods") {
                return None;
            }
            if let Some(q) = pre.rsplit('-').next().and_then(qos_name) {
                qos = Some(q);
            }
            let qos = qos.or_else(|| Some("guaranteed".to_string()));
            let (container_id, runtime) = match comps.get(i + 1) {
                None => (None, None),
                Some(c) => {
                    let (rt, id) = scope(c)?;
                    (Some(id), rt)
                }
            };
            return Some(PodRef {
                pod_uid: uid,
                container_id,
                runtime,
                qos,
            });
        }
        if let Some(q) = base.rsplit('-').next().and_then(qos_name) {
            qos = Some(q);
        }
    }
    None
}

/// A resolved cgroup, with runtime names when CRI knows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorkloadInfo {
    pub cgroup_id: u64,
    /// Relative to the cgroup-v2 root, with a leading `/`.
    pub cgroup_path: String,
    /// Still present in the tree (false after the kernel reported its rmdir).
    pub live: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// From the Kubernetes API only (CRI does not know it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl WorkloadInfo {
    /// The finding contract's `workload` object.
    pub fn to_workload(&self) -> crate::finding::Workload {
        crate::finding::Workload {
            pod_uid: self.pod.as_ref().map(|p| p.pod_uid.clone()),
            namespace: self.namespace.clone(),
            pod: self.pod_name.clone(),
            container_id: self.pod.as_ref().and_then(|p| p.container_id.clone()),
            cgroup_id: self.cgroup_id,
            cgroup_path: Some(self.cgroup_path.clone()),
            service_account: self.service_account.clone(),
            labels: self.labels.clone(),
        }
    }
}

struct Known {
    path: String,
    removed: Option<Instant>,
}

/// cgroup id -> workload, see the module docs.
pub struct Attributor {
    root: PathBuf,
    known: HashMap<u64, Known>,
    last_rescan: Option<Instant>,
    last_purge: Instant,
    /// How long a removed cgroup stays resolvable.
    pub retention: Duration,
    /// Minimum time between two rescans of the tree on misses.
    pub min_rescan: Duration,
    cri: Option<cri::CriHandle>,
    kube: Option<kubeapi::KubeApiHandle>,
    warned_unparsed: std::collections::HashSet<String>,
}

/// Normalise a path relative to the cgroup-v2 root to `/a/b` form.
fn norm(path: &str) -> String {
    let p = path.trim_end_matches('/');
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

impl Attributor {
    /// `root`: the cgroup-v2 mount (`/sys/fs/cgroup/unified` on hybrid hosts).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Attributor {
            root: root.into(),
            known: HashMap::new(),
            last_rescan: None,
            last_purge: Instant::now(),
            retention: Duration::from_secs(600),
            min_rescan: Duration::from_millis(250),
            cri: None,
            kube: None,
            warned_unparsed: Default::default(),
        }
    }

    /// Enrich with names from the container runtime (see [`cri::CriHandle`]).
    pub fn with_cri(mut self, cri: cri::CriHandle) -> Self {
        self.cri = Some(cri);
        self
    }

    /// Changes of the Kubernetes API data so far (0 without it): when it
    /// moves, cached workloads must be resolved again.
    pub fn enrichment_generation(&self) -> u64 {
        self.kube.as_ref().map_or(0, |k| k.generation())
    }

    /// Service accounts and labels from the Kubernetes API (see
    /// [`kubeapi::KubeApiHandle`]); `None`: without.
    pub fn with_kube_api(mut self, kube: Option<kubeapi::KubeApiHandle>) -> Self {
        self.kube = kube;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of cached cgroups (live and recently removed).
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The kernel reported `mkdir` of a cgroup-v2 directory.
    pub fn observe_mkdir(&mut self, id: u64, path: &str) {
        self.known.insert(
            id,
            Known {
                path: norm(path),
                removed: None,
            },
        );
        self.purge();
    }

    /// The kernel reported `rmdir`; the entry stays for `retention`.
    pub fn observe_rmdir(&mut self, id: u64) {
        if let Some(k) = self.known.get_mut(&id) {
            k.removed.get_or_insert_with(Instant::now);
        }
        self.purge();
    }

    fn purge(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_purge) < Duration::from_secs(5) {
            return;
        }
        self.last_purge = now;
        let retention = self.retention;
        self.known
            .retain(|_, k| k.removed.is_none_or(|t| now.duration_since(t) < retention));
    }

    /// Walk the cgroup-v2 tree: every directory's inode is its cgroup id.
    /// Entries no longer in the tree are marked removed (they stay for
    /// `retention`), in case an rmdir event was lost.
    pub fn rescan(&mut self) {
        let found = walk_cgroups(&self.root);
        let now = Instant::now();
        for k in self
            .known
            .iter_mut()
            .filter(|(id, _)| !found.contains_key(id))
            .map(|(_, k)| k)
        {
            k.removed.get_or_insert(now);
        }
        for (id, path) in found {
            self.known.insert(
                id,
                Known {
                    path,
                    removed: None,
                },
            );
        }
        self.last_rescan = Some(now);
    }

    /// The cgroup's path, rescanning the tree on a miss (rate-limited).
    pub fn path_of(&mut self, id: u64) -> Option<(String, bool)> {
        if !self.known.contains_key(&id)
            && self
                .last_rescan
                .is_none_or(|t| t.elapsed() >= self.min_rescan)
        {
            self.rescan();
        }
        self.known
            .get(&id)
            .map(|k| (k.path.clone(), k.removed.is_none()))
    }

    /// Who cgroup `id` is. `None` only for an id never seen in the tree.
    pub fn resolve(&mut self, id: u64) -> Option<WorkloadInfo> {
        let (path, live) = self.path_of(id)?;
        let pod = parse_cgroup_path(&path);
        if pod.is_none() && looks_like_pod(&path) && self.warned_unparsed.insert(path.clone()) {
            warn!(cgroup = %path, id, "cgroup path under kubepods matches no known layout; not attributed to a pod");
        }
        let mut info = WorkloadInfo {
            cgroup_id: id,
            cgroup_path: path,
            live,
            pod,
            ..Default::default()
        };
        if let Some(pod) = info.pod.clone() {
            // CRI first: the API then overrides service account and labels
            // and fills only the names CRI left empty.
            if let Some(cri) = &self.cri {
                cri.enrich(&pod, &mut info);
            }
            if let Some(kube) = &self.kube {
                kube.enrich(&pod.pod_uid, &mut info);
            }
        }
        Some(info)
    }
}

fn looks_like_pod(path: &str) -> bool {
    path.contains("kubepods") && path.contains("pod")
}

/// id -> `/relative/path` of every directory of a cgroup-v2 tree.
pub fn walk_cgroups(root: &Path) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                // Removed while we walk: normal churn.
                debug!(dir = %dir.display(), error = %e, "cgroup walk");
                continue;
            }
        };
        if let Ok(md) = std::fs::metadata(&dir) {
            out.insert(
                md.ino(),
                if rel.is_empty() {
                    "/".to_string()
                } else {
                    rel.clone()
                },
            );
        }
        for ent in rd.flatten() {
            if !ent.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = ent.file_name().to_string_lossy().into_owned();
            stack.push((ent.path(), format!("{rel}/{name}")));
        }
    }
    out
}

/// Every pod cgroup under a cgroup-v2 root, sorted by path.
pub fn workloads_under(root: &Path) -> Vec<WorkloadInfo> {
    let mut v: Vec<WorkloadInfo> = walk_cgroups(root)
        .into_iter()
        .filter_map(|(id, path)| {
            let pod = parse_cgroup_path(&path)?;
            Some(WorkloadInfo {
                cgroup_id: id,
                cgroup_path: path,
                live: true,
                pod: Some(pod),
                ..Default::default()
            })
        })
        .collect();
    v.sort_by(|a, b| a.cgroup_path.cmp(&b.cgroup_path));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b5f4a0c-1d2e-4f3a-9b8c-7d6e5f4a3b2c";
    const UID_: &str = "0b5f4a0c_1d2e_4f3a_9b8c_7d6e5f4a3b2c";
    const CID: &str = "3f1c2b9a8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c6b5a4938271605f4e3d";

    fn pr(container: Option<&str>, rt: Option<Runtime>, qos: &str) -> Option<PodRef> {
        Some(PodRef {
            pod_uid: UID.into(),
            container_id: container.map(Into::into),
            runtime: rt,
            qos: Some(qos.into()),
        })
    }

    #[test]
    fn cgroupfs_layout() {
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/{CID}")),
            pr(Some(CID), None, "besteffort")
        );
        assert_eq!(
            parse_cgroup_path(&format!("kubepods/burstable/pod{UID}/{CID}")),
            pr(Some(CID), None, "burstable")
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID}/{CID}")),
            pr(Some(CID), None, "guaranteed")
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID}")),
            pr(None, None, "guaranteed")
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/")),
            pr(None, None, "besteffort")
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/crio-{CID}")),
            pr(Some(CID), Some(Runtime::Crio), "besteffort")
        );
        // A container's own sub-cgroups and a kubelet --cgroup-root prefix.
        assert_eq!(
            parse_cgroup_path(&format!(
                "/kubelet/kubepods/burstable/pod{UID}/{CID}/init.scope"
            )),
            pr(Some(CID), None, "burstable")
        );
        // Static pod: 32 hex digits.
        let s = parse_cgroup_path("/kubepods/burstable/pod8d5d9d1c6f3f0a7f2b1e4c3d2a1b0c9d/abc")
            .unwrap();
        assert_eq!(s.pod_uid, "8d5d9d1c6f3f0a7f2b1e4c3d2a1b0c9d");
    }

    #[test]
    fn systemd_layout() {
        for (prefix, rt) in [
            ("cri-containerd", Runtime::Containerd),
            ("crio", Runtime::Crio),
            ("docker", Runtime::Docker),
        ] {
            let p = format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/{prefix}-{CID}.scope");
            assert_eq!(
                parse_cgroup_path(&p),
                pr(Some(CID), Some(rt), "besteffort"),
                "{p}"
            );
        }
        let p = format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope");
        assert_eq!(
            parse_cgroup_path(&p),
            pr(Some(CID), Some(Runtime::Containerd), "guaranteed")
        );
        let p =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        assert_eq!(parse_cgroup_path(&p), pr(None, None, "burstable"));
        // kind / kubelet --cgroup-root=/kubelet with the systemd driver.
        let p = format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope");
        assert_eq!(
            parse_cgroup_path(&p),
            pr(Some(CID), Some(Runtime::Containerd), "besteffort")
        );
        // CRI-O's conmon scope belongs to the container's pod.
        let p = format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{CID}.scope");
        assert_eq!(
            parse_cgroup_path(&p).unwrap().container_id.as_deref(),
            Some(CID)
        );
        // Sub-cgroup of a container scope.
        let p = format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope/init");
        assert_eq!(
            parse_cgroup_path(&p),
            pr(Some(CID), Some(Runtime::Containerd), "besteffort")
        );
    }

    #[test]
    fn garbage_is_none() {
        for p in [
            "",
            "/",
            "//",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods",
            "/kubepods/besteffort",
            "/kubepods/besteffort/podnot-a-uid/abc",
            "/kubepods/besteffort/pod/abc",
            &format!("/kubepods/besteffort/{UID}/abc"),
            &format!("/kubepods/besteffort/pod{UID}x/abc"),
            &format!("/kubepods/besteffort/pod{UID}/../../etc"),
            &format!("/kubepods/besteffort/pod{UID}/a b"),
            &format!("/kubepods/besteffort/pod{UID}/{}", "a".repeat(200)),
            "/kubepods.slice",
            "/kubepods.slice/kubepods-besteffort.slice",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podzzzz.slice/cri-containerd-abc.scope",
            &format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-.scope"),
            &format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/notascope"),
            &format!("/system.slice/foo-pod{UID_}.slice/docker-{CID}.scope"),
            "/kubepods/besteffort/pod\u{e9}\u{e9}/x",
            "kubepods-pod.slice",
        ] {
            assert_eq!(parse_cgroup_path(p), None, "{p:?}");
        }
    }

    #[test]
    fn attributor_keeps_removed_cgroups_for_a_while() {
        let mut a = Attributor::new("/nonexistent-cgroup-root");
        a.observe_mkdir(7, &format!("kubepods/besteffort/pod{UID}/{CID}"));
        a.observe_rmdir(7);
        let w = a.resolve(7).unwrap();
        assert_eq!(
            w.cgroup_path,
            format!("/kubepods/besteffort/pod{UID}/{CID}")
        );
        assert!(!w.live);
        assert_eq!(w.to_workload().pod_uid.as_deref(), Some(UID));
        assert_eq!(w.to_workload().container_id.as_deref(), Some(CID));
        a.retention = Duration::ZERO;
        a.last_purge = Instant::now() - Duration::from_secs(10);
        a.observe_rmdir(8);
        assert!(a.resolve(7).is_none());
        a.observe_mkdir(9, "/system.slice/sshd.service");
        let w = a.resolve(9).unwrap();
        assert!(w.pod.is_none() && w.live);
    }
}
