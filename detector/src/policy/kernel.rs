//! Kernel form of an intent: the `CGROUP_POLICY` value and the `ALLOW4` /
//! `ALLOW6` LPM-trie entries the connect programs consult (types in
//! `detector_common::maps`).
//!
//! Rules:
//! - An intent without `destinations` polices no destination: no entries
//!   ([`compile`] returns `None`), and the kernel lets its holders connect.
//! - The trie answers with the *longest* matching prefix only, while an
//!   intent allows a destination if *any* entry matches. So each prefix
//!   carries the union of its own ports and those of every shorter prefix
//!   that contains it; equal prefixes are merged.
//! - `host` entries become /32 or /128 entries for the addresses the name
//!   resolves to now; recompile when [`DnsTable`](super::DnsTable) says the
//!   answers changed.
//! - A prefix may hold [`MAX_PORTS`] ports. With more, the entry is widened
//!   to any port (`count == 0`) and listed in [`KernelPolicy::widened`]: the
//!   kernel then lets those connects through and userspace, which checks the
//!   exact list, reports the others as findings (alert, not block).

use std::collections::BTreeMap;

use detector_common::{AllowKey4, AllowKey6, AllowPorts, CgroupPolicy, MAX_PORTS};
use ipnet::IpNet;

use super::{Intent, IntentSet, Ports, Target};

/// One LPM-trie entry: `prefix_len` counts the 32 policy-id bits plus the
/// address prefix (as `aya::maps::lpm_trie::Key::new(prefix_len, key)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allow<K> {
    pub prefix_len: u32,
    pub key: K,
    pub ports: AllowPorts,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPolicy {
    /// The value for every cgroup the intent selects.
    pub policy: CgroupPolicy,
    pub allow4: Vec<Allow<AllowKey4>>,
    pub allow6: Vec<Allow<AllowKey6>>,
    /// Prefixes whose port lists did not fit and now allow any port.
    pub widened: Vec<IpNet>,
}

fn allow_ports(ports: &Ports) -> Option<AllowPorts> {
    match ports {
        Ports::Any => Some(AllowPorts::ANY),
        Ports::List(l) if l.len() > MAX_PORTS => None,
        Ports::List(l) => {
            let mut p = AllowPorts {
                count: l.len() as u32,
                ..AllowPorts::ANY
            };
            p.ports[..l.len()].copy_from_slice(l);
            Some(p)
        }
    }
}

fn union(a: &Ports, b: &Ports) -> Ports {
    match (a, b) {
        (Ports::List(x), Ports::List(y)) => {
            let mut v: Vec<u16> = x.iter().chain(y).copied().collect();
            v.sort_unstable();
            v.dedup();
            Ports::List(v)
        }
        _ => Ports::Any,
    }
}

/// Compile `intent` under `policy_id` (non-zero, unique per loaded intent).
pub fn compile(intent: &Intent, policy_id: u32) -> Option<KernelPolicy> {
    let dests = intent.destinations.as_ref()?;
    let mut prefixes: BTreeMap<IpNet, Ports> = BTreeMap::new();
    let mut add = |net: IpNet, ports: &Ports| {
        let merged = match prefixes.get(&net) {
            Some(p) => union(p, ports),
            None => ports.clone(),
        };
        prefixes.insert(net, merged);
    };
    for d in dests {
        match &d.target {
            Target::Cidr(net) => add(*net, &d.ports),
            Target::Host(h) => {
                for ip in h.addrs().iter() {
                    add(IpNet::from(*ip), &d.ports);
                }
            }
        }
    }
    let id = policy_id.to_be_bytes();
    let mut out = KernelPolicy {
        policy: CgroupPolicy {
            policy_id,
            action: intent.action as u32,
        },
        allow4: Vec::new(),
        allow6: Vec::new(),
        widened: Vec::new(),
    };
    for (net, own) in &prefixes {
        let effective = prefixes
            .iter()
            .filter(|(outer, _)| outer.prefix_len() < net.prefix_len() && outer.contains(net))
            .fold(own.clone(), |acc, (_, p)| union(&acc, p));
        let ports = allow_ports(&effective).unwrap_or_else(|| {
            out.widened.push(*net);
            AllowPorts::ANY
        });
        let prefix_len = 32 + net.prefix_len() as u32;
        match net {
            IpNet::V4(n) => out.allow4.push(Allow {
                prefix_len,
                key: AllowKey4 {
                    policy_id_be: id,
                    addr: n.network().octets(),
                },
                ports,
            }),
            IpNet::V6(n) => out.allow6.push(Allow {
                prefix_len,
                key: AllowKey6 {
                    policy_id_be: id,
                    addr: n.network().octets(),
                },
                ports,
            }),
        }
    }
    Some(out)
}

