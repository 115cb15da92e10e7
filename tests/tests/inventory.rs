//! Credential inventory against a kubelet-exact node layout on tmpfs:
//! projected volumes on their own tmpfs mounts, atomic-writer rotation
//! (`..<timestamp>` dir, `..data_tmp` renamed over `..data`, old dir
//! removed), pod removal, cloud workload-identity files, hostile state.
//! The watcher is tested as a library (as the daemon uses it).

use std::{
    os::unix::fs::{symlink, MetadataExt, PermissionsExt},
    path::Path,
    time::{Duration, Instant},
};

use detector::inventory::{
    scan, spawn_watcher, CredentialFile, CredentialKind, InventoryConfig, InventoryUpdate,
};
use detector_tests::{
    require_root,
    runc::{kubelet_atomic_write, new_pod_uid},
    Tmpfs, TmpfsOn,
};
use tokio::sync::mpsc::Receiver;

const PROJECTED: &str = "kubernetes.io~projected";

fn sa_files(token: &str) -> Vec<(&str, &str)> {
    vec![
        ("token", token),
        ("ca.crt", "-----BEGIN CERTIFICATE-----"),
        ("namespace", "default"),
    ]
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

async fn next(rx: &mut Receiver<InventoryUpdate>, within: Duration) -> Option<InventoryUpdate> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

fn upsert(u: Option<InventoryUpdate>) -> CredentialFile {
    match u {
        Some(InventoryUpdate::Upsert(f)) => f,
        other => panic!("expected an Upsert, got {other:?}"),
    }
}

fn remove(u: Option<InventoryUpdate>) -> CredentialFile {
    match u {
        Some(InventoryUpdate::Remove(f)) => f,
        other => panic!("expected a Remove, got {other:?}"),
    }
}

#[tokio::test]
async fn kubelet_rotation_and_pod_removal() {
    require_root();
    let kubelet = Tmpfs::new("kubelet");
    std::fs::create_dir(kubelet.dir.join("pods")).unwrap();
    let grace = Duration::from_secs(2);
    let cfg = InventoryConfig {
        rotation_grace: grace,
        // Only inotify and the mount table may drive this test.
        rescan_interval: Duration::from_secs(3600),
        ..InventoryConfig::new(&kubelet.dir)
    };
    let mut rx = spawn_watcher(cfg);
    assert_eq!(
        next(&mut rx, Duration::from_secs(5)).await,
        Some(InventoryUpdate::Synced)
    );

    // A pod appears: kubelet makes the volume dir, mounts a tmpfs on it, writes.
    let uid = new_pod_uid();
    let vol = kubelet
        .dir
        .join("pods")
        .join(&uid)
        .join("volumes")
        .join(PROJECTED)
        .join("kube-api-access-7x2kq");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::create_dir_all(kubelet.dir.join("pods").join(&uid).join("containers/app")).unwrap();
    let mount = TmpfsOn::mount(&vol);
    let t = Instant::now();
    kubelet_atomic_write(&vol, &sa_files("token-1"));
    let ino1 = ino(&vol.join("token"));
    let f1 = upsert(next(&mut rx, Duration::from_secs(1)).await);
    eprintln!("new pod's token seen after {:?}", t.elapsed());
    assert_eq!(f1.ino, ino1);
    assert_eq!(f1.dev, std::fs::metadata(vol.join("token")).unwrap().dev());
    assert_eq!(f1.kind, CredentialKind::KubernetesServiceAccount);
    assert_eq!(f1.owner_pod_uid.as_deref(), Some(uid.as_str()));
    assert_eq!(f1.volume.as_deref(), Some("kube-api-access-7x2kq"));
    assert_eq!(f1.path, vol.join("token"));

    // Rotation, twice: each new inode within a second, each old one kept for the grace.
    let mut old = ino1;
    for round in 2..=3 {
        let t = Instant::now();
        kubelet_atomic_write(&vol, &sa_files(&format!("token-{round}")));
        let new = ino(&vol.join("token"));
        assert_ne!(new, old);
        let f = upsert(next(&mut rx, Duration::from_secs(1)).await);
        let seen = t.elapsed();
        eprintln!("rotation {round}: new inode seen after {seen:?}");
        assert_eq!(
            (f.ino, f.owner_pod_uid.as_deref()),
            (new, Some(uid.as_str()))
        );
        // Nothing else until the grace is nearly over: the old inode stays.
        let quiet = grace
            .saturating_sub(t.elapsed())
            .saturating_sub(Duration::from_millis(150));
        assert_eq!(
            next(&mut rx, quiet).await,
            None,
            "old inode removed before its grace"
        );
        let r = remove(next(&mut rx, Duration::from_millis(1500)).await);
        let at = t.elapsed();
        eprintln!("rotation {round}: old inode removed after {at:?}");
        assert_eq!(r.ino, old);
        assert!(at >= grace, "removed after {at:?} < grace {grace:?}");
        old = new;
    }

    // The pod goes: kubelet unmounts and removes the pod dir.
    let t = Instant::now();
    drop(mount);
    std::fs::remove_dir_all(kubelet.dir.join("pods").join(&uid)).unwrap();
    let r = remove(next(&mut rx, grace + Duration::from_millis(1500)).await);
    assert_eq!(r.ino, old);
    assert!(t.elapsed() >= grace);
    // Nothing stale, nothing more.
    assert_eq!(next(&mut rx, Duration::from_secs(1)).await, None);
    let (files, warnings) = scan(&InventoryConfig::new(&kubelet.dir));
    assert!(
        files.is_empty() && warnings.is_empty(),
        "{files:?} {warnings:?}"
    );
}

#[tokio::test]
async fn existing_pods_cloud_identity_and_legacy_tokens() {
    require_root();
    let kubelet = Tmpfs::new("kubelet-cloud");
    let uid = new_pod_uid();
    let vols = kubelet.dir.join("pods").join(&uid).join("volumes");
    let mk = |plugin: &str, vol: &str| {
        let d = vols.join(plugin).join(vol);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    kubelet_atomic_write(&mk(PROJECTED, "kube-api-access-abcde"), &sa_files("sa"));
    kubelet_atomic_write(&mk(PROJECTED, "aws-iam-token"), &[("token", "irsa")]);
    kubelet_atomic_write(
        &mk(PROJECTED, "azure-identity-token"),
        &[("azure-identity-token", "az")],
    );
    kubelet_atomic_write(
        &mk(PROJECTED, "gcp-ksa"),
        &[
            ("token", "g"),
            ("google-application-credentials.json", "{}"),
        ],
    );
    kubelet_atomic_write(
        &mk("kubernetes.io~secret", "default-token-x9z"),
        &sa_files("legacy"),
    );
    std::fs::write(
        mk("kubernetes.io~empty-dir", "home-sidecar").join(".vault-token"),
        "s.x",
    )
    .unwrap();
    std::fs::write(
        mk("kubernetes.io~empty-dir", "vault-secrets").join("db-creds"),
        "pw",
    )
    .unwrap();
    // Not credentials: a configmap, a big cache emptyDir, ca.crt/namespace.
    kubelet_atomic_write(
        &mk("kubernetes.io~configmap", "cfg"),
        &[("token", "not-a-secret")],
    );
    let cache = mk("kubernetes.io~empty-dir", "cache");
    for i in 0..200 {
        std::fs::write(cache.join(format!("f{i}")), "x").unwrap();
    }
    let extra = kubelet.dir.join("host-agent-token");
    std::fs::write(&extra, "h").unwrap();
    let custom = mk("kubernetes.io~empty-dir", "creds");
    std::fs::write(custom.join("app.json"), "{}").unwrap();

    let cfg = InventoryConfig {
        extra_files: vec![extra.clone()],
        extra_globs: vec!["kubernetes.io~empty-dir/creds/*.json".into()],
        ..InventoryConfig::new(&kubelet.dir)
    };
    let (files, warnings) = scan(&cfg);
    assert!(warnings.is_empty(), "{warnings:?}");
    let mut kinds: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            (
                f.kind.as_str().to_string(),
                f.path
                    .strip_prefix(&kubelet.dir)
                    .unwrap()
                    .display()
                    .to_string(),
            )
        })
        .collect();
    kinds.sort();
    let p = |rest: &str| format!("pods/{uid}/volumes/{rest}");
    let mut want = vec![
        (
            "aws-web-identity".to_string(),
            p("kubernetes.io~projected/aws-iam-token/token"),
        ),
        (
            "azure-workload-identity".into(),
            p("kubernetes.io~projected/azure-identity-token/azure-identity-token"),
        ),
        ("custom".into(), "host-agent-token".into()),
        ("custom".into(), p("kubernetes.io~empty-dir/creds/app.json")),
        (
            "gcp-workload-identity".into(),
            p("kubernetes.io~projected/gcp-ksa/google-application-credentials.json"),
        ),
        (
            "gcp-workload-identity".into(),
            p("kubernetes.io~projected/gcp-ksa/token"),
        ),
        (
            "kubernetes-secret-token".into(),
            p("kubernetes.io~secret/default-token-x9z/token"),
        ),
        (
            "kubernetes-serviceaccount".into(),
            p("kubernetes.io~projected/kube-api-access-abcde/token"),
        ),
        (
            "vault-agent".into(),
            p("kubernetes.io~empty-dir/home-sidecar/.vault-token"),
        ),
        (
            "vault-agent".into(),
            p("kubernetes.io~empty-dir/vault-secrets/db-creds"),
        ),
    ];
    want.sort();
    assert_eq!(kinds, want);
    for f in &files {
        assert_eq!(f.ino, ino(&f.path), "{f:?}");
        let owned = f.path != extra;
        assert_eq!(f.owner_pod_uid.is_some(), owned, "{f:?}");
    }

    // The watcher reports the same set, then Synced.
    let mut rx = spawn_watcher(cfg);
    let mut seen = Vec::new();
    loop {
        match next(&mut rx, Duration::from_secs(5)).await {
            Some(InventoryUpdate::Upsert(f)) => seen.push(f.ino),
            Some(InventoryUpdate::Synced) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.sort();
    let mut all: Vec<u64> = files.iter().map(|f| f.ino).collect();
    all.sort();
    assert_eq!(seen, all);
}

#[tokio::test]
async fn hostile_node_state_gives_warnings_not_failures() {
    require_root();
    let kubelet = Tmpfs::new("kubelet-hostile");
    let pods = kubelet.dir.join("pods");
    let good_uid = new_pod_uid();
    let good = pods
        .join(&good_uid)
        .join("volumes")
        .join(PROJECTED)
        .join("kube-api-access-ok");
    std::fs::create_dir_all(&good).unwrap();
    kubelet_atomic_write(&good, &sa_files("ok"));
    // An unreadable token is still a credential (it is read by the pod via
    // its own permissions; we only stat it).
    let locked_uid = new_pod_uid();
    let locked = pods
        .join(&locked_uid)
        .join("volumes")
        .join(PROJECTED)
        .join("kube-api-access-locked");
    std::fs::create_dir_all(&locked).unwrap();
    kubelet_atomic_write(&locked, &sa_files("locked"));
    std::fs::set_permissions(
        std::fs::canonicalize(locked.join("token")).unwrap(),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();

    let bad = pods.join(new_pod_uid()).join("volumes").join(PROJECTED);
    // Symlink loop.
    let l = bad.join("loop");
    std::fs::create_dir_all(&l).unwrap();
    symlink("token2", l.join("token")).unwrap();
    symlink("token", l.join("token2")).unwrap();
    // Token path that is a directory.
    std::fs::create_dir_all(bad.join("dir").join("token")).unwrap();
    // Token escaping its volume.
    std::fs::create_dir_all(bad.join("escape")).unwrap();
    symlink("/etc/passwd", bad.join("escape").join("token")).unwrap();
    // Dangling ..data.
    std::fs::create_dir_all(bad.join("dangling")).unwrap();
    symlink(
        "..2020_01_01_00_00_00.000000000",
        bad.join("dangling").join("..data"),
    )
    .unwrap();
    symlink("..data/token", bad.join("dangling").join("token")).unwrap();
    // Weird names: newline, spaces, non-UTF-8.
    std::fs::create_dir_all(bad.join("we ird\nname")).unwrap();
    {
        use std::os::unix::ffi::OsStrExt;
        std::fs::create_dir_all(bad.join(std::ffi::OsStr::from_bytes(b"bad\xffutf8"))).unwrap();
    }
    // A pod "dir" that is a file, one that is a symlink to /, a garbage UID,
    // a volumes dir that is a symlink.
    std::fs::write(pods.join(new_pod_uid()), "not a dir").unwrap();
    symlink("/", pods.join(new_pod_uid())).unwrap();
    std::fs::create_dir_all(pods.join("..;rm -rf").join("volumes")).unwrap();
    let sym_vols = pods.join(new_pod_uid());
    std::fs::create_dir_all(&sym_vols).unwrap();
    symlink("/var/lib", sym_vols.join("volumes")).unwrap();

    let cfg = InventoryConfig {
        extra_files: vec![kubelet.dir.join("missing-file"), kubelet.dir.join("pods")],
        extra_globs: vec!["[unclosed".into()],
        ..InventoryConfig::new(&kubelet.dir)
    };
    let (files, warnings) = scan(&cfg);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let mut owners: Vec<&str> = files
        .iter()
        .filter_map(|f| f.owner_pod_uid.as_deref())
        .collect();
    owners.sort();
    let mut want = vec![good_uid.as_str(), locked_uid.as_str()];
    want.sort();
    assert_eq!(owners, want, "{files:?}");
    let has = |s: &str| warnings.iter().any(|w| w.contains(s));
    assert!(has("symlink loop"), "{warnings:?}");
    assert!(has("is a directory"), "{warnings:?}");
    assert!(has("outside its volume"), "{warnings:?}");
    assert!(has("non-UTF-8"), "{warnings:?}");
    assert!(has("is not a directory"), "{warnings:?}");
    assert!(
        has("is a symlink where kubelet keeps a directory"),
        "{warnings:?}"
    );
    assert!(has("not a pod UID"), "{warnings:?}");
    assert!(has("bad credential glob"), "{warnings:?}");
    assert!(has("missing-file"), "{warnings:?}");
    assert!(
        has("cannot resolve credential path") || has("dangling"),
        "{warnings:?}"
    );

    // The watcher lives with it and still follows the good pod.
    let mut rx = spawn_watcher(InventoryConfig {
        rotation_grace: Duration::from_millis(100),
        ..cfg
    });
    let mut n = 0;
    loop {
        match next(&mut rx, Duration::from_secs(5)).await {
            Some(InventoryUpdate::Upsert(_)) => n += 1,
            Some(InventoryUpdate::Synced) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(n, 2);
    kubelet_atomic_write(&good, &sa_files("ok-2"));
    let f = upsert(next(&mut rx, Duration::from_secs(1)).await);
    assert_eq!(f.owner_pod_uid.as_deref(), Some(good_uid.as_str()));
    let r = remove(next(&mut rx, Duration::from_secs(2)).await);
    assert_eq!(r.owner_pod_uid.as_deref(), Some(good_uid.as_str()));
}

#[tokio::test]
async fn no_kubelet_dir_then_kubelet_starts() {
    require_root();
    let base = Tmpfs::new("kubelet-late");
    let kubelet = base.dir.join("kubelet");
    let (files, warnings) = scan(&InventoryConfig::new(&kubelet));
    assert!(files.is_empty() && warnings.is_empty());
    let mut rx = spawn_watcher(InventoryConfig {
        rescan_interval: Duration::from_secs(3600),
        ..InventoryConfig::new(&kubelet)
    });
    assert_eq!(
        next(&mut rx, Duration::from_secs(5)).await,
        Some(InventoryUpdate::Synced)
    );
    let uid = new_pod_uid();
    let vol = kubelet
        .join("pods")
        .join(&uid)
        .join("volumes")
        .join(PROJECTED)
        .join("kube-api-access-late");
    std::fs::create_dir_all(&vol).unwrap();
    kubelet_atomic_write(&vol, &sa_files("late"));
    // The kubelet dir appearing is seen through the parent dir's watch,
    // then the pods dir; allow for the cascade of rescans.
    let f = upsert(next(&mut rx, Duration::from_secs(2)).await);
    assert_eq!(f.owner_pod_uid.as_deref(), Some(uid.as_str()));
}
