//! Finding candidate worker processes in `/proc` by a literal argv pattern.

use crate::error::{Error, Result};
use crate::identity::Pid;
use crate::markers::Markers;
use crate::proc_facts::{all_pids, ProcessFacts, Stat};
use std::io::Read;

/// The default pattern: the DSPex bridge script.
pub const DEFAULT_PATTERN: &str = "dspy_bridge.py";
const MAX_PATTERNS: usize = 64;
const MAX_PATTERN_LEN: usize = 4096;

/// Literal argv patterns. A process matches when one of its argv elements equals a pattern
/// or has it as its basename (`/opt/app/dspy_bridge.py` matches `dspy_bridge.py`). Never a
/// regex, never a substring, never a shell string: `dspy_bridge.py.bak` or
/// `vim dspy_bridge.py.swp` do not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    needles: Vec<Vec<u8>>,
}

impl Default for Pattern {
    fn default() -> Self {
        Pattern {
            needles: vec![DEFAULT_PATTERN.as_bytes().to_vec()],
        }
    }
}

impl Pattern {
    /// Validates patterns: 1 to 64 of them, each 1 to 4096 bytes, without NUL.
    pub fn new<S: AsRef<[u8]>>(patterns: &[S]) -> Result<Pattern> {
        if patterns.is_empty() || patterns.len() > MAX_PATTERNS {
            return Err(Error::InvalidPattern(format!(
                "expected 1 to {MAX_PATTERNS} patterns, got {}",
                patterns.len()
            )));
        }
        let needles = patterns
            .iter()
            .map(|p| {
                let p = p.as_ref();
                if p.is_empty() || p.len() > MAX_PATTERN_LEN || p.contains(&0) {
                    Err(Error::InvalidPattern(format!(
                        "a pattern must be 1 to {MAX_PATTERN_LEN} bytes without NUL, got {:?}",
                        String::from_utf8_lossy(&p[..p.len().min(64)])
                    )))
                } else {
                    Ok(p.to_vec())
                }
            })
            .collect::<Result<_>>()?;
        Ok(Pattern { needles })
    }

    /// Whether the raw `/proc/PID/cmdline` bytes match.
    pub fn matches_cmdline(&self, cmdline: &[u8]) -> bool {
        cmdline
            .split(|b| *b == 0)
            .filter(|arg| !arg.is_empty())
            .any(|arg| self.matches_arg(arg))
    }

    fn matches_arg(&self, arg: &[u8]) -> bool {
        let base = match arg.iter().rposition(|b| *b == b'/') {
            Some(slash) => &arg[slash + 1..],
            None => arg,
        };
        self.needles
            .iter()
            .any(|n| n.as_slice() == arg || n.as_slice() == base)
    }
}

/// What a process's environment says about its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkerRead {
    Present(Markers),
    Absent,
    /// The environment is not readable (another user's process, without root).
    Unreadable,
}

impl MarkerRead {
    pub fn markers(&self) -> Option<&Markers> {
        match self {
            MarkerRead::Present(m) => Some(m),
            _ => None,
        }
    }
}

/// A process whose argv matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub facts: ProcessFacts,
    pub markers: MarkerRead,
}

impl Candidate {
    /// Reads one process. `None` when it is gone or its argv does not (or no longer)
    /// match the pattern.
    pub fn read(pid: Pid, pattern: &Pattern) -> Option<Candidate> {
        let facts = ProcessFacts::read(pid).ok()?;
        // A VM is never a worker, even when a worker's script path is among its arguments.
        if crate::classify::is_beam(&facts.comm) {
            return None;
        }
        let argv: Vec<u8> = facts.argv.join("\0").into_bytes();
        // Exited processes have no argv left to match; scan() only reaches them in the
        // instant between its cmdline read and this one.
        if !facts.state.has_exited() && !pattern.matches_cmdline(&argv) {
            return None;
        }
        let markers = match Markers::read(pid) {
            Ok(Some(m)) => MarkerRead::Present(m),
            Ok(None) => MarkerRead::Absent,
            Err(Error::NoSuchProcess(_)) => return None,
            Err(_) => MarkerRead::Unreadable,
        };
        // The environment was read by path: make sure the pid still names the same process.
        if ProcessFacts::read_start_time(pid).ok()? != facts.start_time {
            return None;
        }
        Some(Candidate { facts, markers })
    }
}

/// The calling process and every ancestor up to PID 1.
pub fn caller_and_ancestors() -> Vec<i32> {
    let mut chain = vec![std::process::id() as i32];
    let mut next = nix::unistd::getppid().as_raw();
    while next > 1 && !chain.contains(&next) && chain.len() < 256 {
        chain.push(next);
        next = match Stat::read(next) {
            Ok(stat) => stat.ppid,
            Err(_) => break,
        };
    }
    chain
}

