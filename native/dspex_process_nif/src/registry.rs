//! The worker registry as a NIF resource. The resource lives as long as any term refers
//! to it (the Elixir side keeps one in `:persistent_term`), so it outlives the GenServer.

use dspex_process::batch_queue::push_joined;
use dspex_process::{
    KeyBytes, Pid, PinnedProcess, PinnedRead, ProcessIdentity, Registry, RegistryStats, WorkerEntry,
};
use rustler::sys::ErlNifTerm;
use rustler::types::binary::NewBinary;
use rustler::{
    Atom, Binary, Encoder, Env, LocalPid, Monitor, NifMap, NifResult, OwnedEnv, ResourceArc, Term,
};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

mod atoms {
    rustler::atoms! {
        ok, error, nil, not_found, not_running, dspex_notices, dspex_notices_soon, registered, released, unread,
        elixir_pid, fingerprint, python_pid, python_start_time, registered_at,
    }
}

/// The Elixir process (`DSPexProcess.Guardian`) told of every OS process that enters or
/// leaves any registry of this VM, so that none outlives its owner. One per VM.
static GUARDIAN: RwLock<Option<LocalPid>> = RwLock::new(None);

fn guardian() -> Option<LocalPid> {
    *GUARDIAN.read().unwrap_or_else(|e| e.into_inner())
}

/// What the guardian is told, in the order it happened (one queue for every registry, so
/// a release never overtakes the registration it undoes: a registration is told before
/// its entry is in).
enum Notice {
    Registered {
        identity: ProcessIdentity,
        key: WorkerKey,
        owner: LocalPid,
        guarded: bool,
        port_child: bool,
    },
    /// Only guarded registries' releases are queued.
    Released(Vec<(ProcessIdentity, WorkerKey)>),
    /// A staged registration whose process could not be read (it is recorded without one).
    Unread {
        pid: i32,
        key: WorkerKey,
        reason: &'static str,
    },
}

/// Notices not yet taken by the guardian. A message built and sent per registration cost
/// about a microsecond on the caller's scheduler (the copy and the guardian's wake-up); a
/// push here costs an uncontended lock. The guardian is woken by one message, sent when
/// none is outstanding, and takes everything with `guardian_take_notices/0` (which applies
/// staged registrations first): `:dspex_notices` for a registration, which the OS guard
/// must learn of at once; `:dspex_notices_soon` for releases only, which the guardian
/// takes a few ms later (it ends a released process only after `release_delay_ms`
/// anyway), so that a burst of unregistrations wakes it once.
static NOTICES: Mutex<Vec<Notice>> = Mutex::new(Vec::new());
/// A `:dspex_notices` message is on its way and not yet acted on.
static URGENT_SENT: AtomicBool = AtomicBool::new(false);
/// A `:dspex_notices_soon` message is on its way and not yet acted on.
static SOON_SENT: AtomicBool = AtomicBool::new(false);

/// How a wake-up is sent: from a NIF's or a callback's env, or from a thread.
enum Sender<'a> {
    Env(Env<'a>),
    Thread,
}

/// Whether a notice must reach the guardian at once or may wait a few ms.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Urgency {
    Now,
    Soon,
}

/// Wakes the guardian unless a wake-up that comes soon enough is already on its way. A
/// failed send (the guardian just exited) loses nothing: the queues are kept for the next
/// guardian, which takes them when it attaches. The guardian is read after the flag is set
/// (and the notice queued): a guardian attached after that read clears the flags and takes
/// the queue after attaching (`DSPexProcess.Guardian` sends itself `:dspex_notices` right
/// after `guardian_attach`), so no notice waits with a flag set and no message on its way.
/// (A flag already set is only read: a swap would write its cache line on every notice of
/// a burst.)
fn wake(sender: Sender, urgency: Urgency) {
    let already =
        |sent: &AtomicBool| sent.load(Ordering::SeqCst) || sent.swap(true, Ordering::SeqCst);
    let message = match urgency {
        Urgency::Now if already(&URGENT_SENT) => return,
        Urgency::Now => atoms::dspex_notices(),
        Urgency::Soon if URGENT_SENT.load(Ordering::SeqCst) || already(&SOON_SENT) => return,
        Urgency::Soon => atoms::dspex_notices_soon(),
    };
    let Some(guardian) = guardian() else {
        return;
    };
    match sender {
        Sender::Env(env) => {
            let _ = env.send(&guardian, message);
        }
        Sender::Thread => {
            let _ = OwnedEnv::new().send_and_clear(&guardian, |_| message);
        }
    }
}

