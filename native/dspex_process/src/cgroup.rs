//! Containment: one cgroup v2 per registered OS process, so that ending it ends every
//! descendant, whatever its session, process group or argv.
//!
//! Layout, under the cgroup of the VM (the VM itself never moves):
//!
//! ```text
//! <VM's cgroup>/dspex-<pidns>-<vm pid>-<vm start>/      one per VM run, holds only leaves
//!                                        w-<pid>-<start>/   one per registered process
//! ```
//!
//! The per-VM cgroup carries the VM's identity (pid namespace, pid, start time), so any
//! later reader can tell whether its VM is alive, exactly as the markers do. The leaf
//! carries the identity of the process it was made for. Only directories whose names parse
//! as these are ever killed or removed: nothing else in the hierarchy is ours.
//!
//! The pure parts (mountinfo, `/proc/PID/cgroup`, names) are separate from the small I/O
//! functions, and tested on their own.

use crate::identity::ProcessIdentity;
use crate::pid::Pid;
use crate::proc_facts::Stat;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The prefix of every per-VM cgroup.
pub const VM_PREFIX: &str = "dspex-";
/// The prefix of every per-process leaf.
pub const LEAF_PREFIX: &str = "w-";

// ---------------------------------------------------------------------------------------
// Pure parsing

/// The cgroup2 mount of a mountinfo text: `(mount point, root of the mount)`. Octal escapes
/// (`\040` for a space) are decoded.
pub fn parse_v2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    crate::proc_facts::mount_entries(mountinfo)
        .find(|m| m.fstype == "cgroup2")
        .map(|m| (PathBuf::from(unescape(m.mount_point)), unescape(m.root)))
}

pub(crate) fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 path of a `/proc/PID/cgroup` text: the `0::PATH` line.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|p| p.trim_end().to_string())
}

/// The directory of cgroup `path` (as `/proc/PID/cgroup` names it) under a mount whose
/// root is `mount_root`. `None` when the path lies outside the mount or climbs (`..`).
pub fn dir_of(mount: &Path, mount_root: &str, path: &str) -> Option<PathBuf> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return None;
    }
    let rel = if mount_root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount_root)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    })
}

/// What a per-VM cgroup's name says: the VM's pid namespace and identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmName {
    pub pid_ns: u64,
    pub vm: ProcessIdentity,
}

impl VmName {
    pub fn to_name(self) -> String {
        format!(
            "{VM_PREFIX}{}-{}-{}",
            self.pid_ns, self.vm.pid, self.vm.start_time
        )
    }

    /// Parses `dspex-<ns>-<pid>-<start>`, strictly (digits only, nothing more).
    pub fn parse(name: &str) -> Option<VmName> {
        let rest = name.strip_prefix(VM_PREFIX)?;
        let [ns, pid, start] = three_numbers(rest)?;
        Some(VmName {
            pid_ns: ns,
            vm: ProcessIdentity {
                pid: Pid::new(i64::try_from(pid).ok()?).ok()?,
                start_time: start,
            },
        })
    }
}

fn three_numbers(text: &str) -> Option<[u64; 3]> {
    let mut parts = text.split('-');
    let mut out = [0u64; 3];
    for slot in &mut out {
        *slot = number(parts.next()?)?;
    }
    parts.next().is_none().then_some(out)
}

