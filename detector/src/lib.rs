//! detector: eBPF runtime credential-misuse detection for Kubernetes nodes.
//!
//! Module map (one responsibility each):
//! - `btf`, `loader`: kernel offsets from BTF; load, attach and own the programs and maps
//! - `events`: decode ring-buffer records into typed events
//! - `fanotify`: credential opens through fanotify permission events (no syscall tracepoint)
//! - `inventory`: credential files on the node and their owner pods
//! - `attribution`: cgroup id -> pod / container
//! - `policy`: workload intents (YAML) and their validation
//! - `finding`: the finding contract
//! - `sinks`: where findings go (JSON lines, webhook, syslog/CEF, OCSF)
//! - `observe`: Prometheus metrics, /healthz, /readyz
//! - `yaml`: hostile-input guards and error lines for YAML files (intents, config)
pub mod aggregate;
pub mod attribution;
pub mod btf;
pub mod cli;
pub mod correlate;
pub mod coverage;
pub mod credentials;
pub mod daemon;
pub mod enforce;
pub mod events;
pub mod fanotify;
pub mod finding;
pub mod inventory;
pub mod learn;
pub mod lease;
pub mod loader;
pub mod observe;
pub mod policy;
pub mod process;
pub mod sinks;
pub mod yaml;
