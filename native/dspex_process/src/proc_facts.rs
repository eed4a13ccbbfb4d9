use crate::error::{Error, Result};
use crate::pid::Pid;
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
    /// Live threads, with the thread-group leader counted while it is not reaped.
    pub threads: u64,
    /// The argument vector, decoded for display (bytes that are not UTF-8 replaced); empty
    /// for zombies and kernel threads.
    pub argv: Vec<String>,
    /// The raw `/proc/PID/cmdline`: NUL-separated, bytes as the kernel holds them. Matching
    /// is done on these, never on the decoded `argv`.
    pub cmdline: Vec<u8>,
}

impl ProcessFacts {
    /// Reads the facts of `pid`. Each file is read by path, so the start time is read
    /// again at the end: if the pid was recycled meanwhile, this is "no such process".
    pub fn read(pid: Pid) -> Result<ProcessFacts> {
        let raw = pid.as_raw();
        let stat = Stat::read(raw)?;
        let uid = read_uid(raw)?;
        let cmdline = read_cmdline(raw, &stat)?;
        if ProcessFacts::read_start_time(pid)? != stat.start_time {
            return Err(Error::NoSuchProcess(raw));
        }
        // A process whose main thread exited (pthread_exit) shows the leader's state, Z,
        // while its other threads run: report the state of a live thread.
        let state = if stat.leader_exited() {
            live_task_state(raw).unwrap_or(stat.state)
        } else {
            stat.state
        };
        Ok(ProcessFacts {
            pid,
            ppid: stat.ppid,
            pgid: stat.pgid,
            sid: stat.sid,
            uid,
            state,
            start_time: stat.start_time,
            comm: stat.comm,
            threads: stat.threads,
            argv: split_cmdline(&cmdline),
            cmdline,
        })
    }

    /// Whether the process has exited: zombie or dead, with no thread left running.
    pub fn has_exited(&self) -> bool {
        self.state.has_exited()
    }

    /// Reads only the start time: one small read of `/proc/PID/stat`. This is the hot path
    /// of registration and of every identity check.
    pub fn read_start_time(pid: Pid) -> Result<u64> {
        Stat::read(pid.as_raw()).map(|stat| stat.start_time)
    }
}

fn unparsable(pid: i32) -> Error {
    Error::Proc {
        pid,
        message: "unparsable /proc/PID/stat".to_string(),
        errno: None,
    }
}

/// The fields of `/proc/PID/stat` that this library uses, from a single read. Scans,
/// ancestry walks and pinning use it; [`ProcessFacts`] adds uid and argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub state: ProcessState,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// User and system CPU time, clock ticks.
    pub utime: u64,
    pub stime: u64,
    pub threads: u64,
    /// Clock ticks since boot.
    pub start_time: u64,
    /// Resident set size, pages.
    pub rss_pages: u64,
}

impl Stat {
    /// Reads `/proc/PID/stat` of any pid the kernel reports (PID 1 included).
    pub fn read(pid: i32) -> Result<Stat> {
        let mut buf = [0u8; 1024];
        let len = read_small(&format!("/proc/{pid}/stat"), &mut buf, pid)?;
        parse_stat(&buf[..len]).ok_or_else(|| unparsable(pid))
    }

    /// Whether the whole process has exited. The leader's state alone does not say it: a
    /// leader that called `pthread_exit` is a zombie (`Zl`) while its other threads run,
    /// and the thread count then still includes the unreaped leader (> 1). A real zombie
    /// counts 1.
    pub fn has_exited(&self) -> bool {
        self.state.has_exited() && self.threads <= 1
    }

    /// The main thread has exited but other threads still run.
    pub fn leader_exited(&self) -> bool {
        self.state.has_exited() && self.threads > 1
    }
}