fn number(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The leaf name for a registered process: `w-<pid>-<start>`.
pub fn leaf_name(id: &ProcessIdentity) -> String {
    format!("{LEAF_PREFIX}{}-{}", id.pid, id.start_time)
}

/// Parses `w-<pid>-<start>`, strictly.
pub fn parse_leaf_name(name: &str) -> Option<ProcessIdentity> {
    let rest = name.strip_prefix(LEAF_PREFIX)?;
    let (pid, start) = rest.split_once('-')?;
    Some(ProcessIdentity {
        pid: Pid::new(i64::try_from(number(pid)?).ok()?).ok()?,
        start_time: number(start)?,
    })
}

/// Whether a VM, judged from its per-VM cgroup's name, is alive: same pid namespace as the
/// reader (otherwise its pid means nothing here: alive, protected), then pid and start time
/// like the markers. A zombie VM is dead; a pid that cannot be read for any reason other
/// than "no such process" is alive (cannot tell means protected).
pub fn vm_alive(name: &VmName, reader_pid_ns: Option<u64>) -> bool {
    if reader_pid_ns != Some(name.pid_ns) {
        return true;
    }
    match Stat::read(name.vm.pid.as_raw()) {
        Ok(stat) => stat.start_time == name.vm.start_time && !stat.state.has_exited(),
        Err(crate::Error::NoSuchProcess(_)) => false,
        Err(_) => true,
    }
}

// ---------------------------------------------------------------------------------------
// The hierarchy

/// The cgroup v2 hierarchy as this process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where cgroup2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` in hybrid mode).
    pub mount: PathBuf,
    /// The root of that mount, as cgroup paths name it (`/` unless a subtree is mounted).
    pub mount_root: String,
}

impl Hierarchy {
    /// Finds the cgroup2 mount in `/proc/self/mountinfo`.
    pub fn find() -> Option<Hierarchy> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let (mount, mount_root) = parse_v2_mount(&text)?;
        Some(Hierarchy { mount, mount_root })
    }

    /// The cgroup v2 path of `pid` (`"self"` for the caller), as `/proc/PID/cgroup` says.
    pub fn path_of(pid: &str) -> std::io::Result<Option<String>> {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map(|t| parse_proc_cgroup(&t))
    }

    pub fn dir_of(&self, path: &str) -> Option<PathBuf> {
        dir_of(&self.mount, &self.mount_root, path)
    }

    /// Every per-VM cgroup in the hierarchy (a walk of directory names only, at most 32
    /// levels deep; it does not enter per-VM cgroups).
    pub fn vm_cgroups(&self) -> Vec<VmCgroup> {
        let mut found = Vec::new();
        let mut stack = vec![(self.mount.clone(), self.mount_root.clone(), 0usize)];
        while let Some((dir, path, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let child_path = if path == "/" {
                    format!("/{name}")
                } else {
                    format!("{path}/{name}")
                };
                if let Some(vm) = VmName::parse(&name) {
                    found.push(VmCgroup {
                        dir: entry.path(),
                        path: child_path,
                        name: vm,
                    });
                } else if depth < 32 {
                    stack.push((entry.path(), child_path, depth + 1));
                }
            }
        }
        found
    }
}

// ---------------------------------------------------------------------------------------
// Cgroups: a per-VM cgroup and its leaves

/// Why containment is not possible here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    NoCgroup2,
    NotInV2,
    OutsideMount(String),
    NoKill,
    NotWritable(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::NoCgroup2 => write!(f, "no cgroup2 hierarchy is mounted"),
            Unavailable::NotInV2 => write!(f, "/proc/self/cgroup has no cgroup v2 (0::) line"),
            Unavailable::OutsideMount(p) => {
                write!(
                    f,
                    "this VM's cgroup {p} is outside the visible cgroup2 mount"
                )
            }
            Unavailable::NoKill => write!(
                f,
                "the kernel has no cgroup.kill (Linux 5.14 or later is needed)"
            ),
            Unavailable::NotWritable(why) => write!(f, "{why}"),
        }
    }
}

/// A per-VM cgroup: `dir` on disk, `path` as `/proc/PID/cgroup` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    pub dir: PathBuf,
    pub path: String,
    pub name: VmName,
}

/// A cgroup we may kill: a leaf, or a whole per-VM cgroup of a dead VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Unit {
    pub dir: PathBuf,
    pub path: String,
}

/// What happened when a registered process was to be moved into its leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entered {
    /// Moved into its leaf now.
    Moved,
    /// It was in its leaf already (our exec wrapper put it there before exec).
    Already,
    /// Gone, or its pid names another process now: nothing moved.
    Gone,
    /// It lives in another cgroup than the VM's: not ours to move (left where it is).
    Elsewhere(String),
    /// The pid was recycled between the check and the write: the stranger was moved back.
    Raced,
}

