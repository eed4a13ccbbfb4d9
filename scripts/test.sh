#!/usr/bin/env bash
# The one command that runs every check and test: Rust format, lints and tests, then the
# Elixir format check, a warnings-as-errors compile and the ExUnit suite.
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
echo "==> mix test (warnings are errors)"
MIX_ENV=test mix do compile --warnings-as-errors + test --warnings-as-errors "$@"