/// The state of the first live thread of `pid`, for a process whose leader has exited.
fn live_task_state(pid: i32) -> Option<ProcessState> {
    task_ids(pid).into_iter().find_map(|tid| {
        let mut buf = [0u8; 1024];
        let len = read_small(&format!("/proc/{pid}/task/{tid}/stat"), &mut buf, pid).ok()?;
        let state = parse_stat(&buf[..len])?.state;
        (!state.has_exited()).then_some(state)
    })
}

/// The thread ids of `pid`, leader first when present.
fn task_ids(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut tids: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable_by_key(|t| (*t != pid, *t));
    tids
}

/// Reads `/proc/PID/<file>` (cmdline, environ). When the leader has exited while other
/// threads run, the leader's copy is empty: the file of a live thread holds the data,
/// since every thread shares the address space.
pub(crate) fn read_task_file(pid: i32, file: &str, stat: Option<&Stat>) -> Result<Vec<u8>> {
    let leader = std::fs::read(format!("/proc/{pid}/{file}")).map_err(|e| Error::from_io(pid, e));
    if matches!(&leader, Ok(bytes) if !bytes.is_empty()) {
        return leader;
    }
    // Empty, or refused (the leader's copy of a Zl process can answer ESRCH): only a
    // process whose leader exited while other threads run has its data elsewhere.
    let leader_exited = match stat {
        Some(stat) => stat.leader_exited(),
        None => Stat::read(pid).is_ok_and(|s| s.leader_exited()),
    };
    if !leader_exited {
        return leader;
    }
    task_ids(pid)
        .into_iter()
        .filter(|tid| *tid != pid)
        .find_map(|tid| {
            std::fs::read(format!("/proc/{pid}/task/{tid}/{file}"))
                .ok()
                .filter(|b| !b.is_empty())
        })
        .map_or(leader, Ok)
}

/// Every pid in `/proc` now, in no particular order. An error when `/proc` cannot be
/// listed in full (EMFILE, ENOMEM): a partial list is not every pid.
pub fn all_pids() -> std::io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let name = entry?.file_name();
        if let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) {
            if pid > 0 {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

/// The owner of `/proc/PID`: the process's real uid.
pub fn read_uid(pid: i32) -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid())
        .map_err(|e| Error::from_io(pid, e))
}

/// Parses a `/proc/PID/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so it runs from the first `(` to the *last* `)`.
pub(crate) fn parse_stat(stat: &[u8]) -> Option<Stat> {
    let open = stat.iter().position(|b| *b == b'(')?;
    let close = stat.iter().rposition(|b| *b == b')')?;
    if close < open {
        return None;
    }
    let comm = String::from_utf8_lossy(&stat[open + 1..close]).into_owned();
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After ")" come fields 3 (state), 4 (ppid), 5 (pgrp), 6 (session) ... 14 (utime),
    // 15 (stime), 20 (num_threads), 22 (starttime), 24 (rss): field N is rest[N - 3].
    let fields: Vec<&str> = rest.split_ascii_whitespace().take(22).collect();
    let number = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    let signed = |field: usize| fields.get(field - 3)?.parse::<i32>().ok();
    Some(Stat {
        comm,
        state: ProcessState::from_char(fields.first()?.chars().next()?),
        ppid: signed(4)?,
        pgid: signed(5)?,
        sid: signed(6)?,
        utime: number(14)?,
        stime: number(15)?,
        threads: number(20)?,
        start_time: number(22)?,
        rss_pages: number(24)?,
    })
}

/// One read is enough: the kernel produces the whole (short) file at once. A second read
/// only to see EOF would double the syscalls of every scan.
fn read_small(path: &str, buf: &mut [u8], pid: i32) -> Result<usize> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::from_io(pid, e))?;
    file.read(buf).map_err(|e| Error::from_io(pid, e))
}

/// The raw cmdline of `pid` (a live thread's when the leader has exited).
fn read_cmdline(pid: i32, stat: &Stat) -> Result<Vec<u8>> {
    read_task_file(pid, "cmdline", Some(stat))
}

