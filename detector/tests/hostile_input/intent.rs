//! The intent parser (`detector policy check` and the daemon's reloads):
//! valid WorkloadIntent streams from a small grammar, rendered in varied
//! YAML styles, must load to exactly the intents they were built from; the
//! same documents mutated must give errors with their file and line, and
//! never a panic.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use detector::policy::{load_str, DnsTable, Ports, Reader, Target};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::{prelude::*, test_runner::TestCaseError};

use crate::{
    check,
    harness::fuzz,
    yamlgen::{self, apply, quote, Doc, Kind, Mutation},
};

const FILE: &str = "fuzz/intents.yaml";

#[derive(Clone, Debug)]
enum DestTarget {
    /// As written, and the network it means.
    Cidr(String, IpNet),
    /// As written, and the name it means.
    Host(String, String),
}

#[derive(Clone, Debug)]
struct DestM {
    target: DestTarget,
    ports: Option<Vec<u16>>,
}

#[derive(Clone, Debug)]
struct IntentM {
    name: String,
    namespace: Option<String>,
    sel_namespace: Option<String>,
    service_account: Option<String>,
    pod_uid: Option<String>,
    cgroup_path: Option<String>,
    labels: BTreeMap<String, String>,
    readers: Option<Vec<String>>,
    destinations: Option<Vec<DestM>>,
    action: Option<&'static str>,
}

/// How to render: one byte of style choices per decision.
#[derive(Clone, Debug)]
struct Style {
    quotes: Vec<u8>,
    flow_metadata: bool,
    flow_selector: bool,
    flow_dests: bool,
    comments: bool,
    anchors: bool,
    doc_end_markers: bool,
    leading_marker: bool,
    empty_docs: bool,
}

fn dns_label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
}

/// Any text, unicode and control characters included, never empty.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9][a-z0-9._-]{0,15}",
        "\\PC{1,12}",
        proptest::collection::vec(any::<char>(), 1..10).prop_map(|v| v.into_iter().collect()),
        Just("true".to_string()),
        Just("123".to_string()),
        Just("null".to_string()),
        Just("- x".to_string()),
        Just("a: b".to_string()),
        Just("#x".to_string()),
    ]
}

fn reader() -> impl Strategy<Value = String> {
    let comp = "[a-zA-Z0-9_.é漢🙂 -]{1,10}".prop_filter("not . or ..", |c| c != "." && c != "..");
    (proptest::collection::vec(comp, 1..4), 0u8..4).prop_map(|(comps, form)| {
        let path = format!("/{}", comps.join("/"));
        match form {
            0 => format!("{path}*"),
            1 => format!("{path}/*"),
            _ => path,
        }
    })
}

fn cidr() -> impl Strategy<Value = DestTarget> {
    prop_oneof![
        (any::<u32>(), 0u8..=32, any::<bool>()).prop_map(|(a, p, bare)| {
            let net = Ipv4Net::new(Ipv4Addr::from(a), p).unwrap().trunc();
            let text = if p == 32 && bare {
                net.addr().to_string()
            } else {
                net.to_string()
            };
            DestTarget::Cidr(text, IpNet::V4(net))
        }),
        (any::<u128>(), 0u8..=128, any::<bool>()).prop_map(|(a, p, bare)| {
            let net = Ipv6Net::new(Ipv6Addr::from(a), p).unwrap().trunc();
            let text = if p == 128 && bare {
                net.addr().to_string()
            } else {
                net.to_string()
            };
            DestTarget::Cidr(text, IpNet::V6(net))
        }),
    ]
}

fn host() -> impl Strategy<Value = DestTarget> {
    (
        "[a-z]([a-z0-9_-]{0,8}[a-z0-9])?",
        proptest::collection::vec(dns_label(), 0..4),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(first, rest, dot, case)| {
            let mut name = first;
            for l in rest {
                name.push('.');
                name.push_str(&l);
            }
            let written: String = name
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if case >> (i % 64) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            let written = if dot { format!("{written}.") } else { written };
            DestTarget::Host(written, name)
        })
}

fn destination() -> impl Strategy<Value = DestM> {
    (
        prop_oneof![cidr(), host()],
        proptest::option::of(proptest::collection::vec(1u16..=65535, 1..6)),
    )
        .prop_map(|(target, ports)| DestM { target, ports })
}

