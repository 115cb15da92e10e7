//! The finding contract (../shared/DESIGN.md): one JSON object per line.
//! Fields may be added; none of the contract's may be renamed.
//! A finding never carries credential contents, only their identity.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    UnexpectedReader,
    UnexpectedDestination,
    ForeignCredential,
    /// A credential read outside the workload's usual pattern or cgroup.
    StaleReuse,
    /// Events of this workload were lost: it cannot be reported as clean.
    CoverageDegraded,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnexpectedReader => "unexpected_reader",
            Self::UnexpectedDestination => "unexpected_destination",
            Self::ForeignCredential => "foreign_credential",
            Self::StaleReuse => "stale_reuse",
            Self::CoverageDegraded => "coverage_degraded",
        }
    }

    /// MITRE ATT&CK techniques the finding is evidence of.
    pub fn mitre(self) -> &'static [&'static str] {
        match self {
            // Steal Application Access Token; Unsecured Credentials: Container API
            Self::UnexpectedReader => &["T1528", "T1552.007"],
            // Use Alternate Authentication Material: Application Access Token
            Self::UnexpectedDestination => &["T1528", "T1550.001"],
            Self::ForeignCredential => &["T1528", "T1552.007", "T1611"],
            Self::StaleReuse => &["T1550.001"],
            Self::CoverageDegraded => &["T1562.001"],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Alerted,
    Blocked,
    Killed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alerted => "alerted",
            Self::Blocked => "blocked",
            Self::Killed => "killed",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    pub cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    /// From the Kubernetes API, when it is reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The pod's labels (the API's when reachable, else CRI's).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    pub comm: String,
    /// Executables of the ancestors, nearest first.
    #[serde(default)]
    pub ancestry: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// e.g. `kubernetes-serviceaccount`, `aws-web-identity`.
    pub kind: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_pod_uid: Option<String>,
    pub inode: u64,
    pub dev: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub ip: std::net::IpAddr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    pub kind: FindingKind,
    pub severity: Severity,
    pub action: Action,
    /// `namespace/name` of the intent that judged it, or `learned` / `default`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    pub workload: Workload,
    pub process: Process,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<Credential>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    pub mitre: Vec<String>,
    /// Identical findings folded into this one since the last report
    /// (aggregation); 1 for a first occurrence.
    #[serde(default = "one")]
    pub count: u64,
    /// Human-readable one-line summary for SOC consoles.
    #[serde(default)]
    pub message: String,
}

fn one() -> u64 {
    1
}
