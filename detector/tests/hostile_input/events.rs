//! The kernel-event decoder (`detector::events::decode`): records of every
//! kind with random fields decode to exactly those fields; truncated,
//! extended, mis-tagged and random records are errors that name what is
//! wrong, never a panic. The daemon also writes each decoded event as JSON
//! (`--debug-events`), so that must work for any decoded event.
//!
//! Records are built byte by byte at the fields' offsets (`offset_of!`),
//! independently of the decoder's own reading.

use std::{
    mem::{offset_of, size_of},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use detector::events::{decode, DecodeError, Event};
use detector_common::{
    CgroupEvent, ConnectEvent, CredentialAccessEvent, EventHeader, EventKind, ExecEvent, ExitEvent,
    ForkEvent, COMM_LEN, FILENAME_LEN,
};
use proptest::{prelude::*, test_runner::TestCaseError};

use crate::{check, harness::fuzz};

/// Header fields every record starts with.
#[derive(Clone, Debug)]
struct Head {
    pid: u32,
    tgid: u32,
    time_ns: u64,
    cgroup_id: u64,
}

/// A record's fields, as the kernel would fill them (any values).
#[derive(Clone, Debug)]
enum Rec {
    Access {
        ppid: u32,
        uid: u32,
        gid: u32,
        credential_id: u32,
        dev: u64,
        ino: u64,
        f_mode: u32,
        route: u16,
        fd: i32,
        comm: Vec<u8>,
    },
    Exec {
        ppid: u32,
        uid: u32,
        holder: u32,
        filename_len: u32,
        comm: Vec<u8>,
        filename: Vec<u8>,
    },
    Fork {
        parent_tgid: u32,
        inherited: u32,
        comm: Vec<u8>,
    },
    Exit {
        holder: u32,
    },
    Connect {
        family: u16,
        port: u16,
        protocol: u8,
        hook: u8,
        verdict: u8,
        reason: u8,
        holder: u32,
        addr: [u8; 16],
        comm: Vec<u8>,
    },
    Cgroup {
        mkdir: bool,
        id: u64,
        root: i32,
        level: i32,
        path_len: u32,
        path: Vec<u8>,
    },
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn put_head(buf: &mut [u8], kind: EventKind, h: &Head) {
    put(
        buf,
        offset_of!(EventHeader, kind),
        &(kind as u16).to_ne_bytes(),
    );
    put(buf, offset_of!(EventHeader, pid), &h.pid.to_ne_bytes());
    put(buf, offset_of!(EventHeader, tgid), &h.tgid.to_ne_bytes());
    put(
        buf,
        offset_of!(EventHeader, time_ns),
        &h.time_ns.to_ne_bytes(),
    );
    put(
        buf,
        offset_of!(EventHeader, cgroup_id),
        &h.cgroup_id.to_ne_bytes(),
    );
}

impl Rec {
    fn kind(&self) -> EventKind {
        match self {
            Rec::Access { .. } => EventKind::CredentialAccess,
            Rec::Exec { .. } => EventKind::Exec,
            Rec::Fork { .. } => EventKind::Fork,
            Rec::Exit { .. } => EventKind::Exit,
            Rec::Connect { .. } => EventKind::Connect,
            Rec::Cgroup { mkdir: true, .. } => EventKind::CgroupMkdir,
            Rec::Cgroup { mkdir: false, .. } => EventKind::CgroupRmdir,
        }
    }

    /// The record's bytes; `noise` fills the padding and unused bytes.
    fn encode(&self, h: &Head, noise: u8) -> Vec<u8> {
        macro_rules! at {
            ($t:ty, $f:ident) => {
                offset_of!($t, $f)
            };
        }
        let mut b;
        match self {
            Rec::Access {
                ppid,
                uid,
                gid,
                credential_id,
                dev,
                ino,
                f_mode,
                route,
                fd,
                comm,
            } => {
                type T = CredentialAccessEvent;
                b = vec![noise; size_of::<T>()];
                put(&mut b, at!(T, ppid), &ppid.to_ne_bytes());
                put(&mut b, at!(T, uid), &uid.to_ne_bytes());
                put(&mut b, at!(T, gid), &gid.to_ne_bytes());
                put(&mut b, at!(T, credential_id), &credential_id.to_ne_bytes());
                put(&mut b, at!(T, dev), &dev.to_ne_bytes());
                put(&mut b, at!(T, ino), &ino.to_ne_bytes());
                put(&mut b, at!(T, f_mode), &f_mode.to_ne_bytes());
                put(&mut b, at!(T, route), &route.to_ne_bytes());
                put(&mut b, at!(T, fd), &fd.to_ne_bytes());
                put(&mut b, at!(T, comm), comm);
            }
            Rec::Exec {
                ppid,
                uid,
                holder,
                filename_len,
                comm,
                filename,
            } => {
                type T = ExecEvent;
                b = vec![noise; size_of::<T>()];
                put(&mut b, at!(T, ppid), &ppid.to_ne_bytes());
                put(&mut b, at!(T, uid), &uid.to_ne_bytes());
                put(&mut b, at!(T, holder_credential), &holder.to_ne_bytes());
                put(&mut b, at!(T, filename_len), &filename_len.to_ne_bytes());
                put(&mut b, at!(T, comm), comm);
                put(&mut b, at!(T, filename), filename);
            }
            Rec::Fork {
                parent_tgid,
                inherited,
                comm,
            } => {
                type T = ForkEvent;
                b = vec![noise; size_of::<T>()];
                put(&mut b, at!(T, parent_tgid), &parent_tgid.to_ne_bytes());
                put(
                    &mut b,
                    at!(T, inherited_credential),
                    &inherited.to_ne_bytes(),
                );
                put(&mut b, at!(T, comm), comm);
            }
            Rec::Exit { holder } => {
                type T = ExitEvent;
                b = vec![noise; size_of::<T>()];
                put(&mut b, at!(T, holder_credential), &holder.to_ne_bytes());
            }
            Rec::Connect {
                family,
                port,
                protocol,
                hook,
                verdict,
                reason,
                holder,
                addr,
                comm,
            } => {
                type T = ConnectEvent;
                b = vec![noise; size_of::<T>()];
                put(&mut b, at!(T, family), &family.to_ne_bytes());
                put(&mut b, at!(T, port), &port.to_ne_bytes());
                put(&mut b, at!(T, protocol), &[*protocol]);
                put(&mut b, at!(T, hook), &[*hook]);
                put(&mut b, at!(T, verdict), &[*verdict]);
                put(&mut b, at!(T, reason), &[*reason]);
                put(&mut b, at!(T, holder_credential), &holder.to_ne_bytes());
                put(&mut b, at!(T, addr), addr);
                put(&mut b, at!(T, comm), comm);
            }
            Rec::Cgroup {
                id,
                root,
                level,
                path_len,
                path,
                ..
            } => {
                type T = CgroupEvent;
                b = vec![noise; size_of::<T>()];
                put(&mut b, at!(T, id), &id.to_ne_bytes());
                put(&mut b, at!(T, root), &root.to_ne_bytes());
                put(&mut b, at!(T, level), &level.to_ne_bytes());
                put(&mut b, at!(T, path_len), &path_len.to_ne_bytes());
                put(&mut b, at!(T, path), path);
            }
        }
        put_head(&mut b, self.kind(), h);
        b
    }
}

/// Bytes of a C string buffer: mostly text and a NUL, sometimes full,
/// sometimes invalid UTF-8.
fn cbuf(len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        ("[a-z0-9/._ -]{0,15}", any::<u8>()).prop_map(move |(s, fill)| {
            let mut v = s.into_bytes();
            v.truncate(len.saturating_sub(1));
            v.push(0);
            v.resize(len, fill);
            v
        }),
        proptest::collection::vec(any::<u8>(), len),
        proptest::collection::vec(1u8.., len),
    ]
}

fn head() -> impl Strategy<Value = Head> {
    (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
        |(pid, tgid, time_ns, cgroup_id)| Head {
            pid,
            tgid,
            time_ns,
            cgroup_id,
        },
    )
}

/// Mostly valid enum values, sometimes any.
fn small<T: Arbitrary + From<u8> + std::fmt::Debug + Clone + 'static>(
    valid: std::ops::RangeInclusive<u8>,
) -> impl Strategy<Value = T> {
    prop_oneof![3 => valid.prop_map(T::from), 1 => any::<T>()]
}

