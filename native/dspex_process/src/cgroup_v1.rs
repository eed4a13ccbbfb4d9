//! Limits from cgroup v1, beside the cgroup v2 containment of [`crate::cgroup`].
//!
//! On a hybrid host the cgroup2 hierarchy (`/sys/fs/cgroup/unified`) has none of the
//! controllers the limits need: memory, pids and cpu are bound to v1 hierarchies
//! (`/sys/fs/cgroup/memory`, …). There a worker that has limits is put, besides its v2 leaf
//! (which is still what ends it: `cgroup.kill`), into a leaf of each v1 hierarchy whose
//! controller it needs, named exactly like the v2 ones and placed under the VM's own
//! cgroup of that hierarchy:
//!
//! ```text
//! <VM's v1 memory cgroup>/dspex-<pidns>-<vm pid>-<vm start>/w-<pid>-<start>/
//!                                                          memory.limit_in_bytes …
//! ```
//!
//! Cgroup v1 has no "no internal processes" rule, so these sit under the VM's own cgroup
//! although the VM is in it. They hold nothing but the limits: no process is ever killed
//! through them (v1 has no `cgroup.kill`); they are removed whenever the v2 ones are, and
//! the same name scheme lets every cleanup find them (the VM's identity in the name).
//!
//! The pure parts (mountinfo, `/proc/PID/cgroup` lines, values) come first and are tested on
//! their own.

use crate::cgroup::{join_path, unescape, write_file, Hierarchy, Unit};
use crate::cgroup::{VmCgroup, VmName};
use crate::identity::ProcessIdentity;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The controllers the limits use.
pub const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Every cgroup v1 controller name (what tells a controller from a mount option in a
/// mount's super options).
const KNOWN_CONTROLLERS: [&str; 14] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

// ---------------------------------------------------------------------------------------
// Pure parsing and values

/// One cgroup v1 mount: where, the root of the mount, and its controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Mount {
    pub hierarchy: Hierarchy,
    pub controllers: Vec<String>,
}

impl V1Mount {
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// The cgroup v1 mounts of a mountinfo text that carry a controller (a named hierarchy
/// such as `name=systemd` has none and is left out). A hierarchy mounted twice is listed
/// once, at its first mount.
pub fn parse_v1_mounts(mountinfo: &str) -> Vec<V1Mount> {
    let mut found: Vec<V1Mount> = Vec::new();
    for mount in crate::proc_facts::mount_entries(mountinfo) {
        if mount.fstype != "cgroup" {
            continue;
        }
        let controllers: Vec<String> = mount
            .super_options
            .split(',')
            .filter(|o| KNOWN_CONTROLLERS.contains(o))
            .map(str::to_string)
            .collect();
        if controllers.is_empty() || found.iter().any(|m| m.controllers == controllers) {
            continue;
        }
        found.push(V1Mount {
            hierarchy: Hierarchy {
                mount: PathBuf::from(unescape(mount.mount_point)),
                mount_root: unescape(mount.root),
            },
            controllers,
        });
    }
    found
}

/// The cgroup path of `controller`'s v1 hierarchy in a `/proc/PID/cgroup` text (the line
/// `ID:ctrl,ctrl:PATH` that lists it; never the v2 `0::` line).
pub fn parse_proc_cgroup_v1(text: &str, controller: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        (!controller.is_empty() && list.split(',').any(|c| c == controller))
            .then(|| path.trim_end().to_string())
    })
}

/// `cpu.shares` for a `cpu.weight` (1..10000), as systemd maps `CPUWeight=` to
/// `CPUShares=`: weight × 1024 / 100, so 100 (the default weight) is 1024 (the default
/// share), within the kernel's 2..262144.
pub fn cpu_shares_of_weight(weight: u64) -> u64 {
    (weight.saturating_mul(1024) / 100).clamp(2, 262_144)
}

