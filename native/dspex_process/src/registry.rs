use crate::identity::ProcessIdentity;
use crate::split_set::SplitSet;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;

/// The registry's hash maps. foldhash (hashbrown's default hasher) instead of std's SipHash:
/// every registry call hashes a worker id or a fingerprint two to four times, and SipHash
/// made that a measurable part of a lookup. Keys are seeded per map, so one registry's
/// layout says nothing about another's.
type Map<K, V> = DashMap<K, V, foldhash::fast::RandomState>;

fn new_map<K: Eq + Hash, V>() -> Map<K, V> {
    DashMap::with_capacity_and_hasher_and_shard_amount(
        0,
        foldhash::fast::RandomState::default(),
        SHARDS,
    )
}

/// One registered worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEntry<O> {
    /// The handle of the worker's owner (on the BEAM: the Elixir pid).
    pub owner: O,
    /// The worker's OS process, identified by pid and start time; `None` when unknown.
    pub python: Option<ProcessIdentity>,
    /// Shared by every entry with the same fingerprint (the registry interns it).
    pub fingerprint: Arc<str>,
    /// Unix time in seconds.
    pub registered_at: u64,
    /// The owner is being watched, hence alive: an entry leaves the registry as soon as its
    /// owner dies. `false` only when the owner was already dead when it registered.
    pub alive: bool,
    /// The OS process was read as a port program of this VM when it registered (its parent
    /// was the VM's port helper): only such a process may be ended when it leaves.
    pub port_child: bool,
}

/// Counts over the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub total_registered: usize,
    pub alive_workers: usize,
    pub dead_workers: usize,
    pub active_python_pids: usize,
}

/// The keys of a fingerprint, or of an owner: almost always exactly one, kept without a
/// collection; a boxed set when many workers share the record. Never empty (a record whose
/// last key goes is removed), so that the record is no bigger than its key: the box fits
/// in the key's unused bits (a non-null pointer, a tag).
///
/// A fingerprint's record names exactly its entries' keys ([`Keys::add`], [`Keys::remove_last`]).
/// An owner's names every key whose entry is the owner's, and maybe some that left it:
/// unregistering does not touch it (one lock instead of three); registering for the owner
/// drops keys that left, checking a fixed number of keys per call ([`Keys::add_sweeping`]),
/// so that the sweep never does work in proportion to the owner's keys (it runs on a VM
/// scheduler; the set itself grows a part at a time, see [`SplitSet`]):
/// - a lone key that left is replaced by the new one;
/// - a set of keys is swept [`SWEEP_PER_ADD`] positions per registration, round robin. A
///   pass over a set of S keys takes at most S / 3 registrations (each checks four keys
///   and adds at most one the pass may still have to check), and what it leaves is the keys found live plus those added
///   meanwhile: the set stays within about 1.5 times the most keys the owner had at once
///   (with two checks per registration it did not: a worker replaced before the old one is
///   unregistered made it grow without end).
///
/// An owner that registers nothing more keeps what it has until it dies: its death skips
/// the keys that left it.
#[derive(Debug)]
enum Keys<K> {
    One(K),
    // Boxed so that the common `One` record stays small.
    Many(Box<SplitSet<K>>),
}

/// Positions of an owner's set checked per registration (see [`Keys`]).
const SWEEP_PER_ADD: usize = 4;

impl<K: Eq + Hash + Clone> Keys<K> {
    fn add(&mut self, key: K) {
        match self {
            Keys::One(k) if *k == key => {}
            Keys::One(k) => *self = Keys::Many(Box::new([k.clone(), key].into_iter().collect())),
            Keys::Many(keys) => {
                keys.insert(key);
            }
        }
    }

    /// Adds `key` for a registration by the owner, called under the owner's lock before
    /// the entry is put, dropping keys that left the owner on the way (see [`Keys`]).
    /// `still_owned` reads whether a key's entry is the owner's now.
    fn add_sweeping(&mut self, key: K, still_owned: impl Fn(&K) -> bool) {
        match self {
            Keys::One(k) if *k != key && !still_owned(k) => *self = Keys::One(key),
            Keys::One(_) => self.add(key),
            Keys::Many(keys) => {
                // Before the insert: `key`'s entry is not in yet, and the sweep would take
                // it for one that left (a copy of it already there may go: it comes back).
                keys.sweep(SWEEP_PER_ADD, still_owned);
                keys.insert(key);
            }
        }
    }

