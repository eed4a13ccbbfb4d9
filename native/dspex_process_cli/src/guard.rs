//! `dspex-proc guard`: the guardian a VM starts as a port. It reads `+ PID START` and
//! `- PID START` lines on stdin (see `dspex_process::guardian`), watches the VM through a
//! pidfd, and when the VM dies (even by `kill -9`) ends what is still registered, then
//! exits. When only its stdin closes and the VM lives on (the VM's guardian process
//! stopped or restarted), it exits without signalling anything.
//!
//! It never writes to stdout: after the VM dies that pipe has no reader.

use clap::Args;
use dspex_process::cgroup::VmCgroup;
use dspex_process::cgroup_v1::V1VmCgroup;
use dspex_process::guardian::{VmWatch, Watchlist};
use dspex_process::terminate::{end_dead_vm_cgroup, Outcome, TerminateOptions};
use dspex_process::{Pid, ProcessIdentity};
use rustix::event::{PollFd, PollFlags, Timespec};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct GuardArgs {
    /// The OS pid of the VM to guard.
    #[arg(long, value_name = "PID")]
    vm_pid: i64,
    /// The VM's start time (field 22 of /proc/PID/stat), so a recycled pid is not it.
    #[arg(long, value_name = "TICKS")]
    vm_start: u64,
    /// Milliseconds between SIGTERM and SIGKILL when the VM has died.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    grace: u64,
    /// Milliseconds to wait after SIGKILL before giving up on a survivor.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    kill_wait: u64,
    /// The VM's per-VM cgroup (`.../dspex-NS-PID-START`, named with the same VM): when the
    /// VM dies, every process left in it ends with `cgroup.kill`, then it is removed.
    #[arg(long, value_name = "DIR")]
    cgroup: Option<std::path::PathBuf>,
    /// The VM's per-VM cgroups in cgroup v1 hierarchies (hybrid mode, for limits;
    /// repeatable, named with the same VM): removed with the cgroup2 one once emptied.
    #[arg(long, value_name = "DIR")]
    cgroup_v1: Vec<std::path::PathBuf>,
}

/// How often the list forgets processes that are gone.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// After stdin closes without the VM standing its guard down, how often to look again: the
/// VM is dying (its teardown may take a while under load), or its guardian process was
/// killed outright; either way this guard stays until the VM is gone.
const EOF_RECHECK: Duration = Duration::from_secs(60);

fn say(text: &str) {
    // stderr may be a pipe whose reader died with the VM: never fail on it.
    let _ = writeln!(std::io::stderr(), "dspex-proc guard: {text}");
}

