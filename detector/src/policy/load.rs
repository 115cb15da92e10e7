//! Reading intent files into validated intents, with every error as
//! `file:line: message` (the line of the offending field).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    io::Read,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use detector_common::{PolicyAction, MAX_PORTS};
use ipnet::IpNet;
use serde::Deserialize;
use serde_norway::Value;

use crate::yaml::{
    clamp_line, error_message,
    locate::{FieldPath, Locator, Target as At},
    too_deep, MAX_FLOW_DEPTH,
};

use super::{
    dns::DnsTable, CgroupGlob, Destination, Intent, IntentSet, PolicyError, Ports, Reader,
    Selector, Target, API_VERSION, KIND,
};

/// Files larger than this are rejected: intents are small, a ConfigMap holds
/// at most 1 MiB too, and this bounds the work a hostile file can cause
/// (each reported error re-parses its document to find its line: ~1 s for
/// a worst-case file).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Errors reported per file before the rest are summed up in one line.
pub const MAX_ERRORS_PER_FILE: usize = 50;
/// Documents read per file.
const MAX_DOCUMENTS: usize = 10_000;

/// Loading failed: every error found (sorted by file, then line).
#[derive(Clone, Debug, Default)]
pub struct LoadError {
    pub errors: Vec<PolicyError>,
    /// Files read (or attempted).
    pub files: usize,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

/// The files `paths` stand for: a file as given (any extension), a directory
/// as its `*.yaml` / `*.yml` files (not recursive; hidden names such as a
/// ConfigMap's `..data` skipped), sorted by name. The same file named twice
/// is read once.
pub(super) fn expand(paths: &[PathBuf], errors: &mut Vec<PolicyError>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |p: PathBuf, out: &mut Vec<PathBuf>| {
        let key = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
        if seen.insert(key) {
            out.push(p);
        }
    };
    for path in paths {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => match std::fs::read_dir(path) {
                Ok(rd) => {
                    let mut files: Vec<PathBuf> = rd
                        .filter_map(|e| e.ok())
                        .filter(|e| {
                            let name = e.file_name();
                            let name = name.to_string_lossy();
                            !name.starts_with('.')
                                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                        })
                        .map(|e| e.path())
                        .filter(|p| p.is_file())
                        .collect();
                    files.sort();
                    for f in files {
                        push(f, &mut out);
                    }
                }
                Err(e) => errors.push(PolicyError {
                    file: path.clone(),
                    line: 1,
                    message: format!("cannot read directory: {e}"),
                }),
            },
            Ok(_) => push(path.clone(), &mut out),
            Err(e) => errors.push(PolicyError {
                file: path.clone(),
                line: 1,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    out
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut buf = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "file larger than {} bytes; not an intent file?",
            MAX_FILE_BYTES
        ));
    }
    Ok(buf)
}

/// Load every intent under `paths`. All errors of all files are collected;
/// any error fails the whole load (a half-loaded policy is worse than the
/// previous one). `host` destinations share their entries through `dns`.
pub fn load(paths: &[PathBuf], dns: &DnsTable) -> Result<IntentSet, LoadError> {
    let mut errors = Vec::new();
    let files = expand(paths, &mut errors);
    let mut intents = Vec::new();
    let mut warnings = Vec::new();
    for file in &files {
        let mut file_errors = Vec::new();
        match read_file(file) {
            Ok(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => {
                    let (mut is, ws) = parse_text(file, text, dns, &mut file_errors);
                    intents.append(&mut is);
                    warnings.extend(ws);
                }
                Err(e) => {
                    let line = 1 + bytes[..e.valid_up_to()]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count();
                    file_errors.push(PolicyError {
                        file: file.clone(),
                        line,
                        message: "not valid UTF-8 text".into(),
                    });
                }
            },
            Err(message) => file_errors.push(PolicyError {
                file: file.clone(),
                line: 1,
                message,
            }),
        }
        errors.extend(file_errors);
    }
    check_duplicates(&intents, &mut errors);
    let mut set = IntentSet::new(intents);
    set.files = files.len();
    set.warnings = warnings;
    if errors.is_empty() {
        Ok(set)
    } else {
        // Files in the order given, lines ascending within a file.
        let order: HashMap<&PathBuf, usize> =
            files.iter().enumerate().map(|(i, f)| (f, i)).collect();
        errors.sort_by_key(|e| (order.get(&e.file).copied().unwrap_or(usize::MAX), e.line));
        Err(LoadError {
            errors,
            files: files.len(),
        })
    }
}

/// Parse one file's text (for tests and callers with text in hand).
pub fn load_str(file: &Path, text: &str, dns: &DnsTable) -> Result<IntentSet, LoadError> {
    let mut errors = Vec::new();
    let (intents, warnings) = parse_text(file, text, dns, &mut errors);
    check_duplicates(&intents, &mut errors);
    if errors.is_empty() {
        let mut set = IntentSet::new(intents);
        set.files = 1;
        set.warnings = warnings;
        Ok(set)
    } else {
        errors.sort_by_key(|e| e.line);
        Err(LoadError { errors, files: 1 })
    }
}

/// The error that stops document `doc` of `text` from loading, if any.
/// `IgnoredAny` accepts duplicate keys, so this is the parser's own error.
fn load_error(text: &str, doc: usize) -> Option<serde_norway::Error> {
    let de = serde_norway::Deserializer::from_str(text).nth(doc)?;
    serde::de::IgnoredAny::deserialize(de).err()
}

/// A YAML syntax error's message, without the parser's own position.
fn syntax_message(e: &serde_norway::Error) -> String {
    format!("YAML: {}", error_message(e))
}

fn check_duplicates(intents: &[Intent], errors: &mut Vec<PolicyError>) {
    let mut first: HashMap<(&str, &str), &Intent> = HashMap::new();
    for i in intents {
        match first.get(&(i.namespace.as_str(), i.name.as_str())) {
            Some(prev) => errors.push(PolicyError {
                file: i.file.clone(),
                line: i.line,
                message: format!(
                    "metadata.name: duplicate intent {}; first defined at {}:{}",
                    i.id(),
                    prev.file.display(),
                    prev.line
                ),
            }),
            None => {
                first.insert((i.namespace.as_str(), i.name.as_str()), i);
            }
        }
    }
}

/// `parse_text_unguarded`, but a panic inside the YAML library (serde_norway
/// 0.9 has some on malformed event streams; see `yaml::locate::probe`) is
/// one error of this file: intent files are untrusted input, and a reload
/// must never take the daemon down.
fn parse_text(
    file: &Path,
    text: &str,
    dns: &DnsTable,
    errors: &mut Vec<PolicyError>,
) -> (Vec<Intent>, Vec<PolicyError>) {
    let mut found = Vec::new();
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parse_text_unguarded(file, text, dns, &mut found)
    }));
    match parsed {
        Ok(r) => {
            errors.append(&mut found);
            r
        }
        Err(_) => {
            errors.push(PolicyError {
                file: file.into(),
                line: 1,
                message: "the YAML parser failed on this file (malformed YAML)".into(),
            });
            (Vec::new(), Vec::new())
        }
    }
}

