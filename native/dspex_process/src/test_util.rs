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

/// Starts python running `code`, with `tag` as an extra argv element.
pub fn spawn_python(code: &str, tag: &str) -> Child {
    Command::new(PYTHON.as_str())
        .args(["-c", code, tag])
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
