#!/usr/bin/env bash
# Dialyzer over the application's compiled modules; any warning fails.
#
# The PLT (erts, kernel, stdlib, elixir, logger, mix, ex_unit) is built once per OTP and
# Elixir version and cached under _build/dialyzer/ (about 75 s to build; CI keeps _build).
# Usage: scripts/dialyzer.sh [ebin]   (default: the test build, which scripts/test.sh compiles)
set -euo pipefail
cd "$(dirname "$0")/.."

command -v dialyzer >/dev/null || { echo "dialyzer is missing (Debian: apt-get install erlang-dialyzer)" >&2; exit 1; }

ebin="${1:-_build/test/lib/dspex_process/ebin}"
[[ -d "$ebin" ]] || { echo "$ebin does not exist: compile first (MIX_ENV=test mix compile)" >&2; exit 1; }

# Dialyzer finds the `elixir`, `logger`, `mix` and `ex_unit` applications through ERL_LIBS.
elixir_lib="$(elixir -e 'IO.write(:code.lib_dir(:elixir) |> Path.dirname())')"
export ERL_LIBS="$elixir_lib"

versions="$(elixir -e 'IO.write("otp#{:erlang.system_info(:otp_release)}-erts#{:erlang.system_info(:version)}-elixir#{System.version()}")')"
plt_dir="_build/dialyzer"
plt="$plt_dir/$versions.plt"
apps=(erts kernel stdlib elixir logger mix ex_unit)

if [[ ! -f "$plt" ]]; then
  echo "==> building the Dialyzer PLT ($versions: ${apps[*]}); cached in $plt"
  mkdir -p "$plt_dir"
  # Built under a temporary name and renamed: an interrupted build never leaves a bad cache.
  # Its output (OTP's and Elixir's own unknown functions) goes to a log.
  status=0
  started=$SECONDS
  dialyzer --build_plt --apps "${apps[@]}" --output_plt "$plt.tmp" >"$plt_dir/build.log" 2>&1 || status=$?
  # Exit status 2 only means those libraries have warnings of their own.
  if [[ $status -ne 0 && $status -ne 2 ]]; then
    cat "$plt_dir/build.log" >&2
    rm -f "$plt.tmp"
    exit "$status"
  fi
  mv "$plt.tmp" "$plt"
  echo "    built in $((SECONDS - started)) s"
fi

# The PLT is keyed by the OTP, ERTS and Elixir versions, so it is never stale: skip the check.
# Default warnings (unknown functions included); exit status 2 means warnings.
echo "==> dialyzer $ebin (any warning fails)"
dialyzer --plt "$plt" --no_check_plt --fullpath "$ebin"