impl VmCgroup {
    /// The per-VM cgroup of the calling VM, created now under the VM's own cgroup (an
    /// existing one of the same name is reused: the same VM asked twice). Fails with the
    /// reason when it cannot be created or processes cannot be moved into it.
    pub fn create_for_self(vm: ProcessIdentity, pid_ns: u64) -> Result<VmCgroup, Unavailable> {
        Self::create(VmName { pid_ns, vm })
    }

    /// Creates the per-VM cgroup `name` under the calling process's own cgroup.
    pub fn create(name: VmName) -> Result<VmCgroup, Unavailable> {
        let hierarchy = Hierarchy::find().ok_or(Unavailable::NoCgroup2)?;
        let own = Hierarchy::path_of("self")
            .ok()
            .flatten()
            .ok_or(Unavailable::NotInV2)?;
        let own_dir = hierarchy
            .dir_of(&own)
            .ok_or_else(|| Unavailable::OutsideMount(own.clone()))?;
        if !own_dir.join("cgroup.procs").exists() {
            return Err(Unavailable::OutsideMount(own));
        }
        let vm_cgroup = VmCgroup {
            dir: own_dir.join(name.to_name()),
            path: join_path(&own, &name.to_name()),
            name,
        };
        // Moving a process needs write access to the cgroup.procs of the common ancestor:
        // the VM's own cgroup.
        if !writable(&own_dir.join("cgroup.procs")) {
            return Err(Unavailable::NotWritable(format!(
                "{}/cgroup.procs is not writable by this user (run as root, or delegate the \
                 subtree: systemd Delegate=yes)",
                own_dir.display()
            )));
        }
        match std::fs::create_dir(&vm_cgroup.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Unavailable::NotWritable(format!(
                    "cannot create a cgroup under {}: {e}",
                    own_dir.display()
                )))
            }
        }
        if !vm_cgroup.dir.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&vm_cgroup.dir);
            return Err(Unavailable::NoKill);
        }
        Ok(vm_cgroup)
    }

    /// The per-VM cgroup at `dir`, when its name is one.
    pub fn at(dir: &Path) -> Option<VmCgroup> {
        let name = VmName::parse(dir.file_name()?.to_str()?)?;
        let hierarchy = Hierarchy::find()?;
        let rel = dir.strip_prefix(&hierarchy.mount).ok()?;
        let rel = rel.to_str()?;
        let path = join_path(&hierarchy.mount_root, rel);
        Some(VmCgroup {
            dir: dir.to_path_buf(),
            path,
            name,
        })
    }

    /// The leaf of a registered process (whether or not it exists).
    pub fn leaf(&self, id: &ProcessIdentity) -> Unit {
        let name = leaf_name(id);
        Unit {
            dir: self.dir.join(&name),
            path: join_path(&self.path, &name),
        }
    }

    /// The whole per-VM cgroup as one unit (for a VM that is dead).
    pub fn as_unit(&self) -> Unit {
        Unit {
            dir: self.dir.clone(),
            path: self.path.clone(),
        }
    }

    /// The VM's own cgroup path: the parent of the per-VM cgroup.
    pub fn parent_path(&self) -> &str {
        match self.path.rfind('/') {
            Some(0) | None => "/",
            Some(i) => &self.path[..i],
        }
    }

    /// The existing leaves, by the identity in their names.
    pub fn leaves(&self) -> Vec<(ProcessIdentity, Unit)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let id = parse_leaf_name(e.file_name().to_str()?)?;
                Some((id, self.leaf(&id)))
            })
            .collect()
    }

    /// Moves the registered process `id` into its leaf, creating the leaf. Only a process
    /// that is in the VM's own cgroup now (where port programs start) is taken, and only
    /// after a pidfd is open on it and its start time is checked; the start time is
    /// checked again after the write.
    pub fn enter(&self, id: &ProcessIdentity) -> std::io::Result<Entered> {
        let leaf = self.leaf(id);
        let raw = id.pid.as_raw().to_string();
        let Ok(pidfd) = crate::sys::pidfd_open(id.pid) else {
            return Ok(Entered::Gone);
        };
        // Read after the pidfd is open: when the start time matches, both name our process.
        let before = match Hierarchy::path_of(&raw) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(Entered::Elsewhere(String::new())),
            Err(_) => return Ok(Entered::Gone),
        };
        if !id.is_current() {
            return Ok(Entered::Gone);
        }
        if before == leaf.path {
            return Ok(Entered::Already);
        }
        if before != self.parent_path() {
            return Ok(Entered::Elsewhere(before));
        }
        match std::fs::create_dir(&leaf.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Err(e) = write_file(&leaf.dir.join("cgroup.procs"), &raw) {
            let _ = leaf.remove(Duration::ZERO);
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(Entered::Gone)
            } else {
                Err(e)
            };
        }
        use std::os::fd::AsFd;
        let exited = crate::sys::poll_exited(&[pidfd.as_fd()], 0)[0];
        if exited && !id.is_current() {
            // Ours exited in the window; if another process took its pid and was moved,
            // put it back where ours came from.
            if Hierarchy::path_of(&raw).ok().flatten().as_deref() == Some(leaf.path.as_str()) {
                if let Some(parent) = self.dir.parent() {
                    let _ = write_file(&parent.join("cgroup.procs"), &raw);
                }
                let _ = leaf.remove(Duration::from_millis(100));
                return Ok(Entered::Raced);
            }
            let _ = leaf.remove(Duration::from_millis(100));
            return Ok(Entered::Gone);
        }
        Ok(Entered::Moved)
    }

    /// Moves the calling process into the leaf named after it (the exec wrapper, before it
    /// execs the command). Returns the leaf.
    pub fn enter_self(&self) -> std::io::Result<Unit> {
        let me = Pid::new(i64::from(std::process::id()))
            .and_then(ProcessIdentity::of)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let leaf = self.leaf(&me);
        match std::fs::create_dir(&leaf.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        write_file(&leaf.dir.join("cgroup.procs"), "0")?;
        Ok(leaf)
    }

    /// Removes every empty leaf and then the per-VM cgroup itself when it is empty. True
    /// when the per-VM cgroup is gone.
    pub fn remove_empty(&self) -> bool {
        for (_, leaf) in self.leaves() {
            if leaf.populated() == Some(false) {
                let _ = leaf.remove(Duration::from_millis(200));
            }
        }
        self.as_unit().remove(Duration::from_millis(200))
    }

    /// Moves every process of a leaf back to the VM's own cgroup and removes the leaf: a
    /// process handed off on purpose must not be ended with its former owner's cgroup.
    pub fn dissolve(&self, id: &ProcessIdentity) -> bool {
        let leaf = self.leaf(id);
        if leaf.absent() {
            return true;
        }
        let Some(parent) = self.dir.parent() else {
            return false;
        };
        for _ in 0..3 {
            for pid in leaf.procs() {
                // Read again right before the move: a pid that left the leaf (its process
                // exited, the pid taken by another) is not ours to move.
                let raw = pid.to_string();
                let inside = Hierarchy::path_of(&raw)
                    .ok()
                    .flatten()
                    .is_some_and(|p| leaf.holds_path(&p));
                if inside {
                    let _ = write_file(&parent.join("cgroup.procs"), &raw);
                }
            }
            if leaf.remove(Duration::from_millis(50)) {
                return true;
            }
        }
        false
    }
}