/// The `oom_kill N` count of a `memory.oom_control` (v1) or `memory.events` (v2) text.
pub fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// The files a limit is written to in a v1 leaf, in order, and the values: `memory_max`
/// sets the memory limit and then (where the kernel accounts swap) the memory+swap limit,
/// so swap does not escape it; `pids_max` is `pids.max`; `cpu_weight` becomes `cpu.shares`.
pub fn limit_writes(controller: &str, value: u64) -> Vec<(&'static str, u64)> {
    match controller {
        "memory" => vec![
            ("memory.limit_in_bytes", value),
            ("memory.memsw.limit_in_bytes", value),
        ],
        "pids" => vec![("pids.max", value)],
        "cpu" => vec![("cpu.shares", cpu_shares_of_weight(value))],
        _ => Vec::new(),
    }
}

/// The file whose presence shows that a v1 cgroup has `controller`.
fn probe_file(controller: &str) -> &'static str {
    match controller {
        "memory" => "memory.limit_in_bytes",
        "pids" => "pids.max",
        _ => "cpu.shares",
    }
}

// ---------------------------------------------------------------------------------------
// The hierarchies

/// The cgroup v1 mounts of this process (those with a controller).
pub fn mounts() -> Vec<V1Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_v1_mounts(&t))
        .unwrap_or_default()
}

/// The per-VM cgroup in one v1 hierarchy (and the controllers that hierarchy has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1VmCgroup {
    pub controllers: Vec<String>,
    pub vm: VmCgroup,
}

impl V1VmCgroup {
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    /// The per-VM cgroup at `dir`, when its name is one and it lies in a v1 hierarchy.
    pub fn at(dir: &Path) -> Option<V1VmCgroup> {
        let name = VmName::parse(dir.file_name()?.to_str()?)?;
        // The deepest mount that holds it.
        let mount = mounts()
            .into_iter()
            .filter(|m| dir.starts_with(&m.hierarchy.mount))
            .max_by_key(|m| m.hierarchy.mount.components().count())?;
        let rel = dir.strip_prefix(&mount.hierarchy.mount).ok()?.to_str()?;
        if rel.split('/').any(|c| c == "..") {
            return None;
        }
        Some(V1VmCgroup {
            controllers: mount.controllers,
            vm: VmCgroup {
                dir: dir.to_path_buf(),
                path: join_path(&mount.hierarchy.mount_root, rel),
                name,
            },
        })
    }

    /// Creates the per-VM cgroup `name` in every v1 hierarchy that has one of `wanted`,
    /// under the calling process's own cgroup there (one that exists already is reused: the
    /// same VM asked twice). Returns what was made, and for each wanted controller that
    /// could not be had from v1, why.
    pub fn create_all(name: VmName, wanted: &[&str]) -> (Vec<V1VmCgroup>, Vec<(String, String)>) {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let all = mounts();
        let mut made: Vec<V1VmCgroup> = Vec::new();
        let mut missing = Vec::new();
        for &controller in wanted {
            if made.iter().any(|m| m.has(controller)) {
                continue;
            }
            let Some(mount) = all.iter().find(|m| m.has(controller)) else {
                missing.push((
                    controller.to_string(),
                    "no cgroup v1 hierarchy has it".into(),
                ));
                continue;
            };
            match Self::create_in(mount, &own, name, controller) {
                Ok(v1) => made.push(v1),
                Err(why) => missing.push((controller.to_string(), why)),
            }
        }
        (made, missing)
    }

