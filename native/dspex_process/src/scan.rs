//! Finding candidate worker processes in `/proc` by a literal argv pattern.

use crate::error::{Error, Result};
use crate::markers::Markers;
use crate::pid::Pid;
use crate::proc_facts::{all_pids, ProcessFacts};
use std::io::Read;

/// The default pattern: the DSPex bridge script.
pub const DEFAULT_PATTERN: &str = "dspy_bridge.py";
const MAX_PATTERNS: usize = 64;
const MAX_PATTERN_LEN: usize = 4096;

/// Literal argv patterns, compared with whole arguments or their basenames
/// (`/opt/app/dspy_bridge.py` matches `dspy_bridge.py`), byte for byte. Never a regex,
/// never a substring, never a shell string: `dspy_bridge.py.bak` does not match.
///
/// Two rules use them:
/// - [`Pattern::matches_program`], for processes without ownership markers: the pattern
///   must name the *program* — `argv[0]` itself, or the script that an interpreter in
///   `argv[0]` runs (see [`script_of`]). `python3 /srv/dspy_bridge.py --mode pool-worker`
///   matches; `tail -f dspy_bridge.py`, `vim dspy_bridge.py` or a cleaner's
///   `--pattern dspy_bridge.py` do not.
/// - [`Pattern::matches_cmdline`], for processes that carry markers (stamped by a worker's
///   owner, so they are workers or their children whatever they run): any argument.
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

    /// Whether the pattern names the program of this raw `/proc/PID/cmdline`: `argv[0]`,
    /// or the script an interpreter in `argv[0]` runs.
    pub fn matches_program(&self, cmdline: &[u8]) -> bool {
        let argv = split_args(cmdline);
        let Some(program) = argv.first() else {
            return false;
        };
        self.matches_arg(program) || script_of(&argv).is_some_and(|s| self.matches_arg(s))
    }

    /// Whether any argument of the raw `/proc/PID/cmdline` bytes matches.
    pub fn matches_cmdline(&self, cmdline: &[u8]) -> bool {
        cmdline
            .split(|b| *b == 0)
            .filter(|arg| !arg.is_empty())
            .any(|arg| self.matches_arg(arg))
    }

    fn matches_arg(&self, arg: &[u8]) -> bool {
        let base = basename(arg);
        self.needles
            .iter()
            .any(|n| n.as_slice() == arg || n.as_slice() == base)
    }
}

fn basename(arg: &[u8]) -> &[u8] {
    match arg.iter().rposition(|b| *b == b'/') {
        Some(slash) => &arg[slash + 1..],
        None => arg,
    }
}

/// The arguments of a raw cmdline, empty ones included (their position counts).
fn split_args(cmdline: &[u8]) -> Vec<&[u8]> {
    let trimmed = cmdline.strip_suffix(&[0]).unwrap_or(cmdline);
    if trimmed.is_empty() {
        return Vec::new();
    }
    trimmed.split(|b| *b == 0).collect()
}

/// Python interpreters: `python`, `python3`, `python3.11`, `python3.13t`, `pypy3`...
fn is_python(name: &[u8]) -> bool {
    let rest = match name {
        n if n.starts_with(b"python") => &n[6..],
        n if n.starts_with(b"pypy") => &n[4..],
        _ => return false,
    };
    let version = match rest.last() {
        Some(b'm' | b'd' | b't' | b'u') => &rest[..rest.len() - 1],
        _ => rest,
    };
    version.iter().all(|b| b.is_ascii_digit() || *b == b'.')
}

/// POSIX shells, which run a script given as their first operand.
fn is_shell(name: &[u8]) -> bool {
    matches!(
        name,
        b"sh" | b"bash" | b"dash" | b"zsh" | b"ksh" | b"mksh" | b"ash"
    )
}

/// The script that the interpreter in `argv[0]` runs, if `argv[0]` is a Python or a POSIX
/// shell and it runs a script file: the first operand after the interpreter's own options.
/// `None` for inline code or a module (`-c`, `-m`), for stdin (`-`), and for any other
/// program. Option grammars are CPython's and the POSIX shells'.
pub fn script_of<'a>(argv: &[&'a [u8]]) -> Option<&'a [u8]> {
    let program = basename(argv.first()?);
    let args = &argv[1..];
    if is_python(program) {
        python_script(args)
    } else if is_shell(program) {
        shell_script(args)
    } else {
        None
    }
}

