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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::process::Command;

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
