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
    probe(de, &path.0, key_or_value(path, target))
}

fn key_or_value(path: &FieldPath, target: Target) -> Target {
    match (target, path.0.last()) {
        (Target::Key, Some(Seg::Key(_))) => Target::Key,
        _ => Target::Value,
    }
}

/// Walk one document down `path`; the line of the node reached. Only a
/// line for an error message: serde_norway 0.9 panics ("unexpected end of
/// mapping") on some event streams, e.g. `"!: a: &x [1, 2]\nb: *x\n"` (found
/// by the hostile-input fuzzer); then the line is unknown and the caller
/// still reports the error.
fn probe(de: serde_norway::Deserializer<'_>, path: &[Seg], target: Target) -> Option<usize> {
    let walk = std::panic::AssertUnwindSafe(|| (Probe { path, target }).deserialize(de));
    match std::panic::catch_unwind(walk).ok()? {
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
    best_line_with(|p, t| line_of(text, doc, p, t), path, target, fallback)
}

fn best_line_with(
    mut line_of: impl FnMut(&FieldPath, Target) -> Option<usize>,
    path: &FieldPath,
    target: Target,
    fallback: usize,
) -> usize {
    if let Some(l) = line_of(path, target) {
        return l;
    }
    let mut p = path.clone();
    while let Some(parent) = p.parent() {
        // An ancestor's own key line is more telling than its value's.
        if let Some(l) = line_of(&parent, Target::Key) {
            return l;
        }
        p = parent;
    }
    fallback
}

/// Line lookups in the documents of one text, read in order. [`line_of`]
/// re-parses every document before the one it looks in, so looking up each
/// of n documents costs O(n²) (1000 intents in one file: seconds). This
/// re-parses only the document itself: it starts reading at the document's
/// first node, found once per document while walking the stream in step
/// with the caller (so only documents the caller got to are ever parsed,
/// never what lies after a syntax error).
pub struct Locator<'a> {
    text: &'a str,
    /// Byte offset of each line (as the parser counts lines).
    line_starts: Vec<usize>,
    stream: serde_norway::Deserializer<'a>,
    /// 1-based line of each visited document's root node (`None`: none).
    roots: Vec<Option<usize>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Self {
        Locator {
            text,
            line_starts: line_starts(text),
            stream: serde_norway::Deserializer::from_str(text),
            roots: Vec::new(),
        }
    }

    /// Line of document `doc`'s root node. Documents are visited in order,
    /// up to `doc`: ask only for documents that parsed.
    pub fn doc_line(&mut self, doc: usize) -> Option<usize> {
        while self.roots.len() <= doc {
            let de = self.stream.next()?;
            self.roots.push(probe(de, &[], Target::Value));
        }
        self.roots[doc]
    }

    /// [`line_of`], reading only document `doc`.
    pub fn line_of(&mut self, doc: usize, path: &FieldPath, target: Target) -> Option<usize> {
        let root = self.doc_line(doc)?;
        if path.0.is_empty() {
            return Some(root);
        }
        let start = self.line_starts.get(root - 1).copied()?;
        // The root node's line holds nothing of the document before (a
        // document ends only at a `---` or `...` line), so from its start
        // the first document read is this one, `root - 1` lines down.
        let rest = &self.text[start..];
        let mut docs = serde_norway::Deserializer::from_str(rest);
        let here = docs.next().and_then(|de| probe(de, &[], Target::Value));
        if here != Some(1) {
            // Not what the reasoning above expects: the slow, sure way.
            return line_of(self.text, doc, path, target);
        }
        let de = serde_norway::Deserializer::from_str(rest).next()?;
        probe(de, &path.0, key_or_value(path, target)).map(|l| l + root - 1)
    }

    /// [`best_line`], reading only document `doc`.
    pub fn best_line(
        &mut self,
        doc: usize,
        path: &FieldPath,
        target: Target,
        fallback: usize,
    ) -> usize {
        best_line_with(|p, t| self.line_of(doc, p, t), path, target, fallback)
    }
}

/// Byte offsets where lines start, with the parser's line breaks (see
/// [`super::line_count`]).
fn line_starts(text: &str) -> Vec<usize> {
    let mut v = vec![0];
    let mut it = text.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        match c {
            '\r' if matches!(it.peek(), Some((_, '\n'))) => {}
            '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' => v.push(i + c.len_utf8()),
            _ => {}
        }
    }
    v
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

    /// The locator answers as `line_of` does, document by document, in a
    /// stream whose documents start with comments, markers on the root's
    /// line, flow roots, CRLF and unicode line breaks.
    #[test]
    fn locator_agrees_with_line_of() {
        use Seg::*;
        let k = |s: &str| Key(s.into());
        let text = "\
# leading comment
a: 1
b:
  - x
  - y
--- {a: 2,
  b: [p, q]}
---
# comment
\r\n\
a: 3\r\n\
b:\r\n\
  - z\r\n\
---\r\n\
---
a: \"4\u{2028}\"
b: [w]
...
---
a: 5
b:
  - v
";
        let paths = [
            p(&[]),
            p(&[k("a")]),
            p(&[k("b")]),
            p(&[k("b"), Index(0)]),
            p(&[k("b"), Index(1)]),
            p(&[k("nope")]),
        ];
        let mut loc = Locator::new(text);
        let mut docs = 0;
        for doc in 0..7 {
            for path in &paths {
                for t in [Target::Key, Target::Value] {
                    let want = line_of(text, doc, path, t);
                    assert_eq!(loc.line_of(doc, path, t), want, "doc {doc} {path} {t:?}");
                    assert_eq!(
                        loc.best_line(doc, path, t, 99),
                        best_line(text, doc, path, t, 99),
                        "doc {doc} {path} {t:?}"
                    );
                }
            }
            docs += usize::from(line_of(text, doc, &p(&[]), Target::Value).is_some());
        }
        assert_eq!(docs, 6, "the stream has six documents");
        // Spot checks against the text itself.
        let mut loc = Locator::new(text);
        assert_eq!(
            loc.line_of(0, &p(&[k("b"), Index(1)]), Target::Value),
            Some(5)
        );
        assert_eq!(
            loc.line_of(1, &p(&[k("b"), Index(1)]), Target::Value),
            Some(7)
        );
        assert_eq!(
            loc.line_of(2, &p(&[k("b"), Index(0)]), Target::Value),
            Some(13)
        );
        assert_eq!(
            loc.best_line(2, &p(&[k("b"), Index(3)]), Target::Value, 1),
            12
        );
    }

    #[test]
    fn line_starts_follow_the_parser_s_breaks() {
        let t = "a\nb\r\nc\rd\u{85}e\u{2028}f";
        assert_eq!(line_starts(t).len(), crate::yaml::line_count(t));
        assert_eq!(line_starts(t), vec![0, 2, 5, 7, 10, 14]);
    }
}
