//! Command line (the contract in ../shared/DESIGN.md) and the config file
//! that can set every `run` flag.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;

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
    #[arg(long, value_parser = humantime::parse_duration)]
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
    /// fanotify when this kernel and our privileges allow it, else tracepoint.
    #[default]
    Auto,
    /// fanotify permission events on the credential files only: no syscall
    /// tracepoint, so other syscalls pay nothing (needs CAP_SYS_ADMIN).
    Fanotify,
    /// Syscall-exit tracepoints of the open family (also sees pidfd_getfd).
    Tracepoint,
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
    /// an ordinary flood cannot crowd them out [default: 2000].
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
    #[arg(long, value_parser = humantime::parse_duration)]
    pub learn_window: Option<Duration>,
    /// Write the learned intents (WorkloadIntent YAML) here at exit.
    #[arg(long)]
    pub learn_output: Option<PathBuf>,
    /// What `action: kill` kills: process | container [default: process].
    #[arg(long, value_enum)]
    pub kill_scope: Option<KillScope>,
    /// Fold repeated identical findings for this long [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub aggregate_window: Option<Duration>,
    /// Host executables allowed to read any pod's credential
    /// [default: kubelet in /usr/bin, /usr/local/bin].
    #[arg(long = "trusted-host-reader")]
    pub trusted_host_reader: Vec<String>,
    /// How long a credential that disappeared (rotated away, pod removed)
    /// stays watched: a process may still read the old file [default: 2m].
    #[arg(long, value_parser = humantime::parse_duration)]
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
        s.learn_window = self.duration * 2 + Duration::from_secs(60);
        s.learn_output = Some(self.output);
        s.stop_after = Some(self.duration);
        Ok(s)
    }
}

impl RunArgs {
    pub fn resolve(self) -> Result<RunSettings> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                serde_norway::from_str::<ConfigFile>(&text).map_err(|e| {
                    let line = e.location().map(|l| l.line()).unwrap_or(0);
                    anyhow::anyhow!("{}:{}: {}", path.display(), line, e)
                })?
            }
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
                .unwrap_or(2_000),
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
            "mode: observe\nalerts: /tmp/a.jsonl\nconnect_dedup_ms: 5\n",
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
}
