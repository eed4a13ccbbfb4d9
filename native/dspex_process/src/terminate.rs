//! Parallel, bounded, identity-checked termination.
//!
//! Every target is pinned before anything is sent: a pidfd is opened, then the start time
//! is read again and compared with the one recorded. Once pinned, signals go through the
//! pidfd, which can never reach a process that later reuses the pid. Where pidfds are not
//! available (ENOSYS, or no descriptors to spare) the start time is re-checked right before
//! each `kill(2)` instead.
//!
//! All targets get SIGTERM at once (their whole process group too when they lead one), share
//! one `grace` deadline, survivors get SIGKILL, and everything is waited for `kill_wait`.
//! Total time is about `grace` whatever the number of targets.
//!
//! What is ended with a target (with `kill_group`): the members of its process group when it
//! leads one, and its descendants found by parent links (`/proc/PID/task/*/children`),
//! whatever their session or group. Each is pinned before anything is sent and passes the
//! same refusals as a target; nothing below a refused process (a VM, another user's) is
//! followed.
//!
//! What an outcome says is what *this call* did and saw:
//! - `Graceful`: our SIGTERM reached the live target, we sent no SIGKILL that reached
//!   anything, and the target and its pinned members had exited by the end.
//! - `ForceKilled`: a SIGKILL of ours reached the target or a pinned member, and all had
//!   exited by the end.
//! - `AlreadyGone`: the target had exited (or its pid named another process) before our
//!   first signal reached it. Its leftover members are still ended.
//! - `StillAlive`, `SignalFailed`, `Unverifiable`, `Refused`: errors; nothing is claimed.
//!
//! Only the kernel's "no such process" (ESRCH, or a pidfd reporting exit) means gone: a read
//! that fails for any other reason (EMFILE, EACCES, hidepid) is `Unverifiable`, never gone.
//!
//! Concurrent calls, in one process or several (two cleaners, a cleaner and a worker's
//! stop), take turns on a host-wide advisory lock (`flock` on [`LOCK_PATH`]) for the time
//! they signal and wait, so two calls never both report the same exit: the second finds
//! the processes gone. A caller waits for the lock at most `grace + kill_wait + 10 s`, then
//! goes on without it (its signals stay identity-checked; only the attribution of an exit
//! to one of two overlapping calls is then not exclusive).

use crate::cgroup::{self, Hierarchy, Unit, VmCgroup};
use crate::error::Error;
use crate::identity::ProcessIdentity;
use crate::pid::Pid;
#[cfg(test)]
use crate::proc_facts::ProcessFacts;
use crate::proc_facts::{all_pids, read_uid, Stat};
use crate::sys;
/// A typed errno (nix's), for the outcomes that carry the kernel's answer.
pub use nix::errno::Errno;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// Descriptors left free for everything else (the `/proc` reads of pinning and waiting, the
/// caller's own files) when pidfds are handed out.
const FD_RESERVE: usize = 16;
/// At most this many descendants of one target are followed.
const MAX_DESCENDANTS: usize = 4096;
/// The host-wide lock that concurrent terminations take turns on.
pub const LOCK_PATH: &str = "/tmp/.dspex_process.terminate.lock";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminateOptions {
    /// How long SIGTERM may take before SIGKILL.
    pub grace: Duration,
    /// How long to wait after SIGKILL before reporting a survivor.
    pub kill_wait: Duration,
    /// End the target's process group (when it leads one) and its descendants with it.
    /// `false`: the target alone.
    pub kill_group: bool,
    /// Allow targets owned by another uid.
    pub allow_other_users: bool,
}

impl Default for TerminateOptions {
    fn default() -> Self {
        TerminateOptions {
            grace: Duration::from_millis(1000),
            kill_wait: Duration::from_millis(1000),
            kill_group: true,
            allow_other_users: false,
        }
    }
}

/// Why a target was not signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The calling process itself.
    ThisProcess,
    /// An ancestor of the calling process.
    Ancestor,
    /// A member of the caller's own process group.
    OwnProcessGroup,
    /// Owned by another user, and `allow_other_users` is off.
    OtherUser,
    /// An Erlang VM: never a worker, never signalled by this library.
    Vm,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::ThisProcess => "refused_self",
            Refusal::Ancestor => "refused_ancestor",
            Refusal::OwnProcessGroup => "refused_own_group",
            Refusal::OtherUser => "refused_other_user",
            Refusal::Vm => "refused_vm",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Our SIGTERM reached it and it exited within the grace period, with no SIGKILL of ours.
    Graceful,
    /// Our SIGKILL reached it (or a member of its group or a descendant), then all exited.
    ForceKilled,
    /// Gone before our first signal reached it, or its pid names another process now.
    AlreadyGone,
    Refused(Refusal),
    /// Still there `kill_wait` after SIGKILL (stopped under ptrace, uninterruptible sleep).
    StillAlive,
    /// The kernel refused the signal (e.g. EPERM).
    SignalFailed(Errno),
    /// Its identity or liveness could not be read (the errno: EMFILE, EACCES under hidepid,
    /// ...): nothing is known, so nothing was sent, or its end could not be confirmed.
    Unverifiable(Errno),
}

/// The policy counts an outcome as ended, already gone, or failed.
impl From<&Outcome> for crate::policy::Tally {
    fn from(outcome: &Outcome) -> crate::policy::Tally {
        match outcome {
            Outcome::Graceful | Outcome::ForceKilled => crate::policy::Tally::Ended,
            Outcome::AlreadyGone => crate::policy::Tally::AlreadyGone,
            _ => crate::policy::Tally::Failed,
        }
    }
}

/// What the caller is, for the refusals.
struct Caller {
    pid: i32,
    pgid: i32,
    euid: u32,
    ancestors: HashSet<i32>,
}

impl Caller {
    fn current() -> Caller {
        let mut chain = crate::ancestry::caller_and_ancestors();
        let pid = chain.remove(0);
        Caller {
            pid,
            pgid: nix::unistd::getpgrp().as_raw(),
            euid: nix::unistd::geteuid().as_raw(),
            ancestors: chain.into_iter().collect(),
        }
    }

    /// The refusals that the pid alone decides: checked before pinning, so that this
    /// process and its ancestors are refused whatever start time comes with them.
    fn refusal_of_pid(&self, pid: i32) -> Option<Refusal> {
        if pid == self.pid {
            Some(Refusal::ThisProcess)
        } else if self.ancestors.contains(&pid) {
            Some(Refusal::Ancestor)
        } else {
            None
        }
    }

    /// Why this caller may not signal a pinned process, if it may not. The one place the
    /// refusals are decided, for targets, members of their groups and descendants alike.
    fn refusal(&self, pid: i32, seen: &Seen, options: &TerminateOptions) -> Option<Refusal> {
        if let Some(refusal) = self.refusal_of_pid(pid) {
            Some(refusal)
        } else if seen.vm {
            Some(Refusal::Vm)
        } else if seen.pgid == self.pgid {
            Some(Refusal::OwnProcessGroup)
        } else if seen.uid != self.euid && !options.allow_other_users {
            Some(Refusal::OtherUser)
        } else {
            None
        }
    }
}

