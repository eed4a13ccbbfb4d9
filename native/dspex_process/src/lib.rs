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

mod ancestry;
pub mod batch_queue;
pub mod cgroup;
pub mod cgroup_v1;
pub mod classify;
mod error;
pub mod guardian;
mod identity;
mod key;
pub mod markers;
pub mod metrics;
mod pid;
pub mod policy;
mod proc_facts;
#[cfg(test)]
mod proptests;
mod registry;
pub mod scan;
mod split_set;
mod sys;
pub mod terminate;
#[cfg(test)]
mod test_util;

pub use error::{Error, Result};
pub use identity::{PinnedProcess, PinnedRead, ProcessIdentity};
pub use key::KeyBytes;
pub use pid::Pid;
pub use proc_facts::{
    is_beam, is_port_child_of, is_port_helper_of, port_child_start, proc_stat_readable_by_all,
    read_uid, uptime_ticks, ProcessFacts, ProcessState, Stat, PORT_HELPER,
};
pub use registry::{DetachedKeys, Registry, RegistryStats, WorkerEntry};

pub use sys::lower_thread_priority;
