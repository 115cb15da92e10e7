//! Line numbers for field paths in a YAML document.
//!
//! `serde_norway` values carry no positions, but its deserializer attaches
//! the position of the node being visited to any error raised while visiting
//! it. So to find the line of `spec.destinations[1].cidr` we re-read the
//! document with a probe that walks down that path (skipping everything
//! else) and fails on purpose when it reaches the node: the error's location
//! is the node's. Errors are rare and documents small, so one pass per error
//! is cheap (the caller caps the number of errors per file).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A field path such as `spec.destinations[1].cidr`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    pub fn root() -> Self {
        FieldPath(Vec::new())
    }
    pub fn key(&self, k: &str) -> Self {
        let mut p = self.0.clone();
        p.push(Seg::Key(k.to_string()));
        FieldPath(p)
    }
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.0.clone();
        p.push(Seg::Index(i));
        FieldPath(p)
    }
    pub fn parent(&self) -> Option<Self> {
        let mut p = self.0.clone();
        p.pop()?;
        Some(FieldPath(p))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            // Keys come from the file: quote the odd ones (control
            // characters, separators) so the path reads unambiguously and
            // carries nothing raw into a terminal.
            let odd = |k: &str| {
                k.is_empty()
                    || k.chars()
                        .any(|c| c.is_control() || c.is_whitespace() || ".[]\"".contains(c))
            };
            match s {
                Seg::Key(k) if odd(k) && i == 0 => write!(f, "{k:?}")?,
                Seg::Key(k) if odd(k) => write!(f, ".{k:?}")?,
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// What to point at: the key naming the last path step (for unknown or
/// misplaced fields, and for "this list must not be empty"), or the value
/// node itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Key,
    Value,
}

const PROBE: &str = "\u{0}detector-locate";

/// 1-based line of the node at `path` in document `doc` (0-based) of `text`,
/// or `None` when the path is not there.
pub fn line_of(text: &str, doc: usize, path: &FieldPath, target: Target) -> Option<usize> {
    let de = serde_norway::Deserializer::from_str(text).nth(doc)?;
    let target = match (target, path.0.last()) {
        (Target::Key, Some(Seg::Key(_))) => Target::Key,
        _ => Target::Value,
    };
    let probe = Probe {
        path: &path.0,
        target,
    };
    match probe.deserialize(de) {
        Ok(()) => None,
        Err(e) if e.to_string().contains(PROBE) => e.location().map(|l| l.line()),
        Err(_) => None,
    }
}

/// The line of `path` if found, else of its nearest ancestor that is found,
/// else the document's first line (`fallback`).
pub fn best_line(
    text: &str,
    doc: usize,
    path: &FieldPath,
    target: Target,
    fallback: usize,
) -> usize {
    if let Some(l) = line_of(text, doc, path, target) {
        return l;
    }
    let mut p = path.clone();
    while let Some(parent) = p.parent() {
        // An ancestor's own key line is more telling than its value's.
        if let Some(l) = line_of(text, doc, &parent, Target::Key) {
            return l;
        }
        p = parent;
    }
    fallback
}

struct Probe<'a> {
    path: &'a [Seg],
    target: Target,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

fn found<E: de::Error>() -> E {
    E::custom(PROBE)
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.leaf()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.leaf()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.leaf()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.leaf()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.leaf()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): point at it.
        if self.path.is_empty() {
            return Err(found());
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(found());
        };
        let Seg::Index(want) = first else {
            return Ok(());
        };
        let mut i = 0usize;
        loop {
            if i == *want {
                seq.next_element_seed(Probe {
                    path: rest,
                    target: self.target,
                })?;
                return Ok(());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(found());
        };
        let Seg::Key(want) = first else {
            return Ok(());
        };
        let fail_on_key = rest.is_empty() && self.target == Target::Key;
        loop {
            match map.next_key_seed(KeyProbe {
                want,
                fail: fail_on_key,
            })? {
                None => return Ok(()),
                Some(true) => {
                    map.next_value_seed(Probe {
                        path: rest,
                        target: self.target,
                    })?;
                    return Ok(());
                }
                Some(false) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
    }
}

impl Probe<'_> {
    fn leaf<E: de::Error>(self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(found())
        } else {
            Ok(())
        }
    }
}

/// Reads one mapping key: does it name `want`? With `fail`, a match fails
/// from inside the key's visitor, so the error carries the key's position.
struct KeyProbe<'a> {
    want: &'a str,
    fail: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        if v == self.want {
            if self.fail {
                return Err(found());
            }
            return Ok(true);
        }
        Ok(false)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(IgnoredAny)?;
        Ok(false)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<bool, A::Error> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
a: 1
---
apiVersion: x
spec:
  selector:
    namespace: ns
  destinations:
    - {cidr: 10.0.0.1/32, ports: [443]}
    - cidr: 10.0.0.300/32
      ports:
        - 80
        - 99999
";

    fn p(segs: &[Seg]) -> FieldPath {
        FieldPath(segs.to_vec())
    }

    #[test]
    fn finds_keys_and_values_across_documents() {
        use Seg::*;
        let k = |s: &str| Key(s.into());
        assert_eq!(line_of(DOC, 0, &p(&[k("a")]), Target::Value), Some(1));
        assert_eq!(line_of(DOC, 1, &p(&[k("spec")]), Target::Key), Some(4));
        assert_eq!(
            line_of(
                DOC,
                1,
                &p(&[k("spec"), k("selector"), k("namespace")]),
                Target::Value
            ),
            Some(6)
        );
        let d0 = p(&[k("spec"), k("destinations"), Index(0), k("cidr")]);
        assert_eq!(line_of(DOC, 1, &d0, Target::Value), Some(8));
        let d1 = p(&[k("spec"), k("destinations"), Index(1), k("cidr")]);
        assert_eq!(line_of(DOC, 1, &d1, Target::Value), Some(9));
        let port = p(&[k("spec"), k("destinations"), Index(1), k("ports"), Index(1)]);
        assert_eq!(line_of(DOC, 1, &port, Target::Value), Some(12));
        assert_eq!(line_of(DOC, 1, &p(&[k("nope")]), Target::Key), None);
        assert_eq!(line_of(DOC, 7, &p(&[]), Target::Value), None);
        // Missing leaf: the nearest ancestor's key.
        let missing = p(&[k("spec"), k("selector"), k("podUID")]);
        assert_eq!(best_line(DOC, 1, &missing, Target::Key, 3), 5);
        assert_eq!(d1.to_string(), "spec.destinations[1].cidr");
        let odd = p(&[k("spec"), k("a\u{1b}[2J"), k("x.y")]);
        assert_eq!(odd.to_string(), "spec.\"a\\u{1b}[2J\".\"x.y\"");
    }
}