/// The raw cmdline of `pid`, for a scan that found the leader's copy empty: a live
/// thread's when the leader has exited, `None` otherwise (kernel threads, zombies).
pub(crate) fn cmdline_of_exited_leader(pid: i32) -> Option<Vec<u8>> {
    let stat = Stat::read(pid).ok()?;
    if !stat.leader_exited() {
        return None;
    }
    read_task_file(pid, "cmdline", Some(&stat))
        .ok()
        .filter(|b| !b.is_empty())
}

/// Splits the raw contents of `/proc/PID/cmdline` into arguments.
pub(crate) fn split_cmdline(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// The name of the helper through which a VM starts its port programs.
pub const PORT_HELPER: &str = "erl_child_setup";

/// Whether a process with this name and parent is the port helper of the VM `beam_pid`.
pub fn is_port_helper_of(comm: &str, ppid: i32, beam_pid: i32) -> bool {
    comm == PORT_HELPER && ppid == beam_pid
}

/// Whether `pid` is a port program of the VM `beam_pid`: its parent is that VM's port
/// helper. Two `/proc/PID/stat` reads.
pub fn is_port_child_of(pid: i32, beam_pid: i32) -> bool {
    port_child_start(pid, beam_pid).is_some()
}

/// The start time of `pid` when it is a port program of the VM `beam_pid`, `None` when it
/// is not (or cannot be read): a caller compares it with the start time it recorded, so
/// that a recycled pid is never taken for the port program that had it.
pub fn port_child_start(pid: i32, beam_pid: i32) -> Option<u64> {
    let child = Stat::read(pid).ok()?;
    let helper = Stat::read(child.ppid).ok()?;
    is_port_helper_of(&helper.comm, helper.ppid, beam_pid).then_some(child.start_time)
}

/// Whether a process name is an Erlang VM's (`beam.smp`, or `beam` on old builds).
pub fn is_beam(comm: &str) -> bool {
    // beam.smp, and the emulator flavours: beam.debug.smp, beam.asan.smp, beam.lcnt.smp...
    comm.starts_with("beam")
}

/// Clock ticks since boot, the unit of process start times.
pub fn uptime_ticks(ticks_per_second: u64) -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |secs| (secs * ticks_per_second as f64) as u64)
}

/// One line of `/proc/PID/mountinfo`, its fields as written there (octal escapes kept).
pub(crate) struct MountEntry<'a> {
    pub root: &'a str,
    pub mount_point: &'a str,
    pub fstype: &'a str,
    pub super_options: &'a str,
}

/// The well-formed lines of a `mountinfo` text, in order (later mounts over earlier ones).
pub(crate) fn mount_entries(mountinfo: &str) -> impl Iterator<Item = MountEntry<'_>> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut left = left.split_ascii_whitespace();
        let root = left.nth(3)?;
        let mount_point = left.next()?;
        // Split on single spaces: an empty source is printed as nothing between two.
        let mut right = right.split(' ');
        let fstype = right.next()?;
        let super_options = right.nth(1).unwrap_or("");
        Some(MountEntry {
            root,
            mount_point,
            fstype,
            super_options,
        })
    })
}

