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

/// Registers `$name` (a `fn(Env, [Term; $arity]) -> NifResult<Term>`, which decodes its
/// own arguments; `Err(BadArg)` raises `ArgumentError`) as a NIF, as `#[rustler::nif]`
/// does but without collecting the arguments into a `Vec`: one allocation less on calls
/// that take a few hundred ns in all (the registry's single-entry calls). A panic raises
/// as with rustler. Normal scheduler only (no `schedule` option). It uses rustler's
/// `codegen_runtime`, which is why rustler is pinned to an exact version.
#[macro_export]
macro_rules! lean_nif {
    ($name:ident, $arity:literal) => {
        rustler::codegen_runtime::inventory::submit!(rustler::Nif {
            name: concat!(stringify!($name), "\0").as_ptr()
                as *const rustler::codegen_runtime::c_char,
            arity: $arity,
            flags: 0,
            raw_func: {
                unsafe extern "C" fn raw(
                    env: *mut rustler::sys::ErlNifEnv,
                    argc: rustler::codegen_runtime::c_int,
                    argv: *const rustler::sys::ErlNifTerm,
                ) -> rustler::sys::ErlNifTerm {
                    let lifetime = ();
                    // SAFETY: the VM calls this with its env and `argc` valid terms.
                    let env = unsafe { rustler::Env::new(&lifetime, env) };
                    // The VM passes the arity the NIF was registered with.
                    debug_assert_eq!(argc as usize, $arity);
                    let args: [rustler::Term; $arity] =
                        std::array::from_fn(|i| unsafe { rustler::Term::new(env, *argv.add(i)) });
                    let result = std::panic::catch_unwind(move || $name(env, args));
                    // SAFETY: as in rustler's own NIF wrapper.
                    unsafe { rustler::codegen_runtime::handle_nif_result(result, env).apply(env) }
                }
                raw
            },
        });
    };
}

rustler::init!("Elixir.DSPexProcess.Native");
