//! Pure Rust core of `dspex_process`.
//!
//! Nothing here knows about the BEAM: the NIF crate converts terms and calls in, the CLI
//! calls in directly. The split follows procfs (pure core, thin I/O callers).
//!
//! - [`Pid`] and [`ProcessIdentity`]: a process is its pid *and* its start time, so a
//!   recycled pid is never mistaken for the process that had it before.
//! - [`ProcessFacts`]: one process's facts read from `/proc` (start time, state, ppid,
//!   pgid, uid, argv).
//! - [`Registry`]: the concurrent worker registry, generic over the key, the owner handle
//!   and the monitor handle, so the NIF can back it with Erlang terms and pids.

pub mod classify;
mod error;
pub mod guardian;
mod identity;
pub mod markers;
pub mod metrics;
mod proc_facts;
#[cfg(test)]
mod proptests;
mod registry;
pub mod scan;
pub mod terminate;
#[cfg(test)]
mod test_util;

pub use error::{Error, Result};
pub use identity::{Pid, ProcessIdentity};
pub use proc_facts::{read_uid, ProcessFacts, ProcessState, Stat};
pub use registry::{DetachedKeys, Registry, RegistryStats, WorkerEntry};

/// Lowers the calling thread's CPU priority (nice 10). The scan and termination threads
/// do bursts of `/proc` work; on a small machine they must not take the CPU from the VM's
/// schedulers, which run the application's own processes.
pub fn lower_thread_priority() {
    // SAFETY: plain syscalls on the calling thread; failure leaves the priority unchanged.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}
