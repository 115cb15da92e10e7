//! Keeps the kernel's enforcement maps equal to "intents x cgroups":
//! `CGROUP_POLICY[cgroup] = {policy id, action}` for every cgroup whose
//! workload an intent selects, and the destination allow-lists (`ALLOW4`,
//! `ALLOW6`) of every intent that polices destinations. The kernel then
//! decides each holder's connect itself; userspace is never on that path.
//!
//! A reload writes the new allow-lists under fresh policy ids (two banks
//! alternate) before any cgroup is re-pointed to them, then removes the old
//! bank: at no instant does a cgroup point at a missing allow-list, so a
//! reload never denies an allowed connection.

use std::{collections::HashMap, sync::Arc};

use aya::maps::lpm_trie::Key;
use detector_common::{AllowKey4, AllowKey6, CgroupPolicy};
use tracing::{debug, info, warn};

use crate::{
    correlate::WorkloadCtx,
    loader::KernelMaps,
    policy::{kernel::compile_set, IntentSet, WorkloadView},
};

/// Policy ids of bank 1 start here; bank 0 uses 1..BANK_SPAN.
const BANK_SPAN: u32 = 1 << 30;

pub struct Enforcer {
    set: Arc<IntentSet>,
    bank: u32,
    /// intent index -> its kernel value (absent: the intent does not police
    /// destinations, nothing to enforce in the kernel).
    compiled: HashMap<usize, CgroupPolicy>,
    written4: Vec<Key<AllowKey4>>,
    written6: Vec<Key<AllowKey6>>,
    /// What we wrote into CGROUP_POLICY.
    cgroups: HashMap<u64, CgroupPolicy>,
}

impl Default for Enforcer {
    fn default() -> Self {
        Enforcer {
            set: Arc::new(IntentSet::new(Vec::new())),
            bank: 0,
            compiled: HashMap::new(),
            written4: Vec::new(),
            written6: Vec::new(),
            cgroups: HashMap::new(),
        }
    }
}

impl Enforcer {
    pub fn set(&self) -> &Arc<IntentSet> {
        &self.set
    }

    /// Cgroups currently under a kernel policy.
    pub fn policed(&self) -> usize {
        self.cgroups.len()
    }

    /// After a restart with pinned maps: take over what the previous daemon
    /// wrote, so the first install replaces it in place (new bank, then the
    /// old entries removed) and drops what no intent selects any more, with
    /// no moment without enforcement in between.
    pub fn adopt(&mut self, maps: &KernelMaps) {
        let mut bank = None;
        for (id, p) in maps.cgroup_policy.iter().filter_map(Result::ok) {
            bank = Some(p.policy_id / BANK_SPAN);
            self.cgroups.insert(id, p);
        }
        self.written4 = maps.allow4.keys().filter_map(Result::ok).collect();
        self.written6 = maps.allow6.keys().filter_map(Result::ok).collect();
        let key_bank = |id_be: [u8; 4]| u32::from_be_bytes(id_be) / BANK_SPAN;
        bank = bank
            .or_else(|| {
                self.written4
                    .first()
                    .map(|k| key_bank(k.data().policy_id_be))
            })
            .or_else(|| {
                self.written6
                    .first()
                    .map(|k| key_bank(k.data().policy_id_be))
            });
        // The next install writes the other bank.
        self.bank = bank.unwrap_or(0) & 1;
        info!(
            cgroups = self.cgroups.len(),
            allow_entries = self.written4.len() + self.written6.len(),
            "adopted the enforcement maps of the previous daemon"
        );
    }

    /// Install a new intent set (also after DNS answers changed) and
    /// re-point every known cgroup.
    pub fn apply_set(
        &mut self,
        set: Arc<IntentSet>,
        maps: &mut KernelMaps,
        cgroups: &[(u64, WorkloadCtx)],
    ) {
        let bank = self.bank ^ 1;
        let base = bank * BANK_SPAN;
        let (mut new4, mut new6) = (Vec::new(), Vec::new());
        let mut compiled = HashMap::new();
        for (index, mut k) in compile_set(&set) {
            let id = base + index as u32 + 1;
            k.policy.policy_id = id;
            for a in &k.allow4 {
                let mut key = a.key;
                key.policy_id_be = id.to_be_bytes();
                let key = Key::new(a.prefix_len, key);
                match maps.allow4.insert(&key, a.ports, 0) {
                    Ok(()) => new4.push(key),
                    Err(e) => warn!(error = %e, "cannot write an IPv4 allow entry"),
                }
            }
            for a in &k.allow6 {
                let mut key = a.key;
                key.policy_id_be = id.to_be_bytes();
                let key = Key::new(a.prefix_len, key);
                match maps.allow6.insert(&key, a.ports, 0) {
                    Ok(()) => new6.push(key),
                    Err(e) => warn!(error = %e, "cannot write an IPv6 allow entry"),
                }
            }
            for net in &k.widened {
                warn!(prefix = %net, intent = set.get(index).map(|i| i.id()).unwrap_or_default(), "more than 16 ports for one prefix: enforced as any port");
            }
            compiled.insert(index, k.policy);
        }
        let old4 = std::mem::replace(&mut self.written4, new4);
        let old6 = std::mem::replace(&mut self.written6, new6);
        self.set = set;
        self.compiled = compiled;
        self.bank = bank;
        for (id, ctx) in cgroups {
            self.apply_cgroup(*id, ctx, maps);
        }
        // Cgroups no longer selected by anything.
        let known: std::collections::HashSet<u64> = cgroups.iter().map(|(id, _)| *id).collect();
        let stale: Vec<u64> = self
            .cgroups
            .keys()
            .filter(|id| !known.contains(id))
            .copied()
            .collect();
        for id in stale {
            self.forget_cgroup(id, maps);
        }
        for k in old4 {
            let _ = maps.allow4.remove(&k);
        }
        for k in old6 {
            let _ = maps.allow6.remove(&k);
        }
        info!(
            intents = self.set.len(),
            enforced = self.compiled.len(),
            cgroups = self.cgroups.len(),
            "intents installed in the kernel"
        );
    }

    /// Point one cgroup at its intent's kernel policy (or at none).
    pub fn apply_cgroup(&mut self, id: u64, ctx: &WorkloadCtx, maps: &mut KernelMaps) {
        let want = self
            .set
            .select_index(WorkloadView::from(ctx))
            .and_then(|i| self.compiled.get(&i))
            .copied();
        match want {
            Some(p) if self.cgroups.get(&id) != Some(&p) => {
                if let Err(e) = maps.cgroup_policy.insert(id, p, 0) {
                    warn!(cgroup = id, error = %e, "cannot write the cgroup policy");
                    return;
                }
                debug!(
                    cgroup = id,
                    path = ctx.workload.cgroup_path.as_deref().unwrap_or(""),
                    policy = p.policy_id,
                    "cgroup under intent"
                );
                self.cgroups.insert(id, p);
            }
            Some(_) => {}
            None => self.forget_cgroup(id, maps),
        }
    }

    pub fn forget_cgroup(&mut self, id: u64, maps: &mut KernelMaps) {
        if self.cgroups.remove(&id).is_some() {
            let _ = maps.cgroup_policy.remove(&id);
        }
    }
}
