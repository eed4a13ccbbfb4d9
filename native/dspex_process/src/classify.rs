//! The classification table of DESIGN.md, one process at a time. Rows are tried top to
//! bottom; the first that fits decides.

use crate::ancestry::{ancestors, Walk};
/// The ancestry types classification works with, from the layer below.
pub use crate::ancestry::{ProcInfo, ProcLookup, ProcessLookup, Seen};
use crate::identity::ProcessIdentity;
use crate::pid::Pid;
pub use crate::proc_facts::{is_beam, uptime_ticks};
use crate::scan::{scan, Candidate, Pattern};
use std::collections::HashSet;
use std::time::Duration;

/// Why an orphan is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrphanReason {
    /// Its marker names a BEAM that is no longer alive.
    OwnerDead,
    /// This BEAM's own worker process whose Elixir worker is gone.
    WorkerGone,
    /// Unmarked, and re-parented to PID 1 or a known subreaper.
    Reparented,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Zombie,
    Active,
    Starting,
    Foreign,
    Unmanaged,
    Orphan(OrphanReason),
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Zombie => "zombie",
            Class::Active => "active",
            Class::Starting => "starting",
            Class::Foreign => "foreign",
            Class::Unmanaged => "unmanaged",
            Class::Orphan(_) => "orphan",
        }
    }
}

impl OrphanReason {
    pub fn name(self) -> &'static str {
        match self {
            OrphanReason::OwnerDead => "owner_dead",
            OrphanReason::WorkerGone => "worker_gone",
            OrphanReason::Reparented => "reparented",
        }
    }
}

/// Who is looking: the VM (or nothing, for the CLI) and what it knows to be in use.
#[derive(Debug, Clone, Default)]
pub struct Viewpoint {
    /// This BEAM; `None` when the caller is not a BEAM (the CLI).
    pub beam: Option<ProcessIdentity>,
    /// Python processes of workers registered here whose Elixir process is alive. A set of
    /// identities: two entries may name one pid (a stale one and a live one).
    pub registered: HashSet<ProcessIdentity>,
    /// OS pids of this VM's open ports: in use, whether registered or not.
    pub port_pids: HashSet<Pid>,
    /// This VM's own unregistered processes younger than this are still starting.
    pub min_age: Duration,
}

/// A viewpoint plus the facts of the moment, in the units of `/proc`.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub view: Viewpoint,
    /// `min_age` in clock ticks.
    pub min_age_ticks: u64,
    /// Clock ticks since boot, now.
    pub now_ticks: u64,
    /// The inode of the reader's pid namespace: markers stamped in another namespace name
    /// pids that mean nothing here.
    pub pid_ns: Option<u64>,
}

/// Process names that adopt orphans besides PID 1 (`PR_SET_CHILD_SUBREAPER` users).
const KNOWN_SUBREAPERS: &[&str] = &[
    "systemd",
    "tini",
    "dumb-init",
    "docker-init",
    "catatonit",
    "s6-svscan",
];

impl Context {
    /// Registered here with a live worker (same start time), or the OS process of one of
    /// this VM's open ports.
    fn in_use(&self, pid: i32, start_time: u64) -> bool {
        let Ok(pid) = Pid::new(i64::from(pid)) else {
            return false;
        };
        self.view.port_pids.contains(&pid)
            || self
                .view
                .registered
                .contains(&ProcessIdentity { pid, start_time })
    }

    fn is_this_beam(&self, identity: &ProcessIdentity) -> bool {
        self.view.beam.as_ref() == Some(identity)
    }

    fn beam_pid(&self) -> Option<i32> {
        self.view.beam.map(|b| b.pid.as_raw())
    }

    fn age_ticks(&self, start_time: u64) -> u64 {
        self.now_ticks.saturating_sub(start_time)
    }
}