impl Unit {
    /// The pids in this cgroup and every cgroup below it, as far as they can be read.
    pub fn procs(&self) -> Vec<i32> {
        self.procs_listed().0
    }

    /// The pids in this cgroup and every cgroup below it, and whether that is all of them:
    /// false when a `cgroup.procs` or a directory below could not be read (EMFILE, EACCES;
    /// a cgroup removed meanwhile held nothing, and counts as read).
    pub fn procs_listed(&self) -> (Vec<i32>, bool) {
        let mut pids = Vec::new();
        let mut complete = true;
        let mut stack = vec![self.dir.clone()];
        let mut note = |e: std::io::Error| complete &= e.kind() == ErrorKind::NotFound;
        while let Some(dir) = stack.pop() {
            match std::fs::read_to_string(dir.join("cgroup.procs")) {
                Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
                Err(e) => note(e),
            }
            match std::fs::read_dir(&dir) {
                Ok(entries) => {
                    for entry in entries {
                        match entry.and_then(|e| Ok((e.file_type()?, e.path()))) {
                            Ok((kind, path)) if kind.is_dir() => stack.push(path),
                            Ok(_) => {}
                            Err(e) => note(e),
                        }
                    }
                }
                Err(e) => note(e),
            }
        }
        (pids, complete)
    }

