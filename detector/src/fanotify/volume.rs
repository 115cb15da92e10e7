//! Is a credential on a filesystem of its own? Kubelet mounts every
//! projected and secret volume as a separate tmpfs at the volume directory
//! (`<kubelet>/pods/<uid>/volumes/<plugin>/<volume>`). Such a filesystem
//! holds nothing but that volume, so a `FAN_MARK_FILESYSTEM` mark on it
//! costs nothing elsewhere and covers a rotated token's new inode from its
//! creation on, before the inventory has seen it.

use std::{
    ffi::OsStr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::inventory::CredentialFile;

/// The volume directory of `f` when it is the root of a tmpfs mount, as
/// kubelet sets it up; `None` for anything else (a credential on a shared
/// filesystem gets an inode mark instead).
pub fn dedicated_tmpfs(f: &CredentialFile) -> Option<PathBuf> {
    f.owner_pod_uid.as_ref()?;
    let vol = f.volume.as_deref()?;
    let dir = volume_dir(&f.path, vol)?;
    let here = std::fs::metadata(&dir).ok()?;
    let parent = std::fs::metadata(dir.parent()?).ok()?;
    // A mount point, and the credential's own filesystem.
    if here.dev() == parent.dev() || here.dev() != f.dev {
        return None;
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let canon = std::fs::canonicalize(&dir).ok()?;
    is_whole_tmpfs_at(&mountinfo, &canon).then_some(dir)
}

/// The volume directory `dir` as kubelet sees it, so that a mount mark
/// lands on kubelet's mount, not on the copy that mount propagation made
/// in our mount namespace (a DaemonSet's `hostPath`): through the root of
/// a process named `kubelet`, else of the host's init (pid 1; both visible
/// with `hostPID`). `dir` itself when neither path is the same directory
/// (no `hostPID`, no access, or a kubelet directory mounted elsewhere):
/// `Err` then, with that path.
pub fn writer_view(dir: &Path) -> Result<PathBuf, PathBuf> {
    let rel = dir.strip_prefix("/").unwrap_or(dir);
    let Ok(want) = std::fs::metadata(dir) else {
        return Err(dir.to_path_buf());
    };
    pids_named("kubelet")
        .into_iter()
        .chain([1])
        .map(|pid| PathBuf::from(format!("/proc/{pid}/root")).join(rel))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == (want.dev(), want.ino()))
        })
        .ok_or_else(|| dir.to_path_buf())
}

/// Processes whose `comm` is `name`.
fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .collect()
}

/// `…/volumes/<plugin>/<vol>/…/file` -> `…/volumes/<plugin>/<vol>`.
fn volume_dir(path: &Path, vol: &str) -> Option<PathBuf> {
    let mut p = path.parent();
    while let Some(d) = p {
        if d.file_name() == Some(OsStr::new(vol))
            && d.parent()?.parent()?.file_name() == Some(OsStr::new("volumes"))
        {
            return Some(d.to_path_buf());
        }
        p = d.parent();
    }
    None
}

/// Does `mountinfo` have a tmpfs mounted at `dir` with its filesystem root
/// as the mount's root (not a bind mount of a subdirectory of a larger
/// tmpfs)? The last mount at `dir` is the visible one.
fn is_whole_tmpfs_at(mountinfo: &str, dir: &Path) -> bool {
    let mut found = None;
    for line in mountinfo.lines() {
        let mut f = line.split(' ');
        let (Some(_), Some(_), Some(_), Some(root), Some(point)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let fstype = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split(' ').next());
        if Path::new(&unescape(point)) == dir {
            found = Some(root == "/" && fstype == Some("tmpfs"));
        }
    }
    found.unwrap_or(false)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_volume_directory() {
        let p = Path::new(
            "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/kube-api-access-x/token",
        );
        assert_eq!(
            volume_dir(p, "kube-api-access-x").as_deref(),
            Some(Path::new(
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/kube-api-access-x"
            ))
        );
        let nested = Path::new("/k/pods/u/volumes/kubernetes.io~empty-dir/vault-secrets/a/b");
        assert!(volume_dir(nested, "vault-secrets").is_some());
        assert_eq!(volume_dir(Path::new("/etc/token"), "x"), None);
        assert_eq!(
            volume_dir(Path::new("/x/kube-api-access-x/token"), "kube-api-access-x"),
            None,
            "not under volumes/<plugin>/"
        );
    }

    #[test]
    fn whole_tmpfs_mounts_only() {
        let mi = "\
36 25 0:32 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~projected/a rw,relatime shared:1 - tmpfs tmpfs rw,size=1024k
37 25 0:33 /sub /var/lib/kubelet/pods/u/volumes/kubernetes.io~projected/b rw - tmpfs tmpfs rw
38 25 8:1 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~projected/c rw - ext4 /dev/sda1 rw
39 25 0:34 / /k/with\\040space rw - tmpfs tmpfs rw
";
        let v =
            |s: &str| Path::new("/var/lib/kubelet/pods/u/volumes/kubernetes.io~projected").join(s);
        assert!(is_whole_tmpfs_at(mi, &v("a")));
        assert!(!is_whole_tmpfs_at(mi, &v("b")), "a bind of a subdirectory");
        assert!(!is_whole_tmpfs_at(mi, &v("c")), "not a tmpfs");
        assert!(!is_whole_tmpfs_at(mi, &v("d")), "not a mount");
        assert!(is_whole_tmpfs_at(mi, Path::new("/k/with space")));
        // A later mount over the same point wins.
        let over = format!(
            "{mi}40 36 8:1 / {} rw - ext4 /dev/sda1 rw\n",
            v("a").display()
        );
        assert!(!is_whole_tmpfs_at(&over, &v("a")));
    }
}
