#!/usr/bin/env bash
# kill_python.sh - end orphaned DSPex Python workers without touching active ones.
#
# Intelligent mode (default when the dspex-proc CLI is found): marker-based cleanup, so the
# workers of every live BEAM are protected and only orphans are ended.
# Node mode (--node NAME): asks that live node's OrphanDetector over distributed Erlang.
# Manual mode (no CLI, or --manual): lists every matching process, warns that it cannot
# tell active from orphaned, and asks before ending them all.
#
# Confirmation, the same rule as dspex-proc cleanup and mix dspex.orphans cleanup: every
# mode asks before it signals when it runs on a terminal; with no terminal it refuses
# (exit 3) unless --yes; --dry-run signals nothing and asks nothing.
#
# Exit codes: 0 done (or nothing to do), 1 some processes could not be ended, 2 bad
# arguments, 3 not confirmed, 4 the node could not be reached.

set -euo pipefail

PATTERN="dspy_bridge.py"
GRACE_MS=1000
DRY_RUN=0
YES=0
MANUAL=0
NODE=""
COOKIE=""
CLI="${DSPEX_PROC:-}"
SELF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'EOF'
Usage: kill_python.sh [options]

  --pattern P     literal pattern: the script an interpreter runs, or the program (its
                  path or basename); default dspy_bridge.py
  --grace MS      milliseconds between SIGTERM and SIGKILL (default 1000)
  --dry-run       show what would be ended; signal nothing
  --yes, -y       do not ask (without a terminal, every mode refuses unless given)
  --node NAME     ask this live node's OrphanDetector (distributed Erlang)
  --cookie C      the node's cookie (with --node); it stays in this script's own
                  command line, so prefer --cookie-file
  --cookie-file F read the node's cookie from file F (with --node)
  --manual        manual mode even when dspex-proc is available
  --cli PATH      the dspex-proc executable to use (also: $DSPEX_PROC)
  --help, -h      this text

Exit codes: 0 done, 1 some processes could not be ended, 2 bad arguments,
3 not confirmed, 4 the node could not be reached.
EOF
}

die_usage() {
  printf 'kill_python.sh: %s\n\n' "$1" >&2
  usage >&2
  exit 2
}

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --pattern) need_value "$@"; PATTERN="$2"; shift 2 ;;
    --grace) need_value "$@"; GRACE_MS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --yes|-y) YES=1; shift ;;
    --node) need_value "$@"; NODE="$2"; shift 2 ;;
    --cookie) need_value "$@"; COOKIE="$2"; shift 2 ;;
    --cookie-file)
      need_value "$@"
      [[ -r "$2" ]] || die_usage "cannot read the cookie file $2"
      COOKIE="$(<"$2")"
      [[ -n "$COOKIE" ]] || die_usage "the cookie file $2 is empty"
      shift 2 ;;
    --manual) MANUAL=1; shift ;;
    --cli) need_value "$@"; CLI="$2"; shift 2 ;;
    --help|-h) usage; exit 0 ;;
    *) die_usage "unknown argument: $1" ;;
  esac
done

[[ "$GRACE_MS" =~ ^[0-9]+$ ]] || die_usage "--grace must be a number of milliseconds"
[[ "$PATTERN" != *$'\n'* ]] || die_usage "--pattern must be one line"
[[ -z "$COOKIE" || -n "$NODE" ]] || die_usage "--cookie goes with --node"

# The one confirmation rule (see the top of this file). $1: what will be ended.
confirm() {
  [[ $YES -eq 1 || $DRY_RUN -eq 1 ]] && return 0
  if [[ ! -t 0 ]]; then
    echo "Refusing without --yes: no terminal to ask." >&2
    exit 3
  fi
  read -r -p "$1 Continue? (y/N): " answer
  if [[ "$answer" != "y" && "$answer" != "Y" ]]; then
    echo "Aborted."
    exit 3
  fi
}

# The closing line: a dry run never claims a cleanup.
finished() {
  if [[ $1 -ne 0 ]]; then return; fi
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "✅ Dry run complete: nothing was signalled"
  else
    echo "✅ Intelligent cleanup completed successfully"
  fi
}

