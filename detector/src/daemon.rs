//! `detector run`: start-up, the event loop, and clean shutdown.
//!
//! One task owns the kernel maps and the ring buffer, so nothing on the event
//! path takes a lock. The kernel takes every enforcement decision itself;
//! this loop only reports, attributes and updates maps.

use std::{
    io::Write,
    os::unix::fs::MetadataExt,
    path::Path,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use detector_common::{kernel_dev_from_user, CredentialKey, DenyRule, EventKind, PolicyAction};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{debug, error, info, warn};

use crate::{
    aggregate::Aggregator,
    attribution::{cri::CriHandle, kubeapi::KubeApiHandle, Attributor},
    btf::Btf,
    cli::{KillScope, Mode, RunSettings},
    correlate::{new_generation, Correlator, Lookup, Versioned, WorkloadCtx},
    coverage::Coverage,
    credentials::{kernel_value, CredentialTable},
    enforce::Enforcer,
    events::{decode, Event},
    fanotify,
    finding::{Action, Credential, Finding, FindingKind, Workload},
    inventory::{spawn_watcher, InventoryConfig, InventoryUpdate},
    learn::Learner,
    loader::{find_cgroup2_root, SensorConfig, Sensors},
    observe::{self, Metrics, Readiness},
    policy::{spawn_reloader, spawn_resolver, DnsTable, IntentSet, PolicyWatch},
    sinks::SinkSet,
};

/// Wall-clock (realtime) ns minus boot-time ns, to date kernel events.
fn boot_to_wall_offset_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    let wall = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
    wall - boottime_ns() as i128
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(wall_ns: i128) -> String {
    let secs = wall_ns.div_euclid(1_000_000_000) as i64;
    let nanos = wall_ns.rem_euclid(1_000_000_000) as u32;
    chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

/// Resolves what events carry (cgroup ids, credential ids) for correlation.
/// Public so that benches/correlate.rs measures this very resolver.
pub struct Resolver<'a> {
    pub credentials: &'a CredentialTable,
    pub attribution: &'a mut Attributor,
    pub wall_offset_ns: i128,
}

fn workload_of(attribution: &mut Attributor, cgroup_id: u64) -> WorkloadCtx {
    match attribution.resolve(cgroup_id) {
        Some(info) => WorkloadCtx {
            workload: info.to_workload(),
            service_account: info.service_account.clone(),
            labels: info.labels.clone(),
        },
        None => WorkloadCtx {
            workload: Workload {
                cgroup_id,
                ..Default::default()
            },
            ..Default::default()
        },
    }
}

impl Lookup for Resolver<'_> {
    fn workload(&mut self, cgroup_id: u64) -> WorkloadCtx {
        workload_of(self.attribution, cgroup_id)
    }

    fn credential(&self, id: u32) -> Option<&Credential> {
        self.credentials.by_id(id).map(|w| &w.meta)
    }

    fn wall_time(&self, boot_ns: u64) -> String {
        rfc3339_ms(boot_ns as i128 + self.wall_offset_ns)
    }
}

/// Boot-time clock in ns: the clock the kernel stamps events with.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Give the heap pages freed since the last call back to the kernel. glibc
/// keeps what a burst freed mapped (the initial inventory of 10,000 pods,
/// a burst of cgroup or process events), so without this the RSS stays at
/// the high-water mark.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Cap glibc's malloc arenas at two (the main thread's, where events are
/// handled, and one for every other thread) before any thread starts. By
/// default each thread that ever met contention gets its own arena (up to
/// 8 per core), and each keeps its own free pages and fragments: RSS the
/// daemon's mostly idle helper threads (inventory, sinks, CRI, tokio
/// workers) do not need. Call first thing in `main`.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; called before threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Where the raw decoded events go with `--debug-events`.
fn open_output(spec: &str) -> Result<Box<dyn Write + Send>> {
    Ok(if spec == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec)
            .with_context(|| format!("opening {spec}"))?;
        Box::new(std::io::BufWriter::new(f))
    })
}

/// Everything the event loop needs, owned by one task.
struct Pipeline {
    metrics: Arc<Metrics>,
    debug_out: Option<Box<dyn Write + Send>>,
    credentials: CredentialTable,
    lost_seen: Vec<u64>,
    coverage: Coverage,
    batch: Batch,
    /// Credential opens from the fanotify sensor, merged into `batch` by time.
    opens: Vec<crate::events::CredentialAccess>,
    enrichment_seen: u64,
    correlator: Correlator,
    learner: Learner,
    declared: Arc<IntentSet>,
    /// New at every install of `declared`: the correlator caches intent
    /// selections per cgroup under it.
    declared_generation: u64,
    /// `metrics.events` per `EventKind as usize`, resolved at first use.
    events_by_kind: Vec<Option<prometheus::IntCounter>>,
    enforcer: Enforcer,
    attribution: Attributor,
    aggregator: Aggregator,
    sinks: SinkSet,
    wall_offset_ns: i128,
    kill_scope: KillScope,
    own_cgroup: Option<String>,
}

