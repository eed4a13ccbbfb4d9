//! The worker registry as a NIF resource. The resource lives as long as any term refers
//! to it (the Elixir side keeps one in `:persistent_term`), so it outlives the GenServer.

use dspex_process::{Pid, ProcessIdentity, Registry, RegistryStats, WorkerEntry};
use rustler::{Atom, Encoder, Env, LocalPid, Monitor, NifMap, ResourceArc, Term};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

mod atoms {
    rustler::atoms! { ok, error, not_found, dspex_registered, dspex_released }
}

/// The Elixir process (`DSPexProcess.Guardian`) told of every OS process that enters or
/// leaves any registry of this VM, so that none outlives its owner. One per VM.
static GUARDIAN: RwLock<Option<LocalPid>> = RwLock::new(None);

fn guardian() -> Option<LocalPid> {
    *GUARDIAN.read().unwrap_or_else(|e| e.into_inner())
}

/// Tells the guardian that `released` left the registry. `env` is the calling process's
/// or the `down` callback's: both may send. A failed send (no guardian) changes nothing.
fn notify_released(env: Env, guarded: bool, released: &[(Term, ProcessIdentity)]) {
    if released.is_empty() || !guarded {
        return;
    }
    if let Some(guardian) = guardian() {
        let list: Vec<(i32, u64, Term)> = released
            .iter()
            .map(|(id, p)| (p.pid.as_raw(), p.start_time, *id))
            .collect();
        let _ = env.send(&guardian, (atoms::dspex_released(), list));
    }
}

/// Worker ids are arbitrary terms, kept as their external term format so they can be
/// hashed and compared without an env; shared between the entry and its owner's record.
type WorkerKey = Arc<[u8]>;

pub struct RegistryResource {
    // The registry never leaves its maps half-updated on a panic (dashmap locks do not
    // poison and our closures do not panic), so crossing rustler's catch_unwind is sound.
    registry: AssertUnwindSafe<Registry<WorkerKey, LocalPid>>,
    /// Whether the guardian hears of this registry's processes (the registry's `:guardian`
    /// option).
    guarded: bool,
}

impl RegistryResource {
    /// Python processes of workers whose Elixir process is alive.
    pub(crate) fn live_python(&self) -> Vec<ProcessIdentity> {
        self.registry.active_python()
    }
}

#[rustler::resource_impl]
impl rustler::Resource for RegistryResource {
    const IMPLEMENTS_DOWN: bool = true;

    /// A monitored worker process exited: its entries leave at once, and the guardian hears
    /// of their OS processes.
    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
        let released: Vec<(Term, ProcessIdentity)> = self
            .registry
            .owner_down(&pid)
            .into_iter()
            .filter_map(|(key, entry)| Some((key_term(env, &key), entry.python?)))
            .collect();
        notify_released(env, self.guarded, &released);
    }
}

#[derive(NifMap)]
struct WorkerInfo {
    elixir_pid: LocalPid,
    python_pid: Option<i32>,
    python_start_time: Option<u64>,
    fingerprint: String,
    registered_at: u64,
}

#[derive(NifMap)]
struct Stats {
    total_registered: usize,
    alive_workers: usize,
    dead_workers: usize,
    active_python_pids: usize,
}

impl From<RegistryStats> for Stats {
    fn from(s: RegistryStats) -> Stats {
        Stats {
            total_registered: s.total_registered,
            alive_workers: s.alive_workers,
            dead_workers: s.dead_workers,
            active_python_pids: s.active_python_pids,
        }
    }
}

fn info(entry: WorkerEntry<LocalPid>) -> WorkerInfo {
    WorkerInfo {
        elixir_pid: entry.owner,
        python_pid: entry.python.map(|id| id.pid.as_raw()),
        python_start_time: entry.python.map(|id| id.start_time),
        fingerprint: entry.fingerprint.into(),
        registered_at: entry.registered_at,
    }
}

/// The key bytes of a worker id. Lookups borrow them; only insertion keeps a copy.
fn key(term: Term) -> rustler::OwnedBinary {
    term.to_binary()
}

fn key_term<'a>(env: Env<'a>, key: &[u8]) -> Term<'a> {
    // SAFETY: every key was produced by enif_term_to_binary in this VM.
    unsafe { env.binary_to_term_trusted(key) }
        .expect("registry keys are valid external terms")
        .0
}

