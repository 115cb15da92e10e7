//! Process table built from the kernel's fork/exec/exit events (seeded from
//! /proc at start-up): pid -> executable, parent, cgroup. Gives findings the
//! process's exe and its ancestry even when the process is already gone.

use std::{collections::VecDeque, path::Path, sync::Arc};

use crate::{
    correlate::FastMap,
    events::{Event, Exec, Fork},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub ppid: u32,
    /// Absolute executable path when known. Shared: a fork's child runs its
    /// parent's image, and every event of the process asks for it.
    pub exe: Option<Arc<str>>,
    pub comm: String,
    pub cgroup_id: u64,
    /// Boot-time ns of the exit, if it exited.
    pub exited_ns: Option<u64>,
}

/// How long an exited process is remembered (its events may still be queued,
/// and its children's findings name it in their ancestry).
const EXITED_RETENTION_NS: u64 = 60_000_000_000;
/// Hard cap on remembered processes (a fork bomb must not grow us unbounded).
const MAX_PROCS: usize = 200_000;
const MAX_ANCESTRY: usize = 16;

#[derive(Default)]
pub struct ProcessTable {
    procs: FastMap<u32, ProcInfo>,
    exited: VecDeque<(u64, u32)>,
}

/// `readlink /proc/<pid>/exe`, without the " (deleted)" suffix.
pub fn proc_exe(pid: u32) -> Option<String> {
    let p = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let s = p.to_string_lossy();
    Some(s.strip_suffix(" (deleted)").unwrap_or(&s).to_string())
}

fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn proc_comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

impl ProcessTable {
    /// Seed from /proc so processes started before the daemon have names.
    pub fn seed_from_proc(&mut self) {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            self.procs.entry(pid).or_insert_with(|| ProcInfo {
                ppid: proc_ppid(pid).unwrap_or(0),
                exe: proc_exe(pid).map(Arc::from),
                comm: proc_comm(pid),
                cgroup_id: 0,
                exited_ns: None,
            });
        }
    }

    pub fn get(&self, pid: u32) -> Option<&ProcInfo> {
        self.procs.get(&pid)
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Update from a kernel event.
    pub fn observe(&mut self, ev: &Event) {
        match ev {
            Event::Fork(Fork {
                common,
                parent_tgid,
                comm,
                ..
            }) => {
                let exe = self.procs.get(parent_tgid).and_then(|p| p.exe.clone());
                self.insert(
                    common.tgid,
                    ProcInfo {
                        ppid: *parent_tgid,
                        exe,
                        comm: comm.clone(),
                        cgroup_id: common.cgroup_id,
                        exited_ns: None,
                    },
                );
            }
            Event::Exec(Exec {
                common,
                ppid,
                comm,
                filename,
                ..
            }) => {
                // The kernel's filename may be relative ("./x"); /proc has the
                // resolved path while the process lives.
                let exe = if filename.starts_with('/') {
                    Arc::from(filename.as_str())
                } else {
                    Arc::from(proc_exe(common.tgid).as_deref().unwrap_or(filename))
                };
                let e = self.procs.entry(common.tgid).or_default();
                e.exe = Some(exe);
                e.comm.clone_from(comm);
                e.ppid = *ppid;
                e.cgroup_id = common.cgroup_id;
            }
            Event::Exit(x) => {
                if let Some(p) = self.procs.get_mut(&x.common.tgid) {
                    p.exited_ns = Some(x.common.time_ns);
                    self.exited.push_back((x.common.time_ns, x.common.tgid));
                }
                self.expire(x.common.time_ns);
            }
            _ => {}
        }
    }

    fn insert(&mut self, pid: u32, info: ProcInfo) {
        if self.procs.len() >= MAX_PROCS {
            // Drop the oldest exited ones first.
            while self.procs.len() >= MAX_PROCS {
                match self.exited.pop_front() {
                    Some((_, old)) => {
                        self.procs.remove(&old);
                    }
                    None => return,
                }
            }
        }
        self.procs.insert(pid, info);
    }

    fn expire(&mut self, now_ns: u64) {
        while let Some(&(t, pid)) = self.exited.front() {
            if now_ns.saturating_sub(t) < EXITED_RETENTION_NS {
                break;
            }
            self.exited.pop_front();
            // Only if the pid was not reused by a live process since.
            if self.procs.get(&pid).is_some_and(|p| p.exited_ns == Some(t)) {
                self.procs.remove(&pid);
            }
        }
    }

    /// Executable of `pid`: table, then /proc.
    pub fn exe_of(&mut self, pid: u32) -> Option<Arc<str>> {
        if let Some(e) = self.procs.get(&pid).and_then(|p| p.exe.clone()) {
            return Some(e);
        }
        let exe: Arc<str> = Arc::from(proc_exe(pid)?);
        self.procs
            .entry(pid)
            .or_insert_with(|| ProcInfo {
                ppid: proc_ppid(pid).unwrap_or(0),
                comm: proc_comm(pid),
                ..Default::default()
            })
            .exe = Some(exe.clone());
        Some(exe)
    }

    /// Executables of the ancestors of `pid`, nearest first.
    pub fn ancestry(&self, pid: u32) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = self.procs.get(&pid).map(|p| p.ppid).unwrap_or(0);
        while cur > 1 && out.len() < MAX_ANCESTRY {
            let Some(p) = self.procs.get(&cur) else {
                if let Some(exe) = proc_exe(cur) {
                    out.push(exe);
                }
                break;
            };
            out.push(p.exe.as_deref().unwrap_or(&p.comm).to_string());
            if p.ppid == cur {
                break;
            }
            cur = p.ppid;
        }
        out
    }
}

