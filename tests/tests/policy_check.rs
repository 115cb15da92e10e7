//! `detector policy check PATH...` on the real binary: exit codes and
//! `file:line: message` output. Needs no privileges.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use detector_tests::detector_bin;

const HEAD: &str = "apiVersion: detector.dev/v1alpha1\nkind: WorkloadIntent\n";

fn check(paths: &[&Path]) -> Output {
    Command::new(detector_bin())
        .args(["policy", "check"])
        .args(paths)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", detector_bin().display()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// stderr lines that look like `file:line: message` for files in `dir`.
fn error_lines(out: &Output, dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    text(&out.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/intents")
}

#[test]
fn example_intents_pass() {
    let out = check(&[&examples()]);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("intents OK (3 files)"), "{stdout}");
}

#[test]
fn errors_name_file_and_line_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("a-good.yaml"),
        format!("{HEAD}metadata: {{name: api, namespace: pay}}\nspec:\n  selector: {{namespace: pay}}\n  readers: [/app/server]\n"),
    )
    .unwrap();
    // Line 14 is the bad CIDR; line 15 a bad port; line 16 an unknown field.
    std::fs::write(
        d.join("b-pay.yaml"),
        format!(
            "{HEAD}metadata:\n  name: pay\n  namespace: payments\nspec:\n  selector:\n    namespace: payments\n  readers:\n    - /app/server\n  destinations:\n    - cidr: 10.96.0.1/32\n      ports: [443]\n    - cidr: 10.0.0.300/32\n      ports: [0]\n  acton: block\n"
        ),
    )
    .unwrap();
    // Second document: duplicate of a-good.yaml's name, and a bad action.
    std::fs::write(
        d.join("c-dup.yml"),
        format!("# dup\n---\n{HEAD}metadata: {{name: api, namespace: pay}}\nspec:\n  selector: {{namespace: pay}}\n  readers: [/app/server]\n  action: deny\n"),
    )
    .unwrap();
    std::fs::write(d.join("d-junk.yaml"), b"\x7fELF\x02\x01\x01\x00\xff\xfe\n").unwrap();
    std::fs::write(
        d.join("e-syntax.yaml"),
        format!("{HEAD}metadata: {{name: x\nspec: [\n"),
    )
    .unwrap();
    std::fs::write(d.join("README.md"), "not an intent").unwrap();

    let out = check(&[d]);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{}", text(&out.stderr));
    let got = error_lines(&out, d);
    let head = |f: &str, rest: &str| format!("{f}:{rest}");
    assert_eq!(
        got[0],
        head(
            "b-pay.yaml",
            "14: spec.destinations[1].cidr: invalid CIDR \"10.0.0.300/32\""
        ),
        "{got:#?}"
    );
    assert_eq!(
        got[1],
        head(
            "b-pay.yaml",
            "15: spec.destinations[1].ports[0]: invalid port 0; expected an integer in 1..=65535"
        )
    );
    assert_eq!(
        got[2],
        head("b-pay.yaml", "16: spec.acton: unknown field (did you mean action?); expected one of selector, readers, destinations, action")
    );
    assert_eq!(
        got[3],
        head(
            "c-dup.yml",
            "9: spec.action: unknown action \"deny\"; expected alert, block or kill"
        )
    );
    assert_eq!(got[4], head("d-junk.yaml", "1: not valid UTF-8 text"));
    assert!(got[5].starts_with("e-syntax.yaml:4: YAML: "), "{got:#?}");
    assert_eq!(got.len(), 6, "{got:#?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr
            .lines()
            .last()
            .unwrap()
            .starts_with("6 errors in 4 files"),
        "{stderr}"
    );

    // Fixing c-dup.yml's action leaves its duplicate name, reported against
    // the first definition.
    std::fs::remove_file(d.join("b-pay.yaml")).unwrap();
    std::fs::remove_file(d.join("d-junk.yaml")).unwrap();
    std::fs::remove_file(d.join("e-syntax.yaml")).unwrap();
    std::fs::write(
        d.join("c-dup.yml"),
        format!("# dup\n---\n{HEAD}metadata: {{name: api, namespace: pay}}\nspec:\n  selector: {{namespace: pay}}\n  readers: [/app/server]\n"),
    )
    .unwrap();
    let out = check(&[d]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        error_lines(&out, d),
        vec![format!(
            "c-dup.yml:5: metadata.name: duplicate intent pay/api; first defined at {}:3",
            d.join("a-good.yaml").display()
        )]
    );

    // One file alone is fine.
    let out = check(&[&d.join("a-good.yaml")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "1 intent OK (1 file)");
}

#[test]
fn missing_paths_and_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = check(&[&d.join("nope.yaml")]);
    assert_eq!(out.status.code(), Some(1));
    let got = error_lines(&out, d);
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with("nope.yaml:1: cannot read: "), "{got:?}");

    // More ports than the kernel holds per destination: valid, with a warning.
    let ports: Vec<String> = (2000..2020).map(|p| p.to_string()).collect();
    std::fs::write(
        d.join("wide.yaml"),
        format!(
            "{HEAD}metadata: {{name: w}}\nspec:\n  selector: {{podUID: u}}\n  destinations:\n    - cidr: 10.0.0.0/8\n      ports: [{}]\n",
            ports.join(", ")
        ),
    )
    .unwrap();
    let out = check(&[d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = error_lines(&out, d);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("wide.yaml:8: warning: spec.destinations[0].ports: 20 ports;"),
        "{got:?}"
    );
}