impl Pipeline {
    fn handle_record(&mut self, sensors: &mut Sensors, bytes: &[u8], now_ns: u64) {
        let event = match decode(bytes) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.decode_errors.inc();
                debug!(error = %e, "undecodable ring-buffer record");
                return;
            }
        };
        self.handle_event(sensors, event, now_ns);
    }

    /// One typed event, from the ring buffer or the fanotify sensor.
    fn handle_event(&mut self, sensors: &mut Sensors, event: Event, now_ns: u64) {
        let enrichment = self.attribution.enrichment_generation();
        if enrichment != self.enrichment_seen {
            // The API's pods changed (labels, deletions): no stale workload.
            self.enrichment_seen = enrichment;
            self.correlator.invalidate_workloads();
        }
        let kind = event.kind();
        if let Some(slot) = self.events_by_kind.get_mut(kind as usize) {
            let events = &self.metrics.events;
            slot.get_or_insert_with(|| events.with_label_values(&[kind.name()]))
                .inc();
        }
        let t = event.common().time_ns;
        if now_ns >= t {
            self.metrics
                .processing_latency
                .observe((now_ns - t) as f64 / 1e9);
        }
        if let Some(out) = self.debug_out.as_mut() {
            if let Err(e) = serde_json::to_writer(&mut *out, &event)
                .map_err(std::io::Error::from)
                .and_then(|_| out.write_all(b"\n"))
            {
                warn!(error = %e, "writing debug events failed; disabling the debug stream");
                self.debug_out = None;
            }
        }
        match &event {
            Event::CgroupMkdir(c) => {
                self.attribution.observe_mkdir(c.id, &c.path);
                if !self.declared.is_empty() {
                    let ctx = workload_of(&mut self.attribution, c.id);
                    self.enforcer.apply_cgroup(c.id, &ctx, &mut sensors.maps);
                }
            }
            Event::CgroupRmdir(c) => {
                self.attribution.observe_rmdir(c.id);
                self.enforcer.forget_cgroup(c.id, &mut sensors.maps);
            }
            _ => {}
        }
        let mut resolver = Resolver {
            credentials: &self.credentials,
            attribution: &mut self.attribution,
            wall_offset_ns: self.wall_offset_ns,
        };
        // Opens the kernel aggregated count too: every read is counted once.
        let reads = match &event {
            Event::CredentialAccess(a) => 1 + u64::from(a.repeats),
            Event::Exit(x) => u64::from(x.unreported_reads),
            _ => 0,
        };
        if reads > 0 {
            // Labelled by the reader's namespace (bounded); "" off-pod.
            let w = self
                .correlator
                .workload(event.common().cgroup_id, t, &mut resolver);
            let ns = w.workload.namespace.as_deref().unwrap_or("");
            self.metrics
                .credential_reads
                .with_label_values(&[ns])
                .inc_by(reads);
        }
        let declared = Versioned {
            judge: self.declared.as_ref(),
            generation: self.declared_generation,
        };
        let findings =
            self.correlator
                .on_event(&event, &mut resolver, &declared, Some(&mut self.learner));
        for mut f in findings {
            if let Event::CredentialAccess(a) = &event {
                if matches!(
                    f.kind,
                    FindingKind::UnexpectedReader | FindingKind::ForeignCredential
                ) {
                    // The report stands for the opens the kernel folded into it.
                    f.count = 1 + u64::from(a.repeats);
                }
            }
            if f.action == Action::Killed && self.kill_scope == KillScope::Container {
                self.kill_container(&mut f);
            }
            if let Some(f) = self.aggregator.offer(f, t) {
                self.emit(&f);
            }
        }
    }

    /// `kill_scope: container`: the kernel killed the process; end the rest
    /// of its container too. Never the root cgroup, nor our own.
    fn kill_container(&mut self, f: &mut Finding) {
        let Some(path) = f.workload.cgroup_path.clone() else {
            return;
        };
        let rel = path.trim_matches('/');
        if rel.is_empty()
            || self
                .own_cgroup
                .as_deref()
                .is_some_and(|own| own.trim_matches('/') == rel)
        {
            return;
        }
        let file = self.attribution.root().join(rel).join("cgroup.kill");
        match std::fs::write(&file, b"1") {
            Ok(()) => {
                info!(cgroup = %path, "container killed (cgroup.kill)");
                f.message.push_str("; container killed");
            }
            Err(e) => error!(file = %file.display(), error = %e, "cannot kill the container"),
        }
    }

    /// Every cgroup the attributor knows, with its workload.
    fn known_cgroups(&mut self) -> Vec<(u64, WorkloadCtx)> {
        let ids: Vec<u64> = crate::attribution::walk_cgroups(self.attribution.root())
            .into_keys()
            .collect();
        ids.into_iter()
            .map(|id| (id, workload_of(&mut self.attribution, id)))
            .collect()
    }

    fn install_intents(&mut self, sensors: &mut Sensors, set: Arc<IntentSet>) {
        let cgroups = self.known_cgroups();
        self.enforcer
            .apply_set(set.clone(), &mut sensors.maps, &cgroups);
        self.metrics.intents.set(set.len() as i64);
        self.declared = set;
        self.declared_generation = new_generation();
    }

    fn emit(&self, f: &Finding) {
        let action = f.action.as_str();
        let ns = f.workload.namespace.as_deref().unwrap_or("");
        self.metrics
            .findings
            .with_label_values(&[f.kind.as_str(), action, ns])
            .inc_by(f.count.max(1));
        self.sinks.emit(f);
    }

    fn flush_aggregates(&mut self, all: bool) {
        let now = boottime_ns();
        let due = if all {
            self.aggregator.flush_all()
        } else {
            self.aggregator.flush_due(now)
        };
        for f in due {
            self.emit(&f);
        }
    }

    fn flush(&mut self) {
        if let Some(out) = self.debug_out.as_mut() {
            let _ = out.flush();
        }
    }

    fn metrics_leases(&self, leases: &crate::lease::Leases) {
        let (held, waiting, refused) = leases.counts();
        for (state, n) in [("held", held), ("waiting", waiting), ("refused", refused)] {
            self.metrics
                .leases
                .with_label_values(&[state])
                .set(n as i64);
        }
    }

    /// Periodic: kernel-side loss counters and map sizes into metrics.
    fn refresh_stats(&mut self, sensors: &Sensors) {
        release_free_heap();
        let lost = sensors.maps.lost_by_kind();
        self.lost_seen.resize(EventKind::ALL.len(), 0);
        for (i, (kind, total)) in lost.into_iter().enumerate() {
            let prev = self.lost_seen[i];
            if total > prev {
                self.metrics
                    .events_lost
                    .with_label_values(&[kind.name()])
                    .inc_by(total - prev);
                warn!(
                    kind = kind.name(),
                    lost = total - prev,
                    "kernel events lost (ring buffer full)"
                );
            }
            self.lost_seen[i] = total;
        }
        self.report_coverage(sensors);
        self.metrics.credentials.set(self.credentials.len() as i64);
        // Holders per workload namespace ("" = host), from the kernel's map.
        let mut per_ns: std::collections::HashMap<String, i64> = Default::default();
        let mut holders = 0usize;
        // Through the correlator's cache of workloads: a full resolve of
        // every holder's cgroup every 2 s costs as much as the events.
        let now = boottime_ns();
        let mut resolver = Resolver {
            credentials: &self.credentials,
            attribution: &mut self.attribution,
            wall_offset_ns: self.wall_offset_ns,
        };
        for tgid in sensors.maps.holders.keys().filter_map(Result::ok) {
            holders += 1;
            let cgroup = self
                .correlator
                .processes
                .get(tgid)
                .map(|p| p.cgroup_id)
                .unwrap_or(0);
            let ns = if cgroup == 0 {
                String::new()
            } else {
                self.correlator
                    .workload(cgroup, now, &mut resolver)
                    .workload
                    .namespace
                    .clone()
                    .unwrap_or_default()
            };
            *per_ns.entry(ns).or_default() += 1;
        }
        self.metrics.workload_holders.reset();
        for (ns, n) in per_ns {
            self.metrics
                .workload_holders
                .with_label_values(&[&ns])
                .set(n);
        }
        self.metrics.holders.set(holders as i64);
        self.metrics
            .map_entries
            .with_label_values(&["holders"])
            .set(holders as i64);
        self.metrics
            .map_entries
            .with_label_values(&["credentials"])
            .set(self.credentials.len() as i64);
    }
}