/// What pinning saw of a process, for the refusals and the parent links.
struct Seen {
    ppid: i32,
    pgid: i32,
    uid: u32,
    vm: bool,
}

/// What a signal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// The kernel took it for a live process.
    Delivered,
    /// The process had exited (ESRCH, or its pid names another process now).
    Gone,
    /// The kernel refused it (EPERM...).
    Failed(i32),
    /// Not sent: the identity could not be re-read (no pidfd to send through).
    Unverified(i32),
}

/// A process we hold on to: by pidfd, or by identity alone where pidfds are unavailable.
struct Pinned {
    identity: ProcessIdentity,
    pidfd: Option<OwnedFd>,
    exited: bool,
    /// The last liveness read failed with this errno (no pidfd): its exit is not known.
    unknown: Option<i32>,
    /// Reached by the target's group signal (a member of the group it leads).
    in_group: bool,
}

/// Pidfds that one call may still open.
struct Budget(usize);

impl Budget {
    /// What the descriptor limit leaves: the soft limit, minus what is open now, minus a
    /// reserve for everything else.
    fn of_this_process() -> Budget {
        let soft = sys::nofile_soft_limit();
        let open = std::fs::read_dir("/proc/self/fd").map_or(usize::MAX, |d| d.count());
        let soft = usize::try_from(soft).unwrap_or(usize::MAX);
        Budget(soft.saturating_sub(open.saturating_add(FD_RESERVE)))
    }

    fn take(&mut self) -> bool {
        if self.0 == 0 {
            return false;
        }
        self.0 -= 1;
        true
    }
}

impl Pinned {
    /// Pins `identity`: `Err(AlreadyGone)` when the pid is gone or is someone else now,
    /// `Err(Unverifiable)` when that cannot be read.
    fn pin(identity: ProcessIdentity, budget: &mut Budget) -> Result<(Pinned, Seen), Outcome> {
        let raw = identity.pid.as_raw();
        let pidfd = if budget.take() {
            match sys::pidfd_open(identity.pid) {
                Ok(fd) => Some(fd),
                Err(libc::ESRCH) => return Err(Outcome::AlreadyGone),
                // ENOSYS, EMFILE, ENFILE...: identity-checked kill(2) instead.
                Err(_) => {
                    budget.0 += 1;
                    None
                }
            }
        } else {
            None
        };
        let unreadable = |e: Error| unreadable(raw, pidfd.as_ref(), e);
        // Read after the pidfd is open: if the start time still matches, the pidfd names it.
        let stat = Stat::read(raw).map_err(unreadable)?;
        if stat.start_time != identity.start_time || stat.has_exited() {
            return Err(Outcome::AlreadyGone);
        }
        let uid = read_uid(raw).map_err(unreadable)?;
        let pinned = Pinned {
            identity,
            pidfd,
            exited: false,
            unknown: None,
            in_group: false,
        };
        Ok((
            pinned,
            Seen {
                ppid: stat.ppid,
                pgid: stat.pgid,
                uid,
                vm: crate::proc_facts::is_beam(&stat.comm),
            },
        ))
    }

    /// Sends `signal` to this process alone.
    fn signal(&mut self, signal: libc::c_int) -> Sent {
        let rc = match &self.pidfd {
            Some(fd) => sys::pidfd_send_signal(fd, signal),
            None => match self.check() {
                Ok(true) => sys::kill(self.identity.pid.as_raw(), signal),
                Ok(false) => Err(libc::ESRCH),
                Err(errno) => return Sent::Unverified(errno),
            },
        };
        match rc {
            Ok(()) => Sent::Delivered,
            Err(libc::ESRCH) => {
                self.exited = true;
                Sent::Gone
            }
            Err(e) => Sent::Failed(e),
        }
    }

    /// Sends `signal` to the process group this process leads, while it lives. Best effort:
    /// it reaches members forked after pinning; pinned members and the leader itself are
    /// also signalled one by one, and only that decides what is reported (a leader that
    /// left its group makes the group signal fail with ESRCH while it lives on).
    fn signal_group(&self, signal: libc::c_int) {
        let pid = self.identity.pid.as_raw();
        match &self.pidfd {
            Some(fd) => {
                if sys::pidfd_signal_group(fd, signal) == Err(libc::EINVAL) && self.is_alive() {
                    // Kernel before 6.9. The group is the leader's, and the leader is
                    // pinned and alive: its pgid cannot have been reused.
                    let _ = sys::kill(-pid, signal);
                }
            }
            None => {
                if self.check() == Ok(true) {
                    let _ = sys::kill(-pid, signal);
                }
            }
        }
    }

    /// Without a pidfd: whether the pid still names this process, alive. `Err(errno)` when
    /// that cannot be read (only ESRCH means gone).
    fn check(&self) -> Result<bool, i32> {
        let raw = self.identity.pid.as_raw();
        match Stat::read(raw) {
            Ok(s) => Ok(s.start_time == self.identity.start_time && !s.has_exited()),
            // Without a pidfd (this path has none): what the failed read says.
            Err(e) => match unreadable(raw, None, e) {
                Outcome::Unverifiable(errno) => Err(errno as i32),
                _ => Ok(false), // AlreadyGone, its only other answer
            },
        }
    }

    fn is_alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => !sys::poll_exited(&[fd.as_fd()], 0)[0],
            None => self.check() != Ok(false),
        }
    }
}

/// What a failed read of `pid`'s `/proc` files says of it: gone only when no process has
/// the pid (or its pidfd says it exited); any other failure cannot be verified.
fn unreadable(pid: i32, pidfd: Option<&OwnedFd>, e: Error) -> Outcome {
    match e {
        Error::NoSuchProcess(_) if !exists(pid, pidfd) => Outcome::AlreadyGone,
        // hidepid hides a live process as ENOENT: it exists, we cannot read it.
        Error::NoSuchProcess(_) => Outcome::Unverifiable(Errno::EACCES),
        e => Outcome::Unverifiable(Errno::from_raw(e.errno())),
    }
}

/// Whether the process behind `pid` (or the pidfd, when there is one) still exists.
fn exists(pid: i32, pidfd: Option<&OwnedFd>) -> bool {
    match pidfd {
        Some(fd) => !sys::poll_exited(&[fd.as_fd()], 0)[0],
        None => sys::pid_exists(pid),
    }
}

/// Whether this kernel has pidfds (Linux 5.3+): opens one on the calling process.
pub fn pidfd_supported() -> bool {
    Pid::new(i64::from(std::process::id()))
        .map(|me| sys::pidfd_open(me).is_ok())
        .unwrap_or(false)
}