/// Queues `notice` (a registration, or a read given up on) when a guardian is attached,
/// and wakes it at once: the OS guard must learn of a registration without delay.
/// Releases go through [`notify_released`].
fn notify(sender: Sender, notice: Notice) {
    if guardian().is_none() {
        return;
    }
    NOTICES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(notice);
    wake(sender, Urgency::Now);
}

/// Tells the guardian that `released` left a guarded registry. A few releases queued right
/// after other releases join their notice, so that a burst of unregistrations allocates one
/// growing list, not one per worker (see [`push_joined`]).
fn notify_released<I>(sender: Sender, guarded: bool, released: I)
where
    I: IntoIterator<Item = (ProcessIdentity, WorkerKey)>
        + AsRef<[(ProcessIdentity, WorkerKey)]>
        + Into<Vec<(ProcessIdentity, WorkerKey)>>,
{
    if !guarded || released.as_ref().is_empty() || guardian().is_none() {
        return;
    }
    push_joined(
        &mut NOTICES.lock().unwrap_or_else(|e| e.into_inner()),
        released,
        |tail| match tail {
            Notice::Released(list) => Some(list),
            _ => None,
        },
        Notice::Released,
    );
    wake(sender, Urgency::Soon);
}

/// Worker ids are arbitrary terms, kept as bytes (see [`with_key`]) so they can be hashed
/// and compared without an env: inline when short, else one copy shared by the entry and
/// its index records.
type WorkerKey = KeyBytes;

/// An owner whose record holds more keys than this is removed off the schedulers (see
/// `down`): removing one entry and naming it in the guardian's notice takes about a
/// microsecond, so this bounds what a `down` callback does on a normal scheduler to about
/// a millisecond. (The count includes keys that left the owner, each a lookup that finds
/// nothing to remove, so the bound holds.)
const INLINE_REMOVAL: usize = 1_000;

pub struct RegistryResource {
    // The registry never leaves its maps half-updated on a panic (dashmap locks do not
    // poison and our closures do not panic), so crossing rustler's catch_unwind is sound.
    // Shared with the thread that removes the entries of an owner of many (see `down`).
    registry: Arc<AssertUnwindSafe<Registry<WorkerKey, LocalPid>>>,
    /// Whether the guardian hears of this registry's processes (the registry's `:guardian`
    /// option).
    guarded: bool,
}

impl RegistryResource {
    /// Which table this is (two resources are the same registry when these are equal).
    fn registry_ptr(&self) -> *const () {
        Arc::as_ptr(&self.registry).cast()
    }

    /// Python processes of workers whose Elixir process is alive, staged registrations
    /// included (they are applied first).
    pub(crate) fn live_python(&self, env: Env) -> Vec<ProcessIdentity> {
        settle(env);
        self.registry.active_python()
    }
}

#[rustler::resource_impl]
impl rustler::Resource for RegistryResource {
    const IMPLEMENTS_DOWN: bool = true;

    /// A monitored worker process exited: its entries leave at once, and the guardian hears
    /// of their OS processes. The owner's record is taken out here (O(1)); its entries are
    /// removed here when they are few, and on a thread of their own when they are many, so
    /// that no normal scheduler spends more than about a millisecond on one death.
    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, _monitor: Monitor) {
        let Some(keys) = self.registry.detach_owner(&pid) else {
            return;
        };
        if keys.len() <= INLINE_REMOVAL {
            let released = released(self.registry.remove_detached(&pid, keys));
            notify_released(Sender::Env(env), self.guarded, released);
            return;
        }
        // The thread takes the keys out of `work`; if it cannot be started, they are still
        // there and the removal happens here after all.
        let work = Arc::new(Mutex::new(Some(keys)));
        let job = {
            let work = Arc::clone(&work);
            let registry = Arc::clone(&self.registry);
            let guarded = self.guarded;
            move || {
                let keys = work.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(keys) = keys {
                    let removed = registry.remove_detached(&pid, keys);
                    notify_released(Sender::Thread, guarded, released(removed));
                }
            }
        };
        let spawned = std::thread::Builder::new()
            .name("dspex-registry-release".into())
            .spawn(job);
        if spawned.is_err() {
            let keys = work.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(keys) = keys {
                let released = released(self.registry.remove_detached(&pid, keys));
                notify_released(Sender::Env(env), self.guarded, released);
            }
        }
    }
}

