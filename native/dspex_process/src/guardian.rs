//! The guardian: the OS-side half of "no registered process outlives its VM".
//!
//! A VM tells its guardian (a `dspex-proc guard` process it starts as a port) of every OS
//! process that enters its registries (`+ PID START`) and of every one that is known to be
//! over (`- PID START`). When the VM dies, even by `kill -9`, the guardian ends what is
//! still on its list, through [`crate::terminate::terminate`]: every target is pinned and
//! its start time checked again first, so a recycled pid is never signalled.
//!
//! This module holds the pure part (the list and its protocol) and the watch on the VM; the
//! CLI runs the loop.

use crate::identity::ProcessIdentity;
use crate::pid::Pid;
use crate::terminate::{self, Outcome, TerminateOptions};
use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// One line of the VM-to-guardian protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// `+ PID START`: the process entered a registry.
    Registered(ProcessIdentity),
    /// `- PID START`: the process is over (ended, or handed off on purpose).
    Over(ProcessIdentity),
    /// `.`: the VM's guardian process stops on purpose (it ended what it had, or another
    /// guard takes over): exit at stdin's end without signalling anything.
    StandDown,
}

impl Notice {
    /// Parses one line; `None` for anything malformed (ignored, never acted on).
    pub fn parse(line: &[u8]) -> Option<Notice> {
        let text = std::str::from_utf8(line).ok()?.trim();
        if text == "." {
            return Some(Notice::StandDown);
        }
        let mut parts = text.split_ascii_whitespace();
        let sign = parts.next()?;
        let pid = Pid::new(parts.next()?.parse().ok()?).ok()?;
        let start_time = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        let identity = ProcessIdentity { pid, start_time };
        match sign {
            "+" => Some(Notice::Registered(identity)),
            "-" => Some(Notice::Over(identity)),
            _ => None,
        }
    }

    /// The line for this notice, newline included.
    pub fn line(&self) -> String {
        let (sign, id) = match self {
            Notice::Registered(id) => ('+', id),
            Notice::Over(id) => ('-', id),
            Notice::StandDown => return ".\n".to_string(),
        };
        format!("{sign} {} {}\n", id.pid, id.start_time)
    }
}

/// The identities a VM still has registered, as its guardian knows them.
#[derive(Debug, Default)]
pub struct Watchlist {
    tracked: HashSet<ProcessIdentity>,
    partial: Vec<u8>,
    stand_down: bool,
}

impl Watchlist {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a chunk of protocol bytes; a line may span chunks.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let mut consumed = 0;
        while let Some(end) = self.partial[consumed..].iter().position(|&b| b == b'\n') {
            let line = &self.partial[consumed..consumed + end];
            match Notice::parse(line) {
                Some(Notice::Registered(id)) => {
                    self.tracked.insert(id);
                }
                Some(Notice::Over(id)) => {
                    self.tracked.remove(&id);
                }
                Some(Notice::StandDown) => self.stand_down = true,
                None => {}
            }
            consumed += end + 1;
        }
        self.partial.drain(..consumed);
        // A line is a few dozen bytes; a runaway one is garbage, not a notice.
        if self.partial.len() > 4096 {
            self.partial.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.tracked.len()
    }

    /// Whether the VM said it stops its guardian on purpose (see [`Notice::StandDown`]).
    pub fn stood_down(&self) -> bool {
        self.stand_down
    }

    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }

    pub fn contains(&self, id: &ProcessIdentity) -> bool {
        self.tracked.contains(id)
    }

    /// Forgets the identities that no longer name a live process (one `/proc` read each),
    /// so the list stays the size of what is running.
    pub fn prune(&mut self) {
        self.tracked.retain(|id| !id.is_gone());
    }

    /// Ends every tracked process (TERM, `options.grace`, KILL), each pinned and checked
    /// first. Returns each identity with its outcome.
    /// With `cgroup` (the VM's per-VM cgroup), each target's leaf goes with it.
    pub fn end_all(
        &self,
        options: &TerminateOptions,
        cgroup: Option<&crate::cgroup::VmCgroup>,
    ) -> Vec<(ProcessIdentity, Outcome)> {
        let targets: Vec<ProcessIdentity> = self.tracked.iter().copied().collect();
        let outcomes = terminate::terminate_contained(&targets, options, cgroup);
        targets.into_iter().zip(outcomes).collect()
    }
}

/// A watch on the VM: a pidfd opened on it and checked against its start time, or (with no
/// pidfds) its identity alone.
pub struct VmWatch {
    identity: ProcessIdentity,
    pidfd: Option<OwnedFd>,
}

impl VmWatch {
    /// Watches `identity`; `None` when that VM is already gone.
    pub fn new(identity: ProcessIdentity) -> Option<VmWatch> {
        let pidfd = crate::sys::pidfd_open(identity.pid).ok();
        // Checked after the pidfd is open: if it matches now, the pidfd is that VM's.
        if !identity.is_current() {
            return None;
        }
        Some(VmWatch { identity, pidfd })
    }

    /// The descriptor that becomes readable when the VM exits, when there is one.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }

    /// Whether the VM has exited (a zombie has exited too).
    pub fn exited(&self) -> bool {
        match &self.pidfd {
            Some(fd) => crate::sys::poll_exited(&[fd.as_fd()], 0)[0],
            // Without a pidfd: gone only when the kernel says so; an unreadable VM lives.
            None => self.identity.is_gone() || self.is_zombie(),
        }
    }

