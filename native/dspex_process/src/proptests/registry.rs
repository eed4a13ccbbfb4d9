//! The registry core against a model: random sequences of registrations (re-registrations
//! of an id included), unregistrations, owner deaths, sweeps and every query, each answer
//! compared with a plain map — including the OS process a re-registration releases and the
//! entries an unregistration or an owner's death hands back (what the library then ends).
//! Owners can be dead when they register, as on the BEAM.

use super::check;
use crate::identity::ProcessIdentity;
use crate::pid::Pid;
use crate::{Registry, RegistryStats, WorkerEntry};
use proptest::collection::vec;
use proptest::prelude::*;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

type Key = u8;
type Owner = u8;

#[derive(Debug, Clone)]
enum Op {
    Register {
        key: Key,
        owner: Owner,
        python: Option<(i64, u64)>,
        fingerprint: u8,
    },
    Unregister(Key),
    /// The owner exits; the registry hears it through `owner_down` (which the NIF's monitor
    /// calls; called here even for owners it does not watch, where it must do nothing). It
    /// returns the entries that left.
    Dies(Owner),
    /// The owner's death handled in two steps, as the NIF does for an owner of many
    /// entries: `detach_owner` at once, `remove_detached` later (on a thread). Between the
    /// two, the dead owner's handle registers `key` (a registration the monitor refuses).
    DiesSlowly {
        owner: Owner,
        key: Key,
        fingerprint: u8,
    },
    RemoveDead,
    Get(Key),
    Entries,
    ByFingerprint(u8),
    Dead,
    ActivePython,
    Stats,
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..6u8;
    let owner = 0..4u8;
    let python = proptest::option::of((2..40i64, 0..3u64));
    prop_oneof![
        8 => (key.clone(), owner.clone(), python, 0..3u8).prop_map(|(key, owner, python, fingerprint)| Op::Register {
            key,
            owner,
            python,
            fingerprint
        }),
        3 => key.clone().prop_map(Op::Unregister),
        2 => owner.clone().prop_map(Op::Dies),
        1 => (owner, key.clone(), 0..3u8).prop_map(|(owner, key, fingerprint)| Op::DiesSlowly {
            owner,
            key,
            fingerprint
        }),
        1 => Just(Op::RemoveDead),
        2 => key.prop_map(Op::Get),
        1 => Just(Op::Entries),
        1 => (0..3u8).prop_map(Op::ByFingerprint),
        1 => Just(Op::Dead),
        1 => Just(Op::ActivePython),
        1 => Just(Op::Stats),
    ]
}

/// What the registry should hold: entries, the owners it watches, the owners that died.
#[derive(Default)]
struct Model {
    entries: BTreeMap<Key, WorkerEntry<Owner>>,
    watched: BTreeSet<Owner>,
    dead: BTreeSet<Owner>,
}

impl Model {
    fn select(&self, keep: impl Fn(&WorkerEntry<Owner>) -> bool) -> Vec<(Key, WorkerEntry<Owner>)> {
        self.entries
            .iter()
            .filter(|(_, e)| keep(e))
            .map(|(k, e)| (*k, e.clone()))
            .collect()
    }
}

fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

fn by_key(mut items: Vec<(Key, WorkerEntry<Owner>)>) -> Vec<(Key, WorkerEntry<Owner>)> {
    items.sort_by_key(|(k, _)| *k);
    items
}

fn identity((pid, start_time): (i64, u64)) -> ProcessIdentity {
    ProcessIdentity {
        pid: Pid::new(pid).unwrap(),
        start_time,
    }
}