fn cgroup_glob() -> impl Strategy<Value = String> {
    let comp = prop_oneof![
        3 => "[a-z0-9_.-]{1,8}",
        1 => Just("*".to_string()),
        1 => Just("**".to_string()),
        1 => "[a-z]{1,4}\\*",
    ];
    (proptest::collection::vec(comp, 1..5), any::<bool>()).prop_map(|(c, star)| {
        if star {
            format!("**/{}", c.join("/"))
        } else {
            format!("/{}", c.join("/"))
        }
    })
}

fn intent() -> impl Strategy<Value = IntentM> {
    (
        (
            proptest::collection::vec(dns_label(), 1..3),
            proptest::option::of(dns_label()),
            proptest::option::of(any_text()),
            proptest::option::of(any_text()),
            proptest::option::of(any_text()),
            proptest::option::of(cgroup_glob()),
            proptest::collection::btree_map(any_text(), any_text(), 0..3),
        ),
        (
            proptest::option::of(proptest::collection::vec(reader(), 0..4)),
            proptest::option::of(proptest::collection::vec(destination(), 0..4)),
            prop::sample::select(vec![None, Some("alert"), Some("block"), Some("kill")]),
        ),
    )
        .prop_map(
            |((name, ns, sns, sa, uid, cg, labels), (readers, destinations, action))| {
                let mut i = IntentM {
                    name: name.join("."),
                    namespace: ns,
                    sel_namespace: sns,
                    service_account: sa,
                    pod_uid: uid,
                    cgroup_path: cg,
                    labels,
                    readers,
                    destinations,
                    action,
                };
                if i.sel_namespace.is_none()
                    && i.service_account.is_none()
                    && i.pod_uid.is_none()
                    && i.cgroup_path.is_none()
                    && i.labels.is_empty()
                {
                    i.sel_namespace = Some("default".into());
                }
                if i.readers.is_none() && i.destinations.is_none() {
                    i.readers = Some(Vec::new());
                }
                i
            },
        )
}

fn style() -> impl Strategy<Value = Style> {
    (
        proptest::collection::vec(any::<u8>(), 64),
        any::<[bool; 8]>(),
    )
        .prop_map(|(quotes, b)| Style {
            quotes,
            flow_metadata: b[0],
            flow_selector: b[1],
            flow_dests: b[2],
            comments: b[3],
            anchors: b[4],
            doc_end_markers: b[5],
            leading_marker: b[6],
            empty_docs: b[7],
        })
}

/// Intents with unique names (a suffix per position).
fn stream() -> impl Strategy<Value = (Vec<IntentM>, Style)> {
    (proptest::collection::vec(intent(), 1..4), style()).prop_map(|(mut v, s)| {
        for (i, m) in v.iter_mut().enumerate() {
            m.name = format!("{}-{i}", m.name);
        }
        (v, s)
    })
}

struct Quoter<'a> {
    style: &'a Style,
    n: usize,
}

impl Quoter<'_> {
    fn q(&mut self, s: &str) -> String {
        self.n += 1;
        quote(s, self.style.quotes[self.n % self.style.quotes.len()])
    }
    fn comment(&mut self) -> String {
        self.n += 1;
        let pick = self.style.quotes[self.n % self.style.quotes.len()];
        if self.style.comments && pick.is_multiple_of(4) {
            " # a comment: [ { & * ! 漢 🙂".to_string()
        } else {
            String::new()
        }
    }
}

fn ports_flow(p: &[u16]) -> String {
    let v: Vec<String> = p.iter().map(u16::to_string).collect();
    format!("[{}]", v.join(", "))
}