    /// Whether a process is in this cgroup or below it: `path` is its `/proc/PID/cgroup`.
    pub fn holds_path(&self, path: &str) -> bool {
        path == self.path
            || path
                .strip_prefix(self.path.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// `cgroup.events` says whether any process is in the subtree; `None` when unreadable
    /// (the cgroup is gone).
    /// A cgroup v1 directory has no `cgroup.events`: there its `cgroup.procs` (and those
    /// below it) say it.
    pub fn populated(&self) -> Option<bool> {
        match std::fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(text) => text
                .lines()
                .find_map(|l| l.strip_prefix("populated "))
                .map(|v| v.trim() == "1"),
            Err(_) => {
                std::fs::metadata(self.dir.join("cgroup.procs")).ok()?;
                Some(!self.procs().is_empty())
            }
        }
    }

    /// Writes `cgroup.kill`: SIGKILL to every process of the subtree, including those that
    /// fork meanwhile.
    pub fn kill(&self) -> std::io::Result<()> {
        write_file(&self.dir.join("cgroup.kill"), "1")
    }

    /// Waits until the subtree is empty or `timeout` passes; true when empty.
    pub fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.populated() != Some(true) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether the cgroup's directory is known not to exist: a failed look (EACCES, say)
    /// is not "absent".
    pub fn absent(&self) -> bool {
        matches!(self.dir.try_exists(), Ok(false))
    }

    /// Removes the cgroup and the empty cgroups below it, retrying for up to `wait` while
    /// the kernel finishes emptying it (`EBUSY`). True when it is gone.
    pub fn remove(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(entries) = std::fs::read_dir(&self.dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let child = Unit {
                            dir: e.path(),
                            path: join_path(&self.path, &e.file_name().to_string_lossy()),
                        };
                        child.remove(Duration::ZERO);
                    }
                }
            }
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return true,
                Err(e) if e.kind() == ErrorKind::NotFound => return true,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return false,
            }
        }
    }
}

/// The per-VM cgroup of a process's cgroup path, and the unit to end with it: its leaf
/// when the process sits in a leaf, the per-VM cgroup otherwise. `None` when the path is
/// not inside any per-VM cgroup.
pub fn unit_of_path(hierarchy: &Hierarchy, path: &str) -> Option<(VmCgroup, Unit)> {
    let components: Vec<&str> = path.split('/').collect();
    let at = components
        .iter()
        .rposition(|c| VmName::parse(c).is_some())?;
    let name = VmName::parse(components[at])?;
    let vm_path = components[..=at].join("/");
    let vm = VmCgroup {
        dir: hierarchy.dir_of(&vm_path)?,
        path: vm_path,
        name,
    };
    let unit = match components.get(at + 1) {
        Some(leaf) if parse_leaf_name(leaf).is_some() => Unit {
            dir: vm.dir.join(leaf),
            path: join_path(&vm.path, leaf),
        },
        _ => vm.as_unit(),
    };
    Some((vm, unit))
}