    fn create_in(
        mount: &V1Mount,
        own_cgroup: &str,
        name: VmName,
        controller: &str,
    ) -> Result<V1VmCgroup, String> {
        let mount_dir = mount.hierarchy.mount.display();
        let own = parse_proc_cgroup_v1(own_cgroup, controller)
            .ok_or_else(|| format!("/proc/self/cgroup has no line for {controller}"))?;
        let own_dir = mount
            .hierarchy
            .dir_of(&own)
            .filter(|d| d.join("cgroup.procs").exists())
            .ok_or_else(|| format!("this VM's {controller} cgroup {own} is outside {mount_dir}"))?;
        if !crate::sys::writable(&own_dir.join("cgroup.procs")) {
            return Err(format!(
                "{}/cgroup.procs is not writable by this user",
                own_dir.display()
            ));
        }
        let vm = VmCgroup {
            dir: own_dir.join(name.to_name()),
            path: join_path(&own, &name.to_name()),
            name,
        };
        match std::fs::create_dir(&vm.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create a cgroup under {}: {e}",
                    own_dir.display()
                ))
            }
        }
        if !vm.dir.join(probe_file(controller)).exists() {
            let _ = std::fs::remove_dir(&vm.dir);
            return Err(format!(
                "{} has no {}",
                vm.dir.display(),
                probe_file(controller)
            ));
        }
        Ok(V1VmCgroup {
            controllers: mount.controllers.clone(),
            vm,
        })
    }

    /// Makes the calling process's leaf (named after it, `me`), writes there the limits
    /// whose controller this hierarchy has (`(controller, value)`), and moves the calling
    /// process in (the exec wrapper, before it execs the command: what the command forks
    /// starts inside). On an error the leaf is removed again.
    pub fn enter_self(&self, me: &ProcessIdentity, limits: &[(&str, u64)]) -> Result<Unit, String> {
        let leaf = self.vm.leaf(me);
        match std::fs::create_dir(&leaf.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", leaf.dir.display())),
        }
        let fail = |message: String| {
            leaf.remove(Duration::ZERO);
            Err(message)
        };
        for &(controller, value) in limits.iter().filter(|(c, _)| self.has(c)) {
            for (file, v) in limit_writes(controller, value) {
                let path = leaf.dir.join(file);
                // Swap accounting is optional in the kernel: without it, no memsw file.
                if file == "memory.memsw.limit_in_bytes" && !path.exists() {
                    continue;
                }
                if let Err(e) = write_file(&path, &v.to_string()) {
                    return fail(format!("writing {v} to {} failed: {e}", path.display()));
                }
            }
        }
        if let Err(e) = write_file(&leaf.dir.join("cgroup.procs"), "0") {
            return fail(format!("cannot enter {}: {e}", leaf.dir.display()));
        }
        Ok(leaf)
    }

    /// Whether a process (`pid`, read now) is in `leaf` of this hierarchy.
    fn holds(&self, leaf: &Unit, pid: i32) -> bool {
        let Some(controller) = self.controllers.first() else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| parse_proc_cgroup_v1(&t, controller))
            .is_some_and(|p| leaf.holds_path(&p))
    }

    /// Removes the leaf of `id` when nothing is in it (retrying for up to `wait` while the
    /// kernel finishes with its last process). True when no leaf is left.
    pub fn remove_leaf(&self, id: &ProcessIdentity, wait: Duration) -> bool {
        let leaf = self.vm.leaf(id);
        leaf.remove(wait)
    }

    /// Moves every process of `id`'s leaf back to the VM's own cgroup of this hierarchy and
    /// removes the leaf (a process handed off on purpose keeps no limit of this VM). Each pid
    /// is read again right before its move: one that left the leaf is not ours to move.
    pub fn dissolve(&self, id: &ProcessIdentity) -> bool {
        let leaf = self.vm.leaf(id);
        if leaf.absent() {
            return true;
        }
        let Some(parent) = self.vm.dir.parent() else {
            return false;
        };
        for _ in 0..3 {
            for pid in leaf.procs() {
                if self.holds(&leaf, pid) {
                    let _ = write_file(&parent.join("cgroup.procs"), &pid.to_string());
                }
            }
            if leaf.remove(Duration::from_millis(50)) {
                return true;
            }
        }
        false
    }

    /// The memory controller's kill count in `id`'s leaf (`oom_kill` of
    /// `memory.oom_control`); `None` without a memory leaf.
    pub fn oom_kills(&self, id: &ProcessIdentity) -> Option<u64> {
        if !self.has("memory") {
            return None;
        }
        let text = std::fs::read_to_string(self.vm.leaf(id).dir.join("memory.oom_control")).ok()?;
        parse_oom_kill(&text)
    }

    /// Removes the empty leaves, then the per-VM cgroup when it is empty. True when it is
    /// gone.
    pub fn remove_empty(&self) -> bool {
        self.vm.remove_empty()
    }
}