fn python_script<'a>(args: &[&'a [u8]]) -> Option<&'a [u8]> {
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        match *arg {
            b"--" => return args.get(i + 1).copied(),
            b"-" => return None,
            b"--check-hash-based-pycs" => i += 2,
            a if a.starts_with(b"--") => i += 1,
            a if a.starts_with(b"-") => {
                // A cluster of short options; -c and -m end the options with no script,
                // -W and -X take a value: the rest of the cluster, or the next argument.
                for (j, flag) in a.iter().enumerate().skip(1) {
                    match flag {
                        b'c' | b'm' => return None,
                        b'W' | b'X' => {
                            if j + 1 == a.len() {
                                i += 1;
                            }
                            break;
                        }
                        _ => {}
                    }
                }
                i += 1;
            }
            a => return Some(a),
        }
    }
    None
}

fn shell_script<'a>(args: &[&'a [u8]]) -> Option<&'a [u8]> {
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        match *arg {
            b"--" | b"-" => return args.get(i + 1).copied(),
            b"--rcfile" | b"--init-file" => i += 2,
            a if a.starts_with(b"--") => i += 1,
            a if a.starts_with(b"-") || a.starts_with(b"+") => {
                if a.contains(&b'c') {
                    return None;
                }
                // -o/-O (and +o/+O) take the next argument as their value.
                i += if a.contains(&b'o') || a.contains(&b'O') {
                    2
                } else {
                    1
                };
            }
            a => return Some(a),
        }
    }
    None
}

/// The library's own tools: never workers, never targets, whatever their arguments.
pub const OWN_TOOLS: &[&str] = &["dspex-proc", "kill_python.sh"];

/// Whether a process is one of the library's own tools: by its name (`comm`), by
/// `argv[0]`, or by the script an interpreter runs (`bash kill_python.sh`).
pub fn is_own_tool(comm: &str, cmdline: &[u8]) -> bool {
    let argv = split_args(cmdline);
    let named = |name: &[u8]| OWN_TOOLS.iter().any(|t| t.as_bytes() == basename(name));
    OWN_TOOLS.contains(&comm)
        || argv.first().is_some_and(|p| named(p))
        || script_of(&argv).is_some_and(named)
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
    /// Reads one process. `None` when it is gone, may not be read (another user's, under
    /// hidepid), or its argv does not (or no longer) match the pattern: any argument for a
    /// process with markers, the program (see [`Pattern::matches_program`]) for one
    /// without. An error when a read failed for want of descriptors or memory: that says
    /// nothing about the process.
    pub fn read(pid: Pid, pattern: &Pattern) -> std::io::Result<Option<Candidate>> {
        match Candidate::read_facts(pid, pattern) {
            Ok(found) => Ok(found),
            Err(e) => {
                let io = std::io::Error::from_raw_os_error(e.errno());
                if crate::sys::is_exhaustion(&io) {
                    Err(io)
                } else {
                    Ok(None)
                }
            }
        }
    }

    fn read_facts(pid: Pid, pattern: &Pattern) -> Result<Option<Candidate>> {
        let facts = ProcessFacts::read(pid)?;
        // A VM is never a worker, even when a worker's script path is among its arguments;
        // nor is any of the library's own tools (a cleaner's `--pattern P`).
        if crate::proc_facts::is_beam(&facts.comm) || is_own_tool(&facts.comm, &facts.cmdline) {
            return Ok(None);
        }
        // Exited processes have no argv left to match; scan() only reaches them in the
        // instant between its cmdline read and this one.
        let exited = facts.has_exited();
        if !exited && !pattern.matches_cmdline(&facts.cmdline) {
            return Ok(None);
        }
        let markers = match Markers::read(pid) {
            Ok(Some(m)) => MarkerRead::Present(m),
            Ok(None) => MarkerRead::Absent,
            Err(Error::NoSuchProcess(_)) => return Ok(None),
            Err(_) => MarkerRead::Unreadable,
        };
        // Without markers, naming the pattern is not enough: it must be the program.
        if !exited
            && !matches!(markers, MarkerRead::Present(_))
            && !pattern.matches_program(&facts.cmdline)
        {
            return Ok(None);
        }
        // The environment was read by path: make sure the pid still names the same process.
        if ProcessFacts::read_start_time(pid)? != facts.start_time {
            return Ok(None);
        }
        Ok(Some(Candidate { facts, markers }))
    }
}

