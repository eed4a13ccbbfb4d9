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
/// outcome per target, in order.
pub fn terminate(targets: &[ProcessIdentity], options: &TerminateOptions) -> Vec<Outcome> {
    let caller = Caller::current();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; targets.len()];
    let mut jobs: Vec<(usize, Job)> = Vec::new();
    let mut seen = HashSet::new();

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
                outcomes[i] = Some(outcome);
                continue;
            }
        };
        if let Some(refusal) = caller.refusal(pid, &seen, options) {
            outcomes[i] = Some(Outcome::Refused(refusal));
            continue;
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

    // SIGTERM to everyone at once.
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
    wait_jobs(&mut jobs, grace_deadline);

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
    if any_killed {
        wait_jobs(&mut jobs, Instant::now() + options.kill_wait);
    }

    for (i, job) in jobs {
        outcomes[i] = Some(match (job.failed, job.all_exited(), job.killed) {
            (Some(errno), _, _) => Outcome::SignalFailed(errno),
            (None, false, _) => Outcome::StillAlive,
            (None, true, true) => Outcome::ForceKilled,
            (None, true, false) => Outcome::Graceful,
        });
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::AlreadyGone))
        .collect()
}

fn wait_jobs(jobs: &mut [(usize, Job)], deadline: Instant) {
    let mut all: Vec<&mut Pinned> = jobs
        .iter_mut()
        .filter(|(_, job)| job.failed.is_none())
        .flat_map(|(_, job)| std::iter::once(&mut job.leader).chain(job.members.iter_mut()))
        .collect();
    wait_all(&mut all, deadline);
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
}
