use thiserror::Error;

/// Errors of the core. Each variant maps to one `{:error, reason}` atom on the Elixir side.
#[derive(Debug, Error)]
pub enum Error {
    /// The pid is not a valid target: zero, negative, 1 (init) or beyond the kernel's range.
    #[error("invalid pid {0}: a process id must be an integer greater than 1")]
    InvalidPid(i64),
    /// No process has this pid (or it exited while we read it).
    #[error("no such process: {0}")]
    NoSuchProcess(i32),
    /// `/proc/PID/...` exists but we may not read it (another user's process).
    #[error("permission denied reading /proc/{0}")]
    PermissionDenied(i32),
    /// A scan pattern that is empty, too long or contains NUL.
    #[error("invalid pattern: {0}")]
    InvalidPattern(String),
    /// Anything else the kernel said while reading `/proc`.
    #[error("reading /proc/{pid} failed: {message}")]
    Proc {
        pid: i32,
        message: String,
        /// The kernel's error number, when there was one (EMFILE, EIO...).
        errno: Option<i32>,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Maps an I/O error on `/proc/PID/...`: a missing file or ESRCH means the process is
    /// gone, EACCES that it is not ours to read.
    pub(crate) fn from_io(pid: i32, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::NotFound => Error::NoSuchProcess(pid),
            std::io::ErrorKind::PermissionDenied => Error::PermissionDenied(pid),
            _ if e.raw_os_error() == Some(libc::ESRCH) => Error::NoSuchProcess(pid),
            _ => Error::Proc {
                pid,
                message: e.to_string(),
                errno: e.raw_os_error(),
            },
        }
    }

    /// The error number to report for a read that failed: the kernel's, or EIO for an
    /// unparsable file.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSuchProcess(_) => libc::ESRCH,
            Error::PermissionDenied(_) => libc::EACCES,
            Error::Proc { errno, .. } => errno.unwrap_or(libc::EIO),
            Error::InvalidPid(_) | Error::InvalidPattern(_) => libc::EINVAL,
        }
    }

    /// A short machine-readable name, used as the Elixir error atom.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidPid(_) => "invalid_pid",
            Error::NoSuchProcess(_) => "no_such_process",
            Error::PermissionDenied(_) => "permission_denied",
            Error::InvalidPattern(_) => "invalid_pattern",
            Error::Proc { .. } => "proc_read_failed",
        }
    }
}
