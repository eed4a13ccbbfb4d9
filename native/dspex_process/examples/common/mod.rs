//! What the registry examples share: workers registered as the NIF registers DSPex's.

// Each example uses some of these.
#![allow(dead_code)]

use dspex_process::{Pid, ProcessIdentity, Registry, WorkerEntry};
use std::hash::Hash;

/// A binary worker id as the NIF keys it: a zero byte, then the id's bytes.
pub fn binary_id(id: &str) -> Vec<u8> {
    [&[0u8][..], id.as_bytes()].concat()
}

/// The first command-line argument as a count, else `default`.
pub fn count_arg(default: usize) -> usize {
    std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// An entry for owner handle `owner`, with a real-looking OS process or none.
pub fn worker_entry<K>(
    registry: &Registry<K, u64>,
    owner: u64,
    with_process: bool,
    fingerprint: &str,
) -> WorkerEntry<u64>
where
    K: Clone + Eq + Hash,
{
    WorkerEntry {
        owner,
        python: with_process.then(|| ProcessIdentity {
            pid: Pid::new(4_000_000).expect("a valid pid"),
            start_time: 123_456,
        }),
        fingerprint: registry.intern(fingerprint),
        registered_at: 1_795_690_000,
        alive: false,
        port_child: false,
    }
}

/// Registers worker `i` under `key` for owner handle `0x1000 + i` (one owner per worker, as
/// in DSPex's pool), with a real-looking OS process and `fingerprint`.
pub fn register_worker<K>(registry: &Registry<K, u64>, key: K, i: usize, fingerprint: &str)
where
    K: Clone + Eq + Hash,
{
    let entry = worker_entry(registry, 0x1000 + i as u64, true, fingerprint);
    registry.register(key, entry, |_| true);
}
