//! The slowest single registration while a registry grows:
//! `cargo run --release --example registry_growth -p dspex_process -- [N]` (N = 1,000,000).
//!
//! A registration runs on a VM scheduler, so no one call may take long; what can is a table
//! outgrowing its allocation, which rehashes what it holds. Three ways to grow to N
//! workers: one owner for all of them (its record grows), one fingerprint for all (its
//! index record grows), and one owner and one fingerprint each (only the sharded maps
//! grow). Prints the slowest call and how many took over 1 and 2 ms, in wall time, and the
//! slowest in the thread's CPU time: on a shared machine the OS may stall the thread for
//! milliseconds in any call, which the wall time counts and the CPU time does not.

mod common;

use dspex_process::{KeyBytes, Registry};
use rustix::time::{clock_gettime, ClockId};
use std::time::Instant;

/// This thread's CPU time, in ns.
fn thread_cpu_ns() -> u128 {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    t.tv_sec as u128 * 1_000_000_000 + t.tv_nsec as u128
}

fn grow(name: &str, n: usize, one_owner: bool, one_fingerprint: bool) {
    let registry: Registry<KeyBytes, u64> = Registry::new();
    let (mut worst, mut worst_cpu, mut over_1ms, mut over_2ms) = (0u128, 0u128, 0, 0);
    for i in 0..n {
        let key = KeyBytes::new(&common::binary_id(&format!("worker_{i}")));
        let fingerprint = if one_fingerprint {
            "dspex_pool".to_string()
        } else {
            format!("dspex_worker_{i}_1795690000000000000")
        };
        let owner = if one_owner { 1 } else { i as u64 };
        let entry = common::worker_entry(&registry, owner, false, &fingerprint);
        let (started, started_cpu) = (Instant::now(), thread_cpu_ns());
        registry.register(key, entry, |_| true);
        let ns = started.elapsed().as_nanos();
        worst = worst.max(ns);
        worst_cpu = worst_cpu.max(thread_cpu_ns() - started_cpu);
        over_1ms += usize::from(ns > 1_000_000);
        over_2ms += usize::from(ns > 2_000_000);
    }
    println!(
        "| {name} | {:.2} | {over_1ms} | {over_2ms} | {:.2} |",
        worst as f64 / 1e6,
        worst_cpu as f64 / 1e6
    );
}

fn main() {
    let n = common::count_arg(1_000_000);
    println!(
        "| {n} registrations | slowest call (ms) | over 1 ms | over 2 ms | slowest call, CPU time (ms) |"
    );
    println!("|---|---|---|---|---|");
    grow("one owner", n, true, false);
    grow("one fingerprint", n, false, true);
    grow("one owner and one fingerprint each", n, false, false);
}