impl Pipeline {
    /// A restart over pinned maps: continue where the previous daemon left.
    fn adopt(&mut self, sensors: &Sensors) {
        let mut credentials = 0;
        for (key, info) in sensors.maps.credentials.iter().filter_map(Result::ok) {
            self.credentials.adopt_pinned(key, info.id);
            credentials += 1;
        }
        self.enforcer.adopt(&sensors.maps);
        // Losses the previous daemon already reported are not news.
        let _ = self.coverage.poll(&sensors.maps.budget);
        self.lost_seen = sensors
            .maps
            .lost_by_kind()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        let holders = sensors.maps.holders.keys().count();
        info!(
            credentials,
            holders, "adopted pinned kernel state from the previous daemon"
        );
    }

    /// Workloads whose events the kernel dropped (budget, full ring): a
    /// `coverage_degraded` finding each, and the counts in the metrics.
    fn report_coverage(&mut self, sensors: &Sensors) {
        let now = boottime_ns();
        for loss in self.coverage.poll(&sensors.maps.budget) {
            let w = workload_of(&mut self.attribution, loss.cgroup_id);
            let ns = w.workload.namespace.clone().unwrap_or_default();
            self.metrics
                .events_dropped
                .with_label_values(&[&ns])
                .inc_by(loss.dropped);
            warn!(
                cgroup_id = loss.cgroup_id,
                cgroup = w.workload.cgroup_path.as_deref().unwrap_or("?"),
                dropped = loss.dropped,
                security_relevant = loss.dropped_urgent,
                "kernel events of a workload dropped: coverage degraded"
            );
            let f = crate::coverage::finding(
                &loss,
                w.workload,
                rfc3339_ms(now as i128 + self.wall_offset_ns),
            );
            if let Some(f) = self.aggregator.offer(f, now) {
                self.emit(&f);
            }
        }
    }

