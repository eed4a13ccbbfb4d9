//! Rustler glue for `dspex_process`: decode terms, call the core, encode the answer.
//! No process logic lives here.

mod containment;
mod detection;
mod policy;
mod process_info;
mod registry;
mod termination;

use rustler::{Atom, Env};

/// A core error, encoded as its reason atom (`:no_such_process`, `:permission_denied`...):
/// returned as `Err`, it reaches Elixir as `{:error, reason}`.
pub(crate) struct CoreError(dspex_process::Error);

impl From<dspex_process::Error> for CoreError {
    fn from(e: dspex_process::Error) -> CoreError {
        CoreError(e)
    }
}

impl rustler::Encoder for CoreError {
    fn encode<'a>(&self, env: Env<'a>) -> rustler::Term<'a> {
        atom(env, self.0.reason()).encode(env)
    }
}

/// The atom for one of the core's static names (error reasons, classes, states).
pub(crate) fn atom(env: Env, name: &str) -> Atom {
    Atom::from_str(env, name).expect("names are short static ASCII")
}

rustler::init!("Elixir.DSPexProcess.Native");