/// Classifies one candidate.
pub fn classify(candidate: &Candidate, ctx: &Context, lookup: &mut impl ProcessLookup) -> Class {
    let facts = &candidate.facts;
    if facts.has_exited() {
        return Class::Zombie;
    }
    if ctx.in_use(facts.pid.as_raw(), facts.start_time) {
        return Class::Active;
    }

    let (ancestry, walk) = ancestors(facts.ppid, lookup);
    let beam_pid = ctx.beam_pid();
    // A child the worker forked (multiprocessing), or anything an open port of ours runs,
    // is in use too. The walk stops at the first VM: what lies above belongs to it.
    if ancestry
        .iter()
        .take_while(|(_, info)| !is_beam(&info.comm))
        .any(|(p, info)| ctx.in_use(*p, info.start_time))
    {
        return Class::Active;
    }
    // A process belongs to the nearest VM above it: when that is another live VM, it is
    // that VM's, whatever its markers say (a nested VM's children inherit ours).
    let nearest_vm = ancestry
        .iter()
        .find(|(_, info)| is_beam(&info.comm))
        .map(|(p, _)| *p);
    if nearest_vm.is_some_and(|vm| Some(vm) != beam_pid) {
        return Class::Foreign;
    }
    // Started by one of the library's own tools: theirs, never a target.
    if ancestry
        .iter()
        .take_while(|(_, info)| !is_beam(&info.comm))
        .any(|(_, info)| crate::scan::OWN_TOOLS.contains(&info.comm.as_str()))
    {
        return Class::Foreign;
    }
    // An ancestor we cannot see (hidepid) may be a live VM: cannot tell means protected,
    // whatever the markers say.
    if nearest_vm.is_none() && walk == Walk::Hidden {
        return Class::Foreign;
    }

    let markers = candidate.markers.markers();
    // Stamped in another pid namespace (a container): its owner pid cannot be checked
    // from here, so it is never condemned from here.
    if let (Some(m), Some(ours)) = (markers, ctx.pid_ns) {
        if m.pid_ns.is_some_and(|theirs| theirs != ours) {
            return Class::Foreign;
        }
    }
    let direct_port_child = match (ctx.view.beam, ancestry.first()) {
        (Some(beam), Some((_, parent))) => {
            crate::proc_facts::is_port_helper_of(&parent.comm, parent.ppid, beam.pid.as_raw())
        }
        _ => false,
    };
    let own = match markers {
        Some(m) => ctx.is_this_beam(&m.owner),
        None => direct_port_child,
    };
    let young = ctx.age_ticks(facts.start_time) < ctx.min_age_ticks;

    if own {
        return if young {
            Class::Starting
        } else {
            Class::Orphan(OrphanReason::WorkerGone)
        };
    }

    if let Some(m) = markers {
        return match owner_state(&m.owner, lookup) {
            OwnerState::Alive | OwnerState::Unknown => Class::Foreign,
            OwnerState::Dead => Class::Orphan(OrphanReason::OwnerDead),
        };
    }

    // Unmarked (no markers, or an environment we may not read). A parent we cannot read
    // (gone this instant, or hidden by hidepid) proves nothing: protected, unless the
    // kernel already says the parent is PID 1.
    match ancestry.first() {
        _ if facts.ppid == 1 => Class::Orphan(OrphanReason::Reparented),
        None => Class::Unmanaged,
        Some((_, parent)) if KNOWN_SUBREAPERS.contains(&parent.comm.as_str()) => {
            Class::Orphan(OrphanReason::Reparented)
        }
        Some(_) => Class::Unmanaged,
    }
}

/// One classified candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub candidate: Candidate,
    pub class: Class,
    /// How long the process has been running, in milliseconds.
    pub age_ms: u64,
}