#[test]
fn the_registry_answers_as_the_model_says() {
    check("registry: model", 1_000, vec(op(), 1..80), |ops| {
        let reg: Registry<Key, Owner> = Registry::new();
        let mut model = Model::default();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Register {
                    key,
                    owner,
                    python,
                    fingerprint,
                } => {
                    let entry = WorkerEntry {
                        owner,
                        python: python.map(identity),
                        fingerprint: format!("fp{fingerprint}").into(),
                        registered_at: step as u64,
                        alive: false,
                        port_child: false,
                    };
                    // The registry watches each owner once; a dead owner cannot be watched.
                    let monitored = RefCell::new(Vec::new());
                    let left = reg.register(key, entry.clone(), |o| {
                        monitored.borrow_mut().push(*o);
                        !model.dead.contains(o)
                    });
                    // The OS process of the replaced entry has left, unless it is the new one.
                    let expected_left = model
                        .entries
                        .get(&key)
                        .and_then(|old| old.python)
                        .filter(|old| Some(*old) != entry.python);
                    prop_assert_eq!(left.and_then(|e| e.python), expected_left, "step {}", step);
                    let watched = model.watched.contains(&owner);
                    let expected_calls = if watched { vec![] } else { vec![owner] };
                    prop_assert_eq!(monitored.into_inner(), expected_calls, "step {}", step);
                    let alive = watched || !model.dead.contains(&owner);
                    if alive {
                        model.watched.insert(owner);
                    }
                    model.entries.insert(key, WorkerEntry { alive, ..entry });
                }
                Op::Unregister(key) => {
                    prop_assert_eq!(reg.unregister(&key), model.entries.remove(&key));
                }
                Op::Dies(owner) => {
                    model.dead.insert(owner);
                    let expected = if model.watched.remove(&owner) {
                        let gone = model.select(|e| e.owner == owner && e.alive);
                        model.entries.retain(|_, e| e.owner != owner || !e.alive);
                        gone
                    } else {
                        Vec::new()
                    };
                    prop_assert_eq!(by_key(reg.owner_down(&owner)), expected, "step {}", step);
                }
                Op::DiesSlowly {
                    owner,
                    key,
                    fingerprint,
                } => {
                    model.dead.insert(owner);
                    let watched = model.watched.remove(&owner);
                    let detached = reg.detach_owner(&owner);
                    prop_assert_eq!(detached.is_some(), watched, "step {}", step);
                    let late = WorkerEntry {
                        owner,
                        python: None,
                        fingerprint: format!("fp{fingerprint}").into(),
                        registered_at: step as u64,
                        alive: false,
                        port_child: false,
                    };
                    let expected_left = model.entries.get(&key).and_then(|old| old.python);
                    let mut called = false;
                    let left = reg.register(key, late.clone(), |_| {
                        called = true;
                        false
                    });
                    prop_assert!(called, "a detached owner is monitored again, step {}", step);
                    prop_assert_eq!(left.and_then(|e| e.python), expected_left, "step {}", step);
                    model.entries.insert(key, late);
                    let expected = if watched {
                        let gone = model.select(|e| e.owner == owner && e.alive);
                        model.entries.retain(|_, e| e.owner != owner || !e.alive);
                        gone
                    } else {
                        Vec::new()
                    };
                    let removed = match detached {
                        Some(keys) => reg.remove_detached(&owner, keys),
                        None => Vec::new(),
                    };
                    prop_assert_eq!(by_key(removed), expected, "step {}", step);
                }
                Op::RemoveDead => {
                    let expected: Vec<Key> = model
                        .select(|e| !e.alive)
                        .into_iter()
                        .map(|(k, _)| k)
                        .collect();
                    model.entries.retain(|_, e| e.alive);
                    prop_assert_eq!(sorted(reg.remove_dead()), expected);
                }
                Op::Get(key) => prop_assert_eq!(reg.get(&key), model.entries.get(&key).cloned()),
                Op::Entries => prop_assert_eq!(by_key(reg.entries()), model.select(|_| true)),
                Op::ByFingerprint(fp) => {
                    let fp = format!("fp{fp}");
                    prop_assert_eq!(
                        by_key(reg.by_fingerprint(&fp)),
                        model.select(|e| *e.fingerprint == fp)
                    );
                }
                Op::Dead => prop_assert_eq!(by_key(reg.dead()), model.select(|e| !e.alive)),
                Op::ActivePython => {
                    let key = |i: &ProcessIdentity| (i.pid, i.start_time);
                    let mut expected: Vec<_> = model
                        .entries
                        .values()
                        .filter(|e| e.alive)
                        .filter_map(|e| e.python)
                        .collect();
                    let mut answer = reg.active_python();
                    expected.sort_by_key(key);
                    answer.sort_by_key(key);
                    prop_assert_eq!(answer, expected);
                }
                Op::Stats => {
                    let alive = model.entries.values().filter(|e| e.alive).count();
                    let expected = RegistryStats {
                        total_registered: model.entries.len(),
                        alive_workers: alive,
                        dead_workers: model.entries.len() - alive,
                        active_python_pids: model
                            .entries
                            .values()
                            .filter(|e| e.alive && e.python.is_some())
                            .count(),
                    };
                    prop_assert_eq!(reg.stats(), expected);
                }
            }
            // After every step: the same size, and exactly the watched owners.
            prop_assert_eq!(reg.len(), model.entries.len());
            prop_assert_eq!(reg.is_empty(), model.entries.is_empty());
            prop_assert_eq!(reg.watched_owners(), model.watched.len());
            // The fingerprint index holds exactly the fingerprints of the entries, and the
            // entries share one copy of each.
            let fingerprints: BTreeSet<&str> =
                model.entries.values().map(|e| &*e.fingerprint).collect();
            prop_assert_eq!(reg.fingerprint_count(), fingerprints.len());
            for owner in 0..4u8 {
                let owned = model
                    .entries
                    .values()
                    .filter(|e| e.owner == owner && e.alive)
                    .count();
                prop_assert_eq!(reg.owned_by(&owner), owned, "owner {}", owner);
            }
        }
        Ok(())
    });
}