fn parse_text_unguarded(
    file: &Path,
    text: &str,
    dns: &DnsTable,
    errors: &mut Vec<PolicyError>,
) -> (Vec<Intent>, Vec<PolicyError>) {
    let mut intents = Vec::new();
    let mut warnings = Vec::new();
    let mut found: Vec<PolicyError> = Vec::new();
    if let Some(line) = too_deep(text) {
        errors.push(PolicyError {
            file: file.into(),
            line,
            message: format!("nesting deeper than {MAX_FLOW_DEPTH} levels of [ and {{"),
        });
        return (intents, warnings);
    }
    let mut locator = Locator::new(text);
    for (doc, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        if doc >= MAX_DOCUMENTS {
            found.push(PolicyError {
                file: file.into(),
                line: 1,
                message: format!("more than {MAX_DOCUMENTS} documents"),
            });
            break;
        }
        let value = match Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                let line = clamp_line(text, e.location().map_or(1, |l| l.line()));
                let message = syntax_message(&e);
                found.push(PolicyError {
                    file: file.into(),
                    line,
                    message,
                });
                // The parser cannot resynchronise after a syntax error (it
                // would repeat it for ever, and deserializing what is left
                // of the document panics inside serde_norway): stop reading
                // this file. A duplicate key is only a complaint about a
                // document that otherwise loaded, so reading may go on, if
                // the document really loaded in full.
                if e.to_string().contains("duplicate entry") {
                    if let Some(e) = load_error(text, doc) {
                        found.push(PolicyError {
                            file: file.into(),
                            line: clamp_line(text, e.location().map_or(1, |l| l.line())),
                            message: syntax_message(&e),
                        });
                        break;
                    }
                    // Capped like any other error: a stream of documents
                    // with duplicate keys must not yield unbounded errors.
                    if found.len() < MAX_ERRORS_PER_FILE {
                        continue;
                    }
                    found.push(PolicyError {
                        file: file.into(),
                        line,
                        message: "too many errors; stopped reading this file".into(),
                    });
                }
                break;
            }
        };
        if value.is_null() {
            continue; // an empty document (`---` alone, or only comments)
        }
        let mut cx = Cx {
            text,
            doc,
            problems: Vec::new(),
            dns,
        };
        let intent = cx.intent(&value);
        let doc_line = locator.doc_line(doc).unwrap_or(1);
        let mut resolve = |p: Problem| {
            let line = if p.path.0.is_empty() {
                doc_line
            } else {
                locator.best_line(doc, &p.path, p.at, doc_line)
            };
            let message = if p.path.0.is_empty() {
                p.message
            } else {
                format!("{}: {}", p.path, p.message)
            };
            PolicyError {
                file: file.into(),
                line,
                message,
            }
        };
        let (bad, warn): (Vec<Problem>, Vec<Problem>) =
            cx.problems.into_iter().partition(|p| !p.warning);
        let budget = MAX_ERRORS_PER_FILE.saturating_sub(found.len());
        let over = bad.len().saturating_sub(budget);
        found.extend(bad.into_iter().take(budget).map(&mut resolve));
        if over > 0 {
            found.push(PolicyError {
                file: file.into(),
                line: doc_line,
                message: format!("{over} more errors in this document not shown"),
            });
        }
        warnings.extend(warn.into_iter().take(MAX_ERRORS_PER_FILE).map(resolve));
        if let Some(mut intent) = intent {
            intent.file = file.into();
            intent.line = locator
                .line_of(
                    doc,
                    &FieldPath::root().key("metadata").key("name"),
                    At::Value,
                )
                .unwrap_or(doc_line);
            intents.push(intent);
        }
        if found.len() >= MAX_ERRORS_PER_FILE {
            if over == 0 {
                found.push(PolicyError {
                    file: file.into(),
                    line: doc_line,
                    message: "too many errors; stopped reading this file".into(),
                });
            }
            break;
        }
    }
    let failed = !found.is_empty();
    errors.extend(found);
    if failed {
        // Intents of a file with errors are not used; keep them out of the
        // duplicate check too (it would only add noise).
        intents.clear();
    }
    (intents, warnings)
}

