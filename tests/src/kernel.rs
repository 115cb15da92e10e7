//! Looking at the kernel objects a daemon process owns: its BPF programs and
//! maps (through /proc/<pid>/fdinfo), so tests can check map contents and
//! that nothing stays attached after the daemon dies.

use std::collections::BTreeSet;

use aya::maps::{HashMap, Map, MapData, MapInfo};
use detector_common::{CredentialInfo, CredentialKey, Holder};

fn fdinfo_ids(pid: u32, key: &str) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix(key) {
                if let Ok(id) = v.trim().parse() {
                    ids.insert(id);
                }
            }
        }
    }
    ids
}

/// Ids of the BPF programs `pid` holds (program and link fds).
pub fn program_ids_of(pid: u32) -> BTreeSet<u32> {
    fdinfo_ids(pid, "prog_id:")
}

/// Names of the BPF programs `pid` holds.
pub fn program_names_of(pid: u32) -> BTreeSet<String> {
    let ids = program_ids_of(pid);
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| ids.contains(&p.id()))
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .collect()
}

/// Does `pid` hold a fanotify group? (Its fdinfo has `fanotify flags:`.)
pub fn has_fanotify_group(pid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path())
            .map(|t| t.contains("fanotify flags:"))
            .unwrap_or(false)
    })
}

/// One mark of a fanotify group, as /proc/<pid>/fdinfo lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FanotifyMark {
    /// `ino:` (hex in fdinfo) with the filesystem's `sdev:`.
    Inode {
        ino: u64,
        ignored_only: bool,
    },
    Mount {
        mnt_id: u64,
    },
    Filesystem,
}

/// The marks of every fanotify group `pid` holds. `ignored_only`: an inode
/// mark that only ignores (mask 0, an ignore mask).
pub fn fanotify_marks_of(pid: u32) -> Vec<FanotifyMark> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("fanotify ") else {
                continue;
            };
            let field = |k: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
            };
            if let Some(ino) = field("ino:") {
                let ignored_only = field("mask:") == Some(0) && field("ignored_mask:") != Some(0);
                out.push(FanotifyMark::Inode { ino, ignored_only });
            } else if let Some(v) = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("mnt_id:"))
            {
                out.push(FanotifyMark::Mount {
                    mnt_id: u64::from_str_radix(v, 16).unwrap_or(0),
                });
            } else if field("sdev:").is_some() {
                out.push(FanotifyMark::Filesystem);
            }
        }
    }
    out
}

/// Ids of the BPF programs loaded in the kernel right now.
pub fn loaded_program_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .map(|p| p.id())
        .collect()
}

fn map_of(pid: u32, name: &str) -> Option<MapData> {
    fdinfo_ids(pid, "map_id:").into_iter().find_map(|id| {
        let info = MapInfo::from_id(id).ok()?;
        (info.name_as_str() == Some(name))
            .then(|| MapData::from_id(id).ok())
            .flatten()
    })
}

/// tgid -> holder entries of the daemon `pid`'s HOLDERS map.
pub fn holders_of(pid: u32) -> std::collections::HashMap<u32, Holder> {
    let data = map_of(pid, "HOLDERS").expect("daemon has a HOLDERS map");
    let map: HashMap<MapData, u32, Holder> =
        HashMap::try_from(Map::LruHashMap(data)).expect("HOLDERS is an LRU hash of u32 -> Holder");
    map.iter().filter_map(|r| r.ok()).collect()
}

/// (kernel dev, ino) -> credential id of the daemon `pid`'s CREDENTIALS map.
pub fn credentials_of(pid: u32) -> std::collections::HashMap<(u64, u64), u32> {
    let data = map_of(pid, "CREDENTIALS").expect("daemon has a CREDENTIALS map");
    let map: HashMap<MapData, CredentialKey, CredentialInfo> =
        HashMap::try_from(Map::HashMap(data)).expect("CREDENTIALS is a hash of key -> info");
    map.iter()
        .filter_map(|r| r.ok())
        .map(|(k, v)| ((k.dev, k.ino), v.id))
        .collect()
}