fn render_one(m: &IntentM, q: &mut Quoter) -> Doc {
    let st = q.style;
    let mut d = Doc::default();
    d.push(format!("apiVersion: detector.dev/v1alpha1{}", q.comment()));
    d.push("kind: WorkloadIntent");
    if st.flow_metadata {
        let mut parts = vec![format!("name: {}", q.q(&m.name))];
        if let Some(ns) = &m.namespace {
            parts.push(format!("namespace: {}", q.q(ns)));
        }
        d.push(format!("metadata: {{{}}}", parts.join(", ")));
    } else {
        d.push(format!("metadata:{}", q.comment()));
        d.field(2, "name", q.q(&m.name), "metadata.name".into(), Kind::Str);
        if let Some(ns) = &m.namespace {
            d.field(
                2,
                "namespace",
                q.q(ns),
                "metadata.namespace".into(),
                Kind::Str,
            );
        }
    }
    d.push("spec:");
    let sel_fields: Vec<(&str, &Option<String>)> = vec![
        ("namespace", &m.sel_namespace),
        ("serviceAccount", &m.service_account),
        ("podUID", &m.pod_uid),
        ("cgroupPath", &m.cgroup_path),
    ];
    if st.flow_selector {
        let mut parts = Vec::new();
        for (k, v) in &sel_fields {
            if let Some(v) = v {
                parts.push(format!("{k}: {}", q.q(v)));
            }
        }
        if !m.labels.is_empty() {
            let l: Vec<String> = m
                .labels
                .iter()
                .map(|(k, v)| format!("{}: {}", q.q(k), q.q(v)))
                .collect();
            parts.push(format!("podLabels: {{{}}}", l.join(", ")));
        }
        d.push(format!("  selector: {{{}}}", parts.join(", ")));
    } else {
        d.push(format!("  selector:{}", q.comment()));
        for (k, v) in &sel_fields {
            if let Some(v) = v {
                let value = format!("{}{}", q.q(v), q.comment());
                d.field(4, k, value, format!("spec.selector.{k}"), Kind::Str);
            }
        }
        if !m.labels.is_empty() {
            d.push("    podLabels:");
            for (k, v) in &m.labels {
                d.push(format!("      {}: {}", q.q(k), q.q(v)));
            }
        }
    }
    if let Some(rs) = &m.readers {
        if rs.is_empty() {
            d.push("  readers: []");
        } else {
            let anchor = if st.anchors { " &readers" } else { "" };
            d.push(format!("  readers:{anchor}"));
            for (i, r) in rs.iter().enumerate() {
                d.field(4, "", q.q(r), format!("spec.readers[{i}]"), Kind::Str);
            }
        }
    }
    if let Some(ds) = &m.destinations {
        if ds.is_empty() {
            d.push("  destinations: []");
        } else {
            d.push("  destinations:");
            let mut anchors: HashMap<Vec<u16>, usize> = HashMap::new();
            for (i, dm) in ds.iter().enumerate() {
                let (key, text) = match &dm.target {
                    DestTarget::Cidr(t, _) => ("cidr", t),
                    DestTarget::Host(t, _) => ("host", t),
                };
                let ports = dm.ports.as_ref().map(|p| {
                    if st.anchors {
                        match anchors.get(p) {
                            Some(a) => format!("*p{a}"),
                            None => {
                                anchors.insert(p.clone(), i);
                                format!("&p{i} {}", ports_flow(p))
                            }
                        }
                    } else {
                        ports_flow(p)
                    }
                });
                if st.flow_dests {
                    let mut parts = vec![format!("{key}: {}", q.q(text))];
                    if let Some(p) = ports {
                        parts.push(format!("ports: {p}"));
                    }
                    d.push(format!("    - {{{}}}", parts.join(", ")));
                } else {
                    d.field(
                        4,
                        "",
                        format!("{key}: {}", q.q(text)),
                        format!("spec.destinations[{i}]"),
                        Kind::Str,
                    );
                    // The tracked field is the target's own line.
                    let last = d.fields.len() - 1;
                    d.fields[last].1.prefix = format!("    - {key}: ");
                    d.fields[last].1.path = format!("spec.destinations[{i}].{key}");
                    d.fields[last].1.key = Some(key.to_string());
                    match (&dm.ports, st.anchors) {
                        (Some(p), false) => {
                            d.push("      ports:");
                            for (j, port) in p.iter().enumerate() {
                                d.field(
                                    8,
                                    "",
                                    port.to_string(),
                                    format!("spec.destinations[{i}].ports[{j}]"),
                                    Kind::Int,
                                );
                            }
                        }
                        (Some(_), true) => d.push(format!("      ports: {}", ports.unwrap())),
                        (None, _) => {}
                    }
                }
            }
        }
    }
    if let Some(a) = m.action {
        d.field(2, "action", q.q(a), "spec.action".into(), Kind::Str);
    }
    d
}

fn render(ms: &[IntentM], st: &Style) -> Doc {
    let mut q = Quoter { style: st, n: 0 };
    let mut d = Doc::default();
    if st.leading_marker {
        d.push("--- # intents");
    }
    for (i, m) in ms.iter().enumerate() {
        if i > 0 {
            d.push("---");
        }
        if st.empty_docs && i > 0 {
            d.push("# an empty document");
            d.push("---");
        }
        d.append(render_one(m, &mut q));
        if st.doc_end_markers {
            d.push("...");
            if i + 1 < ms.len() {
                // `---` follows from the loop.
            }
        }
    }
    d
}

