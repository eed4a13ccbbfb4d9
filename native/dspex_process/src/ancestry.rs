//! The one walk up the parent links, for classification and for the caller's own family.
//! Below it: `/proc` facts; above it: scan, classify, terminate.

use crate::proc_facts::Stat;
use crate::sys::pid_exists;
use std::collections::HashMap;

/// How far up the parents a walk goes: deeper chains are treated as unknown above.
pub const MAX_ANCESTRY: usize = 64;

/// The little that classification needs to know about an ancestor or an owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub ppid: i32,
    pub start_time: u64,
    pub comm: String,
    /// It has exited (zombie or dead, no thread left): a zombie keeps its name and start
    /// time until it is reaped, but it owns nothing any more.
    pub exited: bool,
}

/// What a lookup of one pid found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Found(ProcInfo),
    /// No process has this pid (the kernel says so: ESRCH).
    Gone,
    /// The process exists but cannot be read (`hidepid`, EACCES, out of descriptors):
    /// nothing about it is known, so nothing may be concluded from it.
    Hidden,
}

/// Looks processes up by pid (from `/proc` in production, from a table in unit tests).
pub trait ProcessLookup {
    fn get(&mut self, pid: i32) -> Seen;
}

/// How far the walk up the parents went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Up to PID 1 (or a process without a parent).
    Complete,
    /// An ancestor exited this instant: the chain is cut by a race, not by a wall.
    Broken,
    /// An ancestor exists but cannot be read, or the chain is longer than we follow: what
    /// lies above is unknown (it may be a live VM).
    Hidden,
}

/// `(pid, info)` from the parent up to (and including) PID 1, and how far the walk got.
/// PID 1 ends the walk even when it cannot be read: it is init, whatever else it is.
pub fn ancestors(ppid: i32, lookup: &mut impl ProcessLookup) -> (Vec<(i32, ProcInfo)>, Walk) {
    let mut chain = Vec::new();
    let mut next = ppid;
    while next > 0 {
        if chain.len() >= MAX_ANCESTRY {
            return (chain, Walk::Hidden);
        }
        let info = match lookup.get(next) {
            Seen::Found(info) => info,
            Seen::Hidden if next == 1 => break,
            Seen::Hidden => return (chain, Walk::Hidden),
            Seen::Gone => return (chain, Walk::Broken),
        };
        let parent = info.ppid;
        chain.push((next, info));
        if next == 1 {
            break;
        }
        next = parent;
    }
    (chain, Walk::Complete)
}

/// Reads ancestors from `/proc`, remembering what it read during one classification pass.
#[derive(Default)]
pub struct ProcLookup {
    cache: HashMap<i32, Seen>,
}

impl ProcessLookup for ProcLookup {
    fn get(&mut self, pid: i32) -> Seen {
        self.cache
            .entry(pid)
            .or_insert_with(|| read_proc_info(pid))
            .clone()
    }
}

fn read_proc_info(pid: i32) -> Seen {
    match Stat::read(pid) {
        Ok(stat) => Seen::Found(ProcInfo {
            ppid: stat.ppid,
            start_time: stat.start_time,
            exited: stat.has_exited(),
            comm: stat.comm,
        }),
        // With hidepid, another user's /proc/PID does not exist for us: only the kernel's
        // ESRCH says the process is gone.
        Err(crate::error::Error::NoSuchProcess(_)) if !pid_exists(pid) => Seen::Gone,
        Err(_) => Seen::Hidden,
    }
}

/// The calling process and every ancestor up to (not including) PID 1: what a cleaner must
/// never signal. An ancestor that cannot be read ends the chain.
pub fn caller_and_ancestors() -> Vec<i32> {
    let me = std::process::id() as i32;
    let (chain, _) = ancestors(nix::unistd::getppid().as_raw(), &mut ProcLookup::default());
    std::iter::once(me)
        .chain(chain.into_iter().map(|(pid, _)| pid).filter(|pid| *pid > 1))
        .collect()
}