fn rec() -> impl Strategy<Value = Rec> {
    prop_oneof![
        (
            (
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>()
            ),
            (
                any::<u32>(),
                small::<u16>(1..=7),
                any::<i32>(),
                cbuf(COMM_LEN)
            ),
        )
            .prop_map(
                |((ppid, uid, gid, credential_id, dev, ino), (f_mode, route, fd, comm))| {
                    Rec::Access {
                        ppid,
                        uid,
                        gid,
                        credential_id,
                        dev,
                        ino,
                        f_mode,
                        route,
                        fd,
                        comm,
                    }
                }
            ),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            prop_oneof![0u32..=FILENAME_LEN as u32 + 8, any::<u32>()],
            cbuf(COMM_LEN),
            cbuf(FILENAME_LEN),
        )
            .prop_map(
                |(ppid, uid, holder, filename_len, comm, filename)| Rec::Exec {
                    ppid,
                    uid,
                    holder,
                    filename_len,
                    comm,
                    filename
                }
            ),
        (any::<u32>(), any::<u32>(), cbuf(COMM_LEN)).prop_map(|(parent_tgid, inherited, comm)| {
            Rec::Fork {
                parent_tgid,
                inherited,
                comm,
            }
        }),
        any::<u32>().prop_map(|holder| Rec::Exit { holder }),
        (
            (
                prop_oneof![Just(2u16), Just(10u16), any::<u16>()],
                any::<u16>(),
                prop_oneof![Just(6u8), Just(17u8), any::<u8>()]
            ),
            (
                small::<u8>(1..=4),
                small::<u8>(0..=3),
                small::<u8>(0..=4),
                any::<u32>(),
                any::<[u8; 16]>(),
                cbuf(COMM_LEN)
            ),
        )
            .prop_map(
                |((family, port, protocol), (hook, verdict, reason, holder, addr, comm))| {
                    Rec::Connect {
                        family,
                        port,
                        protocol,
                        hook,
                        verdict,
                        reason,
                        holder,
                        addr,
                        comm,
                    }
                }
            ),
        (
            any::<bool>(),
            any::<u64>(),
            any::<i32>(),
            any::<i32>(),
            prop_oneof![0u32..=FILENAME_LEN as u32 + 8, any::<u32>()],
            cbuf(FILENAME_LEN),
        )
            .prop_map(|(mkdir, id, root, level, path_len, path)| Rec::Cgroup {
                mkdir,
                id,
                root,
                level,
                path_len,
                path
            }),
    ]
}