# --- node mode -------------------------------------------------------------------------
if [[ -n "$NODE" ]]; then
  echo "Detecting orphaned Python processes..."
  command -v erl >/dev/null 2>&1 || { echo "erl is not installed: cannot reach $NODE" >&2; exit 4; }
  echo "🔧 Asking node $NODE for an intelligent cleanup..."
  name_flag="-sname"
  if [[ "$NODE" == *@*.* ]]; then name_flag="-name"; fi
  # The cookie never goes on erl's command line, which every user can read in
  # /proc/PID/cmdline. erl reads it from $HOME/.erlang.cookie: for this run, HOME is a
  # private folder (mode 0700, removed on exit) holding that file (mode 0400), written by
  # a shell builtin (no process of its own). Without a cookie, erl uses the caller's.
  erl_home="${HOME:-}"
  if [[ -n "$COOKIE" ]]; then
    erl_home="$(mktemp -d "${TMPDIR:-/tmp}/kill_python_cookie.XXXXXX")"
    trap 'rm -rf "$erl_home"' EXIT
    (umask 077 && printf '%s' "$COOKIE" >"$erl_home/.erlang.cookie")
    chmod 400 "$erl_home/.erlang.cookie"
  fi
  dry=false
  if [[ $DRY_RUN -eq 1 ]]; then dry=true; fi
  confirm "Node $NODE will end the orphans it finds (its own workers are protected)."
  # Values reach the Erlang code through the environment, never through string splicing.
  # erl prints one plain line; the text around it is printed here, in UTF-8.
  set +e
  result="$(HOME="$erl_home" KP_NODE="$NODE" KP_PATTERN="$PATTERN" KP_GRACE="$GRACE_MS" KP_DRY="$dry" \
    erl -noshell -hidden "$name_flag" "kill_python_$$" -eval '
      Node = list_to_atom(os:getenv("KP_NODE")),
      Opts = [{pattern, unicode:characters_to_binary(os:getenv("KP_PATTERN"))},
              {grace_ms, list_to_integer(os:getenv("KP_GRACE"))},
              {dry_run, os:getenv("KP_DRY") =:= "true"}],
      case rpc:call(Node, '"'"'Elixir.DSPex.Python.OrphanDetector'"'"',
                    cleanup_orphaned_processes, [Opts], 60000) of
        #{found := F, terminated := T, errors := E, preserved_active := P} ->
          io:format("RESULT ~b ~b ~b ~b~n", [F, T, E, P]),
          halt(0);
        Other ->
          io:format(standard_error, "node ~s did not answer: ~p~n", [Node, Other]),
          halt(4)
      end.')"
  status=$?
  set -e
  if [[ $status -ne 0 ]]; then exit "$status"; fi
  read -r _ found terminated errors preserved <<<"$result"
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "🧹 Cleanup complete (dry run, nothing signalled):"
  else
    echo "🧹 Cleanup complete:"
  fi
  echo "  - Found: $found orphaned processes"
  echo "  - Terminated: $terminated processes"
  echo "  - Errors: $errors"
  echo "  - Preserved: $preserved active workers"
  status=0
  if [[ $errors -ne 0 ]]; then status=1; fi
  finished "$status"
  exit "$status"
fi

# --- intelligent mode ------------------------------------------------------------------
find_cli() {
  if [[ -n "$CLI" ]]; then
    [[ -x "$CLI" ]] && { echo "$CLI"; return 0; }
    return 1
  fi
  local candidate
  # The library's own build, then the project in the current folder (a consumer that has
  # dspex_process as a dependency builds the CLI into its own _build), then a cargo build.
  for candidate in "$SELF_DIR"/priv/bin/dspex-proc \
    "$SELF_DIR"/_build/*/lib/dspex_process/priv/bin/dspex-proc \
    "$PWD"/_build/*/lib/dspex_process/priv/bin/dspex-proc \
    "$SELF_DIR"/target/release/dspex-proc; do
    [[ -x "$candidate" ]] && { echo "$candidate"; return 0; }
  done
  command -v dspex-proc 2>/dev/null
}

if [[ $MANUAL -eq 0 ]] && cli_path="$(find_cli)"; then
  echo "🔧 dspex-proc found, using intelligent (marker-based) cleanup..."
  args=(cleanup --pattern "$PATTERN" --grace "$GRACE_MS")
  # dspex-proc applies the same confirmation rule itself, on this terminal.
  if [[ $YES -eq 1 ]]; then args+=(--yes); fi
  if [[ $DRY_RUN -eq 1 ]]; then args+=(--dry-run); fi
  set +e
  "$cli_path" "${args[@]}"
  status=$?
  set -e
  finished "$status"
  exit "$status"
fi

# --- manual mode -----------------------------------------------------------------------
echo "Detecting orphaned Python processes..."
if [[ $MANUAL -eq 1 ]]; then
  echo "🔧 Manual cleanup mode (requested with --manual)"
else
  echo "🔧 Manual cleanup mode (dspex-proc not found: build it with mix compile, or pass --cli PATH)"
fi

# Manual mode runs where dspex-proc does not: this is a separate, minimal reading of
# /proc/PID/stat (the library's parser is in the Rust core), kept to the three fields this
# mode needs. Field N (counted from 1 like proc(5)), counted past the command name.
stat_field() {
  local stat rest
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  rest="${stat##*) }"
  # rest starts at field 3
  local -a fields
  read -r -a fields <<<"$rest"
  echo "${fields[$(($2 - 3))]}"
}

self_pgid="$(stat_field $$ 5)"

# Same rule as dspex-proc for a process without ownership markers: the pattern must be the
# program (argv[0]) or the script its interpreter (python*, pypy*, a POSIX shell) runs,
# the first operand after the interpreter's options. A process that merely names the
# pattern (tail -f, an editor, a cleaner's --pattern) is not a worker, and the library's
# own tools (dspex-proc, kill_python.sh) never are.
is_pattern() { [[ "$1" == "$PATTERN" || "${1##*/}" == "$PATTERN" ]]; }
is_own_tool() { [[ "${1##*/}" == "dspex-proc" || "${1##*/}" == "kill_python.sh" ]]; }