/// Every live process whose argv matches `pattern`. Processes that vanish while being
/// read are skipped; so are kernel threads, processes still inside `exec` (empty argv) and
/// those whose `/proc` files may not be read (another user's, under hidepid).
/// The caller and its ancestors are never candidates, even when their argv holds the
/// pattern (`dspex-proc find --pattern x.py`, a script that passes it on).
///
/// An error when `/proc` could not be read in full for want of descriptors or memory
/// (EMFILE, ENFILE, ENOMEM): what it did not read may hold matches, so no partial list is
/// returned as if it were all of them.
///
/// Reading every `/proc/PID/cmdline` is the whole cost of a scan, so the pids are split
/// across the machine's cores.
pub fn scan(pattern: &Pattern) -> std::io::Result<Vec<Candidate>> {
    let caller = crate::ancestry::caller_and_ancestors();
    let pids: Vec<i32> = all_pids()?
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
        let mut found = Vec::new();
        for worker in workers {
            let part = worker
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a scan thread panicked")));
            found.extend(part?);
        }
        Ok(found)
    })
}

fn scan_pids(pids: &[i32], pattern: &Pattern) -> std::io::Result<Vec<Candidate>> {
    let proc_dir = std::fs::File::open("/proc")?;
    let mut buf = vec![0u8; 8192];
    let mut found = Vec::new();
    for &raw in pids {
        let mut file = match open_cmdline(&proc_dir, raw) {
            Ok(file) => file,
            Err(e) if crate::sys::is_exhaustion(&e) => return Err(e),
            // Gone, or not ours to read.
            Err(_) => continue,
        };
        // One read returns the whole argv unless it is longer than the buffer.
        let Ok(len) = file.read(&mut buf) else {
            continue;
        };
        let matched = if len == 0 {
            // Kernel threads and zombies have no argv; so has a process whose main thread
            // exited while others run, whose argv is still in its threads' cmdline.
            crate::proc_facts::cmdline_of_exited_leader(raw)
                .is_some_and(|cmdline| pattern.matches_cmdline(&cmdline))
        } else if len < buf.len() {
            pattern.matches_cmdline(&buf[..len])
        } else {
            let mut long = buf.clone();
            file.read_to_end(&mut long).is_ok() && pattern.matches_cmdline(&long)
        };
        drop(file);
        if !matched {
            continue;
        }
        if let Ok(pid) = Pid::new(i64::from(raw)) {
            found.extend(Candidate::read(pid, pattern)?);
        }
    }
    Ok(found)
}