/// Waits until every pinned process has exited or `deadline` passes.
fn wait_all(pinned: &mut [&mut Pinned], deadline: Instant) {
    loop {
        let mut with_fd = Vec::new();
        for (i, p) in pinned.iter_mut().enumerate() {
            if p.exited {
                continue;
            }
            match &p.pidfd {
                Some(_) => with_fd.push(i),
                None => match p.check() {
                    Ok(alive) => {
                        p.exited = !alive;
                        p.unknown = None;
                    }
                    Err(errno) => p.unknown = Some(errno),
                },
            }
        }
        let legacy_left = pinned.iter().any(|p| !p.exited && p.pidfd.is_none());
        if with_fd.is_empty() && !legacy_left {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        // Processes without a pidfd are polled every 20 ms.
        let slice = if legacy_left {
            left.min(Duration::from_millis(20))
        } else {
            left
        };
        let timeout = i32::try_from(slice.as_millis().max(1)).unwrap_or(i32::MAX);
        if with_fd.is_empty() {
            std::thread::sleep(slice);
            continue;
        }
        let exited = {
            let fds: Vec<BorrowedFd<'_>> = with_fd
                .iter()
                .filter_map(|&i| pinned[i].pidfd.as_ref().map(|fd| fd.as_fd()))
                .collect();
            sys::poll_exited(&fds, timeout)
        };
        for (i, exited) in with_fd.iter().zip(exited) {
            if exited {
                pinned[*i].exited = true;
            }
        }
    }
}

/// One target and the members of its group and its descendants that we hold on to.
struct Job {
    leader: Pinned,
    /// The target leads its group and every member may be signalled: one signal to the
    /// group also reaches children forked after the scan.
    group: bool,
    /// The other members of the target's group and its descendants, pinned, each signalled
    /// on its own.
    members: Vec<Pinned>,
    /// The target had exited before our first signal reached it.
    gone_first: bool,
    /// A SIGKILL of ours reached a live process of this job.
    killed: bool,
    failed: Option<i32>,
    unverified: Option<i32>,
}

impl Job {
    fn all_exited(&self) -> bool {
        self.leader.exited && self.members.iter().all(|m| m.exited)
    }

    fn everyone(&mut self) -> impl Iterator<Item = &mut Pinned> {
        std::iter::once(&mut self.leader).chain(self.members.iter_mut())
    }

    fn outcome(&self) -> Outcome {
        let unknown = self.everyone_ref().find_map(|p| p.unknown);
        match (self.failed, self.gone_first, self.all_exited()) {
            (Some(errno), _, _) => Outcome::SignalFailed(Errno::from_raw(errno)),
            (None, true, true) => Outcome::AlreadyGone,
            (None, _, false) => match self.unverified.or(unknown) {
                Some(errno) => Outcome::Unverifiable(Errno::from_raw(errno)),
                None => Outcome::StillAlive,
            },
            (None, false, true) if self.killed => Outcome::ForceKilled,
            (None, false, true) => Outcome::Graceful,
        }
    }

    fn everyone_ref(&self) -> impl Iterator<Item = &Pinned> {
        std::iter::once(&self.leader).chain(self.members.iter())
    }

    /// Sends `signal`: to the leader first (what it answers decides whether it was already
    /// gone), then its group while it lives, then each pinned member that still runs.
    fn signal(&mut self, signal: libc::c_int, first: bool) {
        if !self.leader.exited {
            match self.leader.signal(signal) {
                Sent::Delivered => {
                    if signal == libc::SIGKILL {
                        self.killed = true;
                    }
                    if self.group {
                        self.leader.signal_group(signal);
                    }
                }
                Sent::Gone => self.gone_first |= first,
                Sent::Failed(errno) => self.failed = Some(errno),
                Sent::Unverified(errno) => self.unverified = Some(errno),
            }
        }
        for member in self.members.iter_mut().filter(|m| !m.exited) {
            if member.signal(signal) == Sent::Delivered && signal == libc::SIGKILL {
                self.killed = true;
            }
        }
    }
}

/// Terminates `targets`, each identified by pid and start time, in parallel. Returns one
/// outcome per target, in order. Containment cgroups are used as
/// [`terminate_contained`] describes, with no per-VM cgroup of the caller's own.
pub fn terminate(targets: &[ProcessIdentity], options: &TerminateOptions) -> Vec<Outcome> {
    terminate_contained(targets, options, None)
}

/// The processes pinned or vetted so far, each with whether it may be signalled: one
/// refused as a group member or a descendant must also keep its cgroup from `cgroup.kill`.
type Taken = HashMap<i32, bool>;

/// A containment cgroup to end with its targets, and the processes pinned in it.
struct UnitJob {
    unit: Unit,
    members: Vec<Pinned>,
    /// Every member may be signalled: `cgroup.kill` may be written.
    killable: bool,
    killed: bool,
}

/// Terminates `targets` like [`terminate`], and ends their containment cgroups with them.
///
/// A target's cgroup is used when `kill_group` is on and the target sits (or, when it is
/// gone already, sat) in a cgroup this library made for it: the leaf named after it in
/// `own` (the caller's per-VM cgroup), or a leaf (or the whole per-VM cgroup) of a VM that
/// is dead. A leaf of a live VM named after another process is never used: that process
/// may be in use. Every process of the cgroup is pinned (pidfd, then its cgroup read again)
/// and vetted like a group member, gets SIGTERM with the target, and after the grace
/// `cgroup.kill` ends whatever is left there, including processes forked meanwhile; a
/// cgroup holding a process that may not be signalled (another user's, a VM, the caller's
/// family) is never killed as a whole, its vetted members get SIGKILL one by one. Empty
/// cgroups are removed at the end.
pub fn terminate_contained(
    targets: &[ProcessIdentity],
    options: &TerminateOptions,
    own: Option<&VmCgroup>,
) -> Vec<Outcome> {
    let caller = Caller::current();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; targets.len()];
    let mut jobs: Vec<(usize, Job)> = Vec::new();
    let mut seen = HashSet::new();

    // Take turns with other terminations on this host (see the module documentation).
    let _turn =
        take_turn(Instant::now() + options.grace + options.kill_wait + Duration::from_secs(10));
    let mut budget = Budget::of_this_process();
    let hierarchy = if options.kill_group {
        Hierarchy::find()
    } else {
        None
    };
    let pid_ns = crate::markers::own_pid_namespace();
    let mut units: Vec<UnitJob> = Vec::new();
    // For each target, the index of its unit.
    let mut unit_of: Vec<Option<usize>> = vec![None; targets.len()];
    let add_unit = |units: &mut Vec<UnitJob>, unit: Unit| -> usize {
        if let Some(at) = units.iter().position(|u| u.unit == unit) {
            return at;
        }
        units.push(UnitJob {
            unit,
            members: Vec::new(),
            killable: true,
            killed: false,
        });
        units.len() - 1
    };

    for (i, target) in targets.iter().enumerate() {
        let pid = target.pid.as_raw();
        if let Some(refusal) = caller.refusal_of_pid(pid) {
            outcomes[i] = Some(Outcome::Refused(refusal));
            continue;
        }
        if !seen.insert(*target) {
            // The same process twice: one signal, the first entry reports it.
            outcomes[i] = Some(Outcome::AlreadyGone);
            continue;
        }
        let (leader, seen) = match Pinned::pin(*target, &mut budget) {
            Ok(pinned) => pinned,
            Err(outcome) => {
                // Gone: what it left in its own leaf still goes.
                if outcome == Outcome::AlreadyGone {
                    if let Some(leaf) = own.filter(|_| hierarchy.is_some()).map(|o| o.leaf(target))
                    {
                        if leaf.dir.exists() {
                            unit_of[i] = Some(add_unit(&mut units, leaf));
                        }
                    }
                }
                outcomes[i] = Some(outcome);
                continue;
            }
        };
        if let Some(refusal) = caller.refusal(pid, &seen, options) {
            outcomes[i] = Some(Outcome::Refused(refusal));
            continue;
        }
        if let Some(h) = &hierarchy {
            // Read after pinning: the cgroup is the pinned process's.
            if let Some(unit) = unit_for(h, target, own, pid_ns) {
                unit_of[i] = Some(add_unit(&mut units, unit));
            }
        }
        let group = options.kill_group && seen.pgid == pid;
        jobs.push((
            i,
            Job {
                leader,
                group,
                members: Vec::new(),
                gone_first: false,
                killed: false,
                failed: None,
                unverified: None,
            },
        ));
    }

    if options.kill_group {
        let mut taken: Taken = jobs
            .iter()
            .map(|(_, job)| (job.leader.identity.pid.as_raw(), true))
            .collect();
        pin_group_members(&mut jobs, &caller, options, &mut budget, &mut taken);
        pin_descendants(&mut jobs, &caller, options, &mut budget, &mut taken);
        pin_unit_members(&mut units, &caller, options, &mut budget, &mut taken);
    }

    // SIGTERM to everyone at once.
    for unit in units.iter_mut() {
        for member in unit.members.iter_mut() {
            member.signal(libc::SIGTERM);
        }
    }
    for (_, job) in jobs.iter_mut() {
        job.signal(libc::SIGTERM, true);
    }
    let grace_deadline = Instant::now() + options.grace;
    wait_jobs(&mut jobs, &mut units, grace_deadline);

    // SIGKILL to whatever is left.
    let mut any_killed = false;
    for (_, job) in jobs.iter_mut() {
        if job.all_exited() || job.failed.is_some() {
            continue;
        }
        any_killed = true;
        job.signal(libc::SIGKILL, false);
    }
    // Whatever is left in a cgroup goes with `cgroup.kill`, or member by member.
    for unit in units.iter_mut() {
        if unit.killable {
            if unit.unit.populated() == Some(true) && unit.unit.kill().is_ok() {
                unit.killed = true;
                any_killed = true;
            }
        } else {
            for member in unit.members.iter_mut().filter(|m| !m.exited) {
                unit.killed = true;
                any_killed = true;
                member.signal(libc::SIGKILL);
            }
        }
    }
    if any_killed {
        let deadline = Instant::now() + options.kill_wait;
        wait_jobs(&mut jobs, &mut units, deadline);
        for unit in units.iter().filter(|u| u.killable && u.killed) {
            unit.unit
                .wait_empty(deadline.saturating_duration_since(Instant::now()));
        }
    }
    let mut unit_left = vec![false; units.len()];
    for (u, unit) in units.iter().enumerate() {
        // The kernel may take a moment to report an emptied cgroup: rmdir retries briefly.
        if unit.unit.populated() == Some(true) || !unit.unit.remove(Duration::from_millis(200)) {
            unit_left[u] = unit.killable || unit.members.iter().any(|m| !m.exited);
        }
    }

    for (i, job) in jobs {
        // A target's outcome covers its cgroup: what is left there keeps it from being
        // ended, and a cgroup.kill of ours makes it force-killed.
        let unit = unit_of[i];
        outcomes[i] = Some(match job.outcome() {
            Outcome::Graceful | Outcome::ForceKilled if unit.is_some_and(|u| unit_left[u]) => {
                Outcome::StillAlive
            }
            Outcome::Graceful if unit.is_some_and(|u| units[u].killed) => Outcome::ForceKilled,
            outcome => outcome,
        });
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::AlreadyGone))
        .collect()
}

