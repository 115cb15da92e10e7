//! Kernel struct field offsets from BTF (`/sys/kernel/btf/vmlinux`).
//!
//! rustc emits no CO-RE relocations, so the kernel programs read struct
//! fields at offsets that userspace looks up here at start-up: one binary
//! runs on every kernel that has BTF.
//!
//! This is a deliberately small reader for the one question we ask ("byte
//! offset and size of `struct S` field `f`", through anonymous members).
//! aya-obj keeps its BTF members crate-private, and btf-rs is LGPL, which
//! does not fit a statically linked Apache-2.0 agent.

use std::{collections::HashMap, path::Path};

use detector_common::KernelOffsets;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF data: {0}")]
    Format(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no field {field}")]
    NoField { strukt: String, field: String },
    #[error("kernel BTF: {strukt}.{field} is {got} bytes, expected {want}")]
    FieldSize {
        strukt: String,
        field: String,
        got: u32,
        want: u32,
    },
    #[error("kernel BTF: {strukt}.{field} is a bitfield")]
    Bitfield { strukt: String, field: String },
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset within the parent.
    bit_offset: u32,
    bitfield: bool,
}

#[derive(Clone, Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    /// `size` for sized kinds, referenced type id otherwise.
    size_or_type: u32,
    members: Vec<Member>,
    /// ARRAY: (element type, element count).
    array: Option<(u32, u32)>,
}

