//! Rustler glue for `dspex_process`: decode terms, call the core, encode the answer.
//! No process logic lives here.

mod containment;
mod detection;
mod policy;
mod registry;

use rustler::{Atom, Env};

/// The atom for one of the core's static names (error reasons, classes, states).
pub(crate) fn atom(env: Env, name: &str) -> Atom {
    Atom::from_str(env, name).expect("names are short static ASCII")
}

rustler::init!("Elixir.DSPexProcess.Native");
