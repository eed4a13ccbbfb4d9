//! What the registry examples share: workers registered as the NIF registers DSPex's.

use dspex_process::{Pid, ProcessIdentity, Registry, WorkerEntry};
use std::hash::Hash;

/// Registers worker `i` under `key` for owner handle `0x1000 + i` (one owner per worker, as
/// in DSPex's pool), with a real-looking OS process and `fingerprint`.
pub fn register_worker<K>(registry: &Registry<K, u64>, key: K, i: usize, fingerprint: &str)
where
    K: Clone + Eq + Hash,
{
    let entry = WorkerEntry {
        owner: 0x1000 + i as u64,
        python: Some(ProcessIdentity {
            pid: Pid::new(4_000_000).expect("a valid pid"),
            start_time: 123_456,
        }),
        fingerprint: registry.intern(fingerprint),
        registered_at: 1_795_690_000,
        alive: false,
        port_child: false,
    };
    registry.register(key, entry, |_| true);
}
