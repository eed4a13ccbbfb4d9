use crate::identity::ProcessIdentity;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::hash::Hash;

/// One registered worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEntry<O> {
    /// The handle of the worker's owner (on the BEAM: the Elixir pid).
    pub owner: O,
    /// The worker's OS process, identified by pid and start time; `None` when unknown.
    pub python: Option<ProcessIdentity>,
    pub fingerprint: Box<str>,
    /// Unix time in seconds.
    pub registered_at: u64,
}

/// Counts over the registry, given which owners are alive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub total_registered: usize,
    pub alive_workers: usize,
    pub dead_workers: usize,
    pub active_python_pids: usize,
}

/// Per owner: the monitor watching it and the keys it owns (usually one).
struct OwnerRecord<K, M> {
    monitor: Option<M>,
    keys: Vec<K>,
}

/// A concurrent worker registry.
///
/// `K` is the worker id, `O` the owner handle (an Elixir pid in the NIF), `M` the handle of
/// the monitor that watches an owner. The registry asks for one monitor per owner and hands
/// monitors back when an owner no longer owns anything, so the caller can cancel them.
///
/// Locking: every change to the entries of owner `o` happens while `o`'s record in `owners`
/// is locked, and no code holds an `entries` lock while taking an `owners` lock, so there
/// is no lock-order inversion.
pub struct Registry<K, O, M> {
    entries: DashMap<K, WorkerEntry<O>>,
    owners: DashMap<O, OwnerRecord<K, M>>,
}

impl<K, O, M> Default for Registry<K, O, M>
where
    K: Eq + Hash + Clone,
    O: Eq + Hash + Copy,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, O, M> Registry<K, O, M>
