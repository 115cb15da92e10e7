//! `host` destinations: resolved with the system resolver (getaddrinfo via
//! tokio, so `/etc/hosts`, `resolv.conf` search domains and Kubernetes
//! Service names such as `vault.vault.svc.cluster.local` work as they do for
//! any process on the node; the DaemonSet needs `dnsPolicy:
//! ClusterFirstWithHostNet` for cluster names).
//!
//! getaddrinfo does not report TTLs, so answers are refreshed on a fixed
//! interval ([`DEFAULT_REFRESH`], set by the caller of [`spawn_resolver`]),
//! and at once when a newly loaded intent names a host not seen before. A
//! name that fails to resolve keeps its last good answer (logged once per
//! failure streak); a name never resolved matches no address.
//!
//! Intents hold `Arc<HostEntry>`s shared through one [`DnsTable`]: a reload
//! that keeps a name keeps its answer; names no intent uses any more drop
//! out of the table at the next refresh. [`DnsTable::set`] can seed an
//! answer before the intents that use it are loaded.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use tokio::sync::{watch, Notify};

pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct HostState {
    last_ok: Option<SystemTime>,
    last_error: Option<String>,
}

/// One DNS name and its latest good answer.
#[derive(Debug)]
pub struct HostEntry {
    name: String,
    addrs: RwLock<Arc<Vec<IpAddr>>>,
    state: Mutex<HostState>,
}

impl HostEntry {
    fn new(name: &str) -> Self {
        HostEntry {
            name: name.to_string(),
            addrs: RwLock::new(Arc::new(Vec::new())),
            state: Mutex::default(),
        }
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The latest good answer (sorted, unique; empty if never resolved).
    pub fn addrs(&self) -> Arc<Vec<IpAddr>> {
        self.addrs
            .read()
            .map(|a| Arc::clone(&a))
            .unwrap_or_default()
    }
    /// When it last resolved, and the error of the current failure streak.
    pub fn status(&self) -> (Option<SystemTime>, Option<String>) {
        self.state
            .lock()
            .map(|s| (s.last_ok, s.last_error.clone()))
            .unwrap_or((None, None))
    }
    /// Store an answer; true if the addresses changed.
    fn store(&self, mut addrs: Vec<IpAddr>) -> bool {
        for a in &mut addrs {
            *a = a.to_canonical();
        }
        addrs.sort();
        addrs.dedup();
        let Ok(mut cur) = self.addrs.write() else {
            return false;
        };
        if **cur == addrs {
            return false;
        }
        *cur = Arc::new(addrs);
        true
    }
}

/// All DNS names the loaded intents use.
#[derive(Debug)]
pub struct DnsTable {
    /// Entries in use by some loaded intent (or set by hand and not yet
    /// pruned); pruned when only the table holds them.
    hosts: Mutex<BTreeMap<String, Arc<HostEntry>>>,
    generation: watch::Sender<u64>,
    added: Notify,
}

impl Default for DnsTable {
    fn default() -> Self {
        DnsTable {
            hosts: Mutex::default(),
            generation: watch::Sender::new(0),
            added: Notify::new(),
        }
    }
}

impl DnsTable {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The shared entry for `name` (created empty, and the resolver woken, if
    /// no live intent uses it yet).
    pub fn entry(&self, name: &str) -> Arc<HostEntry> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = hosts.get(name) {
            return Arc::clone(e);
        }
        let e = Arc::new(HostEntry::new(name));
        hosts.insert(name.to_string(), Arc::clone(&e));
        drop(hosts);
        self.added.notify_one();
        e
    }