struct Problem {
    path: FieldPath,
    at: At,
    message: String,
    warning: bool,
}

struct Cx<'a> {
    #[allow(dead_code)]
    text: &'a str,
    #[allow(dead_code)]
    doc: usize,
    problems: Vec<Problem>,
    dns: &'a DnsTable,
}

/// A short description of a YAML value for messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let s: String = s.chars().take(80).collect();
            format!("{s:?}")
        }
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn quoted(s: &str) -> String {
    let s: String = s.chars().take(200).collect();
    format!("{s:?}")
}

impl Cx<'_> {
    fn error(&mut self, path: &FieldPath, at: At, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.clone(),
            at,
            message: message.into(),
            warning: false,
        });
    }
    fn warn(&mut self, path: &FieldPath, at: At, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.clone(),
            at,
            message: message.into(),
            warning: true,
        });
    }

    /// The fields of a mapping, reporting unknown and non-string keys.
    fn fields<'v>(
        &mut self,
        path: &FieldPath,
        v: &'v Value,
        allowed: &[&str],
    ) -> Option<BTreeMap<&'v str, &'v Value>> {
        let Value::Mapping(m) = v else {
            self.error(
                path,
                At::Value,
                format!("expected a mapping, found {}", describe(v)),
            );
            return None;
        };
        let mut out = BTreeMap::new();
        for (k, val) in m {
            match k {
                Value::String(k) if allowed.contains(&k.as_str()) => {
                    out.insert(k.as_str(), val);
                }
                Value::String(k) => {
                    let hint = suggestion(k, allowed);
                    self.error(
                        &path.key(k),
                        At::Key,
                        format!(
                            "unknown field{hint}; expected one of {}",
                            allowed.join(", ")
                        ),
                    );
                }
                other => self.error(
                    path,
                    At::Value,
                    format!("keys must be strings, found {}", describe(other)),
                ),
            }
        }
        Some(out)
    }

    fn string(&mut self, path: &FieldPath, v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.error(
                    path,
                    At::Value,
                    format!("expected a string, found {}", describe(other)),
                );
                None
            }
        }
    }

    fn seq<'v>(
        &mut self,
        path: &FieldPath,
        v: &'v Value,
        null_hint: &str,
    ) -> Option<&'v Vec<Value>> {
        match v {
            Value::Sequence(s) => Some(s),
            Value::Null => {
                self.error(
                    path,
                    At::Key,
                    format!("expected a list, found null{null_hint}"),
                );
                None
            }
            other => {
                self.error(
                    path,
                    At::Value,
                    format!("expected a list, found {}", describe(other)),
                );
                None
            }
        }
    }

    fn string_map(&mut self, path: &FieldPath, v: &Value) -> Option<BTreeMap<String, String>> {
        let Value::Mapping(m) = v else {
            self.error(
                path,
                At::Value,
                format!("expected a mapping of strings, found {}", describe(v)),
            );
            return None;
        };
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (k, val) in m {
            let Value::String(k) = k else {
                self.error(
                    path,
                    At::Value,
                    format!("keys must be strings, found {}", describe(k)),
                );
                ok = false;
                continue;
            };
            match val {
                Value::String(s) => {
                    out.insert(k.clone(), s.clone());
                }
                other => {
                    self.error(
                        &path.key(k),
                        At::Value,
                        format!("expected a string, found {} (quote it)", describe(other)),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn intent(&mut self, v: &Value) -> Option<Intent> {
        let root = FieldPath::root();
        let Value::Mapping(_) = v else {
            self.error(
                &root,
                At::Value,
                format!("expected a {KIND} mapping, found {}", describe(v)),
            );
            return None;
        };
        let f = self.fields(&root, v, &["apiVersion", "kind", "metadata", "spec"])?;
        let mut ok = true;
        match f.get("apiVersion") {
            None => {
                self.error(
                    &root,
                    At::Value,
                    format!("missing field apiVersion (expected {API_VERSION})"),
                );
                ok = false;
            }
            Some(v) => {
                let p = root.key("apiVersion");
                match self.string(&p, v) {
                    Some(s) if s == API_VERSION => {}
                    Some(s) => {
                        self.error(
                            &p,
                            At::Value,
                            format!(
                                "unsupported apiVersion {}; expected {API_VERSION}",
                                quoted(&s)
                            ),
                        );
                        ok = false;
                    }
                    None => ok = false,
                }
            }
        }
        match f.get("kind") {
            None => {
                self.error(
                    &root,
                    At::Value,
                    format!("missing field kind (expected {KIND})"),
                );
                ok = false;
            }
            Some(v) => {
                let p = root.key("kind");
                match self.string(&p, v) {
                    Some(s) if s == KIND => {}
                    Some(s) => {
                        self.error(
                            &p,
                            At::Value,
                            format!("unsupported kind {}; expected {KIND}", quoted(&s)),
                        );
                        ok = false;
                    }
                    None => ok = false,
                }
            }
        }
        let meta = match f.get("metadata") {
            None => {
                self.error(&root, At::Value, "missing field metadata");
                None
            }
            Some(v) => self.metadata(&root.key("metadata"), v),
        };
        let spec = match f.get("spec") {
            None => {
                self.error(&root, At::Value, "missing field spec");
                None
            }
            Some(v) => self.spec(&root.key("spec"), v),
        };
        let ((name, namespace), (selector, readers, destinations, action)) = (meta?, spec?);
        ok.then(|| Intent {
            name,
            namespace,
            file: PathBuf::new(),
            line: 0,
            selector,
            readers,
            destinations,
            action,
        })
    }

    fn metadata(&mut self, path: &FieldPath, v: &Value) -> Option<(String, String)> {
        let f = self.fields(path, v, &["name", "namespace", "labels", "annotations"])?;
        let mut ok = true;
        for extra in ["labels", "annotations"] {
            if let Some(v) = f.get(extra) {
                ok &= self.string_map(&path.key(extra), v).is_some();
            }
        }
        let name = match f.get("name") {
            None => {
                self.error(path, At::Key, "missing field name");
                None
            }
            Some(v) => {
                let p = path.key("name");
                self.string(&p, v).and_then(|s| match dns_subdomain(&s) {
                    Ok(()) => Some(s),
                    Err(why) => {
                        self.error(&p, At::Value, format!("invalid name {}: {why}", quoted(&s)));
                        None
                    }
                })
            }
        };
        let namespace = match f.get("namespace") {
            None => Some("default".to_string()),
            Some(v) => {
                let p = path.key("namespace");
                self.string(&p, v).and_then(|s| match dns_label(&s) {
                    Ok(()) => Some(s),
                    Err(why) => {
                        self.error(
                            &p,
                            At::Value,
                            format!("invalid namespace {}: {why}", quoted(&s)),
                        );
                        None
                    }
                })
            }
        };
        if !ok {
            return None;
        }
        Some((name?, namespace?))
    }

    #[allow(clippy::type_complexity)]
    fn spec(
        &mut self,
        path: &FieldPath,
        v: &Value,
    ) -> Option<(
        Selector,
        Option<Vec<Reader>>,
        Option<Vec<Destination>>,
        PolicyAction,
    )> {
        let f = self.fields(path, v, &["selector", "readers", "destinations", "action"])?;
        let selector = match f.get("selector") {
            None => {
                self.error(path, At::Key, "missing field selector (at least one of namespace, serviceAccount, podLabels, podUID, cgroupPath)");
                None
            }
            Some(v) => self.selector(&path.key("selector"), v),
        };
        let mut ok = true;
        let readers = match f.get("readers") {
            None => None,
            Some(v) => match self.readers(&path.key("readers"), v) {
                Some(r) => Some(r),
                None => {
                    ok = false;
                    None
                }
            },
        };
        let destinations = match f.get("destinations") {
            None => None,
            Some(v) => match self.destinations(&path.key("destinations"), v) {
                Some(d) => Some(d),
                None => {
                    ok = false;
                    None
                }
            },
        };
        if !f.contains_key("readers") && !f.contains_key("destinations") {
            self.error(
                path,
                At::Key,
                "needs readers or destinations (an intent without either constrains nothing)",
            );
            ok = false;
        }
        let action = match f.get("action") {
            None => Some(PolicyAction::Alert),
            Some(v) => {
                let p = path.key("action");
                match self.string(&p, v).as_deref() {
                    Some("alert") => Some(PolicyAction::Alert),
                    Some("block") => Some(PolicyAction::Block),
                    Some("kill") => Some(PolicyAction::Kill),
                    Some(other) => {
                        self.error(
                            &p,
                            At::Value,
                            format!(
                                "unknown action {}; expected alert, block or kill",
                                quoted(other)
                            ),
                        );
                        None
                    }
                    None => None,
                }
            }
        };
        let (selector, action) = (selector?, action?);
        ok.then_some((selector, readers, destinations, action))
    }

    fn selector(&mut self, path: &FieldPath, v: &Value) -> Option<Selector> {
        let f = self.fields(
            path,
            v,
            &[
                "namespace",
                "serviceAccount",
                "podLabels",
                "podUID",
                "cgroupPath",
            ],
        )?;
        let mut ok = true;
        let mut sel = Selector::default();
        let mut nonempty = |cx: &mut Self, key: &str| -> Option<String> {
            let v = f.get(key)?;
            let p = path.key(key);
            match cx.string(&p, v) {
                Some(s) if s.is_empty() => {
                    cx.error(
                        &p,
                        At::Value,
                        "must not be empty (remove the field to match any)",
                    );
                    ok = false;
                    None
                }
                Some(s) => Some(s),
                None => {
                    ok = false;
                    None
                }
            }
        };
        sel.namespace = nonempty(self, "namespace");
        sel.service_account = nonempty(self, "serviceAccount");
        sel.pod_uid = nonempty(self, "podUID");
        if let Some(pattern) = nonempty(self, "cgroupPath") {
            let p = path.key("cgroupPath");
            if !pattern.starts_with('/') && !pattern.starts_with('*') {
                self.error(
                    &p,
                    At::Value,
                    format!(
                        "cgroupPath {} must start with / (a path under the cgroup-v2 root) or **",
                        quoted(&pattern)
                    ),
                );
                ok = false;
            } else {
                match CgroupGlob::new(&pattern) {
                    Ok(g) => sel.cgroup_path = Some(g),
                    Err(why) => {
                        self.error(
                            &p,
                            At::Value,
                            format!("invalid glob {}: {why}", quoted(&pattern)),
                        );
                        ok = false;
                    }
                }
            }
        }
        if let Some(v) = f.get("podLabels") {
            match self.string_map(&path.key("podLabels"), v) {
                Some(m) => sel.pod_labels = m,
                None => ok = false,
            }
        }
        if ok && sel.is_empty() {
            self.error(path, At::Key, "selector needs at least one of namespace, serviceAccount, podLabels, podUID, cgroupPath");
            return None;
        }
        ok.then_some(sel)
    }

    fn readers(&mut self, path: &FieldPath, v: &Value) -> Option<Vec<Reader>> {
        let items = self.seq(
            path,
            v,
            " (write [] for no reader, or remove the field to allow any)",
        )?;
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let p = path.index(i);
            let Some(s) = self.string(&p, item) else {
                ok = false;
                continue;
            };
            match reader(&s) {
                Ok(r) => out.push(r),
                Err(why) => {
                    self.error(&p, At::Value, format!("{} {why}", quoted(&s)));
                    ok = false;
                }
            }
        }
        out.sort();
        out.dedup();
        ok.then_some(out)
    }

    fn destinations(&mut self, path: &FieldPath, v: &Value) -> Option<Vec<Destination>> {
        let items = self.seq(
            path,
            v,
            " (write [] for none, or remove the field to allow any)",
        )?;
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.destination(&path.index(i), item) {
                Some(d) => out.push(d),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn destination(&mut self, path: &FieldPath, v: &Value) -> Option<Destination> {
        let f = self.fields(path, v, &["cidr", "host", "ports"])?;
        let ports = match f.get("ports") {
            None => Some(Ports::Any),
            Some(v) => self.ports(&path.key("ports"), v),
        };
        let target = match (f.get("cidr"), f.get("host")) {
            (Some(_), Some(_)) => {
                self.error(
                    &path.key("host"),
                    At::Key,
                    "give either cidr or host, not both",
                );
                None
            }
            (None, None) => {
                self.error(path, At::Value, "needs cidr or host");
                None
            }
            (Some(v), None) => {
                let p = path.key("cidr");
                self.string(&p, v).and_then(|s| match cidr(&s) {
                    Ok(n) => Some(Target::Cidr(n)),
                    Err(why) => {
                        self.error(&p, At::Value, why);
                        None
                    }
                })
            }
            (None, Some(v)) => {
                let p = path.key("host");
                self.string(&p, v).and_then(|s| match host(&s) {
                    Ok(h) => Some(Target::Host(self.dns.entry(&h))),
                    Err(why) => {
                        self.error(&p, At::Value, format!("invalid host {}: {why}", quoted(&s)));
                        None
                    }
                })
            }
        };
        let (target, ports) = (target?, ports?);
        if let Ports::List(l) = &ports {
            if l.len() > MAX_PORTS {
                self.warn(
                    &path.key("ports"),
                    At::Key,
                    format!(
                        "{} ports; the kernel holds {MAX_PORTS} per destination, so it allows any port there and userspace alerts on the others",
                        l.len()
                    ),
                );
            }
        }
        Some(Destination { target, ports })
    }

    fn ports(&mut self, path: &FieldPath, v: &Value) -> Option<Ports> {
        let items = self.seq(path, v, " (remove the field to allow any port)")?;
        if items.is_empty() {
            self.error(
                path,
                At::Key,
                "empty list; remove the field to allow any port",
            );
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let port = match item {
                Value::Number(n) => n
                    .as_u64()
                    .filter(|p| (1..=65535).contains(p))
                    .map(|p| p as u16),
                _ => None,
            };
            match port {
                Some(p) => out.push(p),
                None => {
                    self.error(
                        &path.index(i),
                        At::Value,
                        format!(
                            "invalid port {}; expected an integer in 1..=65535",
                            describe(item)
                        ),
                    );
                    ok = false;
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        ok.then_some(Ports::List(out))
    }
}

/// "did you mean" for a misspelt field name.
fn suggestion(k: &str, allowed: &[&str]) -> String {
    let lower = k.to_ascii_lowercase();
    if lower.len() > 64 {
        return String::new();
    }
    allowed
        .iter()
        .map(|a| {
            let al = a.to_ascii_lowercase();
            let close = al == lower
                || (lower.len() > 3 && (al.starts_with(&lower) || lower.starts_with(&al)))
                || (lower.len() > 3 && edit_distance(&al, &lower) <= 2);
            (a, close, edit_distance(&al, &lower))
        })
        .filter(|(_, close, _)| *close)
        .min_by_key(|(_, _, d)| *d)
        .map(|(a, _, _)| format!(" (did you mean {a}?)"))
        .unwrap_or_default()
}

/// Levenshtein distance (short strings only).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn reader(s: &str) -> Result<Reader, String> {
    let (path, prefix) = match s.strip_suffix('*') {
        Some(p) => (p, true),
        None => (s, false),
    };
    if !path.starts_with('/') {
        return Err("is not an absolute path".into());
    }
    if path.contains('*') || path.contains('?') || path.contains('[') {
        return Err("may only end in * (a prefix); no other glob characters".into());
    }
    if path.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    let comps: Vec<&str> = path.split('/').skip(1).collect();
    let last = comps.len().saturating_sub(1);
    for (i, c) in comps.iter().enumerate() {
        if (c.is_empty() && !(prefix && i == last)) || *c == "." || *c == ".." {
            return Err("is not a normalized path (no //, /./, /../ or trailing /); the kernel reports resolved executable paths".into());
        }
    }
    if prefix {
        Ok(Reader::Prefix(path.to_string()))
    } else {
        Ok(Reader::Exact(path.to_string()))
    }
}

fn cidr(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => return Err(format!("invalid CIDR {}", quoted(s))),
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "CIDR {} has host bits set; did you mean {}?",
            quoted(s),
            net.trunc()
        ));
    }
    Ok(net)
}

/// A DNS name, lower-cased and without a trailing dot.
fn host(s: &str) -> Result<String, String> {
    if s.parse::<IpAddr>().is_ok() || s.parse::<IpNet>().is_ok() {
        return Err("an address; use cidr".into());
    }
    let h = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if h.is_empty() || h.len() > 253 {
        return Err("a DNS name has 1 to 253 characters".into());
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each DNS label has 1 to 63 characters".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("DNS names use letters, digits, - and _".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a DNS label cannot start or end with -".into());
        }
    }
    Ok(h)
}

/// Kubernetes object name (RFC 1123 subdomain).
fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err("must have 1 to 253 characters".into());
    }
    for label in s.split('.') {
        dns_label(label).map_err(|_| {
            "must be lower-case letters, digits, - and . (a DNS subdomain)".to_string()
        })?;
    }
    Ok(())
}

