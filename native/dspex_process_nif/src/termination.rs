//! Termination, on an OS thread of its own: waiting for a grace period must not hold a
//! scheduler, normal or dirty.

use crate::atom;
use dspex_process::terminate::{self, Outcome, TerminateOptions};
use dspex_process::{Pid, ProcessIdentity};
use rustler::{Atom, Encoder, Env, NifMap, OwnedEnv, Term};
use std::time::Duration;

mod atoms {
    rustler::atoms! { ok, error, graceful, force_killed, already_gone, still_alive, signal_failed, unverifiable, dspex_terminated }
}

/// The options of a termination, as the Elixir side passes them (a map).
#[derive(NifMap)]
struct TerminateArgs {
    grace_ms: u64,
    kill_wait_ms: u64,
    kill_group: bool,
    allow_other_users: bool,
}

impl From<TerminateArgs> for TerminateOptions {
    fn from(a: TerminateArgs) -> TerminateOptions {
        TerminateOptions {
            grace: Duration::from_millis(a.grace_ms),
            kill_wait: Duration::from_millis(a.kill_wait_ms),
            kill_group: a.kill_group,
            allow_other_users: a.allow_other_users,
        }
    }
}

/// `{pid, start_time}` pairs as identities: `None` where the pid cannot name a target
/// (<= 1, beyond i32), and the valid ones alone, in order.
pub(crate) fn identities(
    targets: &[(i64, u64)],
) -> (Vec<Option<ProcessIdentity>>, Vec<ProcessIdentity>) {
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
fn terminate_start(env: Env, targets: Vec<(i64, u64)>, options: TerminateArgs, tag: u64) -> Atom {
    let caller = env.pid();
    let options = TerminateOptions::from(options);
    std::thread::spawn(move || {
        dspex_process::lower_thread_priority();
        // Invalid pids (<= 1, > i32::MAX) are answered without reaching the terminator.
        let (parsed, valid) = identities(&targets);
        // Each target's leaf in this VM's per-VM cgroup (and any cgroup of a dead VM) goes
        // with it.
        let own = crate::containment::own_cgroup();
        let outcomes = terminate::terminate_contained(&valid, &options, own.as_ref());
        // Their v1 leaves (hybrid mode, limits) held the same processes: emptied now.
        let v1 = crate::containment::own_v1_cgroups();
        if !v1.is_empty() {
            let ended: Vec<ProcessIdentity> = valid
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| {
                    matches!(
                        o,
                        Outcome::Graceful | Outcome::ForceKilled | Outcome::AlreadyGone
                    )
                })
                .map(|(id, _)| *id)
                .collect();
            dspex_process::cgroup_v1::remove_leaves(&v1, &ended, Duration::from_millis(200));
        }
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
            (atoms::error(), (atoms::signal_failed(), errno as i32)).encode(env)
        }
        Outcome::Unverifiable(errno) => {
            (atoms::error(), (atoms::unverifiable(), errno as i32)).encode(env)
        }
    }
}
