//! The worker registry as a NIF resource. The resource lives as long as any term refers
//! to it (the Elixir side keeps one in `:persistent_term`), so it outlives the GenServer.

use dspex_process::{Pid, ProcessIdentity, Registry, RegistryStats, WorkerEntry};
use rustler::{Atom, Encoder, Env, LocalPid, Monitor, NifMap, ResourceArc, Term};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

mod atoms {
    rustler::atoms! { ok, error, not_found }
}

/// Worker ids are arbitrary terms, kept as their external term format so they can be
/// hashed and compared without an env; shared between the entry and its owner's record.
type WorkerKey = Arc<[u8]>;

pub struct RegistryResource {
    // The registry never leaves its maps half-updated on a panic (dashmap locks do not
    // poison and our closures do not panic), so crossing rustler's catch_unwind is sound.
    registry: AssertUnwindSafe<Registry<WorkerKey, LocalPid>>,
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

    /// A monitored worker process exited: its entries leave at once.
    fn down<'a>(&'a self, _env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
        self.registry.owner_down(&pid);
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
fn registry_new() -> ResourceArc<RegistryResource> {
    ResourceArc::new(RegistryResource {
        registry: AssertUnwindSafe(Registry::new()),
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
    resource
        .registry
        .register(key, entry, |pid| env.monitor(&resource, pid).is_some());
    atoms::ok().encode(env)
}

#[rustler::nif]
fn registry_unregister(resource: ResourceArc<RegistryResource>, worker_id: Term) -> Atom {
    resource.registry.unregister(key(worker_id).as_slice());
    atoms::ok()
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