/// The per-VM cgroups, anywhere in the cgroup2 hierarchy, whose VM is dead (judged as
/// [`vm_alive`] says: another pid namespace, or an unreadable pid, is alive). With those of
/// the cgroup v1 hierarchies: [`crate::cgroup_v1::dead_vm_cgroups`].
pub fn dead_vm_cgroups() -> Vec<VmCgroup> {
    let Some(hierarchy) = Hierarchy::find() else {
        return Vec::new();
    };
    let ns = crate::markers::own_pid_namespace();
    hierarchy
        .vm_cgroups()
        .into_iter()
        .filter(|vm| !vm_alive(&vm.name, ns))
        .collect()
}

/// A process found in the cgroup of a dead VM: an orphan whatever its argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupOrphan {
    pub facts: crate::ProcessFacts,
    /// The dead VM named by the cgroup.
    pub owner: VmName,
    /// How long the process has been running, in milliseconds.
    pub age_ms: u64,
}

/// Every live process in the cgroups of dead VMs (`vms`), with its facts. VMs (a nested
/// one would be refused anyway) and processes that vanish while read are left out.
pub fn cgroup_orphans(vms: &[VmCgroup]) -> Vec<CgroupOrphan> {
    let mut found = Vec::new();
    let ticks = procfs::ticks_per_second().max(1);
    let now = crate::proc_facts::uptime_ticks(ticks);
    // Each process once, whatever the list holds.
    let mut seen = std::collections::HashSet::new();
    for vm in vms {
        for raw in vm.as_unit().procs() {
            if !seen.insert(raw) {
                continue;
            }
            let Ok(pid) = Pid::new(i64::from(raw)) else {
                continue;
            };
            let Ok(facts) = crate::ProcessFacts::read(pid) else {
                continue;
            };
            if facts.state.has_exited() || crate::proc_facts::is_beam(&facts.comm) {
                continue;
            }
            let age_ms = now.saturating_sub(facts.start_time) * 1000 / ticks;
            found.push(CgroupOrphan {
                facts,
                owner: vm.name,
                age_ms,
            });
        }
    }
    found
}

pub(crate) fn join_path(base: &str, name: &str) -> String {
    let name = name.trim_start_matches('/');
    if base == "/" || base.is_empty() {
        format!("/{name}")
    } else {
        format!("{}/{name}", base.trim_end_matches('/'))
    }
}

fn writable(path: &Path) -> bool {
    crate::sys::writable(path)
}

