//! Orphan detection and termination. Both scan `/proc` or wait, so both run on dirty I/O
//! schedulers.

use crate::atom;
use crate::registry::RegistryResource;
use dspex_process::classify::{self, Class, Viewpoint};
use dspex_process::policy;
use dspex_process::scan::{MarkerRead, Pattern};
use dspex_process::{Pid, ProcessIdentity};
use rustler::{Atom, Binary, Encoder, Env, NifMap, ResourceArc, Term};
use std::collections::HashSet;
use std::time::Duration;

mod atoms {
    rustler::atoms! { invalid_pattern, proc_unreadable }
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

impl Detected {
    /// One process's fields, from its facts and what classification said of it.
    fn of(
        env: Env,
        facts: &dspex_process::ProcessFacts,
        class: &str,
        reason: Option<Atom>,
        target: Option<Atom>,
        owner: Option<Owner>,
        age_ms: u64,
    ) -> Detected {
        Detected {
            pid: facts.pid.as_raw(),
            start_time: facts.start_time,
            ppid: facts.ppid,
            pgid: facts.pgid,
            uid: facts.uid,
            state: atom(env, facts.state.name()),
            cmdline: facts.argv.join(" "),
            class: atom(env, class),
            reason,
            target,
            owner,
            markers_readable: true,
            age_ms,
        }
    }

    fn markers_readable(self, readable: bool) -> Detected {
        Detected {
            markers_readable: readable,
            ..self
        }
    }
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

/// Scans for `patterns` and classifies every match as seen from this VM: the live workers
/// of every running registry and the OS processes of this VM's open ports are in use.
/// `{:error, :invalid_pattern}`, or `{:error, {:proc_unreadable, message}}` when `/proc`
/// could not be read in full (out of descriptors or memory): then nothing is classified.
#[rustler::nif(schedule = "DirtyIo")]
fn detect<'a>(
    env: Env<'a>,
    registries: Vec<ResourceArc<RegistryResource>>,
    port_pids: Vec<i64>,
    patterns: Vec<Binary>,
    min_age_ms: u64,
    selection: SelectionArg,
) -> Result<Vec<Detected>, Term<'a>> {
    let selection = selection.into_policy();
    let pattern = match Pattern::new(&patterns.iter().map(|b| b.as_slice()).collect::<Vec<_>>()) {
        Ok(p) => p,
        Err(_) => return Err(atoms::invalid_pattern().encode(env)),
    };
    let registered: HashSet<ProcessIdentity> =
        registries.iter().flat_map(|r| r.live_python(env)).collect();
    let view = Viewpoint {
        beam: crate::process_info::this_beam(),
        registered,
        port_pids: port_pids
            .into_iter()
            .filter_map(|p| Pid::new(p).ok())
            .collect(),
        min_age: Duration::from_millis(min_age_ms),
    };
    let detections = classify::detect(&pattern, view)
        .map_err(|e| (atoms::proc_unreadable(), e.to_string()).encode(env))?;
    let out: Vec<Detected> = detections
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
            Detected::of(env, &facts, d.class.name(), reason, target, owner, d.age_ms)
                .markers_readable(!matches!(d.candidate.markers, MarkerRead::Unreadable))
        })
        .collect();
    Ok(out)
}

/// The processes in the cgroups of dead VMs (reason `:cgroup_owner_dead`), whatever their
/// argv, with the same fields as `detect/4`; the owner is the dead VM.
#[rustler::nif(schedule = "DirtyIo")]
fn detect_cgroup_orphans(env: Env, selection: SelectionArg) -> Vec<Detected> {
    let target = selection
        .into_policy()
        .admits(policy::CGROUP_OWNER_DEAD)
        .then(|| atom(env, policy::CGROUP_OWNER_DEAD));
    // Only the containment (cgroup2) names orphans: a dead VM's v1 cgroups carried limits,
    // and a process left only there was handed off (see `cgroup_v1::dead_vm_cgroups`).
    let found = dspex_process::cgroup::cgroup_orphans(&dspex_process::cgroup::dead_vm_cgroups());
    found
        .into_iter()
        .map(|o| {
            let owner = Owner {
                pid: o.owner.vm.pid.as_raw(),
                start_time: o.owner.vm.start_time,
                run_id: None,
                worker_id: None,
                fingerprint: None,
            };
            let reason = Some(atom(env, policy::CGROUP_OWNER_DEAD));
            Detected::of(
                env,
                &o.facts,
                "orphan",
                reason,
                target,
                Some(owner),
                o.age_ms,
            )
        })
        .collect()
}

/// Removes the per-VM cgroups of dead VMs that are empty (and their empty leaves), cgroup2
/// and cgroup v1 (hybrid hosts) alike.
/// Returns how many were removed.
#[rustler::nif(schedule = "DirtyIo")]
fn remove_dead_vm_cgroups() -> usize {
    dspex_process::cgroup_v1::dead_vm_cgroups()
        .iter()
        .filter(|vm| vm.as_unit().populated() != Some(true) && vm.remove_empty())
        .count()
}
