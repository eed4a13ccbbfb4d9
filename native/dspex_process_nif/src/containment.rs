//! Containment: the per-VM cgroup of this VM (see `dspex_process::cgroup`). Every function
//! that touches the cgroup hierarchy runs on a dirty I/O scheduler: a write to
//! `cgroup.procs` can wait on a kernel lock for milliseconds.

use crate::atom;
use crate::process_info::this_beam;
use dspex_process::cgroup::{self, Entered, VmCgroup};
use dspex_process::markers::own_pid_namespace;
use dspex_process::{Pid, ProcessIdentity};
use rustler::{Atom, Encoder, Env, NifMap, Term};
use std::sync::RwLock;

mod atoms {
    rustler::atoms! { ok, error, none, cgroup, auto, moved, already, gone, elsewhere, raced }
}

/// Controllers a leaf may use for limits.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// What containment does in this VM.
#[derive(Clone, Default)]
pub(crate) struct State {
    pub(crate) vm: Option<VmCgroup>,
    requested: &'static str,
    reason: String,
    controllers: Vec<String>,
    controllers_reason: String,
}

static STATE: RwLock<Option<State>> = RwLock::new(None);

/// This VM's per-VM cgroup, when containment is active.
pub(crate) fn own_cgroup() -> Option<VmCgroup> {
    STATE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|s| s.vm.clone())
}

#[derive(NifMap)]
struct Status {
    mode: Atom,
    requested: Atom,
    reason: String,
    cgroup: Option<String>,
    controllers: Vec<String>,
    controllers_reason: String,
}

fn encode_status<'a>(env: Env<'a>, state: &State) -> Term<'a> {
    Status {
        mode: if state.vm.is_some() {
            atoms::cgroup()
        } else {
            atoms::none()
        },
        requested: atom(
            env,
            if state.requested.is_empty() {
                "none"
            } else {
                state.requested
            },
        ),
        reason: state.reason.clone(),
        cgroup: state.vm.as_ref().map(|v| v.dir.display().to_string()),
        controllers: state.controllers.clone(),
        controllers_reason: state.controllers_reason.clone(),
    }
    .encode(env)
}

/// Enables what it can of memory, pids and cpu for the leaves (in the per-VM cgroup's own
/// `cgroup.subtree_control`: it holds no process, so the v2 "no internal processes" rule
/// allows it). The VM's own cgroup is never changed: what it does not pass down is missing.
fn enable_controllers(vm: &VmCgroup) -> (Vec<String>, String) {
    let offered = std::fs::read_to_string(vm.dir.join("cgroup.controllers")).unwrap_or_default();
    let offered: Vec<&str> = offered.split_whitespace().collect();
    let mut enabled = Vec::new();
    let mut missing = Vec::new();
    for c in CONTROLLERS {
        if offered.contains(&c)
            && cgroup::write_file(&vm.dir.join("cgroup.subtree_control"), &format!("+{c}")).is_ok()
        {
            enabled.push(c.to_string());
        } else {
            missing.push(c);
        }
    }
    let reason = if missing.is_empty() {
        String::new()
    } else {
        format!(
            "{} not enabled for {} by its parent's cgroup.subtree_control (the VM's own \
             cgroup, which holds processes and so cannot pass controllers down unless it is \
             the root; on hybrid systems these controllers belong to cgroup v1): limits on \
             them fall back to rlimits",
            missing.join(", "),
            vm.dir.display()
        )
    };
    (enabled, reason)
}