    /// Removes `key`; returns whether none is left, when the record must go (a lone key is
    /// not removed from the record, which goes with it).
    fn remove_last<Q>(&mut self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            Keys::One(k) => (*k).borrow() == key,
            Keys::Many(keys) => {
                keys.remove(key);
                keys.is_empty()
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Keys::One(_) => 1,
            Keys::Many(keys) => keys.len(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &K> {
        let (one, many) = match self {
            Keys::One(k) => (Some(k), None),
            Keys::Many(keys) => (None, Some(keys.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    fn to_vec(&self) -> Vec<K> {
        self.iter().cloned().collect()
    }

    fn into_vec(self) -> Vec<K> {
        match self {
            Keys::One(k) => vec![k],
            Keys::Many(keys) => keys.into_keys().collect(),
        }
    }
}

/// The keys of an owner that died, taken out of the registry's watch list in O(1) by
/// [`Registry::detach_owner`]; [`Registry::remove_detached`] removes their entries, in
/// time proportional to their number (the NIF does that off the VM's schedulers when
/// there are many).
#[derive(Debug)]
pub struct DetachedKeys<K>(Keys<K>);

impl<K: Eq + Hash + Clone> DetachedKeys<K> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
thread_local! {
    /// Runs in `register` between a new owner record and its entry (see
    /// `an_owner_that_dies_while_its_first_entry_goes_in_takes_it_along`).
    static NEW_RECORD_HOOK: std::cell::Cell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::Cell::new(None) };
}

/// Shards of each map: a listing holds one shard's read lock at a time, so with many
/// shards a writer waits at most for a small fraction of a large listing; and a table
/// grows a shard at a time, rehashing a 256th of its entries in the registration that
/// fills it (at 1M entries, 64 shards made 60–260 registrations take over 1 ms, up to
/// 7 ms; 256 shards, 0–21 up to 2–5 ms: `examples/registry_growth.rs`), for about 5 B
/// per entry of emptier tables.
const SHARDS: usize = 256;

/// A concurrent worker registry.
///
/// `K` is the worker id and `O` the owner handle (an Elixir pid in the NIF). Each owner is
/// watched once, through the `monitor` callback given to [`Registry::register`], for as long
/// as it lives; [`Registry::owner_down`] is the other half.
///
/// Fingerprints are interned and indexed: `fingerprints` maps each one to the keys whose
/// entry has it, so [`Registry::by_fingerprint`] reads only those entries.
///
/// Locking: the lock order is `owners`, then `entries`, then `fingerprints`; no code holds
/// a lock while taking one earlier in that order. Every entry given to owner `o` is added
/// to `o`'s record, under that record's lock, before the entry is put; a key leaves `o`'s
/// record only under that lock, and only when its entry was read there and found not to
/// belong to `o` (and no entry comes to `o` without that lock). So `o`'s record names every
/// key of `o` until `o` dies, and `o`'s death removes them all. It may also name keys that
/// left `o` (unregistered, or registered by another owner): `o`'s death skips them, and
/// the record (`Keys`) keeps their number bounded. (An owner already dead when it
/// registers gets no record: its entries are kept as dead and leave through
/// [`Registry::remove_dead`] or [`Registry::remove_if_dead`].) Every change to the fingerprint index
/// is made while the entry's shard in `entries` is write-locked, so the index names key `k`
/// under `f` exactly when `k`'s entry has `f`.
pub struct Registry<K, O> {
    entries: Map<K, WorkerEntry<O>>,
    owners: Map<O, Keys<K>>,
    fingerprints: Map<Arc<str>, Keys<K>>,
}

impl<K, O> Default for Registry<K, O>
where
    K: Eq + Hash + Clone,
    O: Eq + Hash + Copy,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, O> Registry<K, O>
where
    K: Eq + Hash + Clone,
    O: Eq + Hash + Copy,
{
    pub fn new() -> Self {
        Registry {
            entries: new_map(),
            owners: new_map(),
            fingerprints: new_map(),
        }
    }

    /// The registry's copy of `fingerprint` when an entry has it, so that a registration
    /// with a known fingerprint allocates nothing for it.
    pub fn intern(&self, fingerprint: &str) -> Arc<str> {
        match self.fingerprints.get(fingerprint) {
            Some(known) => known.key().clone(),
            None => fingerprint.into(),
        }
    }

    /// Inserts an entry under `key`, replacing any entry there. `monitor` is called once per
    /// owner, the first time it registers; it returns `false` when the owner is already dead,
    /// and the entry is then kept as dead until [`Registry::remove_dead`] takes it.
    ///
    /// Returns the replaced entry when it named an OS process and the new entry names
    /// another one (or none): that process has left the registry.
    pub fn register(
        &self,
        key: K,
        mut entry: WorkerEntry<O>,
        monitor: impl FnOnce(&O) -> bool,
    ) -> Option<WorkerEntry<O>> {
        let owner = entry.owner;
        let python = entry.python;
        let replaced = match self.owners.entry(owner) {
            Entry::Occupied(mut keys) => {
                entry.alive = true;
                keys.get_mut().add_sweeping(key.clone(), |k| {
                    self.entries.get(k).is_some_and(|e| e.owner == owner)
                });
                self.put(key, entry)
            }
            Entry::Vacant(slot) => {
                entry.alive = monitor(&owner);
                // A live owner's new record stays locked until the entry is in: an owner
                // that dies meanwhile is detached only after, and its entry leaves with it.
                // A dead one gets none (its slot is released here).
                let _record = entry.alive.then(|| slot.insert(Keys::One(key.clone())));
                #[cfg(test)]
                if let Some(hook) = NEW_RECORD_HOOK.with(|hook| hook.take()) {
                    hook();
                }
                self.put(key, entry)
            }
        };
        // The key stays in the old owner's record, if it had one (see `Keys`).
        let old = replaced?;
        let left = old
            .python
            .is_some_and(|old_python| Some(old_python) != python);
        left.then_some(old)
    }

    /// Puts `entry` under `key` and keeps the fingerprint index in step, under the entry's
    /// shard lock. Returns the entry it replaced.
    fn put(&self, key: K, mut entry: WorkerEntry<O>) -> Option<WorkerEntry<O>> {
        match self.entries.entry(key) {
            Entry::Occupied(mut slot) => {
                if slot.get().fingerprint == entry.fingerprint {
                    entry.fingerprint = Arc::clone(&slot.get().fingerprint);
                } else {
                    self.unindex::<K>(&slot.get().fingerprint, slot.key());
                    entry.fingerprint = self.index(entry.fingerprint, slot.key().clone());
                }
                Some(slot.insert(entry))
            }
            Entry::Vacant(slot) => {
                entry.fingerprint = self.index(entry.fingerprint, slot.key().clone());
                slot.insert(entry);
                None
            }
        }
    }

    /// Adds `key` under `fingerprint`; returns the index's copy of the fingerprint.
    fn index(&self, fingerprint: Arc<str>, key: K) -> Arc<str> {
        match self.fingerprints.entry(fingerprint) {
            Entry::Occupied(mut keys) => {
                keys.get_mut().add(key);
                Arc::clone(keys.key())
            }
            Entry::Vacant(slot) => {
                let fingerprint = Arc::clone(slot.key());
                slot.insert(Keys::One(key));
                fingerprint
            }
        }
    }

    fn unindex<Q>(&self, fingerprint: &str, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.fingerprints
            .remove_if_mut(fingerprint, |_, keys| keys.remove_last(key));
    }

    /// Removes the entry under `key` if `take` says so, and its fingerprint from the index,
    /// under the entry's shard lock.
    fn take<Q>(
        &self,
        key: &Q,
        take: impl FnOnce(&WorkerEntry<O>) -> bool,
    ) -> Option<(K, WorkerEntry<O>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.remove_if(key, |k, e| {
            let taken = take(e);
            if taken {
                self.unindex::<K>(&e.fingerprint, k);
            }
            taken
        })
    }

    /// Removes `key`; returns the entry that was there.
    pub fn unregister<Q>(&self, key: &Q) -> Option<WorkerEntry<O>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.remove(key).map(|(_, entry)| entry)
    }

    /// Removes `key`; returns the registry's own key and the entry that were there. The
    /// key stays in its owner's record (see `Keys`).
    pub fn remove<Q>(&self, key: &Q) -> Option<(K, WorkerEntry<O>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.take(key, |_| true)
    }

    /// The owner died: its entries leave. Returns them.
    pub fn owner_down(&self, owner: &O) -> Vec<(K, WorkerEntry<O>)> {
        match self.detach_owner(owner) {
            Some(keys) => self.remove_detached(owner, keys),
            None => Vec::new(),
        }
    }

    /// The first half of [`Registry::owner_down`], O(1): the owner is no longer watched
    /// (a later registration by the same handle monitors it again, and finds it dead).
    /// Returns its keys, or `None` when it was not watched.
    pub fn detach_owner(&self, owner: &O) -> Option<DetachedKeys<K>> {
        self.owners
            .remove(owner)
            .map(|(_, keys)| DetachedKeys(keys))
    }

    /// The second half of [`Registry::owner_down`]: removes the entries of `keys` that
    /// still belong to `owner` (a key registered again by another owner meanwhile stays).
    /// Returns them.
    pub fn remove_detached(&self, owner: &O, keys: DetachedKeys<K>) -> Vec<(K, WorkerEntry<O>)> {
        keys.0
            .into_vec()
            .into_iter()
            .filter_map(|key| self.take(&key, |e| e.owner == *owner && e.alive))
            .collect()
    }

    /// Removes `key` if its entry belongs to `owner` and that owner was found dead when it
    /// registered: for a registration applied after its caller saw the owner alive, whose
    /// owner died in between (it must leave as if the owner had died after registering).
    pub fn remove_if_dead<Q>(&self, key: &Q, owner: &O) -> Option<(K, WorkerEntry<O>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.take(key, |e| !e.alive && e.owner == *owner)
    }

    /// Removes the entries whose owner was already dead when they registered.
    pub fn remove_dead(&self) -> Vec<K> {
        let dead: Vec<K> = self
            .entries
            .iter()
            .filter(|e| !e.alive)
            .map(|e| e.key().clone())
            .collect();
        dead.into_iter()
            .filter(|key| self.take(key, |e| !e.alive).is_some())
            .collect()
    }

    pub fn get<Q>(&self, key: &Q) -> Option<WorkerEntry<O>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_with(key, WorkerEntry::clone)
    }

    /// Reads the entry under `key` in place, under its shard's read lock: `read` must be
    /// short and must not call back into the registry.
    pub fn get_with<Q, R>(&self, key: &Q, read: impl FnOnce(&WorkerEntry<O>) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).map(|e| read(e.value()))
    }

    /// A snapshot of every entry (through [`Registry::for_each_chunk`], so that the model
    /// tests check what listings see).
    pub fn entries(&self) -> Vec<(K, WorkerEntry<O>)> {
        let mut all = Vec::with_capacity(self.len());
        self.for_each_chunk(|chunk| all.extend_from_slice(chunk));
        all
    }

    /// The entries with this fingerprint, found through the index: the cost is that of the
    /// entries returned, not of the registry's size.
    pub fn by_fingerprint(&self, fingerprint: &str) -> Vec<(K, WorkerEntry<O>)> {
        // The index's lock is released before any entry is read (the lock order).
        let keys = match self.fingerprints.get(fingerprint) {
            Some(keys) => keys.to_vec(),
            None => return Vec::new(),
        };
        keys.into_iter()
            .filter_map(|key| {
                let entry = self.entries.get(&key)?;
                // The entry may have changed since the index was read.
                (&*entry.fingerprint == fingerprint).then(|| (key.clone(), entry.clone()))
            })
            .collect()
    }

    /// Walks the entries shard by shard: `copy` sees each entry of a shard under the
    /// shard's read lock (it should copy out only what it needs), then `flush` runs with
    /// the lock released. A listing thus holds each lock only for copies, and never copies
    /// the whole registry at once (at 10k entries, that copy and its page faults were a
    /// fifth of a listing's time).
    pub fn visit_shards<S>(
        &self,
        state: &mut S,
        mut copy: impl FnMut(&mut S, &K, &WorkerEntry<O>),
        mut flush: impl FnMut(&mut S),
    ) {
        for shard in self.entries.shards() {
            {
                let table = shard.read();
                // SAFETY: the shard's read lock is held while its buckets are read, and
                // nothing here changes the table.
                unsafe {
                    for bucket in table.iter() {
                        let (key, entry) = bucket.as_ref();
                        copy(state, key, entry.get());
                    }
                }
            }
            flush(state);
        }
    }

    /// Calls `visit` with the entries of each shard in turn, cloned out through
    /// [`Registry::visit_shards`] into one buffer the size of the largest shard.
    pub fn for_each_chunk(&self, mut visit: impl FnMut(&[(K, WorkerEntry<O>)])) {
        self.visit_shards(
            &mut Vec::new(),
            |chunk, key, entry| chunk.push((key.clone(), entry.clone())),
            |chunk| {
                visit(chunk);
                chunk.clear();
            },
        );
    }

    /// Whether this entry's fingerprint is held by more than the entry and the index (by
    /// another entry, or a registration on its way in): worth encoding once per listing.
    /// Two is what `put` leaves: the index's key, and the entry's clone of it. Were that to
    /// change, only a listing's reuse of fingerprint terms would suffer, not its answers.
    pub fn fingerprint_shared(entry: &WorkerEntry<O>) -> bool {
        Arc::strong_count(&entry.fingerprint) > 2
    }

    /// Entries whose owner is dead.
    pub fn dead(&self) -> Vec<(K, WorkerEntry<O>)> {
        self.select(|e| !e.alive)
    }

    /// Python processes of entries whose owner is alive (entries without one are skipped).
    pub fn active_python(&self) -> Vec<ProcessIdentity> {
        self.entries
            .iter()
            .filter(|e| e.alive)
            .filter_map(|e| e.python)
            .collect()
    }

    pub fn stats(&self) -> RegistryStats {
        let mut stats = RegistryStats::default();
        for e in self.entries.iter() {
            stats.total_registered += 1;
            if e.alive {
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

    /// How many owners are being watched.
    pub fn watched_owners(&self) -> usize {
        self.owners.len()
    }

    /// How many of the keys in the owner's record are its live entries (0 when it is not
    /// watched).
    #[cfg(test)]
    pub(crate) fn owned_by(&self, owner: &O) -> usize {
        self.owners.get(owner).map_or(0, |keys| {
            keys.iter()
                .filter(|k| {
                    self.entries
                        .get(*k)
                        .is_some_and(|e| e.owner == *owner && e.alive)
                })
                .count()
        })
    }

    /// How many keys the owner's record holds, including those that left it.
    #[cfg(test)]
    pub(crate) fn recorded_by(&self, owner: &O) -> usize {
        self.owners.get(owner).map_or(0, |keys| keys.len())
    }

    /// How many distinct fingerprints the index holds.
    pub fn fingerprint_count(&self) -> usize {
        self.fingerprints.len()
    }

    fn select(&self, keep: impl Fn(&WorkerEntry<O>) -> bool) -> Vec<(K, WorkerEntry<O>)> {
        self.entries
            .iter()
            .filter(|e| keep(e.value()))
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pid::Pid;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    type Reg = Registry<String, u32>;

    fn entry(owner: u32, pid: Option<i64>) -> WorkerEntry<u32> {
        WorkerEntry {
            owner,
            python: pid.map(|p| ProcessIdentity {
                pid: Pid::new(p).unwrap(),
                start_time: 7,
            }),
            fingerprint: format!("fp_{owner}").into(),
            registered_at: 1,
            alive: false,
            port_child: false,
        }
    }

    /// `owner` dies: exactly the entries that are its own leave.
    fn assert_death_takes_exactly_its_entries(reg: &Reg, owner: u32) {
        let keys = |entries: Vec<(String, WorkerEntry<u32>)>| {
            let mut keys: Vec<String> = entries.into_iter().map(|(k, _)| k).collect();
            keys.sort();
            keys
        };
        let expected = keys(reg.select(|e| e.owner == owner));
        assert_eq!(keys(reg.owner_down(&owner)), expected, "owner {owner}");
    }

    #[test]
    fn records_stay_small() {
        // What the memory row of the benchmark counts on: an optional identity costs no
        // extra word, and an index record is no bigger than its key.
        assert_eq!(size_of::<Option<ProcessIdentity>>(), 16);
        assert_eq!(size_of::<Keys<Arc<[u8]>>>(), 16);
        assert_eq!(size_of::<Keys<crate::KeyBytes>>(), 24);
    }

    #[test]
    fn one_monitor_per_owner_for_its_whole_life() {
        let reg = Reg::new();
        let calls = AtomicU32::new(0);
        let monitor = |_: &u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            true
        };
        reg.register("a".into(), entry(1, Some(10)), monitor);
        reg.register("b".into(), entry(1, None), monitor);
        assert!(reg.unregister("a").is_some());
        assert!(reg.unregister("b").is_some());
        assert!(reg.unregister("b").is_none());
        reg.register("c".into(), entry(1, None), monitor);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the owner is watched once");
        assert_eq!(reg.watched_owners(), 1);
        assert_eq!(reg.owner_down(&1).len(), 1);
        assert!(reg.is_empty());
        assert_eq!(reg.watched_owners(), 0);
    }

    #[test]
    fn one_owner_with_many_workers() {
        let reg = Reg::new();
        for i in 0..20_000 {
            reg.register(format!("w{i}"), entry(1, None), |_| true);
        }
        assert_eq!(reg.len(), 20_000);
        for i in 0..10_000 {
            assert!(reg.unregister(format!("w{i}").as_str()).is_some());
        }
        assert_eq!(reg.owner_down(&1).len(), 10_000);
        assert!(reg.is_empty());
    }

    #[test]
    fn reregistering_moves_a_key_to_its_new_owner() {
        let reg = Reg::new();
        assert_eq!(reg.register("w".into(), entry(1, Some(10)), |_| true), None);
        let left = reg.register("w".into(), entry(2, Some(20)), |_| true);
        assert_eq!(
            left.and_then(|e| e.python).map(|id| id.pid.as_raw()),
            Some(10),
            "pid 10 left the registry"
        );
        assert_eq!(reg.get("w").unwrap().owner, 2);
        assert!(
            reg.owner_down(&1).is_empty(),
            "the old owner's death removes nothing"
        );
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.owner_down(&2).len(), 1);
        assert!(reg.is_empty());
    }

    #[test]
    fn reregistering_the_same_process_releases_nothing() {
        let reg = Reg::new();
        reg.register("w".into(), entry(1, Some(10)), |_| true);
        assert_eq!(reg.register("w".into(), entry(1, Some(10)), |_| true), None);
        assert_eq!(
            reg.register("w".into(), entry(1, None), |_| true)
                .and_then(|e| e.python)
                .map(|i| i.pid.as_raw()),
            Some(10)
        );
        assert_eq!(reg.unregister("w").map(|e| e.python), Some(None));
    }

    #[test]
    fn a_chunked_walk_sees_every_entry_once_in_shard_sized_chunks() {
        let reg = Reg::new();
        let n = 5_000;
        for i in 0..n {
            reg.register(format!("w{i}"), entry(i % 7, None), |_| true);
        }
        let mut seen = HashSet::new();
        let mut chunks = 0;
        let mut largest = 0;
        reg.for_each_chunk(|chunk| {
            chunks += 1;
            largest = largest.max(chunk.len());
            for (key, e) in chunk {
                assert!(seen.insert(key.clone()), "{key} seen twice");
                assert_eq!(reg.get(key.as_str()).map(|g| g.owner), Some(e.owner));
            }
        });
        assert_eq!(seen.len(), n as usize);
        assert_eq!(chunks, SHARDS, "one chunk per shard");
        assert!(
            largest < n as usize / 8,
            "no chunk holds the whole registry (largest {largest})"
        );
    }

    #[test]
    fn a_walk_while_writers_run_sees_each_stable_entry_once() {
        // Writers add and remove keys (growing and shrinking the shards' tables) while walks
        // run: each walk must see every key that no writer touches exactly once.
        let reg = Arc::new(Reg::new());
        for i in 0..2_000 {
            reg.register(format!("stable{i}"), entry(1, None), |_| true);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rounds = Arc::new(AtomicU32::new(0));
        let writers: Vec<_> = (0..2u32)
            .map(|t| {
                let (reg, stop, rounds) =
                    (Arc::clone(&reg), Arc::clone(&stop), Arc::clone(&rounds));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        for i in 0..500 {
                            reg.register(format!("churn{t}-{i}"), entry(2, None), |_| true);
                        }
                        for i in 0..500 {
                            reg.unregister(format!("churn{t}-{i}").as_str());
                        }
                        rounds.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        // At least 200 walks, and on until the writers have done several rounds meanwhile.
        let mut walks = 0;
        while walks < 200 || rounds.load(Ordering::SeqCst) < 5 {
            let mut seen = HashSet::new();
            reg.for_each_chunk(|chunk| {
                for (key, _) in chunk.iter().filter(|(k, _)| k.starts_with("stable")) {
                    assert!(seen.insert(key.clone()), "{key} seen twice in one walk");
                }
            });
            assert_eq!(seen.len(), 2_000, "a stable entry was missed");
            walks += 1;
        }
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
    }

    #[test]
    fn owner_down_removes_all_its_entries_only() {
        let reg = Reg::new();
        for (k, o) in [("a", 1), ("b", 1), ("c", 2)] {
            reg.register(k.into(), entry(o, None), |_| true);
        }
        let down: HashSet<String> = reg.owner_down(&1).into_iter().map(|(k, _)| k).collect();
        assert_eq!(down, HashSet::from(["a".to_string(), "b".to_string()]));
        let left: Vec<String> = reg.entries().into_iter().map(|(k, _)| k).collect();
        assert_eq!(left, vec!["c".to_string()]);
    }

    #[test]
    fn owners_dead_at_registration_are_reported_and_swept() {
        let reg = Reg::new();
        reg.register("live".into(), entry(1, Some(10)), |_| true);
        reg.register("dead".into(), entry(2, Some(20)), |_| false);
        reg.register("nopid".into(), entry(1, None), |_| true);

        assert_eq!(
            reg.stats(),
            RegistryStats {
                total_registered: 3,
                alive_workers: 2,
                dead_workers: 1,
                active_python_pids: 1
            }
        );
        let active = reg.active_python();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].pid.as_raw(), 10);
        assert_eq!(reg.dead().len(), 1);
        assert_eq!(reg.by_fingerprint("fp_1").len(), 2);

        assert!(
            reg.remove_if_dead("live", &1).is_none(),
            "a live owner's entry stays"
        );
        assert!(
            reg.remove_if_dead("dead", &1).is_none(),
            "another owner's entry stays"
        );
        assert_eq!(reg.remove_dead(), vec!["dead".to_string()]);
        reg.register("late".into(), entry(3, Some(30)), |_| false);
        assert_eq!(
            reg.remove_if_dead("late", &3).map(|(k, _)| k),
            Some("late".into())
        );
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.watched_owners(), 1, "the dead owner was never watched");
    }

    #[test]
    fn a_key_moved_away_and_back_leaves_with_the_owner_it_came_back_to() {
        let reg = Reg::new();
        reg.register("w".into(), entry(1, None), |_| true);
        reg.register("w".into(), entry(2, None), |_| true);
        reg.register("w".into(), entry(1, None), |_| true);
        assert!(reg.owner_down(&2).is_empty(), "owner 2 no longer has \"w\"");
        assert_eq!(reg.owner_down(&1).len(), 1, "owner 1's death removes \"w\"");
        assert!(reg.is_empty());
    }

    #[test]
    fn keys_that_left_an_owner_stay_bounded_in_its_record() {
        let reg = Reg::new();
        // One key at a time, as a DSPex worker restarting under the same owner would.
        for i in 0..1_000 {
            reg.register(format!("solo{i}"), entry(1, None), |_| true);
            assert!(reg.unregister(format!("solo{i}").as_str()).is_some());
        }
        reg.register("last".into(), entry(1, None), |_| true);
        assert_eq!(reg.recorded_by(&1), 1, "a lone key that left is replaced");
        assert_eq!(reg.owned_by(&1), 1);
        // 100 live keys while 10,000 others come and go, some moved to another owner.
        for i in 0..100 {
            reg.register(format!("live{i}"), entry(2, None), |_| true);
        }
        for i in 0..10_000 {
            reg.register(format!("churn{i}"), entry(2, None), |_| true);
            if i % 3 == 0 {
                reg.register(format!("churn{i}"), entry(3, None), |_| true);
            } else {
                assert!(reg.unregister(format!("churn{i}").as_str()).is_some());
            }
            assert!(reg.recorded_by(&2) <= 160, "{}", reg.recorded_by(&2));
        }
        assert_eq!(reg.owned_by(&2), 100);
        let gone = reg.owner_down(&2);
        assert_eq!(gone.len(), 100, "only the live keys leave with owner 2");
        assert!(gone.iter().all(|(k, _)| k.starts_with("live")));
        assert_eq!(
            reg.len(),
            1 + 3_334,
            "owner 1's key and owner 3's keys stay"
        );
    }

    #[test]
    fn a_registration_checks_a_bounded_number_of_an_owners_keys() {
        let mut record = Keys::One("k0".to_string());
        for i in 1..10_000 {
            record.add_sweeping(format!("k{i}"), |_| true);
        }
        assert_eq!(record.len(), 10_000);
        let checks = AtomicU32::new(0);
        record.add_sweeping("new".into(), |_| {
            checks.fetch_add(1, Ordering::SeqCst);
            false
        });
        assert!(checks.load(Ordering::SeqCst) as usize <= SWEEP_PER_ADD);
        assert_eq!(
            record.len(),
            10_001 - SWEEP_PER_ADD,
            "the keys found gone went"
        );
    }

    #[test]
    fn owners_sharing_keys_across_threads_keep_complete_records() {
        // Threads move the same ten keys among the same six owners and unregister them, so
        // sweeps race registrations of the keys they check.
        let reg = Arc::new(Reg::new());
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let reg = Arc::clone(&reg);
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9u32.wrapping_mul(t + 1);
                    for _ in 0..20_000 {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        let key = format!("k{}", x % 10);
                        if x % 5 == 0 {
                            reg.unregister(key.as_str());
                        } else {
                            reg.register(key, entry((x >> 8) % 6, None), |_| true);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for owner in 0..6 {
            assert_death_takes_exactly_its_entries(&reg, owner);
        }
        assert!(reg.is_empty(), "left: {:?}", reg.entries());
    }

    /// A pool of `live` workers under owner 1 that starts each replacement before it
    /// unregisters the worker it replaces, oldest first, `replacements` times. Returns the
    /// most keys the owner's record held; the owner's death then takes exactly the live.
    fn replace_workers(live: usize, replacements: usize) -> usize {
        let reg = Reg::new();
        let mut workers: std::collections::VecDeque<String> =
            (0..live).map(|i| format!("w{i}")).collect();
        for key in &workers {
            reg.register(key.clone(), entry(1, None), |_| true);
        }
        let mut most = 0;
        for i in live..live + replacements {
            let key = format!("w{i}");
            reg.register(key.clone(), entry(1, None), |_| true);
            workers.push_back(key);
            let old = workers.pop_front().unwrap();
            assert!(reg.unregister(old.as_str()).is_some());
            most = most.max(reg.recorded_by(&1));
        }
        assert_eq!(reg.owned_by(&1), live);
        assert_eq!(reg.owner_down(&1).len(), live);
        assert!(reg.is_empty());
        most
    }

    #[test]
    fn an_owner_replacing_its_workers_keeps_a_bounded_record() {
        // 100,000 replacements over 100 workers (with two checks per registration, this
        // record grew past 600 keys).
        let most = replace_workers(100, 100_000);
        assert!(most <= 160, "{most} keys for 100 workers");
    }

    #[test]
    fn an_owner_of_thousands_replacing_its_workers_keeps_a_bounded_record() {
        // Past the 1,024 keys at which the record is split in parts.
        let most = replace_workers(2_000, 20_000);
        assert!(most <= 3_200, "{most} keys for 2,000 workers");
    }

    #[test]
    fn an_owner_that_dies_while_its_first_entry_goes_in_takes_it_along() {
        // Owner 1's record is made; before its entry is put, owner 1 dies on another thread
        // (its `down`). The death must wait for the entry and remove it, or the entry would
        // stay forever (alive, so no sweep takes it). The 50 ms give the death every chance
        // to run at that point if the record were not held.
        let reg = Arc::new(Reg::new());
        let down = Arc::new(Mutex::new(None));
        let (r, d) = (Arc::clone(&reg), Arc::clone(&down));
        NEW_RECORD_HOOK.with(|hook| {
            hook.set(Some(Box::new(move || {
                let death = std::thread::spawn(move || r.owner_down(&1).len());
                *d.lock().unwrap() = Some(death);
                std::thread::sleep(std::time::Duration::from_millis(50));
            })))
        });
        reg.register("w".into(), entry(1, None), |_| true);
        let death = down.lock().unwrap().take().expect("the hook ran");
        assert_eq!(death.join().unwrap(), 1, "the death removed the entry");
        assert!(reg.is_empty(), "left: {:?}", reg.entries());
    }

    #[test]
    fn concurrent_register_unregister_and_deaths_stay_consistent() {
        let reg = Arc::new(Reg::new());
        let monitored = Arc::new(Mutex::new(HashSet::new()));
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let reg = Arc::clone(&reg);
                let monitored = Arc::clone(&monitored);
                std::thread::spawn(move || {
                    for i in 0..2000u32 {
                        let key = format!("{t}-{}", i % 50);
                        let owner = t * 10 + i % 4;
                        match i % 7 {
                            0 | 3 => {
                                reg.unregister(key.as_str());
                            }
                            6 => {
                                // The owner dies: its record and entries go together.
                                reg.owner_down(&owner);
                                monitored.lock().unwrap().remove(&owner);
                            }
                            _ => {
                                let m = &monitored;
                                reg.register(key, entry(owner, None), |o| {
                                    assert!(m.lock().unwrap().insert(*o), "watched twice");
                                    true
                                });
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every entry's owner is watched; every watched owner has a record.
        let owners: HashSet<u32> = reg.entries().iter().map(|(_, e)| e.owner).collect();
        let watched = monitored.lock().unwrap().clone();
        assert!(owners.is_subset(&watched), "{owners:?} not in {watched:?}");
        assert_eq!(reg.watched_owners(), watched.len());
        assert!(reg.entries().iter().all(|(_, e)| e.alive));
        // Each owner's record names all its keys, whatever left it: its death takes exactly
        // its entries, and the deaths leave nothing.
        for owner in watched {
            assert_death_takes_exactly_its_entries(&reg, owner);
        }
        assert!(reg.is_empty());
    }
}