fn with_ids<'a>(
    env: Env<'a>,
    entries: Vec<(WorkerKey, WorkerEntry<LocalPid>)>,
) -> Vec<(Term<'a>, WorkerInfo)> {
    entries
        .into_iter()
        .map(|(k, e)| (key_term(env, &k), info(e)))
        .collect()
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[rustler::nif]
fn registry_new(guarded: bool) -> ResourceArc<RegistryResource> {
    ResourceArc::new(RegistryResource {
        registry: AssertUnwindSafe(Registry::new()),
        guarded,
    })
}

/// One small read of /proc/PID/stat, well under a millisecond: fine on a normal scheduler.
#[rustler::nif]
fn registry_register<'a>(
    env: Env<'a>,
    resource: ResourceArc<RegistryResource>,
    worker_id: Term<'a>,
    elixir_pid: LocalPid,
    python_pid: Option<i64>,
    fingerprint: String,
) -> Term<'a> {
    let python = match python_pid.map(|raw| Pid::new(raw).and_then(ProcessIdentity::of)) {
        None => None,
        Some(Ok(identity)) => Some(identity),
        Some(Err(e)) => return (atoms::error(), crate::atom(env, e.reason())).encode(env),
    };
    let entry = WorkerEntry {
        owner: elixir_pid,
        python,
        fingerprint: fingerprint.into(),
        registered_at: unix_seconds(),
        alive: false,
    };
    let key: WorkerKey = key(worker_id).as_slice().into();
    let replaced = resource
        .registry
        .register(key, entry, |pid| env.monitor(&resource, pid).is_some());
    if let (Some(identity), Some(guardian)) = (python, guardian()) {
        // Unguarded registrations are told too, for leak checks; the guardian ends only
        // guarded ones.
        let notice = (
            atoms::dspex_registered(),
            (identity.pid.as_raw(), identity.start_time),
            worker_id,
            elixir_pid,
            resource.guarded,
        );
        let _ = env.send(&guardian, notice);
    }
    if let Some(old) = replaced {
        notify_released(env, resource.guarded, &[(worker_id, old)]);
    }
    atoms::ok().encode(env)
}

#[rustler::nif]
fn registry_unregister<'a>(
    env: Env<'a>,
    resource: ResourceArc<RegistryResource>,
    worker_id: Term<'a>,
) -> Atom {
    let removed = resource.registry.unregister(key(worker_id).as_slice());
    if let Some(python) = removed.and_then(|e| e.python) {
        notify_released(env, resource.guarded, &[(worker_id, python)]);
    }
    atoms::ok()
}

/// Whether the guardian looks after this registry's processes (its `:guardian` option).
#[rustler::nif]
fn registry_guarded(resource: ResourceArc<RegistryResource>) -> bool {
    resource.guarded
}

/// Makes `pid` the guardian of this VM's registries (see [`GUARDIAN`]); `nil` detaches.
#[rustler::nif]
fn guardian_attach(pid: Option<LocalPid>) -> Atom {
    *GUARDIAN.write().unwrap_or_else(|e| e.into_inner()) = pid;
    atoms::ok()
}

/// The `{pid, start_time}` of every live worker of the guarded ones of `registries`.
#[rustler::nif(schedule = "DirtyCpu")]
fn registries_live(registries: Vec<ResourceArc<RegistryResource>>) -> Vec<(i32, u64)> {
    registries
        .iter()
        .filter(|r| r.guarded)
        .flat_map(|r| r.live_python())
        .map(|id| (id.pid.as_raw(), id.start_time))
        .collect()
}

/// For each `{pid, start_time}`: whether a live worker of any of `registries` names it.
#[rustler::nif(schedule = "DirtyCpu")]
fn registries_hold(
    registries: Vec<ResourceArc<RegistryResource>>,
    targets: Vec<(i64, u64)>,
) -> Vec<bool> {
    let held: std::collections::HashSet<(i64, u64)> = registries
        .iter()
        .flat_map(|r| r.live_python())
        .map(|id| (i64::from(id.pid.as_raw()), id.start_time))
        .collect();
    targets.iter().map(|t| held.contains(t)).collect()
}

#[rustler::nif]
fn registry_get(
    resource: ResourceArc<RegistryResource>,
    worker_id: Term,
) -> Result<WorkerInfo, Atom> {
    resource
        .registry
        .get(key(worker_id).as_slice())
        .map(info)
        .ok_or_else(atoms::not_found)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_list(env: Env, resource: ResourceArc<RegistryResource>) -> Vec<(Term, WorkerInfo)> {
    with_ids(env, resource.registry.entries())
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_by_fingerprint<'a>(
    env: Env<'a>,
    resource: ResourceArc<RegistryResource>,
    fingerprint: &str,
) -> Vec<(Term<'a>, WorkerInfo)> {
    with_ids(env, resource.registry.by_fingerprint(fingerprint))
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_active_python_pids(resource: ResourceArc<RegistryResource>) -> Vec<i32> {
    resource
        .live_python()
        .into_iter()
        .map(|id| id.pid.as_raw())
        .collect()
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_dead_workers(
    env: Env,
    resource: ResourceArc<RegistryResource>,
) -> Vec<(Term, WorkerInfo)> {
    with_ids(env, resource.registry.dead())
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_remove_dead(env: Env, resource: ResourceArc<RegistryResource>) -> Vec<Term> {
    resource
        .registry
        .remove_dead()
        .iter()
        .map(|k| key_term(env, k))
        .collect()
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_stats(resource: ResourceArc<RegistryResource>) -> Stats {
    resource.registry.stats().into()
}
