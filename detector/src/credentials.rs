//! The credentials the kernel watches: stable ids for file identities, their
//! descriptions, and the sync of both into the kernel's `CREDENTIALS` map.

use std::collections::{HashMap, HashSet};

use detector_common::{CredentialInfo, CredentialKey};

use crate::finding::Credential;

/// A credential file as the kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub id: u32,
    pub key: CredentialKey,
    pub meta: Credential,
}

/// id <-> identity <-> description of every watched credential.
#[derive(Default)]
pub struct CredentialTable {
    by_key: HashMap<CredentialKey, Watched>,
    by_id: HashMap<u32, CredentialKey>,
    next_id: u32,
    /// Ids a previous daemon gave (pinned kernel map, after a restart): kept
    /// for the same files, because holders in the kernel refer to them.
    adopted: HashMap<CredentialKey, u32>,
    reserved: HashSet<u32>,
}

impl CredentialTable {
    /// Adds (or refreshes the description of) a credential; returns its entry
    /// and whether it is new (so the caller writes it to the kernel map).
    pub fn upsert(&mut self, key: CredentialKey, meta: Credential) -> (&Watched, bool) {
        let mut new = false;
        if !self.by_key.contains_key(&key) {
            let id = match self.adopted.remove(&key) {
                Some(id) => {
                    self.reserved.remove(&id);
                    id
                }
                None => {
                    self.next_id = self.next_id.wrapping_add(1).max(1);
                    while self.by_id.contains_key(&self.next_id)
                        || self.reserved.contains(&self.next_id)
                    {
                        self.next_id = self.next_id.wrapping_add(1).max(1);
                    }
                    self.next_id
                }
            };
            self.by_id.insert(id, key);
            self.by_key.insert(
                key,
                Watched {
                    id,
                    key,
                    meta: meta.clone(),
                },
            );
            new = true;
        }
        let w = self.by_key.get_mut(&key).expect("just inserted");
        w.meta = meta;
        (w, new)
    }

    /// A credential a previous daemon watched under `id`: the same file
    /// gets the same id again when the inventory reports it.
    pub fn adopt_pinned(&mut self, key: CredentialKey, id: u32) {
        if id != 0 {
            self.adopted.insert(key, id);
            self.reserved.insert(id);
        }
    }

    /// Adopted credentials the inventory did not report (gone while we were
    /// down): the caller removes them from the kernel map.
    pub fn take_unclaimed(&mut self) -> Vec<CredentialKey> {
        self.reserved.clear();
        self.adopted.drain().map(|(k, _)| k).collect()
    }

    /// Takes a credential found outside the inventory (the fanotify sensor
    /// names a rotated token's new inode before the inventory has seen it)
    /// with the id that sensor already gave it. If the key is known under
    /// another id, `id` becomes an alias of it. Returns whether it is new.
    pub fn adopt(&mut self, key: CredentialKey, id: u32, meta: Credential) -> bool {
        if self.by_key.contains_key(&key) {
            self.by_id.entry(id).or_insert(key);
            return false;
        }
        if self.by_id.contains_key(&id) {
            return false; // id space clash; cannot happen with disjoint ranges
        }
        self.by_id.insert(id, key);
        self.by_key.insert(key, Watched { id, key, meta });
        true
    }

    pub fn remove(&mut self, key: &CredentialKey) -> Option<Watched> {
        let w = self.by_key.remove(key)?;
        self.by_id.remove(&w.id);
        Some(w)
    }

    pub fn get(&self, key: &CredentialKey) -> Option<&Watched> {
        self.by_key.get(key)
    }

    pub fn by_id(&self, id: u32) -> Option<&Watched> {
        self.by_id.get(&id).and_then(|k| self.by_key.get(k))
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Watched> {
        self.by_key.values()
    }
}

/// The value the kernel map stores for a watched credential.
pub fn kernel_value(w: &Watched) -> CredentialInfo {
    CredentialInfo { id: w.id, flags: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopted_ids_are_kept_and_never_reused() {
        let key = |ino| CredentialKey { dev: 1, ino };
        let mut t = CredentialTable::default();
        t.adopt_pinned(key(10), 1);
        t.adopt_pinned(key(11), 2);
        let (w, new) = t.upsert(key(11), meta("/b"));
        assert_eq!((w.id, new), (2, true), "same file, same id");
        let (w, _) = t.upsert(key(12), meta("/c"));
        assert_eq!(w.id, 3, "a fresh id avoids the adopted ones");
        assert_eq!(t.take_unclaimed(), vec![key(10)]);
        assert!(t.by_id(1).is_none(), "an unclaimed id names nothing");
    }

    fn meta(path: &str) -> Credential {
        Credential {
            kind: "custom".into(),
            path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn ids_are_stable_and_unique() {
        let mut t = CredentialTable::default();
        let a = CredentialKey { dev: 1, ino: 10 };
        let b = CredentialKey { dev: 1, ino: 11 };
        let (wa, new_a) = t.upsert(a, meta("/a"));
        let ida = wa.id;
        assert!(new_a);
        let (wb, _) = t.upsert(b, meta("/b"));
        let idb = wb.id;
        assert_ne!(ida, idb);
        let (wa2, new2) = t.upsert(a, meta("/a2"));
        assert_eq!((wa2.id, new2, wa2.meta.path.as_str()), (ida, false, "/a2"));
        assert_eq!(t.by_id(idb).unwrap().key, b);
        t.remove(&a);
        assert!(t.by_id(ida).is_none());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn adopted_ids_and_aliases() {
        let mut t = CredentialTable::default();
        let a = CredentialKey { dev: 1, ino: 10 };
        let b = CredentialKey { dev: 1, ino: 11 };
        assert!(t.adopt(a, 0x8000_0001, meta("/a")));
        assert_eq!(t.get(&a).unwrap().id, 0x8000_0001);
        // The inventory confirms it later: same id, fresh description.
        let (w, new) = t.upsert(a, meta("/a-real"));
        assert_eq!((w.id, new), (0x8000_0001, false));
        // Known first by the inventory: the sensor's id becomes an alias.
        let (wb, _) = t.upsert(b, meta("/b"));
        let idb = wb.id;
        assert!(!t.adopt(b, 0x8000_0002, meta("/b")));
        assert_eq!(t.by_id(0x8000_0002).unwrap().id, idb);
        assert_eq!(t.len(), 2);
    }
}