/// Every live process whose argv matches `pattern`. Processes that vanish while being
/// read are skipped; so are kernel threads and processes still inside `exec` (empty argv).
/// The caller and its ancestors are never candidates, even when their argv holds the
/// pattern (`dspex-proc find --pattern x.py`, a script that passes it on).
///
/// Reading every `/proc/PID/cmdline` is the whole cost of a scan, so the pids are split
/// across the machine's cores.
pub fn scan(pattern: &Pattern) -> Vec<Candidate> {
    let caller = caller_and_ancestors();
    let pids: Vec<i32> = all_pids()
        .into_iter()
        .filter(|pid| *pid > 1 && !caller.contains(pid))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if threads == 1 || pids.len() < 256 {
        return scan_pids(&pids, pattern);
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = pids
            .chunks(pids.len().div_ceil(threads))
            .map(|chunk| {
                scope.spawn(move || {
                    crate::lower_thread_priority();
                    scan_pids(chunk, pattern)
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    })
}

fn scan_pids(pids: &[i32], pattern: &Pattern) -> Vec<Candidate> {
    let Ok(proc_dir) = std::fs::File::open("/proc") else {
        return Vec::new();
    };
    let mut buf = vec![0u8; 8192];
    let mut found = Vec::new();
    for &raw in pids {
        let Some(mut file) = open_cmdline(&proc_dir, raw) else {
            continue;
        };
        // One read returns the whole argv unless it is longer than the buffer.
        let Ok(len) = file.read(&mut buf) else {
            continue;
        };
        let matched = if len < buf.len() {
            pattern.matches_cmdline(&buf[..len])
        } else {
            let mut long = buf.clone();
            file.read_to_end(&mut long).is_ok() && pattern.matches_cmdline(&long)
        };
        if !matched {
            continue;
        }
        if let Some(candidate) = Pid::new(i64::from(raw))
            .ok()
            .and_then(|pid| Candidate::read(pid, pattern))
        {
            found.push(candidate);
        }
    }
    found
}

/// Opens `PID/cmdline` relative to an open `/proc`, sparing the kernel the walk from `/`
/// for each of the thousand files of a scan.
fn open_cmdline(proc_dir: &std::fs::File, pid: i32) -> Option<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let path = std::ffi::CString::new(format!("{pid}/cmdline")).ok()?;
    // SAFETY: a valid directory descriptor and a NUL-terminated path; a non-negative
    // result is a new descriptor that the returned File owns.
    let fd = unsafe {
        libc::openat(
            proc_dir.as_raw_fd(),
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    (fd >= 0).then(|| unsafe { std::fs::File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{eventually, spawn_python, unique_tag};
    use std::time::Duration;

    #[test]
    fn matches_literal_argv_elements_and_basenames_only() {
        let p = Pattern::default();
        assert!(p.matches_cmdline(b"python3\0dspy_bridge.py\0--mode\0pool-worker\0"));
        assert!(p.matches_cmdline(b"/usr/bin/python3\0/srv/app/priv/dspy_bridge.py\0"));
        assert!(!p.matches_cmdline(b"python3\0dspy_bridge.py.bak\0"));
        assert!(!p.matches_cmdline(b"vim\0old_dspy_bridge.py\0"));
        assert!(!p.matches_cmdline(b"bash\0-c\0python3 dspy_bridge.py\0"));
        assert!(!p.matches_cmdline(b""));

        let full = Pattern::new(&["/srv/app/x.py", "y.py"]).unwrap();
        assert!(full.matches_cmdline(b"python3\0/srv/app/x.py\0"));
        assert!(!full.matches_cmdline(b"python3\0/other/x.py\0"));
        assert!(full.matches_cmdline(b"python3\0/any/where/y.py\0"));
    }

    #[test]
    fn rejects_bad_patterns() {
        let empty: [&str; 0] = [];
        assert!(Pattern::new(&empty).is_err());
        assert!(Pattern::new(&[""]).is_err());
        assert!(Pattern::new(&["a\0b"]).is_err());
        assert!(Pattern::new(&["x".repeat(4097)]).is_err());
        assert!(Pattern::new(&vec!["x"; 65]).is_err());
        assert!(Pattern::new(&["x".repeat(4096)]).is_ok());
    }

    #[test]
    fn scan_finds_exactly_the_processes_with_a_unique_marker() {
        let tag = unique_tag("scan");
        let mut children: Vec<_> = (0..3)
            .map(|_| spawn_python("import time; time.sleep(30)", &tag))
            .collect();
        let pattern = Pattern::new(&[tag.as_str()]).unwrap();
        let want: std::collections::HashSet<i32> = children.iter().map(|c| c.id() as i32).collect();
        let found = || -> std::collections::HashSet<i32> {
            scan(&pattern)
                .iter()
                .map(|c| c.facts.pid.as_raw())
                .collect()
        };
        eventually(Duration::from_secs(5), || found() == want);
        let got = found();
        for c in &mut children {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        assert_eq!(got, want);
        assert!(scan(&pattern).is_empty());
    }
}
