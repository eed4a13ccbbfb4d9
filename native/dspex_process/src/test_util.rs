//! Helpers for the core's tests: real child processes, never anything the test did not start.

use std::process::{Child, Command};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// The real interpreter behind `python3`. On machines where `python3` is a pyenv shim,
/// the shim forks helper shells that carry the same argv for a moment; the tests want
/// exactly one process per spawn.
pub static PYTHON: LazyLock<String> = LazyLock::new(|| {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed for the tests");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
});

/// A unique tag for one test, to put in argv and match on.
pub fn unique_tag(test: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("dspex_core_{test}_{}_{n}", std::process::id())
}

/// Writes `code` to a script file whose name is `tag` (raw bytes allowed), in a folder of
/// this test process's own, and returns its path.
pub fn script_named(tag: &[u8], code: &str) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::env::temp_dir().join(format!("dspex_core_tests_{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(std::ffi::OsStr::from_bytes(tag));
    std::fs::write(&path, code).expect("write script");
    path
}

/// Starts python running `code` as a script file named `tag`: `python3 /tmp/.../tag`, so
/// that `tag` is the script the interpreter runs.
pub fn spawn_python(code: &str, tag: &str) -> Child {
    Command::new(PYTHON.as_str())
        .arg(script_named(tag.as_bytes(), code))
        .spawn()
        .expect("spawn python")
}

/// Polls `f` until it is true or `timeout` passes; returns the last answer.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Python code that sleeps until it is signalled.
pub const SLEEPER: &str = "import time\nwhile True: time.sleep(1)";

/// A python child leading its own process group, as a port program does, with its identity.
pub fn spawn(code: &str) -> (Child, crate::ProcessIdentity) {
    use std::os::unix::process::CommandExt;
    let child = Command::new(PYTHON.as_str())
        .args(["-c", code])
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn python");
    let pid = crate::Pid::new(i64::from(child.id())).expect("a child's pid is > 1");
    let identity = crate::ProcessIdentity::of(pid).expect("the child just started");
    (child, identity)
}

/// Kills and reaps children the test started.
pub fn reap(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A per-VM cgroup for one test, named with a made-up pid namespace (so that no cleanup
/// running meanwhile takes it for a dead VM's) and removed when dropped. `None` (and a note)
/// where this user cannot create cgroups.
pub struct TestVmCgroup(pub crate::cgroup::VmCgroup);

impl TestVmCgroup {
    pub fn new() -> Option<TestVmCgroup> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let me = crate::Pid::new(i64::from(std::process::id())).ok()?;
        let name = crate::cgroup::VmName {
            pid_ns: COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            vm: crate::ProcessIdentity::of(me).ok()?,
        };
        match crate::cgroup::VmCgroup::create(name) {
            Ok(vm) => Some(TestVmCgroup(vm)),
            Err(why) => {
                eprintln!("cgroups unavailable here ({why}): not run");
                None
            }
        }
    }
}

impl Drop for TestVmCgroup {
    fn drop(&mut self) {
        let unit = self.0.as_unit();
        if unit.populated() == Some(true) {
            let _ = unit.kill();
            unit.wait_empty(Duration::from_secs(2));
        }
        unit.remove(Duration::from_secs(1));
    }
}

/// Python code that forks a child, which forks a grandchild that calls `setsid()` and
/// double-forks (its own parent exits), with an argv of its own (`sleep 300`), once a line
/// arrives on stdin; prints the escaped pid once it has exec'd (the pipe is close-on-exec)
/// and sleeps.
pub const ESCAPER: &str = r#"
import os, sys, time
sys.stdin.readline()
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        os.write(w, str(os.getpid()).encode())
        os.execvp("sleep", ["sleep", "300"])
    os._exit(0)
os.close(w)
pid = b""
while True:
    chunk = os.read(r, 32)
    if not chunk: break
    pid += chunk
print(pid.decode(), flush=True)
while True: time.sleep(1)
"#;