/// Every per-VM cgroup in the v1 hierarchies of the limit controllers (a walk of directory
/// names only, as [`Hierarchy::vm_cgroups`]).
pub fn vm_cgroups() -> Vec<VmCgroup> {
    mounts()
        .iter()
        .filter(|m| CONTROLLERS.iter().any(|c| m.has(c)))
        .flat_map(|m| m.hierarchy.vm_cgroups())
        .collect()
}

/// The per-VM cgroups of dead VMs, in the cgroup2 hierarchy ([`crate::cgroup::dead_vm_cgroups`])
/// and in the v1 hierarchies of the limit controllers (judged the same way, by the VM
/// named): what every later cleanup removes once empty.
///
/// Not what names orphans: that is the cgroup2 ones alone. The v1 leaves only carried
/// limits; a process in a dead VM's v1 leaf and in none of its cgroup2 cgroups left the
/// containment (a hand-off whose v1 move failed, a process moved by someone else) and is
/// not that VM's to end. Its v1 leaf stays until it is empty.
pub fn dead_vm_cgroups() -> Vec<VmCgroup> {
    let mut all = crate::cgroup::dead_vm_cgroups();
    all.extend(dead_v1_vm_cgroups());
    all
}

/// The per-VM cgroups of dead VMs in the cgroup v1 hierarchies only.
pub fn dead_v1_vm_cgroups() -> Vec<VmCgroup> {
    let ns = crate::markers::own_pid_namespace();
    vm_cgroups()
        .into_iter()
        .filter(|vm| !crate::cgroup::vm_alive(&vm.name, ns))
        .collect()
}

/// The leaves named after `id` in `v1`, removed when empty; true when none is left.
pub fn remove_leaves(v1: &[V1VmCgroup], ids: &[ProcessIdentity], wait: Duration) -> bool {
    let mut all = true;
    for id in ids {
        for v in v1 {
            all &= v.remove_leaf(id, wait);
        }
    }
    all
}

/// Hands `id` off in every one of `v1` ([`V1VmCgroup::dissolve`]): each hierarchy is tried
/// whatever the others did (one that fails must not leave the process in the leaves of the
/// next ones, where a later cleanup of this VM's cgroups would still find it). True when no
/// leaf of `id` is left.
pub fn dissolve_all(v1: &[V1VmCgroup], id: &ProcessIdentity) -> bool {
    v1.iter().fold(true, |all, v| v.dissolve(id) & all)
}

