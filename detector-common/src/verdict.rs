//! The connect decision, shared by the cgroup/connect programs and by
//! userspace (which replays it for tests and for `--mode observe` reports).

/// What an intent asks for when a holder goes somewhere it should not.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    Alert = 0,
    Block = 1,
    Kill = 2,
}

impl PolicyAction {
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Block,
            2 => Self::Kill,
            _ => Self::Alert,
        }
    }
}

/// What the kernel did with a connect.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed = 0,
    /// Outside the intent, but the action is alert (or observe mode).
    Flagged = 1,
    Denied = 2,
    /// Denied and SIGKILL sent to the caller.
    Killed = 3,
}

impl Verdict {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Allowed,
            1 => Self::Flagged,
            2 => Self::Denied,
            3 => Self::Killed,
            _ => return None,
        })
    }
}

/// Why the kernel reached its verdict.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictReason {
    /// Nothing applies (not a holder, or no policy for the cgroup).
    None = 0,
    /// A holder connected to a destination its intent allows.
    AllowedDestination = 1,
    /// A holder connected outside its intent's destinations.
    UnexpectedDestination = 2,
    /// The cgroup is on the manual deny list.
    DenyCgroup = 3,
    /// The process is on the manual deny list.
    DenyProcess = 4,
}

impl VerdictReason {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::None,
            1 => Self::AllowedDestination,
            2 => Self::UnexpectedDestination,
            3 => Self::DenyCgroup,
            4 => Self::DenyProcess,
            _ => return None,
        })
    }
}

/// Inputs to [`decide`], gathered by the caller from the maps.
#[derive(Clone, Copy, Debug)]
pub struct DecisionInput<'a> {
    pub enforce: bool,
    pub deny_process: Option<PolicyAction>,
    pub deny_cgroup: Option<PolicyAction>,
    pub is_holder: bool,
    /// The cgroup's policy action, if it has one.
    pub policy: Option<PolicyAction>,
    /// The allow-list entry matching the destination, if any.
    pub allowed: Option<&'a crate::AllowPorts>,
    pub port: u16,
}

/// The connect decision. Pure, so both sides compute the same thing.
#[inline(always)]
pub fn decide(input: &DecisionInput<'_>) -> (Verdict, VerdictReason) {
    let enforce_as = |action: PolicyAction| -> Verdict {
        match (input.enforce, action) {
            (true, PolicyAction::Block) => Verdict::Denied,
            (true, PolicyAction::Kill) => Verdict::Killed,
            _ => Verdict::Flagged,
        }
    };
    if let Some(action) = input.deny_process {
        return (enforce_as(action), VerdictReason::DenyProcess);
    }
    if let Some(action) = input.deny_cgroup {
        return (enforce_as(action), VerdictReason::DenyCgroup);
    }
    if !input.is_holder {
        return (Verdict::Allowed, VerdictReason::None);
    }
    let Some(action) = input.policy else {
        return (Verdict::Allowed, VerdictReason::None);
    };
    match input.allowed {
        Some(ports) if ports.allows(input.port) => {
            (Verdict::Allowed, VerdictReason::AllowedDestination)
        }
        _ => (enforce_as(action), VerdictReason::UnexpectedDestination),
    }
}

/// If `addr` (network order) is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// returns the IPv4 address.
#[inline(always)]
pub fn v4_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return None;
        }
        i += 1;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{kernel_dev_from_user, AllowPorts};

    fn input() -> DecisionInput<'static> {
        DecisionInput {
            enforce: true,
            deny_process: None,
            deny_cgroup: None,
            is_holder: true,
            policy: Some(PolicyAction::Block),
            allowed: None,
            port: 443,
        }
    }

    #[test]
    fn holder_outside_intent_is_denied_when_enforcing() {
        assert_eq!(
            decide(&input()),
            (Verdict::Denied, VerdictReason::UnexpectedDestination)
        );
        let kill = DecisionInput {
            policy: Some(PolicyAction::Kill),
            ..input()
        };
        assert_eq!(decide(&kill).0, Verdict::Killed);
        let observe = DecisionInput {
            enforce: false,
            ..input()
        };
        assert_eq!(decide(&observe).0, Verdict::Flagged);
        let alert = DecisionInput {
            policy: Some(PolicyAction::Alert),
            ..input()
        };
        assert_eq!(decide(&alert).0, Verdict::Flagged);
    }

    #[test]
    fn allowed_destination_checks_port() {
        let mut p = AllowPorts {
            count: 2,
            ..AllowPorts::default()
        };
        p.ports[0] = 443;
        p.ports[1] = 8200;
        let ok = DecisionInput {
            allowed: Some(&p),
            ..input()
        };
        assert_eq!(
            decide(&ok),
            (Verdict::Allowed, VerdictReason::AllowedDestination)
        );
        let bad_port = DecisionInput {
            allowed: Some(&p),
            port: 22,
            ..input()
        };
        assert_eq!(decide(&bad_port).0, Verdict::Denied);
        let any = DecisionInput {
            allowed: Some(&AllowPorts::ANY),
            port: 1,
            ..input()
        };
        assert_eq!(decide(&any).0, Verdict::Allowed);
    }

    #[test]
    fn non_holders_and_unpoliced_cgroups_pass() {
        let nh = DecisionInput {
            is_holder: false,
            ..input()
        };
        assert_eq!(decide(&nh), (Verdict::Allowed, VerdictReason::None));
        let np = DecisionInput {
            policy: None,
            ..input()
        };
        assert_eq!(decide(&np), (Verdict::Allowed, VerdictReason::None));
    }

    #[test]
    fn manual_deny_lists_win_even_for_non_holders() {
        let d = DecisionInput {
            is_holder: false,
            deny_cgroup: Some(PolicyAction::Block),
            ..input()
        };
        assert_eq!(decide(&d), (Verdict::Denied, VerdictReason::DenyCgroup));
        let p = DecisionInput {
            deny_process: Some(PolicyAction::Kill),
            ..d
        };
        assert_eq!(decide(&p), (Verdict::Killed, VerdictReason::DenyProcess));
    }

    #[test]
    fn v4_mapped_detection() {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(v4_mapped(&a), Some([127, 0, 0, 1]));
        a[0] = 0x20;
        assert_eq!(v4_mapped(&a), None);
        let mut lo6 = [0u8; 16];
        lo6[15] = 1;
        assert_eq!(v4_mapped(&lo6), None);
    }

    #[test]
    fn dev_encoding_matches_kernel() {
        // tmpfs-like anonymous device 0:45 and a disk 259:3 (nvme), plus a
        // large minor that spills into the high bits of the glibc encoding.
        let glibc = |major: u64, minor: u64| {
            ((major & 0xfff) << 8)
                | ((major & !0xfff) << 32)
                | (minor & 0xff)
                | ((minor & !0xff) << 12)
        };
        assert_eq!(kernel_dev_from_user(glibc(0, 45)), 45);
        assert_eq!(kernel_dev_from_user(glibc(259, 3)), (259 << 20) | 3);
        assert_eq!(kernel_dev_from_user(glibc(8, 0x12345)), (8 << 20) | 0x12345);
    }
}