/// Scans `/proc` for `pattern` and classifies every match as seen from `view`. An error
/// when `/proc` could not be read in full (see [`scan`]).
pub fn detect(pattern: &Pattern, view: Viewpoint) -> std::io::Result<Vec<Detection>> {
    let ticks = procfs::ticks_per_second();
    let min_age_ms = u64::try_from(view.min_age.as_millis()).unwrap_or(u64::MAX);
    let ctx = Context {
        min_age_ticks: min_age_ms.saturating_mul(ticks) / 1000,
        now_ticks: uptime_ticks(ticks),
        pid_ns: crate::markers::own_pid_namespace(),
        view,
    };
    let mut lookup = ProcLookup::default();
    Ok(scan(pattern)?
        .into_iter()
        .map(|candidate| {
            let class = classify(&candidate, &ctx, &mut lookup);
            let age_ms = ctx.age_ticks(candidate.facts.start_time) * 1000 / ticks.max(1);
            Detection {
                candidate,
                class,
                age_ms,
            }
        })
        .collect())
}

/// What is known of the BEAM a marker names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerState {
    /// Same pid, same start time, a VM's name, not exited.
    Alive,
    /// Its pid is free, names another process, or names a zombie (exited, not yet reaped).
    Dead,
    /// Its pid exists but cannot be read (hidepid, EACCES): it may be the live owner.
    Unknown,
}

/// Whether `owner` names a live BEAM now.
pub fn owner_state(owner: &ProcessIdentity, lookup: &mut impl ProcessLookup) -> OwnerState {
    match lookup.get(owner.pid.as_raw()) {
        Seen::Found(info) => {
            if info.start_time == owner.start_time && is_beam(&info.comm) && !info.exited {
                OwnerState::Alive
            } else {
                OwnerState::Dead
            }
        }
        Seen::Gone => OwnerState::Dead,
        Seen::Hidden => OwnerState::Unknown,
    }
}