/// What the guardian hears of an entry that left: its OS process and id, when that
/// process was read as this VM's port program at registration. Only such a process is the
/// guardian's to end or hand off (it was told to the OS guard and contained as one), so
/// no other is released to it, and it reads nothing from `/proc` to decide.
fn release_of(
    key: WorkerKey,
    entry: WorkerEntry<LocalPid>,
) -> Option<(ProcessIdentity, WorkerKey)> {
    let python = entry.python.filter(|_| entry.port_child)?;
    Some((python, key))
}

/// [`release_of`] each removed entry.
fn released(removed: Vec<(WorkerKey, WorkerEntry<LocalPid>)>) -> Vec<(ProcessIdentity, WorkerKey)> {
    removed
        .into_iter()
        .filter_map(|(key, entry)| release_of(key, entry))
        .collect()
}

/// Applies staged registrations, then takes every queued notice, oldest first:
/// `{:registered, {pid, start_time}, worker_id, owner, guarded, port_child}`,
/// `{:released, [{pid, start_time, worker_id}]}` and `{:unread, pid, worker_id, reason}`.
#[rustler::nif(schedule = "DirtyIo")]
fn guardian_take_notices(env: Env) -> Term {
    // Cleared first: a notice queued from here on sends a new wake-up.
    URGENT_SENT.store(false, Ordering::SeqCst);
    SOON_SENT.store(false, Ordering::SeqCst);
    settle(env);
    let notices = std::mem::take(&mut *NOTICES.lock().unwrap_or_else(|e| e.into_inner()));
    let terms: Vec<Term> = notices
        .iter()
        .map(|notice| match notice {
            Notice::Registered {
                identity,
                key,
                owner,
                guarded,
                port_child,
            } => (
                atoms::registered(),
                (identity.pid.as_raw(), identity.start_time),
                key_term(env, key),
                *owner,
                *guarded,
                *port_child,
            )
                .encode(env),
            Notice::Released(list) => {
                let list: Vec<(i32, u64, Term)> = list
                    .iter()
                    .map(|(p, key)| (p.pid.as_raw(), p.start_time, key_term(env, key)))
                    .collect();
                (atoms::released(), list).encode(env)
            }
            Notice::Unread { pid, key, reason } => (
                atoms::unread(),
                *pid,
                key_term(env, key),
                crate::atom(env, reason),
            )
                .encode(env),
        })
        .collect();
    terms.encode(env)
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

/// Builds entry maps: `%{elixir_pid, python_pid, python_start_time, fingerprint,
/// registered_at}` in one `enif_make_map_from_arrays` each (no map is copied key by key).
/// Over a listing, a fingerprint shared by several entries is made into a term once.
struct InfoEncoder<'a> {
    env: Env<'a>,
    keys: [ErlNifTerm; 5],
    nil: Term<'a>,
    /// Terms of shared fingerprints, by content.
    fingerprints: HashMap<Box<[u8]>, Term<'a>>,
}

/// Fingerprint terms remembered per listing; past this, the rest are made one by one.
const FINGERPRINT_CACHE: usize = 4_096;

/// An entry's fields as a listing copies them out of its shard: its strings go into
/// [`Listing::bytes`], so that the copy takes no reference count and allocates nothing
/// once the buffers have grown to the largest shard.
struct Row {
    key: std::ops::Range<usize>,
    fingerprint: std::ops::Range<usize>,
    shared: bool,
    owner: LocalPid,
    python: Option<ProcessIdentity>,
    registered_at: u64,
}

/// One shard's copied rows.
#[derive(Default)]
struct Listing {
    bytes: Vec<u8>,
    rows: Vec<Row>,
}

impl Listing {
    fn copy(&mut self, key: &[u8], entry: &WorkerEntry<LocalPid>) {
        let mut push = |bytes: &[u8]| {
            let at = self.bytes.len();
            self.bytes.extend_from_slice(bytes);
            at..self.bytes.len()
        };
        let key = push(key);
        let fingerprint = push(entry.fingerprint.as_bytes());
        self.rows.push(Row {
            key,
            fingerprint,
            shared: Registry::<WorkerKey, LocalPid>::fingerprint_shared(entry),
            owner: entry.owner,
            python: entry.python,
            registered_at: entry.registered_at,
        });
    }
}

impl<'a> InfoEncoder<'a> {
    fn new(env: Env<'a>) -> Self {
        // Keys in term order (atoms by name), which is how a small map stores them.
        let keys = [
            atoms::elixir_pid(),
            atoms::fingerprint(),
            atoms::python_pid(),
            atoms::python_start_time(),
            atoms::registered_at(),
        ]
        .map(|a| a.encode(env).as_c_arg());
        InfoEncoder {
            env,
            keys,
            nil: atoms::nil().encode(env),
            fingerprints: HashMap::new(),
        }
    }

