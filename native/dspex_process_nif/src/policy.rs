//! The core's cleanup policy for the Elixir side: class counts, health and report counts,
//! so that the library and the CLI count alike.

use dspex_process::policy::{ClassCounts, Health, Report, Tally};
use rustler::{Atom, Env, NifMap, Term};

mod atoms {
    rustler::atoms! { ok, graceful, force_killed, already_gone, dry_run }
}

#[derive(NifMap)]
struct Counts {
    active: usize,
    starting: usize,
    foreign: usize,
    unmanaged: usize,
    zombie: usize,
    orphan: usize,
}

#[derive(NifMap)]
struct Summary {
    counts: Counts,
    total: usize,
    health: Atom,
    found: usize,
    terminated: usize,
    errors: usize,
    already_gone: usize,
    preserved_active: usize,
    preserved_live_vm_workers: usize,
}

/// An outcome term of a cleanup report as the policy tallies it: `{:ok, :graceful |
/// :force_killed}` ended, `{:ok, :already_gone}`, `{:ok, :dry_run}`, anything else failed.
fn tally(outcome: Term) -> Tally {
    match outcome.decode::<(Atom, Atom)>() {
        Ok((ok, how)) if ok == atoms::ok() => {
            if how == atoms::graceful() || how == atoms::force_killed() {
                Tally::Ended
            } else if how == atoms::already_gone() {
                Tally::AlreadyGone
            } else if how == atoms::dry_run() {
                Tally::DryRun
            } else {
                Tally::Failed
            }
        }
        _ => Tally::Failed,
    }
}

/// The counts of `classes` (one atom per classified process), the health given `orphans`
/// targets among them, and the report counts of `outcomes` (one per entry acted on).
#[rustler::nif]
fn policy_summary<'a>(
    env: Env<'a>,
    classes: Vec<Atom>,
    orphans: usize,
    outcomes: Vec<Term<'a>>,
) -> Summary {
    let names: Vec<String> = classes
        .iter()
        .filter_map(|a| a.to_term(env).atom_to_string().ok())
        .collect();
    let counts = ClassCounts::of_names(names.iter().map(String::as_str));
    let tallies: Vec<Tally> = outcomes.into_iter().map(tally).collect();
    let report = Report::of(&tallies, &counts);
    Summary {
        counts: Counts {
            active: counts.active,
            starting: counts.starting,
            foreign: counts.foreign,
            unmanaged: counts.unmanaged,
            zombie: counts.zombie,
            orphan: counts.orphan,
        },
        total: counts.total(),
        health: crate::atom(env, Health::of(orphans, counts.total()).name()),
        found: report.found,
        terminated: report.terminated,
        errors: report.errors,
        already_gone: report.already_gone,
        preserved_active: report.preserved_active,
        preserved_live_vm_workers: report.preserved_live_vm_workers,
    }
}
