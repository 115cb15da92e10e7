//! `cargo xtask setup`: everything building and testing needs on a fresh
//! Debian 12 machine (see ../shared/TOOLCHAIN.md). Idempotent: each step
//! checks first and prints one line, `present` when there was nothing to do.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{describe, is_root, run_checked};

/// Debian packages the build, the tests and the bench use.
pub const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "runc",
    "busybox-static",
    "iproute2",
    "bpftrace",
    "prometheus",
    "rsyslog",
    "containerd",
    "containernetworking-plugins",
    // The tests' static /app/server (gcc -static) and python3-venv for
    // the pinned deploy tools.
    "gcc",
    "libc6-dev",
    "python3-venv",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const TOOLCHAIN: &str = "debian-web";
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

pub fn setup() -> Result<std::process::ExitCode> {
    apt_packages()?;
    bpf_linker()?;
    rustup_toolchain()?;
    mount_fs(
        "tracefs",
        "/sys/kernel/tracing",
        &["-t", "tracefs", "nodev", "/sys/kernel/tracing"],
    )?;
    mount_fs("bpf", "/sys/fs/bpf", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    cgroup2_report();
    Ok(std::process::ExitCode::SUCCESS)
}

fn need_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("setup: {what} needs root; run `cargo xtask setup` as root");
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim() == "install ok installed"
        })
        .unwrap_or(false)
}

fn apt_get(args: &[&str]) -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive")
        .args([
            "-o",
            "DPkg::Lock::Timeout=300",
            "-o",
            "Dpkg::Options::=--force-confdef",
        ])
        .args(["-o", "Dpkg::Options::=--force-confold"])
        .args(args);
    c
}

/// Runs an apt-get command, retrying once after a pause (mirrors hiccup).
fn apt_retry(args: &[&str]) -> Result<()> {
    if let Err(e) = run_checked(apt_get(args).current_dir("/")) {
        eprintln!("setup: {e:#}; retrying in 10 s");
        sleep(Duration::from_secs(10));
        run_checked(apt_get(args).current_dir("/"))?;
    }
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!("setup: apt packages ({}): present", APT_PACKAGES.len());
        return Ok(());
    }
    need_root(&format!("installing {}", missing.join(" ")))?;
    println!("setup: apt packages: installing {}", missing.join(" "));

    // prometheus, rsyslog and containerd ship services; we only want their
    // binaries (tests start their own instances). A policy-rc.d that answers
    // 101 stops invoke-rc.d from starting them; keep one that exists.
    let own_policy = !Path::new(POLICY_RC_D).exists();
    if own_policy {
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# written by cargo xtask setup\nexit 101\n",
        )
        .context("writing policy-rc.d")?;
        set_mode(POLICY_RC_D, 0o755)?;
    }
    let listening_before = tcp_listeners();
    let result = (|| -> Result<()> {
        apt_retry(&["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q"];
        args.extend(&missing);
        // prometheus recommends prometheus-node-exporter, a daemon that
        // listens on :9100 on every interface. Don't pull it in (the trailing
        // `-` tells apt not to install it); never remove one that is there.
        if !dpkg_installed("prometheus-node-exporter") {
            args.push("prometheus-node-exporter-");
        }
        apt_retry(&args)
    })();
    if own_policy {
        let _ = std::fs::remove_file(POLICY_RC_D);
    }
    result?;

    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !still.is_empty() {
        bail!(
            "setup: apt-get finished but these are still not installed: {}",
            still.join(" ")
        );
    }
    let new_public: Vec<String> = tcp_listeners()
        .difference(&listening_before)
        .filter(|(_, loopback)| !loopback)
        .map(|(a, _)| a.clone())
        .collect();
    if !new_public.is_empty() {
        println!(
            "setup: WARNING: new non-loopback TCP listeners after apt-get install: {}",
            new_public.join(", ")
        );
    }
    println!("setup: apt packages: installed {}", missing.join(" "));
    Ok(())
}