/// The identities named by the leaves of a per-VM cgroup (v1 or v2) that no live process
/// holds any more: their process is gone or its pid names another process now.
pub fn gone_leaves(vm: &VmCgroup) -> Vec<ProcessIdentity> {
    vm.leaves()
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| id.is_gone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pid::Pid;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_v1_mounts_with_their_controllers() {
        let mounts = parse_v1_mounts(HYBRID);
        let by_dir: Vec<(String, Vec<String>)> = mounts
            .iter()
            .map(|m| {
                (
                    m.hierarchy.mount.display().to_string(),
                    m.controllers.clone(),
                )
            })
            .collect();
        assert_eq!(
            by_dir,
            vec![
                ("/sys/fs/cgroup/cpu".into(), vec!["cpu".to_string()]),
                ("/sys/fs/cgroup/cpuacct".into(), vec!["cpuacct".into()]),
                ("/sys/fs/cgroup/memory".into(), vec!["memory".into()]),
                ("/sys/fs/cgroup/pids".into(), vec!["pids".into()]),
            ]
        );
        assert!(mounts.iter().all(|m| m.hierarchy.mount_root == "/"));
        // Co-mounted controllers, a subtree mount with an escaped space, options that are
        // not controllers, a second mount of the same hierarchy.
        let other = "\
1 2 0:3 /sub /mnt/my\\040cg rw - cgroup cgroup rw,nosuid,cpu,cpuacct,clone_children
4 2 0:3 /sub /elsewhere rw - cgroup cgroup rw,cpu,cpuacct
5 2 0:4 / /x rw - cgroup2 cgroup2 rw,memory
6 2 0:5 / /y rw - tmpfs cgroup rw,memory
";
        assert_eq!(
            parse_v1_mounts(other),
            vec![V1Mount {
                hierarchy: Hierarchy {
                    mount: PathBuf::from("/mnt/my cg"),
                    mount_root: "/sub".into()
                },
                controllers: vec!["cpu".into(), "cpuacct".into()],
            }]
        );
        let unified = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert!(parse_v1_mounts(unified).is_empty());
        assert!(parse_v1_mounts("").is_empty());
    }

    #[test]
    fn reads_the_v1_line_of_a_controller() {
        let text = "9:name=systemd:/\n8:pids:/a\n4:memory:/process_api/43\n\
                    2:cpu,cpuacct:/c\n0::/\n";
        assert_eq!(
            parse_proc_cgroup_v1(text, "memory").as_deref(),
            Some("/process_api/43")
        );
        assert_eq!(parse_proc_cgroup_v1(text, "pids").as_deref(), Some("/a"));
        assert_eq!(parse_proc_cgroup_v1(text, "cpu").as_deref(), Some("/c"));
        assert_eq!(parse_proc_cgroup_v1(text, "cpuacct").as_deref(), Some("/c"));
        // Never the v2 line, never a name= hierarchy taken for a controller, never a prefix.
        assert_eq!(parse_proc_cgroup_v1(text, ""), None);
        assert_eq!(parse_proc_cgroup_v1(text, "systemd"), None);
        assert_eq!(parse_proc_cgroup_v1(text, "mem"), None);
        assert_eq!(parse_proc_cgroup_v1("0::/x\n", "memory"), None);
        // A path with a colon stays whole.
        assert_eq!(
            parse_proc_cgroup_v1("4:memory:/a:b\n", "memory").as_deref(),
            Some("/a:b")
        );
    }

    #[test]
    fn maps_values_like_systemd() {
        assert_eq!(cpu_shares_of_weight(100), 1024);
        assert_eq!(cpu_shares_of_weight(1), 10);
        assert_eq!(cpu_shares_of_weight(50), 512);
        assert_eq!(cpu_shares_of_weight(10_000), 102_400);
        assert_eq!(cpu_shares_of_weight(0), 2);
        assert_eq!(cpu_shares_of_weight(u64::MAX), 262_144);
        assert_eq!(
            limit_writes("memory", 64 << 20),
            vec![
                ("memory.limit_in_bytes", 64 << 20),
                ("memory.memsw.limit_in_bytes", 64 << 20)
            ]
        );
        assert_eq!(limit_writes("pids", 8), vec![("pids.max", 8)]);
        assert_eq!(limit_writes("cpu", 1), vec![("cpu.shares", 10)]);
        assert!(limit_writes("hugetlb", 1).is_empty());
    }

    #[test]
    fn reads_the_oom_kill_count() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kill(v1), Some(3));
        let v2 = "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill(v2), Some(1));
        assert_eq!(parse_oom_kill("oom_kill_disable 0\n"), None);
    }

    #[test]
    fn a_hand_off_tries_every_hierarchy_whatever_the_first_did() {
        // Two per-VM cgroups on plain directories (no cgroupfs, no root needed): in the
        // first, the leaf cannot be removed (a file in it: rmdir fails, as a busy cgroup's
        // does); in the second, the leaf is empty and goes.
        let base = std::env::temp_dir().join(crate::test_util::unique_tag("v1_dissolve"));
        let me = ProcessIdentity::of(Pid::new(i64::from(std::process::id())).unwrap()).unwrap();
        let name = VmName { pid_ns: 1, vm: me };
        let made = |sub: &str| {
            let dir = base.join(sub).join(name.to_name());
            std::fs::create_dir_all(&dir).unwrap();
            V1VmCgroup {
                controllers: vec!["memory".into()],
                vm: VmCgroup {
                    dir,
                    path: format!("/{sub}/{}", name.to_name()),
                    name,
                },
            }
        };
        let (stuck, free) = (made("a"), made("b"));
        let id = ProcessIdentity {
            pid: Pid::new(12345).unwrap(),
            start_time: 1,
        };
        std::fs::create_dir(&stuck.vm.leaf(&id).dir).unwrap();
        std::fs::write(stuck.vm.leaf(&id).dir.join("cgroup.procs"), "").unwrap();
        std::fs::create_dir(&free.vm.leaf(&id).dir).unwrap();
        assert!(!stuck.dissolve(&id));
        assert!(!dissolve_all(&[stuck.clone(), free.clone()], &id));
        let second_tried = !free.vm.leaf(&id).dir.exists();
        std::fs::remove_dir_all(&base).unwrap();
        assert!(second_tried, "the second hierarchy's leaf was left");
    }

    /// The per-VM cgroups of a made-up VM in every v1 hierarchy with a limit controller,
    /// removed when dropped; `None` (and a note) where they cannot be made.
    struct TestV1(Vec<V1VmCgroup>);

    impl TestV1 {
        fn new() -> Option<TestV1> {
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let me = Pid::new(i64::from(std::process::id())).ok()?;
            let name = VmName {
                // A made-up namespace: no cleanup running meanwhile judges it dead.
                pid_ns: 1_000_000 + COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                vm: ProcessIdentity::of(me).ok()?,
            };
            let (made, missing) = V1VmCgroup::create_all(name, &CONTROLLERS);
            if made.is_empty() {
                eprintln!("cgroup v1 unavailable here ({missing:?}): not run");
                return None;
            }
            Some(TestV1(made))
        }
    }

    impl Drop for TestV1 {
        fn drop(&mut self) {
            for v in &self.0 {
                v.vm.as_unit().remove(Duration::from_secs(1));
            }
        }
    }

    #[test]
    fn a_v1_leaf_takes_its_limits_holds_the_process_and_goes() {
        use crate::test_util::{reap, spawn, SLEEPER};
        let Some(v1) = TestV1::new() else {
            return;
        };
        for v in &v1.0 {
            assert_eq!(V1VmCgroup::at(&v.vm.dir).as_ref(), Some(v));
            assert!(vm_cgroups().contains(&v.vm));
        }
        let (mut child, child_id) = spawn(SLEEPER);
        // Entered on its behalf by name: the leaf takes the limits.
        let limits = [("memory", 64u64 << 20), ("pids", 7), ("cpu", 50)];
        for v in &v1.0 {
            let leaf = v.vm.leaf(&child_id);
            std::fs::create_dir(&leaf.dir).unwrap();
            for &(c, value) in limits.iter().filter(|(c, _)| v.has(c)) {
                for (file, val) in limit_writes(c, value) {
                    let path = leaf.dir.join(file);
                    if path.exists() {
                        write_file(&path, &val.to_string()).unwrap();
                    }
                }
            }
            write_file(&leaf.dir.join("cgroup.procs"), &child_id.pid.to_string()).unwrap();
            assert!(v.holds(&leaf, child_id.pid.as_raw()));
            assert_eq!(leaf.populated(), Some(true));
            // Busy while the process is in it.
            assert!(!v.remove_leaf(&child_id, Duration::ZERO));
        }
        let read = |v: &V1VmCgroup, file: &str| {
            std::fs::read_to_string(v.vm.leaf(&child_id).dir.join(file))
                .unwrap()
                .trim()
                .to_string()
        };
        for v in &v1.0 {
            if v.has("memory") {
                assert_eq!(read(v, "memory.limit_in_bytes"), (64u64 << 20).to_string());
                assert_eq!(v.oom_kills(&child_id), Some(0));
            }
            if v.has("pids") {
                assert_eq!(read(v, "pids.max"), "7");
            }
            if v.has("cpu") {
                assert_eq!(read(v, "cpu.shares"), "512");
            }
        }
        // Handed off: back in the VM's own cgroup, the leaf gone.
        let handed = v1.0.first().unwrap();
        assert!(handed.dissolve(&child_id));
        assert!(!handed.vm.leaf(&child_id).dir.exists());
        reap(std::slice::from_mut(&mut child));
        for v in &v1.0 {
            assert_eq!(gone_leaves(&v.vm).len(), usize::from(v != handed));
            assert!(remove_leaves(
                std::slice::from_ref(v),
                &[child_id],
                Duration::from_secs(1)
            ));
            assert!(v.remove_empty());
            assert!(!v.vm.dir.exists());
        }
    }
}