/// Starts containment in `mode` (`:auto`, `:cgroup` or `:none`): creates this VM's
/// per-VM cgroup when the mode asks for it and the hierarchy allows it. `{:ok, status}`,
/// or `{:error, reason}` when `:cgroup` is required and impossible.
#[rustler::nif(schedule = "DirtyIo")]
fn containment_start(env: Env, mode: Atom) -> Term {
    let requested = if mode == atoms::auto() {
        "auto"
    } else if mode == atoms::cgroup() {
        "cgroup"
    } else if mode == atoms::none() {
        "none"
    } else {
        return (
            atoms::error(),
            "containment must be :auto, :cgroup or :none",
        )
            .encode(env);
    };
    let mut state = State {
        requested,
        ..State::default()
    };
    if requested == "none" {
        state.reason = "containment: :none was asked for".into();
    } else {
        let created = match (this_beam(), own_pid_namespace()) {
            (Some(vm), Some(ns)) => VmCgroup::create_for_self(vm, ns).map_err(|e| e.to_string()),
            _ => Err("this VM's identity or pid namespace cannot be read".to_string()),
        };
        match created {
            Ok(vm) => {
                let (controllers, why) = enable_controllers(&vm);
                state.reason = format!(
                    "a cgroup v2 per registered process under {}",
                    vm.dir.display()
                );
                state.controllers = controllers;
                state.controllers_reason = why;
                state.vm = Some(vm);
            }
            Err(why) if requested == "cgroup" => {
                return (
                    atoms::error(),
                    format!("containment: :cgroup is impossible here: {why}"),
                )
                    .encode(env);
            }
            Err(why) => state.reason = format!("no cgroup containment: {why}"),
        }
    }
    let term = encode_status(env, &state);
    *STATE.write().unwrap_or_else(|e| e.into_inner()) = Some(state);
    (atoms::ok(), term).encode(env)
}

/// What containment does now (`mode: :none` before it was started).
#[rustler::nif]
fn containment_status(env: Env) -> Term {
    let state = STATE.read().unwrap_or_else(|e| e.into_inner()).clone();
    let state = state.unwrap_or_else(|| State {
        reason: "containment has not been started (the guardian starts it)".into(),
        ..State::default()
    });
    encode_status(env, &state)
}

/// Removes the empty leaves and, when it is empty, this VM's per-VM cgroup, and turns
/// containment off. True when nothing of it is left.
#[rustler::nif(schedule = "DirtyIo")]
fn containment_stop() -> bool {
    let mut guard = STATE.write().unwrap_or_else(|e| e.into_inner());
    let Some(vm) = guard.as_ref().and_then(|s| s.vm.clone()) else {
        return true;
    };
    let removed = vm.remove_empty();
    if removed {
        *guard = None;
    }
    removed
}

fn identity(pid: i64, start_time: u64) -> Option<ProcessIdentity> {
    Pid::new(pid)
        .ok()
        .map(|pid| ProcessIdentity { pid, start_time })
}

/// Moves a registered process into its leaf (see `VmCgroup::enter`). `:moved`,
/// `:already`, `:gone`, `{:elsewhere, path}`, `:raced`, `:none` (containment is off) or
/// `{:error, reason}`.
#[rustler::nif(schedule = "DirtyIo")]
fn cgroup_enter(env: Env, pid: i64, start_time: u64) -> Term {
    let (Some(vm), Some(id)) = (own_cgroup(), identity(pid, start_time)) else {
        return atoms::none().encode(env);
    };
    match vm.enter(&id) {
        Ok(Entered::Moved) => atoms::moved().encode(env),
        Ok(Entered::Already) => atoms::already().encode(env),
        Ok(Entered::Gone) => atoms::gone().encode(env),
        Ok(Entered::Raced) => atoms::raced().encode(env),
        Ok(Entered::Elsewhere(path)) => (atoms::elsewhere(), path).encode(env),
        Err(e) => (atoms::error(), e.to_string()).encode(env),
    }
}

/// Hands a process off: moves what is in its leaf back to the VM's cgroup, removes the
/// leaf. True when no leaf is left.
#[rustler::nif(schedule = "DirtyIo")]
fn cgroup_dissolve(pid: i64, start_time: u64) -> bool {
    match (own_cgroup(), identity(pid, start_time)) {
        (Some(vm), Some(id)) => vm.dissolve(&id),
        _ => true,
    }
}

/// The `oom_kill` count of a process's leaf (`memory.events`), `nil` without one.
#[rustler::nif(schedule = "DirtyIo")]
fn cgroup_oom_kills(pid: i64, start_time: u64) -> Option<u64> {
    let (vm, id) = (own_cgroup()?, identity(pid, start_time)?);
    let text = std::fs::read_to_string(vm.leaf(&id).dir.join("memory.events")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}
