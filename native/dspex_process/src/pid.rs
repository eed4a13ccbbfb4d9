//! The bottom layer: the process id type, with nothing below it.

use crate::error::{Error, Result};
use std::fmt;
use std::num::NonZeroI32;

/// A process id, as a type of its own (nix's `Pid` is the model). [`Pid::new`], for
/// anything that may become a target, admits only ids greater than 1 (never "all
/// processes", never a process group by sign, never init); [`Pid::from_kernel`], for ids the
/// kernel reported (a parent, a `/proc` entry), admits 1 too.
///
/// Never zero, so that an `Option<Pid>` (and an optional identity in every registry
/// entry) takes no extra word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(NonZeroI32);

impl Pid {
    /// Validates a raw integer. Rejects 0, negatives (which `kill(2)` reads as groups or
    /// "everything"), 1 (init) and values past `i32::MAX`.
    pub fn new(raw: i64) -> Result<Pid> {
        i32::try_from(raw)
            .ok()
            .filter(|raw| *raw > 1)
            .and_then(NonZeroI32::new)
            .map(Pid)
            .ok_or(Error::InvalidPid(raw))
    }

    /// A pid the kernel reported (a ppid, a /proc entry): positive, possibly 1. Used for
    /// reading facts, never taken from user input.
    pub fn from_kernel(raw: i32) -> Option<Pid> {
        NonZeroI32::new(raw).filter(|_| raw > 0).map(Pid)
    }

    /// The pid as the kernel's type.
    pub fn as_raw(self) -> i32 {
        self.0.get()
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
