//! Containment: the per-VM cgroup of this VM (see `dspex_process::cgroup`). Every function
//! that touches the cgroup hierarchy runs on a dirty I/O scheduler: a write to
//! `cgroup.procs` can wait on a kernel lock for milliseconds.

use crate::atom;
use crate::process_info::this_beam;
use dspex_process::cgroup::{self, Entered, VmCgroup};
use dspex_process::cgroup_v1::{self, V1VmCgroup};
use dspex_process::markers::own_pid_namespace;
use dspex_process::{Pid, ProcessIdentity};
use rustler::{Atom, Encoder, Env, NifMap, Term};
use std::collections::HashMap;
use std::sync::RwLock;

mod atoms {
    rustler::atoms! {
        ok, error, none, cgroup, auto, moved, already, gone, elsewhere, raced, v1, v2,
        leaf_left, v1_leaf_left,
    }
}

/// Controllers a leaf may use for limits.
const CONTROLLERS: [&str; 3] = cgroup_v1::CONTROLLERS;

/// What containment does in this VM.
#[derive(Clone, Default)]
pub(crate) struct State {
    pub(crate) vm: Option<VmCgroup>,
    /// This VM's per-VM cgroups in the v1 hierarchies that give the controllers cgroup2
    /// lacks here (hybrid mode).
    pub(crate) v1: Vec<V1VmCgroup>,
    requested: &'static str,
    reason: String,
    /// The controllers enabled for the leaves, each with its hierarchy.
    controllers: Vec<(String, Hierarchy)>,
    controllers_reason: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hierarchy {
    V1,
    V2,
}

static STATE: RwLock<Option<State>> = RwLock::new(None);

/// This VM's per-VM cgroups in v1 hierarchies (none without containment).
pub(crate) fn own_v1_cgroups() -> Vec<V1VmCgroup> {
    STATE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| s.v1.clone())
        .unwrap_or_default()
}

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
    hierarchies: HashMap<String, Atom>,
    v1_cgroups: HashMap<String, String>,
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
        controllers: state.controllers.iter().map(|(c, _)| c.clone()).collect(),
        hierarchies: state
            .controllers
            .iter()
            .map(|(c, h)| {
                let h = match h {
                    Hierarchy::V1 => atoms::v1(),
                    Hierarchy::V2 => atoms::v2(),
                };
                (c.clone(), h)
            })
            .collect(),
        v1_cgroups: state
            .v1
            .iter()
            .flat_map(|v| {
                v.controllers
                    .iter()
                    .filter(|c| CONTROLLERS.contains(&c.as_str()))
                    .map(|c| (c.clone(), v.vm.dir.display().to_string()))
            })
            .collect(),
        controllers_reason: state.controllers_reason.clone(),
    }
    .encode(env)
}

/// Enables what it can of memory, pids and cpu for the leaves (in the per-VM cgroup's own
/// `cgroup.subtree_control`: it holds no process, so the v2 "no internal processes" rule
/// allows it). The VM's own cgroup is never changed: what it does not pass down is missing
/// from v2. A missing controller that a cgroup v1 hierarchy has (hybrid mode) is taken from
/// there: a per-VM cgroup of the same name under the VM's own v1 cgroup (v1 has no "no
/// internal processes" rule). Returns the controllers with their hierarchy, the v1
/// per-VM cgroups made, and why the others are missing.
fn enable_controllers(vm: &VmCgroup) -> (Vec<(String, Hierarchy)>, Vec<V1VmCgroup>, String) {
    let offered = std::fs::read_to_string(vm.dir.join("cgroup.controllers")).unwrap_or_default();
    let offered: Vec<&str> = offered.split_whitespace().collect();
    let mut enabled = Vec::new();
    let mut missing = Vec::new();
    for c in CONTROLLERS {
        if offered.contains(&c)
            && cgroup::write_file(&vm.dir.join("cgroup.subtree_control"), &format!("+{c}")).is_ok()
        {
            enabled.push((c.to_string(), Hierarchy::V2));
        } else {
            missing.push(c);
        }
    }
    if missing.is_empty() {
        return (enabled, Vec::new(), String::new());
    }
    let mut reasons = vec![format!(
        "{} not enabled for {} by its parent's cgroup.subtree_control (the VM's own cgroup, \
         which holds processes and so cannot pass controllers down unless it is the root)",
        missing.join(", "),
        vm.dir.display()
    )];
    let (v1, v1_missing) = V1VmCgroup::create_all(vm.name, &missing);
    for c in &missing {
        if let Some(v) = v1.iter().find(|v| v.has(c)) {
            enabled.push((c.to_string(), Hierarchy::V1));
            reasons.push(format!(
                "{c} from cgroup v1 instead: a leaf per worker with limits under {}",
                v.vm.dir.display()
            ));
        }
    }
    let fallback: Vec<String> = v1_missing
        .iter()
        .map(|(c, why)| format!("{c} not from cgroup v1 either ({why})"))
        .collect();
    if !fallback.is_empty() {
        reasons.push(format!(
            "{}: limits on them fall back to rlimits",
            fallback.join("; ")
        ));
    }
    (enabled, v1, reasons.join("; "))
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
                let (controllers, v1, why) = enable_controllers(&vm);
                state.v1 = v1;
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
    let v1 = guard.as_ref().map(|s| s.v1.clone()).unwrap_or_default();
    let mut removed = vm.remove_empty();
    for v in &v1 {
        removed &= v.remove_empty();
    }
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

/// Hands a process off: moves what is in its leaves back to the VM's cgroups and removes
/// the leaves, its v1 ones too (a process handed off keeps no limit of this VM). `:ok` when
/// no leaf is left; `:leaf_left` when its cgroup2 leaf stays (the process ends with this
/// VM's cgroup); `:v1_leaf_left` when only a v1 leaf stays (it keeps that leaf's limits,
/// and does not end with the VM: only the cgroup2 cgroups name a VM's processes).
#[rustler::nif(schedule = "DirtyIo")]
fn cgroup_dissolve(pid: i64, start_time: u64) -> Atom {
    let (Some(vm), Some(id)) = (own_cgroup(), identity(pid, start_time)) else {
        return atoms::ok();
    };
    let v1 = cgroup_v1::dissolve_all(&own_v1_cgroups(), &id);
    if !vm.dissolve(&id) {
        atoms::leaf_left()
    } else if !v1 {
        atoms::v1_leaf_left()
    } else {
        atoms::ok()
    }
}

/// The `oom_kill` count of a process's leaf: `memory.events` of its cgroup2 leaf, or
/// `memory.oom_control` of its v1 memory leaf (hybrid mode); `nil` without either.
#[rustler::nif(schedule = "DirtyIo")]
fn cgroup_oom_kills(pid: i64, start_time: u64) -> Option<u64> {
    let (vm, id) = (own_cgroup()?, identity(pid, start_time)?);
    std::fs::read_to_string(vm.leaf(&id).dir.join("memory.events"))
        .ok()
        .and_then(|text| cgroup_v1::parse_oom_kill(&text))
        .or_else(|| own_v1_cgroups().iter().find_map(|v| v.oom_kills(&id)))
}
