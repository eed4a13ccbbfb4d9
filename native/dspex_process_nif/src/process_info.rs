//! What the native side knows of this VM and of single processes: its identity, the port
//! helper check, capabilities, start times, metrics.

use crate::{atom, CoreError};
use dspex_process::markers::own_pid_namespace;
use dspex_process::terminate;
use dspex_process::{Pid, ProcessIdentity};
use rustler::{Atom, Env, NifMap};

/// This VM's identity: its OS pid and start time.
pub(crate) fn this_beam() -> Option<ProcessIdentity> {
    Pid::from_kernel(std::process::id() as i32).and_then(|pid| ProcessIdentity::of(pid).ok())
}

/// `{os_pid, start_time, pid_namespace}` of this VM, for the ownership markers.
#[rustler::nif]
fn beam_identity() -> Option<(i32, u64, Option<u64>)> {
    this_beam().map(|id| (id.pid.as_raw(), id.start_time, own_pid_namespace()))
}

/// Whether `pid` is a port program of this VM: its parent is the port helper
/// (`erl_child_setup`) whose parent is this VM. Guards a registration against a pid that
/// was recycled before it could be read.
/// This VM's port helper (`erl_child_setup`): one per VM for its whole life, found from the
/// first port program's parent and kept.
static PORT_HELPER: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

/// Whether a process whose parent is `ppid` is a port program of this VM. After the first
/// port program, a comparison; before it, one read of the parent's `/proc/PID/stat`.
pub(crate) fn is_port_child_by_parent(ppid: i32) -> bool {
    if let Some(helper) = PORT_HELPER.get() {
        return *helper == ppid;
    }
    let Some(beam) = this_beam() else {
        return false;
    };
    match dspex_process::Stat::read(ppid) {
        Ok(parent)
            if dspex_process::is_port_helper_of(&parent.comm, parent.ppid, beam.pid.as_raw()) =>
        {
            *PORT_HELPER.get_or_init(|| ppid) == ppid
        }
        _ => false,
    }
}

/// Whether `{pid, start_time}` is, now, a port program of this VM (its parent is this VM's
/// port helper, and its start time is the one given).
#[rustler::nif(name = "port_child_identity?")]
fn port_child_identity(pid: i64, start_time: u64) -> bool {
    match (this_beam(), i32::try_from(pid)) {
        (Some(beam), Ok(pid)) => {
            dspex_process::port_child_start(pid, beam.pid.as_raw()) == Some(start_time)
        }
        _ => false,
    }
}

#[rustler::nif(name = "port_child?")]
fn port_child(pid: i64) -> bool {
    match (this_beam(), i32::try_from(pid)) {
        (Some(beam), Ok(pid)) => dspex_process::is_port_child_of(pid, beam.pid.as_raw()),
        _ => false,
    }
}

#[derive(NifMap)]
struct Capabilities {
    proc_filesystem: bool,
    pidfd: bool,
    environ_readable: bool,
    /// Where cgroup2 is mounted (found in /proc/self/mountinfo), if anywhere.
    cgroup2_mount: Option<String>,
    /// Where the cgroup v1 hierarchies of the limit controllers (memory, pids, cpu) are
    /// mounted, by controller (hybrid mode); empty on a unified host.
    cgroup_v1_mounts: std::collections::HashMap<String, String>,
}

/// What the native side can use on this machine. (The containment mode in use is
/// `containment_status/0`; the Elixir side merges both.)
#[rustler::nif(schedule = "DirtyIo")]
fn capabilities() -> Capabilities {
    Capabilities {
        proc_filesystem: std::path::Path::new("/proc/self/stat").exists(),
        pidfd: terminate::pidfd_supported(),
        environ_readable: std::fs::read("/proc/self/environ").is_ok(),
        cgroup2_mount: dspex_process::cgroup::Hierarchy::find()
            .map(|h| h.mount.display().to_string()),
        cgroup_v1_mounts: dspex_process::cgroup_v1::mounts()
            .iter()
            .flat_map(|m| {
                dspex_process::cgroup_v1::CONTROLLERS
                    .iter()
                    .filter(|c| m.has(c))
                    .map(|c| (c.to_string(), m.hierarchy.mount.display().to_string()))
            })
            .collect(),
    }
}

/// The start time of `pid` now: one small read of `/proc/PID/stat`.
#[rustler::nif]
fn process_start_time(pid: i64) -> Result<u64, CoreError> {
    Ok(Pid::new(pid).and_then(ProcessIdentity::of)?.start_time)
}

#[derive(NifMap)]
struct Metrics {
    rss_bytes: u64,
    cpu_time_ms: u64,
    threads: u64,
    state: Atom,
    age_ms: u64,
}

/// Metrics of each `{pid, start_time}`, in order; `nil` where the process is gone or the
/// pid names another process now. One `/proc/PID/stat` read per process.
#[rustler::nif(schedule = "DirtyIo")]
fn process_metrics(env: Env, targets: Vec<(i64, u64)>) -> Vec<Option<Metrics>> {
    let (identities, valid) = crate::termination::identities(&targets);
    let mut read = dspex_process::metrics::read_metrics(&valid).into_iter();
    identities
        .iter()
        .map(|id| {
            id.and_then(|_| read.next().flatten()).map(|m| Metrics {
                rss_bytes: m.rss_bytes,
                cpu_time_ms: m.cpu_time_ms,
                threads: m.threads,
                state: atom(env, m.state.name()),
                age_ms: m.age_ms,
            })
        })
        .collect()
}

/// The ownership markers `DSPexProcess.Worker` stamps on a worker's environment, as
/// `{name, value}` pairs: the names live in the core (`dspex_process::markers`), with the
/// parser that reads them back.
#[rustler::nif]
fn marker_env(
    beam_pid: i64,
    beam_start: u64,
    pid_ns: Option<u64>,
    run_id: String,
    worker_id: String,
    fingerprint: String,
) -> Result<Vec<(&'static str, String)>, CoreError> {
    let markers = dspex_process::markers::Markers {
        owner: ProcessIdentity {
            pid: Pid::new(beam_pid)?,
            start_time: beam_start,
        },
        pid_ns,
        run_id: Some(run_id),
        worker_id: Some(worker_id),
        fingerprint: Some(fingerprint),
    };
    Ok(markers.to_env())
}
