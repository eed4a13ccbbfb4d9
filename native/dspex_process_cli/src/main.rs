//! `dspex-proc`: the same detection and termination as the library, for shells, cron and
//! systemd, with no BEAM running; and `exec`, the PR_SET_PDEATHSIG launcher for workers.

mod guard;

use clap::{Args, Parser, Subcommand};
use dspex_process::cgroup::{self, CgroupOrphan};
use dspex_process::classify::{self, Detection, ProcLookup, Viewpoint};
use dspex_process::markers::Markers;
use dspex_process::policy::{self, ClassCounts, Health, Report, Tally};
use dspex_process::scan::{Pattern, DEFAULT_PATTERN};
use dspex_process::terminate::{self, Outcome, TerminateOptions};
use dspex_process::{Pid, ProcessIdentity};
use serde_json::{json, Value};
use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set when a write to stdout failed: the report is lost, the work goes on.
static OUTPUT_FAILED: AtomicBool = AtomicBool::new(false);
/// Exit code when only the report could not be written.
const EXIT_OUTPUT_FAILED: u8 = 74;
/// `/proc` could not be read in full (EX_OSERR).
const EXIT_PROC_UNREADABLE: u8 = 71;

/// `println!` that never panics: a failed write (`> /dev/full`, a closed pipe) is noted
/// once on stderr and in the exit code, and everything else goes on.
macro_rules! out {
    ($($arg:tt)*) => { emit(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics.
macro_rules! err {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn emit(args: std::fmt::Arguments) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{args}").and_then(|()| stdout.flush()) {
        if !OUTPUT_FAILED.swap(true, Ordering::Relaxed) {
            err!("dspex-proc: could not write the report to stdout: {e}");
        }
    }
}

const EXIT_CODES: &str = "\
Exit codes:
  0    success; for status and find: no orphans
  1    status/find: orphans exist; cleanup: at least one target could not be ended
  2    bad arguments (usage is printed)
  3    cleanup not confirmed (no --yes and no terminal to ask, or the answer was not y)
  71   /proc could not be read in full (out of descriptors or memory): nothing was
       classified, nothing was ended
  74   the work was done but its report could not be written to stdout (a full disk,
       a closed pipe); 1, 2 and 3 take precedence. Output errors never stop a cleanup.
  125  exec: the parent died before the death signal was armed (or the owner BEAM named
       by the markers is gone); a parent that is PID 1 from the start is not dead
  126  exec: the command could not be executed
  127  exec: the command was not found";

#[derive(Parser)]
#[command(
    name = "dspex-proc",
    version,
    about = "Find and safely end orphaned worker processes (DSPex Python bridges).",
    long_about = "Find and safely end orphaned worker processes (DSPex Python bridges).\n\n\
Ownership comes from the markers each worker carries in its environment, so the workers of \
every live BEAM stay protected and the orphans of dead ones are found, with no node running.",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Count matching processes by class and give the health.
    Status(Selection),
    /// List the orphans; signal nothing.
    Find(Selection),
    /// End the orphans: SIGTERM to all at once, SIGKILL after the grace.
    Cleanup(CleanupArgs),
    /// Run CMD in place (same pid) with a parent-death signal and optional limits.
    Exec(ExecArgs),
    /// Guard a VM: read `+ PID START` / `- PID START` on stdin; when the VM dies, end what is
    /// still registered. Started by the library as a port; not meant for shells.
    Guard(guard::GuardArgs),
}

#[derive(Args)]
struct Selection {
    /// Literal pattern: the script an interpreter runs, or the program (its path or
    /// basename); any argument for processes with ownership markers. Bytes, not text.
    /// Repeatable.
    #[arg(long = "pattern", value_name = "P", default_value = DEFAULT_PATTERN, value_parser = clap::value_parser!(OsString))]
    patterns: Vec<OsString>,
    /// Also treat unmanaged processes (started by hand, parent alive) as orphans.
    #[arg(long)]
    include_unmanaged: bool,
    /// Skip the pass over dead VMs' cgroups (`cgroup_owner_dead`); also when the environment
    /// sets DSPEX_PROC_NO_CGROUPS to a non-empty value.
    #[arg(long)]
    no_cgroups: bool,
}

impl Selection {
    fn cgroups_off(&self) -> bool {
        self.no_cgroups || std::env::var_os("DSPEX_PROC_NO_CGROUPS").is_some_and(|v| !v.is_empty())
    }

    /// `cgroups()`, unless the cgroup pass is off. The per-VM cgroups (cgroup2: the
    /// containment) of dead VMs are what names orphans; a dead VM's cgroup v1 ones only
    /// carried limits: a process in them and in none of the cgroup2 ones left the
    /// containment (handed off) and is not an orphan of that VM, and they are only removed
    /// once empty by a cleanup.
    fn cgroups<T>(&self, cgroups: impl FnOnce() -> Vec<T>) -> Vec<T> {
        if self.cgroups_off() {
            Vec::new()
        } else {
            cgroups()
        }
    }
}

#[derive(Args)]
struct CleanupArgs {
    #[command(flatten)]
    selection: Selection,
    /// Report what would be done; signal nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Milliseconds between SIGTERM and SIGKILL.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    grace: u64,
    /// Milliseconds to wait after SIGKILL before reporting a survivor.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    kill_wait: u64,
    /// Signal only the target, not its process group.
    #[arg(long)]
    no_kill_group: bool,
    /// Allow ending processes of other users.
    #[arg(long)]
    allow_other_users: bool,
}

#[derive(Args)]
struct ExecArgs {
    /// Signal the kernel sends when the parent dies (TERM, KILL, INT, HUP, a number), or
    /// `none`.
    #[arg(long, value_name = "SIG", default_value = "KILL", value_parser = parse_death_signal)]
    pdeathsig: DeathSignal,
    /// Limit of the address space, in bytes (RLIMIT_AS).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    rlimit_as: Option<u64>,
    /// Limit of open files (RLIMIT_NOFILE).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    rlimit_nofile: Option<u64>,
    /// Scheduling niceness, -20 (first) to 19 (last).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    nice: Option<i32>,
    /// A per-VM cgroup (`.../dspex-NS-PID-START`) made by the library: the command runs in
    /// a leaf of its own there, entered before the exec, so nothing it forks starts outside.
    #[arg(long, value_name = "DIR")]
    cgroup: Option<std::path::PathBuf>,
    /// A per-VM cgroup of the same VM in a cgroup v1 hierarchy (hybrid mode; repeatable):
    /// the command also runs in a leaf of its own there, which takes the limits whose
    /// controller the cgroup2 leaf lacks.
    #[arg(long, value_name = "DIR", requires = "cgroup")]
    cgroup_v1: Vec<std::path::PathBuf>,
    /// memory.max of the leaf, in bytes (needs --cgroup and the memory controller).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..), requires = "cgroup")]
    memory_max: Option<u64>,
    /// pids.max of the leaf (needs --cgroup and the pids controller).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), requires = "cgroup")]
    pids_max: Option<u64>,
    /// cpu.weight of the leaf, 1 to 10000 (needs --cgroup and the cpu controller).
    #[arg(long, value_name = "W", value_parser = clap::value_parser!(u64).range(1..=10_000), requires = "cgroup")]
    cpu_weight: Option<u64>,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// The parent-death signal, or none.
#[derive(Clone, Copy)]
struct DeathSignal(Option<nix::sys::signal::Signal>);

fn parse_death_signal(text: &str) -> Result<DeathSignal, String> {
    if text.eq_ignore_ascii_case("none") {
        Ok(DeathSignal(None))
    } else {
        parse_signal(text).map(|s| DeathSignal(Some(s)))
    }
}

fn parse_signal(text: &str) -> Result<nix::sys::signal::Signal, String> {
    use nix::sys::signal::Signal;
    let parsed = match text.parse::<i32>() {
        Ok(n) => Signal::try_from(n).ok(),
        Err(_) => {
            let upper = text.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            name.parse::<Signal>().ok()
        }
    };
    parsed.ok_or_else(|| format!("unknown signal {text:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Exec(args) => return exec(args),
        Command::Guard(args) => return guard::guard(args),
        Command::Status(sel) => status(&sel, cli.json),
        Command::Find(sel) => find(&sel, cli.json),
        Command::Cleanup(args) => cleanup(&args, cli.json),
    };
    if code == 0 && OUTPUT_FAILED.load(Ordering::Relaxed) {
        ExitCode::from(EXIT_OUTPUT_FAILED)
    } else {
        ExitCode::from(code)
    }
}

fn pattern(sel: &Selection) -> Result<Pattern, u8> {
    let bytes: Vec<&[u8]> = sel.patterns.iter().map(|p| p.as_bytes()).collect();
    Pattern::new(&bytes).map_err(|e| {
        err!("dspex-proc: {e}");
        2
    })
}

/// The patterns for display (bytes that are not UTF-8 replaced).
fn shown(sel: &Selection) -> Vec<String> {
    sel.patterns
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

/// Classifies as the CLI sees it: no BEAM of its own, no registry. Markers and ancestry
/// decide. When `/proc` cannot be read in full, says so and gives the exit code: nothing
/// is reported as found, and nothing is ended.
fn detect(pattern: &Pattern) -> Result<Vec<Detection>, u8> {
    classify::detect(pattern, Viewpoint::default()).map_err(|e| {
        err!("dspex-proc: could not read /proc in full ({e}): nothing was classified or ended");
        EXIT_PROC_UNREADABLE
    })
}

/// The reason to act on a detection, if it is a target.
fn orphan_json(d: &Detection, reason: &str) -> Value {
    let f = &d.candidate.facts;
    let owner = d.candidate.markers.markers().map(|m| {
        json!({
            "pid": m.owner.pid.as_raw(),
            "start_time": m.owner.start_time,
            "run_id": m.run_id,
            "worker_id": m.worker_id,
            "fingerprint": m.fingerprint,
        })
    });
    json!({
        "pid": f.pid.as_raw(),
        "start_time": f.start_time,
        "pgid": f.pgid,
        "uid": f.uid,
        "age_ms": d.age_ms,
        "reason": reason,
        "cmdline": f.argv.join(" "),
        "owner": owner,
    })
}

/// The policy's view of the classes: the pattern's matches, plus the processes of dead VMs'
/// cgroups that the pattern did not classify (orphans too).
fn class_counts(detections: &[Detection], targets: &[Target]) -> ClassCounts {
    let mut counts = ClassCounts::of(detections.iter().map(|d| d.class));
    counts.orphan += targets
        .iter()
        .filter(|t| t.reason == policy::CGROUP_OWNER_DEAD)
        .count();
    counts
}

fn classes_json(counts: &ClassCounts) -> Value {
    counts
        .entries()
        .iter()
        .map(|(name, n)| (name.to_string(), json!(n)))
        .collect::<serde_json::Map<String, Value>>()
        .into()
}

fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => out!("{text}"),
        Err(e) => err!("dspex-proc: could not encode the report: {e}"),
    }
}

/// One process to act on: a pattern match classified as an orphan (or unmanaged, when
/// asked), or a process in the cgroup of a dead VM (`cgroup_owner_dead`), whatever its argv.
struct Target {
    identity: ProcessIdentity,
    pgid: i32,
    age_ms: u64,
    reason: &'static str,
    owner_pid: Option<i32>,
    cmdline: String,
    json: Value,
}

/// The targets of a selection: the pattern's orphans, then the processes of dead VMs'
/// cgroups that the pattern did not already classify (a process it protects stays
/// protected, and none is counted twice).
fn targets(sel: &Selection, detections: &[Detection], in_cgroups: &[CgroupOrphan]) -> Vec<Target> {
    let policy = policy::Selection {
        include_unmanaged: sel.include_unmanaged,
        reasons: None,
    };
    let mut out: Vec<Target> = detections
        .iter()
        .filter_map(|d| {
            let reason = policy.target_reason(d.class)?;
            let f = &d.candidate.facts;
            Some(Target {
                identity: ProcessIdentity {
                    pid: f.pid,
                    start_time: f.start_time,
                },
                pgid: f.pgid,
                age_ms: d.age_ms,
                reason,
                owner_pid: d.candidate.markers.markers().map(|m| m.owner.pid.as_raw()),
                cmdline: f.argv.join(" "),
                json: orphan_json(d, reason),
            })
        })
        .collect();
    let classified: std::collections::HashSet<i32> = detections
        .iter()
        .map(|d| d.candidate.facts.pid.as_raw())
        .collect();
    for o in in_cgroups {
        let f = &o.facts;
        if classified.contains(&f.pid.as_raw()) || !policy.admits(CGROUP_REASON) {
            continue;
        }
        out.push(Target {
            identity: ProcessIdentity {
                pid: f.pid,
                start_time: f.start_time,
            },
            pgid: f.pgid,
            age_ms: o.age_ms,
            reason: CGROUP_REASON,
            owner_pid: Some(o.owner.vm.pid.as_raw()),
            cmdline: f.argv.join(" "),
            json: json!({
                "pid": f.pid.as_raw(),
                "start_time": f.start_time,
                "pgid": f.pgid,
                "uid": f.uid,
                "age_ms": o.age_ms,
                "reason": CGROUP_REASON,
                "cmdline": f.argv.join(" "),
                "owner": {
                    "pid": o.owner.vm.pid.as_raw(),
                    "start_time": o.owner.vm.start_time,
                    "pid_namespace": o.owner.pid_ns,
                },
            }),
        });
    }
    out
}

/// The reason of a process found in the cgroup of a dead VM.
const CGROUP_REASON: &str = policy::CGROUP_OWNER_DEAD;

fn status(sel: &Selection, json: bool) -> u8 {
    let pattern = match pattern(sel) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let detections = match detect(&pattern) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let in_cgroups = cgroup::cgroup_orphans(&sel.cgroups(cgroup::dead_vm_cgroups));
    let targets = targets(sel, &detections, &in_cgroups);
    let counts = class_counts(&detections, &targets);
    let health = Health::of(targets.len(), counts.total()).name();
    let orphans: Vec<Value> = targets.into_iter().map(|t| t.json).collect();
    if json {
        print_json(&json!({
            "pattern": shown(sel),
            "total_dspy_processes": counts.total(),
            "orphaned_processes": orphans.len(),
            "system_health": health,
            "classes": classes_json(&counts),
            "orphan_details": orphans,
        }));
    } else {
        out!("dspex-proc status (pattern: {})", shown(sel).join(", "));
        out!("  Matching processes: {}", counts.total());
        out!("  Orphans:            {}", orphans.len());
        let protected: Vec<String> = counts
            .entries()
            .iter()
            .filter(|(c, _)| *c != "orphan")
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        out!("  Protected:          {}", protected.join(", "));
        out!("  Health:             {health}");
    }
    exit_for_orphans(orphans.len())
}

fn exit_for_orphans(orphans: usize) -> u8 {
    u8::from(orphans != 0)
}

fn find(sel: &Selection, json: bool) -> u8 {
    let pattern = match pattern(sel) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let detections = match detect(&pattern) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let in_cgroups = cgroup::cgroup_orphans(&sel.cgroups(cgroup::dead_vm_cgroups));
    let targets = targets(sel, &detections, &in_cgroups);
    if json {
        let list: Vec<&Value> = targets.iter().map(|t| &t.json).collect();
        print_json(&json!({ "orphans": list }));
    } else if targets.is_empty() {
        out!(
            "No orphaned processes (pattern: {}).",
            shown(sel).join(", ")
        );
    } else {
        out!(
            "{:>8} {:>8} {:>10} {:<17} {:>8}  CMDLINE",
            "PID",
            "PGID",
            "AGE_MS",
            "REASON",
            "OWNER"
        );
        for t in &targets {
            let owner = t.owner_pid.map_or("-".to_string(), |p| p.to_string());
            out!(
                "{:>8} {:>8} {:>10} {:<17} {:>8}  {}",
                t.identity.pid,
                t.pgid,
                t.age_ms,
                t.reason,
                owner,
                t.cmdline
            );
        }
    }
    exit_for_orphans(targets.len())
}

/// The policy's tally of an outcome, and its name in reports.
fn outcome_name(outcome: &Outcome) -> (Tally, String) {
    let name = match outcome {
        Outcome::Graceful => "graceful".into(),
        Outcome::ForceKilled => "force_killed".into(),
        Outcome::AlreadyGone => "already_gone".into(),
        Outcome::Refused(r) => r.name().into(),
        Outcome::StillAlive => "still_alive".into(),
        Outcome::SignalFailed(errno) => format!("signal_failed ({})", errno.desc()),
        Outcome::Unverifiable(errno) => format!("unverifiable ({})", errno.desc()),
    };
    (Tally::from(outcome), name)
}

fn confirm(count: usize) -> bool {
    if !std::io::stdin().is_terminal() {
        err!("dspex-proc: refusing to end {count} process(es) without --yes: no terminal to ask");
        return false;
    }
    let _ = write!(
        std::io::stderr(),
        "End {count} orphaned process(es)? [y/N] "
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    matches!(answer.trim(), "y" | "Y" | "yes" | "YES")
}

fn cleanup(args: &CleanupArgs, json: bool) -> u8 {
    let sel = &args.selection;
    let pattern = match pattern(sel) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if !json {
        out!(
            "Detecting orphaned processes (pattern: {})...",
            shown(sel).join(", ")
        );
    }
    let detections = match detect(&pattern) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let dead_vms = sel.cgroups(cgroup::dead_vm_cgroups);
    let in_cgroups = cgroup::cgroup_orphans(&dead_vms);
    let targets = targets(sel, &detections, &in_cgroups);
    let counts = class_counts(&detections, &targets);

    if !targets.is_empty() && !args.dry_run && !args.yes && !confirm(targets.len()) {
        return 3;
    }

    let outcomes: Vec<(Tally, String)> = if args.dry_run {
        targets
            .iter()
            .map(|_| (Tally::DryRun, "dry_run".into()))
            .collect()
    } else {
        let identities: Vec<ProcessIdentity> = targets.iter().map(|t| t.identity).collect();
        raise_descriptor_limit();
        let options = TerminateOptions {
            grace: Duration::from_millis(args.grace),
            kill_wait: Duration::from_millis(args.kill_wait),
            kill_group: !args.no_kill_group,
            allow_other_users: args.allow_other_users,
        };
        let outcomes = terminate::terminate(&identities, &options)
            .iter()
            .map(outcome_name)
            .collect();
        // Dead VMs' cgroups (cgroup2 and v1) that are empty now (or were already) are
        // removed.
        let dead_v1 = sel.cgroups(dspex_process::cgroup_v1::dead_v1_vm_cgroups);
        for vm in dead_vms.iter().chain(&dead_v1) {
            vm.remove_empty();
        }
        outcomes
    };

    let tallies: Vec<Tally> = outcomes.iter().map(|(t, _)| *t).collect();
    // The CLI has no registry: what it protects are the workers of live VMs (foreign), never
    // "active" ones, a word the library keeps for its own registered workers.
    let report = Report::of(&tallies, &counts);

    if json {
        let details: Vec<Value> = targets
            .iter()
            .zip(&outcomes)
            .map(|(t, (tally, o))| {
                let mut v = t.json.clone();
                v["outcome"] = json!(o);
                v["ok"] = json!(*tally != Tally::Failed);
                v
            })
            .collect();
        print_json(&json!({
            "found": report.found,
            "terminated": report.terminated,
            "errors": report.errors,
            "already_gone": report.already_gone,
            "preserved_active": report.preserved_active,
            "preserved_live_vm_workers": report.preserved_live_vm_workers,
            "classes": classes_json(&counts),
            "dry_run": args.dry_run,
            "details": details,
        }));
    } else {
        for (t, (_, outcome)) in targets.iter().zip(&outcomes) {
            out!("  pid {} ({}): {outcome}", t.identity.pid, t.reason);
        }
        out!(
            "Cleanup complete{}:",
            if args.dry_run {
                " (dry run, nothing signalled)"
            } else {
                ""
            }
        );
        out!("  - Found: {} orphaned processes", report.found);
        out!("  - Terminated: {} processes", report.terminated);
        out!("  - Errors: {}", report.errors);
        out!(
            "  - Preserved: {} workers of live VMs",
            report.preserved_live_vm_workers
        );
    }
    u8::from(report.errors > 0)
}

/// Raises this process's soft limit of open files to its hard limit: the terminator holds a
/// pidfd per target while there are descriptors to spare (and works without beyond that).
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Sets the parent-death signal, makes sure the parent did not die before it was set, and
/// replaces this process with the command (same pid, so `Port.info(port, :os_pid)` stays
/// true).
fn exec(args: ExecArgs) -> ExitCode {
    use std::os::unix::process::CommandExt;
    if let Err(message) = apply_limits(&args).and_then(|()| enter_cgroup(&args)) {
        err!("dspex-proc exec: {message}");
        return ExitCode::from(126);
    }
    if let DeathSignal(Some(signal)) = args.pdeathsig {
        let parent = nix::unistd::getppid();
        if let Err(e) = nix::sys::prctl::set_pdeathsig(signal) {
            err!("dspex-proc exec: prctl(PR_SET_PDEATHSIG) failed: {e}");
            return ExitCode::from(126);
        }
        // The parent may have died between the read above and the arming: then we were
        // re-parented and no signal will come. A parent that was PID 1 (an init, systemd,
        // tini) from the start is not a dead parent: it outlives us. A parent that died
        // before the first read cannot be told from one; for workers, the markers' owner
        // check covers that case.
        if nix::unistd::getppid() != parent || owner_gone() {
            return ExitCode::from(125);
        }
    }
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let error = std::process::Command::new(program).args(rest).exec();
    err!("dspex-proc exec: {}: {error}", program.to_string_lossy());
    ExitCode::from(if error.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// Resource limits and niceness, set on this process before the exec: the command
/// inherits them.
fn apply_limits(args: &ExecArgs) -> Result<(), String> {
    use nix::sys::resource::{setrlimit, Resource};
    for (resource, name, value) in [
        (Resource::RLIMIT_AS, "RLIMIT_AS", args.rlimit_as),
        (Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE", args.rlimit_nofile),
    ] {
        if let Some(v) = value {
            setrlimit(resource, v, v).map_err(|e| format!("setrlimit({name}, {v}) failed: {e}"))?;
        }
    }
    if let Some(n) = args.nice {
        rustix::process::setpriority_process(None, n)
            .map_err(|e| format!("setpriority({n}) failed: {e}"))?;
    }
    Ok(())
}

/// True when this process carries ownership markers and the BEAM they name is gone.
fn owner_gone() -> bool {
    let Ok(me) = Pid::new(i64::from(std::process::id())) else {
        return false;
    };
    match Markers::read(me) {
        Ok(Some(markers)) => {
            classify::owner_state(&markers.owner, &mut ProcLookup::default())
                == classify::OwnerState::Dead
        }
        _ => false,
    }
}

/// With `--cgroup`: makes this process's leaf in the per-VM cgroup, writes the cgroup
/// limits there — or, for a controller the cgroup2 leaf lacks, in its leaf of the
/// `--cgroup-v1` hierarchy that has it — and moves this process into its leaves, before the
/// exec.
fn enter_cgroup(args: &ExecArgs) -> Result<(), String> {
    use dspex_process::cgroup::{self, VmCgroup};
    use dspex_process::cgroup_v1::V1VmCgroup;
    let Some(dir) = &args.cgroup else {
        return Ok(());
    };
    let vm = VmCgroup::at(dir).ok_or_else(|| {
        format!(
            "--cgroup {}: not a per-VM cgroup of dspex_process (dspex-NS-PID-START in the \
             cgroup2 hierarchy)",
            dir.display()
        )
    })?;
    let mut v1 = Vec::new();
    for d in &args.cgroup_v1 {
        match V1VmCgroup::at(d) {
            Some(c) if c.vm.name == vm.name => v1.push(c),
            _ => {
                return Err(format!(
                    "--cgroup-v1 {}: not a per-VM cgroup of the same VM as --cgroup in a \
                     cgroup v1 hierarchy",
                    d.display()
                ))
            }
        }
    }
    let me = Pid::new(i64::from(std::process::id()))
        .and_then(ProcessIdentity::of)
        .map_err(|e| e.to_string())?;
    let leaf = vm.leaf(&me);
    match std::fs::create_dir(&leaf.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", leaf.dir.display())),
    }
    let limits = [
        ("memory.max", "memory", args.memory_max),
        ("pids.max", "pids", args.pids_max),
        ("cpu.weight", "cpu", args.cpu_weight),
    ];
    // The limits the cgroup2 leaf cannot take go to the v1 leaves.
    let mut v1_limits = Vec::new();
    for (file, controller, value) in limits {
        let Some(value) = value else { continue };
        let path = leaf.dir.join(file);
        if !path.exists() {
            if v1.iter().any(|c| c.has(controller)) {
                v1_limits.push((controller, value));
                continue;
            }
            leaf.remove(Duration::ZERO);
            return Err(format!(
                "the {controller} controller is not enabled for {} ({file} is missing) and no \
                 --cgroup-v1 hierarchy has it",
                dir.display()
            ));
        }
        if let Err(e) = cgroup::write_file(&path, &value.to_string()) {
            leaf.remove(Duration::ZERO);
            return Err(format!("writing {value} to {} failed: {e}", path.display()));
        }
    }
    // Entered from inside, before the exec: this process is the one named by the leaves.
    let mut entered: Vec<&V1VmCgroup> = Vec::new();
    let leave_v1 = |entered: &[&V1VmCgroup]| {
        for c in entered {
            if let Some(parent) = c.vm.dir.parent() {
                let _ = cgroup::write_file(&parent.join("cgroup.procs"), "0");
            }
            c.remove_leaf(&me, Duration::from_millis(100));
        }
    };
    for c in &v1 {
        if let Err(e) = c.enter_self(&me, &v1_limits) {
            leave_v1(&entered);
            leaf.remove(Duration::ZERO);
            return Err(e);
        }
        entered.push(c);
    }
    vm.enter_self().map(|_| ()).map_err(|e| {
        leave_v1(&entered);
        leaf.remove(Duration::ZERO);
        format!("cannot enter {}: {e}", leaf.dir.display())
    })
}
