//! Decoding of ring-buffer records into typed events.
//!
//! The kernel writes `#[repr(C)]` records from `detector-common`. Each record
//! is checked for its kind and exact length, copied out with
//! `read_unaligned` (every field is an integer or byte array, so any bit
//! pattern is a valid value), then turned into typed Rust values; unknown
//! enum values are errors, never casts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use detector_common as common;
use detector_common::{
    c_str_bytes, AccessRoute, EgressHook, EventHeader, EventKind, Verdict, VerdictReason, AF_INET,
    AF_INET6, IPPROTO_TCP, IPPROTO_UDP,
};
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    #[error("{kind} record has {got} bytes, expected {want}")]
    Length {
        kind: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{field} has unknown value {value}")]
    BadValue { field: &'static str, value: u64 },
}

/// Fields every event has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Common {
    /// Boot-time clock (ns) when the kernel saw it.
    pub time_ns: u64,
    pub pid: u32,
    pub tgid: u32,
    pub cgroup_id: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CredentialAccess {
    #[serde(flatten)]
    pub common: Common,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub credential_id: u32,
    pub dev: u64,
    pub ino: u64,
    /// The syscall that produced the descriptor.
    pub route: &'static str,
    pub fd: i32,
    pub readable: bool,
    pub writable: bool,
    /// Earlier opens by the same process that the kernel aggregated into this
    /// report; the opens it stands for are `1 + repeats`.
    pub repeats: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Exec {
    #[serde(flatten)]
    pub common: Common,
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
    /// The path given to execve (may be relative); empty if unreadable.
    pub filename: String,
    pub holder_credential: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fork {
    #[serde(flatten)]
    pub common: Common,
    pub parent_tgid: u32,
    pub comm: String,
    pub inherited_credential: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Exit {
    #[serde(flatten)]
    pub common: Common,
    pub holder_credential: u32,
    /// Opens of `holder_credential` aggregated but never reported before exit.
    pub unreported_reads: u32,
}

/// A cgroup-v2 directory was created or removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cgroup {
    #[serde(flatten)]
    pub common: Common,
    /// The cgroup's id (inode of its cgroup-v2 directory).
    pub id: u64,
    pub level: i32,
    /// Path relative to the cgroup-v2 root.
    pub path: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
    Other,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Other => "other",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Connect {
    #[serde(flatten)]
    pub common: Common,
    pub comm: String,
    /// IPv4-mapped IPv6 destinations arrive here as IPv4.
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub hook: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub holder_credential: u32,
    #[serde(skip)]
    pub verdict_typed: Verdict,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    CredentialAccess(CredentialAccess),
    Exec(Exec),
    Fork(Fork),
    Exit(Exit),
    Connect(Connect),
    CgroupMkdir(Cgroup),
    CgroupRmdir(Cgroup),
}

impl Event {
    pub fn common(&self) -> &Common {
        match self {
            Event::CredentialAccess(e) => &e.common,
            Event::Exec(e) => &e.common,
            Event::Fork(e) => &e.common,
            Event::Exit(e) => &e.common,
            Event::Connect(e) => &e.common,
            Event::CgroupMkdir(e) | Event::CgroupRmdir(e) => &e.common,
        }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Event::CredentialAccess(_) => EventKind::CredentialAccess,
            Event::Exec(_) => EventKind::Exec,
            Event::Fork(_) => EventKind::Fork,
            Event::Exit(_) => EventKind::Exit,
            Event::Connect(_) => EventKind::Connect,
            Event::CgroupMkdir(_) => EventKind::CgroupMkdir,
            Event::CgroupRmdir(_) => EventKind::CgroupRmdir,
        }
    }
}

fn read_exact<T: Copy>(bytes: &[u8], kind: &'static str) -> Result<T, DecodeError> {
    let want = std::mem::size_of::<T>();
    if bytes.len() != want {
        return Err(DecodeError::Length {
            kind,
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: the length is checked above and `T` is one of the
    // `detector-common` records, made only of integers and byte arrays, for
    // which every bit pattern is valid; `read_unaligned` needs no alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(c_str_bytes(bytes)).into_owned()
}

fn common(h: &EventHeader) -> Common {
    Common {
        time_ns: h.time_ns,
        pid: h.pid,
        tgid: h.tgid,
        cgroup_id: h.cgroup_id,
    }
}

/// Decode one ring-buffer record.
/// The kernel time of a raw record (0 if too short to have one), for
/// ordering records from the two rings before decoding them.
pub fn record_time(bytes: &[u8]) -> u64 {
    let off = std::mem::offset_of!(EventHeader, time_ns);
    bytes
        .get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
        .unwrap_or(0)
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let hlen = std::mem::size_of::<EventHeader>();
    if bytes.len() < hlen {
        return Err(DecodeError::Short(bytes.len()));
    }
    let raw_kind = u16::from_ne_bytes([bytes[0], bytes[1]]);
    let kind = EventKind::from_u16(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
    Ok(match kind {
        EventKind::CredentialAccess => {
            let e: common::CredentialAccessEvent = read_exact(bytes, kind.name())?;
            let route = AccessRoute::from_u16(e.route).ok_or(DecodeError::BadValue {
                field: "route",
                value: e.route.into(),
            })?;
            Event::CredentialAccess(CredentialAccess {
                common: common(&e.header),
                ppid: e.ppid,
                uid: e.uid,
                gid: e.gid,
                comm: text(&e.comm),
                credential_id: e.credential_id,
                dev: e.dev,
                ino: e.ino,
                route: route.syscall(),
                fd: e.fd,
                readable: e.f_mode & 1 != 0,
                writable: e.f_mode & 2 != 0,
                repeats: e.repeats,
            })
        }
        EventKind::Exec => {
            let e: common::ExecEvent = read_exact(bytes, kind.name())?;
            let n = (e.filename_len as usize).min(e.filename.len());
            Event::Exec(Exec {
                common: common(&e.header),
                ppid: e.ppid,
                uid: e.uid,
                comm: text(&e.comm),
                filename: text(&e.filename[..n]),
                holder_credential: e.holder_credential,
            })
        }
        EventKind::Fork => {
            let e: common::ForkEvent = read_exact(bytes, kind.name())?;
            Event::Fork(Fork {
                common: common(&e.header),
                parent_tgid: e.parent_tgid,
                comm: text(&e.comm),
                inherited_credential: e.inherited_credential,
            })
        }
        EventKind::Exit => {
            let e: common::ExitEvent = read_exact(bytes, kind.name())?;
            Event::Exit(Exit {
                common: common(&e.header),
                holder_credential: e.holder_credential,
                unreported_reads: e.unreported_reads,
            })
        }
        EventKind::CgroupMkdir | EventKind::CgroupRmdir => {
            let e: common::CgroupEvent = read_exact(bytes, kind.name())?;
            let n = (e.path_len as usize).min(e.path.len());
            let c = Cgroup {
                common: common(&e.header),
                id: e.id,
                level: e.level,
                path: text(&e.path[..n]),
            };
            if kind == EventKind::CgroupMkdir {
                Event::CgroupMkdir(c)
            } else {
                Event::CgroupRmdir(c)
            }
        }
        EventKind::Connect => {
            let e: common::ConnectEvent = read_exact(bytes, kind.name())?;
            let addr = match e.family {
                AF_INET => IpAddr::V4(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3])),
                AF_INET6 => IpAddr::V6(Ipv6Addr::from(e.addr)),
                other => {
                    return Err(DecodeError::BadValue {
                        field: "family",
                        value: other.into(),
                    })
                }
            };
            let hook = EgressHook::from_u8(e.hook).ok_or(DecodeError::BadValue {
                field: "hook",
                value: e.hook.into(),
            })?;
            let verdict = Verdict::from_u8(e.verdict).ok_or(DecodeError::BadValue {
                field: "verdict",
                value: e.verdict.into(),
            })?;
            let reason = VerdictReason::from_u8(e.reason).ok_or(DecodeError::BadValue {
                field: "reason",
                value: e.reason.into(),
            })?;
            let protocol = match e.protocol {
                IPPROTO_TCP => Protocol::Tcp,
                IPPROTO_UDP => Protocol::Udp,
                _ => Protocol::Other,
            };
            Event::Connect(Connect {
                common: common(&e.header),
                comm: text(&e.comm),
                addr,
                port: e.port,
                protocol,
                hook: hook_name(hook),
                verdict: verdict_name(verdict),
                reason: reason_name(reason),
                holder_credential: e.holder_credential,
                verdict_typed: verdict,
            })
        }
    })
}

fn hook_name(h: EgressHook) -> &'static str {
    match h {
        EgressHook::Connect4 => "connect4",
        EgressHook::Connect6 => "connect6",
        EgressHook::Sendmsg4 => "sendmsg4",
        EgressHook::Sendmsg6 => "sendmsg6",
    }
}

pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "allowed",
        Verdict::Flagged => "flagged",
        Verdict::Denied => "denied",
        Verdict::Killed => "killed",
    }
}

fn reason_name(r: VerdictReason) -> &'static str {
    match r {
        VerdictReason::None => "none",
        VerdictReason::AllowedDestination => "allowed_destination",
        VerdictReason::UnexpectedDestination => "unexpected_destination",
        VerdictReason::DenyCgroup => "deny_cgroup",
        VerdictReason::DenyProcess => "deny_process",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ConnectEvent;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn connect() -> ConnectEvent {
        ConnectEvent {
            header: EventHeader {
                kind: EventKind::Connect as u16,
                pid: 7,
                tgid: 7,
                cgroup_id: 99,
                ..Default::default()
            },
            family: AF_INET,
            port: 8080,
            protocol: IPPROTO_TCP,
            hook: EgressHook::Connect6 as u8,
            verdict: Verdict::Denied as u8,
            reason: VerdictReason::DenyCgroup as u8,
            holder_credential: 0,
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn decodes_connect() {
        let Event::Connect(c) = decode(&bytes_of(&connect())).unwrap() else {
            panic!()
        };
        assert_eq!(c.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(
            (c.port, c.comm.as_str(), c.verdict, c.reason),
            (8080, "curl", "denied", "deny_cgroup")
        );
        assert_eq!(c.common.cgroup_id, 99);
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[1, 0, 0]), Err(DecodeError::Short(3)));
        let mut b = bytes_of(&connect());
        b[0] = 77;
        assert_eq!(decode(&b), Err(DecodeError::UnknownKind(77)));
        let b = bytes_of(&connect());
        assert!(matches!(
            decode(&b[..b.len() - 1]),
            Err(DecodeError::Length { .. })
        ));
        let mut bad = connect();
        bad.verdict = 200;
        assert!(matches!(
            decode(&bytes_of(&bad)),
            Err(DecodeError::BadValue {
                field: "verdict",
                ..
            })
        ));
        let mut fam = connect();
        fam.family = 1;
        assert!(matches!(
            decode(&bytes_of(&fam)),
            Err(DecodeError::BadValue {
                field: "family",
                ..
            })
        ));
    }

    #[test]
    fn serializes_with_event_tag() {
        let ev = decode(&bytes_of(&connect())).unwrap();
        let v: serde_json::Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["event"], "connect");
        assert_eq!(v["addr"], "127.0.0.1");
        assert_eq!(v["cgroup_id"], 99);
    }
}