/// Kubernetes namespace (RFC 1123 label).
fn dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 63 lower-case letters, digits and - (a DNS label)".into())
    }
}

/// `detector policy check PATH...`: prints each error as `file:line: message`
/// (and warnings as `file:line: warning: message`) to stderr, then a summary
/// (`N intents OK (M files)` on stdout, or `N errors in M files` on stderr);
/// returns whether everything is valid (the caller exits non-zero if not).
/// `Err` is never returned today (unreadable paths are reported as errors
/// like any other); it is there for the caller's `?`.
pub fn check_cli(paths: &[PathBuf]) -> anyhow::Result<bool> {
    let dns = DnsTable::default();
    match load(paths, &dns) {
        Ok(set) => {
            for w in &set.warnings {
                eprintln!("{}:{}: warning: {}", w.file.display(), w.line, w.message);
            }
            let files = if set.files == 1 { "file" } else { "files" };
            let intents = if set.len() == 1 { "intent" } else { "intents" };
            println!("{} {intents} OK ({} {files})", set.len(), set.files);
            Ok(true)
        }
        Err(e) => {
            for err in &e.errors {
                eprintln!("{err}");
            }
            let n = e.errors.len();
            let bad_files: HashSet<&PathBuf> = e.errors.iter().map(|e| &e.file).collect();
            eprintln!(
                "{n} {} in {} {}",
                if n == 1 { "error" } else { "errors" },
                bad_files.len(),
                if bad_files.len() == 1 {
                    "file"
                } else {
                    "files"
                }
            );
            Ok(false)
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<IntentSet>();
    is::<Arc<DnsTable>>();
}