/// Parsed kernel BTF: types by id and the string section.
pub struct Btf {
    types: Vec<Type>, // index = type id - 1
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Format("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF (the only kind our bpfel programs run with).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Format("bad magic"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let tstart = hdr_len
            .checked_add(type_off)
            .ok_or(BtfError::Format("overflow"))?;
        let tend = tstart
            .checked_add(type_len)
            .ok_or(BtfError::Format("overflow"))?;
        let sstart = hdr_len
            .checked_add(str_off)
            .ok_or(BtfError::Format("overflow"))?;
        let send = sstart
            .checked_add(str_len)
            .ok_or(BtfError::Format("overflow"))?;
        let tsec = data
            .get(tstart..tend)
            .ok_or(BtfError::Format("type section out of bounds"))?;
        let strings = data
            .get(sstart..send)
            .ok_or(BtfError::Format("string section out of bounds"))?
            .to_vec();

        let mut types = Vec::new();
        let mut pos = 0usize;
        while pos < tsec.len() {
            let name_off = u32_at(tsec, pos)?;
            let info = u32_at(tsec, pos + 4)?;
            let size_or_type = u32_at(tsec, pos + 8)?;
            pos += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut t = Type {
                name_off,
                kind,
                size_or_type,
                members: Vec::new(),
                array: None,
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => pos += 4,
                KIND_ARRAY => {
                    t.array = Some((u32_at(tsec, pos)?, u32_at(tsec, pos + 8)?));
                    pos += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let off = u32_at(tsec, m + 8)?;
                        let (bit_offset, bitfield) = if kind_flag {
                            (off & 0xff_ffff, off >> 24 != 0)
                        } else {
                            (off, false)
                        };
                        t.members.push(Member {
                            name_off: u32_at(tsec, m)?,
                            type_id: u32_at(tsec, m + 4)?,
                            bit_offset,
                            bitfield,
                        });
                    }
                    pos += vlen * 12;
                }
                KIND_ENUM | KIND_FUNC_PROTO => pos += vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => pos += vlen * 12,
                _ => {}
            }
            types.push(t);
        }
        let mut btf = Btf {
            types,
            strings,
            structs: HashMap::new(),
        };
        for (i, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name_off != 0 {
                let name = btf.name(t.name_off).to_string();
                // Keep the first complete definition of a name.
                btf.structs.entry(name).or_insert(i as u32 + 1);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize))
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<u32> {
        let t = self.resolve(id)?;
        match t.kind {
            KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION => Some(t.size_or_type),
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let (elem, n) = t.array?;
                self.size_of(elem)?.checked_mul(n)
            }
            _ => None,
        }
    }

    /// Searches `t` for `field`, descending into anonymous struct/union members.
    /// Returns (bit offset, type id, is bitfield).
    fn find(&self, t: &Type, field: &str, depth: u32) -> Option<(u32, u32, bool)> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            if m.name_off != 0 {
                if self.name(m.name_off) == field {
                    return Some((m.bit_offset, m.type_id, m.bitfield));
                }
            } else if let Some(inner) = self.resolve(m.type_id) {
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some((off, ty, bf)) = self.find(inner, field, depth + 1) {
                        return Some((m.bit_offset + off, ty, bf));
                    }
                }
            }
        }
        None
    }

    /// Byte offset of `strukt.field`, checking that the field is `size` bytes.
    pub fn field_offset(&self, strukt: &str, field: &str, size: u32) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let t = self
            .ty(id)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let (bits, ty, bitfield) = self.find(t, field, 0).ok_or_else(|| BtfError::NoField {
            strukt: strukt.into(),
            field: field.into(),
        })?;
        if bitfield || bits % 8 != 0 {
            return Err(BtfError::Bitfield {
                strukt: strukt.into(),
                field: field.into(),
            });
        }
        let got = self.size_of(ty).unwrap_or(0);
        if got != size {
            return Err(BtfError::FieldSize {
                strukt: strukt.into(),
                field: field.into(),
                got,
                want: size,
            });
        }
        Ok(bits / 8)
    }

    /// Byte offset of `strukt.member.field`, `member` being a named struct
    /// (not an anonymous one, which `field_offset` looks through).
    pub fn nested_offset(
        &self,
        strukt: &str,
        member: &str,
        inner: &str,
        field: &str,
        size: u32,
    ) -> Result<u32, BtfError> {
        let inner_size = self
            .structs
            .get(inner)
            .and_then(|&id| self.size_of(id))
            .ok_or_else(|| BtfError::NoStruct(inner.into()))?;
        Ok(self.field_offset(strukt, member, inner_size)?
            + self.field_offset(inner, field, size)?)
    }

    /// A lease's `struct file *` and type: `file_lease.c.flc_*` since 6.9,
    /// `file_lock.fl_*` before; zeros (lease sensor unavailable) if neither.
    fn lease_offsets(&self) -> (u32, u32, u32) {
        let core = |field: &str, size| {
            self.nested_offset(
                "file_lease",
                "c",
                "file_lock_core",
                &format!("flc_{field}"),
                size,
            )
            .or_else(|_| self.field_offset("file_lock", &format!("fl_{field}"), size))
        };
        match (core("file", 8), core("type", 1), core("flags", 4)) {
            (Ok(file), Ok(kind), Ok(flags)) => (file, kind, flags),
            _ => (0, 0, 0),
        }
    }

    /// Every offset the kernel programs need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let (lease_file, lease_type, lease_flags) = self.lease_offsets();
        Ok(KernelOffsets {
            task_pid: self.field_offset("task_struct", "pid", 4)?,
            task_tgid: self.field_offset("task_struct", "tgid", 4)?,
            task_real_parent: self.field_offset("task_struct", "real_parent", 8)?,
            task_files: self.field_offset("task_struct", "files", 8)?,
            files_fdt: self.field_offset("files_struct", "fdt", 8)?,
            fdtable_max_fds: self.field_offset("fdtable", "max_fds", 4)?,
            fdtable_fd: self.field_offset("fdtable", "fd", 8)?,
            file_f_inode: self.field_offset("file", "f_inode", 8)?,
            file_f_mode: self.field_offset("file", "f_mode", 4)?,
            inode_i_ino: self.field_offset("inode", "i_ino", 8)?,
            inode_i_sb: self.field_offset("inode", "i_sb", 8)?,
            super_block_s_dev: self.field_offset("super_block", "s_dev", 4)?,
            task_cgroups: self.field_offset("task_struct", "cgroups", 8)?,
            css_set_dfl_cgrp: self.field_offset("css_set", "dfl_cgrp", 8)?,
            cgroup_kn: self.field_offset("cgroup", "kn", 8)?,
            kernfs_node_id: self.field_offset("kernfs_node", "id", 8)?,
            lease_file,
            lease_type,
            lease_flags,
            regs_x86_64: cfg!(target_arch = "x86_64") as u32,
            inode_i_readcount: self.field_offset("inode", "i_readcount", 4).unwrap_or(0),
            inode_i_writecount: self.field_offset("inode", "i_writecount", 4).unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: struct outer { int a; union { long b; }; }
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0long\0outer\0a\0b\0".to_vec();
        // offsets: int=1 long=5 outer=10 a=16 b=18
        let mut types = Vec::new();
        let mut push = |v: &[u32]| {
            v.iter()
                .for_each(|x| types.extend_from_slice(&x.to_le_bytes()))
        };
        push(&[1, KIND_INT << 24, 4, 32]); // 1: int
        push(&[5, KIND_INT << 24, 8, 64]); // 2: long
        push(&[0, (KIND_UNION << 24) | 1, 8, 18, 2, 0]); // 3: union { long b; }
        push(&[10, (KIND_STRUCT << 24) | 2, 16, 16, 1, 0, 0, 3, 64]); // 4: outer
        let mut out = Vec::new();
        for v in [
            0xeb9f_u16 as u32 | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_fields_through_anonymous_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.field_offset("outer", "a", 4).unwrap(), 0);
        assert_eq!(btf.field_offset("outer", "b", 8).unwrap(), 8);
        assert!(matches!(
            btf.field_offset("outer", "b", 4),
            Err(BtfError::FieldSize { .. })
        ));
        assert!(matches!(
            btf.field_offset("outer", "zz", 4),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(
            btf.field_offset("nope", "a", 4),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[
            0x9f, 0xeb, 1, 0, 255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
        ])
        .is_err());
        let mut b = blob();
        b.truncate(b.len() - 30);
        assert!(Btf::parse(&b).is_err());
    }

    #[test]
    fn reads_this_kernel() {
        // Every machine we run on has BTF (the daemon requires it).
        let btf = Btf::from_sys_fs().expect("/sys/kernel/btf/vmlinux");
        let off = btf.kernel_offsets().expect("offsets");
        assert!(off.task_tgid > 0 && off.task_files > 0 && off.inode_i_sb > 0);
        // The lease sensor's: through the named `c` member (6.9+), or the
        // old struct file_lock.
        assert!(
            off.lease_file > 0
                && off.lease_type > 0
                && off.lease_flags > 0
                && off.lease_file != off.lease_type
                && off.lease_flags != off.lease_type,
            "{off:?}"
        );
        if btf.structs.contains_key("file_lease") {
            let core = btf.field_offset("file_lease", "c", 0).err();
            assert!(
                matches!(core, Some(BtfError::FieldSize { .. })),
                "c is a struct member: {core:?}"
            );
        }
        assert_eq!(off.regs_x86_64, cfg!(target_arch = "x86_64") as u32);
    }
}
