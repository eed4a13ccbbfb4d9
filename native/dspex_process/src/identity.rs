use crate::error::Result;
pub use crate::pid::Pid;
use crate::proc_facts::ProcessFacts;

/// A process as it is identified everywhere in this library: its pid plus its start time
/// (`/proc/PID/stat` field 22, clock ticks since boot). Two processes that share a pid at
/// different times never share a start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    pub pid: Pid,
    pub start_time: u64,
}

impl ProcessIdentity {
    /// Reads the identity of the process that has `pid` now.
    pub fn of(pid: Pid) -> Result<ProcessIdentity> {
        let start_time = ProcessFacts::read_start_time(pid)?;
        Ok(ProcessIdentity { pid, start_time })
    }

    /// Reads the identity of the process that has `pid` now and its parent's pid, from one
    /// read of `/proc/PID/stat`.
    pub fn with_parent(pid: Pid) -> Result<(ProcessIdentity, i32)> {
        let stat = crate::proc_facts::Stat::read(pid.as_raw())?;
        let identity = ProcessIdentity {
            pid,
            start_time: stat.start_time,
        };
        Ok((identity, stat.ppid))
    }

    /// True if the process with this pid is still the one recorded: it exists and its start
    /// time is unchanged. A zombie still counts as the same process.
    pub fn is_current(&self) -> bool {
        matches!(ProcessFacts::read_start_time(self.pid), Ok(t) if t == self.start_time)
    }

    /// True only when this process is known to be gone: its pid names another process now,
    /// or the kernel says no process has it (ESRCH). A read that fails otherwise (EACCES,
    /// hidepid, EMFILE) says nothing, so the process counts as still there.
    pub fn is_gone(&self) -> bool {
        match ProcessFacts::read_start_time(self.pid) {
            Ok(t) => t != self.start_time,
            Err(crate::error::Error::NoSuchProcess(_)) => {
                !crate::sys::pid_exists(self.pid.as_raw())
            }
            Err(_) => false,
        }
    }
}

/// A process pinned by a pidfd, whose identity is read later (off the caller's scheduler).
/// The pidfd refers to exactly the process that had the pid when it was opened, so a later
/// read of `/proc/PID/stat` is that process's as long as the pidfd shows it still holding
/// its pid (not yet reaped) after the read.
#[derive(Debug)]
pub struct PinnedProcess {
    pid: Pid,
    fd: std::os::fd::OwnedFd,
}

/// What a [`PinnedProcess`] turned out to be when its identity was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinnedRead {
    /// Still holding its pid (running, or a zombie): its identity and parent.
    Present {
        identity: ProcessIdentity,
        ppid: i32,
    },
    /// Exited and reaped before its start time could be read: nothing is left of it.
    Gone,
}

impl PinnedProcess {
    /// Pins the process that has `pid` now. `NoSuchProcess` when none has it; `Proc` with
    /// the errno when no pidfd can be had (EMFILE, ENOSYS on kernels before 5.3).
    pub fn open(pid: Pid) -> Result<PinnedProcess> {
        match crate::sys::pidfd_open(pid) {
            Ok(fd) => Ok(PinnedProcess { pid, fd }),
            Err(libc::ESRCH) => Err(crate::error::Error::NoSuchProcess(pid.as_raw())),
            Err(errno) => Err(crate::error::Error::Proc {
                pid: pid.as_raw(),
                message: format!("pidfd_open: errno {errno}"),
                errno: Some(errno),
            }),
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Reads the pinned process's identity. The read counts only if, after it, the pidfd
    /// still holds the pid (signal 0 through the pidfd reaches it, or is refused with EPERM:
    /// another user's process exists too); ESRCH there means reaped, and the pid may have
    /// been reused, so whatever was read is not trusted: `Gone`.
    pub fn read(&self) -> Result<PinnedRead> {
        let read = ProcessIdentity::with_parent(self.pid);
        match crate::sys::pidfd_probe(&self.fd) {
            Ok(()) | Err(libc::EPERM) => {}
            Err(libc::ESRCH) => return Ok(PinnedRead::Gone),
            Err(errno) => {
                return Err(crate::error::Error::Proc {
                    pid: self.pid.as_raw(),
                    message: format!("pidfd_send_signal: errno {errno}"),
                    errno: Some(errno),
                })
            }
        }
        match read {
            Ok((identity, ppid)) => Ok(PinnedRead::Present { identity, ppid }),
            // The process holds its pid, yet /proc says there is none: hidden (hidepid).
            Err(crate::error::Error::NoSuchProcess(pid)) => {
                Err(crate::error::Error::PermissionDenied(pid))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::process::Command;

    #[test]
    fn a_pinned_process_reads_as_itself_while_it_holds_its_pid_and_as_gone_once_reaped() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = Pid::new(i64::from(child.id())).unwrap();
        let pinned = PinnedProcess::open(pid).unwrap();
        let id = ProcessIdentity::of(pid).unwrap();
        let parent = std::process::id() as i32;
        assert_eq!(
            pinned.read().unwrap(),
            PinnedRead::Present {
                identity: id,
                ppid: parent
            }
        );

        child.kill().unwrap();
        // A zombie still holds its pid: its identity is still read.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(
            pinned.read().unwrap(),
            PinnedRead::Present {
                identity: id,
                ppid: parent
            }
        );
        child.wait().unwrap();
        assert_eq!(pinned.read().unwrap(), PinnedRead::Gone);
    }

    #[test]
    fn pinning_a_pid_nobody_has_is_no_such_process() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = Pid::new(i64::from(child.id())).unwrap();
        child.wait().unwrap();
        if crate::sys::pid_exists(pid.as_raw()) {
            return; // reused already: nothing to say about this pid
        }
        assert!(matches!(
            PinnedProcess::open(pid),
            Err(Error::NoSuchProcess(p)) if p == pid.as_raw()
        ));
    }

    #[test]
    fn pid_rejects_dangerous_values() {
        for raw in [i64::MIN, -1, 0, 1, i64::from(i32::MAX) + 1, i64::MAX] {
            assert!(matches!(Pid::new(raw), Err(Error::InvalidPid(r)) if r == raw));
        }
        assert_eq!(Pid::new(2).unwrap().as_raw(), 2);
        assert_eq!(Pid::new(i64::from(i32::MAX)).unwrap().as_raw(), i32::MAX);
    }

    #[test]
    fn identity_of_a_real_child_is_stable_and_ends_with_it() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = Pid::new(i64::from(child.id())).unwrap();
        let id = ProcessIdentity::of(pid).unwrap();
        assert!(id.start_time > 0);
        assert_eq!(ProcessIdentity::of(pid).unwrap(), id);
        assert!(id.is_current());

        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!id.is_current());
        assert!(matches!(
            ProcessIdentity::of(pid),
            Err(Error::NoSuchProcess(p)) if p == pid.as_raw()
        ));
    }

    #[test]
    fn a_different_start_time_is_not_current() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = Pid::new(i64::from(child.id())).unwrap();
        let real = ProcessIdentity::of(pid).unwrap();
        let stale = ProcessIdentity {
            pid,
            start_time: real.start_time - 1,
        };
        assert!(!stale.is_current());
        assert!(real.is_current());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
