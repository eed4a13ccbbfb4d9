//! Lookup and removal in the registry core, by key type, in one run:
//! `cargo run --release --example registry_lookup -p dspex_process`.
//!
//! Fills a registry with 10,000 workers the way the NIF does (one owner and one fingerprint
//! each), then times `get_with` and `remove` over the keys in a random order, each pass
//! after evicting the caches; seven rounds, medians printed. The keys are `KeyBytes` (what
//! the NIF uses: short ids inline) against `Arc<[u8]>` (the key behind a pointer, as
//! before), so the two rows compare the same work on the same machine at the same time.

mod common;

use dspex_process::{KeyBytes, Registry};
use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

const WORKERS: usize = 10_000;
const ROUNDS: usize = 7;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// What a VM does between two registry calls leaves little of the table in cache.
fn evict_caches() {
    let evict = vec![1u8; 16 << 20];
    std::hint::black_box(evict.iter().map(|b| u64::from(*b)).sum::<u64>());
}

/// Medians of ns per `get_with` and per `remove`.
fn time<K>(make: impl Fn(&[u8]) -> K, ids: &[Vec<u8>], fingerprints: &[String]) -> (f64, f64)
where
    K: Clone + Eq + Hash + Borrow<[u8]>,
{
    let keys: Vec<K> = ids.iter().map(|id| make(id)).collect();
    let (mut gets, mut removes) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let registry: Registry<K, u64> = Registry::new();
        for (i, key) in keys.iter().enumerate() {
            common::register_worker(&registry, key.clone(), i, &fingerprints[i]);
        }
        evict_caches();
        let started = Instant::now();
        for id in ids {
            std::hint::black_box(registry.get_with(&id[..], |e| e.owner));
        }
        gets.push(started.elapsed().as_nanos() as f64 / ids.len() as f64);
        evict_caches();
        let started = Instant::now();
        for id in ids {
            std::hint::black_box(registry.remove(&id[..]));
        }
        removes.push(started.elapsed().as_nanos() as f64 / ids.len() as f64);
    }
    (median(gets), median(removes))
}

fn main() {
    // Binary ids as the NIF keeps them: a zero byte, then the id.
    let mut ids: Vec<Vec<u8>> = (0..WORKERS)
        .map(|i| common::binary_id(&format!("worker_{i}")))
        .collect();
    // A fixed shuffle (xorshift), so that the walk is not in insertion order.
    let mut x = 0x2545_f491_u64;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let fingerprints: Vec<String> = (0..WORKERS)
        .map(|i| format!("dspex_worker_worker_{i}_1795690000000000000_123456"))
        .collect();
    // Alternated, so that neither side always runs first (on fresh pages, a cold cache).
    let (mut inline, mut shared) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for _ in 0..3 {
        let (get, remove) = time(KeyBytes::new, &ids, &fingerprints);
        inline.0.push(get);
        inline.1.push(remove);
        let (get, remove) = time(|id: &[u8]| -> Arc<[u8]> { id.into() }, &ids, &fingerprints);
        shared.0.push(get);
        shared.1.push(remove);
    }
    println!("| key | get_with (ns) | remove (ns) |");
    println!("|---|---|---|");
    let row = |name: &str, (get, remove): (Vec<f64>, Vec<f64>)| {
        println!("| {name} | {:.0} | {:.0} |", median(get), median(remove));
    };
    row("KeyBytes (inline)", inline);
    row("Arc<[u8]> (behind a pointer)", shared);
}