    /// Keep the kernel's credential map equal to the inventory.
    fn apply_inventory(&mut self, sensors: &mut Sensors, update: InventoryUpdate) -> bool {
        match update {
            InventoryUpdate::Upsert(f) => {
                let key = CredentialKey {
                    dev: kernel_dev_from_user(f.dev),
                    ino: f.ino,
                };
                let (w, new) = self.credentials.upsert(key, f.to_finding());
                if new {
                    if let Err(e) = sensors.maps.credentials.insert(key, kernel_value(w), 0) {
                        error!(path = %f.path.display(), error = %e, "cannot add credential to the kernel map");
                    }
                    info!(path = %f.path.display(), kind = f.kind.as_str(), pod = f.owner_pod_uid.as_deref().unwrap_or("-"), id = w.id, "watching credential");
                }
                false
            }
            InventoryUpdate::Remove(f) => {
                let key = CredentialKey {
                    dev: kernel_dev_from_user(f.dev),
                    ino: f.ino,
                };
                if let Some(w) = self.credentials.remove(&key) {
                    let _ = sensors.maps.credentials.remove(&key);
                    info!(path = %f.path.display(), id = w.id, "credential gone; no longer watched");
                }
                false
            }
            InventoryUpdate::Synced => {
                // Credentials a previous daemon watched that are gone now.
                for key in self.credentials.take_unclaimed() {
                    let _ = sensors.maps.credentials.remove(&key);
                }
                self.metrics.credentials.set(self.credentials.len() as i64);
                release_free_heap();
                true
            }
        }
    }
}

/// The longest a restart over pinned maps holds the kernel's events back
/// while its inventory loads (10,000 credentials load in about a second).
const ADOPTED_RING_HOLD: Duration = Duration::from_secs(10);