pub fn guard(args: GuardArgs) -> ExitCode {
    let Ok(pid) = Pid::new(args.vm_pid) else {
        say(&format!("--vm-pid {} is not a process id", args.vm_pid));
        return ExitCode::from(2);
    };
    let vm = ProcessIdentity {
        pid,
        start_time: args.vm_start,
    };
    let Some(watch) = VmWatch::new(vm) else {
        // Nothing was registered with us yet: there is nothing to end.
        say(&format!("VM {pid} is already gone"));
        return ExitCode::SUCCESS;
    };
    let options = TerminateOptions {
        grace: Duration::from_millis(args.grace),
        kill_wait: Duration::from_millis(args.kill_wait),
        kill_group: true,
        allow_other_users: false,
    };
    // Only the cgroup named with this very VM is ever ended.
    let vm_cgroup = match &args.cgroup {
        None => None,
        Some(dir) => match VmCgroup::at(dir) {
            Some(c) if c.name.vm == vm => Some(c),
            _ => {
                say(&format!(
                    "--cgroup {} is not the per-VM cgroup of VM {pid}",
                    dir.display()
                ));
                return ExitCode::from(2);
            }
        },
    };
    let mut v1 = Vec::new();
    for dir in &args.cgroup_v1 {
        match V1VmCgroup::at(dir) {
            Some(c) if c.vm.name.vm == vm => v1.push(c),
            _ => {
                say(&format!(
                    "--cgroup-v1 {} is not a per-VM cgroup of VM {pid}",
                    dir.display()
                ));
                return ExitCode::from(2);
            }
        }
    }
    let mut list = Watchlist::new();
    let vm_died = follow(&watch, &mut list);
    if !vm_died {
        return ExitCode::SUCCESS;
    }
    let mut outcomes = list.end_all(&options, vm_cgroup.as_ref());
    if let Some(c) = &vm_cgroup {
        // What the list did not name (registered before the notice arrived, forked into a
        // leaf) goes with the cgroup: it holds nothing but this VM's registered processes.
        outcomes.extend(end_dead_vm_cgroup(c, &options));
        c.remove_empty();
    }
    // Its v1 leaves held the same processes (ended now): they go, emptied, with their
    // per-VM cgroups.
    for c in &v1 {
        if !c.remove_empty() {
            say(&format!(
                "{} is not empty: left in place",
                c.vm.dir.display()
            ));
        }
    }
    if outcomes.is_empty() {
        return ExitCode::SUCCESS;
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| {
            !matches!(
                o,
                Outcome::Graceful | Outcome::ForceKilled | Outcome::AlreadyGone
            )
        })
        .map(|(id, o)| format!("{} ({o:?})", id.pid))
        .collect();
    let ended = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Graceful | Outcome::ForceKilled))
        .count();
    if ended == 0 && failed.is_empty() {
        // Everything was already gone (a normal stop ended it): nothing to tell.
        return ExitCode::SUCCESS;
    }
    say(&format!(
        "VM {pid} died; ended {ended} of {} registered or contained process(es){}",
        outcomes.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!("; not ended: {}", failed.join(", "))
        }
    ));
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Waits for the VM to exit, however long that takes; true once it has.
fn wait_for_exit(watch: &VmWatch) -> bool {
    while !watch.wait_exit(EOF_RECHECK) {}
    true
}

/// Reads notices until the VM dies (true), or until stdin closes after the VM stood its
/// guard down (false). Stdin closing without that means the VM is dying: wait for it.
fn follow(watch: &VmWatch, list: &mut Watchlist) -> bool {
    let stdin = std::io::stdin();
    let mut buf = vec![0u8; 64 * 1024];
    let mut next_prune = Instant::now() + PRUNE_EVERY;
    // Without a pidfd, look at the VM every 200 ms.
    let timeout = Timespec {
        tv_sec: if watch.fd().is_some() { 5 } else { 0 },
        tv_nsec: if watch.fd().is_some() { 0 } else { 200_000_000 },
    };
    loop {
        let stdin_ready = {
            let mut fds = vec![PollFd::new(&stdin, PollFlags::IN)];
            if let Some(fd) = watch.fd() {
                fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
            }
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) => !fds[0].revents().is_empty(),
                Err(rustix::io::Errno::INTR) => false,
                Err(_) => {
                    // poll itself failed: fall back to asking about the VM directly.
                    std::thread::sleep(Duration::from_millis(200));
                    false
                }
            }
        };
        if watch.exited() {
            // Take in what the VM managed to write before it died: a stand-down among it
            // (a normal stop that ended everything) still stands.
            drain(&stdin, &mut buf, list);
            return !list.stood_down();
        }
        if stdin_ready {
            match rustix::io::read(&stdin, &mut buf) {
                Ok(n) if n > 0 => list.feed(&buf[..n]),
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                // stdin closed: the VM is dying, or its guardian process stopped.
                _ => return !list.stood_down() && wait_for_exit(watch),
            }
        }
        if Instant::now() >= next_prune {
            list.prune();
            next_prune = Instant::now() + PRUNE_EVERY;
        }
    }
}

/// Reads whatever is left on stdin without blocking.
fn drain(stdin: &std::io::Stdin, buf: &mut [u8], list: &mut Watchlist) {
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        let mut fds = [PollFd::new(stdin, PollFlags::IN)];
        if !matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0) {
            return;
        }
        match rustix::io::read(stdin, &mut *buf) {
            Ok(n) if n > 0 => list.feed(&buf[..n]),
            _ => return,
        }
    }
}
