//! [`SplitSet`]: a set of registry keys whose growth never rehashes more than a part of it.

use indexmap::IndexSet;
use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};

type Part<K> = IndexSet<K, foldhash::fast::RandomState>;

/// Keys past which a set is split into parts.
const SPLIT_AT: usize = 1_024;
/// Parts of a split set: a key's part is the top byte of its hash.
const PARTS: usize = 256;
const _: () = assert!(PARTS == 1 << 8, "a part is chosen by the hash's top byte");

/// A set of keys, with positions for a sweep, that grows without long pauses. A hash set
/// rehashes all its keys when it outgrows its table: at 229,376 keys, one registration
/// held a VM scheduler for 14–18 ms per set (one owner or one fingerprint with that many
/// workers; the benchmark's row "one owner registers 300k workers" saw 30.74 ms).
/// Up to `SPLIT` keys ([`SPLIT_AT`] but in tests) this is one `IndexSet`; past that, the
/// keys are moved once into [`PARTS`] of them (a bounded move), each of which then grows
/// on its own, so a growth rehashes about a 256th of the set. A split set is never merged
/// back, and its parts never shrink: a record that shrinks keeps 16 KB of parts and the
/// tables of its largest size until its owner or fingerprint goes.
#[derive(Debug)]
pub(crate) struct SplitSet<K, const SPLIT: usize = SPLIT_AT> {
    parts: Vec<Part<K>>,
    len: usize,
    /// Chooses a key's part, with a seed of its own (not a part's, whose buckets would then
    /// all share the bits that chose the part).
    chooser: foldhash::fast::RandomState,
    /// Where the next [`SplitSet::sweep`] resumes.
    cursor: SweepCursor,
}

/// Where a sweep of a [`SplitSet`] resumes: a part and a position in it.
#[derive(Debug, Default)]
struct SweepCursor {
    part: usize,
    position: usize,
}

impl<K: Eq + Hash, const SPLIT: usize> SplitSet<K, SPLIT> {
    pub(crate) fn new() -> Self {
        SplitSet {
            parts: vec![Part::default()],
            len: 0,
            chooser: foldhash::fast::RandomState::default(),
            cursor: SweepCursor::default(),
        }
    }

    fn part_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        if self.parts.len() == 1 {
            0
        } else {
            (self.chooser.hash_one(key) >> 56) as usize
        }
    }

    /// Adds `key`; returns whether it was not there.
    pub(crate) fn insert(&mut self, key: K) -> bool {
        if self.parts.len() == 1 && self.len >= SPLIT {
            self.split();
        }
        let part = self.part_of(&key);
        let added = self.parts[part].insert(key);
        self.len += usize::from(added);
        added
    }

    fn split(&mut self) {
        let whole = std::mem::take(&mut self.parts[0]);
        self.parts = (0..PARTS).map(|_| Part::default()).collect();
        for key in whole {
            let part = self.part_of(&key);
            self.parts[part].insert(key);
        }
    }

    /// Removes `key`; returns whether it was there.
    pub(crate) fn remove<Q>(&mut self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let part = self.part_of(key);
        let removed = self.parts[part].swap_remove(key);
        self.len -= usize::from(removed);
        removed
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &K> {
        self.parts.iter().flatten()
    }

    pub(crate) fn into_keys(self) -> impl Iterator<Item = K> {
        self.parts.into_iter().flatten()
    }

    /// Checks the next `checks` keys from where the last sweep stopped, round robin, and
    /// drops those `keep` refuses. Empty parts are skipped without counting, so a call costs at most `checks`
    /// calls of `keep` plus `checks` walks over the 256 parts (a trivial step each). In
    /// `len` checks from a pass's start (a new set, or a sweep just wrapped round), each key
    /// present then is checked once. (Mid-pass, a key may be checked twice and another
    /// later: a removal before the cursor's wrap point pulls a key already checked into
    /// its place.)
    pub(crate) fn sweep(&mut self, checks: usize, mut keep: impl FnMut(&K) -> bool) {
        let cursor = &mut self.cursor;
        for _ in 0..checks {
            if self.len == 0 {
                return;
            }
            // The next position that holds a key (there is one: the set is not empty).
            loop {
                if cursor.part >= self.parts.len() {
                    *cursor = SweepCursor::default();
                }
                if cursor.position < self.parts[cursor.part].len() {
                    break;
                }
                cursor.part += 1;
                cursor.position = 0;
            }
            let part = &mut self.parts[cursor.part];
            if keep(&part[cursor.position]) {
                cursor.position += 1;
            } else {
                // The part's last key moves into this position, and is checked next.
                part.swap_remove_index(cursor.position);
                self.len -= 1;
            }
        }
    }

    /// The size of the largest part (what one growth may rehash).
    #[cfg(test)]
    pub(crate) fn largest_part(&self) -> usize {
        self.parts.iter().map(|p| p.len()).max().unwrap_or(0)
    }
}

