//! Rendering generated documents as YAML in varied styles, remembering on
//! which line each scalar field sits, and mutating the result.

use proptest::prelude::*;

/// A scalar we can write unquoted without YAML reading it as something
/// else (a number, bool, null, an anchor, a comment...).
pub fn plain_ok(s: &str) -> bool {
    let reserved = [
        "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~", "nan", "inf",
    ];
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '.' | '-'))
        && !reserved.contains(&s.to_ascii_lowercase().as_str())
        && !s.ends_with('.')
}

/// YAML double-quoted scalar: escapes everything YAML may not carry raw
/// (control characters, non-characters, BOM, line separators).
pub fn double_quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) >= 0xA0
                && !matches!(c as u32, 0xFEFF | 0xFFFE | 0xFFFF | 0x2028 | 0x2029) =>
            {
                out.push(c)
            }
            c if (c as u32) <= 0xFFFF => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push_str(&format!("\\U{:08X}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// `s` as a YAML scalar in one of three styles (plain only when safe).
pub fn quote(s: &str, style: u8) -> String {
    let printable = s.chars().all(|c| {
        (' '..='~').contains(&c)
            || ((c as u32) >= 0xA0
                && !matches!(c as u32, 0xFEFF | 0xFFFE | 0xFFFF | 0x2028 | 0x2029))
    });
    match style % 3 {
        0 if plain_ok(s) => s.to_string(),
        1 if printable => format!("'{}'", s.replace('\'', "''")),
        _ => double_quoted(s),
    }
}

/// What kind of value a tracked field holds (decides the wrong values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A string (names, paths, addresses, enum tags).
    Str,
    /// An integer (ports, sizes, counts).
    Int,
    /// A duration string (`10m`).
    Duration,
}

/// A scalar field on a line of its own: `prefix` is everything before the
/// value (`  name: ` or `    - `), `path` its field path as errors name it.
#[derive(Clone, Debug)]
pub struct Field {
    pub path: String,
    pub kind: Kind,
    pub prefix: String,
    /// The key, when it has one that can be renamed.
    pub key: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Doc {
    pub lines: Vec<String>,
    /// `(line index, field)` for every tracked field.
    pub fields: Vec<(usize, Field)>,
}

impl Doc {
    pub fn push(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }
    /// A `key: value` line at `indent` (or `- value` when `key` is empty),
    /// tracked as `path`.
    pub fn field(&mut self, indent: usize, key: &str, value: String, path: String, kind: Kind) {
        let prefix = if key.is_empty() {
            format!("{}- ", " ".repeat(indent))
        } else {
            format!("{}{key}: ", " ".repeat(indent))
        };
        self.fields.push((
            self.lines.len(),
            Field {
                path,
                kind,
                prefix: prefix.clone(),
                key: (!key.is_empty()).then(|| key.to_string()),
            },
        ));
        self.lines.push(format!("{prefix}{value}"));
    }
    pub fn append(&mut self, other: Doc) {
        let base = self.lines.len();
        self.lines.extend(other.lines);
        self.fields
            .extend(other.fields.into_iter().map(|(i, f)| (i + base, f)));
    }
    pub fn text(&self) -> String {
        let mut t = self.lines.join("\n");
        t.push('\n');
        t
    }
}

/// Values of the wrong type for a field of `kind`, each with a word the
/// error must contain.
pub fn wrong_values(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Str => &["[a, b]", "{x: 1}", "12", "true", "3.5", "[]", "{}"],
        Kind::Int => &[
            "\"80\"",
            "[1]",
            "{a: 1}",
            "x",
            "-1",
            "99999999999999999999999",
            "1.5",
            "true",
        ],
        Kind::Duration => &["[1s]", "{a: 1}", "12", "true", "ten minutes", "-1s"],
    }
}

/// One change to a rendered document.
#[derive(Clone, Debug)]
pub enum Mutation {
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    /// Re-indent a line by -2..=+3 columns.
    Indent(usize, i8),
    /// Replace a tracked field's value with this text.
    Value(usize, String),
    /// Rename a tracked field's key.
    RenameKey(usize, String),
    /// Put a YAML tag before a tracked field's value.
    Tag(usize, String),
    /// Cut the text at this byte (at a character boundary).
    Truncate(usize),
    /// Insert text at this byte.
    Insert(usize, String),
    /// Replace a field's value with an alias bomb: `depth` levels of
    /// `fanout` aliases of the level below.
    Laughs(usize, u8, u8),
    /// Replace a field's value with `depth` nested flow sequences.
    DeepFlow(usize, u16),
    /// Replace a field's value with `depth` nested block mappings.
    DeepBlock(usize, u16),
    /// Add a document (any text) at the end.
    ExtraDocument(String),
    /// Windows line ends.
    CrLf,
    /// A byte-order mark at the start.
    Bom,
}

fn pick(n: usize, len: usize) -> Option<usize> {
    (len > 0).then(|| n % len)
}

/// Apply `muts` in order to `doc`'s text.
pub fn apply(doc: &Doc, muts: &[Mutation]) -> String {
    let mut lines = doc.lines.clone();
    let fields = &doc.fields;
    let mut crlf = false;
    let mut bom = false;
    let mut text_ops: Vec<&Mutation> = Vec::new();
    for m in muts {
        let field_line = |i: usize| pick(i, fields.len()).map(|k| (fields[k].0, &fields[k].1));
        match m {
            Mutation::DeleteLine(i) => {
                if let Some(i) = pick(*i, lines.len()) {
                    lines.remove(i);
                }
            }
            Mutation::DuplicateLine(i) => {
                if let Some(i) = pick(*i, lines.len()) {
                    let l = lines[i].clone();
                    lines.insert(i, l);
                }
            }
            Mutation::SwapLines(a, b) => {
                if let (Some(a), Some(b)) = (pick(*a, lines.len()), pick(*b, lines.len())) {
                    lines.swap(a, b);
                }
            }
            Mutation::Indent(i, d) => {
                if let Some(i) = pick(*i, lines.len()) {
                    let l = &lines[i];
                    lines[i] = if *d >= 0 {
                        format!("{}{l}", " ".repeat(*d as usize))
                    } else {
                        let strip = l.len() - l.trim_start_matches(' ').len();
                        l[strip.min(d.unsigned_abs() as usize)..].to_string()
                    };
                }
            }
            Mutation::Value(f, v) | Mutation::Tag(f, v) => {
                if let Some((i, field)) = field_line(*f) {
                    if i < lines.len() && lines[i].starts_with(&field.prefix) {
                        let old = lines[i][field.prefix.len()..].to_string();
                        let new = match m {
                            Mutation::Tag(..) => format!("{v} {old}"),
                            _ => v.clone(),
                        };
                        lines[i] = format!("{}{new}", field.prefix);
                    }
                }
            }
            Mutation::RenameKey(f, k) => {
                if let Some((i, field)) = field_line(*f) {
                    if let Some(key) = &field.key {
                        if i < lines.len() && lines[i].starts_with(&field.prefix) {
                            // What precedes the key: indentation, maybe `- `.
                            let lead = &field.prefix[..field.prefix.len() - key.len() - 2];
                            let rest = &lines[i][field.prefix.len()..];
                            lines[i] = format!("{lead}{k}: {rest}");
                        }
                    }
                }
            }
            Mutation::Laughs(f, depth, fanout) => {
                if let Some((i, field)) = field_line(*f) {
                    if i < lines.len() && lines[i].starts_with(&field.prefix) {
                        // Each level is defined (anchored) before the next
                        // one refers to it, all inside the value.
                        let mut v = "&l0 [lol, lol, lol]".to_string();
                        for d in 1..=*depth as usize {
                            let refs = vec![format!("*l{}", d - 1); (*fanout).max(1) as usize];
                            v = format!("[{v}, &l{d} [{}]]", refs.join(", "));
                        }
                        lines[i] = format!("{}{v}", field.prefix);
                    }
                }
            }
            Mutation::DeepFlow(f, depth) => {
                if let Some((i, field)) = field_line(*f) {
                    if i < lines.len() {
                        let d = *depth as usize;
                        lines[i] = format!("{}{}{}", field.prefix, "[".repeat(d), "]".repeat(d));
                    }
                }
            }
            Mutation::DeepBlock(f, depth) => {
                if let Some((i, field)) = field_line(*f) {
                    if i < lines.len() && field.key.is_some() {
                        let indent = field.prefix.len() - field.prefix.trim_start().len();
                        let mut block = vec![field.prefix.trim_end().to_string()];
                        for d in 1..=*depth as usize {
                            block.push(format!("{}k{d}:", " ".repeat(indent + d)));
                        }
                        block.push(format!("{}x", " ".repeat(indent + *depth as usize + 1)));
                        lines.splice(i..=i, block);
                    }
                }
            }
            Mutation::ExtraDocument(t) => {
                lines.push("---".into());
                lines.extend(t.lines().map(str::to_string));
            }
            Mutation::CrLf => crlf = true,
            Mutation::Bom => bom = true,
            Mutation::Truncate(_) | Mutation::Insert(..) => text_ops.push(m),
        }
    }
    let mut text = lines.join(if crlf { "\r\n" } else { "\n" });
    text.push('\n');
    for m in text_ops {
        match m {
            Mutation::Truncate(at) => {
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.truncate(at);
            }
            Mutation::Insert(at, s) => {
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.insert_str(at, s);
            }
            _ => {}
        }
    }
    if bom {
        text.insert(0, '\u{feff}');
    }
    text
}

/// Short hostile strings: YAML syntax, unicode, control characters.
pub fn garbage() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\t".to_string()),
        Just(": : :".to_string()),
        Just("- ".to_string()),
        Just("{".to_string()),
        Just("]".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("&a".to_string()),
        Just("*a".to_string()),
        Just("!!python/object:os.system".to_string()),
        Just("<<: *a".to_string()),
        Just("? complex\n: key".to_string()),
        Just("%YAML 1.1\n".to_string()),
        Just("\u{0}".to_string()),
        Just("\u{feff}".to_string()),
        Just("\u{202e}".to_string()),
        Just("\u{1F600}".to_string()),
        Just("\r".to_string()),
        Just("\u{85}".to_string()),
        Just("\u{2028}".to_string()),
        Just("漢字".to_string()),
        Just("...".to_string()),
        Just("---".to_string()),
        Just("|\n".to_string()),
        Just(">-\n  folded".to_string()),
        Just("99999999999999999999999999999".to_string()),
        Just("-0x8000000000000000".to_string()),
        Just(".NaN".to_string()),
        "\\PC{0,12}",
        proptest::collection::vec(any::<char>(), 0..8).prop_map(|v| v.into_iter().collect()),
    ]
}