    fn is_zombie(&self) -> bool {
        crate::Stat::read(self.identity.pid.as_raw()).is_ok_and(|s| s.state.has_exited())
    }

    /// Waits up to `timeout` for the VM to exit; true when it did.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let slice = (deadline - now).min(Duration::from_millis(20));
            match &self.pidfd {
                Some(fd) => {
                    let ms = i32::try_from(slice.as_millis().max(1)).unwrap_or(i32::MAX);
                    crate::sys::poll_exited(&[fd.as_fd()], ms);
                }
                None => std::thread::sleep(slice),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{reap, spawn, SLEEPER};

    fn id(pid: i64, start_time: u64) -> ProcessIdentity {
        ProcessIdentity {
            pid: Pid::new(pid).unwrap(),
            start_time,
        }
    }

    #[test]
    fn parses_the_protocol_and_nothing_else() {
        assert_eq!(
            Notice::parse(b"+ 123 456"),
            Some(Notice::Registered(id(123, 456)))
        );
        assert_eq!(
            Notice::parse(b"- 123 456\r"),
            Some(Notice::Over(id(123, 456)))
        );
        for bad in [
            &b""[..],
            b"+",
            b"+ 123",
            b"* 123 456",
            b"+ 1 456",
            b"+ 0 456",
            b"+ -5 456",
            b"+ 123 456 789",
            b"+ 123 -1",
            b"+ 99999999999 1",
            b"+ \xff 1",
        ] {
            assert_eq!(Notice::parse(bad), None, "{bad:?}");
        }
        let n = Notice::Registered(id(42, 7));
        assert_eq!(Notice::parse(n.line().trim_end().as_bytes()), Some(n));
    }

    #[test]
    fn a_stand_down_line_is_remembered_and_nothing_else_is() {
        let mut list = Watchlist::new();
        list.feed(b"+ 10 1\n. extra\n");
        assert!(
            !list.stood_down(),
            "only a line that is exactly a dot stands down"
        );
        list.feed(b" .\r\n");
        assert!(list.stood_down());
        assert_eq!(list.len(), 1, "standing down forgets nothing");
        assert_eq!(Notice::StandDown.line(), ".\n");
    }

    #[test]
    fn lines_may_span_chunks_and_over_removes() {
        let mut list = Watchlist::new();
        list.feed(b"+ 10 1\n+ 1");
        assert_eq!(list.len(), 1);
        list.feed(b"1 2\ngarbage\n- 10 1\n");
        assert_eq!(list.len(), 1);
        assert!(list.contains(&id(11, 2)));
        list.feed(b"- 11 3\n");
        assert!(
            list.contains(&id(11, 2)),
            "another start time is another process"
        );
        list.feed(&[b'x'; 10_000]);
        list.feed(b"\n- 11 2\n");
        assert!(list.is_empty());
    }

    #[test]
    fn ends_what_is_tracked_and_only_that() {
        let (mut tracked, tracked_id) = spawn(SLEEPER);
        let (mut other, other_id) = spawn(SLEEPER);
        let mut list = Watchlist::new();
        list.feed(Notice::Registered(tracked_id).line().as_bytes());
        // A stale identity for the other process's pid: must never reach it.
        let stale = ProcessIdentity {
            start_time: other_id.start_time + 1,
            ..other_id
        };
        list.feed(Notice::Registered(stale).line().as_bytes());
        let options = TerminateOptions {
            grace: Duration::from_millis(500),
            ..TerminateOptions::default()
        };
        let mut outcomes = list.end_all(&options, None);
        outcomes.sort_by_key(|(i, _)| i.start_time);
        assert!(
            outcomes.contains(&(tracked_id, Outcome::Graceful)),
            "{outcomes:?}"
        );
        assert!(
            outcomes.contains(&(stale, Outcome::AlreadyGone)),
            "{outcomes:?}"
        );
        assert!(
            tracked.wait().unwrap().code().is_none(),
            "ended by a signal"
        );
        assert!(other_id.is_current(), "the untracked process is untouched");
        assert_eq!(other.try_wait().unwrap(), None);
        reap(&mut [other]);
    }

    #[test]
    fn prune_forgets_what_is_gone() {
        let (mut child, child_id) = spawn(SLEEPER);
        let mut list = Watchlist::new();
        list.feed(Notice::Registered(child_id).line().as_bytes());
        list.prune();
        assert_eq!(list.len(), 1);
        reap(std::slice::from_mut(&mut child));
        list.prune();
        assert!(list.is_empty());
    }

    #[test]
    fn the_vm_watch_sees_an_exit() {
        let (mut child, child_id) = spawn(SLEEPER);
        let watch = VmWatch::new(child_id).expect("alive");
        assert!(!watch.exited());
        assert!(!watch.wait_exit(Duration::from_millis(50)));
        child.kill().unwrap();
        // Not reaped yet: a zombie has exited all the same.
        assert!(watch.wait_exit(Duration::from_secs(5)));
        child.wait().unwrap();
        assert!(
            VmWatch::new(child_id).is_none(),
            "a gone VM cannot be watched"
        );
    }
}