/// Ends every process in the per-VM cgroup of a VM that is dead (TERM, the grace, then
/// `cgroup.kill` of each leaf) and removes the emptied cgroups. Refuses (returns nothing,
/// touches nothing) while the VM named by the cgroup is alive or cannot be judged from here.
/// Returns each process found with its outcome.
pub fn end_dead_vm_cgroup(
    vm: &VmCgroup,
    options: &TerminateOptions,
) -> Vec<(ProcessIdentity, Outcome)> {
    if cgroup::vm_alive(&vm.name, crate::markers::own_pid_namespace()) {
        return Vec::new();
    }
    let members: Vec<ProcessIdentity> = vm
        .as_unit()
        .procs()
        .into_iter()
        .filter_map(|raw| {
            let pid = Pid::new(i64::from(raw)).ok()?;
            ProcessIdentity::of(pid).ok()
        })
        .collect();
    let options = TerminateOptions {
        kill_group: true,
        ..*options
    };
    let outcomes = terminate_contained(&members, &options, None);
    vm.remove_empty();
    members.into_iter().zip(outcomes).collect()
}

fn wait_jobs(jobs: &mut [(usize, Job)], units: &mut [UnitJob], deadline: Instant) {
    let mut all: Vec<&mut Pinned> = jobs
        .iter_mut()
        .filter(|(_, job)| job.failed.is_none())
        .flat_map(|(_, job)| job.everyone())
        .chain(units.iter_mut().flat_map(|u| u.members.iter_mut()))
        .collect();
    wait_all(&mut all, deadline);
}

/// The containment cgroup to end with a pinned target, if there is one we may use: its own
/// leaf in the caller's per-VM cgroup, or any cgroup of a dead VM's (see
/// [`terminate_contained`]).
fn unit_for(
    hierarchy: &Hierarchy,
    target: &ProcessIdentity,
    own: Option<&VmCgroup>,
    pid_ns: Option<u64>,
) -> Option<Unit> {
    let path = Hierarchy::path_of(&target.pid.as_raw().to_string())
        .ok()
        .flatten()?;
    let (vm, unit) = cgroup::unit_of_path(hierarchy, &path)?;
    if own.is_some_and(|o| o.path == vm.path) || cgroup::vm_alive(&vm.name, pid_ns) {
        // A live VM's (ours, or one that merely looks alive): only the target's own leaf,
        // or the leaf of a process that is gone.
        let leaf = unit.dir.file_name()?.to_str()?;
        let named = cgroup::parse_leaf_name(leaf)?;
        let own_vm = own.is_some_and(|o| o.path == vm.path);
        if own_vm && (named == *target || named.is_gone()) {
            return Some(unit);
        }
        return None;
    }
    Some(unit)
}

/// A process found by pid for a signal that would reach it anyway (its group's, its
/// unit's `cgroup.kill`): pinned and read, gone, or unknown because a read failed. Only a
/// gone one may be left out of the vetting; an unknown one keeps that signal from being
/// sent (its members are signalled one by one instead).
enum Found {
    Pinned(Pinned, Seen),
    Gone,
    Unknown,
}