/// Whether `/proc`, as mounted for this process (`mountinfo`: `/proc/self/mountinfo`),
/// lets every process's `/proc/PID/stat` be read: no `hidepid` other than 0 and no
/// `subset`. Only then can a start time be read later without a chance of EACCES or of a
/// live process that looks absent. No `/proc` mount found: `false`.
pub fn proc_stat_readable_by_all(mountinfo: &str) -> bool {
    mount_entries(mountinfo)
        .filter(|m| m.mount_point == "/proc" && m.fstype == "proc")
        .last()
        .is_some_and(|proc| {
            proc.super_options.split(',').all(|option| {
                let hides = option.starts_with("subset=")
                    || option.starts_with("hidepid=")
                        && !matches!(option, "hidepid=0" | "hidepid=off");
                !hides
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn proc_is_readable_by_all_only_without_hidepid_or_subset() {
        let line = |opts: &str| {
            format!(
                "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc {opts}\n"
            )
        };
        let sys = "23 1 0:22 / /sys rw - sysfs sysfs rw\n";
        assert!(proc_stat_readable_by_all(&(sys.to_owned() + &line("rw"))));
        assert!(proc_stat_readable_by_all(&line("rw,hidepid=0")));
        assert!(proc_stat_readable_by_all(&line("rw,hidepid=off")));
        assert!(!proc_stat_readable_by_all(&line("rw,hidepid=2")));
        assert!(!proc_stat_readable_by_all(&line("rw,hidepid=invisible")));
        assert!(!proc_stat_readable_by_all(&line("rw,subset=pid")));
        // The last /proc mount is the one that shows.
        assert!(!proc_stat_readable_by_all(
            &(line("rw") + &line("rw,hidepid=2"))
        ));
        assert!(!proc_stat_readable_by_all(sys));
        assert!(!proc_stat_readable_by_all(""));
        // An empty source is printed as nothing between two spaces.
        let no_source = "22 1 0:21 / /proc rw shared:12 - proc  rw,hidepid=2\n";
        assert!(!proc_stat_readable_by_all(no_source));
        assert!(proc_stat_readable_by_all(
            "22 1 0:21 / /proc rw shared:12 - proc  rw\n"
        ));
    }

    #[test]
    fn parses_start_time_even_with_hostile_comm() {
        let line = b"4242 (evil) 1 2 (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200 18446744073709551615";
        assert_eq!(parse_stat(line).map(|s| s.start_time), Some(987654));
        assert_eq!(parse_stat(b"12 (a) S 1 2"), None);
        assert_eq!(parse_stat(b"no paren"), None);
        assert_eq!(parse_stat(b""), None);
    }

    #[test]
    fn parses_the_fields_we_use() {
        let line = b"4242 (a) b) (c) S 1 4242 4241 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 987654 1000 200";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            (stat.utime, stat.stime, stat.threads, stat.rss_pages),
            (17, 5, 3, 200)
        );
        assert_eq!(stat.comm, "a) b) (c");
        assert_eq!(stat.state, ProcessState::Sleeping);
        assert_eq!((stat.ppid, stat.pgid, stat.sid), (1, 4242, 4241));
        assert_eq!(stat.start_time, 987654);
        assert_eq!(parse_stat(b"1 (x) S 1 2 3"), None);
        assert_eq!(
            parse_stat(b"1 )x( S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"),
            None
        );
        assert_eq!(parse_stat(b""), None);
    }

    #[test]
    fn stat_agrees_with_procfs_on_real_processes() {
        for pid in [1, std::process::id() as i32] {
            let ours = Stat::read(pid).unwrap();
            let theirs = procfs::process::Process::new(pid).unwrap().stat().unwrap();
            assert_eq!(ours.comm, theirs.comm);
            assert_eq!(ours.ppid, theirs.ppid);
            assert_eq!(ours.pgid, theirs.pgrp);
            assert_eq!(ours.sid, theirs.session);
            assert_eq!(ours.start_time, theirs.starttime);
            assert_eq!(ours.threads, theirs.num_threads as u64);
            assert!(ours.rss_pages > 0);
        }
        assert_eq!(
            read_uid(std::process::id() as i32).unwrap(),
            nix::unistd::getuid().as_raw()
        );
        assert!(matches!(Stat::read(i32::MAX), Err(Error::NoSuchProcess(_))));
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
        assert!(!facts.has_exited());
        assert_eq!(
            facts.start_time,
            ProcessFacts::read_start_time(pid).unwrap()
        );

        // Killed but not yet reaped: a zombie with no argv, same identity.
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let zombie = loop {
            let f = ProcessFacts::read(pid).unwrap();
            if f.has_exited() || std::time::Instant::now() > deadline {
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
