//! Ownership markers: environment variables stamped on every worker at spawn, so any later
//! reader of `/proc/PID/environ` can name the worker's owner without the owner's memory.

#[cfg(test)]
use crate::error::Error;
use crate::error::Result;
use crate::identity::ProcessIdentity;
use crate::pid::Pid;

/// The BEAM's OS pid.
pub const OWNER_PID: &str = "DSPEX_OWNER_PID";
/// The BEAM's start time (clock ticks since boot), so a recycled pid is not taken for it.
pub const OWNER_START: &str = "DSPEX_OWNER_START";
/// The inode of the BEAM's pid namespace: a pid means something only inside its namespace.
pub const OWNER_PIDNS: &str = "DSPEX_OWNER_PIDNS";
/// Random per BEAM boot.
pub const RUN_ID: &str = "DSPEX_RUN_ID";
pub const WORKER_ID: &str = "DSPEX_WORKER_ID";
pub const FINGERPRINT: &str = "DSPEX_FINGERPRINT";

/// What the markers of one process say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Markers {
    /// The owning BEAM.
    pub owner: ProcessIdentity,
    /// The owner's pid namespace (inode), when stamped.
    pub pid_ns: Option<u64>,
    pub run_id: Option<String>,
    pub worker_id: Option<String>,
    pub fingerprint: Option<String>,
}

impl Markers {
    /// The markers of `pid`. `Ok(None)` when the process carries none (or they do not
    /// parse); `Err(PermissionDenied)` when its environment is not ours to read.
    pub fn read(pid: Pid) -> Result<Option<Markers>> {
        // A live thread's copy when the main thread has exited (the leader's is empty).
        crate::proc_facts::read_task_file(pid.as_raw(), "environ", None)
            .map(|bytes| parse_environ(&bytes))
    }

    /// The `KEY=value` pairs to put in a worker's environment.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (OWNER_PID, self.owner.pid.to_string()),
            (OWNER_START, self.owner.start_time.to_string()),
        ];
        if let Some(ns) = self.pid_ns {
            env.push((OWNER_PIDNS, ns.to_string()));
        }
        let optional = [
            (RUN_ID, &self.run_id),
            (WORKER_ID, &self.worker_id),
            (FINGERPRINT, &self.fingerprint),
        ];
        env.extend(
            optional
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k, v.clone()))),
        );
        env
    }
}

/// The inode of the calling process's pid namespace.
pub fn own_pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Parses the NUL-separated `KEY=value` list of `/proc/PID/environ`. Markers count only
/// when both owner fields are present and valid; the rest are optional.
pub fn parse_environ(environ: &[u8]) -> Option<Markers> {
    let mut owner_pid = None;
    let mut owner_start = None;
    let mut pid_ns = None;
    let (mut run_id, mut worker_id, mut fingerprint) = (None, None, None);
    for var in environ.split(|b| *b == 0) {
        if !var.starts_with(b"DSPEX_") {
            continue;
        }
        let Some(eq) = var.iter().position(|b| *b == b'=') else {
            continue;
        };
        let (key, value) = (&var[..eq], &var[eq + 1..]);
        let text = || String::from_utf8_lossy(value).into_owned();
        match key {
            k if k == OWNER_PID.as_bytes() => owner_pid = text().parse::<i64>().ok(),
            k if k == OWNER_START.as_bytes() => owner_start = text().parse::<u64>().ok(),
            k if k == OWNER_PIDNS.as_bytes() => pid_ns = text().parse::<u64>().ok(),
            k if k == RUN_ID.as_bytes() => run_id = Some(text()),
            k if k == WORKER_ID.as_bytes() => worker_id = Some(text()),
            k if k == FINGERPRINT.as_bytes() => fingerprint = Some(text()),
            _ => {}
        }
    }
    Some(Markers {
        owner: ProcessIdentity {
            pid: Pid::new(owner_pid?).ok()?,
            start_time: owner_start?,
        },
        pid_ns,
        run_id,
        worker_id,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn parses_full_and_partial_markers() {
        let env = b"PATH=/bin\0DSPEX_OWNER_PID=4242\0DSPEX_OWNER_START=99\0DSPEX_OWNER_PIDNS=77\0DSPEX_RUN_ID=r1\0DSPEX_WORKER_ID=w=1\0DSPEX_FINGERPRINT=fp\0";
        let m = parse_environ(env).unwrap();
        assert_eq!(m.owner.pid.as_raw(), 4242);
        assert_eq!(m.owner.start_time, 99);
        assert_eq!(m.pid_ns, Some(77));
        assert_eq!(m.run_id.as_deref(), Some("r1"));
        assert_eq!(m.worker_id.as_deref(), Some("w=1"));
        assert_eq!(m.fingerprint.as_deref(), Some("fp"));

        let owner_only = parse_environ(b"DSPEX_OWNER_PID=7\0DSPEX_OWNER_START=1").unwrap();
        assert_eq!(owner_only.run_id, None);
        assert_eq!(owner_only.pid_ns, None);
    }

    #[test]
    fn missing_or_bad_owner_fields_mean_no_markers() {
        for env in [
            &b""[..],
            b"HOME=/root\0",
            b"DSPEX_OWNER_PID=7\0",
            b"DSPEX_OWNER_START=7\0",
            b"DSPEX_OWNER_PID=1\0DSPEX_OWNER_START=7\0",
            b"DSPEX_OWNER_PID=-3\0DSPEX_OWNER_START=7\0",
            b"DSPEX_OWNER_PID=x\0DSPEX_OWNER_START=7\0",
            b"DSPEX_OWNER_PID=7\0DSPEX_OWNER_START=-1\0",
            b"DSPEX_OWNER_PID\0DSPEX_OWNER_START\0",
        ] {
            assert_eq!(
                parse_environ(env),
                None,
                "{:?}",
                String::from_utf8_lossy(env)
            );
        }
    }

    #[test]
    fn markers_round_trip_through_a_real_process_environment() {
        let markers = Markers {
            owner: ProcessIdentity {
                pid: Pid::new(1234).unwrap(),
                start_time: 5678,
            },
            pid_ns: own_pid_namespace(),
            run_id: Some("run".into()),
            worker_id: Some("worker 1".into()),
            fingerprint: None,
        };
        let mut child = Command::new("sleep")
            .arg("30")
            .env_clear()
            .envs(markers.to_env())
            .spawn()
            .unwrap();
        let pid = Pid::new(i64::from(child.id())).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let read = loop {
            match Markers::read(pid).unwrap() {
                Some(m) => break Some(m),
                None if std::time::Instant::now() > deadline => break None,
                None => std::thread::yield_now(),
            }
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(read, Some(markers));
        assert!(matches!(Markers::read(pid), Err(Error::NoSuchProcess(_))));
    }
}
