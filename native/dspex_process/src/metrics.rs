//! Per-process resource figures from `/proc/PID/stat`, one read per process.

use crate::identity::ProcessIdentity;
use crate::proc_facts::{ProcessState, Stat};

/// What a worker's OS process uses now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessMetrics {
    pub rss_bytes: u64,
    /// User + system CPU time since the process started, in milliseconds.
    pub cpu_time_ms: u64,
    pub threads: u64,
    pub state: ProcessState,
    pub age_ms: u64,
}

/// Metrics of each identity, in order; `None` where the process is gone or its pid now
/// names another process.
pub fn read_metrics(identities: &[ProcessIdentity]) -> Vec<Option<ProcessMetrics>> {
    let ticks = procfs::ticks_per_second().max(1);
    let page = procfs::page_size();
    let now = crate::proc_facts::uptime_ticks(ticks);
    identities
        .iter()
        .map(|id| {
            let stat = Stat::read(id.pid.as_raw()).ok()?;
            (stat.start_time == id.start_time).then(|| ProcessMetrics {
                rss_bytes: stat.rss_pages * page,
                cpu_time_ms: (stat.utime + stat.stime) * 1000 / ticks,
                threads: stat.threads,
                state: stat.state,
                age_ms: now.saturating_sub(stat.start_time) * 1000 / ticks,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pid::Pid;
    use crate::test_util::{script_named, unique_tag, PYTHON};

    #[test]
    fn measures_a_real_busy_child_and_refuses_stale_identities() {
        // Burns 0.3 s of CPU (process time, so a loaded machine only makes it slower),
        // holds 20 MB and a second thread, says so, then sleeps.
        let code = "import threading, time\nblob = bytearray(20 * 1024 * 1024)\nwhile time.process_time() < 0.3: pass\nthreading.Thread(target=time.sleep, args=(30,)).start()\nprint('ready', flush=True)\ntime.sleep(30)";
        let script = script_named(unique_tag("metrics").as_bytes(), code);
        let mut child = std::process::Command::new(PYTHON.as_str())
            .arg(script)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let id = ProcessIdentity::of(Pid::new(i64::from(child.id())).unwrap()).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        std::thread::sleep(std::time::Duration::from_millis(700));
        let stale = ProcessIdentity {
            start_time: id.start_time + 1,
            ..id
        };
        let got = read_metrics(&[id, stale]);
        child.kill().unwrap();
        child.wait().unwrap();

        let m = got[0].expect("metrics of a live process");
        assert!(m.rss_bytes >= 20 * 1024 * 1024, "{m:?}");
        assert!(m.cpu_time_ms >= 200, "{m:?}");
        assert_eq!(m.threads, 2);
        assert!(m.age_ms >= 600, "{m:?}");
        assert_eq!(got[1], None);
        assert_eq!(read_metrics(&[id]), vec![None]);
    }
}
