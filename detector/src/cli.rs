//! Command line (the contract in ../shared/DESIGN.md) and the config file
//! that can set every `run` flag.

use std::{
    fmt,
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use serde_norway::Value;

use crate::yaml::{
    clamp_line, error_message,
    locate::{best_line, line_of, FieldPath, Target},
    too_deep, MAX_FLOW_DEPTH,
};

/// Longest duration any setting accepts. A year is beyond any sensible
/// window, and it keeps `Instant::now() + duration` (done with most of them)
/// far from overflowing, which would panic.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Config files larger than this are refused: a config is a few hundred
/// bytes, and this bounds what `--config /dev/zero` or a hostile file costs.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A duration flag (`10m`, `1h30m`), at most [`MAX_DURATION`].
fn duration_arg(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    check_duration(d)?;
    Ok(d)
}

/// `Err` with the reason when `d` is longer than [`MAX_DURATION`].
pub fn check_duration(d: Duration) -> Result<(), String> {
    if d > MAX_DURATION {
        return Err(format!(
            "{} is longer than the maximum of {} days",
            humantime::format_duration(d),
            MAX_DURATION.as_secs() / 86_400
        ));
    }
    Ok(())
}

use crate::attribution::kubeapi::{KubeApiConfig, KubeApiMode};

#[derive(Debug, Parser)]
#[command(
    name = "detector",
    version,
    about = "eBPF runtime credential-misuse detector for Kubernetes nodes"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "DETECTOR_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (observes every cgroup; embedded defaults need no flags).
    Run(RunArgs),
    /// Validate intent files; prints `file:line: message` per error.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// List the node's credential files, their owner pods and workloads.
    Inventory(InventoryArgs),
    /// Observe for a while and write the intents that would keep what was
    /// seen quiet (WorkloadIntent YAML), e.g. to review and apply.
    Learn(LearnArgs),
    /// Detach and remove everything `run --pin-dir` left pinned (uninstall).
    Unpin {
        /// The directory given to `run --pin-dir`.
        #[arg(long, default_value = "/sys/fs/bpf/detector")]
        pin_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct LearnArgs {
    /// How long to observe.
    #[arg(long, value_parser = duration_arg)]
    pub duration: Duration,
    /// Where to write the intents.
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check intent files or directories; exits non-zero on any error.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct InventoryArgs {
    #[arg(long)]
    pub kubelet_dir: Option<PathBuf>,
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What `action: kill` kills.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KillScope {
    /// The offending process (SIGKILL from the kernel, before its connect).
    #[default]
    Process,
    /// Also every process of its container (`cgroup.kill`).
    Container,
}

/// How credential opens are seen (see README, "Credential access coverage").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpenSensor {
    /// hybrid when this kernel and our privileges allow it, else fanotify
    /// alone (no leases), else tracepoint.
    #[default]
    Auto,
    /// fanotify permission events on the credential files only: no syscall
    /// tracepoint, so other syscalls pay nothing (needs CAP_SYS_ADMIN).
    Fanotify,
    /// Syscall-exit tracepoints of the open family (also sees pidfd_getfd).
    Tracepoint,
    /// A read lease on every credential file; the kernel's lease check in
    /// the open path (`filelock:leases_conflict`) reports their opens, in
    /// the opener's context. No syscall tracepoint and no round trip to
    /// the daemon: other opens pay nothing, credential opens a little
    /// (needs CAP_LEASE).
    Lease,
    /// Lease where the lease is held, fanotify elsewhere: an inode mark on
    /// every credential not leased (a rotated token's new inode before its
    /// lease, a file a writer holds) and a mount mark on kubelet's mount of
    /// each volume, which sees kubelet create a rotated token; no mark on a
    /// leased file, whose open costs the lease check alone (needs
    /// CAP_SYS_ADMIN and CAP_LEASE).
    Hybrid,
}

impl OpenSensor {
    /// Whether this sensor takes read leases.
    pub fn leases(self) -> bool {
        matches!(self, OpenSensor::Lease | OpenSensor::Hybrid)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every block and kill becomes an alert (dry run).
    Observe,
    /// Block and kill as the intents say.
    #[default]
    Enforce,
}

/// `detector run` flags. Every flag may also come from `--config FILE`
/// (YAML, same names in snake_case); a flag on the command line wins.
#[derive(Debug, Default, clap::Args)]
pub struct RunArgs {
    /// YAML config file setting any of the flags below.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Intent file or directory (repeatable).
    #[arg(long = "policy")]
    pub policy: Vec<PathBuf>,
    /// Kubelet state directory [default: /var/lib/kubelet].
    #[arg(long)]
    pub kubelet_dir: Option<PathBuf>,
    /// cgroup-v2 mount [default: found automatically].
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Where findings go as JSON lines (`-` = stdout) [default: -].
    #[arg(long)]
    pub alerts: Option<String>,
    /// Address for /metrics, /healthz and /readyz [default: 0.0.0.0:9464].
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// observe | enforce [default: enforce].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Extra credential file to watch, outside the kubelet layout (repeatable).
    #[arg(long = "credential-file")]
    pub credential_file: Vec<PathBuf>,
    /// Deny all egress of this cgroup-v2 directory in the kernel (repeatable).
    #[arg(long = "deny-cgroup")]
    pub deny_cgroup: Vec<PathBuf>,
    /// Stream every decoded kernel event as a JSON line here (`-` = stdout).
    #[arg(long)]
    pub debug_events: Option<String>,
    /// Report the same (process, destination) connect at most once per this
    /// many milliseconds; 0 reports every connect. Holders are always reported.
    #[arg(long)]
    pub connect_dedup_ms: Option<u64>,
    /// Aggregate in the kernel a process's repeated opens of the same
    /// credential within this many milliseconds into one report (counts stay
    /// exact); 0 reports every open [default: 1000].
    #[arg(long)]
    pub credential_dedup_ms: Option<u64>,
    /// Per-cgroup kernel event budget, ordinary events per second and CPU
    /// (execs, forks, exits, connects of non-holders); beyond it events are
    /// dropped, counted and the workload reported as `coverage_degraded`.
    /// 0 = unlimited [default: 20000].
    #[arg(long)]
    pub cgroup_event_budget: Option<u32>,
    /// The same for security-relevant events (credential reads, holders'
    /// and denied connects), which have their own budget and ring buffer so
    /// an ordinary flood cannot crowd them out [default: 10000].
    #[arg(long)]
    pub cgroup_alert_budget: Option<u32>,
    /// Pin the kernel programs and state maps in this bpffs directory (e.g.
    /// /sys/fs/bpf/detector): enforcement and holder tracking then stay in
    /// force while the daemon is down or restarting, and what happens
    /// meanwhile is reported after the restart. Without it, everything is
    /// detached when the daemon exits. `detector unpin` removes the pins.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Workloads with no declared intent: learn their readers and
    /// destinations for this long after first seeing them, then report
    /// deviations [default: 10m]. `0s` judges at once (everything is new).
    #[arg(long, value_parser = duration_arg)]
    pub learn_window: Option<Duration>,
    /// Write the learned intents (WorkloadIntent YAML) here at exit.
    #[arg(long)]
    pub learn_output: Option<PathBuf>,
    /// What `action: kill` kills: process | container [default: process].
    #[arg(long, value_enum)]
    pub kill_scope: Option<KillScope>,
    /// Fold repeated identical findings for this long [default: 60s].
    #[arg(long, value_parser = duration_arg)]
    pub aggregate_window: Option<Duration>,
    /// Host executables allowed to read any pod's credential
    /// [default: kubelet in /usr/bin, /usr/local/bin].
    #[arg(long = "trusted-host-reader")]
    pub trusted_host_reader: Vec<String>,
    /// How long a credential that disappeared (rotated away, pod removed)
    /// stays watched: a process may still read the old file [default: 2m].
    #[arg(long, value_parser = duration_arg)]
    pub rotation_grace: Option<Duration>,
    /// CRI runtime socket for pod names and labels
    /// [default: found automatically among the usual paths].
    #[arg(long)]
    pub cri_socket: Option<PathBuf>,
    /// How credential opens are seen: auto | fanotify | tracepoint
    /// [default: auto = fanotify when available, else tracepoint].
    #[arg(long, value_enum)]
    pub open_sensor: Option<OpenSensor>,
    /// Service accounts and labels of this node's pods from the Kubernetes
    /// API: `auto` (in-cluster configuration when running in a pod), `off`,
    /// or the API server's URL (http or https) [default: auto].
    #[arg(long, value_parser = KubeApiMode::parse)]
    pub kube_api: Option<KubeApiMode>,
    /// This node's name, to list only its pods [default: env NODE_NAME].
    #[arg(long)]
    pub node_name: Option<String>,
    /// Bearer token file for the API, sent over https only
    /// [default: the in-cluster service-account token].
    #[arg(long)]
    pub kube_api_token_file: Option<PathBuf>,
    /// CA bundle (PEM) of the API server [default: the in-cluster ca.crt,
    /// else the system's roots].
    #[arg(long)]
    pub kube_api_ca_file: Option<PathBuf>,
}

/// The config file's shape: the `run` flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub policy: Vec<PathBuf>,
    pub kubelet_dir: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    pub alerts: Option<String>,
    pub metrics_addr: Option<SocketAddr>,
    pub mode: Option<Mode>,
    #[serde(default)]
    pub credential_file: Vec<PathBuf>,
    #[serde(default)]
    pub deny_cgroup: Vec<PathBuf>,
    pub debug_events: Option<String>,
    pub connect_dedup_ms: Option<u64>,
    pub credential_dedup_ms: Option<u64>,
    pub cgroup_event_budget: Option<u32>,
    pub cgroup_alert_budget: Option<u32>,
    pub pin_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    #[serde(default, with = "humantime_serde")]
    pub learn_window: Option<Duration>,
    pub learn_output: Option<PathBuf>,
    pub kill_scope: Option<KillScope>,
    #[serde(default, with = "humantime_serde")]
    pub aggregate_window: Option<Duration>,
    #[serde(default)]
    pub trusted_host_reader: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    pub rotation_grace: Option<Duration>,
    pub cri_socket: Option<PathBuf>,
    pub open_sensor: Option<OpenSensor>,
    pub kube_api: Option<KubeApiMode>,
    pub node_name: Option<String>,
    pub kube_api_token_file: Option<PathBuf>,
    pub kube_api_ca_file: Option<PathBuf>,
    /// Finding outputs (JSON lines, webhook, syslog, OCSF); see `sinks`.
    pub sinks: Option<crate::sinks::SinksConfig>,
}

/// One problem of a config file, as `file:line: message`; the message
/// starts with the field's name when it is about one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Every problem found in a config file (at least one), one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigFile {
    /// Read and parse the config file at `path` (see [`ConfigFile::parse`]).
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigErrors> {
        let one = |line: usize, message: String| {
            ConfigErrors(vec![ConfigError {
                file: path.into(),
                line,
                message,
            }])
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| one(1, format!("cannot read config file: {e}")))?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(one(
                1,
                format!("config file larger than {MAX_CONFIG_BYTES} bytes"),
            ));
        }
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            one(line, "not valid UTF-8 text".into())
        })?;
        Self::parse(path, text)
    }

    /// Parse a config file's text (`file` only names it in errors). One YAML
    /// document (further empty documents are fine); empty text is the
    /// default config. Errors carry the line of the offending field, and
    /// values are checked beyond their types: durations at most
    /// [`MAX_DURATION`], and the sinks' settings (see
    /// [`SinksConfig::problems`](crate::sinks::SinksConfig::problems)).
    pub fn parse(file: &Path, text: &str) -> Result<ConfigFile, ConfigErrors> {
        let one = |line: usize, message: String| {
            ConfigErrors(vec![ConfigError {
                file: file.into(),
                line,
                message,
            }])
        };
        let located = |e: &serde_norway::Error| {
            one(
                clamp_line(text, e.location().map_or(1, |l| l.line())),
                error_message(e),
            )
        };
        if let Some(line) = too_deep(text) {
            return Err(one(
                line,
                format!("nesting deeper than {MAX_FLOW_DEPTH} levels of [ and {{"),
            ));
        }
        // First as plain YAML: syntax errors, alias bombs and recursion are
        // caught here by the parser's own limits, whatever the shape.
        let mut is_empty = true;
        for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(doc).map_err(|e| located(&e))?;
            if value.is_null() {
                continue;
            }
            if i > 0 {
                let line = line_of(text, i, &FieldPath::root(), Target::Value).unwrap_or(1);
                return Err(one(
                    line,
                    "a second YAML document; a config file holds one".into(),
                ));
            }
            is_empty = false;
        }
        if is_empty {
            return Ok(ConfigFile::default());
        }
        // Then typed, from the text again, so errors carry positions.
        let doc = serde_norway::Deserializer::from_str(text)
            .next()
            .ok_or_else(|| one(1, "no YAML document".into()))?;
        let config = ConfigFile::deserialize(doc).map_err(|e| located(&e))?;
        let problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        Err(ConfigErrors(
            problems
                .into_iter()
                .map(|(path, message)| {
                    let fp = FieldPath(
                        path.split('.')
                            .map(|k| crate::yaml::locate::Seg::Key(k.into()))
                            .collect(),
                    );
                    ConfigError {
                        file: file.into(),
                        line: best_line(text, 0, &fp, Target::Value, 1),
                        message: format!("{path}: {message}"),
                    }
                })
                .collect(),
        ))
    }

    /// Values that have the right type but would break the daemon:
    /// (dotted field path, why).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, d) in [
            ("learn_window", self.learn_window),
            ("aggregate_window", self.aggregate_window),
            ("rotation_grace", self.rotation_grace),
        ] {
            if let Some(Err(why)) = d.map(check_duration) {
                out.push((name.to_string(), why));
            }
        }
        if let Some(sinks) = &self.sinks {
            out.extend(
                sinks
                    .problems()
                    .into_iter()
                    .map(|(p, why)| (format!("sinks.{p}"), why)),
            );
        }
        out
    }
}

