#!/usr/bin/env bash
# The one command that runs every check and test: Rust format, lints and tests (proptest
# included), then the Elixir format check, a warnings-as-errors compile, Dialyzer and the
# ExUnit suite (the PropEr registry model and the package test included).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo test"
cargo test --workspace --quiet

echo "==> mix format --check-formatted"
mix format --check-formatted
echo "==> mix compile (warnings are errors)"
MIX_ENV=test mix compile --warnings-as-errors
bash scripts/dialyzer.sh _build/test/lib/dspex_process/ebin
echo "==> mix test (warnings are errors)"
MIX_ENV=test mix do compile --warnings-as-errors + test --warnings-as-errors "$@"