    /// Set an answer by hand (tests, or seeding before the first refresh).
    pub fn set(&self, name: &str, addrs: Vec<IpAddr>) {
        let e = self.entry(name);
        if e.store(addrs) {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Live entries (those some loaded intent still uses); entries nobody
    /// else holds are dropped here.
    pub fn hosts(&self) -> Vec<Arc<HostEntry>> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.retain(|_, e| Arc::strong_count(e) > 1);
        hosts.values().cloned().collect()
    }

    /// Names that currently match no address (never resolved).
    pub fn unresolved(&self) -> Vec<String> {
        self.hosts()
            .iter()
            .filter(|h| h.addrs().is_empty())
            .map(|h| h.name.clone())
            .collect()
    }

    /// Bumped whenever any name's addresses change: recompile the kernel
    /// allow-lists then.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Resolve every live name with the system resolver; returns how many
    /// changed.
    pub async fn refresh(&self) -> usize {
        self.refresh_with(system_resolve).await
    }

    /// Resolve every live name with `resolve`. A failure (or an empty
    /// answer) keeps the last good answer.
    pub async fn refresh_with<F, Fut>(&self, resolve: F) -> usize
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = io::Result<Vec<IpAddr>>>,
    {
        let mut changed = 0;
        for h in self.hosts() {
            let result = match resolve(h.name.clone()).await {
                Ok(a) if a.is_empty() => Err(io::Error::other("no addresses")),
                r => r,
            };
            match result {
                Ok(addrs) => {
                    let mut st = h.state.lock().unwrap_or_else(|e| e.into_inner());
                    if st.last_error.take().is_some() {
                        tracing::info!(host = %h.name, "resolves again");
                    }
                    st.last_ok = Some(SystemTime::now());
                    drop(st);
                    if h.store(addrs) {
                        tracing::debug!(host = %h.name, addrs = ?h.addrs(), "new answer");
                        changed += 1;
                    }
                }
                Err(e) => {
                    let mut st = h.state.lock().unwrap_or_else(|e| e.into_inner());
                    if st.last_error.is_none() {
                        tracing::warn!(host = %h.name, error = %e, kept = ?h.addrs(), "cannot resolve destination host; keeping its last answer");
                    }
                    st.last_error = Some(e.to_string());
                }
            }
        }
        if changed > 0 {
            self.generation.send_modify(|g| *g += 1);
        }
        changed
    }
}

/// getaddrinfo through tokio, with a timeout.
pub async fn system_resolve(name: String) -> io::Result<Vec<IpAddr>> {
    let lookup = tokio::net::lookup_host((name.as_str(), 0u16));
    match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(it)) => Ok(it.map(|sa| sa.ip()).collect()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "lookup timed out")),
    }
}

/// Keep every name of `dns` resolved: now, every `every`, and as soon as a
/// new name appears. Needs a tokio runtime.
pub fn spawn_resolver(dns: Arc<DnsTable>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            dns.refresh().await;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = dns.added.notified() => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn failure_keeps_last_answer_and_dead_names_drop_out() {
        let dns = DnsTable::new();
        let e = dns.entry("vault.vault.svc.cluster.local");
        let gen = dns.subscribe();
        let n = dns
            .refresh_with(|_| async {
                Ok(vec![ip("10.0.0.9"), ip("::ffff:10.0.0.8"), ip("10.0.0.9")])
            })
            .await;
        assert_eq!(n, 1);
        assert_eq!(*e.addrs(), vec![ip("10.0.0.8"), ip("10.0.0.9")]);
        assert_eq!(*gen.borrow(), 1);
        // Same answer: no change, no new generation.
        assert_eq!(
            dns.refresh_with(|_| async { Ok(vec![ip("10.0.0.9"), ip("10.0.0.8")]) })
                .await,
            0
        );
        // Failing and empty answers keep the last good one.
        assert_eq!(
            dns.refresh_with(|_| async { Err(io::Error::other("SERVFAIL")) })
                .await,
            0
        );
        assert_eq!(e.addrs().len(), 2);
        assert_eq!(e.status().1.as_deref(), Some("SERVFAIL"));
        assert_eq!(dns.refresh_with(|_| async { Ok(vec![]) }).await, 0);
        assert_eq!(e.addrs().len(), 2);
        assert_eq!(
            dns.refresh_with(|_| async { Ok(vec![ip("10.0.0.7")]) })
                .await,
            1
        );
        assert_eq!(*e.addrs(), vec![ip("10.0.0.7")]);
        assert!(e.status().1.is_none());
        // The same name shares its entry while someone holds it.
        assert!(Arc::ptr_eq(&e, &dns.entry("vault.vault.svc.cluster.local")));
        drop(e);
        assert!(dns.hosts().is_empty(), "no intent uses it any more");
    }

    #[tokio::test]
    async fn system_resolver_reads_localhost_without_network() {
        let dns = DnsTable::new();
        let e = dns.entry("localhost");
        assert!(dns.unresolved().contains(&"localhost".to_string()));
        dns.refresh().await;
        assert!(e.addrs().iter().any(|a| a.is_loopback()), "{:?}", e.addrs());
        assert!(dns.unresolved().is_empty());
    }

    #[tokio::test]
    async fn resolver_task_resolves_new_names_promptly() {
        let dns = DnsTable::new();
        let task = spawn_resolver(Arc::clone(&dns), Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = dns.entry("localhost");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while e.addrs().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        assert!(
            !e.addrs().is_empty(),
            "a new name is resolved without waiting for the interval"
        );
    }
}