fn expected_reader(r: &str) -> Reader {
    match r.strip_suffix('*') {
        Some(p) => Reader::Prefix(p.to_string()),
        None => Reader::Exact(r.to_string()),
    }
}

/// The loaded set is exactly the models.
fn same(ms: &[IntentM], text: &str) -> Result<(), TestCaseError> {
    let set = match load_str(Path::new(FILE), text, &DnsTable::default()) {
        Ok(s) => s,
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "valid input rejected:\n{e}\n---\n{text}"
            )))
        }
    };
    check!(
        set.len() == ms.len(),
        "{} intents loaded, {} written",
        set.len(),
        ms.len()
    );
    let lines = yamlgen::line_count(text);
    for (got, m) in set.iter().zip(ms) {
        check!(got.name == m.name, "name {:?} != {:?}", got.name, m.name);
        let ns = m.namespace.clone().unwrap_or_else(|| "default".into());
        check!(
            got.namespace == ns,
            "namespace {:?} != {ns:?}",
            got.namespace
        );
        check!(
            got.line >= 1 && got.line <= lines,
            "intent line {}",
            got.line
        );
        let s = &got.selector;
        check!(
            s.namespace == m.sel_namespace,
            "selector.namespace {:?}",
            s.namespace
        );
        check!(
            s.service_account == m.service_account,
            "serviceAccount {:?}",
            s.service_account
        );
        check!(s.pod_uid == m.pod_uid, "podUID {:?}", s.pod_uid);
        check!(
            s.cgroup_path.as_ref().map(|g| g.as_str()) == m.cgroup_path.as_deref(),
            "cgroupPath {:?}",
            s.cgroup_path
        );
        check!(
            s.pod_labels == m.labels,
            "podLabels {:?} != {:?}",
            s.pod_labels,
            m.labels
        );
        let readers = m.readers.as_ref().map(|rs| {
            let mut v: Vec<Reader> = rs.iter().map(|r| expected_reader(r)).collect();
            v.sort();
            v.dedup();
            v
        });
        check!(
            got.readers == readers,
            "readers {:?} != {readers:?}",
            got.readers
        );
        match (&got.destinations, &m.destinations) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                check!(
                    g.len() == w.len(),
                    "{} destinations, {} written",
                    g.len(),
                    w.len()
                );
                for (gd, wd) in g.iter().zip(w) {
                    match (&gd.target, &wd.target) {
                        (Target::Cidr(n), DestTarget::Cidr(_, want)) => {
                            check!(n == want, "cidr {n} != {want}")
                        }
                        (Target::Host(h), DestTarget::Host(_, want)) => {
                            check!(h.name() == want, "host {} != {want}", h.name())
                        }
                        (g, w) => {
                            return Err(TestCaseError::fail(format!("target {g:?} != {w:?}")))
                        }
                    }
                    let want = match &wd.ports {
                        None => Ports::Any,
                        Some(p) => {
                            let mut p = p.clone();
                            p.sort_unstable();
                            p.dedup();
                            Ports::List(p)
                        }
                    };
                    check!(gd.ports == want, "ports {:?} != {want:?}", gd.ports);
                }
            }
            (g, w) => return Err(TestCaseError::fail(format!("destinations {g:?} vs {w:?}"))),
        }
        let action = detector::policy::action_name(got.action);
        check!(action == m.action.unwrap_or("alert"), "action {action}");
    }
    Ok(())
}

/// Whatever the input: no panic, and every error has our file and a line
/// inside the text, and a message.
fn errors_are_located(text: &str) -> Result<Option<Vec<(usize, String)>>, TestCaseError> {
    let lines = yamlgen::line_count(text);
    match load_str(Path::new(FILE), text, &DnsTable::default()) {
        Ok(set) => {
            for i in set.iter() {
                check!(
                    i.line >= 1 && i.line <= lines,
                    "intent {} at line {} of {lines}",
                    i.id(),
                    i.line
                );
            }
            Ok(None)
        }
        Err(e) => {
            check!(!e.errors.is_empty(), "an error without errors");
            check!(
                e.errors.len() <= 52,
                "{} errors for one file (the cap is 50 + 2 summary lines)",
                e.errors.len()
            );
            for err in &e.errors {
                check!(
                    err.file == Path::new(FILE),
                    "error names file {}",
                    err.file.display()
                );
                check!(
                    err.line >= 1 && err.line <= lines,
                    "error at line {} of {lines}: {err}\n--- text:\n{text:?}",
                    err.line
                );
                check!(
                    !err.message.trim().is_empty(),
                    "empty message at line {}",
                    err.line
                );
                // Messages echo the file's keys and values: never raw
                // control characters (terminal escapes, fake line breaks).
                check!(
                    !err.message.chars().any(char::is_control),
                    "control character in {err:?}"
                );
            }
            Ok(Some(
                e.errors
                    .iter()
                    .map(|e| (e.line, e.message.clone()))
                    .collect(),
            ))
        }
    }
}