/// Reads `/proc/PID/stat` of a process found by pid: `Err(Found::Gone)` only when no
/// process has the pid any more; any other failure (EACCES, EMFILE, hidepid) is unknown,
/// and so is a pid that names no process of ours to read (0: `cgroup.procs` lists a
/// process of another pid namespace so).
fn read_found(raw: i32) -> Result<Stat, Found> {
    if Pid::from_kernel(raw).is_none() {
        return Err(Found::Unknown);
    }
    Stat::read(raw).map_err(|e| match unreadable(raw, None, e) {
        Outcome::AlreadyGone => Found::Gone,
        _ => Found::Unknown,
    })
}

/// Pins the process `stat` was read from (pid `raw`); pinning reads it again after its
/// pidfd is open, and that read is the one that counts. When pinning finds it gone, only
/// a process that no longer exists or has exited (a zombie) is gone: a pid held by another
/// process now is unknown, since the group's or unit's signal could reach that one
/// unvetted.
fn pin_as_read(raw: i32, stat: &Stat, budget: &mut Budget) -> Found {
    let Ok(pid) = Pid::new(i64::from(raw)) else {
        return Found::Unknown;
    };
    let identity = ProcessIdentity {
        pid,
        start_time: stat.start_time,
    };
    match Pinned::pin(identity, budget) {
        Ok((pinned, seen)) => Found::Pinned(pinned, seen),
        Err(Outcome::AlreadyGone) => match read_found(raw) {
            Ok(now) if now.start_time != stat.start_time => Found::Unknown,
            Ok(_) => Found::Gone,
            Err(found) => found,
        },
        Err(_) => Found::Unknown,
    }
}

/// Pins every process of every unit that is not pinned already, vetting each like a group
/// member; one that may not be signalled (refused here or before, unknown, or not listed)
/// makes its unit unkillable as a whole.
fn pin_unit_members(
    units: &mut [UnitJob],
    caller: &Caller,
    options: &TerminateOptions,
    budget: &mut Budget,
    taken: &mut Taken,
) {
    for unit in units.iter_mut() {
        let (procs, complete) = unit.unit.procs_listed();
        // A process that could not be listed could not be vetted.
        unit.killable &= complete;
        for raw in procs {
            if let Some(&admitted) = taken.get(&raw) {
                unit.killable &= admitted;
                continue;
            }
            let found = match read_found(raw) {
                Ok(stat) => pin_as_read(raw, &stat, budget),
                Err(found) => found,
            };
            let (member, seen) = match found {
                Found::Pinned(member, seen) => (member, seen),
                Found::Gone => continue,
                // Not vetted, yet `cgroup.kill` would reach it.
                Found::Unknown => {
                    unit.killable = false;
                    continue;
                }
            };
            // Read after the pidfd is open: it still is in the unit, so the pidfd is ours.
            let inside = match Hierarchy::path_of(&raw.to_string()) {
                Ok(path) => path.is_some_and(|p| unit.unit.holds_path(&p)),
                Err(_) => {
                    unit.killable = false;
                    continue;
                }
            };
            if !inside {
                continue;
            }
            let admitted = caller.refusal(raw, &seen, options).is_none();
            taken.insert(raw, admitted);
            unit.killable &= admitted;
            if admitted {
                unit.members.push(member);
            }
        }
    }
}

