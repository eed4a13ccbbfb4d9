//! Bytes per registry entry, counted exactly: a global allocator that adds up what the
//! registry asks the heap for. Used by `bench/run.exs` (row "memory per entry").
//!
//! `cargo run --release --example registry_memory -- N` registers N workers the way the
//! NIF does (binary worker ids kept as a zero byte and their bytes, an 8-byte owner handle,
//! a real-looking pid and start time), one owner and one fingerprint per worker as in
//! DSPex's pool (the worst case: nothing is shared), and prints
//! `requested=<bytes per entry> footprint=<bytes per entry>`: `requested` is what the code
//! asked for, `footprint` adds what glibc's malloc really takes for each block (its usable
//! size plus its 8-byte header). The VM's own monitor record per owner is measured by the
//! benchmark itself.

mod common;

use dspex_process::{KeyBytes, Registry};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static REQUESTED: AtomicIsize = AtomicIsize::new(0);
static FOOTPRINT: AtomicIsize = AtomicIsize::new(0);

fn footprint(ptr: *mut u8) -> isize {
    // SAFETY: `ptr` is a live block of the system allocator (glibc malloc).
    (unsafe { libc::malloc_usable_size(ptr.cast()) } + 8) as isize
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counts are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        if !ptr.is_null() {
            REQUESTED.fetch_add(layout.size() as isize, Ordering::Relaxed);
            FOOTPRINT.fetch_add(footprint(ptr), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        REQUESTED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        FOOTPRINT.fetch_sub(footprint(ptr), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let n = common::count_arg(50_000);
    // Made before counting: the NIF receives them as terms.
    let ids: Vec<String> = (0..n).map(|i| format!("worker_{i}")).collect();
    let fingerprints: Vec<String> = (0..n)
        .map(|i| format!("dspex_worker_{i}_1795690000000000000"))
        .collect();

    let before = (
        REQUESTED.load(Ordering::SeqCst),
        FOOTPRINT.load(Ordering::SeqCst),
    );
    let registry: Registry<KeyBytes, u64> = Registry::new();
    for i in 0..n {
        common::register_worker(
            &registry,
            KeyBytes::new(&common::binary_id(&ids[i])),
            i,
            &fingerprints[i],
        );
    }
    let requested = REQUESTED.load(Ordering::SeqCst) - before.0;
    let footprint = FOOTPRINT.load(Ordering::SeqCst) - before.1;
    assert_eq!(registry.len(), n);
    println!(
        "requested={:.1} footprint={:.1}",
        requested as f64 / n as f64,
        footprint as f64 / n as f64
    );
}
