//! Orphan detection and termination. Both scan `/proc` or wait, so both run on dirty I/O
//! schedulers.

use crate::atom;
use crate::registry::RegistryResource;
use dspex_process::classify::{self, Class, Viewpoint};
use dspex_process::markers::own_pid_namespace;
use dspex_process::policy;
use dspex_process::scan::{MarkerRead, Pattern};
use dspex_process::terminate::{self, Outcome, TerminateOptions};
use dspex_process::{Pid, ProcessIdentity, Stat};
use rustler::{Atom, Binary, Encoder, Env, NifMap, OwnedEnv, ResourceArc, Term};
use std::collections::HashSet;
use std::time::Duration;

mod atoms {
    rustler::atoms! { ok, error, graceful, force_killed, already_gone, still_alive, signal_failed, unverifiable, invalid_pattern, dspex_terminated }
}

#[derive(NifMap)]
struct Owner {
    pid: i32,
    start_time: u64,
    run_id: Option<String>,
    worker_id: Option<String>,
    fingerprint: Option<String>,
}

#[derive(NifMap)]
struct Detected {
    pid: i32,
    start_time: u64,
    ppid: i32,
    pgid: i32,
    uid: u32,
    state: Atom,
    cmdline: String,
    class: Atom,
    reason: Option<Atom>,
    /// The reason this process is a target under the caller's selection, if it is one.
    target: Option<Atom>,
    owner: Option<Owner>,
    markers_readable: bool,
    age_ms: u64,
}

/// The caller's selection (`include_unmanaged`, `reasons`), decoded for the core's policy.
#[derive(NifMap)]
struct SelectionArg {
    include_unmanaged: bool,
    reasons: Vec<String>,
}

impl SelectionArg {
    fn into_policy(self) -> policy::Selection {
        policy::Selection {
            include_unmanaged: self.include_unmanaged,
            reasons: Some(self.reasons.into_iter().collect()),
        }
    }
}

/// This VM's identity: its OS pid and start time.
pub(crate) fn this_beam() -> Option<ProcessIdentity> {
    Pid::from_kernel(std::process::id() as i32).and_then(|pid| ProcessIdentity::of(pid).ok())
}

/// Scans for `patterns` and classifies every match as seen from this VM: the live workers
/// of every running registry and the OS processes of this VM's open ports are in use.
#[rustler::nif(schedule = "DirtyIo")]
fn detect<'a>(
    env: Env<'a>,
    registries: Vec<ResourceArc<RegistryResource>>,
    port_pids: Vec<i64>,
    patterns: Vec<Binary>,
    min_age_ms: u64,
    selection: SelectionArg,
) -> Term<'a> {
    let selection = selection.into_policy();
    let pattern = match Pattern::new(&patterns.iter().map(|b| b.as_slice()).collect::<Vec<_>>()) {
        Ok(p) => p,
        Err(_) => return (atoms::error(), atoms::invalid_pattern()).encode(env),
    };
    let registered: HashSet<ProcessIdentity> =
        registries.iter().flat_map(|r| r.live_python()).collect();
    let view = Viewpoint {
        beam: this_beam(),
        registered,
        port_pids: port_pids
            .into_iter()
            .filter_map(|p| Pid::new(p).ok())
            .collect(),
        min_age: Duration::from_millis(min_age_ms),
    };
    let out: Vec<Detected> = classify::detect(&pattern, view)
        .into_iter()
        .map(|d| {
            let facts = d.candidate.facts;
            let owner = d.candidate.markers.markers().map(|m| Owner {
                pid: m.owner.pid.as_raw(),
                start_time: m.owner.start_time,
                run_id: m.run_id.clone(),
                worker_id: m.worker_id.clone(),
                fingerprint: m.fingerprint.clone(),
            });
            let reason = match d.class {
                Class::Orphan(r) => Some(atom(env, r.name())),
                _ => None,
            };
            let target = selection.target_reason(d.class).map(|r| atom(env, r));
            Detected {
                pid: facts.pid.as_raw(),
                start_time: facts.start_time,
                ppid: facts.ppid,
                pgid: facts.pgid,
                uid: facts.uid,
                state: atom(env, facts.state.name()),
                cmdline: facts.argv.join(" "),
                class: atom(env, d.class.name()),
                reason,
                target,
                owner,
                markers_readable: !matches!(d.candidate.markers, MarkerRead::Unreadable),
                age_ms: d.age_ms,
            }
        })
        .collect();
    (atoms::ok(), out).encode(env)
}

/// `{pid, start_time}` pairs as identities: `None` where the pid cannot name a target
/// (<= 1, beyond i32), and the valid ones alone, in order.
fn identities(targets: &[(i64, u64)]) -> (Vec<Option<ProcessIdentity>>, Vec<ProcessIdentity>) {
    let parsed: Vec<Option<ProcessIdentity>> = targets
        .iter()
        .map(|&(pid, start_time)| {
            Pid::new(pid)
                .ok()
                .map(|pid| ProcessIdentity { pid, start_time })
        })
        .collect();
    let valid = parsed.iter().flatten().copied().collect();
    (parsed, valid)
}