/// Waits for the host-wide termination lock until `deadline`. `None` when it cannot be
/// opened or had: the call goes on without it.
fn take_turn(deadline: Instant) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .create(write)
            .mode(0o666)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(LOCK_PATH)
    };
    // Another user's lock file can still be locked through a read-only descriptor.
    let file = open(true).or_else(|_| open(false)).ok()?;
    loop {
        // Released when the file is dropped.
        if sys::try_lock_exclusive(&file) {
            return Some(file);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// For group targets, pins every other live member of the group, so that members that
/// ignore SIGTERM get SIGKILL through their own pidfd even after the leader is gone.
fn pin_group_members(
    jobs: &mut [(usize, Job)],
    caller: &Caller,
    options: &TerminateOptions,
    budget: &mut Budget,
    taken: &mut Taken,
) {
    let groups: HashMap<i32, usize> = jobs
        .iter()
        .enumerate()
        .filter(|(_, (_, job))| job.group)
        .map(|(j, (_, job))| (job.leader.identity.pid.as_raw(), j))
        .collect();
    if groups.is_empty() {
        return;
    }
    let Ok(pids) = all_pids() else {
        // Who is in these groups is unknown: no group signal at all.
        for &j in groups.values() {
            jobs[j].1.group = false;
        }
        return;
    };
    for pid in pids {
        if taken.contains_key(&pid) {
            continue;
        }
        let stat = match read_found(pid) {
            Ok(stat) => stat,
            Err(Found::Gone) => continue,
            // Its group is unknown, so it may be in any of these: no group signal at all.
            Err(_) => {
                for &j in groups.values() {
                    jobs[j].1.group = false;
                }
                continue;
            }
        };
        let Some(&j) = groups.get(&stat.pgid) else {
            continue;
        };
        // The refusals are judged on what pinning read, after its pidfd was open.
        let (mut member, seen) = match pin_as_read(pid, &stat, budget) {
            Found::Pinned(member, seen) => (member, seen),
            Found::Gone => continue,
            Found::Unknown => {
                jobs[j].1.group = false;
                continue;
            }
        };
        if seen.pgid != stat.pgid {
            continue;
        }
        let refused = caller.refusal(pid, &seen, options).is_some();
        taken.insert(pid, !refused);
        if refused {
            // Someone in this group is not ours to signal (another user's, the caller's
            // family, a VM): no group signal, and the vetted members one by one.
            jobs[j].1.group = false;
            continue;
        }
        member.in_group = true;
        jobs[j].1.members.push(member);
    }
}

/// Pins the descendants of every target by parent links, whatever their session or group:
/// children that called `setsid()` leave the group but not the family. A refused process
/// (a VM, another user's, the caller's family) is not signalled and not descended into.
fn pin_descendants(
    jobs: &mut [(usize, Job)],
    caller: &Caller,
    options: &TerminateOptions,
    budget: &mut Budget,
    taken: &mut Taken,
) {
    for (_, job) in jobs.iter_mut() {
        let mut parents: Vec<i32> = job
            .everyone_ref()
            .map(|p| p.identity.pid.as_raw())
            .collect();
        let mut found = 0;
        while let Some(parent) = parents.pop() {
            for child in children_of(parent) {
                if found >= MAX_DESCENDANTS || taken.contains_key(&child) {
                    continue;
                }
                let stat = match read_found(child) {
                    Ok(stat) => stat,
                    Err(Found::Gone) => continue,
                    // Its group is unknown: no group signal for this target.
                    Err(_) => {
                        job.group = false;
                        continue;
                    }
                };
                if stat.ppid != parent {
                    continue;
                }
                let (member, seen) = match pin_as_read(child, &stat, budget) {
                    Found::Pinned(member, seen) => (member, seen),
                    Found::Gone => continue,
                    // Not signalled itself; nor through the group, if it is in it.
                    Found::Unknown => {
                        if stat.pgid == job.leader.identity.pid.as_raw() {
                            job.group = false;
                        }
                        continue;
                    }
                };
                // Still the child of the parent we walked from, read after pinning.
                if seen.ppid != parent {
                    continue;
                }
                let refused = caller.refusal(child, &seen, options).is_some();
                taken.insert(child, !refused);
                found += 1;
                if refused {
                    if seen.pgid == job.leader.identity.pid.as_raw() {
                        job.group = false;
                    }
                    continue;
                }
                parents.push(child);
                job.members.push(member);
            }
        }
    }
}

/// The children of `pid`, from `/proc/PID/task/*/children` (each thread lists the children
/// it forked).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{eventually, PYTHON};
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};

    #[test]
    fn a_process_found_by_pid_is_left_out_only_when_gone() {
        // Gone: a reaped child whose pid nobody has taken again.
        let mut child = Command::new("true").spawn().unwrap();
        let raw = child.id() as i32;
        child.wait().unwrap();
        if !sys::pid_exists(raw) {
            assert!(matches!(read_found(raw), Err(Found::Gone)));
        }
        // Readable and pinnable: a live child of ours.
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let raw = child.id() as i32;
        let stat = read_found(raw).ok().expect("its stat reads");
        let mut budget = Budget(16);
        assert!(matches!(
            pin_as_read(raw, &stat, &mut budget),
            Found::Pinned(..)
        ));
        // Read with a start time that is not the one the pid has now: another process holds
        // the pid, so unknown, never "gone" (a signal to its group or unit could reach it).
        let other = Stat {
            start_time: stat.start_time + 1,
            ..stat.clone()
        };
        assert!(matches!(
            pin_as_read(raw, &other, &mut budget),
            Found::Unknown
        ));
        // Exited but not reaped (a zombie of the process read): gone.
        let mut zombie = Command::new("true").spawn().unwrap();
        let zombie_raw = zombie.id() as i32;
        let read = read_found(zombie_raw).ok().expect("its stat reads");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !Stat::read(zombie_raw).is_ok_and(|s| s.has_exited()) {
            assert!(Instant::now() < deadline, "it never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(
            pin_as_read(zombie_raw, &read, &mut budget),
            Found::Gone
        ));
        zombie.wait().unwrap();
        // A pid that is never a target (init): unknown, never "gone".
        assert!(matches!(pin_as_read(1, &stat, &mut budget), Found::Unknown));
        // 0, as `cgroup.procs` lists a process of another pid namespace: unknown.
        assert!(matches!(read_found(0), Err(Found::Unknown)));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    const SLEEPER: &str = "import time\nwhile True: time.sleep(1)";
    const STUBBORN: &str =
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\nwhile True: time.sleep(1)";

    /// A python child leading its own process group, like a port program.
    fn spawn(code: &str) -> (Child, ProcessIdentity) {
        let child = Command::new(PYTHON.as_str())
            .args(["-c", code])
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = Pid::new(i64::from(child.id())).unwrap();
        let identity = ProcessIdentity::of(pid).unwrap();
        (child, identity)
    }

    /// `n` children that ignore SIGTERM, each leading its own group, ready (handler set).
    fn stubborn_targets(n: usize) -> (Vec<Child>, Vec<ProcessIdentity>) {
        (0..n)
            .map(|_| {
                let (mut child, id) = spawn(STUBBORN);
                ready(&mut child);
                (child, id)
            })
            .unzip()
    }

    /// Waits until the child printed its first line (its signal handlers are installed).
    fn ready(child: &mut Child) {
        use std::io::BufRead;
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
    }

    fn reap(children: &mut [Child]) {
        for c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn opts(grace_ms: u64) -> TerminateOptions {
        TerminateOptions {
            grace: Duration::from_millis(grace_ms),
            kill_wait: Duration::from_millis(1000),
            ..TerminateOptions::default()
        }
    }

    #[test]
    fn sigterm_ends_a_cooperative_process_gracefully() {
        let (mut child, id) = spawn(SLEEPER);
        let out = terminate(&[id], &opts(2000));
        assert_eq!(out, vec![Outcome::Graceful]);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn sigterm_ignored_means_sigkill_after_the_grace() {
        let (mut child, id) = spawn(STUBBORN);
        ready(&mut child);
        let started = Instant::now();
        let out = terminate(&[id], &opts(200));
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(out, vec![Outcome::ForceKilled]);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_stale_identity_is_never_signalled() {
        let (mut child, id) = spawn(SLEEPER);
        let stale = ProcessIdentity {
            pid: id.pid,
            start_time: id.start_time - 1,
        };
        assert_eq!(terminate(&[stale], &opts(100)), vec![Outcome::AlreadyGone]);
        assert!(
            id.is_current(),
            "the process with the recycled pid is untouched"
        );
        assert_eq!(child.try_wait().unwrap(), None);
        reap(&mut [child]);
    }

    #[test]
    fn gone_processes_are_already_gone() {
        let (mut child, id) = spawn(SLEEPER);
        reap(std::slice::from_mut(&mut child));
        assert_eq!(terminate(&[id], &opts(100)), vec![Outcome::AlreadyGone]);
    }

    #[test]
    fn refuses_itself_its_ancestors_and_its_own_group() {
        let me = ProcessIdentity::of(Pid::new(i64::from(std::process::id())).unwrap()).unwrap();
        let parent_pid = Pid::new(i64::from(nix::unistd::getppid().as_raw())).unwrap();
        let parent = ProcessIdentity::of(parent_pid).unwrap();
        // A child in our own process group (no process_group(0)).
        let mut same_group = Command::new(PYTHON.as_str())
            .args(["-c", SLEEPER])
            .spawn()
            .unwrap();
        let sg = ProcessIdentity::of(Pid::new(i64::from(same_group.id())).unwrap()).unwrap();

        let out = terminate(&[me, parent, sg], &opts(100));
        assert_eq!(
            out,
            vec![
                Outcome::Refused(Refusal::ThisProcess),
                Outcome::Refused(Refusal::Ancestor),
                Outcome::Refused(Refusal::OwnProcessGroup),
            ]
        );
        assert!(sg.is_current());
        assert_eq!(same_group.try_wait().unwrap(), None);
        reap(&mut [same_group]);
    }

    #[test]
    fn the_whole_group_goes_even_children_that_ignore_sigterm() {
        // The leader forks two children that ignore SIGTERM, then waits.
        let code = r#"
import os, signal, time
pids = []
for _ in range(2):
    p = os.fork()
    if p == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True: time.sleep(1)
    pids.append(p)
print(" ".join(map(str, pids)), flush=True)
while True: time.sleep(1)
"#;
        let (mut child, id) = spawn(code);
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let kids: Vec<ProcessIdentity> = line
            .split_whitespace()
            .map(|p| ProcessIdentity::of(Pid::new(p.parse().unwrap()).unwrap()).unwrap())
            .collect();
        assert_eq!(kids.len(), 2);
        // Give the children a moment to install their handler.
        std::thread::sleep(Duration::from_millis(100));

        let out = terminate(&[id], &opts(300));
        assert_eq!(out, vec![Outcome::ForceKilled]);
        child.wait().unwrap();
        // The children were re-parented to init (or a subreaper) and reaped there.
        for kid in kids {
            assert!(
                eventually(Duration::from_secs(2), || !kid.is_current()
                    || ProcessFacts::read(kid.pid).is_ok_and(|f| f.has_exited())),
                "child {} survived",
                kid.pid
            );
        }
    }

    #[test]
    fn many_stubborn_targets_take_one_grace_not_one_each() {
        let (mut children, ids) = stubborn_targets(20);
        let started = Instant::now();
        let out = terminate(&ids, &opts(300));
        let took = started.elapsed();
        assert!(out.iter().all(|o| *o == Outcome::ForceKilled), "{out:?}");
        // 20 serial graces would be 6 s; one shared grace plus the kill is well under 2 s.
        assert!(took < Duration::from_secs(2), "took {took:?}");
        reap(&mut children);
    }

    #[test]
    fn a_group_with_a_member_of_another_user_is_signalled_member_by_member() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("needs root to start a process as nobody: not run");
            return;
        }
        // The leader starts a child in its own group that runs as nobody.
        let code = r#"
import subprocess, sys, time
child = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          sys.executable, "-c", "import time; time.sleep(30)"])
print(child.pid, flush=True)
while True: time.sleep(1)
"#;
        let (mut leader, id) = spawn(code);
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(leader.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let other = Pid::new(line.trim().parse().unwrap()).unwrap();
        assert!(eventually(Duration::from_secs(5), || {
            ProcessFacts::read(other).is_ok_and(|f| f.uid != 0 && f.comm.starts_with("python"))
        }));
        let other_id = ProcessIdentity::of(other).unwrap();

        let out = terminate(&[id], &opts(300));
        assert_eq!(out, vec![Outcome::Graceful]);
        leader.wait().unwrap();
        // No group signal reached the other user's process.
        assert!(
            other_id.is_current(),
            "a process of another user was signalled"
        );
        assert!(ProcessFacts::read(other).is_ok_and(|f| !f.has_exited()));
        let allowed = TerminateOptions {
            allow_other_users: true,
            ..opts(300)
        };
        assert_eq!(terminate(&[other_id], &allowed), vec![Outcome::Graceful]);
    }

    #[test]
    fn duplicates_are_signalled_once() {
        let (mut child, id) = spawn(SLEEPER);
        let out = terminate(&[id, id], &opts(2000));
        assert_eq!(out, vec![Outcome::Graceful, Outcome::AlreadyGone]);
        child.wait().unwrap();
    }

    /// Reads one line of pids the child prints.
    fn pids_line(child: &mut Child) -> Vec<ProcessIdentity> {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.split_whitespace()
            .map(|p| ProcessIdentity::of(Pid::new(p.parse().unwrap()).unwrap()).unwrap())
            .collect()
    }

    fn gone(id: &ProcessIdentity) -> bool {
        !id.is_current() || ProcessFacts::read(id.pid).is_ok_and(|f| f.has_exited())
    }

    #[test]
    fn a_target_that_leaves_its_group_on_sigterm_is_killed_and_the_group_it_joins_is_untouched() {
        let (mut innocent, innocent_id) = spawn(SLEEPER);
        // On SIGTERM the target moves into the innocent's group (same session) and runs on.
        let code = format!(
            "import os, signal, time\nsignal.signal(signal.SIGTERM, lambda *a: os.setpgid(0, {}))\nprint('ready', flush=True)\nwhile True: time.sleep(1)",
            innocent_id.pid
        );
        let (mut target, id) = spawn(&code);
        ready(&mut target);
        let out = terminate(&[id], &opts(300));
        assert_eq!(out, vec![Outcome::ForceKilled]);
        // Before the fix, the target was reported killed and ran on: wait with a deadline.
        assert!(
            eventually(Duration::from_secs(3), || target
                .try_wait()
                .unwrap()
                .is_some()),
            "reported force_killed, but the target runs on"
        );
        assert!(innocent_id.is_current());
        assert_eq!(
            innocent.try_wait().unwrap(),
            None,
            "the innocent group was signalled"
        );
        reap(&mut [innocent]);
    }

    #[test]
    fn descendants_that_left_the_session_are_ended_with_their_target() {
        // The target forks a child that calls setsid() (and ignores SIGTERM), which forks a
        // grandchild that calls setsid() again: neither is in the target's group.
        let code = r#"
import os, signal, sys, time
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = os.fork()
    if grandchild == 0:
        os.setsid()
        while True: time.sleep(1)
    os.write(w, f"{grandchild}\n".encode())
    while True: time.sleep(1)
grandchild = os.read(r, 64).decode().strip()
print(child, grandchild, flush=True)
while True: time.sleep(1)
"#;
        let (mut bystander, bystander_id) = spawn(SLEEPER);
        let (mut target, id) = spawn(code);
        let family = pids_line(&mut target);
        assert_eq!(family.len(), 2);
        std::thread::sleep(Duration::from_millis(100));
        for member in &family {
            let f = ProcessFacts::read(member.pid).unwrap();
            assert_eq!(f.sid, member.pid.as_raw(), "each left the target's session");
        }
        let out = terminate(&[id], &opts(300));
        assert_eq!(out, vec![Outcome::ForceKilled]);
        target.wait().unwrap();
        for member in &family {
            assert!(
                eventually(Duration::from_secs(2), || gone(member)),
                "descendant {} survived",
                member.pid
            );
        }
        assert!(bystander_id.is_current());
        assert_eq!(bystander.try_wait().unwrap(), None);
        reap(&mut [bystander]);

        // Without kill_group, the target alone.
        let (mut target, id) = spawn(code);
        let family = pids_line(&mut target);
        let alone = TerminateOptions {
            kill_group: false,
            ..opts(300)
        };
        assert_eq!(
            terminate(&family[..1], &opts(300)),
            vec![Outcome::ForceKilled]
        );
        assert_eq!(terminate(&[id], &alone), vec![Outcome::Graceful]);
        target.wait().unwrap();
    }

    #[test]
    fn concurrent_calls_report_each_exit_once() {
        let (mut children, ids) = stubborn_targets(20);
        let runs: Vec<Vec<Outcome>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| s.spawn(|| terminate(&ids, &opts(300))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, id) in ids.iter().enumerate() {
            let mine: Vec<&Outcome> = runs.iter().map(|run| &run[i]).collect();
            let ended = mine
                .iter()
                .filter(|o| matches!(o, Outcome::Graceful | Outcome::ForceKilled))
                .count();
            assert_eq!(ended, 1, "pid {}: {mine:?}", id.pid);
            // It ignores SIGTERM: whoever ended it killed it.
            assert!(mine.contains(&&Outcome::ForceKilled), "{mine:?}");
            assert_eq!(
                mine.iter().filter(|o| ***o == Outcome::AlreadyGone).count(),
                2
            );
        }
        reap(&mut children);
    }

    #[test]
    fn a_process_whose_main_thread_exited_is_ended_not_taken_for_gone() {
        let code = "import ctypes, threading, time\nthreading.Thread(target=lambda: [time.sleep(1) for _ in iter(int, 1)]).start()\nprint('ready', flush=True)\nctypes.CDLL(None).pthread_exit(None)";
        let (mut child, id) = spawn(code);
        ready(&mut child);
        assert!(eventually(Duration::from_secs(5), || {
            Stat::read(id.pid.as_raw()).is_ok_and(|s| s.leader_exited())
        }));
        let facts = ProcessFacts::read(id.pid).unwrap();
        assert!(!facts.has_exited(), "{facts:?}");
        assert!(
            !facts.cmdline.is_empty(),
            "its argv comes from a live thread"
        );
        assert_eq!(terminate(&[id], &opts(2000)), vec![Outcome::Graceful]);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
    }

    /// Starts ESCAPER in its own group, moves it into its leaf of `vm`, lets it escape;
    /// returns the child, its identity and the escaped grandchild's identity.
    fn spawn_escaper(vm: &VmCgroup) -> (Child, ProcessIdentity, ProcessIdentity) {
        use crate::test_util::ESCAPER;
        use std::io::{BufRead, Write};
        let mut child = Command::new(PYTHON.as_str())
            .args(["-c", ESCAPER])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let id = ProcessIdentity::of(Pid::new(i64::from(child.id())).unwrap()).unwrap();
        assert_eq!(vm.enter(&id).unwrap(), cgroup::Entered::Moved);
        assert_eq!(vm.enter(&id).unwrap(), cgroup::Entered::Already);
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let escaped = Pid::new(line.trim().parse().unwrap()).unwrap();
        let escaped = ProcessIdentity::of(escaped).unwrap();
        let facts = ProcessFacts::read(escaped.pid).unwrap();
        assert_ne!(facts.pgid, id.pid.as_raw(), "escaped its group");
        assert_ne!(facts.sid, id.pid.as_raw());
        (child, id, escaped)
    }

    fn gone_soon(id: &ProcessIdentity) -> bool {
        eventually(Duration::from_secs(3), || gone(id))
    }

    #[test]
    fn a_contained_target_takes_every_descendant_with_it_and_its_cgroup_goes() {
        let Some(vm) = crate::test_util::TestVmCgroup::new() else {
            return;
        };
        let (mut child, id, escaped) = spawn_escaper(&vm.0);
        let leaf = vm.0.leaf(&id);
        assert!(leaf.procs().contains(&escaped.pid.as_raw()));
        // Without the cgroup, the escaped process survives its target.
        let started = Instant::now();
        let out = terminate_contained(&[id], &opts(300), Some(&vm.0));
        child.wait().unwrap();
        assert_eq!(out, vec![Outcome::Graceful]);
        assert!(gone_soon(&escaped), "the setsid grandchild survived");
        assert!(!leaf.dir.exists(), "the leaf is removed");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_gone_target_leaves_nothing_in_its_leaf() {
        let Some(vm) = crate::test_util::TestVmCgroup::new() else {
            return;
        };
        let (mut child, id, escaped) = spawn_escaper(&vm.0);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(escaped.is_current());
        let out = terminate_contained(&[id], &opts(300), Some(&vm.0));
        assert_eq!(out, vec![Outcome::AlreadyGone]);
        assert!(gone_soon(&escaped));
        assert!(!vm.0.leaf(&id).dir.exists());
    }

    #[test]
    fn without_kill_group_or_without_the_cgroup_the_escaped_process_stays() {
        let Some(vm) = crate::test_util::TestVmCgroup::new() else {
            return;
        };
        let (mut child, id, escaped) = spawn_escaper(&vm.0);
        let only = TerminateOptions {
            kill_group: false,
            ..opts(300)
        };
        assert_eq!(
            terminate_contained(&[id], &only, Some(&vm.0)),
            vec![Outcome::Graceful]
        );
        child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            escaped.is_current(),
            "kill_group: false reaches the target only"
        );
        assert_eq!(terminate(&[escaped], &opts(300)), vec![Outcome::Graceful]);
    }

    #[test]
    fn the_leaf_of_another_live_process_is_never_killed_for_a_member() {
        let Some(vm) = crate::test_util::TestVmCgroup::new() else {
            return;
        };
        let (mut child, id, escaped) = spawn_escaper(&vm.0);
        // Ending the escaped member alone must not kill the leaf: its process is alive.
        assert_eq!(
            terminate_contained(&[escaped], &opts(300), Some(&vm.0)),
            vec![Outcome::Graceful]
        );
        assert!(id.is_current());
        assert_eq!(child.try_wait().unwrap(), None);
        assert!(vm.0.leaf(&id).dir.exists());
        assert_eq!(
            terminate_contained(&[id], &opts(300), Some(&vm.0)),
            vec![Outcome::Graceful]
        );
        child.wait().unwrap();
    }

    /// Ends a contained target whose leaf also holds a `sleep 30` of user nobody (in the
    /// target's process group when `in_target_group`, set before exec; else in its own),
    /// and checks that our own processes went and the other user's was never signalled.
    fn end_target_beside_another_users_process(in_target_group: bool) {
        let Some(vm) = crate::test_util::TestVmCgroup::new() else {
            return;
        };
        let (mut child, id, escaped) = spawn_escaper(&vm.0);
        let mut command = Command::new("setpriv");
        command.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "sleep",
            "30",
        ]);
        if in_target_group {
            command.process_group(id.pid.as_raw());
        }
        let mut other = command.spawn().unwrap();
        let other_id = ProcessIdentity::of(Pid::new(i64::from(other.id())).unwrap()).unwrap();
        assert!(eventually(Duration::from_secs(5), || {
            ProcessFacts::read(other_id.pid).is_ok_and(|f| f.uid != 0 && f.comm == "sleep")
        }));
        let leaf = vm.0.leaf(&id);
        cgroup::write_file(&leaf.dir.join("cgroup.procs"), &other_id.pid.to_string()).unwrap();
        let out = terminate_contained(&[id], &opts(200), Some(&vm.0));
        child.wait().unwrap();
        assert_eq!(out, vec![Outcome::Graceful]);
        assert!(gone_soon(&escaped), "our own members still go, one by one");
        assert!(
            other_id.is_current(),
            "the other user's process was signalled (in the target's group: {in_target_group})"
        );
        assert_eq!(other.try_wait().unwrap(), None);
        reap(&mut [other]);
    }

    #[test]
    fn a_cgroup_with_a_process_of_another_user_is_not_killed_as_a_whole() {
        end_target_beside_another_users_process(false);
    }

    #[test]
    fn a_group_member_refused_first_still_keeps_its_cgroup_from_being_killed() {
        // In the target's group, the other user's process is vetted (and refused) as a
        // group member before the cgroup's members are: that refusal must keep
        // `cgroup.kill` from reaching it (it did not when the cgroup pass skipped what the
        // group pass had seen).
        end_target_beside_another_users_process(true);
    }
}