pub use crate::sys::pid_exists;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markers::Markers;
    use crate::proc_facts::{ProcessFacts, ProcessState};
    use crate::scan::MarkerRead;
    use std::collections::HashMap;

    const BEAM: i32 = 100;
    const HELPER: i32 = 101;
    const OTHER_BEAM: i32 = 200;
    const SHELL: i32 = 300;

    struct Table(HashMap<i32, ProcInfo>);

    impl ProcessLookup for Table {
        fn get(&mut self, pid: i32) -> Seen {
            match self.0.get(&pid) {
                Some(info) if info.comm == HIDDEN => Seen::Hidden,
                Some(info) => Seen::Found(info.clone()),
                None => Seen::Gone,
            }
        }
    }

    /// The comm of table entries that exist but cannot be read (hidepid).
    const HIDDEN: &str = "<hidden>";

    fn info(ppid: i32, start_time: u64, comm: &str) -> ProcInfo {
        ProcInfo {
            ppid,
            start_time,
            comm: comm.into(),
            exited: false,
        }
    }

    fn table() -> Table {
        Table(HashMap::from([
            (1, info(0, 1, "init")),
            (BEAM, info(1, 10, "beam.smp")),
            (HELPER, info(BEAM, 11, "erl_child_setup")),
            (OTHER_BEAM, info(1, 20, "beam.smp")),
            (201, info(OTHER_BEAM, 21, "erl_child_setup")),
            (SHELL, info(1, 30, "bash")),
            (400, info(1, 40, "systemd")),
            (500, info(HELPER, 900, "python3")),
        ]))
    }

    fn id(pid: i32, start_time: u64) -> ProcessIdentity {
        ProcessIdentity {
            pid: Pid::new(i64::from(pid)).unwrap(),
            start_time,
        }
    }

    fn ctx() -> Context {
        Context {
            view: Viewpoint {
                beam: Some(id(BEAM, 10)),
                ..Viewpoint::default()
            },
            min_age_ticks: 100,
            now_ticks: 1000,
            pid_ns: Some(4026531836),
        }
    }

    fn candidate(pid: i32, ppid: i32, start: u64, owner: Option<(i32, u64)>) -> Candidate {
        Candidate {
            facts: ProcessFacts {
                pid: Pid::new(i64::from(pid)).unwrap(),
                ppid,
                pgid: pid,
                sid: pid,
                uid: 0,
                state: ProcessState::Sleeping,
                start_time: start,
                comm: "python3".into(),
                threads: 1,
                argv: vec!["python3".into(), "dspy_bridge.py".into()],
                cmdline: b"python3\0dspy_bridge.py\0".to_vec(),
            },
            markers: match owner {
                Some((p, s)) => MarkerRead::Present(Markers {
                    owner: id(p, s),
                    pid_ns: None,
                    run_id: None,
                    worker_id: None,
                    fingerprint: None,
                }),
                None => MarkerRead::Absent,
            },
        }
    }

    fn class_of(c: &Candidate, ctx: &Context) -> Class {
        classify(c, ctx, &mut table())
    }

    #[test]
    fn zombies_come_first() {
        let mut c = candidate(500, HELPER, 900, Some((BEAM, 10)));
        c.facts.state = ProcessState::Zombie;
        let mut ctx = ctx();
        ctx.view.registered.insert(id(500, 900));
        assert_eq!(class_of(&c, &ctx), Class::Zombie);
    }

    #[test]
    fn registered_with_live_worker_is_active_only_with_the_same_start_time() {
        let c = candidate(500, HELPER, 500, Some((BEAM, 10)));
        let mut ctx = ctx();
        ctx.view.registered.insert(id(500, 500));
        assert_eq!(class_of(&c, &ctx), Class::Active);
        // A stale entry for the same pid does not hide the live one.
        ctx.view.registered.insert(id(500, 499));
        assert_eq!(class_of(&c, &ctx), Class::Active);

        // Same pid, other start time: a recycled pid is not the registered worker.
        ctx.view.registered.remove(&id(500, 500));
        assert_eq!(class_of(&c, &ctx), Class::Orphan(OrphanReason::WorkerGone));

        // Not registered (its Elixir worker died) but still the OS process of an open
        // port of this VM: in use.
        ctx.view.registered.clear();
        ctx.view.port_pids.insert(c.facts.pid);
        assert_eq!(class_of(&c, &ctx), Class::Active);
    }

    #[test]
    fn children_of_an_active_worker_or_port_are_active() {
        let child = candidate(501, 500, 950, Some((BEAM, 10)));
        let mut registered = ctx();
        registered.view.registered.insert(id(500, 900));
        assert_eq!(class_of(&child, &registered), Class::Active);

        let mut port = ctx();
        port.view.port_pids.insert(Pid::new(500).unwrap());
        assert_eq!(class_of(&child, &port), Class::Active);
    }

    #[test]
    fn protection_by_ancestry_stops_at_the_first_vm() {
        // Another VM that is itself one of our port programs: its workers are its own.
        let mut t = table();
        let mut ctx = ctx();
        ctx.view
            .port_pids
            .insert(Pid::new(i64::from(OTHER_BEAM)).unwrap());
        let theirs = candidate(720, 201, 100, Some((OTHER_BEAM, 20)));
        assert_eq!(classify(&theirs, &ctx, &mut t), Class::Foreign);
        // A shell that is our port program: what it runs is in use.
        t.0.insert(360, info(HELPER, 36, "sh"));
        ctx.view.port_pids.insert(Pid::new(360).unwrap());
        assert_eq!(
            classify(&candidate(721, 360, 100, None), &ctx, &mut t),
            Class::Active
        );
    }

    #[test]
    fn markers_from_another_pid_namespace_are_never_condemned() {
        let mut c = candidate(700, 1, 100, Some((4242, 1)));
        if let MarkerRead::Present(m) = &mut c.markers {
            m.pid_ns = Some(1);
        }
        assert_eq!(class_of(&c, &ctx()), Class::Foreign);
        // Same namespace: the dead owner condemns it.
        if let MarkerRead::Present(m) = &mut c.markers {
            m.pid_ns = ctx().pid_ns;
        }
        assert_eq!(class_of(&c, &ctx()), Class::Orphan(OrphanReason::OwnerDead));
    }

    #[test]
    fn a_live_beam_above_protects_whatever_the_marker_says() {
        // The marker names a dead BEAM, but the process runs under another live BEAM.
        let c = candidate(710, 201, 100, Some((4242, 1)));
        assert_eq!(class_of(&c, &ctx()), Class::Foreign);
        // It names *this* BEAM (inherited by a nested VM's child), under another live VM.
        let nested = candidate(711, 201, 100, Some((BEAM, 10)));
        assert_eq!(class_of(&nested, &ctx()), Class::Foreign);
        // Our own leaked worker, under our own helper: the nearest VM is us.
        let ours = candidate(712, HELPER, 100, Some((BEAM, 10)));
        assert_eq!(
            class_of(&ours, &ctx()),
            Class::Orphan(OrphanReason::WorkerGone)
        );
    }

    #[test]
    fn emulator_flavours_are_beams() {
        for comm in ["beam.smp", "beam", "beam.debug.smp", "beam.lcnt.smp"] {
            assert!(is_beam(comm), "{comm}");
        }
        for comm in ["python3", "erl_child_setup", "bash", "epmd"] {
            assert!(!is_beam(comm), "{comm}");
        }
    }

    #[test]
    fn own_unregistered_workers_start_then_become_orphans() {
        let ctx = ctx();
        let young = candidate(600, HELPER, 950, Some((BEAM, 10)));
        assert_eq!(class_of(&young, &ctx), Class::Starting);
        let old = candidate(600, 1, 100, Some((BEAM, 10)));
        assert_eq!(
            class_of(&old, &ctx),
            Class::Orphan(OrphanReason::WorkerGone)
        );

        // Unmarked direct port child: ours by ancestry.
        let unmarked_young = candidate(601, HELPER, 950, None);
        assert_eq!(class_of(&unmarked_young, &ctx), Class::Starting);
        let unmarked_old = candidate(601, HELPER, 100, None);
        assert_eq!(
            class_of(&unmarked_old, &ctx),
            Class::Orphan(OrphanReason::WorkerGone)
        );
    }

    #[test]
    fn markers_of_a_live_beam_protect_and_of_a_dead_one_condemn() {
        let ctx = ctx();
        let foreign = candidate(700, 1, 100, Some((OTHER_BEAM, 20)));
        assert_eq!(class_of(&foreign, &ctx), Class::Foreign);
        // The other BEAM's pid now belongs to a process with another start time.
        let recycled = candidate(700, 1, 100, Some((OTHER_BEAM, 19)));
        assert_eq!(
            class_of(&recycled, &ctx),
            Class::Orphan(OrphanReason::OwnerDead)
        );
        // The pid is alive with the right start time but it is not a BEAM.
        let not_beam = candidate(700, 1, 100, Some((SHELL, 30)));
        assert_eq!(
            class_of(&not_beam, &ctx),
            Class::Orphan(OrphanReason::OwnerDead)
        );
        let gone = candidate(700, 1, 100, Some((4242, 1)));
        assert_eq!(
            class_of(&gone, &ctx),
            Class::Orphan(OrphanReason::OwnerDead)
        );
    }

    #[test]
    fn unmarked_processes_by_ancestry() {
        let ctx = ctx();
        assert_eq!(
            class_of(&candidate(800, 201, 100, None), &ctx),
            Class::Foreign
        );
        assert_eq!(
            class_of(&candidate(801, SHELL, 100, None), &ctx),
            Class::Unmanaged
        );
        assert_eq!(
            class_of(&candidate(802, 1, 100, None), &ctx),
            Class::Orphan(OrphanReason::Reparented)
        );
        assert_eq!(
            class_of(&candidate(803, 400, 100, None), &ctx),
            Class::Orphan(OrphanReason::Reparented)
        );
        // A parent we cannot read (gone this instant, or hidden): protected.
        assert_eq!(
            class_of(&candidate(804, 9999, 100, None), &ctx),
            Class::Unmanaged
        );
        // A grandchild of this BEAM through a shell is not a port child: unmanaged.
        let mut t = table();
        t.0.insert(350, info(HELPER, 35, "sh"));
        assert_eq!(
            classify(&candidate(805, 350, 100, None), &ctx, &mut t),
            Class::Unmanaged
        );
    }

    #[test]
    fn without_a_beam_markers_still_decide() {
        let mut ctx = ctx();
        ctx.view.beam = None;
        // From the CLI, a worker of a live BEAM is foreign and one of a dead BEAM an orphan.
        assert_eq!(
            class_of(&candidate(900, HELPER, 100, Some((BEAM, 10))), &ctx),
            Class::Foreign
        );
        assert_eq!(
            class_of(&candidate(901, 1, 100, Some((4242, 1))), &ctx),
            Class::Orphan(OrphanReason::OwnerDead)
        );
        // Unmarked port child of a live BEAM: foreign by ancestry.
        assert_eq!(
            class_of(&candidate(902, HELPER, 100, None), &ctx),
            Class::Foreign
        );
    }

    #[test]
    fn what_cannot_be_seen_protects() {
        let ctx = ctx();
        let mut t = table();
        // hidepid: the owner VM exists but cannot be read. Never "owner dead".
        t.0.insert(4242, info(1, 1, HIDDEN));
        let marked = candidate(900, 1, 100, Some((4242, 1)));
        assert_eq!(classify(&marked, &ctx, &mut t), Class::Foreign);
        // A hidden parent (the VM's port helper, say) of a marked or an unmarked process:
        // what lies above may be a live VM.
        t.0.insert(950, info(1, 50, HIDDEN));
        let under_hidden = candidate(901, 950, 100, Some((9999, 1)));
        assert_eq!(classify(&under_hidden, &ctx, &mut t), Class::Foreign);
        let unmarked = candidate(902, 950, 100, None);
        assert_eq!(classify(&unmarked, &ctx, &mut t), Class::Foreign);
        // Hidden higher up the chain, above a visible shell.
        t.0.insert(951, info(950, 51, "sh"));
        let deeper = candidate(903, 951, 100, Some((9999, 1)));
        assert_eq!(classify(&deeper, &ctx, &mut t), Class::Foreign);
        // PID 1 unreadable is still init: a re-parented process is an orphan.
        t.0.insert(1, info(0, 1, HIDDEN));
        let reparented = candidate(904, 1, 100, None);
        assert_eq!(
            classify(&reparented, &ctx, &mut t),
            Class::Orphan(OrphanReason::Reparented)
        );
        let dead_owner = candidate(905, 1, 100, Some((9999, 1)));
        assert_eq!(
            classify(&dead_owner, &ctx, &mut t),
            Class::Orphan(OrphanReason::OwnerDead)
        );
    }

    #[test]
    fn a_zombie_owner_is_dead() {
        let ctx = ctx();
        let mut t = table();
        t.0.get_mut(&OTHER_BEAM).unwrap().exited = true;
        let c = candidate(700, 1, 100, Some((OTHER_BEAM, 20)));
        assert_eq!(
            classify(&c, &ctx, &mut t),
            Class::Orphan(OrphanReason::OwnerDead)
        );
    }

    #[test]
    fn what_our_own_tools_start_is_theirs() {
        let ctx = ctx();
        let mut t = table();
        t.0.insert(360, info(1, 36, "kill_python.sh"));
        assert_eq!(
            classify(&candidate(361, 360, 100, None), &ctx, &mut t),
            Class::Foreign
        );
    }

    #[test]
    fn workers_of_a_zombie_vm_are_orphans() {
        use crate::test_util::{eventually, script_named, unique_tag, PYTHON};
        use std::process::Command;
        // A stand-in VM: `sleep` under the name beam.smp. This test is its parent, kills it
        // with SIGKILL and does not reap it: a zombie that keeps its name and start time.
        let dir = script_named(b"unused", "").parent().unwrap().to_path_buf();
        let fake_beam = dir.join("beam.smp");
        std::fs::copy("/bin/sleep", &fake_beam).unwrap();
        let mut vm = Command::new(&fake_beam).arg("60").spawn().unwrap();
        let vm_pid = Pid::new(i64::from(vm.id())).unwrap();
        let vm_id = ProcessIdentity::of(vm_pid).unwrap();
        assert!(eventually(Duration::from_secs(5), || {
            crate::Stat::read(vm_pid.as_raw()).is_ok_and(|s| s.comm == "beam.smp")
        }));
        let tag = unique_tag("zombie_vm");
        let script = script_named(tag.as_bytes(), "import time\nwhile True: time.sleep(1)");
        let mut worker = Command::new(PYTHON.as_str())
            .arg(&script)
            .env("DSPEX_OWNER_PID", vm_id.pid.to_string())
            .env("DSPEX_OWNER_START", vm_id.start_time.to_string())
            .env(
                "DSPEX_OWNER_PIDNS",
                crate::markers::own_pid_namespace().unwrap().to_string(),
            )
            .spawn()
            .unwrap();
        let pattern = Pattern::new(&[tag.as_str()]).unwrap();
        let class = || {
            detect(&pattern, Viewpoint::default())
                .unwrap()
                .first()
                .map(|d| d.class)
        };
        assert!(eventually(Duration::from_secs(5), || class() == Some(Class::Foreign)));
        // SIGKILL, never reaped: the zombie is not a live VM.
        vm.kill().unwrap();
        assert!(eventually(Duration::from_secs(5), || {
            crate::Stat::read(vm_pid.as_raw()).is_ok_and(|s| s.has_exited())
        }));
        let got = class();
        worker.kill().unwrap();
        worker.wait().unwrap();
        vm.wait().unwrap();
        assert_eq!(got, Some(Class::Orphan(OrphanReason::OwnerDead)));
    }

    #[test]
    fn detect_on_real_processes_respects_min_age_and_registration() {
        use crate::test_util::{spawn_python, unique_tag};
        let tag = unique_tag("detect");
        let mut kids: Vec<_> = (0..2)
            .map(|_| spawn_python("import time; time.sleep(30)", &tag))
            .collect();
        let pattern = Pattern::new(&[tag.as_str()]).unwrap();
        let pids: Vec<Pid> = kids
            .iter()
            .map(|k| Pid::new(i64::from(k.id())).unwrap())
            .collect();
        // Our children, unmarked, parent alive and not a BEAM: unmanaged, whatever the age.
        assert!(crate::test_util::eventually(Duration::from_secs(5), || {
            detect(&pattern, Viewpoint::default()).unwrap().len() == 2
        }));
        let found = detect(&pattern, Viewpoint::default()).unwrap();
        assert!(
            found.iter().all(|d| d.class == Class::Unmanaged),
            "{found:?}"
        );

        // Registered: active.
        let start = ProcessIdentity::of(pids[0]).unwrap().start_time;
        let view = Viewpoint {
            registered: HashSet::from([ProcessIdentity {
                pid: pids[0],
                start_time: start,
            }]),
            ..Viewpoint::default()
        };
        let found = detect(&pattern, view).unwrap();
        let class_of = |pid: Pid| {
            found
                .iter()
                .find(|d| d.candidate.facts.pid == pid)
                .unwrap()
                .class
        };
        assert_eq!(class_of(pids[0]), Class::Active);
        assert_eq!(class_of(pids[1]), Class::Unmanaged);
        for k in &mut kids {
            k.kill().unwrap();
            k.wait().unwrap();
        }
        assert!(uptime_ticks(100) > 0);
    }
}
