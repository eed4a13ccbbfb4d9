//! The cleanup policy, in one place for the library (through the NIF) and the CLI: which
//! classified processes are targets, how the classes are counted, the health, and what a
//! cleanup report says. Classification itself is [`crate::classify`]; signalling is
//! [`crate::terminate`].

use crate::classify::Class;
use std::collections::HashSet;

/// The reason of a process found in the cgroup of a dead VM, whatever its argv.
pub const CGROUP_OWNER_DEAD: &str = "cgroup_owner_dead";
/// The reason given to an unmanaged process when the caller asks to end those too.
pub const UNMANAGED: &str = "unmanaged";

/// Which processes a cleanup acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Unmanaged processes (started by hand, parent alive) are targets too.
    pub include_unmanaged: bool,
    /// Only these reasons are acted on; `None` means every reason.
    pub reasons: Option<HashSet<String>>,
}

impl Selection {
    /// The reason a process of `class` is a target under this selection, if it is one.
    pub fn target_reason(&self, class: Class) -> Option<&'static str> {
        let reason = match class {
            Class::Orphan(reason) => reason.name(),
            Class::Unmanaged if self.include_unmanaged => UNMANAGED,
            _ => return None,
        };
        self.admits(reason).then_some(reason)
    }

    /// Whether `reason` is acted on (see [`Selection::reasons`]).
    pub fn admits(&self, reason: &str) -> bool {
        self.reasons.as_ref().map_or(true, |r| r.contains(reason))
    }
}

/// How many processes fell in each class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassCounts {
    pub active: usize,
    pub starting: usize,
    pub foreign: usize,
    pub unmanaged: usize,
    pub zombie: usize,
    pub orphan: usize,
}

impl ClassCounts {
    /// Counts classes by name (the names of [`Class::name`]); unknown names are ignored.
    pub fn of_names<'a>(names: impl IntoIterator<Item = &'a str>) -> ClassCounts {
        let mut c = ClassCounts::default();
        for name in names {
            match name {
                "active" => c.active += 1,
                "starting" => c.starting += 1,
                "foreign" => c.foreign += 1,
                "unmanaged" => c.unmanaged += 1,
                "zombie" => c.zombie += 1,
                "orphan" => c.orphan += 1,
                _ => {}
            }
        }
        c
    }

    pub fn of(classes: impl IntoIterator<Item = Class>) -> ClassCounts {
        ClassCounts::of_names(classes.into_iter().map(Class::name))
    }

    pub fn total(&self) -> usize {
        self.active + self.starting + self.foreign + self.unmanaged + self.zombie + self.orphan
    }

    /// The workers of live VMs that a cleanup preserves: this VM's own (active, starting)
    /// and those of other live VMs (foreign).
    pub fn live_vm_workers(&self) -> usize {
        self.active + self.starting + self.foreign
    }

    /// Every class with its count, in a fixed order.
    pub fn entries(&self) -> [(&'static str, usize); 6] {
        [
            ("active", self.active),
            ("starting", self.starting),
            ("foreign", self.foreign),
            ("unmanaged", self.unmanaged),
            ("zombie", self.zombie),
            ("orphan", self.orphan),
        ]
    }
}

/// The health of the host, from the share of orphans among the matching processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Good,
    Degraded,
    Critical,
}

impl Health {
    /// `Healthy` with no orphan, `Good` under 10 %, `Degraded` under 30 %, else `Critical`.
    pub fn of(orphans: usize, total: usize) -> Health {
        match orphans {
            0 => Health::Healthy,
            n if n * 10 < total => Health::Good,
            n if n * 10 < total * 3 => Health::Degraded,
            _ => Health::Critical,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Good => "good",
            Health::Degraded => "degraded",
            Health::Critical => "critical",
        }
    }
}

/// What became of one entry of a cleanup, as the report counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// Ended by this call (graceful or force-killed).
    Ended,
    /// Gone before this call's first signal reached it.
    AlreadyGone,
    /// Reported, not signalled (a dry run).
    DryRun,
    /// Refused, still alive, or a signal or read that failed.
    Failed,
}

/// The counts of a cleanup report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries acted on or refused: one per tally.
    pub found: usize,
    pub terminated: usize,
    pub errors: usize,
    pub already_gone: usize,
    /// Workers registered here with a live owner (the CLI has none).
    pub preserved_active: usize,
    /// Workers of live VMs: [`ClassCounts::live_vm_workers`].
    pub preserved_live_vm_workers: usize,
}

impl Report {
    pub fn of(tallies: &[Tally], counts: &ClassCounts) -> Report {
        let count = |t: Tally| tallies.iter().filter(|x| **x == t).count();
        Report {
            found: tallies.len(),
            terminated: count(Tally::Ended),
            errors: count(Tally::Failed),
            already_gone: count(Tally::AlreadyGone),
            preserved_active: counts.active,
            preserved_live_vm_workers: counts.live_vm_workers(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::OrphanReason;

    #[test]
    fn selection_picks_orphans_and_asked_for_unmanaged_within_the_reasons() {
        let all = Selection::default();
        assert_eq!(
            all.target_reason(Class::Orphan(OrphanReason::OwnerDead)),
            Some("owner_dead")
        );
        assert_eq!(all.target_reason(Class::Unmanaged), None);
        for protected in [
            Class::Active,
            Class::Starting,
            Class::Foreign,
            Class::Zombie,
        ] {
            assert_eq!(all.target_reason(protected), None);
        }
        let some = Selection {
            include_unmanaged: true,
            reasons: Some(HashSet::from(["unmanaged".to_string()])),
        };
        assert_eq!(some.target_reason(Class::Unmanaged), Some(UNMANAGED));
        assert_eq!(
            some.target_reason(Class::Orphan(OrphanReason::Reparented)),
            None
        );
        assert!(!some.admits(CGROUP_OWNER_DEAD));
        assert!(all.admits(CGROUP_OWNER_DEAD));
    }

    #[test]
    fn counts_health_and_report() {
        let counts = ClassCounts::of([
            Class::Active,
            Class::Foreign,
            Class::Foreign,
            Class::Zombie,
            Class::Orphan(OrphanReason::WorkerGone),
        ]);
        assert_eq!(counts.total(), 5);
        assert_eq!(counts.live_vm_workers(), 3);
        assert_eq!(Health::of(0, 5), Health::Healthy);
        assert_eq!(Health::of(1, 11), Health::Good);
        assert_eq!(Health::of(1, 5), Health::Degraded);
        assert_eq!(Health::of(2, 5), Health::Critical);
        use crate::terminate::Outcome;
        let tallies = [
            Tally::from(&Outcome::Graceful),
            Tally::from(&Outcome::ForceKilled),
            Tally::from(&Outcome::AlreadyGone),
            Tally::from(&Outcome::StillAlive),
            Tally::DryRun,
        ];
        assert_eq!(
            Report::of(&tallies, &counts),
            Report {
                found: 5,
                terminated: 2,
                errors: 1,
                already_gone: 1,
                preserved_active: 1,
                preserved_live_vm_workers: 3,
            }
        );
    }
}