/// Opens `PID/cmdline` relative to an open `/proc`, sparing the kernel the walk from `/`
/// for each of the thousand files of a scan.
fn open_cmdline(proc_dir: &std::fs::File, pid: i32) -> std::io::Result<std::fs::File> {
    crate::sys::open_read_at(proc_dir, &format!("{pid}/cmdline"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc_facts::Stat;
    use crate::test_util::{eventually, spawn_python, unique_tag};
    use std::time::Duration;

    #[test]
    fn matches_literal_argv_elements_and_basenames_only() {
        let p = Pattern::default();
        assert!(p.matches_cmdline(b"python3\0dspy_bridge.py\0--mode\0pool-worker\0"));
        assert!(p.matches_cmdline(b"/usr/bin/python3\0/srv/app/priv/dspy_bridge.py\0"));
        assert!(!p.matches_cmdline(b"python3\0dspy_bridge.py.bak\0"));
        // Bytes, not text: a name that is not UTF-8 matches itself.
        let raw = Pattern::new(&[&b"w\xff\xfe.py"[..]]).unwrap();
        assert!(raw.matches_program(b"python3\0/tmp/w\xff\xfe.py\0"));
        assert!(!raw.matches_program(b"python3\0/tmp/w\xef\xbf\xbd.py\0"));
        assert!(!p.matches_cmdline(b"vim\0old_dspy_bridge.py\0"));
        assert!(!p.matches_cmdline(b"bash\0-c\0python3 dspy_bridge.py\0"));
        assert!(!p.matches_cmdline(b""));

        let full = Pattern::new(&["/srv/app/x.py", "y.py"]).unwrap();
        assert!(full.matches_cmdline(b"python3\0/srv/app/x.py\0"));
        assert!(!full.matches_cmdline(b"python3\0/other/x.py\0"));
        assert!(full.matches_cmdline(b"python3\0/any/where/y.py\0"));
    }

    #[test]
    fn without_markers_only_the_program_matches() {
        let p = Pattern::default();
        for yes in [
            &b"python3\0/path/dspy_bridge.py\0--mode\0pool-worker\0"[..],
            b"/root/.pyenv/versions/3.11.7/bin/python3\0dspy_bridge.py\0",
            b"python3.11\0-u\0-W\0ignore\0-X\0dev\0dspy_bridge.py\0",
            b"python\0-Wignore\0-OO\0--\0dspy_bridge.py\0",
            b"pypy3\0dspy_bridge.py\0",
            b"/usr/bin/dspy_bridge.py\0--mode\0pool-worker\0",
            b"bash\0-e\0-o\0pipefail\0dspy_bridge.py\0",
        ] {
            assert!(p.matches_program(yes), "{:?}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"tail\0-f\0dspy_bridge.py\0"[..],
            b"vim\0dspy_bridge.py\0",
            b"dspex-proc\0cleanup\0--pattern\0dspy_bridge.py\0",
            b"dspex-proc\0exec\0--pdeathsig\0KILL\0--\0python3\0dspy_bridge.py\0",
            b"bash\0/srv/kill_python.sh\0--pattern\0dspy_bridge.py\0",
            b"python3\0-c\0import x\0dspy_bridge.py\0",
            b"python3\0-m\0pdb\0dspy_bridge.py\0",
            b"python3\0-\0dspy_bridge.py\0",
            b"python3\0/usr/bin/cleaner\0dspy_bridge.py\0",
            b"sh\0-c\0python3 dspy_bridge.py\0dspy_bridge.py\0",
            b"bash\0/root/.pyenv/shims/python3\0dspy_bridge.py\0",
            b"python3-config\0dspy_bridge.py\0",
            b"",
        ] {
            assert!(!p.matches_program(no), "{:?}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn the_librarys_own_tools_are_recognised() {
        assert!(is_own_tool("dspex-proc", b"dspex-proc\0cleanup\0"));
        assert!(is_own_tool(
            "kill_python.sh",
            b"/bin/bash\0./kill_python.sh\0"
        ));
        assert!(is_own_tool("bash", b"bash\0/srv/kill_python.sh\0--yes\0"));
        assert!(is_own_tool(
            "x",
            b"/opt/bin/dspex-proc\0exec\0--\0python3\0a.py\0"
        ));
        assert!(!is_own_tool("python3", b"python3\0dspy_bridge.py\0"));
    }

    #[test]
    fn a_script_name_that_is_not_utf8_is_found() {
        use crate::test_util::{eventually, script_named, unique_tag, PYTHON};
        let mut name = unique_tag("bytes").into_bytes();
        name.extend_from_slice(b"_\xff\xfe.py");
        let script = script_named(&name, "import time\nwhile True: time.sleep(1)");
        let mut child = std::process::Command::new(PYTHON.as_str())
            .arg(&script)
            .spawn()
            .unwrap();
        let pattern = Pattern::new(&[&name]).unwrap();
        let found = eventually(Duration::from_secs(5), || {
            scan(&pattern)
                .unwrap()
                .iter()
                .any(|c| c.facts.pid.as_raw() == child.id() as i32)
        });
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found, "a non-UTF-8 script name was not found");
    }

    #[test]
    fn a_process_whose_main_thread_exited_is_visible() {
        use crate::test_util::{eventually, spawn_python, unique_tag};
        let tag = unique_tag("zl");
        let code = "import ctypes, threading, time\nthreading.Thread(target=lambda: [time.sleep(1) for _ in iter(int, 1)]).start()\nctypes.CDLL(None).pthread_exit(None)";
        let mut child = spawn_python(code, &tag);
        let pid = child.id() as i32;
        assert!(eventually(Duration::from_secs(5), || {
            Stat::read(pid).is_ok_and(|s| s.leader_exited())
        }));
        let pattern = Pattern::new(&[tag.as_str()]).unwrap();
        let found = scan(&pattern).unwrap();
        let classes =
            crate::classify::detect(&pattern, crate::classify::Viewpoint::default()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(!found[0].facts.has_exited());
        assert_eq!(classes[0].class, crate::classify::Class::Unmanaged);
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
                .unwrap()
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
        assert!(scan(&pattern).unwrap().is_empty());
    }
}
