use std::{net::IpAddr, path::Path};

use super::*;

fn dns() -> Arc<DnsTable> {
    DnsTable::new()
}

fn ok(text: &str) -> IntentSet {
    load_str(Path::new("t.yaml"), text, &dns())
        .unwrap_or_else(|e| panic!("expected valid, got:\n{e}\n---\n{text}"))
}

/// Errors as `line: message` (the file is always t.yaml here).
fn errs(text: &str) -> Vec<String> {
    match load_str(Path::new("t.yaml"), text, &dns()) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e
            .errors
            .iter()
            .map(|e| {
                assert_eq!(e.file, Path::new("t.yaml"));
                format!("{}: {}", e.line, e.message)
            })
            .collect(),
    }
}

const HEAD: &str = "apiVersion: detector.dev/v1alpha1\nkind: WorkloadIntent\n";

const PAY: &str = "\
apiVersion: detector.dev/v1alpha1
kind: WorkloadIntent
metadata: {name: payments-api, namespace: payments}
spec:
  selector:                      # all given fields must match; at least one field
    namespace: payments
    serviceAccount: payments-api
    podLabels: {app: payments-api}
    podUID: \"0b9c-11\"
    cgroupPath: \"/kubepods/**\"
  readers: [/app/server]
  destinations:
    - {cidr: 10.96.0.1/32, ports: [443]}
    - {host: vault.vault.svc.cluster.local, ports: [8200]}
  action: block
";

#[test]
fn the_contract_example_loads() {
    let set = ok(PAY);
    assert_eq!(set.len(), 1);
    let i = set.get(0).unwrap();
    assert_eq!(
        (i.id().as_str(), i.line, i.action),
        ("payments/payments-api", 3, PolicyAction::Block)
    );
    assert_eq!(i.selector.namespace.as_deref(), Some("payments"));
    assert_eq!(i.selector.service_account.as_deref(), Some("payments-api"));
    assert_eq!(i.selector.pod_uid.as_deref(), Some("0b9c-11"));
    assert_eq!(
        i.selector.pod_labels.get("app").map(String::as_str),
        Some("payments-api")
    );
    assert_eq!(
        i.selector.cgroup_path.as_ref().unwrap().as_str(),
        "/kubepods/**"
    );
    assert_eq!(
        i.readers.as_deref(),
        Some(&[Reader::Exact("/app/server".into())][..])
    );
    assert_eq!(
        set.hosts(),
        vec!["vault.vault.svc.cluster.local".to_string()]
    );
    assert!(i.allows_reader("/app/server"));
    assert!(!i.allows_reader("/bin/sh"));
    assert!(i.allows_destination("10.96.0.1".parse().unwrap(), 443));
    assert!(
        i.allows_destination("::ffff:10.96.0.1".parse().unwrap(), 443),
        "v4-mapped is judged as v4"
    );
    assert!(!i.allows_destination("10.96.0.1".parse().unwrap(), 80));
    assert!(!i.allows_destination("10.96.0.2".parse().unwrap(), 443));
    // The host has not resolved yet: it matches nothing.
    assert!(!i.allows_destination("10.96.5.5".parse().unwrap(), 8200));
}

#[test]
fn host_destinations_match_their_resolved_addresses() {
    let d = dns();
    d.set(
        "vault.vault.svc.cluster.local",
        vec!["10.96.5.5".parse().unwrap()],
    );
    let set = load_str(Path::new("t.yaml"), PAY, &d).unwrap();
    let i = set.get(0).unwrap();
    assert!(i.allows_destination("10.96.5.5".parse().unwrap(), 8200));
    assert!(!i.allows_destination("10.96.5.5".parse().unwrap(), 443));
    d.set(
        "vault.vault.svc.cluster.local",
        vec!["10.96.5.6".parse().unwrap()],
    );
    assert!(
        !i.allows_destination("10.96.5.5".parse().unwrap(), 8200),
        "follows the new answer"
    );
    assert!(i.allows_destination("10.96.5.6".parse().unwrap(), 8200));
}

#[test]
fn the_brief_example_error_has_the_field_line() {
    let text = format!(
        "{HEAD}metadata:\n  name: pay\n  namespace: payments\nspec:\n  selector:\n    namespace: payments\n  readers:\n    - /app/server\n  destinations:\n    - cidr: 10.96.0.1/32\n      ports: [443]\n    - cidr: 10.0.0.300/32\n      ports: [443]\n"
    );
    assert_eq!(
        errs(&text),
        vec!["14: spec.destinations[1].cidr: invalid CIDR \"10.0.0.300/32\""]
    );
}