where
    K: Eq + Hash + Clone,
    O: Eq + Hash + Copy,
{
    pub fn new() -> Self {
        Registry {
            entries: DashMap::new(),
            owners: DashMap::new(),
        }
    }

    /// Inserts `entry` under `key`, replacing any entry there. `monitor` is called (at most
    /// once) when the owner is not watched yet; it returns `None` when the owner is already
    /// dead, and the entry then stays until [`Registry::remove_dead`] takes it.
    ///
    /// Returns the monitor of a former owner that no longer owns any key, to be cancelled.
    pub fn register(
        &self,
        key: K,
        entry: WorkerEntry<O>,
        monitor: impl FnOnce(&O) -> Option<M>,
    ) -> Option<M> {
        let owner = entry.owner;
        let replaced = {
            let mut record = self.owners.entry(owner).or_insert_with(|| OwnerRecord {
                monitor: monitor(&owner),
                keys: Vec::with_capacity(1),
            });
            if !record.keys.contains(&key) {
                record.keys.push(key.clone());
            }
            self.entries.insert(key.clone(), entry)
        };
        match replaced {
            Some(old) if old.owner != owner => self.forget_key(&old.owner, &key),
            _ => None,
        }
    }

    /// Removes `key`. Returns whether it was there, and a monitor to cancel when its owner
    /// owns nothing else.
    pub fn unregister(&self, key: &K) -> (bool, Option<M>) {
        loop {
            let owner = match self.entries.get(key) {
                Some(entry) => entry.owner,
                None => return (false, None),
            };
            if let Some(result) = self.remove_owned(key, owner) {
                return (true, result);
            }
            // The key changed owner between the read and the lock: look again.
        }
    }

    /// The owner died: every entry it owns leaves the registry. Returns how many left.
    pub fn owner_down(&self, owner: &O) -> usize {
        let Some((_, record)) = self.owners.remove(owner) else {
            return 0;
        };
        record
            .keys
            .iter()
            .filter(|key| {
                self.entries
                    .remove_if(*key, |_, entry| entry.owner == *owner)
                    .is_some()
            })
            .count()
    }

    /// Removes every entry whose owner `is_alive` says is dead. Returns the removed keys and
    /// the monitors to cancel.
    pub fn remove_dead(&self, is_alive: impl Fn(&O) -> bool) -> (Vec<K>, Vec<M>) {
        let dead: Vec<(K, O)> = self
            .entries
            .iter()
            .filter(|e| !is_alive(&e.owner))
            .map(|e| (e.key().clone(), e.owner))
            .collect();
        let mut removed = Vec::with_capacity(dead.len());
        let mut cancel = Vec::new();
        for (key, owner) in dead {
            if let Some(monitor) = self.remove_owned(&key, owner) {
                cancel.extend(monitor);
                removed.push(key);
            }
        }
        (removed, cancel)
    }

    pub fn get(&self, key: &K) -> Option<WorkerEntry<O>> {
        self.entries.get(key).map(|e| e.value().clone())
    }

    /// A snapshot of every entry.
    pub fn entries(&self) -> Vec<(K, WorkerEntry<O>)> {
        self.select(|_| true)
    }

    pub fn by_fingerprint(&self, fingerprint: &str) -> Vec<(K, WorkerEntry<O>)> {
        self.select(|e| &*e.fingerprint == fingerprint)
    }

    /// Entries whose owner is dead.
    pub fn dead(&self, is_alive: impl Fn(&O) -> bool) -> Vec<(K, WorkerEntry<O>)> {
        self.select(|e| !is_alive(&e.owner))
    }

    /// Python processes of entries whose owner is alive (entries without one are skipped).
    pub fn active_python(&self, is_alive: impl Fn(&O) -> bool) -> Vec<ProcessIdentity> {
        self.entries
            .iter()
            .filter_map(|e| e.python.filter(|_| is_alive(&e.owner)))
            .collect()
    }

    pub fn stats(&self, is_alive: impl Fn(&O) -> bool) -> RegistryStats {
        let mut stats = RegistryStats::default();
        for e in self.entries.iter() {
            stats.total_registered += 1;
            if is_alive(&e.owner) {
                stats.alive_workers += 1;
                stats.active_python_pids += usize::from(e.python.is_some());
            } else {
                stats.dead_workers += 1;
            }
        }
        stats
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many owners are being watched (for tests and memory accounting).
    pub fn watched_owners(&self) -> usize {
        self.owners.len()
    }

    fn select(&self, keep: impl Fn(&WorkerEntry<O>) -> bool) -> Vec<(K, WorkerEntry<O>)> {
        self.entries
            .iter()
            .filter(|e| keep(e.value()))
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    /// Removes `key` if `owner` still owns it, under the owner's lock. `None` when the key
    /// is gone or owned by someone else; otherwise the monitor to cancel, if any.
    fn remove_owned(&self, key: &K, owner: O) -> Option<Option<M>> {
        match self.owners.entry(owner) {
            Entry::Occupied(mut record) => {
                self.entries
                    .remove_if(key, |_, entry| entry.owner == owner)?;
                let keys = &mut record.get_mut().keys;
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    Some(record.remove().monitor)
                } else {
                    Some(None)
                }
            }
            Entry::Vacant(_) => self
                .entries
                .remove_if(key, |_, entry| entry.owner == owner)
                .map(|_| None),
        }
    }

    /// `key` moved away from `owner`: drop it from the owner's keys.
    fn forget_key(&self, owner: &O, key: &K) -> Option<M> {
        match self.owners.entry(*owner) {
            Entry::Occupied(mut record) => {
                record.get_mut().keys.retain(|k| k != key);
                if record.get().keys.is_empty() {
                    record.remove().monitor
                } else {
                    None
                }
            }
            Entry::Vacant(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Pid;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    type Reg = Registry<String, u32, u32>;

    fn entry(owner: u32, pid: Option<i64>) -> WorkerEntry<u32> {
        WorkerEntry {
            owner,
            python: pid.map(|p| ProcessIdentity {
                pid: Pid::new(p).unwrap(),
                start_time: 7,
            }),
            fingerprint: format!("fp_{owner}").into(),
            registered_at: 1,
        }
    }

    #[test]
    fn one_monitor_per_owner_cancelled_with_its_last_key() {
        let reg = Reg::new();
        let calls = AtomicU32::new(0);
        let monitor = |o: &u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            Some(*o + 1000)
        };
        assert_eq!(reg.register("a".into(), entry(1, Some(10)), monitor), None);
        assert_eq!(reg.register("b".into(), entry(1, None), monitor), None);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(reg.watched_owners(), 1);

        assert_eq!(reg.unregister(&"a".to_string()), (true, None));
        assert_eq!(reg.unregister(&"b".to_string()), (true, Some(1001)));
        assert_eq!(reg.unregister(&"b".to_string()), (false, None));
        assert_eq!(reg.watched_owners(), 0);
        assert!(reg.is_empty());
    }

    #[test]
    fn reregistering_moves_a_key_to_its_new_owner() {
        let reg = Reg::new();
        reg.register("w".into(), entry(1, Some(10)), |o| Some(*o));
        let cancel = reg.register("w".into(), entry(2, Some(20)), |o| Some(*o));
        assert_eq!(cancel, Some(1), "owner 1 owns nothing any more");
        assert_eq!(reg.get(&"w".to_string()).unwrap().owner, 2);
        assert_eq!(
            reg.owner_down(&1),
            0,
            "the old owner's death removes nothing"
        );
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.owner_down(&2), 1);
        assert!(reg.is_empty());
        assert_eq!(reg.watched_owners(), 0);
    }

    #[test]
    fn owner_down_removes_all_its_entries_only() {
        let reg = Reg::new();
        for (k, o) in [("a", 1), ("b", 1), ("c", 2)] {
            reg.register(k.into(), entry(o, None), |o| Some(*o));
        }
        assert_eq!(reg.owner_down(&1), 2);
        let left: Vec<String> = reg.entries().into_iter().map(|(k, _)| k).collect();
        assert_eq!(left, vec!["c".to_string()]);
    }

    #[test]
    fn dead_owners_are_reported_and_swept() {
        let reg = Reg::new();
        reg.register("live".into(), entry(1, Some(10)), |o| Some(*o));
        reg.register("dead".into(), entry(2, Some(20)), |_| None);
        reg.register("nopid".into(), entry(1, None), |o| Some(*o));
        let alive = |o: &u32| *o == 1;

        let stats = reg.stats(alive);
        assert_eq!(
            stats,
            RegistryStats {
                total_registered: 3,
                alive_workers: 2,
                dead_workers: 1,
                active_python_pids: 1
            }
        );
        let active = reg.active_python(alive);
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].pid.as_raw(), 10);
        assert_eq!(reg.dead(alive).len(), 1);
        assert_eq!(reg.by_fingerprint("fp_1").len(), 2);

        let (removed, cancel) = reg.remove_dead(alive);
        assert_eq!(removed, vec!["dead".to_string()]);
        assert!(cancel.is_empty(), "owner 2 never got a monitor");
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.watched_owners(), 1);
    }

    #[test]
    fn concurrent_register_unregister_stays_consistent() {
        let reg = Arc::new(Reg::new());
        let monitors = Arc::new(Mutex::new(HashSet::new()));
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let reg = Arc::clone(&reg);
                let monitors = Arc::clone(&monitors);
                std::thread::spawn(move || {
                    for i in 0..2000u32 {
                        let key = format!("{t}-{}", i % 50);
                        if i % 3 == 2 {
                            if let (_, Some(m)) = reg.unregister(&key) {
                                assert!(monitors.lock().unwrap().remove(&m));
                            }
                        } else {
                            let owner = t * 10 + i % 4;
                            let m = &monitors;
                            if let Some(old) = reg.register(key, entry(owner, None), |o| {
                                assert!(m.lock().unwrap().insert(*o));
                                Some(*o)
                            }) {
                                assert!(monitors.lock().unwrap().remove(&old));
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every live monitor belongs to an owner that still owns something, and back.
        let owners: HashSet<u32> = reg.entries().iter().map(|(_, e)| e.owner).collect();
        assert_eq!(owners, *monitors.lock().unwrap());
        assert_eq!(reg.watched_owners(), owners.len());
    }
}