/// Every intent of `set` that polices destinations, with policy id =
/// index + 1 (0 is never used).
pub fn compile_set(set: &IntentSet) -> Vec<(usize, KernelPolicy)> {
    set.iter()
        .enumerate()
        .filter_map(|(i, intent)| compile(intent, i as u32 + 1).map(|k| (i, k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, path::Path};

    use detector_common::{decide, DecisionInput, PolicyAction, Verdict, VerdictReason};

    use super::*;
    use crate::policy::{load_str, DnsTable};

    fn bits(bytes: &[u8], n: u32) -> impl Iterator<Item = bool> + '_ {
        (0..n).map(move |i| bytes[(i / 8) as usize] & (0x80 >> (i % 8)) != 0)
    }

    /// What the kernel's LPM trie returns for (policy id, ip).
    fn lookup(k: &KernelPolicy, ip: IpAddr) -> Option<AllowPorts> {
        let id = k.policy.policy_id.to_be_bytes();
        let mut best: Option<(u32, AllowPorts)> = None;
        let mut consider =
            |prefix_len: u32, key_bytes: Vec<u8>, want: Vec<u8>, ports: AllowPorts| {
                if bits(&key_bytes, prefix_len).eq(bits(&want, prefix_len))
                    && best.is_none_or(|(l, _)| prefix_len > l)
                {
                    best = Some((prefix_len, ports));
                }
            };
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let want = [&id[..], &v4.octets()[..]].concat();
                for a in &k.allow4 {
                    consider(
                        a.prefix_len,
                        [&a.key.policy_id_be[..], &a.key.addr[..]].concat(),
                        want.clone(),
                        a.ports,
                    );
                }
            }
            IpAddr::V6(v6) => {
                let want = [&id[..], &v6.octets()[..]].concat();
                for a in &k.allow6 {
                    consider(
                        a.prefix_len,
                        [&a.key.policy_id_be[..], &a.key.addr[..]].concat(),
                        want.clone(),
                        a.ports,
                    );
                }
            }
        }
        best.map(|(_, p)| p)
    }

    fn kernel_verdict(k: &KernelPolicy, ip: IpAddr, port: u16) -> (Verdict, VerdictReason) {
        let allowed = lookup(k, ip);
        decide(&DecisionInput {
            enforce: true,
            deny_process: None,
            deny_cgroup: None,
            is_holder: true,
            policy: Some(PolicyAction::from_u32(k.policy.action)),
            allowed: allowed.as_ref(),
            port,
        })
    }

    fn intent(
        yaml_dests: &str,
        action: &str,
    ) -> (crate::policy::IntentSet, std::sync::Arc<DnsTable>) {
        let text = format!(
            "apiVersion: detector.dev/v1alpha1\nkind: WorkloadIntent\nmetadata: {{name: a, namespace: n}}\nspec:\n  selector: {{namespace: n}}\n  destinations:\n{yaml_dests}  action: {action}\n"
        );
        let dns = DnsTable::new();
        dns.set(
            "vault.vault.svc.cluster.local",
            vec!["10.96.5.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        );
        let set =
            load_str(Path::new("t.yaml"), &text, &dns).unwrap_or_else(|e| panic!("{e}\n{text}"));
        (set, dns)
    }

    #[test]
    fn entries_match_the_contract_layout() {
        let (set, _dns) = intent(
            "    - {cidr: 10.96.0.1/32, ports: [443]}\n    - {cidr: 10.0.0.0/8}\n",
            "block",
        );
        let k = compile(set.get(0).unwrap(), 7).unwrap();
        assert_eq!(
            k.policy,
            CgroupPolicy {
                policy_id: 7,
                action: PolicyAction::Block as u32
            }
        );
        assert_eq!(k.allow4.len(), 2);
        let host = k.allow4.iter().find(|a| a.prefix_len == 64).unwrap();
        assert_eq!(
            host.key,
            AllowKey4 {
                policy_id_be: [0, 0, 0, 7],
                addr: [10, 96, 0, 1]
            }
        );
        // 10.96.0.1 is inside 10.0.0.0/8 (any port), so the longer entry must allow any port too.
        assert_eq!(host.ports, AllowPorts::ANY);
        let wide = k.allow4.iter().find(|a| a.prefix_len == 40).unwrap();
        assert_eq!(wide.key.addr, [10, 0, 0, 0]);
        assert!(k.allow6.is_empty() && k.widened.is_empty());
    }

    #[test]
    fn kernel_decision_equals_userspace_decision() {
        let dests = "    - {cidr: 10.96.0.1/32, ports: [443]}
    - {cidr: 10.96.0.0/16, ports: [53]}
    - {cidr: 10.96.0.1/32, ports: [6443]}
    - {cidr: 192.168.0.0/24}
    - {cidr: 'fd00::/64', ports: [8443]}
    - {host: vault.vault.svc.cluster.local, ports: [8200]}
";
        let (set, _dns) = intent(dests, "kill");
        let i = set.get(0).unwrap();
        let k = compile(i, 3).unwrap();
        let ips = [
            "10.96.0.1",
            "10.96.9.9",
            "10.97.0.1",
            "192.168.0.77",
            "192.168.1.1",
            "fd00::1",
            "fd01::1",
            "10.96.5.5",
            "fd00::5",
            "::ffff:10.96.0.1",
            "0.0.0.0",
            "::",
        ];
        for ip in ips {
            let ip: IpAddr = ip.parse().unwrap();
            for port in [1, 53, 443, 6443, 8200, 8443, 65535] {
                let (verdict, reason) = kernel_verdict(&k, ip, port);
                let user = i.allows_destination(ip, port);
                assert_eq!(
                    verdict == Verdict::Allowed,
                    user,
                    "{ip}:{port}: kernel {verdict:?} vs intent {user}"
                );
                if !user {
                    assert_eq!(
                        (verdict, reason),
                        (Verdict::Killed, VerdictReason::UnexpectedDestination)
                    );
                }
            }
        }
        // Overlap merging: 10.96.0.1 carries 443 and 6443 (its own) plus 53 (from the /16).
        let host = k
            .allow4
            .iter()
            .find(|a| a.prefix_len == 64 && a.key.addr == [10, 96, 0, 1])
            .unwrap();
        assert_eq!(
            &host.ports.ports[..host.ports.count as usize],
            &[53, 443, 6443]
        );
    }

    #[test]
    fn empty_destinations_deny_everything_and_missing_ones_police_nothing() {
        let (set, _dns) = intent("    []\n", "block");
        let k = compile(set.get(0).unwrap(), 1).unwrap();
        assert!(k.allow4.is_empty() && k.allow6.is_empty());
        assert_eq!(
            kernel_verdict(&k, "1.1.1.1".parse().unwrap(), 443).0,
            Verdict::Denied
        );

        let text = "apiVersion: detector.dev/v1alpha1\nkind: WorkloadIntent\nmetadata: {name: r}\nspec:\n  selector: {podUID: u}\n  readers: [/app]\n";
        let set = load_str(Path::new("r.yaml"), text, &DnsTable::default()).unwrap();
        assert!(compile(set.get(0).unwrap(), 1).is_none());
        assert!(compile_set(&set).is_empty());
    }

    #[test]
    fn more_ports_than_the_kernel_holds_widen_to_any_port() {
        let ports: Vec<String> = (1000..1020).map(|p| p.to_string()).collect();
        let dests = format!(
            "    - {{cidr: 10.1.0.0/16, ports: [{}]}}\n    - {{cidr: 10.2.0.0/16, ports: [80]}}\n",
            ports.join(", ")
        );
        let (set, _dns) = intent(&dests, "block");
        assert_eq!(set.warnings.len(), 1, "{:?}", set.warnings);
        assert!(
            set.warnings[0].message.contains("20 ports"),
            "{:?}",
            set.warnings
        );
        let i = set.get(0).unwrap();
        let k = compile(i, 1).unwrap();
        assert_eq!(k.widened, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        // Listed ports: both allow. Others: the kernel allows (widened), userspace flags.
        assert_eq!(kernel_verdict(&k, ip, 1019).0, Verdict::Allowed);
        assert!(i.allows_destination(ip, 1019));
        assert_eq!(kernel_verdict(&k, ip, 22).0, Verdict::Allowed);
        assert!(!i.allows_destination(ip, 22));
        // The other prefix is unaffected.
        assert_eq!(
            kernel_verdict(&k, "10.2.0.1".parse().unwrap(), 22).0,
            Verdict::Denied
        );
        // Exactly 16 ports still fit.
        let ports: Vec<String> = (1000..1016).map(|p| p.to_string()).collect();
        let (set, _dns) = intent(
            &format!(
                "    - {{cidr: 10.1.0.0/16, ports: [{}]}}\n",
                ports.join(",")
            ),
            "block",
        );
        let k = compile(set.get(0).unwrap(), 1).unwrap();
        assert!(k.widened.is_empty() && set.warnings.is_empty());
        assert_eq!(k.allow4[0].ports.count, 16);
    }

    #[test]
    fn hosts_compile_to_their_current_addresses() {
        let (set, dns) = intent(
            "    - {host: vault.vault.svc.cluster.local, ports: [8200]}\n",
            "block",
        );
        let i = set.get(0).unwrap();
        let k = compile(i, 2).unwrap();
        assert_eq!((k.allow4.len(), k.allow6.len()), (1, 1));
        assert_eq!(k.allow4[0].prefix_len, 64);
        assert_eq!(k.allow6[0].prefix_len, 32 + 128);
        dns.set(
            "vault.vault.svc.cluster.local",
            vec!["10.96.6.6".parse().unwrap()],
        );
        let k = compile(i, 2).unwrap();
        assert_eq!(k.allow4[0].key.addr, [10, 96, 6, 6]);
        assert!(k.allow6.is_empty());
        assert!(i.allows_destination("10.96.6.6".parse().unwrap(), 8200));
        assert!(!i.allows_destination("10.96.5.5".parse().unwrap(), 8200));
    }
}