pub async fn run(settings: RunSettings) -> Result<()> {
    let metrics = Metrics::new()?;
    let readiness = Arc::new(Readiness::default());
    let bound = observe::serve(settings.metrics_addr, metrics.clone(), readiness.clone()).await?;
    info!(addr = %bound, "serving /metrics, /healthz, /readyz");

    let cgroup_root = match &settings.cgroup_root {
        Some(p) => p.clone(),
        None => find_cgroup2_root()?,
    };
    let offsets = Btf::from_sys_fs()
        .and_then(|b| b.kernel_offsets())
        .context("reading kernel struct offsets from /sys/kernel/btf/vmlinux (the kernel needs CONFIG_DEBUG_INFO_BTF)")?;
    debug!(?offsets, "kernel offsets");
    let lease_unavailable = crate::lease::unavailable(offsets.lease_file);
    if settings.open_sensor.leases() {
        if let Some(why) = &lease_unavailable {
            anyhow::bail!(
                "--open-sensor {:?} is not available on this node: {why}",
                settings.open_sensor
            );
        }
    }
    let fanotify_group = fanotify::select(settings.open_sensor)?;
    // `auto`: hybrid when both halves are there, else fanotify alone (else,
    // with no fanotify group, the tracepoints).
    let auto_hybrid =
        settings.open_sensor == crate::cli::OpenSensor::Auto && fanotify_group.is_some();
    if let (true, Some(why)) = (auto_hybrid, &lease_unavailable) {
        warn!(reason = %why, "no read leases: every credential open waits for the daemon (fanotify alone)");
    }
    let lease_sensor =
        settings.open_sensor.leases() || (auto_hybrid && lease_unavailable.is_none());
    // A broken lease is signalled with SIGIO, whose default action ends the
    // process: take it before the first lease.
    let mut sigio = if lease_sensor {
        Some(signal(SignalKind::io()).context("taking SIGIO for the lease sensor")?)
    } else {
        None
    };
    let (mut sensors, rings) = Sensors::load(
        offsets,
        &SensorConfig {
            cgroup_root: cgroup_root.clone(),
            enforce: settings.mode == Mode::Enforce,
            connect_dedup_ns: settings.connect_dedup_ms.saturating_mul(1_000_000),
            cred_dedup_ns: settings.credential_dedup_ms.saturating_mul(1_000_000),
            cgroup_event_budget: settings.cgroup_event_budget,
            cgroup_alert_budget: settings.cgroup_alert_budget,
            pin_dir: settings.pin_dir.clone(),
            open_tracepoints: fanotify_group.is_none() && !lease_sensor,
            lease_tracepoint: lease_sensor,
            deny_rules: !settings.deny_cgroup.is_empty(),
        },
    )?;
    let mut open_sensor = start_open_sensor(
        fanotify_group,
        lease_sensor,
        &mut sensors,
        &cgroup_root,
        settings.credential_dedup_ms,
        &metrics,
    )?;
    // Hybrid: the fanotify group stops asking about an inode once it is leased.
    let mut leases = match open_sensor.as_ref().filter(|_| lease_sensor) {
        Some(s) => crate::lease::Leases::with_fanotify(s.inode_marks()),
        None => crate::lease::Leases::default(),
    };
    metrics.probes_attached.set(sensors.attached.len() as i64);
    info!(programs = sensors.attached.len(), cgroup_root = %cgroup_root.display(), mode = ?settings.mode, "kernel programs attached");

    if !settings.kubelet_dir.exists() {
        info!(dir = %settings.kubelet_dir.display(), "no kubelet directory: not a Kubernetes node, or not mounted; watching only explicit credential files");
    }
    let mut inventory = spawn_watcher(InventoryConfig {
        kubelet_dir: settings.kubelet_dir.clone(),
        extra_files: settings.credential_file.clone(),
        rotation_grace: settings.rotation_grace,
        ..Default::default()
    });

    if sensors.adopted {
        // Manual deny rules come from this start's flags only.
        let old: Vec<u64> = sensors
            .maps
            .deny_cgroup
            .keys()
            .filter_map(Result::ok)
            .collect();
        for id in old {
            let _ = sensors.maps.deny_cgroup.remove(&id);
        }
    }
    for dir in &settings.deny_cgroup {
        match std::fs::metadata(dir) {
            Ok(md) if md.is_dir() => {
                let rule = DenyRule {
                    action: PolicyAction::Block as u32,
                    _pad: 0,
                };
                sensors
                    .maps
                    .deny_cgroup
                    .insert(md.ino(), rule, 0)
                    .context("writing deny map")?;
                info!(cgroup = %dir.display(), id = md.ino(), "denying all egress of cgroup");
            }
            Ok(_) => error!(cgroup = %dir.display(), "--deny-cgroup is not a directory"),
            Err(e) => error!(cgroup = %dir.display(), error = %e, "--deny-cgroup cannot be read"),
        }
    }
    readiness.probes.store(true, Ordering::Release);

    let debug_out = match &settings.debug_events {
        Some(spec) => Some(open_output(spec)?),
        None => None,
    };
    let sinks =
        SinkSet::new(&settings.sinks, &metrics.registry).context("starting the finding sinks")?;
    let mut correlator = Correlator::new(
        settings.trusted_host_readers.clone(),
        settings.mode == Mode::Observe,
    );
    correlator.processes.seed_from_proc();
    let mut pipeline = Pipeline {
        metrics: metrics.clone(),
        debug_out,
        credentials: CredentialTable::default(),
        lost_seen: Vec::new(),
        coverage: Coverage::default(),
        batch: Batch::default(),
        opens: Vec::new(),
        enrichment_seen: 0,
        correlator,
        learner: Learner::new(settings.learn_window.as_nanos() as u64),
        declared: Arc::new(IntentSet::new(Vec::new())),
        declared_generation: new_generation(),
        events_by_kind: vec![None; detector_common::EVENT_KINDS as usize],
        enforcer: Enforcer::default(),
        attribution: Attributor::new(&cgroup_root)
            .with_cri(CriHandle::spawn(settings.cri_socket.clone()))
            .with_kube_api(KubeApiHandle::spawn(&settings.kube_api, &metrics.registry)),
        aggregator: Aggregator::new(settings.aggregate_window.as_nanos() as u64),
        sinks,
        wall_offset_ns: boot_to_wall_offset_ns(),
        kill_scope: settings.kill_scope,
        own_cgroup: own_cgroup_path(),
    };

    if sensors.adopted {
        pipeline.adopt(&sensors);
    }

    // Intents: loaded now, then hot-reloaded; host destinations re-resolved.
    let mut policy: Option<PolicyWatch> = None;
    let mut dns_changes = None;
    if settings.policy.is_empty() {
        info!("no intents given: learning each workload's readers and destinations (embedded default)");
        if sensors.adopted {
            // Drop what a previous daemon enforced from intents we no longer have.
            pipeline.install_intents(&mut sensors, Arc::new(IntentSet::new(Vec::new())));
        }
        metrics.policy_reload_success.set(1);
        readiness.intents.store(true, Ordering::Release);
    } else {
        let dns = DnsTable::new();
        let watch = spawn_reloader(settings.policy.clone(), dns.clone(), Duration::from_secs(2));
        spawn_resolver(dns.clone(), Duration::from_secs(30));
        dns_changes = Some(dns.subscribe());
        let status = watch.status();
        metrics.policy_reload_success.set(status.ok as i64);
        pipeline.install_intents(&mut sensors, watch.current());
        if status.ok {
            readiness.intents.store(true, Ordering::Release);
        } else {
            error!(errors = status.error_count, "intents rejected at start-up: not ready until a valid set loads (see errors above)");
        }
        policy = Some(watch);
    }
    let mut reevaluate = tokio::time::interval(Duration::from_secs(10));
    let stop_at = settings.stop_after.map(|d| tokio::time::Instant::now() + d);

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // SAFETY: each AsyncFd owns its ring buffer and with it the fd, so the fd
    // stays open for as long as it is registered.
    let mut alerts =
        unsafe { AsyncFd::register(rings.alerts) }.context("polling the alerts ring buffer")?;
    let mut ring =
        unsafe { AsyncFd::register(rings.events) }.context("polling the events ring buffer")?;
    // Bulk events do not wake us (see submit_flags in the kernel): poll too.
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stats = tokio::time::interval(Duration::from_secs(2));
    // Over adopted maps the kernel already knows the credentials, and the
    // rings hold what happened while no daemon ran. Judged before the
    // inventory names those credentials, such a read would lack its owner
    // pod and path: hold the rings until the inventory's first sync
    // (bounded, so a slow inventory cannot blind us).
    let mut holding_rings = sensors.adopted;
    let hold_deadline = tokio::time::Instant::now() + ADOPTED_RING_HOLD;
    loop {
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(hold_deadline), if holding_rings => {
                warn!(waited = ?ADOPTED_RING_HOLD, "inventory not loaded yet: reading the kernel's held events without it");
                holding_rings = false;
            }
            guard = alerts.readable_mut(), if !holding_rings => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), ring.get_mut(), open_sensor.as_mut(), &mut pipeline, &mut sensors, false);
                guard.clear_ready();
            }
            guard = ring.readable_mut(), if !holding_rings => {
                let mut guard = guard?;
                drain(alerts.get_mut(), guard.get_inner_mut(), open_sensor.as_mut(), &mut pipeline, &mut sensors, false);
                guard.clear_ready();
            }
            _ = poll.tick(), if !holding_rings => {
                drain(alerts.get_mut(), ring.get_mut(), open_sensor.as_mut(), &mut pipeline, &mut sensors, false);
            }
            Some(update) = inventory.recv() => {
                let for_fanotify = open_sensor.as_ref().map(|_| update.clone());
                if let Some(s) = open_sensor.as_mut() {
                    s.drain_discovered(&mut pipeline.credentials, &mut sensors.maps.credentials);
                }
                let lease_update = lease_sensor.then(|| update.clone());
                let synced = pipeline.apply_inventory(&mut sensors, update);
                if let (Some(s), Some(u)) = (open_sensor.as_mut(), for_fanotify) {
                    s.apply_inventory(&u, &mut pipeline.credentials, &mut sensors.maps.credentials);
                }
                // After the kernel's credential map has the file: a lease
                // taken before would let the kernel program see opens it
                // cannot name yet (and, hybrid, take them from fanotify).
                match &lease_update {
                    Some(InventoryUpdate::Upsert(f)) => leases.add(f.key(), &f.path),
                    Some(InventoryUpdate::Remove(f)) => leases.remove(f.key()),
                    _ => {}
                }
                if synced {
                    holding_rings = false;
                }
                if synced && !readiness.inventory.swap(true, Ordering::AcqRel) {
                    info!(credentials = pipeline.credentials.len(), "inventory loaded; ready");
                }
            }
            Some(()) = recv_opt(sigio.as_mut()) => {
                leases.release_broken();
                pipeline.metrics_leases(&leases);
                if let Some(s) = &open_sensor {
                    s.set_mark_gauge();
                }
            }
            _ = stats.tick() => {
                if lease_sensor {
                    leases.retry();
                    pipeline.metrics_leases(&leases);
                    if let Some(s) = &open_sensor {
                        s.set_mark_gauge();
                    }
                }
                if let Some(p) = &policy {
                    // A rejected reload changes only the status, not the set.
                    metrics.policy_reload_success.set(p.status().ok as i64);
                }
                pipeline.refresh_stats(&sensors);
                pipeline.flush_aggregates(false);
                if open_sensor.as_mut().is_some_and(|s| !s.check_alive()) {
                    // Credential opens are no longer seen: not ready.
                    readiness.probes.store(false, Ordering::Release);
                }
            }
            Some(()) = changed(policy.as_mut().map(|p| &mut p.intents)) => {
                let w = policy.as_ref().expect("policy watch");
                let status = w.status();
                metrics.policy_reload_success.set(status.ok as i64);
                pipeline.install_intents(&mut sensors, w.current());
                readiness.intents.store(true, Ordering::Release);
            }
            Some(()) = changed(dns_changes.as_mut()) => {
                let set = pipeline.declared.clone();
                pipeline.install_intents(&mut sensors, set);
            }
            _ = reevaluate.tick(), if !pipeline.declared.is_empty() => {
                // Names and labels from the runtime may arrive after a cgroup.
                let set = pipeline.declared.clone();
                pipeline.install_intents(&mut sensors, set);
            }
            _ = sleep_until_opt(stop_at) => { info!("time is up: detaching"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
        }
    }
    drain(
        alerts.get_mut(),
        ring.get_mut(),
        open_sensor.as_mut(),
        &mut pipeline,
        &mut sensors,
        true,
    );
    readiness.probes.store(false, Ordering::Release);
    // Stop answering before the maps go: closing the group lets waiting
    // openers through.
    drop(open_sensor.take());
    drop(alerts);
    drop(ring);
    let pinned = sensors.adopted || settings.pin_dir.is_some();
    drop(sensors);
    if pinned {
        info!("kernel programs stay attached (pinned): enforcement continues until the next start or `detector unpin`");
    } else {
        info!("all kernel programs detached");
    }
    pipeline.flush_aggregates(true);
    if let Some(path) = &settings.learn_output {
        write_learned(&pipeline.learner, path);
    }
    let Pipeline { sinks, .. } = pipeline;
    sinks.shutdown(Duration::from_secs(5)).await;
    info!("bye");
    Ok(())
}

