use crate::error::{Error, Result};
use crate::identity::Pid;
use std::io::Read;

/// The scheduler state of a process, from `/proc/PID/stat` field 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Running,
    Sleeping,
    DiskSleep,
    Stopped,
    TracingStop,
    Zombie,
    Dead,
    Idle,
    Other(char),
}

impl ProcessState {
    pub fn from_char(c: char) -> ProcessState {
        match c {
            'R' => ProcessState::Running,
            'S' => ProcessState::Sleeping,
            'D' => ProcessState::DiskSleep,
            'T' => ProcessState::Stopped,
            't' => ProcessState::TracingStop,
            'Z' => ProcessState::Zombie,
            'X' | 'x' => ProcessState::Dead,
            'I' => ProcessState::Idle,
            other => ProcessState::Other(other),
        }
    }

    /// Zombies and dead entries have exited: they are counted, never signalled.
    pub fn has_exited(self) -> bool {
        matches!(self, ProcessState::Zombie | ProcessState::Dead)
    }

    /// A short lowercase name, used as the Elixir atom.
    pub fn name(self) -> &'static str {
        match self {
            ProcessState::Running => "running",
            ProcessState::Sleeping => "sleeping",
            ProcessState::DiskSleep => "disk_sleep",
            ProcessState::Stopped => "stopped",
            ProcessState::TracingStop => "tracing_stop",
            ProcessState::Zombie => "zombie",
            ProcessState::Dead => "dead",
            ProcessState::Idle => "idle",
            ProcessState::Other(_) => "other",
        }
    }
}

/// What `/proc` says about one process at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: Pid,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub uid: u32,
    pub state: ProcessState,
    /// Clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    pub comm: String,
    /// The argument vector; empty for zombies and kernel threads.
    pub argv: Vec<String>,
}

impl ProcessFacts {
    /// Reads the facts of `pid`. stat and uid come through one `/proc/PID` directory
    /// handle; argv is read by path (procfs rejects non-UTF-8 argv), so the start time is
    /// read again afterwards: if the pid was recycled meanwhile, this is "no such process".
    pub fn read(pid: Pid) -> Result<ProcessFacts> {
        let raw = pid.as_raw();
        let process = procfs::process::Process::new(raw).map_err(|e| Error::from_proc(raw, e))?;
        let stat = process.stat().map_err(|e| Error::from_proc(raw, e))?;
        let uid = process.uid().map_err(|e| Error::from_proc(raw, e))?;
        let argv = read_argv(pid)?;
        if ProcessFacts::read_start_time(pid)? != stat.starttime {
            return Err(Error::NoSuchProcess(raw));
        }
        Ok(ProcessFacts {
            pid,
            ppid: stat.ppid,
            pgid: stat.pgrp,
            sid: stat.session,
            uid,
            state: ProcessState::from_char(stat.state),
            start_time: stat.starttime,
            comm: stat.comm,
            argv,
        })
    }

    /// Reads only the start time: one small read of `/proc/PID/stat`, no allocation
    /// beyond the path. This is the hot path of registration and of every identity check.
    pub fn read_start_time(pid: Pid) -> Result<u64> {
        let raw = pid.as_raw();
        let mut buf = [0u8; 1024];
        let len = read_small(&format!("/proc/{raw}/stat"), &mut buf, raw)?;
        parse_stat_start_time(&buf[..len]).ok_or_else(|| Error::Proc {
            pid: raw,
            message: "unparsable /proc/PID/stat".to_string(),
        })
    }
}

fn read_small(path: &str, buf: &mut [u8], pid: i32) -> Result<usize> {
    let map = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoSuchProcess(pid),
        std::io::ErrorKind::PermissionDenied => Error::PermissionDenied(pid),
        _ if e.raw_os_error() == Some(libc::ESRCH) => Error::NoSuchProcess(pid),
        _ => Error::Proc {
            pid,
            message: e.to_string(),
        },
    };
    let mut file = std::fs::File::open(path).map_err(map)?;
    let mut len = 0;
    loop {
        let n = file.read(&mut buf[len..]).map_err(map)?;
        if n == 0 || len + n == buf.len() {
            return Ok(len + n);
        }
        len += n;
    }
}