/// Any mutation (for the chaos runs).
pub fn mutation() -> impl Strategy<Value = Mutation> {
    let idx = 0usize..10_000;
    prop_oneof![
        3 => idx.clone().prop_map(Mutation::DeleteLine),
        3 => idx.clone().prop_map(Mutation::DuplicateLine),
        2 => (idx.clone(), idx.clone()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        2 => (idx.clone(), -2i8..=3).prop_map(|(a, d)| Mutation::Indent(a, d)),
        4 => (idx.clone(), prop_oneof![
            prop::sample::select(wrong_values(Kind::Str)).prop_map(str::to_string),
            prop::sample::select(wrong_values(Kind::Int)).prop_map(str::to_string),
            garbage(),
        ]).prop_map(|(f, v)| Mutation::Value(f, v)),
        2 => (idx.clone(), "[a-zA-Z_]{1,12}").prop_map(|(f, k)| Mutation::RenameKey(f, k)),
        2 => (idx.clone(), prop::sample::select(vec![
            "!!str", "!!int", "!!binary", "!!map", "!!seq", "!!null", "!custom", "!<tag:yaml.org,2002:str>",
            "!!python/object/apply:os.system", "!!float", "!!timestamp",
        ])).prop_map(|(f, t)| Mutation::Tag(f, t.to_string())),
        2 => idx.clone().prop_map(Mutation::Truncate),
        3 => (idx.clone(), garbage()).prop_map(|(a, s)| Mutation::Insert(a, s)),
        1 => (idx.clone(), 1u8..12, 1u8..12).prop_map(|(f, d, n)| Mutation::Laughs(f, d, n)),
        1 => (idx.clone(), 1u16..400).prop_map(|(f, d)| Mutation::DeepFlow(f, d)),
        1 => (idx.clone(), 1u16..300).prop_map(|(f, d)| Mutation::DeepBlock(f, d)),
        1 => garbage().prop_map(Mutation::ExtraDocument),
        1 => Just(Mutation::CrLf),
        1 => Just(Mutation::Bom),
    ]
}

/// Number of lines as the YAML parser counts them (it also breaks lines at
/// a lone `\r`, NEL and the unicode line and paragraph separators).
pub fn line_count(text: &str) -> usize {
    let mut n = 1;
    let mut prev_cr = false;
    for c in text.chars() {
        match c {
            '\n' if prev_cr => {}
            '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' => n += 1,
            _ => {}
        }
        prev_cr = c == '\r';
    }
    n
}