/// `run` settings after merging flags, config file and defaults.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub policy: Vec<PathBuf>,
    pub kubelet_dir: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub alerts: String,
    pub metrics_addr: SocketAddr,
    pub mode: Mode,
    pub credential_file: Vec<PathBuf>,
    pub deny_cgroup: Vec<PathBuf>,
    pub debug_events: Option<String>,
    pub connect_dedup_ms: u64,
    pub credential_dedup_ms: u64,
    pub cgroup_event_budget: u32,
    pub cgroup_alert_budget: u32,
    pub pin_dir: Option<PathBuf>,
    pub sinks: crate::sinks::SinksConfig,
    pub learn_window: Duration,
    pub learn_output: Option<PathBuf>,
    pub aggregate_window: Duration,
    pub trusted_host_readers: Vec<String>,
    /// Stop by itself after this long (`detector learn`).
    pub stop_after: Option<Duration>,
    pub kill_scope: KillScope,
    pub rotation_grace: Duration,
    /// `None`: look for the usual sockets.
    pub cri_socket: Option<PathBuf>,
    pub open_sensor: OpenSensor,
    /// Kubernetes API enrichment (`node_name` falls back to NODE_NAME when
    /// the daemon starts it).
    pub kube_api: KubeApiConfig,
}

pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";