/// Text of a C string buffer as the decoder promises it: up to the first
/// NUL, invalid UTF-8 replaced.
fn c_text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// What `decode` must return for `r`.
fn expected(r: &Rec) -> Result<(), DecodeError> {
    let bad = |field: &'static str, value: u64| Err(DecodeError::BadValue { field, value });
    match r {
        Rec::Access { route, .. } if !(1..=7).contains(route) => bad("route", (*route).into()),
        Rec::Connect { family, .. } if *family != 2 && *family != 10 => {
            bad("family", (*family).into())
        }
        Rec::Connect { hook, .. } if !(1..=4).contains(hook) => bad("hook", (*hook).into()),
        Rec::Connect { verdict, .. } if *verdict > 3 => bad("verdict", (*verdict).into()),
        Rec::Connect { reason, .. } if *reason > 4 => bad("reason", (*reason).into()),
        _ => Ok(()),
    }
}

fn check_fields(r: &Rec, h: &Head, ev: &Event) -> Result<(), TestCaseError> {
    let c = ev.common();
    check!(
        (c.pid, c.tgid, c.time_ns, c.cgroup_id) == (h.pid, h.tgid, h.time_ns, h.cgroup_id),
        "header {c:?} != {h:?}"
    );
    check!(
        ev.kind() == r.kind(),
        "kind {:?} != {:?}",
        ev.kind(),
        r.kind()
    );
    match (r, ev) {
        (
            Rec::Access {
                ppid,
                uid,
                gid,
                credential_id,
                dev,
                ino,
                f_mode,
                route,
                fd,
                comm,
            },
            Event::CredentialAccess(e),
        ) => {
            let routes = [
                "open",
                "openat",
                "openat2",
                "creat",
                "open_by_handle_at",
                "pidfd_getfd",
                "open_any",
            ];
            check!(
                (e.ppid, e.uid, e.gid, e.credential_id, e.dev, e.ino, e.fd)
                    == (*ppid, *uid, *gid, *credential_id, *dev, *ino, *fd),
                "fields {e:?} != {r:?}"
            );
            check!(e.route == routes[*route as usize - 1], "route {}", e.route);
            check!(
                e.readable == (f_mode & 1 != 0) && e.writable == (f_mode & 2 != 0),
                "f_mode {f_mode:#x}: {e:?}"
            );
            check!(e.comm == c_text(comm), "comm {:?}", e.comm);
        }
        (
            Rec::Exec {
                ppid,
                uid,
                holder,
                filename_len,
                comm,
                filename,
            },
            Event::Exec(e),
        ) => {
            check!(
                (e.ppid, e.uid, e.holder_credential) == (*ppid, *uid, *holder),
                "fields {e:?}"
            );
            check!(e.comm == c_text(comm), "comm {:?}", e.comm);
            let n = (*filename_len as usize).min(FILENAME_LEN);
            check!(
                e.filename == c_text(&filename[..n]),
                "filename {:?} (len {filename_len})",
                e.filename
            );
        }
        (
            Rec::Fork {
                parent_tgid,
                inherited,
                comm,
            },
            Event::Fork(e),
        ) => {
            check!(
                (e.parent_tgid, e.inherited_credential) == (*parent_tgid, *inherited),
                "fields {e:?}"
            );
            check!(e.comm == c_text(comm), "comm {:?}", e.comm);
        }
        (Rec::Exit { holder }, Event::Exit(e)) => {
            check!(e.holder_credential == *holder, "holder {e:?}")
        }
        (
            Rec::Connect {
                family,
                port,
                protocol,
                hook,
                verdict,
                reason,
                holder,
                addr,
                comm,
            },
            Event::Connect(e),
        ) => {
            let ip = if *family == 2 {
                IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(*addr))
            };
            check!(
                e.addr == ip && e.port == *port && e.holder_credential == *holder,
                "fields {e:?}"
            );
            let proto = match protocol {
                6 => "tcp",
                17 => "udp",
                _ => "other",
            };
            check!(e.protocol.as_str() == proto, "protocol {:?}", e.protocol);
            let hooks = ["connect4", "connect6", "sendmsg4", "sendmsg6"];
            let verdicts = ["allowed", "flagged", "denied", "killed"];
            let reasons = [
                "none",
                "allowed_destination",
                "unexpected_destination",
                "deny_cgroup",
                "deny_process",
            ];
            check!(e.hook == hooks[*hook as usize - 1], "hook {}", e.hook);
            check!(
                e.verdict == verdicts[*verdict as usize],
                "verdict {}",
                e.verdict
            );
            check!(e.reason == reasons[*reason as usize], "reason {}", e.reason);
            check!(e.comm == c_text(comm), "comm {:?}", e.comm);
        }
        (
            Rec::Cgroup {
                id,
                level,
                path_len,
                path,
                ..
            },
            Event::CgroupMkdir(e) | Event::CgroupRmdir(e),
        ) => {
            check!(e.id == *id && e.level == *level, "fields {e:?}");
            let n = (*path_len as usize).min(FILENAME_LEN);
            check!(e.path == c_text(&path[..n]), "path {:?}", e.path);
        }
        (r, e) => return Err(TestCaseError::fail(format!("{r:?} decoded as {e:?}"))),
    }
    // The JSON of --debug-events: always written, tagged with the kind.
    let json =
        serde_json::to_value(ev).map_err(|e| TestCaseError::fail(format!("to JSON: {e}")))?;
    check!(
        json["event"] == r.kind().name(),
        "event tag {}",
        json["event"]
    );
    check!(json["pid"] == h.pid, "pid in JSON {}", json["pid"]);
    Ok(())
}