    /// `shared`: remember the term for later entries with the same fingerprint.
    fn fingerprint(&mut self, fingerprint: &[u8], shared: bool) -> Term<'a> {
        let env = self.env;
        let make = || -> Term<'a> { NewBinary::from_slice(env, fingerprint).into() };
        if !shared {
            return make();
        }
        if let Some(term) = self.fingerprints.get(fingerprint) {
            return *term;
        }
        let term = make();
        if self.fingerprints.len() < FINGERPRINT_CACHE {
            self.fingerprints.insert(fingerprint.into(), term);
        }
        term
    }

    /// `shared`: as for [`InfoEncoder::fingerprint`].
    fn info(&mut self, entry: &WorkerEntry<LocalPid>, shared: bool) -> Term<'a> {
        let fingerprint = self.fingerprint(entry.fingerprint.as_bytes(), shared);
        self.map(entry.owner, fingerprint, entry.python, entry.registered_at)
    }

    fn map(
        &self,
        owner: LocalPid,
        fingerprint: Term<'a>,
        python: Option<ProcessIdentity>,
        registered_at: u64,
    ) -> Term<'a> {
        let env = self.env;
        let (pid, start) = match python {
            Some(id) => (id.pid.as_raw().encode(env), id.start_time.encode(env)),
            None => (self.nil, self.nil),
        };
        let values = [
            owner.encode(env).as_c_arg(),
            fingerprint.as_c_arg(),
            pid.as_c_arg(),
            start.as_c_arg(),
            registered_at.encode(env).as_c_arg(),
        ];
        let mut map = MaybeUninit::<ErlNifTerm>::uninit();
        // SAFETY: five distinct atom keys and five valid terms of `env`; the call writes the
        // map into `map` and returns nonzero (zero only for duplicate keys).
        let made = unsafe {
            rustler::sys::enif_make_map_from_arrays(
                env.as_c_arg(),
                self.keys.as_ptr(),
                values.as_ptr(),
                5,
                map.as_mut_ptr(),
            )
        };
        assert!(made != 0, "the entry map's keys are distinct");
        // SAFETY: the call succeeded, so it wrote a map made in `env`.
        unsafe { Term::new(env, map.assume_init()) }
    }

    /// Prepends `{worker_id, info}` for each of `listing`'s rows to `list`.
    fn prepend_rows(&mut self, listing: &Listing, mut list: Term<'a>) -> Term<'a> {
        let env = self.env;
        for row in &listing.rows {
            let fingerprint = self.fingerprint(&listing.bytes[row.fingerprint.clone()], row.shared);
            let info = self.map(row.owner, fingerprint, row.python, row.registered_at);
            list = list.list_prepend((key_term(env, &listing.bytes[row.key.clone()]), info));
        }
        list
    }

    /// Pairs of a (small) selection; every fingerprint is remembered (a selection by
    /// fingerprint shares one).
    fn pairs(mut self, entries: Vec<(WorkerKey, WorkerEntry<LocalPid>)>) -> Term<'a> {
        let env = self.env;
        let pairs: Vec<Term<'a>> = entries
            .iter()
            .map(|(key, entry)| (key_term(env, key), self.info(entry, true)).encode(env))
            .collect();
        pairs.encode(env)
    }
}

/// A worker id that is a binary (the common case) is kept as this byte and its bytes,
/// encoded and decoded here without asking the VM, and short enough to stay inline in its
/// key for ids of up to 21 bytes (see [`KeyBytes`]). Other ids are kept as
/// `term_to_binary/1` gives them, which starts with 131, never with this byte.
const BINARY_KEY: u8 = 0;

/// Calls `f` with the key bytes of `term`: built on the stack for a short binary id, with
/// no allocation.
fn with_key<R>(term: Term, f: impl FnOnce(&[u8]) -> R) -> R {
    let Ok(binary) = Binary::from_term(term) else {
        return f(term.to_binary().as_slice());
    };
    let bytes = binary.as_slice();
    let mut stack = [0u8; 128];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if bytes.len() < stack.len() {
        &mut stack[..1 + bytes.len()]
    } else {
        heap.resize(1 + bytes.len(), 0);
        &mut heap
    };
    buf[0] = BINARY_KEY;
    buf[1..].copy_from_slice(bytes);
    f(buf)
}