script_of() {
  local prog="${1##*/}" i=1 arg
  shift
  local -a args=("$@")
  case "$prog" in
    python|python[0-9]*|pypy|pypy[0-9]*)
      while (( i <= ${#args[@]} )); do
        arg="${args[$((i - 1))]}"
        case "$arg" in
          --) echo "${args[$i]:-}"; return 0 ;;
          -) return 1 ;;
          --check-hash-based-pycs) i=$((i + 2)) ;;
          --*) i=$((i + 1)) ;;
          -*[cm]*) return 1 ;;
          -*[WX]) i=$((i + 2)) ;;
          -*) i=$((i + 1)) ;;
          *) echo "$arg"; return 0 ;;
        esac
      done ;;
    sh|bash|dash|zsh|ksh|mksh|ash)
      while (( i <= ${#args[@]} )); do
        arg="${args[$((i - 1))]}"
        case "$arg" in
          --|-) echo "${args[$i]:-}"; return 0 ;;
          --rcfile|--init-file) i=$((i + 2)) ;;
          --*) i=$((i + 1)) ;;
          [-+]*c*) return 1 ;;
          [-+]*[oO]*) i=$((i + 2)) ;;
          [-+]*) i=$((i + 1)) ;;
          *) echo "$arg"; return 0 ;;
        esac
      done ;;
  esac
  return 1
}

matches_pattern() {
  local script
  local -a argv=()
  mapfile -d '' -t argv <"/proc/$1/cmdline" 2>/dev/null || return 1
  [[ ${#argv[@]} -gt 0 ]] || return 1
  is_own_tool "${argv[0]}" && return 1
  script="$(script_of "${argv[@]}")" || script=""
  [[ -n "$script" ]] && is_own_tool "$script" && return 1
  is_pattern "${argv[0]}" || { [[ -n "$script" ]] && is_pattern "$script"; }
}

pids=()
starts=()
for dir in /proc/[0-9]*; do
  pid="${dir#/proc/}"
  # Never this script, its parent, or anything in its own process group (its subshells).
  [[ "$pid" -le 1 || "$pid" == "$$" || "$pid" == "$PPID" ]] && continue
  pgid="$(stat_field "$pid" 5)" || continue
  [[ "$pgid" == "$self_pgid" ]] && continue
  state="$(stat_field "$pid" 3)" || continue
  [[ "$state" == "Z" || "$state" == "X" ]] && continue
  # The start time is read before the argv and checked again after it: the argv read was
  # of that very process, not of one that took its pid meanwhile.
  start="$(stat_field "$pid" 22)" || continue
  matches_pattern "$pid" || continue
  [[ "$(stat_field "$pid" 22)" == "$start" ]] || continue
  pids+=("$pid")
  starts+=("$start")
done

if [[ ${#pids[@]} -eq 0 ]]; then
  echo "No $PATTERN processes found."
  exit 0
fi

echo "🎯 Found $PATTERN processes: ${pids[*]}"
echo "⚠️  WARNING: Cannot distinguish active workers from orphaned processes"
echo "   This will end ALL ${#pids[@]} $PATTERN processes"

if [[ $DRY_RUN -eq 1 ]]; then
  echo "Dry run: nothing was signalled."
  exit 0
fi

confirm "ALL ${#pids[@]} processes will be ended."

# Signal only if the pid still has the start time we recorded: never a recycled pid.
signal_if_same() {
  local pid="$1" start="$2" sig="$3" now
  now="$(stat_field "$pid" 22)" || return 1
  [[ "$now" == "$start" ]] || return 1
  kill "-$sig" "$pid" 2>/dev/null
}

alive_same() {
  local now state
  now="$(stat_field "$1" 22)" || return 1
  state="$(stat_field "$1" 3)" || return 1
  [[ "$now" == "$2" && "$state" != "Z" && "$state" != "X" ]]
}

for i in "${!pids[@]}"; do
  signal_if_same "${pids[$i]}" "${starts[$i]}" TERM || true
done

deadline=$(( $(date +%s%3N) + GRACE_MS ))
while (( $(date +%s%3N) < deadline )); do
  left=0
  for i in "${!pids[@]}"; do
    if alive_same "${pids[$i]}" "${starts[$i]}"; then left=1; break; fi
  done
  [[ $left -eq 0 ]] && break
  sleep 0.05
done

terminated=0
errors=0
for i in "${!pids[@]}"; do
  if alive_same "${pids[$i]}" "${starts[$i]}"; then
    signal_if_same "${pids[$i]}" "${starts[$i]}" KILL || true
  fi
done
sleep 0.2
for i in "${!pids[@]}"; do
  if alive_same "${pids[$i]}" "${starts[$i]}"; then
    errors=$((errors + 1))
  else
    terminated=$((terminated + 1))
  fi
done

echo "🧹 Cleanup complete:"
echo "  - Found: ${#pids[@]} processes"
echo "  - Terminated: $terminated processes"
echo "  - Errors: $errors"
[[ $errors -eq 0 ]]