#[test]
fn records_of_every_kind_decode_to_their_fields() {
    fuzz(
        "events/round-trip",
        (rec(), head(), any::<u8>()),
        |(r, h, noise)| {
            let bytes = r.encode(&h, noise);
            match (decode(&bytes), expected(&r)) {
                (Ok(ev), Ok(())) => check_fields(&r, &h, &ev),
                (Err(got), Err(want)) => {
                    check!(got == want, "error {got} != {want}");
                    // The message names the field.
                    if let DecodeError::BadValue { field, .. } = &want {
                        check!(got.to_string().contains(field), "message {got}");
                    }
                    Ok(())
                }
                (got, want) => Err(TestCaseError::fail(format!(
                    "decoded {got:?}, expected {want:?}"
                ))),
            }
        },
    );
}

/// A record cut short, extended, or given another kind's tag.
#[test]
fn wrong_lengths_and_kinds_are_errors() {
    let s = (rec(), head(), any::<u8>(), -64isize..64, 0u16..10);
    fuzz("events/lengths", s, |(r, h, noise, delta, kind)| {
        let mut bytes = r.encode(&h, noise);
        let want = bytes.len();
        let len = (want as isize + delta).max(0) as usize;
        bytes.resize(len, noise);
        let hlen = size_of::<EventHeader>();
        let result = decode(&bytes);
        if len < hlen {
            check!(
                result == Err(DecodeError::Short(len)),
                "{len} bytes: {result:?}"
            );
        } else if delta != 0 {
            check!(
                result
                    == Err(DecodeError::Length {
                        kind: r.kind().name(),
                        got: len,
                        want
                    }),
                "{len} of {want} bytes: {result:?}"
            );
        }
        // Re-tag as another (or no) kind.
        if len >= 2 {
            bytes[..2].copy_from_slice(&kind.to_ne_bytes());
            match (
                EventKind::ALL.iter().find(|k| **k as u16 == kind),
                decode(&bytes),
            ) {
                (_, r) if len < hlen => {
                    check!(r == Err(DecodeError::Short(len)), "{len} bytes: {r:?}")
                }
                (None, r) => check!(
                    r == Err(DecodeError::UnknownKind(kind)),
                    "kind {kind}: {r:?}"
                ),
                (Some(k), Err(DecodeError::Length { kind: name, .. })) => {
                    check!(
                        name == k.name(),
                        "length error names {name}, not {}",
                        k.name()
                    )
                }
                // Same size as the other kind's record: anything but a panic.
                (Some(_), _) => {}
            }
        }
        Ok(())
    });
}

/// Random bytes of any length.
#[test]
fn random_bytes_never_panic() {
    let s = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        // A valid kind in front makes the decoder go further.
        (0u16..9, proptest::collection::vec(any::<u8>(), 0..600)).prop_map(|(k, mut v)| {
            if v.len() >= 2 {
                v[..2].copy_from_slice(&k.to_ne_bytes());
            }
            v
        }),
    ];
    fuzz("events/random", s, |bytes| {
        if let Ok(ev) = decode(&bytes) {
            serde_json::to_string(&ev).map_err(|e| TestCaseError::fail(format!("to JSON: {e}")))?;
        }
        Ok(())
    });
}
