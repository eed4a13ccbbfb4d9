//! Parallel, bounded, identity-checked termination.
//!
//! Every target is pinned before anything is sent: a pidfd is opened, then the start time
//! is read again and compared with the one recorded. Once pinned, signals go through the
//! pidfd, which can never reach a process that later reuses the pid. Where pidfds are not
//! available (ENOSYS, or out of descriptors) the start time is re-checked right before each
//! `kill(2)` instead.
//!
//! All targets get SIGTERM at once (their whole process group when they lead one), share one
//! `grace` deadline, survivors get SIGKILL, and everything is waited for `kill_wait`.
//! Total time is about `grace` whatever the number of targets.

use crate::cgroup::{self, Hierarchy, Unit, VmCgroup};
use crate::identity::{Pid, ProcessIdentity};
#[cfg(test)]
use crate::proc_facts::ProcessFacts;
use crate::proc_facts::{all_pids, read_uid, Stat};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// `pidfd_send_signal` flag (Linux 6.9): signal the pidfd's whole process group.
const PIDFD_SIGNAL_PROCESS_GROUP: libc::c_uint = 1 << 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminateOptions {
    /// How long SIGTERM may take before SIGKILL.
    pub grace: Duration,
    /// How long to wait after SIGKILL before reporting a survivor.
    pub kill_wait: Duration,
    /// Signal the target's process group when the target leads it (pgid == pid).
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
    /// Exited within the grace period after SIGTERM.
    Graceful,
    /// Needed SIGKILL (it or a member of its group), then exited.
    ForceKilled,
    /// Gone before anything was sent, or its pid now names another process.
    AlreadyGone,
    Refused(Refusal),
    /// Still there `kill_wait` after SIGKILL (stopped under ptrace, uninterruptible sleep).
    StillAlive,
    /// The kernel refused the signal (e.g. EPERM).
    SignalFailed(i32),
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
        let mut chain = crate::scan::caller_and_ancestors();
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
    /// refusals are decided, for targets and for members of their groups alike.
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

/// What pinning saw of a process, for the refusals.
struct Seen {
    pgid: i32,
    uid: u32,
    vm: bool,
}

/// A process we hold on to: by pidfd, or by identity alone where pidfds are unavailable.
struct Pinned {
    identity: ProcessIdentity,
    pidfd: Option<OwnedFd>,
    exited: bool,
}

impl Pinned {
    /// Pins `identity`: `Err(AlreadyGone)` when the pid is gone or is someone else now.
    fn pin(identity: ProcessIdentity) -> Result<(Pinned, Seen), Outcome> {
        let raw = identity.pid.as_raw();
        let pidfd = pidfd_open(identity.pid);
        if matches!(pidfd, Err(libc::ESRCH)) {
            return Err(Outcome::AlreadyGone);
        }
        // Read after the pidfd is open: if the start time still matches, the pidfd names it.
        let stat = Stat::read(raw).map_err(|_| Outcome::AlreadyGone)?;
        if stat.start_time != identity.start_time || stat.state.has_exited() {
            return Err(Outcome::AlreadyGone);
        }
        let uid = read_uid(raw).map_err(|_| Outcome::AlreadyGone)?;
        let pinned = Pinned {
            identity,
            pidfd: pidfd.ok(),
            exited: false,
        };
        Ok((
            pinned,
            Seen {
                pgid: stat.pgid,
                uid,
                vm: crate::classify::is_beam(&stat.comm),
            },
        ))
    }

    /// Sends `signal` to the process, or to its process group. `Ok(false)` when it has
    /// already gone.
    fn signal(&self, signal: libc::c_int, group: bool) -> Result<bool, i32> {
        let pid = self.identity.pid.as_raw();
        let rc = match &self.pidfd {
            Some(fd) if group => {
                let rc = pidfd_send_signal(fd, signal, PIDFD_SIGNAL_PROCESS_GROUP);
                if rc == Err(libc::EINVAL) {
                    // Kernel before 6.9. The group is the leader's, and the leader is
                    // pinned and alive: its pgid cannot have been reused.
                    if !self.is_alive() {
                        return Ok(false);
                    }
                    raw_kill(-pid, signal)
                } else {
                    rc
                }
            }
            Some(fd) => pidfd_send_signal(fd, signal, 0),
            None => {
                if !self.identity.is_current() {
                    return Ok(false);
                }
                raw_kill(if group { -pid } else { pid }, signal)
            }
        };
        match rc {
            Ok(()) => Ok(true),
            Err(libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn is_alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => !poll_exited(&[fd.as_raw_fd()], 0)[0],
            None => matches!(
                Stat::read(self.identity.pid.as_raw()),
                Ok(s) if s.start_time == self.identity.start_time && !s.state.has_exited()
            ),
        }
    }
}

/// Whether this kernel has pidfds (Linux 5.3+): opens one on the calling process.
pub fn pidfd_supported() -> bool {
    Pid::new(i64::from(std::process::id()))
        .map(|me| pidfd_open(me).is_ok())
        .unwrap_or(false)
}

pub(crate) fn pidfd_open(pid: Pid) -> Result<OwnedFd, i32> {
    // SAFETY: plain syscall; a non-negative return is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
}

fn pidfd_send_signal(fd: &OwnedFd, signal: libc::c_int, flags: libc::c_uint) -> Result<(), i32> {
    // SAFETY: plain syscall on a descriptor we own; a null siginfo is allowed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            flags,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

fn raw_kill(pid: i32, signal: libc::c_int) -> Result<(), i32> {
    // Callers only pass pids > 1 or the negated pid of a pinned group leader.
    debug_assert!(!(-1..=1).contains(&pid));
    // SAFETY: plain syscall.
    if unsafe { libc::kill(pid, signal) } < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

/// Which of `fds` report their process as exited, waiting up to `timeout_ms`.
pub(crate) fn poll_exited(fds: &[i32], timeout_ms: i32) -> Vec<bool> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pollfds is a valid array of the given length.
    let rc = unsafe {
        libc::poll(
            pollfds.as_mut_ptr(),
            pollfds.len() as libc::nfds_t,
            timeout_ms,
        )
    };
    if rc <= 0 {
        return vec![false; fds.len()];
    }
    pollfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect()
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
                Some(fd) => with_fd.push((i, fd.as_raw_fd())),
                None => p.exited = !p.is_alive(),
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
        // Processes without a pidfd are polled every 10 ms.
        let slice = if legacy_left {
            left.min(Duration::from_millis(10))
        } else {
            left
        };
        let fds: Vec<i32> = with_fd.iter().map(|(_, fd)| *fd).collect();
        let timeout = i32::try_from(slice.as_millis().max(1)).unwrap_or(i32::MAX);
        if fds.is_empty() {
            std::thread::sleep(slice);
            continue;
        }
        for ((i, _), exited) in with_fd.iter().zip(poll_exited(&fds, timeout)) {
            if exited {
                pinned[*i].exited = true;
            }
        }
    }
}

/// One target and the members of its group that we hold on to.
struct Job {
    leader: Pinned,
    /// The target leads its group and every member may be signalled: one signal to the
    /// group reaches them all, including children forked after the scan.
    group: bool,
    /// The other members of the target's group, pinned. Signalled one by one when the
    /// group as a whole may not be (a member of another user, or of the caller's family).
    members: Vec<Pinned>,
    killed: bool,
    failed: Option<i32>,
}

impl Job {
    fn all_exited(&self) -> bool {
        self.leader.exited && self.members.iter().all(|m| m.exited)
    }
}

/// Terminates `targets`, each identified by pid and start time, in parallel. Returns one
/// outcome per target, in order. Containment cgroups are used as
/// [`terminate_contained`] describes, with no per-VM cgroup of the caller's own.
pub fn terminate(targets: &[ProcessIdentity], options: &TerminateOptions) -> Vec<Outcome> {
    terminate_contained(targets, options, None)
}

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
        let (leader, seen) = match Pinned::pin(*target) {
            Ok(pinned) => pinned,
            Err(outcome) => {
                // Gone: what it left in its own leaf still goes.
                if let Some(leaf) = own.filter(|_| hierarchy.is_some()).map(|o| o.leaf(target)) {
                    if leaf.dir.exists() {
                        unit_of[i] = Some(add_unit(&mut units, leaf));
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
                killed: false,
                failed: None,
            },
        ));
    }

    pin_group_members(&mut jobs, &caller, options);
    pin_unit_members(&mut units, &jobs, &caller, options);

    // SIGTERM to everyone at once.
    for unit in units.iter_mut() {
        for member in unit.members.iter_mut() {
            if let Ok(false) = member.signal(libc::SIGTERM, false) {
                member.exited = true;
            }
        }
    }
    for (_, job) in jobs.iter_mut() {
        match job.leader.signal(libc::SIGTERM, job.group) {
            Ok(true) => {}
            Ok(false) => job.leader.exited = true,
            Err(errno) => job.failed = Some(errno),
        }
        if !job.group {
            for member in job.members.iter_mut() {
                if let Ok(false) = member.signal(libc::SIGTERM, false) {
                    member.exited = true;
                }
            }
        }
    }
    let grace_deadline = Instant::now() + options.grace;
    wait_jobs(&mut jobs, &mut units, grace_deadline);

    // SIGKILL to whatever is left: the group while its leader lives, then each member.
    let mut any_killed = false;
    for (_, job) in jobs.iter_mut() {
        if job.all_exited() || job.failed.is_some() {
            continue;
        }
        job.killed = true;
        any_killed = true;
        if !job.leader.exited {
            if let Ok(false) = job.leader.signal(libc::SIGKILL, job.group) {
                job.leader.exited = true;
            }
        }
        for member in job.members.iter_mut().filter(|m| !m.exited) {
            if let Ok(false) = member.signal(libc::SIGKILL, false) {
                member.exited = true;
            }
        }
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
                if let Ok(false) = member.signal(libc::SIGKILL, false) {
                    member.exited = true;
                }
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
        let unit = unit_of[i];
        let unit_killed = unit.is_some_and(|u| units[u].killed);
        let unit_left = unit.is_some_and(|u| unit_left[u]);
        outcomes[i] = Some(
            match (
                job.failed,
                job.all_exited() && !unit_left,
                job.killed || unit_killed,
            ) {
                (Some(errno), _, _) => Outcome::SignalFailed(errno),
                (None, false, _) => Outcome::StillAlive,
                (None, true, true) => Outcome::ForceKilled,
                (None, true, false) => Outcome::Graceful,
            },
        );
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
        .flat_map(|(_, job)| std::iter::once(&mut job.leader).chain(job.members.iter_mut()))
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
        if own_vm && (named == *target || !named.is_current()) {
            return Some(unit);
        }
        return None;
    }
    Some(unit)
}

/// Pins every process of every unit that is not pinned already, vetting each like a group
/// member; one that may not be signalled makes its unit unkillable as a whole.
fn pin_unit_members(
    units: &mut [UnitJob],
    jobs: &[(usize, Job)],
    caller: &Caller,
    options: &TerminateOptions,
) {
    let pinned: HashSet<i32> = jobs
        .iter()
        .flat_map(|(_, j)| std::iter::once(&j.leader).chain(j.members.iter()))
        .map(|p| p.identity.pid.as_raw())
        .collect();
    for unit in units.iter_mut() {
        for raw in unit.unit.procs() {
            if pinned.contains(&raw) {
                continue;
            }
            let Ok(stat) = Stat::read(raw) else {
                continue;
            };
            let Ok(pid) = Pid::new(i64::from(raw)) else {
                continue;
            };
            let identity = ProcessIdentity {
                pid,
                start_time: stat.start_time,
            };
            let Ok((member, seen)) = Pinned::pin(identity) else {
                continue;
            };
            // Read after the pidfd is open: it still is in the unit, so the pidfd is ours.
            let inside = Hierarchy::path_of(&raw.to_string())
                .ok()
                .flatten()
                .is_some_and(|p| unit.unit.holds_path(&p));
            if !inside {
                continue;
            }
            if caller.refusal(raw, &seen, options).is_some() {
                unit.killable = false;
                continue;
            }
            unit.members.push(member);
        }
    }
}

/// For group targets, pins every other live member of the group, so that members that
/// ignore SIGTERM get SIGKILL through their own pidfd even after the leader is gone.
fn pin_group_members(jobs: &mut [(usize, Job)], caller: &Caller, options: &TerminateOptions) {
    let groups: HashMap<i32, usize> = jobs
        .iter()
        .enumerate()
        .filter(|(_, (_, job))| job.group)
        .map(|(j, (_, job))| (job.leader.identity.pid.as_raw(), j))
        .collect();
    if groups.is_empty() {
        return;
    }
    for pid in all_pids() {
        let Ok(stat) = Stat::read(pid) else {
            continue;
        };
        let Some(&j) = groups.get(&stat.pgid) else {
            continue;
        };
        let Ok(pid) = Pid::new(i64::from(pid)) else {
            continue;
        };
        if pid == jobs[j].1.leader.identity.pid {
            continue;
        }
        let identity = ProcessIdentity {
            pid,
            start_time: stat.start_time,
        };
        // The refusals are judged on what pinning read, after its pidfd was open.
        let Ok((member, seen)) = Pinned::pin(identity) else {
            continue;
        };
        if seen.pgid != stat.pgid {
            continue;
        }
        if caller.refusal(pid.as_raw(), &seen, options).is_some() {
            // Someone in this group is not ours to signal (another user's, the caller's
            // family, a VM): no group signal, and the vetted members one by one.
            jobs[j].1.group = false;
            continue;
        }
        jobs[j].1.members.push(member);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{eventually, PYTHON};
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};

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
                    || ProcessFacts::read(kid.pid).is_ok_and(|f| f.state.has_exited())),
                "child {} survived",
                kid.pid
            );
        }
    }

    #[test]
    fn many_stubborn_targets_take_one_grace_not_one_each() {
        let mut children = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..20 {
            let (mut child, id) = spawn(STUBBORN);
            ready(&mut child);
            children.push(child);
            ids.push(id);
        }
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
        assert!(ProcessFacts::read(other).is_ok_and(|f| !f.state.has_exited()));
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

    fn gone(id: &ProcessIdentity) -> bool {
        eventually(Duration::from_secs(3), || {
            !id.is_current() || ProcessFacts::read(id.pid).is_ok_and(|f| f.state.has_exited())
        })
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
        assert!(gone(&escaped), "the setsid grandchild survived");
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
        assert!(gone(&escaped));
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

    #[test]
    fn a_cgroup_with_a_process_of_another_user_is_not_killed_as_a_whole() {
        let Some(vm) = crate::test_util::TestVmCgroup::new() else {
            return;
        };
        let (mut child, id, escaped) = spawn_escaper(&vm.0);
        // A process of nobody, placed in the leaf by hand.
        let mut other = Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "sleep",
                "30",
            ])
            .spawn()
            .unwrap();
        let other_id = ProcessIdentity::of(Pid::new(i64::from(other.id())).unwrap()).unwrap();
        assert!(eventually(Duration::from_secs(5), || {
            ProcessFacts::read(other_id.pid).is_ok_and(|f| f.uid != 0 && f.comm == "sleep")
        }));
        let leaf = vm.0.leaf(&id);
        cgroup::write_file(&leaf.dir.join("cgroup.procs"), &other_id.pid.to_string()).unwrap();
        let out = terminate_contained(&[id], &opts(200), Some(&vm.0));
        child.wait().unwrap();
        assert_eq!(out, vec![Outcome::Graceful]);
        assert!(gone(&escaped), "our own members still go, one by one");
        assert!(
            other_id.is_current(),
            "the other user's process was signalled"
        );
        assert_eq!(other.try_wait().unwrap(), None);
        reap(&mut [other]);
    }
}