/// Starts terminating `targets` (`{pid, start_time}` pairs) in parallel with one shared
/// grace, on a thread of its own: waiting for the grace must not hold a scheduler, not even
/// a dirty one. Returns at once; the caller then receives
/// `{:dspex_terminated, tag, outcomes}`, one outcome per target, in order.
#[rustler::nif]
fn terminate_start(
    env: Env,
    targets: Vec<(i64, u64)>,
    grace_ms: u64,
    kill_wait_ms: u64,
    kill_group: bool,
    allow_other_users: bool,
    tag: u64,
) -> Atom {
    let caller = env.pid();
    let options = TerminateOptions {
        grace: Duration::from_millis(grace_ms),
        kill_wait: Duration::from_millis(kill_wait_ms),
        kill_group,
        allow_other_users,
    };
    std::thread::spawn(move || {
        dspex_process::lower_thread_priority();
        // Invalid pids (<= 1, > i32::MAX) are answered without reaching the terminator.
        let (parsed, valid) = identities(&targets);
        // Each target's leaf in this VM's per-VM cgroup (and any cgroup of a dead VM) goes
        // with it.
        let own = crate::containment::own_cgroup();
        let outcomes = terminate::terminate_contained(&valid, &options, own.as_ref());
        let _ = OwnedEnv::new().send_and_clear(&caller, |env| {
            let mut outcomes = outcomes.into_iter();
            let encoded: Vec<Term> = parsed
                .iter()
                .map(|p| match p {
                    None => (atoms::error(), atom(env, "invalid_pid")).encode(env),
                    Some(_) => encode_outcome(env, outcomes.next().unwrap_or(Outcome::AlreadyGone)),
                })
                .collect();
            (atoms::dspex_terminated(), tag, encoded).encode(env)
        });
    });
    atoms::ok()
}

fn encode_outcome(env: Env, outcome: Outcome) -> Term {
    match outcome {
        Outcome::Graceful => (atoms::ok(), atoms::graceful()).encode(env),
        Outcome::ForceKilled => (atoms::ok(), atoms::force_killed()).encode(env),
        Outcome::AlreadyGone => (atoms::ok(), atoms::already_gone()).encode(env),
        Outcome::StillAlive => (atoms::error(), atoms::still_alive()).encode(env),
        Outcome::Refused(r) => (atoms::error(), atom(env, r.name())).encode(env),
        Outcome::SignalFailed(errno) => {
            (atoms::error(), (atoms::signal_failed(), errno)).encode(env)
        }
        Outcome::Unverifiable(errno) => {
            (atoms::error(), (atoms::unverifiable(), errno)).encode(env)
        }
    }
}

/// The processes in the cgroups of dead VMs (reason `:cgroup_owner_dead`), whatever their
/// argv, with the same fields as `detect/4`; the owner is the dead VM.
#[rustler::nif(schedule = "DirtyIo")]
fn detect_cgroup_orphans(env: Env, selection: SelectionArg) -> Vec<Detected> {
    let target = selection
        .into_policy()
        .admits(policy::CGROUP_OWNER_DEAD)
        .then(|| atom(env, policy::CGROUP_OWNER_DEAD));
    let found = dspex_process::cgroup::cgroup_orphans(&dspex_process::cgroup::dead_vm_cgroups());
    found
        .into_iter()
        .map(|o| {
            let facts = o.facts;
            Detected {
                pid: facts.pid.as_raw(),
                start_time: facts.start_time,
                ppid: facts.ppid,
                pgid: facts.pgid,
                uid: facts.uid,
                state: atom(env, facts.state.name()),
                cmdline: facts.argv.join(" "),
                class: atom(env, "orphan"),
                reason: Some(atom(env, policy::CGROUP_OWNER_DEAD)),
                target,
                owner: Some(Owner {
                    pid: o.owner.vm.pid.as_raw(),
                    start_time: o.owner.vm.start_time,
                    run_id: None,
                    worker_id: None,
                    fingerprint: None,
                }),
                markers_readable: true,
                age_ms: o.age_ms,
            }
        })
        .collect()
}

/// Removes the per-VM cgroups of dead VMs that are empty (and their empty leaves).
/// Returns how many were removed.
#[rustler::nif(schedule = "DirtyIo")]
fn remove_dead_vm_cgroups() -> usize {
    dspex_process::cgroup::dead_vm_cgroups()
        .iter()
        .filter(|vm| vm.as_unit().populated() != Some(true) && vm.remove_empty())
        .count()
}

/// `{os_pid, start_time, pid_namespace}` of this VM, for the ownership markers.
#[rustler::nif]
fn beam_identity() -> Option<(i32, u64, Option<u64>)> {
    this_beam().map(|id| (id.pid.as_raw(), id.start_time, own_pid_namespace()))
}

/// Whether `pid` is a port program of this VM: its parent is the port helper
/// (`erl_child_setup`) whose parent is this VM. Guards a registration against a pid that
/// was recycled before it could be read.
#[rustler::nif]
fn is_port_child(pid: i64) -> bool {
    let (Some(beam), Ok(pid)) = (this_beam(), i32::try_from(pid)) else {
        return false;
    };
    let Ok(child) = Stat::read(pid) else {
        return false;
    };
    matches!(
        Stat::read(child.ppid),
        Ok(helper) if helper.comm == "erl_child_setup" && helper.ppid == beam.pid.as_raw()
    )
}

#[derive(NifMap)]
struct Capabilities {
    proc_filesystem: bool,
    pidfd: bool,
    environ_readable: bool,
    /// Where cgroup2 is mounted (found in /proc/self/mountinfo), if anywhere.
    cgroup2_mount: Option<String>,
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
    }
}

/// The start time of `pid` now: one small read of `/proc/PID/stat`.
#[rustler::nif]
fn process_start_time(env: Env, pid: i64) -> Term {
    match Pid::new(pid).and_then(ProcessIdentity::of) {
        Ok(id) => (atoms::ok(), id.start_time).encode(env),
        Err(e) => (atoms::error(), atom(env, e.reason())).encode(env),
    }
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
    let (identities, valid) = identities(&targets);
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