#[test]
fn valid_intents_round_trip() {
    fuzz("intent/round-trip", stream(), |(ms, st)| {
        let doc = render(&ms, &st);
        same(&ms, &doc.text())
    });
}

/// One wrong-typed value or unknown key in an otherwise valid stream: an
/// error names that field and its line.
#[test]
fn a_wrong_field_is_reported_at_its_line() {
    let strategy = (
        stream(),
        any::<usize>(),
        any::<usize>(),
        any::<bool>(),
        "[a-z]{3,8}Bogus",
    );
    fuzz(
        "intent/wrong-field",
        strategy,
        |((ms, st), f, v, rename, key)| {
            let doc = render(&ms, &st);
            if doc.fields.is_empty() {
                return Ok(());
            }
            let (line, field) = &doc.fields[f % doc.fields.len()];
            let (mutation, want) = if rename && field.key.is_some() {
                let parent = field.path.rsplit_once('.').map_or("", |(p, _)| p);
                let want = if parent.is_empty() {
                    key.clone()
                } else {
                    format!("{parent}.{key}")
                };
                (
                    Mutation::RenameKey(f, key.clone()),
                    format!("{want}: unknown field"),
                )
            } else {
                let values = yamlgen::wrong_values(field.kind);
                let value = values[v % values.len()].to_string();
                (Mutation::Value(f, value), format!("{}: ", field.path))
            };
            let text = apply(&doc, &[mutation]);
            let errors = errors_are_located(&text)?
                .ok_or_else(|| TestCaseError::fail(format!("accepted:\n{text}")))?;
            check!(
                errors.iter().any(|(l, m)| *l == line + 1
                    && (m.starts_with(&want) || m.starts_with(&format!("YAML: {want}")))),
                "no error `{want}…` at line {}; got {errors:?}\n---\n{text}",
                line + 1
            );
            Ok(())
        },
    );
}

/// Valid streams mutated at random, several times over.
#[test]
fn mutated_intents_fail_cleanly() {
    let strategy = (
        stream(),
        proptest::collection::vec(yamlgen::mutation(), 1..5),
    );
    fuzz("intent/mutations", strategy, |((ms, st), muts)| {
        let doc = render(&ms, &st);
        let text = apply(&doc, &muts);
        errors_are_located(&text)?;
        Ok(())
    });
}

/// Found by `arbitrary_yaml_fails_cleanly` (seed 1795429501136377175): the
/// error locator made serde_norway panic ("unexpected end of mapping") while
/// skipping an alias under an empty tag.
#[test]
fn regression_tagged_key_and_alias_do_not_panic_the_locator() {
    let text = "!: a: &x [1, 2]\nb: *x\n";
    let r = std::panic::catch_unwind(|| errors_are_located(text));
    assert!(r.is_ok(), "the intent loader panicked on {text:?}");
    assert!(r.unwrap().is_ok(), "{text:?}");
}

/// Documents of any shape built from YAML's own pieces (no intent grammar).
#[test]
fn arbitrary_yaml_fails_cleanly() {
    let piece = prop_oneof![
        yamlgen::garbage(),
        Just("\n".to_string()),
        Just("  ".to_string()),
        Just("apiVersion: detector.dev/v1alpha1\n".to_string()),
        Just("kind: WorkloadIntent\n".to_string()),
        Just("spec:\n".to_string()),
        Just("  selector: ".to_string()),
        Just("a: &x [1, 2]\nb: *x\n".to_string()),
        Just("[".to_string()),
        Just("{".to_string()),
        Just(", ".to_string()),
        Just(": ".to_string()),
        Just("- ".to_string()),
    ];
    fuzz(
        "intent/arbitrary",
        proptest::collection::vec(piece, 0..60),
        |pieces| {
            errors_are_located(&pieces.concat())?;
            Ok(())
        },
    );
}
