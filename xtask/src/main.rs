//! `cargo xtask …`: set-up of the toolchain, build, run, test and bench.
//!
//! `.cargo/config.toml` aliases `cargo xtask` to
//! `cargo run --quiet --package xtask --`.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod bench_correlate;
mod bench_fanotify;
mod bpf_stats;
mod connect_ab;
mod daemon;
mod demo;
mod guards;
mod setup;
mod worker;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project tasks for detector")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (apt packages, bpf-linker,
    /// the debian-web toolchain, tracefs and bpffs mounts). Idempotent.
    Setup,
    /// setup, then `cargo build --release -p detector`.
    Build,
    /// setup, build, then run `target/release/detector run ARGS...` (root).
    Run {
        /// Arguments for `detector run` (after `--`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// setup, build, `cargo fmt --check` (warning only), then `cargo test
    /// --release --no-fail-fast` on the default members with DETECTOR_BIN set.
    Test {
        /// Extra arguments for `cargo test --release` (after `--`), e.g.
        /// `-- -p detector-tests -- --nocapture`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// setup, build, then a demo with two real runc pods (root): a shell
    /// steals a token and is reported, blocked, then killed.
    Demo,
    /// Measure the overhead of the kernel sensors; writes docs/BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Internal: one timed workload loop, run in a fresh process by `bench`.
    #[command(hide = true)]
    BenchWorker(worker::WorkerArgs),
    /// Internal: reads/connects/holders for the correlation part of `bench`.
    #[command(hide = true)]
    BenchCorrelateWorker(bench_correlate::WorkerArgs),
}

fn main() -> ExitCode {
    ensure_cargo_bin_on_path();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Build => setup::setup().and_then(|_| build()),
        Cmd::Run { args } => run(args),
        Cmd::Test { args } => test(args),
        Cmd::Demo => demo::demo(),
        Cmd::Bench(args) => bench::bench(args),
        Cmd::BenchWorker(args) => worker::worker(args),
        Cmd::BenchCorrelateWorker(args) => bench_correlate::worker(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask/..).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

pub fn detector_bin() -> PathBuf {
    repo_root().join("target/release/detector")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `cargo install` puts bpf-linker in `$CARGO_HOME/bin`; aya-build and our
/// checks find it through PATH, so make sure that directory is on it.
fn ensure_cargo_bin_on_path() {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let Some(bin) = cargo_home.map(|h| h.join("bin")) else {
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let mut parts: Vec<PathBuf> = std::env::split_paths(&path).collect();
    parts.push(bin);
    if let Ok(joined) = std::env::join_paths(parts) {
        // Single-threaded at this point.
        std::env::set_var("PATH", joined);
    }
}

/// Runs a command in the repository root, inheriting stdio; fails on a
/// non-zero exit.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let dir = cmd
        .get_current_dir()
        .map(Path::to_path_buf)
        .unwrap_or_else(repo_root);
    let status = cmd
        .current_dir(dir)
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(cmd));
    }
    Ok(())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn build() -> Result<ExitCode> {
    println!("xtask: cargo build --release -p detector");
    run_checked(Command::new("cargo").args(["build", "--release", "-p", "detector"]))?;
    println!("xtask: built {}", detector_bin().display());
    Ok(ExitCode::SUCCESS)
}

fn run(args: Vec<OsString>) -> Result<ExitCode> {
    if !is_root() {
        bail!(
            "`detector run` loads eBPF programs and must run as root \
             (try: sudo -E cargo xtask run)"
        );
    }
    setup::setup()?;
    build()?;
    let bin = detector_bin();
    println!("xtask: exec {} run {}", bin.display(), shell_words(&args));
    // Replace this process with the daemon: SIGINT/SIGTERM go straight to it
    // (cargo run also exec()s us), and its exit status is ours.
    let err = Command::new(&bin).arg("run").args(&args).exec();
    Err(err).with_context(|| format!("executing {}", bin.display()))
}

fn shell_words(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn test(args: Vec<OsString>) -> Result<ExitCode> {
    setup::setup()?;
    build()?;
    let root = repo_root();

    println!("xtask: cargo fmt --all -- --check");
    match Command::new("cargo")
        .args(["fmt", "--all", "--", "--check", "--files-with-diff"])
        .current_dir(&root)
        .stderr(std::process::Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => println!("xtask: fmt: ok"),
        Ok(o) => {
            let files: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| {
                    let p = Path::new(l.trim());
                    p.strip_prefix(&root).unwrap_or(p).display().to_string()
                })
                .collect();
            println!(
                "xtask: WARNING: `cargo fmt --all -- --check` reports {} unformatted file(s) \
                 (not failing the run; `cargo fmt --all` fixes them): {}",
                files.len(),
                files.join(" ")
            );
        }
        Err(e) => println!("xtask: WARNING: could not run cargo fmt: {e}"),
    }

    if !is_root() {
        println!(
            "xtask: WARNING: not root; the privileged end-to-end tests (detector-tests) \
             will fail. CI runs as root."
        );
    }
    let bin = detector_bin();
    println!(
        "xtask: DETECTOR_BIN={} cargo test --release --no-fail-fast {}",
        bin.display(),
        shell_words(&args)
    );
    let mut child = Command::new("cargo")
        // --no-fail-fast: one failing test binary must not hide the others.
        .args(["test", "--release", "--no-fail-fast"])
        .args(&args)
        .env("DETECTOR_BIN", &bin)
        .current_dir(&root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    // Echo cargo's output and add up every binary's `test result:` line, so
    // the run ends with one plain total (the last binaries are often empty
    // doc-test runs whose "0 passed" would otherwise close the log).
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut w = part.split_whitespace().rev();
                    let (Some(what), Some(n)) = (w.next(), w.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        eprintln!("xtask: tests FAILED ({status})");
    }
    // Last line of the run: the plain total CI reads.
    println!("total: {passed} passed, {failed} failed, {ignored} skipped");
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