#[test]
fn every_error_is_collected_with_its_own_line() {
    let text = "\
apiVersion: detector.dev/v1alpha1
kind: WorkloadIntent
metadata:
  name: Bad_Name
  namespace: payments
  colour: blue
spec:
  selector:
    namespace: payments
    podLabel: {app: x}
    cgroupPath: \"/kubepods/[\"
  readers:
    - /app/server
    - bin/sh
    - /usr/bin/../bin/curl
    - 42
  destinations:
    - {cidr: 10.0.0.5/8, ports: [443]}
    - {host: vault.vault.svc, ports: [0, 70000, \"80\", 8200]}
    - {cidr: 10.0.0.1/32, host: x.example}
    - {ports: [1]}
    - {host: \"-bad-.example\"}
    - {cidr: 10.0.0.0/8, ports: []}
    - {cidr: 10.0.0.0/8, ports: [-1, 1.5]}
  action: deny
";
    let got = errs(text);
    let want = vec![
        "4: metadata.name: invalid name \"Bad_Name\": must be lower-case letters, digits, - and . (a DNS subdomain)",
        "6: metadata.colour: unknown field; expected one of name, namespace, labels, annotations",
        "10: spec.selector.podLabel: unknown field (did you mean podLabels?); expected one of namespace, serviceAccount, podLabels, podUID, cgroupPath",
        "11: spec.selector.cgroupPath: invalid glob \"/kubepods/[\": unclosed character class; missing ']'",
        "14: spec.readers[1]: \"bin/sh\" is not an absolute path",
        "15: spec.readers[2]: \"/usr/bin/../bin/curl\" is not a normalized path (no //, /./, /../ or trailing /); the kernel reports resolved executable paths",
        "16: spec.readers[3]: expected a string, found 42",
        "18: spec.destinations[0].cidr: CIDR \"10.0.0.5/8\" has host bits set; did you mean 10.0.0.0/8?",
        "19: spec.destinations[1].ports[0]: invalid port 0; expected an integer in 1..=65535",
        "19: spec.destinations[1].ports[1]: invalid port 70000; expected an integer in 1..=65535",
        "19: spec.destinations[1].ports[2]: invalid port \"80\"; expected an integer in 1..=65535",
        "20: spec.destinations[2].host: give either cidr or host, not both",
        "21: spec.destinations[3]: needs cidr or host",
        "22: spec.destinations[4].host: invalid host \"-bad-.example\": a DNS label cannot start or end with -",
        "23: spec.destinations[5].ports: empty list; remove the field to allow any port",
        "24: spec.destinations[6].ports[0]: invalid port -1; expected an integer in 1..=65535",
        "24: spec.destinations[6].ports[1]: invalid port 1.5; expected an integer in 1..=65535",
        "25: spec.action: unknown action \"deny\"; expected alert, block or kill",
    ];
    assert_eq!(got, want);
}

#[test]
fn structural_errors() {
    // Missing selector: the line of `spec`.
    assert_eq!(errs(&format!("{HEAD}metadata: {{name: a}}\nspec:\n  readers: [/a]\n")), vec!["4: spec: missing field selector (at least one of namespace, serviceAccount, podLabels, podUID, cgroupPath)"]);
    // Empty selector and empty podLabels.
    assert_eq!(
        errs(&format!("{HEAD}metadata: {{name: a}}\nspec:\n  selector: {{podLabels: {{}}}}\n  readers: [/a]\n")),
        vec!["5: spec.selector: selector needs at least one of namespace, serviceAccount, podLabels, podUID, cgroupPath"]
    );
    // Neither readers nor destinations.
    assert_eq!(
        errs(&format!(
            "{HEAD}metadata: {{name: a}}\nspec:\n  selector: {{podUID: u}}\n  action: kill\n"
        )),
        vec![
            "4: spec: needs readers or destinations (an intent without either constrains nothing)"
        ]
    );
    // null lists are not "omitted".
    assert_eq!(
        errs(&format!("{HEAD}metadata: {{name: a}}\nspec:\n  selector: {{podUID: u}}\n  readers:\n")),
        vec!["6: spec.readers: expected a list, found null (write [] for no reader, or remove the field to allow any)"]
    );
    // Missing metadata.name, wrong apiVersion and kind, missing spec.
    assert_eq!(
        errs("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  namespace: x\n"),
        vec![
            "1: apiVersion: unsupported apiVersion \"v1\"; expected detector.dev/v1alpha1",
            "1: missing field spec",
            "2: kind: unsupported kind \"ConfigMap\"; expected WorkloadIntent",
            "3: metadata: missing field name",
        ]
    );
    // Not a mapping at all.
    assert_eq!(
        errs("\n\n- a\n- b\n"),
        vec!["3: expected a WorkloadIntent mapping, found a list"]
    );
    // Labels must be strings.
    assert_eq!(
        errs(&format!("{HEAD}metadata: {{name: a}}\nspec:\n  selector:\n    podLabels:\n      tier: 1\n  readers: []\n")),
        vec!["7: spec.selector.podLabels.tier: expected a string, found 1 (quote it)"]
    );
    // Unknown top-level field, with a suggestion.
    assert_eq!(
        errs(&format!("{HEAD}metadata: {{name: a}}\nSpec: {{}}\nspec: {{selector: {{podUID: u}}, readers: []}}\n")),
        vec!["4: Spec: unknown field (did you mean spec?); expected one of apiVersion, kind, metadata, spec"]
    );
}

#[test]
fn huge_numbers_are_reported_at_their_line() {
    let text = format!("{HEAD}metadata: {{name: a}}\nspec:\n  selector: {{podUID: u}}\n  destinations:\n    - cidr: 10.0.0.0/8\n      ports: [99999999999999999999999]\n");
    let e = errs(&text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        e[0],
        "8: YAML: spec.destinations[0].ports[0]: integer 99999999999999999999999 is out of range"
    );
}

#[test]
fn syntax_errors_name_their_line() {
    let e = errs(&format!(
        "{HEAD}metadata: {{name: a}}\nspec:\n  selector: {{podUID: u\n  readers: []\n"
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("6: YAML: ") || e[0].starts_with("5: YAML: "),
        "{e:?}"
    );
    let e = errs(&format!(
        "{HEAD}metadata: {{name: a}}\nmetadata: {{name: b}}\n"
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    // serde_norway places a duplicate key at the start of its mapping.
    assert_eq!(e[0], "1: YAML: duplicate entry with key \"metadata\"");
    let e = errs("a: *nope\n");
    assert!(e[0].starts_with("1: YAML: unknown anchor"), "{e:?}");
}

#[test]
fn several_documents_and_empty_ones() {
    let text = format!(
        "# intents\n---\n---\n{HEAD}metadata: {{name: a, namespace: x}}\nspec: {{selector: {{namespace: x}}, readers: [/a]}}\n---\n{HEAD}metadata: {{name: b, namespace: x}}\nspec: {{selector: {{namespace: x}}, readers: [/b], action: bogus}}\n---\n{HEAD}metadata: {{name: c, namespace: x}}\nspec: {{selector: {{namespace: x}}, readers: [/c]}}\n"
    );
    assert_eq!(
        errs(&text),
        vec!["12: spec.action: unknown action \"bogus\"; expected alert, block or kill"]
    );
    let set = ok(&text.replace("action: bogus", "action: kill"));
    assert_eq!(
        set.iter()
            .map(|i| (i.name.as_str(), i.line))
            .collect::<Vec<_>>(),
        vec![("a", 6), ("b", 11), ("c", 16)]
    );
    assert_eq!(ok("").len(), 0);
    assert_eq!(ok("# nothing\n---\n...\n").len(), 0);
}

#[test]
fn duplicate_names_across_files_are_errors() {
    let dir = std::env::temp_dir().join(format!(
        "detector-policy-dup-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let a = format!("{HEAD}metadata: {{name: a, namespace: x}}\nspec: {{selector: {{namespace: x}}, readers: [/a]}}\n");
    std::fs::write(dir.join("1.yaml"), &a).unwrap();
    std::fs::write(dir.join("2.yml"), format!("# same name\n---\n{a}")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not yaml").unwrap();
    std::fs::write(dir.join(".hidden.yaml"), "junk: [").unwrap();
    std::fs::write(dir.join("sub/x.yaml"), "junk: [").unwrap();
    let e = load(std::slice::from_ref(&dir), &DnsTable::default()).unwrap_err();
    let got: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        got,
        vec![format!(
            "{}:5: metadata.name: duplicate intent x/a; first defined at {}:3",
            dir.join("2.yml").display(),
            dir.join("1.yaml").display()
        )]
    );
    // A file named twice (directly and through its directory) is read once.
    std::fs::remove_file(dir.join("2.yml")).unwrap();
    let set = load(&[dir.clone(), dir.join("1.yaml")], &DnsTable::default()).unwrap();
    assert_eq!((set.len(), set.files), (1, 1));
    // Missing paths are errors.
    let e = load(&[dir.join("nope.yaml")], &DnsTable::default()).unwrap_err();
    assert!(
        e.errors[0].to_string().starts_with(&format!(
            "{}:1: cannot read: ",
            dir.join("nope.yaml").display()
        )),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn binary_and_hostile_input_never_panics() {
    let d = dns();
    let p = Path::new("t.yaml");
    // Deep nesting: refused before parsing (libyaml is quadratic in it).
    let t0 = std::time::Instant::now();
    let deep = format!("{HEAD}metadata: {}\n", "[".repeat(100_000));
    let e = load_str(p, &deep, &d).unwrap_err();
    assert_eq!(
        e.to_string(),
        "t.yaml:3: nesting deeper than 64 levels of [ and {"
    );
    // Under the guard, parsed as usual.
    let deep = format!(
        "{HEAD}metadata: {}{}\n",
        "[{a: ".repeat(32),
        "}]".repeat(32)
    );
    let e = load_str(p, &deep, &d).unwrap_err();
    assert_eq!(
        e.to_string(),
        "t.yaml:1: missing field spec\nt.yaml:3: metadata: expected a mapping, found a list"
    );
    // Brackets in quotes and comments do not count.
    let quoted = format!(
        "{HEAD}metadata: {{name: a}} # {}\nspec: {{selector: {{podUID: \"{}\"}}, readers: ['/{}']}}\n",
        "[".repeat(100),
        "{[".repeat(100),
        "[".repeat(100)
    );
    let e = load_str(p, &quoted, &d).unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e}");
    assert!(e.errors[0].message.starts_with("spec.readers[0]: "), "{e}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    let deep_map = format!(
        "{}x: 1\n",
        (0..300)
            .map(|i| format!("{}k:\n", " ".repeat(i)))
            .collect::<String>()
    );
    let e = load_str(p, &deep_map, &d).unwrap_err();
    assert!(e.errors[0].message.contains("recursion limit"), "{e}");
    // Aliases that multiply (billion laughs) are bounded by the parser.
    let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..9 {
        let prev = if i == 0 {
            "a".to_string()
        } else {
            format!("a{}", i - 1)
        };
        laughs.push_str(&format!("a{i}: &a{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    assert!(load_str(p, &laughs, &d).is_err());
    // Many errors are capped per file.
    let many = format!(
        "{HEAD}metadata: {{name: a}}\nspec:\n  selector: {{podUID: u}}\n  readers:\n{}",
        (0..1000).map(|_| "    - x\n").collect::<String>()
    );
    let e = load_str(p, &many, &d).unwrap_err();
    assert!(
        e.errors.len() <= load::MAX_ERRORS_PER_FILE + 2,
        "{}",
        e.errors.len()
    );
    assert!(e.errors.iter().any(|e| e.message.contains("more errors")));
    // Random bytes and mutations of a valid file.
    let mut rng = fastrand::Rng::with_seed(7);
    let alphabet: &[u8] = b"{}[]:-,&*!|>'\"#%@` \n\t\r?ab0123456789./\\\x00\xff";
    for _ in 0..3000 {
        let len = rng.usize(0..200);
        let bytes: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        let _ = load_str(p, &text, &d);
    }
    let base = PAY.as_bytes();
    for _ in 0..3000 {
        let mut b = base.to_vec();
        for _ in 0..rng.usize(1..6) {
            let i = rng.usize(..b.len());
            match rng.u8(..3) {
                0 => b[i] = alphabet[rng.usize(..alphabet.len())],
                1 => {
                    b.remove(i);
                }
                _ => b.insert(i, alphabet[rng.usize(..alphabet.len())]),
            }
        }
        let text = String::from_utf8_lossy(&b);
        if let Err(e) = load_str(p, &text, &d) {
            // libyaml also breaks lines at a lone \r.
            let lines = text.bytes().filter(|&b| b == b'\n' || b == b'\r').count() + 1;
            for err in &e.errors {
                assert!(
                    err.line >= 1 && err.line <= lines,
                    "line {} of {lines}: {err}\n{text}",
                    err.line
                );
            }
        }
    }
}

#[test]
fn non_utf8_and_oversized_files() {
    let dir = std::env::temp_dir().join(format!(
        "detector-policy-bin-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bin.yaml"), b"a: 1\nb: 2\nc: \xff\xfe\n").unwrap();
    std::fs::write(
        dir.join("big.yaml"),
        vec![b'#'; (load::MAX_FILE_BYTES + 1) as usize],
    )
    .unwrap();
    let e = load(std::slice::from_ref(&dir), &DnsTable::default()).unwrap_err();
    let got: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        got,
        vec![
            format!(
                "{}:1: file larger than {} bytes; not an intent file?",
                dir.join("big.yaml").display(),
                load::MAX_FILE_BYTES
            ),
            format!("{}:3: not valid UTF-8 text", dir.join("bin.yaml").display()),
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn meta(ns: &str, sa: &str, uid: &str, labels: &[(&str, &str)], cg: &str) -> WorkloadMeta {
    WorkloadMeta {
        namespace: Some(ns.into()),
        service_account: Some(sa.into()),
        pod_uid: Some(uid.into()),
        pod_labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cgroup_path: Some(cg.into()),
    }
}

#[test]
fn selection_is_most_specific_then_by_name() {
    let doc = |name: &str, sel: &str| {
        format!("---\n{HEAD}metadata: {{name: {name}, namespace: p}}\nspec: {{selector: {sel}, readers: [/{name}]}}\n")
    };
    let text = [
        doc("ns-only", "{namespace: payments}"),
        doc("zz-ns-sa", "{namespace: payments, serviceAccount: api}"),
        doc(
            "aa-ns-label",
            "{namespace: payments, podLabels: {app: api}}",
        ),
        doc("labels2", "{podLabels: {app: api, tier: web}}"),
        doc("by-uid", "{podUID: u-1}"),
        doc("cg-wide", "{cgroupPath: \"/kubepods/**\"}"),
        doc("cg-narrow", "{cgroupPath: \"/kubepods/burstable/**\"}"),
        doc("cg-star", "{cgroupPath: \"/kubepods/*\"}"),
    ]
    .concat();
    let set = ok(&text);
    let pick = |m: &WorkloadMeta| set.select(m).map(|i| i.name.clone());
    let cg = "/kubepods/burstable/podu-2/abc";
    // Two fields each: ties broken by name ("aa-ns-label" < "labels2" < "zz-ns-sa").
    assert_eq!(
        pick(&meta(
            "payments",
            "api",
            "u-2",
            &[("app", "api"), ("tier", "web")],
            cg
        ))
        .as_deref(),
        Some("aa-ns-label")
    );
    // podUID beats everything.
    assert_eq!(
        pick(&meta("payments", "api", "u-1", &[("app", "api")], cg)).as_deref(),
        Some("by-uid")
    );
    // Only the namespace matches.
    assert_eq!(
        pick(&meta("payments", "other", "u-3", &[], "/system.slice/x")).as_deref(),
        Some("ns-only")
    );
    // cgroup globs: longer literal prefix wins; `*` stays within one component.
    let none = |cg: &str| WorkloadMeta {
        cgroup_path: Some(cg.into()),
        ..Default::default()
    };
    assert_eq!(pick(&none(cg)).as_deref(), Some("cg-narrow"));
    assert_eq!(
        pick(&none("/kubepods/besteffort/pod1/c")).as_deref(),
        Some("cg-wide")
    );
    assert_eq!(
        pick(&none("/kubepods/x")).as_deref(),
        Some("cg-star"),
        "same fields and literal prefix: name order"
    );
    assert!(set
        .iter()
        .find(|i| i.name == "cg-star")
        .unwrap()
        .selector
        .matches(none("/kubepods/x").view()));
    assert!(!set
        .iter()
        .find(|i| i.name == "cg-star")
        .unwrap()
        .selector
        .matches(none("/kubepods/x/y").view()));
    assert_eq!(pick(&none("/system.slice/sshd.service")), None);
    // A field the workload lacks does not match.
    assert_eq!(pick(&WorkloadMeta::default()), None);
    // Deterministic whatever the file order.
    let mut docs: Vec<&str> = text.split("---\n").filter(|d| !d.is_empty()).collect();
    docs.reverse();
    let rev = ok(&format!("---\n{}", docs.join("---\n")));
    let m = meta(
        "payments",
        "api",
        "u-2",
        &[("app", "api"), ("tier", "web")],
        cg,
    );
    assert_eq!(
        rev.select(&m).map(|i| i.name.clone()),
        set.select(&m).map(|i| i.name.clone())
    );
}

#[test]
fn readers_and_destination_semantics() {
    let base = format!("{HEAD}metadata: {{name: a}}\nspec:\n  selector: {{podUID: u}}\n");
    // Omitted readers: anyone; [] : no one; prefixes.
    let i = ok(&format!("{base}  destinations: []\n"));
    let i = i.get(0).unwrap();
    assert!(i.allows_reader("/bin/sh"));
    assert!(
        !i.allows_destination("127.0.0.1".parse().unwrap(), 80),
        "[] allows nowhere"
    );
    let set = ok(&format!(
        "{base}  readers: [/usr/bin/python3*, /app/server, /app/server]\n"
    ));
    let i = set.get(0).unwrap();
    assert_eq!(i.readers.as_ref().unwrap().len(), 2);
    assert!(i.allows_reader("/usr/bin/python3.12"));
    assert!(i.allows_reader("/app/server"));
    assert!(!i.allows_reader("/app/server2"));
    assert!(
        i.allows_destination("1.2.3.4".parse().unwrap(), 1),
        "omitted destinations: anywhere"
    );
    assert_eq!(i.namespace, "default");
    assert_eq!(i.action, PolicyAction::Alert);
    let set = ok(&format!("{base}  readers: []\n  destinations:\n    - cidr: 192.168.1.7\n    - cidr: \"fd00::/8\"\n      ports: [443, 443, 80]\n"));
    let i = set.get(0).unwrap();
    assert!(!i.allows_reader("/app/server"));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(i.allows_destination(ip("192.168.1.7"), 9));
    assert!(!i.allows_destination(ip("192.168.1.8"), 9));
    assert!(i.allows_destination(ip("fd12::1"), 80));
    assert!(!i.allows_destination(ip("fd12::1"), 22));
    assert!(!i.allows_destination(ip("fe00::1"), 80));
}

#[test]
fn judge_trait_for_correlation() {
    use crate::{correlate::Judge, finding::Workload};
    let set = ok(PAY);
    let mut w = WorkloadCtx {
        workload: Workload {
            pod_uid: Some("0b9c-11".into()),
            namespace: Some("payments".into()),
            cgroup_path: Some("/kubepods/burstable/pod0b9c-11/c1".into()),
            ..Default::default()
        },
        service_account: Some("payments-api".into()),
        labels: [
            ("app".to_string(), "payments-api".to_string()),
            ("x".to_string(), "y".to_string()),
        ]
        .into_iter()
        .collect(),
    };
    let r = set.intent_for(&w).expect("selected");
    assert_eq!(
        (r.name.as_str(), r.action, r.index),
        ("payments/payments-api", PolicyAction::Block, 0)
    );
    assert!(set.allows_reader(&r, "/app/server"));
    assert!(!set.allows_reader(&r, "/bin/sh"));
    assert!(set.allows_destination(&r, "10.96.0.1".parse().unwrap(), 443));
    assert!(!set.allows_destination(&r, "10.96.0.1".parse().unwrap(), 444));
    w.service_account = None;
    assert!(set.intent_for(&w).is_none());
}

#[test]
fn learned_yaml_round_trips_through_the_parser() {
    use crate::{correlate::Judge, finding::Workload, learn::Learner};
    let w = |ns: Option<&str>,
             pod: Option<&str>,
             uid: &str,
             sa: Option<&str>,
             labels: &[(&str, &str)]| WorkloadCtx {
        workload: Workload {
            pod_uid: Some(uid.into()),
            namespace: ns.map(Into::into),
            pod: pod.map(Into::into),
            cgroup_id: 1,
            cgroup_path: Some(format!("/kubepods/pod{uid}/c")),
            ..Default::default()
        },
        service_account: sa.map(Into::into),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let api = w(
        Some("payments"),
        Some("payments-api-7d9f8b6c5-x2k4q"),
        "u1",
        Some("payments-api"),
        &[("app", "payments-api")],
    );
    let bare = w(None, None, "u2", None, &[]);
    let mut l = Learner::new(u64::MAX);
    l.observe_reader(&api, "/app/server", 1);
    l.observe_destination(&api, "10.96.0.1".parse().unwrap(), 443, 2);
    l.observe_destination(&api, "10.96.0.1".parse().unwrap(), 8443, 2);
    l.observe_destination(&api, "fd00::7".parse().unwrap(), 53, 2);
    l.observe_reader(&bare, "/usr/bin/agent", 1);
    let yaml = l.to_yaml();
    let set = load_str(Path::new("learned.yaml"), &yaml, &DnsTable::default())
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(set.len(), 2, "{yaml}");
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let r = set
        .intent_for(&api)
        .expect("learned intent selects its workload");
    assert!(set.allows_reader(&r, "/app/server"));
    assert!(!set.allows_reader(&r, "/bin/sh"));
    for (a, p, allowed) in [
        ("10.96.0.1", 443, true),
        ("10.96.0.1", 8443, true),
        ("fd00::7", 53, true),
        ("10.96.0.1", 80, false),
        ("10.96.0.2", 443, false),
        ("fd00::8", 53, false),
    ] {
        assert_eq!(
            set.allows_destination(&r, ip(a), p),
            allowed,
            "{a}:{p}\n{yaml}"
        );
    }
    let r = set.intent_for(&bare).expect("by pod uid");
    assert!(set.allows_reader(&r, "/usr/bin/agent"));
    assert!(
        !set.allows_destination(&r, ip("1.1.1.1"), 53),
        "nothing learned: nowhere"
    );
}

#[test]
fn example_intents_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/intents");
    let set = load(&[dir], &DnsTable::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(set.len() >= 3, "{}", set.len());
}

#[test]
fn worst_case_file_is_checked_in_bounded_time() {
    // Each reported error costs one re-parse of its document (to find its
    // line): the file size and error caps bound the total.
    let mut t =
        format!("{HEAD}metadata: {{name: a}}\nspec:\n  selector: {{podUID: u}}\n  readers:\n");
    let last = "    - relative\n".repeat(200);
    while t.len() + last.len() < load::MAX_FILE_BYTES as usize {
        t.push_str("    - /usr/local/bin/some-long-executable-name\n");
    }
    t.push_str(&last);
    let t0 = std::time::Instant::now();
    let e = load_str(Path::new("t.yaml"), &t, &dns()).unwrap_err();
    assert_eq!(e.errors.len(), load::MAX_ERRORS_PER_FILE + 1);
    assert!(
        e.errors
            .iter()
            .any(|e| e.message == "150 more errors in this document not shown"),
        "{e}"
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn duplicate_keys_in_many_documents_are_capped() {
    // Found while writing tests/hostile_input: a duplicate key does not stop the
    // reading (the stream stays intact), so each document added an error
    // beyond the per-file cap.
    let text = "a: 1\na: 2\n---\n".repeat(200);
    let e = load_str(Path::new("t.yaml"), &text, &dns()).unwrap_err();
    assert_eq!(e.errors.len(), load::MAX_ERRORS_PER_FILE + 1, "{e}");
    assert_eq!(
        e.errors.last().unwrap().message,
        "too many errors; stopped reading this file"
    );
}

#[test]
fn a_duplicate_key_before_a_syntax_error_is_no_panic() {
    // Found by tests/hostile_input (intent/arbitrary): after the duplicate
    // key the loop read on, and serde_norway panicked ("unexpected end of
    // mapping") on what was left of the document the unknown alias broke.
    let e = errs("a: 1\na: 2\nb: *a");
    assert_eq!(
        e,
        vec![
            "1: YAML: duplicate entry with key \"a\"",
            "3: YAML: unknown anchor",
        ]
    );
    // The fuzzer's own input.
    let e = errs("a: &x [1, 2]\nb: *x\na: &x [1, 2]\nb: *x\n<<: *a");
    assert_eq!(e.len(), 2, "{e:?}");
    // A duplicate key alone still lets the next documents be read.
    let e = errs(&format!(
        "a: 1\na: 2\n---\n{HEAD}metadata: {{name: a}}\nspec: {{selector: {{podUID: u}}, readers: 7}}\n"
    ));
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[1].starts_with("7: spec.readers: "), "{e:?}");
}