fn key_term<'a>(env: Env<'a>, key: &[u8]) -> Term<'a> {
    if let [BINARY_KEY, id @ ..] = key {
        return NewBinary::from_slice(env, id).into();
    }
    // SAFETY: every other key was produced by enif_term_to_binary in this VM.
    unsafe { env.binary_to_term_trusted(key) }
        .expect("registry keys are valid external terms")
        .0
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[rustler::nif]
fn registry_new(guarded: bool) -> ResourceArc<RegistryResource> {
    ResourceArc::new(RegistryResource {
        registry: Arc::new(AssertUnwindSafe(Registry::new())),
        guarded,
    })
}

/// Registers a worker. With an OS pid, its identity (start time) and whether it is a port
/// program of this VM come from one read of `/proc/PID/stat`. That read costs several µs
/// (most of a registration), so when it can be done later without changing any answer,
/// it is: the process is pinned with a pidfd now, the registration is staged, and the read
/// is done by the guardian (woken for it) or by the next registry call of anyone, which
/// applies staged registrations first, in order (see [`settle`]). Otherwise (no guardian,
/// `/proc` with `hidepid`, no pidfd, too many staged, an owner already dead) it is read now.
/// `:not_running` when `registry` is neither a registry nor a registry's name. Arguments:
/// registry, worker id, owner pid, OS pid or `nil`, fingerprint.
fn registry_register<'a>(
    env: Env<'a>,
    [registry, worker_id, elixir_pid, python_pid, fingerprint]: [Term<'a>; 5],
) -> NifResult<Term<'a>> {
    let elixir_pid: LocalPid = elixir_pid.decode()?;
    let python_pid: Option<i64> = python_pid.decode()?;
    let fingerprint: &str = fingerprint.decode()?;
    Ok(with_registry(registry, |resource| {
        register(
            env,
            resource,
            worker_id,
            elixir_pid,
            python_pid,
            fingerprint,
        )
    })
    .unwrap_or_else(|| atoms::not_running().encode(env)))
}
crate::lean_nif!(registry_register, 5);

fn register<'a>(
    env: Env<'a>,
    resource: &ResourceArc<RegistryResource>,
    worker_id: Term<'a>,
    elixir_pid: LocalPid,
    python_pid: Option<i64>,
    fingerprint: &str,
) -> Term<'a> {
    let pid = match python_pid.map(Pid::new).transpose() {
        Ok(pid) => pid,
        Err(e) => return (atoms::error(), crate::atom(env, e.reason())).encode(env),
    };
    let key: WorkerKey = with_key(worker_id, KeyBytes::new);
    let registration = Registration {
        key,
        owner: elixir_pid,
        fingerprint: resource.registry.intern(fingerprint),
        registered_at: unix_seconds(),
    };
    if let Some(pid) = pid {
        if can_stage(env, elixir_pid) {
            match PinnedProcess::open(pid) {
                Ok(pinned) => {
                    stage(env, resource.clone(), registration, pinned);
                    return atoms::ok().encode(env);
                }
                Err(e @ dspex_process::Error::NoSuchProcess(_)) => {
                    return (atoms::error(), crate::atom(env, e.reason())).encode(env)
                }
                // No pidfd (EMFILE, an old kernel): read now.
                Err(_) => {}
            }
        }
    }
    // Staged registrations come first: this one must not overtake them.
    settle(env);
    let (python, port_child) = match pid.map(ProcessIdentity::with_parent) {
        None => (None, false),
        Some(Ok((identity, ppid))) => recorded(identity, ppid),
        Some(Err(e)) => return (atoms::error(), crate::atom(env, e.reason())).encode(env),
    };
    apply(env, resource, registration, python, port_child, false);
    atoms::ok().encode(env)
}

/// What a registration records of the process it read: its identity, and whether it is a
/// port program of this VM (its parent is this VM's port helper).
fn recorded(identity: ProcessIdentity, ppid: i32) -> (Option<ProcessIdentity>, bool) {
    (
        Some(identity),
        crate::process_info::is_port_child_by_parent(ppid),
    )
}

/// A registration's own data, whether applied now or staged.
struct Registration {
    key: WorkerKey,
    owner: LocalPid,
    fingerprint: Arc<str>,
    registered_at: u64,
}

/// A registration whose OS process is pinned and whose identity is not read yet.
struct Staged {
    resource: ResourceArc<RegistryResource>,
    registration: Registration,
    pinned: PinnedProcess,
    /// Reads that failed so far (see [`settle`]).
    attempts: u8,
}

/// Reads of a staged process that fail (with the process still there) before it is given
/// up and recorded without an OS process.
const READ_ATTEMPTS: u8 = 3;