fn set_mode(path: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {path}"))
}

/// Listening TCP sockets from /proc/net/tcp{,6}: (local address, is loopback).
fn tcp_listeners() -> BTreeSet<(String, bool)> {
    let mut out = BTreeSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "0A" {
                continue;
            }
            let local = f[1];
            let ip = local.split(':').next().unwrap_or("");
            let loopback = match ip.len() {
                8 => ip.ends_with("7F"),
                32 => ip == "00000000000000000000000001000000" || ip.ends_with("7F"),
                _ => false,
            };
            out.insert((format!("{file}:{local}"), loopback));
        }
    }
    out
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn bpf_linker() -> Result<()> {
    let have = bpf_linker_version();
    if have
        .as_deref()
        .is_some_and(|v| v.split_whitespace().any(|w| w == BPF_LINKER_VERSION))
    {
        println!("setup: bpf-linker {BPF_LINKER_VERSION}: present");
        return Ok(());
    }
    println!(
        "setup: bpf-linker {BPF_LINKER_VERSION}: installing (found: {}; ~2 min on 2 cores)",
        have.as_deref().unwrap_or("none")
    );
    let install = |locked: bool| {
        let mut c = Command::new("cargo");
        c.env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            // Outside the workspace, so its .cargo/config.toml doesn't apply.
            .current_dir("/");
        if locked {
            c.arg("--locked");
        }
        c
    };
    if let Err(e) = run_checked(&mut install(false)) {
        eprintln!("setup: {e:#}; retrying with --locked");
        run_checked(&mut install(true))?;
    }
    match bpf_linker_version() {
        Some(v) if v.contains(BPF_LINKER_VERSION) => {
            println!("setup: bpf-linker {BPF_LINKER_VERSION}: installed");
            Ok(())
        }
        other => bail!(
            "setup: bpf-linker installed but `bpf-linker --version` reports {other:?} \
             (is $CARGO_HOME/bin on PATH?)"
        ),
    }
}

fn rustup_toolchain() -> Result<()> {
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running `rustup toolchain list` (is rustup installed?)")?;
    let text = String::from_utf8_lossy(&list.stdout);
    if text
        .lines()
        .any(|l| l.split_whitespace().next() == Some(TOOLCHAIN))
    {
        println!("setup: rustup toolchain {TOOLCHAIN}: present");
        return Ok(());
    }
    if !Path::new("/usr/bin/rustc").exists() {
        bail!("setup: /usr/bin/rustc missing; rustc-web should have installed it");
    }
    let mut c = Command::new("rustup");
    c.args(["toolchain", "link", TOOLCHAIN, "/usr"]);
    run_checked(&mut c).with_context(|| describe(&c))?;
    println!("setup: rustup toolchain {TOOLCHAIN}: linked to /usr");
    Ok(())
}

fn mounted(fstype: &str, target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() > 2 && f[1] == target && f[2] == fstype
            })
        })
        .unwrap_or(false)
}

fn mount_fs(fstype: &str, target: &str, args: &[&str]) -> Result<()> {
    if mounted(fstype, target) {
        println!("setup: {fstype} at {target}: present");
        return Ok(());
    }
    need_root(&format!("mounting {fstype} at {target}"))?;
    run_checked(Command::new("mount").args(args).current_dir("/"))?;
    if !mounted(fstype, target) {
        bail!(
            "setup: mount {} succeeded but {target} is not {fstype}",
            args.join(" ")
        );
    }
    println!("setup: {fstype} at {target}: mounted");
    Ok(())
}

/// Report-only: where the cgroup-v2 hierarchy is (the daemon attaches there).
fn cgroup2_report() {
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if mounted("cgroup2", p) {
            println!("setup: cgroup2 at {p}: present");
            return;
        }
    }
    println!("setup: WARNING: no cgroup-v2 mount found (the egress sensors need one)");
}