impl<K: Eq + Hash, const SPLIT: usize> FromIterator<K> for SplitSet<K, SPLIT> {
    fn from_iter<I: IntoIterator<Item = K>>(keys: I) -> Self {
        let mut set = SplitSet::new();
        for key in keys {
            set.insert(key);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16),
        Remove(u16),
        Sweep(u8, u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<u16>().prop_map(|k| Op::Insert(k % 600)),
            2 => any::<u16>().prop_map(|k| Op::Remove(k % 600)),
            1 => (0u8..8, any::<u16>()).prop_map(|(n, m)| Op::Sweep(n, m % 7 + 1)),
        ]
    }

    proptest! {
        /// Against a plain set, across the split (at 64 keys here): the same keys, and a
        /// sweep drops exactly the keys it refuses among those it checks.
        #[test]
        fn answers_as_a_plain_set(ops in proptest::collection::vec(op(), 1..400)) {
            let mut set = SplitSet::<u16, 64>::new();
            let mut model = HashSet::new();
            for op in ops {
                match op {
                    Op::Insert(k) => prop_assert_eq!(set.insert(k), model.insert(k)),
                    Op::Remove(k) => prop_assert_eq!(set.remove(&k), model.remove(&k)),
                    Op::Sweep(checks, m) => {
                        let mut checked = 0;
                        set.sweep(usize::from(checks), |k| {
                            checked += 1;
                            k % m != 0
                        });
                        prop_assert!(checked <= usize::from(checks));
                        let kept: HashSet<u16> = set.iter().copied().collect();
                        let dropped: Vec<u16> = model.difference(&kept).copied().collect();
                        prop_assert!(dropped.iter().all(|k| k % m == 0), "{:?}", dropped);
                        prop_assert!(dropped.len() <= usize::from(checks));
                        model = kept;
                    }
                }
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.iter().count(), model.len());
            }
        }
    }

    #[test]
    fn a_large_set_grows_a_part_at_a_time() {
        let set: SplitSet<u64> = (0..300_000).collect();
        assert_eq!(set.len(), 300_000);
        // 300,000 keys over 256 parts: about 1,172 each.
        assert!(set.largest_part() < 1_600, "{}", set.largest_part());
        let mut set = set;
        assert!(set.remove(&7));
        assert!(!set.remove(&7));
        assert_eq!(set.into_keys().count(), 299_999);
    }

    /// Runs `calls` sweeps of four checks each; returns the keys checked, in order.
    fn sweep_recording<const SPLIT: usize>(
        set: &mut SplitSet<u32, SPLIT>,
        calls: usize,
        keep: impl Fn(u32) -> bool,
    ) -> Vec<u32> {
        let mut seen = Vec::new();
        for _ in 0..calls {
            set.sweep(4, |k| {
                seen.push(*k);
                keep(*k)
            });
        }
        seen
    }

    #[test]
    fn a_sweep_visits_every_key_in_turn() {
        let mut set: SplitSet<u32, 16> = (0..1_000).collect();
        // Dropping everything, four checks at a time, empties it in 250 calls.
        sweep_recording(&mut set, 250, |_| false);
        assert!(set.is_empty());
        set.sweep(4, |_| false);
        // Keeping everything, every key is checked within two rounds of checks.
        for k in 0..100 {
            set.insert(k);
        }
        let seen = sweep_recording(&mut set, 50, |_| true);
        let distinct: HashSet<u32> = seen.iter().copied().collect();
        assert_eq!(distinct.len(), 100, "every key checked within two rounds");
    }

    /// The test of `len` checks, for one split point.
    fn each_key_checked_once_and_exactly_the_refused_dropped<const SPLIT: usize>() {
        let mut set: SplitSet<u32, SPLIT> = (0..1_000).collect();
        let mut seen = sweep_recording(&mut set, 250, |k| k % 3 != 0);
        seen.sort();
        assert_eq!(seen, (0..1_000).collect::<Vec<_>>(), "split at {SPLIT}");
        let mut kept: Vec<u32> = set.iter().copied().collect();
        kept.sort();
        assert_eq!(kept, (0..1_000).filter(|k| k % 3 != 0).collect::<Vec<_>>());
        assert_eq!(set.len(), kept.len());
    }

    #[test]
    fn len_checks_see_each_key_once_and_drop_exactly_the_refused() {
        each_key_checked_once_and_exactly_the_refused_dropped::<16>();
        each_key_checked_once_and_exactly_the_refused_dropped::<100_000>();
    }
}