/// True if `exe` is one of `patterns` (exact absolute paths; a trailing `*`
/// matches a prefix, for versioned interpreters like `/usr/bin/python3*`).
pub fn exe_matches(exe: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => exe.starts_with(prefix),
        None => exe == p || Path::new(exe) == Path::new(p),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Common, Exit};

    fn c(tgid: u32, t: u64) -> Common {
        Common {
            time_ns: t,
            pid: tgid,
            tgid,
            cgroup_id: 5,
        }
    }

    #[test]
    fn lineage_from_events() {
        let mut t = ProcessTable::default();
        t.observe(&Event::Exec(Exec {
            common: c(10, 1),
            ppid: 1,
            uid: 0,
            comm: "server".into(),
            filename: "/app/server".into(),
            holder_credential: 0,
        }));
        t.observe(&Event::Fork(Fork {
            common: c(11, 2),
            parent_tgid: 10,
            comm: "server".into(),
            inherited_credential: 1,
        }));
        assert_eq!(
            t.get(11).unwrap().exe.as_deref(),
            Some("/app/server"),
            "a fork runs the parent's image"
        );
        t.observe(&Event::Exec(Exec {
            common: c(11, 3),
            ppid: 10,
            uid: 0,
            comm: "sh".into(),
            filename: "/bin/sh".into(),
            holder_credential: 1,
        }));
        t.observe(&Event::Fork(Fork {
            common: c(12, 4),
            parent_tgid: 11,
            comm: "sh".into(),
            inherited_credential: 1,
        }));
        t.observe(&Event::Exec(Exec {
            common: c(12, 5),
            ppid: 11,
            uid: 0,
            comm: "curl".into(),
            filename: "/usr/bin/curl".into(),
            holder_credential: 1,
        }));
        assert_eq!(
            t.ancestry(12),
            vec!["/bin/sh".to_string(), "/app/server".to_string()]
        );
        t.observe(&Event::Exit(Exit {
            common: c(12, 6),
            holder_credential: 1,
            unreported_reads: 0,
        }));
        assert!(t.get(12).is_some(), "kept after exit for late events");
        t.observe(&Event::Exit(Exit {
            common: c(11, 6 + EXITED_RETENTION_NS + 1),
            holder_credential: 1,
            unreported_reads: 0,
        }));
        assert!(t.get(12).is_none(), "expired after retention");
    }

    #[test]
    fn exe_patterns() {
        let pats = vec!["/app/server".to_string(), "/usr/bin/python3*".to_string()];
        assert!(exe_matches("/app/server", &pats));
        assert!(exe_matches("/usr/bin/python3.11", &pats));
        assert!(!exe_matches("/bin/sh", &pats));
        assert!(!exe_matches("/app/server2", &pats));
    }
}