/// Staged registrations, oldest first, and how many are staged or being applied.
static STAGED: Mutex<Vec<Staged>> = Mutex::new(Vec::new());
static STAGED_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Held while staged registrations are applied, so that a caller of [`settle`] returns only
/// once every registration staged before its call is in its registry.
static SETTLING: Mutex<()> = Mutex::new(());
/// Past this many staged registrations, a registration reads its process now: staged ones
/// hold a pidfd each, and whoever applies them does one `/proc` read each.
const STAGED_MAX: usize = 16;

/// Whether this registration may be staged: a guardian will apply it soon; `/proc` lets
/// every process's stat be read later (no `hidepid`, so a staged read fails only if the
/// process is gone); few are staged; and its owner is alive (a registration for a dead
/// owner is recorded as dead now, as without staging).
fn can_stage(env: Env, owner: LocalPid) -> bool {
    static PROC_READABLE: OnceLock<bool> = OnceLock::new();
    guardian().is_some()
        && STAGED_COUNT.load(Ordering::SeqCst) < STAGED_MAX
        && *PROC_READABLE.get_or_init(|| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .is_ok_and(|m| dspex_process::proc_stat_readable_by_all(&m))
        })
        && owner.is_alive(env)
}

fn stage(
    env: Env,
    resource: ResourceArc<RegistryResource>,
    registration: Registration,
    pinned: PinnedProcess,
) {
    {
        let mut staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
        staged.push(Staged {
            resource,
            registration,
            pinned,
            attempts: 0,
        });
        STAGED_COUNT.fetch_add(1, Ordering::SeqCst);
    }
    wake(Sender::Env(env), Urgency::Now);
}