impl LearnArgs {
    /// `run` settings that learn everything seen for `duration`, then stop
    /// and write the intents.
    pub fn resolve(self) -> Result<RunSettings> {
        let mut s = self.run.resolve()?;
        // Learn for longer than we run, so nothing is judged meanwhile.
        // (`--duration` is at most MAX_DURATION, so this cannot overflow.)
        s.learn_window = self.duration * 2 + Duration::from_secs(60);
        s.learn_output = Some(self.output);
        s.stop_after = Some(self.duration);
        Ok(s)
    }
}

impl RunArgs {
    pub fn resolve(self) -> Result<RunSettings> {
        let file = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let mut sinks = file.sinks.unwrap_or_default();
        // `--alerts` (or `alerts:`) names the JSON-lines output.
        if let Some(path) = self.alerts.clone().or(file.alerts.clone()) {
            let mut jsonl = sinks.jsonl.take().unwrap_or_default();
            jsonl.path = path;
            sinks.jsonl = Some(jsonl);
        }
        let pick_vec =
            |cli: Vec<PathBuf>, cfg: Vec<PathBuf>| if cli.is_empty() { cfg } else { cli };
        Ok(RunSettings {
            policy: pick_vec(self.policy, file.policy),
            kubelet_dir: self
                .kubelet_dir
                .or(file.kubelet_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_KUBELET_DIR)),
            cgroup_root: self.cgroup_root.or(file.cgroup_root),
            alerts: self.alerts.or(file.alerts).unwrap_or_else(|| "-".into()),
            metrics_addr: self
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().expect("valid default")),
            mode: self.mode.or(file.mode).unwrap_or_default(),
            credential_file: pick_vec(self.credential_file, file.credential_file),
            deny_cgroup: pick_vec(self.deny_cgroup, file.deny_cgroup),
            debug_events: self.debug_events.or(file.debug_events),
            connect_dedup_ms: self
                .connect_dedup_ms
                .or(file.connect_dedup_ms)
                .unwrap_or(1000),
            credential_dedup_ms: self
                .credential_dedup_ms
                .or(file.credential_dedup_ms)
                .unwrap_or(1000),
            cgroup_event_budget: self
                .cgroup_event_budget
                .or(file.cgroup_event_budget)
                .unwrap_or(20_000),
            cgroup_alert_budget: self
                .cgroup_alert_budget
                .or(file.cgroup_alert_budget)
                .unwrap_or(10_000),
            pin_dir: self.pin_dir.or(file.pin_dir),
            sinks,
            learn_window: self
                .learn_window
                .or(file.learn_window)
                .unwrap_or(Duration::from_secs(600)),
            learn_output: self.learn_output.or(file.learn_output),
            aggregate_window: self
                .aggregate_window
                .or(file.aggregate_window)
                .unwrap_or(Duration::from_secs(60)),
            trusted_host_readers: {
                let v = if self.trusted_host_reader.is_empty() {
                    file.trusted_host_reader
                } else {
                    self.trusted_host_reader
                };
                if v.is_empty() {
                    vec!["/usr/bin/kubelet".into(), "/usr/local/bin/kubelet".into()]
                } else {
                    v
                }
            },
            kill_scope: self.kill_scope.or(file.kill_scope).unwrap_or_default(),
            rotation_grace: self
                .rotation_grace
                .or(file.rotation_grace)
                .unwrap_or(Duration::from_secs(120)),
            cri_socket: self.cri_socket.or(file.cri_socket),
            open_sensor: self.open_sensor.or(file.open_sensor).unwrap_or_default(),
            kube_api: KubeApiConfig {
                mode: self.kube_api.or(file.kube_api).unwrap_or_default(),
                node_name: self.node_name.or(file.node_name),
                token_file: self.kube_api_token_file.or(file.kube_api_token_file),
                ca_file: self.kube_api_ca_file.or(file.kube_api_ca_file),
            },
            stop_after: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_config_file() {
        let dir = std::env::temp_dir().join(format!("detector-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("c.yaml");
        std::fs::write(
            &cfg,
            "mode: observe\nalerts: /tmp/a.jsonl\nconnect_dedup_ms: 5\nopen_sensor: tracepoint\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(cfg.clone()),
            alerts: Some("-".into()),
            ..Default::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.mode, Mode::Observe);
        assert_eq!(s.alerts, "-");
        assert_eq!(s.connect_dedup_ms, 5);
        assert_eq!(s.open_sensor, OpenSensor::Tracepoint);
        assert_eq!(
            RunArgs::default().resolve().unwrap().open_sensor,
            OpenSensor::Auto
        );
        assert_eq!(s.kubelet_dir, PathBuf::from(DEFAULT_KUBELET_DIR));
        assert_eq!(s.sinks.jsonl.as_ref().map(|j| j.path.as_str()), Some("-"));

        assert_eq!(s.kube_api, KubeApiConfig::default(), "auto by default");

        std::fs::write(
            &cfg,
            "kube_api: off\nnode_name: node-a\nkube_api_ca_file: /ca.crt\n",
        )
        .unwrap();
        let s = RunArgs {
            config: Some(cfg.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.kube_api.mode, KubeApiMode::Off);
        assert_eq!(s.kube_api.node_name.as_deref(), Some("node-a"));
        assert_eq!(s.kube_api.ca_file, Some(PathBuf::from("/ca.crt")));
        let s = RunArgs {
            config: Some(cfg.clone()),
            kube_api: Some(KubeApiMode::parse("http://127.0.0.1:8001").unwrap()),
            node_name: Some("node-b".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(matches!(s.kube_api.mode, KubeApiMode::Url(_)));
        assert_eq!(s.kube_api.node_name.as_deref(), Some("node-b"));
        std::fs::write(&cfg, "kube_api: ftp://x\n").unwrap();
        let err = RunArgs {
            config: Some(cfg.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("http(s) URL"), "{err}");

        std::fs::write(&cfg, "mode: observe\nbogus: 1\n").unwrap();
        let err = RunArgs {
            config: Some(cfg.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("{}:2:", cfg.display())), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn parse(text: &str) -> Result<ConfigFile, Vec<String>> {
        ConfigFile::parse(Path::new("c.yaml"), text)
            .map_err(|e| e.0.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn config_errors_name_file_line_and_field() {
        let e = parse("# detector\nmode: bogus\n").unwrap_err();
        assert!(
            e[0].starts_with("c.yaml:2: mode: unknown variant `bogus`"),
            "{e:?}"
        );
        let e = parse("connect_dedup_ms: 1\nsinks:\n  webhook:\n    url: [a]\n").unwrap_err();
        assert!(e[0].starts_with("c.yaml:4: sinks.webhook.url: "), "{e:?}");
        let e = parse("sinks:\n  jsonl: {path: x, keep: 7, nope: 1}\n").unwrap_err();
        assert!(
            e[0].starts_with("c.yaml:2: sinks.jsonl: unknown field `nope`"),
            "{e:?}"
        );
        // Values of the right type that would break the daemon. Durations
        // beyond a year overflowed `Instant + duration` (a panic at run
        // time); a huge queue_capacity panicked in tokio's channel; a huge
        // keep made every rotation loop over billions of renames.
        let e = parse(
            "aggregate_window: 5000years\nsinks:\n  queue_capacity: 0\n  jsonl: {keep: 4294967295}\n  webhook:\n    url: ftp://x/\n    batch_max: 0\n    flush_interval: 5000years\n    headers: {\"Bad Name\": x, X-Key: \"secret\\x7f\"}\n  syslog: {address: \"\", facility: local9}\n",
        )
        .unwrap_err();
        let want = [
            "c.yaml:1: aggregate_window: 5000years is longer than the maximum of 365 days",
            "c.yaml:3: sinks.queue_capacity: 0 is out of range; expected 1 to 1000000",
            "c.yaml:4: sinks.jsonl.keep: 4294967295 is out of range; expected 0 to 1000",
            "c.yaml:6: sinks.webhook.url: scheme \"ftp\"; expected http or https",
            "c.yaml:7: sinks.webhook.batch_max: 0 is out of range; expected 1 to 100000",
            "c.yaml:8: sinks.webhook.flush_interval: 5000years is longer than the maximum of 365 days",
            "c.yaml:9: sinks.webhook.headers: invalid header name \"Bad Name\"",
            "c.yaml:9: sinks.webhook.headers: invalid value of header \"X-Key\" (not shown)",
            "c.yaml:10: sinks.syslog.facility: unknown syslog facility \"local9\"",
            "c.yaml:10: sinks.syslog.address: must not be empty (host:port)",
        ];
        assert_eq!(e.len(), want.len(), "{e:#?}");
        for w in want {
            assert!(e.iter().any(|e| e.starts_with(w)), "{w} not in {e:#?}");
        }
        assert!(!e.iter().any(|e| e.contains("secret")), "{e:#?}");
    }

    #[test]
    fn config_documents_and_hostile_shapes() {
        // Empty files and empty documents are the default config.
        for t in ["", "# nothing\n", "---\n", "---\n...\n", "~\n"] {
            assert!(parse(t).is_ok(), "{t:?}");
        }
        assert!(parse("mode: observe\n---\n").is_ok());
        let e = parse("mode: observe\n---\nmode: enforce\n").unwrap_err();
        assert_eq!(
            e,
            ["c.yaml:3: a second YAML document; a config file holds one"]
        );
        // Syntax errors, an alias bomb, deep nesting: errors with a line.
        let e = parse("mode: observe\nsinks: {\n").unwrap_err();
        assert!(e[0].starts_with("c.yaml:3: "), "{e:?}");
        let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = format!("*a{}", i - 1);
            laughs.push_str(&format!("a{i}: &a{i} [{}]\n", vec![p; 10].join(", ")));
        }
        let e = parse(&laughs).unwrap_err();
        assert!(e[0].starts_with("c.yaml:"), "{e:?}");
        let e = parse(&format!("policy: {}\n", "[".repeat(100_000))).unwrap_err();
        assert_eq!(e, ["c.yaml:1: nesting deeper than 64 levels of [ and {"]);
        // The error at the end of the text stays on its last line.
        let e = parse("sinks:\n  webhook: {url: [").unwrap_err();
        assert!(e[0].starts_with("c.yaml:2: "), "{e:?}");
    }

    #[test]
    fn config_files_are_bounded() {
        // `--config /dev/zero` must not read for ever.
        let e = ConfigFile::load(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("/dev/zero:1: config file larger than {MAX_CONFIG_BYTES} bytes")
        );
        let e = ConfigFile::load(Path::new("/nonexistent/c.yaml")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("/nonexistent/c.yaml:1: cannot read config file"));
    }

    #[test]
    fn duration_flags_are_bounded() {
        // `--duration` was doubled unchecked (`Duration * 2` panics on
        // overflow), and every duration ends up in `Instant + duration`.
        for args in [
            &[
                "detector",
                "learn",
                "--duration",
                "584942417355years",
                "--output",
                "x",
            ][..],
            &["detector", "run", "--learn-window", "5000years"][..],
            &["detector", "run", "--rotation-grace", "366days"][..],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(
                e.contains("maximum") || e.contains("too large"),
                "{args:?}: {e}"
            );
        }
        assert!(Cli::try_parse_from(["detector", "run", "--aggregate-window", "365days"]).is_ok());
    }
}