fn write_learned(learner: &Learner, path: &Path) {
    match std::fs::write(path, learner.to_yaml()) {
        Ok(()) => {
            info!(path = %path.display(), workloads = learner.len(), "learned intents written")
        }
        Err(e) => error!(path = %path.display(), error = %e, "cannot write learned intents"),
    }
}

/// Our own cgroup-v2 path (`0::/…` in /proc/self/cgroup).
fn own_cgroup_path() -> Option<String> {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

async fn recv_opt(s: Option<&mut tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The fanotify credential-open sensor, when `group` is given: it answers
/// on its own thread and writes holders into the kernel's HOLDERS map.
fn start_open_sensor(
    group: Option<fanotify::Group>,
    lease_sensor: bool,
    sensors: &mut Sensors,
    cgroup_root: &Path,
    credential_dedup_ms: u64,
    metrics: &Metrics,
) -> Result<Option<fanotify::FanotifySensor>> {
    let Some(group) = group else {
        if lease_sensor {
            info!("credential opens: read leases on the credential files (filelock:leases_conflict; no syscall tracepoint attached)");
        } else {
            info!("credential opens: open-family syscall tracepoints");
        }
        return Ok(None);
    };
    let lost = metrics
        .events_lost
        .with_label_values(&[EventKind::CredentialAccess.name()]);
    let counts_attached = sensors
        .attached
        .iter()
        .any(|a| a == "tp_btf/generic_add_lease");
    let s = fanotify::FanotifySensor::start(
        group,
        &sensors.maps.holders,
        &sensors.maps.cred_seen,
        counts_attached.then_some(&sensors.maps.open_counts),
        fanotify::Config {
            dedup: Duration::from_millis(credential_dedup_ms),
            hybrid: lease_sensor,
            ..fanotify::Config::new(cgroup_root)
        },
        &metrics.registry,
        lost,
    )?;
    sensors.attached.push("fanotify/FAN_OPEN_PERM".into());
    metrics.probes_attached.set(sensors.attached.len() as i64);
    if lease_sensor {
        info!("credential opens: read leases where held (filelock:leases_conflict), fanotify permission events elsewhere (no syscall tracepoint attached)");
    } else {
        info!("credential opens: fanotify permission events (no syscall tracepoint attached)");
    }
    Ok(Some(s))
}

/// The fanotify sensor's credential accesses, like `drain` for the ring.
/// Resolves when the watched value changes; never, without a watch.
async fn changed<T>(rx: Option<&mut tokio::sync::watch::Receiver<T>>) -> Option<()> {
    match rx {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// Takes what both rings hold and handles it in kernel time order: a
/// credential read (alerts ring) must be judged after the exec that started
/// its reader (events ring), whichever ring was read first.
fn drain(
    alerts: &mut aya::maps::RingBuf<aya::maps::MapData>,
    events: &mut aya::maps::RingBuf<aya::maps::MapData>,
    open_sensor: Option<&mut fanotify::FanotifySensor>,
    pipeline: &mut Pipeline,
    sensors: &mut Sensors,
    last: bool,
) {
    let now = boottime_ns();
    // The rings first, up to `cut`; then the fanotify opens. The responder
    // queues an open before it lets the opener go, so anything the opener
    // did afterwards (exec, connect) and found in the rings here has its
    // open in the queue too. An open later than `cut` waits for the next
    // drain: what its process did just before it may not be in the rings
    // yet. (The last drain takes everything.)
    let cut = if last { u64::MAX } else { now };
    let mut batch = std::mem::take(&mut pipeline.batch);
    batch.clear();
    for ring in [alerts, events] {
        let mut n = 0;
        while let Some(item) = ring.next() {
            batch.push(&item);
            n += 1;
            if n >= 65536 {
                break; // let the other branches run; the poll tick resumes
            }
        }
    }
    // Opens held back by the previous drain stay, in order, in front.
    let mut opens = std::mem::take(&mut pipeline.opens);
    if let Some(s) = open_sensor {
        s.drain_discovered(&mut pipeline.credentials, &mut sensors.maps.credentials);
        while let Some(a) = s.next_access(&mut pipeline.credentials, &mut sensors.maps.credentials)
        {
            opens.push(a);
            if opens.len() >= 65536 {
                break; // the next tick resumes
            }
        }
    }
    if batch.is_empty() && opens.first().is_none_or(|a| a.common.time_ns > cut) {
        pipeline.batch = batch;
        pipeline.opens = opens;
        return;
    }
    batch.sort_by_time();
    opens.sort_by_key(|a| a.common.time_ns);
    let due = opens.partition_point(|a| a.common.time_ns <= cut);
    let mut pending = opens.drain(..due).peekable();
    for (t, record) in batch.records() {
        while let Some(a) = pending.next_if(|a| a.common.time_ns <= t) {
            pipeline.handle_event(sensors, Event::CredentialAccess(a), now);
        }
        pipeline.handle_record(sensors, record, now);
    }
    for a in pending {
        pipeline.handle_event(sensors, Event::CredentialAccess(a), now);
    }
    pipeline.flush();
    pipeline.batch = batch;
    pipeline.opens = opens;
}

/// Records copied out of the rings (one buffer, reused), ordered by time.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// (kernel time, start, len) into `bytes`.
    index: Vec<(u64, usize, usize)>,
}

impl Batch {
    fn clear(&mut self) {
        self.bytes.clear();
        self.index.clear();
    }

    fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn push(&mut self, record: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(record);
        self.index
            .push((crate::events::record_time(record), start, record.len()));
    }

    /// Stable: records of one ring with equal times keep their order.
    fn sort_by_time(&mut self) {
        self.index.sort_by_key(|&(t, _, _)| t);
    }

    fn records(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.index
            .iter()
            .map(|&(t, start, len)| (t, &self.bytes[start..start + len]))
    }
}