/// Applies every staged registration, oldest first, reading each one's process. Every
/// registry call does this first, so staging changes no answer: a registration is in its
/// registry before anything can read or change that registry after it. One exception: a
/// read that fails with the process still there (out of descriptors or memory) leaves that
/// registration and those after it staged for a retry, and the call that met the failure
/// answers without them (up to `READ_ATTEMPTS` reads, then it is recorded without a
/// process). Cheap when nothing is staged (one atomic load).
pub(crate) fn settle(env: Env) {
    if STAGED_COUNT.load(Ordering::SeqCst) == 0 {
        return;
    }
    let _settling = SETTLING.lock().unwrap_or_else(|e| e.into_inner());
    let batch = std::mem::take(&mut *STAGED.lock().unwrap_or_else(|e| e.into_inner()));
    let mut batch = batch.into_iter();
    while let Some(mut staged) = batch.next() {
        let (python, port_child) = match staged.pinned.read() {
            Ok(PinnedRead::Present { identity, ppid }) => recorded(identity, ppid),
            // It exited and was reaped before it was read: nothing is left of it to track
            // or to end; the entry is recorded without an OS process.
            Ok(PinnedRead::Gone) => (None, false),
            // The process is there but its stat could not be read (out of descriptors or
            // memory; /proc was checked readable before staging): it and everything staged
            // after it wait, in order, for the next settle, up to READ_ATTEMPTS reads.
            Err(_) if staged.attempts + 1 < READ_ATTEMPTS => {
                staged.attempts += 1;
                let mut queue = STAGED.lock().unwrap_or_else(|e| e.into_inner());
                let later = std::mem::take(&mut *queue);
                queue.push(staged);
                queue.extend(batch);
                queue.extend(later);
                drop(queue);
                // The retry must not wait for a registry call that may never come (a
                // guardian's take, which may be running this, cleared the flags).
                wake(Sender::Env(env), Urgency::Soon);
                return;
            }
            // Given up: the entry is recorded without an OS process, and the guardian
            // logs it.
            Err(e) => {
                notify(
                    Sender::Env(env),
                    Notice::Unread {
                        pid: staged.pinned.pid().as_raw(),
                        key: staged.registration.key.clone(),
                        reason: e.reason(),
                    },
                );
                (None, false)
            }
        };
        drop(staged.pinned);
        apply(
            env,
            &staged.resource,
            staged.registration,
            python,
            port_child,
            true,
        );
        STAGED_COUNT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Puts a registration in its registry and tells the guardian. `staged`: its caller saw the
/// owner alive, so an owner found dead now died after registering, and its entry leaves at
/// once, as the owner's `down` would have taken it.
fn apply(
    env: Env,
    resource: &ResourceArc<RegistryResource>,
    registration: Registration,
    python: Option<ProcessIdentity>,
    port_child: bool,
    staged: bool,
) {
    let Registration {
        key,
        owner,
        fingerprint,
        registered_at,
    } = registration;
    let entry = WorkerEntry {
        owner,
        python,
        fingerprint,
        registered_at,
        alive: false,
        port_child,
    };
    // Told before the entry is in: whatever removes it (its owner's `down` on another
    // scheduler, an unregister) can only queue its release after this.
    if let Some(identity) = python {
        // Unguarded registrations are told too, for leak checks; the guardian ends only
        // guarded ones.
        let notice = Notice::Registered {
            identity,
            key: key.clone(),
            owner,
            guarded: resource.guarded,
            port_child,
        };
        notify(Sender::Env(env), notice);
    }
    let replaced = resource.registry.register(key.clone(), entry, |pid| {
        env.monitor(resource, pid).is_some()
    });
    let mut released = Vec::new();
    released.extend(replaced.and_then(|old| release_of(key.clone(), old)));
    if staged {
        let removed = resource.registry.remove_if_dead(&key, &owner);
        released.extend(removed.and_then(|(key, entry)| release_of(key, entry)));
    }
    notify_released(Sender::Env(env), resource.guarded, released);
}

/// `:ok`; `:not_running` when `registry` is neither a registry nor a registry's name.
fn registry_unregister<'a>(
    env: Env<'a>,
    [registry, worker_id]: [Term<'a>; 2],
) -> NifResult<Term<'a>> {
    let done = with_registry(registry, |resource| unregister(env, resource, worker_id));
    Ok(done.unwrap_or_else(atoms::not_running).encode(env))
}
crate::lean_nif!(registry_unregister, 2);

fn unregister(env: Env, resource: &RegistryResource, worker_id: Term) -> Atom {
    settle(env);
    let removed = with_key(worker_id, |key| {
        let (key, entry) = resource.registry.remove(key)?;
        release_of(key, entry)
    });
    if let Some(released) = removed {
        notify_released(Sender::Env(env), resource.guarded, [released]);
    }
    atoms::ok()
}

/// How many registrations are staged (their process pinned, not read yet) across this
/// VM's registries: normally 0 a few µs after a registration.
#[rustler::nif]
fn registry_staged() -> usize {
    STAGED_COUNT.load(Ordering::SeqCst)
}

/// Whether the guardian looks after this registry's processes (its `:guardian` option).
#[rustler::nif]
fn registry_guarded(resource: ResourceArc<RegistryResource>) -> bool {
    resource.guarded
}

/// Makes `pid` the guardian of this VM's registries (see [`GUARDIAN`]); `nil` detaches.
/// Notices queued before a detach stay for the next guardian, which must take them right
/// after attaching: a wake-up flag may be set with no message on its way (see [`wake`]).
#[rustler::nif]
fn guardian_attach(pid: Option<LocalPid>) -> Atom {
    *GUARDIAN.write().unwrap_or_else(|e| e.into_inner()) = pid;
    atoms::ok()
}

/// The `{pid, start_time}` of every live worker of the guarded ones of `registries`.
#[rustler::nif(schedule = "DirtyCpu")]
fn registries_live(env: Env, registries: Vec<ResourceArc<RegistryResource>>) -> Vec<(i32, u64)> {
    registries
        .iter()
        .filter(|r| r.guarded)
        .flat_map(|r| r.live_python(env))
        .map(|id| (id.pid.as_raw(), id.start_time))
        .collect()
}

/// For each `{pid, start_time}`: `true` when a live worker of a guarded registry among
/// `registries` names it, `false` when only unguarded ones do, `nil` when none does.
#[rustler::nif(schedule = "DirtyCpu")]
fn registries_hold(
    env: Env,
    registries: Vec<ResourceArc<RegistryResource>>,
    targets: Vec<(i64, u64)>,
) -> Vec<Option<bool>> {
    // identity => held by a guarded registry (true) or only by unguarded ones (false)
    let mut held: std::collections::HashMap<(i64, u64), bool> = std::collections::HashMap::new();
    for r in &registries {
        for id in r.live_python(env) {
            let guarded = held
                .entry((i64::from(id.pid.as_raw()), id.start_time))
                .or_default();
            *guarded |= r.guarded;
        }
    }
    targets.iter().map(|t| held.get(t).copied()).collect()
}

/// Registries by name (an atom), for the single-entry calls: the name is resolved here
/// instead of through `:persistent_term` and a resource term, which cost as much as the
/// lookup itself. A registry's table lives as long as the VM (`:persistent_term` holds it),
/// so each named one is leaked once into a `&'static` reference, which a call copies out
/// before it releases the lock: no call holds the lock while it works. A name is never
/// removed: were its `:persistent_term` key erased (only tests do), the single-entry calls
/// would still reach the old table until a new one takes the name.
static NAMED: RwLock<Vec<(ErlNifTerm, &'static ResourceArc<RegistryResource>)>> =
    RwLock::new(Vec::new());

/// Gives `resource` the name `name` for [`with_registry`]; a table made later for the same
/// name (its `:persistent_term` key was erased) takes the name over, as it does there.
#[rustler::nif]
fn registry_name(name: Atom, resource: ResourceArc<RegistryResource>) -> Atom {
    let mut named = NAMED.write().unwrap_or_else(|e| e.into_inner());
    let raw = name.as_c_arg();
    match named.iter_mut().find(|(n, _)| *n == raw) {
        Some((_, known)) if known.registry_ptr() == resource.registry_ptr() => {}
        Some((_, known)) => *known = Box::leak(Box::new(resource)),
        None => named.push((raw, Box::leak(Box::new(resource)))),
    }
    atoms::ok()
}

/// Calls `f` with the registry `registry` names: a registry term, or a name given with
/// `registry_name/2`. `None` for any other term (the caller falls back to the term).
fn with_registry<R>(
    registry: Term,
    f: impl FnOnce(&ResourceArc<RegistryResource>) -> R,
) -> Option<R> {
    if registry.is_atom() {
        let raw = registry.as_c_arg();
        let resource: &'static ResourceArc<RegistryResource> = NAMED
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(n, _)| *n == raw)
            .map(|(_, resource)| *resource)?;
        return Some(f(resource));
    }
    let resource: ResourceArc<RegistryResource> = registry.decode().ok()?;
    Some(f(&resource))
}

/// `{:ok, info}` or `{:error, :not_found}`; the map is built from the entry in place.
/// `:not_running` when `registry` is neither a registry nor a registry's name.
fn registry_get<'a>(env: Env<'a>, [registry, worker_id]: [Term<'a>; 2]) -> NifResult<Term<'a>> {
    Ok(
        with_registry(registry, |resource| get(env, resource, worker_id))
            .unwrap_or_else(|| atoms::not_running().encode(env)),
    )
}
crate::lean_nif!(registry_get, 2);

fn get<'a>(env: Env<'a>, resource: &RegistryResource, worker_id: Term<'a>) -> Term<'a> {
    settle(env);
    let mut encoder = InfoEncoder::new(env);
    let info = with_key(worker_id, |key| {
        resource.registry.get_with(key, |e| encoder.info(e, false))
    });
    match info {
        Some(info) => (atoms::ok(), info).encode(env),
        None => (atoms::error(), atoms::not_found()).encode(env),
    }
}

/// The entries, copied out shard by shard (each lock held only for its shard's copy, see
/// [`Listing`]) and encoded straight into a list.
#[rustler::nif(schedule = "DirtyCpu")]
fn registry_list(env: Env, resource: ResourceArc<RegistryResource>) -> Term {
    settle(env);
    let mut encoder = InfoEncoder::new(env);
    let mut list = Term::list_new_empty(env);
    resource.registry.visit_shards(
        &mut Listing::default(),
        |listing, key, entry| listing.copy(key, entry),
        |listing| {
            list = encoder.prepend_rows(listing, list);
            listing.bytes.clear();
            listing.rows.clear();
        },
    );
    list
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_by_fingerprint<'a>(
    env: Env<'a>,
    resource: ResourceArc<RegistryResource>,
    fingerprint: &str,
) -> Term<'a> {
    settle(env);
    InfoEncoder::new(env).pairs(resource.registry.by_fingerprint(fingerprint))
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_active_python_pids(env: Env, resource: ResourceArc<RegistryResource>) -> Vec<i32> {
    resource
        .live_python(env)
        .into_iter()
        .map(|id| id.pid.as_raw())
        .collect()
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_dead_workers(env: Env, resource: ResourceArc<RegistryResource>) -> Term {
    settle(env);
    InfoEncoder::new(env).pairs(resource.registry.dead())
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_remove_dead(env: Env, resource: ResourceArc<RegistryResource>) -> Vec<Term> {
    settle(env);
    resource
        .registry
        .remove_dead()
        .iter()
        .map(|k| key_term(env, k))
        .collect()
}

#[rustler::nif(schedule = "DirtyCpu")]
fn registry_stats(env: Env, resource: ResourceArc<RegistryResource>) -> Stats {
    settle(env);
    resource.registry.stats().into()
}
