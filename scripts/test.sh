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

echo "==> no cgroup left behind"
# Every per-VM cgroup (dspex-NS-PID-START, cgroup2 and cgroup v1) of a VM started during this run (the test VM,
# its peers) must be gone once that VM is: the guard removes the test VM's own after it
# exits. A VM that still runs (another suite on a shared machine) is not judged. The guard
# may wait its turn behind other terminations on the host, hence the generous wait.
started=$(awk '{print $22}' /proc/$$/stat)
# The cgroup2 mount and, on a hybrid host, the cgroup v1 mounts (where the limits' per-VM
# cgroups are, named the same way).
mounts=$(awk '$0 ~ / - cgroup2? / {print $5}' /proc/self/mountinfo)
vm_alive() { # pid start
  local stat rest
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  rest=${stat##*) }
  set -- "$2" $rest
  [ "${21}" = "$1" ] && [ "$2" != "Z" ]
}
if [ -n "$mounts" ]; then
  for _ in $(seq 300); do
    left=""
    while IFS= read -r dir; do
      name=${dir##*/dspex-}
      start=${name##*-}
      pid=${name%-*}
      pid=${pid##*-}
      if [ "$start" -ge "$started" ] && ! vm_alive "$pid" "$start"; then left="$left $dir"; fi
    # shellcheck disable=SC2086
    done < <(find $mounts -maxdepth 8 -type d -regex '.*/dspex-[0-9]+-[0-9]+-[0-9]+' 2>/dev/null)
    [ -z "$left" ] && break
    sleep 0.1
  done
  if [ -n "$left" ]; then
    echo "cgroups left behind:$left" >&2
    exit 1
  fi
fi
echo "none"
