//! Every system call the core makes beyond `std`, in one place, through the well-kept
//! wrappers `rustix` (pidfds, poll, flock, openat, priorities) and `nix` (kill, rlimits).
//!
//! One call stays hand-written: `pidfd_send_signal` with `PIDFD_SIGNAL_PROCESS_GROUP`
//! (Linux 6.9) or with signal 0, which neither crate takes. Errors are plain errnos
//! (`i32`), the unit the rest of the core reports in.

use crate::pid::Pid;
use rustix::event::{PollFd, PollFlags};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// `pidfd_send_signal` flag (Linux 6.9): signal the pidfd's whole process group.
const PIDFD_SIGNAL_PROCESS_GROUP: libc::c_uint = 1 << 2;

fn errno(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}

fn signal_of(signal: i32) -> Result<rustix::process::Signal, i32> {
    rustix::process::Signal::from_named_raw(signal).ok_or(libc::EINVAL)
}

/// A pidfd for `pid` (Linux 5.3+).
pub(crate) fn pidfd_open(pid: Pid) -> Result<OwnedFd, i32> {
    let pid = rustix::process::Pid::from_raw(pid.as_raw()).ok_or(libc::EINVAL)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).map_err(errno)
}

/// Sends `signal` to the process behind a pidfd: it can never reach a recycled pid.
pub(crate) fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> Result<(), i32> {
    rustix::process::pidfd_send_signal(fd, signal_of(signal)?).map_err(errno)
}

/// Sends `signal` to the process group of the process behind a pidfd. EINVAL on kernels
/// before 6.9, which lack the flag.
pub(crate) fn pidfd_signal_group(fd: &OwnedFd, signal: i32) -> Result<(), i32> {
    raw_pidfd_send_signal(fd, signal, PIDFD_SIGNAL_PROCESS_GROUP)
}

/// Whether the process behind a pidfd still holds its pid (running or a zombie): signal 0,
/// which checks without sending. `Err(ESRCH)` once it is reaped; EPERM means it exists but
/// is another user's.
pub(crate) fn pidfd_probe(fd: &OwnedFd) -> Result<(), i32> {
    raw_pidfd_send_signal(fd, 0, 0)
}

fn raw_pidfd_send_signal(fd: &OwnedFd, signal: i32, flags: libc::c_uint) -> Result<(), i32> {
    // SAFETY: a plain syscall on a descriptor we own; a null siginfo is allowed. Neither
    // rustix nor nix takes the flags argument, nor signal 0, of pidfd_send_signal.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            flags,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(())
    }
}

/// `kill(2)`: a pid > 1, or the negated pid of a group leader the caller has pinned.
pub(crate) fn kill(pid: i32, signal: i32) -> Result<(), i32> {
    debug_assert!(!(-1..=1).contains(&pid));
    let signal = nix::sys::signal::Signal::try_from(signal).map_err(|e| e as i32)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(|e| e as i32)
}

/// Whether any process has `pid`, asked of the kernel rather than of `/proc`:
/// `kill(pid, 0)` fails with ESRCH only when there is none (EPERM means there is one).
pub fn pid_exists(pid: i32) -> bool {
    pid > 0
        && !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

/// Which of `fds` (pidfds) report their process as exited, waiting up to `timeout_ms`.
pub(crate) fn poll_exited(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> Vec<bool> {
    let mut pollfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::from_borrowed_fd(*fd, PollFlags::IN))
        .collect();
    let timeout = rustix::time::Timespec {
        tv_sec: i64::from(timeout_ms / 1000),
        tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
    };
    match rustix::event::poll(&mut pollfds, Some(&timeout)) {
        Ok(n) if n > 0 => pollfds
            .iter()
            .map(|p| {
                p.revents()
                    .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
            })
            .collect(),
        _ => vec![false; fds.len()],
    }
}

/// The soft limit of open descriptors (1024 when it cannot be read).
pub(crate) fn nofile_soft_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _hard)| soft)
}

/// Takes an exclusive `flock` without waiting; false when another holds it.
pub(crate) fn try_lock_exclusive(file: &impl AsFd) -> bool {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
}

/// Opens `path` read-only relative to the directory `dir`.
pub(crate) fn open_read_at(dir: &impl AsFd, path: &str) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::openat(dir, path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map(std::fs::File::from)
        .map_err(std::io::Error::from)
}

/// Whether `e` says the process ran out of a resource (descriptors, memory) rather than
/// anything about the file: a read that failed so says nothing of what it would have read.
pub(crate) fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

/// Whether this process may write `path` (`access(2)` with `W_OK`).
pub(crate) fn writable(path: &std::path::Path) -> bool {
    rustix::fs::access(path, rustix::fs::Access::WRITE_OK).is_ok()
}

/// Lowers the calling thread's CPU priority (nice 10). The scan and termination threads
/// do bursts of `/proc` work; on a small machine they must not take the CPU from the VM's
/// schedulers, which run the application's own processes. Failure changes nothing.
pub fn lower_thread_priority() {
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfds_signals_and_existence() {
        let me = Pid::new(i64::from(std::process::id())).unwrap();
        let fd = pidfd_open(me).expect("pidfds on this kernel");
        assert_eq!(poll_exited(&[fd.as_fd()], 0), vec![false]);
        assert_eq!(
            pidfd_send_signal(&fd, 0),
            Err(libc::EINVAL),
            "only named signals are sent"
        );
        assert!(pid_exists(me.as_raw()));
        assert!(!pid_exists(0));
        assert!(nofile_soft_limit() > 0);
        let dir = std::fs::File::open("/proc").unwrap();
        assert!(open_read_at(&dir, &format!("{me}/stat")).is_ok());
        let missing = open_read_at(&dir, "no-such-entry").unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        assert!(!is_exhaustion(&missing));
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
    }

    #[test]
    fn a_dead_child_polls_exited() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = Pid::new(i64::from(child.id())).unwrap();
        let fd = pidfd_open(pid).unwrap();
        child.wait().unwrap();
        assert_eq!(poll_exited(&[fd.as_fd()], 1000), vec![true]);
        assert_eq!(pidfd_send_signal(&fd, libc::SIGTERM), Err(libc::ESRCH));
    }

    #[test]
    fn the_lock_is_exclusive() {
        let path = std::env::temp_dir().join(format!("dspex_sys_lock_{}", std::process::id()));
        let a = std::fs::File::create(&path).unwrap();
        let b = std::fs::File::open(&path).unwrap();
        assert!(try_lock_exclusive(&a));
        assert!(!try_lock_exclusive(&b));
        drop(a);
        assert!(try_lock_exclusive(&b));
        let _ = std::fs::remove_file(path);
    }
}