/// One `write(2)` of `text` to a cgroup file (cgroup files take one value per write).
pub fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(pid: i64, start: u64) -> ProcessIdentity {
        ProcessIdentity {
            pid: Pid::new(pid).unwrap(),
            start_time: start,
        }
    }

    #[test]
    fn finds_the_cgroup2_mount_in_hybrid_and_unified_layouts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
             35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
             41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_v2_mount(hybrid),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".into()))
        );
        let unified =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_v2_mount(unified),
            Some((PathBuf::from("/sys/fs/cgroup"), "/".into()))
        );
        let escaped = "1 2 0:3 /sub /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(
            parse_v2_mount(escaped),
            Some((PathBuf::from("/mnt/my cg"), "/sub".into()))
        );
        assert_eq!(
            parse_v2_mount("35 31 0:32 / /x rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(parse_v2_mount(""), None);
    }

    #[test]
    fn reads_the_v2_line_of_proc_cgroup() {
        let text = "4:memory:/process_api/43\n1:cpu:/\n0::/system.slice/app.service\n";
        assert_eq!(
            parse_proc_cgroup(text).as_deref(),
            Some("/system.slice/app.service")
        );
        assert_eq!(parse_proc_cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_proc_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn maps_cgroup_paths_to_directories_and_refuses_escapes() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(dir_of(m, "/", "/"), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            dir_of(m, "/", "/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/a/b"))
        );
        assert_eq!(dir_of(m, "/sub", "/sub/a"), Some(m.join("a")));
        assert_eq!(dir_of(m, "/sub", "/sub"), Some(m.to_path_buf()));
        assert_eq!(dir_of(m, "/sub", "/subway/a"), None);
        assert_eq!(dir_of(m, "/sub", "/other"), None);
        assert_eq!(dir_of(m, "/", "/../../x"), None);
        assert_eq!(dir_of(m, "/", "relative"), None);
    }

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        let name = VmName {
            pid_ns: 4026531836,
            vm: id(1234, 5678),
        };
        assert_eq!(name.to_name(), "dspex-4026531836-1234-5678");
        assert_eq!(VmName::parse(&name.to_name()), Some(name));
        for bad in [
            "dspex-",
            "dspex-1-2",
            "dspex-1-2-3-4",
            "dspex-1-1-3",
            "dspex-1-0-3",
            "dspex-1--2-3",
            "dspex-1-+2-3",
            "dspex-a-2-3",
            "Dspex-1-2-3",
            "dspex-1-2-3 ",
            "dspex-1-99999999999-3",
            "system.slice",
        ] {
            assert_eq!(VmName::parse(bad), None, "{bad}");
        }
        assert_eq!(leaf_name(&id(42, 7)), "w-42-7");
        assert_eq!(parse_leaf_name("w-42-7"), Some(id(42, 7)));
        for bad in ["w-1-7", "w-42", "w-42-7-1", "w--42-7", "x-42-7", "w-42-x"] {
            assert_eq!(parse_leaf_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn finds_the_unit_of_a_process_path() {
        let h = Hierarchy {
            mount: PathBuf::from("/cg"),
            mount_root: "/".into(),
        };
        let (vm, unit) = unit_of_path(&h, "/svc/dspex-1-100-5/w-200-6").unwrap();
        assert_eq!(vm.path, "/svc/dspex-1-100-5");
        assert_eq!(vm.dir, PathBuf::from("/cg/svc/dspex-1-100-5"));
        assert_eq!(vm.name.vm, id(100, 5));
        assert_eq!(unit.path, "/svc/dspex-1-100-5/w-200-6");
        assert_eq!(unit.dir, PathBuf::from("/cg/svc/dspex-1-100-5/w-200-6"));
        // A process directly in the per-VM cgroup, or in a cgroup below a leaf.
        assert_eq!(
            unit_of_path(&h, "/dspex-1-100-5").unwrap().1.path,
            "/dspex-1-100-5"
        );
        assert_eq!(
            unit_of_path(&h, "/dspex-1-100-5/w-200-6/sub")
                .unwrap()
                .1
                .path,
            "/dspex-1-100-5/w-200-6"
        );
        assert_eq!(unit_of_path(&h, "/svc/app.service"), None);
        assert_eq!(unit_of_path(&h, "/"), None);

        assert!(unit.holds_path("/svc/dspex-1-100-5/w-200-6"));
        assert!(unit.holds_path("/svc/dspex-1-100-5/w-200-6/x"));
        assert!(!unit.holds_path("/svc/dspex-1-100-5/w-200-60"));
        assert!(!unit.holds_path("/svc/dspex-1-100-5"));
    }

    #[test]
    fn a_vm_is_alive_unless_its_pid_is_gone_reused_or_a_zombie() {
        use crate::test_util::{spawn, SLEEPER};
        let ns = crate::markers::own_pid_namespace();
        let (mut child, child_id) = spawn(SLEEPER);
        let name = VmName {
            pid_ns: ns.unwrap_or(0),
            vm: child_id,
        };
        assert!(vm_alive(&name, ns));
        let reused = VmName {
            vm: ProcessIdentity {
                start_time: child_id.start_time + 1,
                ..child_id
            },
            ..name
        };
        assert!(!vm_alive(&reused, ns));
        // Another pid namespace: cannot be judged from here, so alive.
        assert!(vm_alive(&reused, ns.map(|n| n + 1)));
        child.kill().unwrap();
        // Unreaped: a zombie VM is dead.
        assert!(crate::test_util::eventually(Duration::from_secs(5), || {
            !vm_alive(&name, ns)
        }));
        child.wait().unwrap();
        assert!(!vm_alive(&name, ns));
    }

    #[test]
    fn enters_only_a_live_process_of_the_vms_own_cgroup_and_cleans_up() {
        use crate::test_util::{reap, spawn, TestVmCgroup, SLEEPER};
        let Some(vm) = TestVmCgroup::new() else {
            return;
        };
        let vm = &vm.0;
        assert!(vm.dir.join("cgroup.kill").exists());
        let (a, a_id) = spawn(SLEEPER);
        let (b, b_id) = spawn(SLEEPER);
        assert_eq!(vm.enter(&a_id).unwrap(), Entered::Moved);
        assert_eq!(
            Hierarchy::path_of(&a_id.pid.to_string()).unwrap(),
            Some(vm.leaf(&a_id).path.clone())
        );
        assert_eq!(vm.enter(&a_id).unwrap(), Entered::Already);
        // A stale identity moves nothing.
        let stale = ProcessIdentity {
            start_time: b_id.start_time + 1,
            ..b_id
        };
        assert_eq!(vm.enter(&stale).unwrap(), Entered::Gone);
        assert!(!vm.leaf(&stale).dir.exists());
        // A process in another cgroup than the VM's own is left where it is.
        let elsewhere = TestVmCgroup::new().unwrap();
        assert_eq!(elsewhere.0.enter(&b_id).unwrap(), Entered::Moved);
        assert!(
            matches!(vm.enter(&b_id).unwrap(), Entered::Elsewhere(p) if p == elsewhere.0.leaf(&b_id).path)
        );
        assert_eq!(vm.leaves().len(), 1);
        // The walk finds both per-VM cgroups.
        let found = Hierarchy::find().unwrap().vm_cgroups();
        assert!(
            found.contains(vm) && found.contains(&elsewhere.0),
            "{found:?}"
        );
        // Handing a process off moves it back and removes its leaf.
        assert!(vm.dissolve(&a_id));
        assert_eq!(
            Hierarchy::path_of(&a_id.pid.to_string())
                .unwrap()
                .as_deref(),
            Some(vm.parent_path())
        );
        assert!(vm.leaves().is_empty());
        reap(&mut [a, b]);
        assert!(elsewhere.0.remove_empty());
        assert!(!elsewhere.0.dir.exists());
        drop(elsewhere);
        // A gone process leaves an empty leaf: removed with the per-VM cgroup.
        let (mut c, c_id) = spawn(SLEEPER);
        assert_eq!(vm.enter(&c_id).unwrap(), Entered::Moved);
        reap(std::slice::from_mut(&mut c));
        assert!(vm.leaf(&c_id).wait_empty(Duration::from_secs(2)));
        assert!(vm.remove_empty());
        assert!(!vm.dir.exists());
    }

    #[test]
    fn a_dead_vms_cgroup_is_ended_and_removed_a_live_ones_never() {
        use crate::terminate::{end_dead_vm_cgroup, TerminateOptions};
        use crate::test_util::{spawn, TestVmCgroup, SLEEPER};
        let ns = crate::markers::own_pid_namespace().unwrap();
        // The "VM" is a process we start; its per-VM cgroup carries its identity.
        let (mut fake_vm, fake_vm_id) = spawn(SLEEPER);
        let Some(probe) = TestVmCgroup::new() else {
            return;
        };
        drop(probe);
        let vm = VmCgroup::create(VmName {
            pid_ns: ns,
            vm: fake_vm_id,
        })
        .unwrap();
        let (mut worker, worker_id) = spawn(SLEEPER);
        assert_eq!(vm.enter(&worker_id).unwrap(), Entered::Moved);
        let options = TerminateOptions {
            grace: Duration::from_millis(300),
            ..TerminateOptions::default()
        };
        assert!(
            end_dead_vm_cgroup(&vm, &options).is_empty(),
            "its VM is alive"
        );
        assert!(worker_id.is_current());
        fake_vm.kill().unwrap();
        fake_vm.wait().unwrap();
        let out = end_dead_vm_cgroup(&vm, &options);
        assert_eq!(out, vec![(worker_id, crate::terminate::Outcome::Graceful)]);
        worker.wait().unwrap();
        assert!(!vm.dir.exists());
    }
}