/// The argv of `pid`, split on NUL; bytes that are not UTF-8 are replaced, never fatal.
fn read_argv(pid: Pid) -> Result<Vec<String>> {
    let raw = pid.as_raw();
    match std::fs::read(format!("/proc/{raw}/cmdline")) {
        Ok(bytes) => Ok(split_cmdline(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NoSuchProcess(raw)),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(Error::NoSuchProcess(raw)),
        Err(e) => Err(Error::Proc {
            pid: raw,
            message: e.to_string(),
        }),
    }
}

/// Splits the raw contents of `/proc/PID/cmdline` into arguments.
pub(crate) fn split_cmdline(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the *last* `)`.
pub(crate) fn parse_stat_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After ")" come field 3 (state) onwards, so field 22 is the 20th of the rest.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn parses_start_time_even_with_hostile_comm() {
        let line = b"4242 (evil) 1 2 (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200 18446744073709551615";
        assert_eq!(parse_stat_start_time(line), Some(987654));
        assert_eq!(parse_stat_start_time(b"12 (a) S 1 2"), None);
        assert_eq!(parse_stat_start_time(b"no paren"), None);
        assert_eq!(parse_stat_start_time(b""), None);
    }

    #[test]
    fn splits_cmdline_and_survives_bad_utf8() {
        assert_eq!(
            split_cmdline(b"python3\0dspy_bridge.py\0--mode\0pool-worker\0"),
            vec!["python3", "dspy_bridge.py", "--mode", "pool-worker"]
        );
        assert_eq!(split_cmdline(b"a\xffb\0"), vec!["a\u{fffd}b"]);
        assert!(split_cmdline(b"").is_empty());
    }

    #[test]
    fn reads_a_real_child() {
        let mut child = Command::new("sleep").arg("31").spawn().unwrap();
        let pid = Pid::new(i64::from(child.id())).unwrap();
        // spawn() returns once the exec is committed, a moment before the kernel publishes
        // the new argv: until then cmdline reads as empty.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let facts = loop {
            let f = ProcessFacts::read(pid).unwrap();
            if !f.argv.is_empty() || std::time::Instant::now() > deadline {
                break f;
            }
            std::thread::yield_now();
        };
        assert_eq!(facts.pid, pid);
        assert_eq!(facts.ppid, std::process::id() as i32);
        assert_eq!(facts.argv, vec!["sleep", "31"]);
        assert_eq!(facts.comm, "sleep");
        assert_eq!(facts.uid, nix::unistd::getuid().as_raw());
        assert_eq!(facts.pgid, nix::unistd::getpgrp().as_raw());
        assert!(!facts.state.has_exited());
        assert_eq!(
            facts.start_time,
            ProcessFacts::read_start_time(pid).unwrap()
        );

        // Killed but not yet reaped: a zombie with no argv, same identity.
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let zombie = loop {
            let f = ProcessFacts::read(pid).unwrap();
            if f.state.has_exited() || std::time::Instant::now() > deadline {
                break f;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(zombie.state, ProcessState::Zombie);
        assert!(zombie.argv.is_empty());
        assert_eq!(zombie.start_time, facts.start_time);

        child.wait().unwrap();
        assert!(matches!(
            ProcessFacts::read(pid),
            Err(Error::NoSuchProcess(_))
        ));
    }

    #[test]
    fn reads_init_and_maps_states() {
        let init = ProcessFacts::read(Pid::from_kernel(1).unwrap())
            .unwrap_or_else(|e| panic!("pid 1: {e}"));
        assert_eq!(init.ppid, 0);
        assert_eq!(ProcessState::from_char('Z'), ProcessState::Zombie);
        assert!(ProcessState::from_char('X').has_exited());
        assert!(!ProcessState::from_char('S').has_exited());
        assert_eq!(ProcessState::from_char('?'), ProcessState::Other('?'));
    }
}
