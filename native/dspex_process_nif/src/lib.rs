//! Rustler glue for `dspex_process`: decode terms, call the core, encode the answer.
//! No process logic lives here.

mod registry;

rustler::init!("Elixir.DSPex.Python.Native");
