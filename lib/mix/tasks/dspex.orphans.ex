defmodule Mix.Tasks.Dspex.Orphans do
  @shortdoc "Shows, finds or ends orphaned DSPex Python workers"

  @moduledoc """
  Runs `DSPex.Python.OrphanDetector` from inside a project.

      mix dspex.orphans [status|find|cleanup] [options]

  The command defaults to `status`. Options:

    * `--pattern P` - literal argv pattern; repeatable (default `dspy_bridge.py`)
    * `--grace MS` - SIGTERM to SIGKILL, for `cleanup` (default 1000)
    * `--kill-wait MS` - wait after SIGKILL (default 1000)
    * `--min-age MS` - this VM's own unregistered processes younger than this are spared
    * `--include-unmanaged` - also end processes started by hand
    * `--dry-run` - report what `cleanup` would do, signal nothing
    * `--yes` - do not ask before `cleanup` signals

  Confirmation follows the rule of every destructive tool of the library (`dspex-proc
  cleanup`, `kill_python.sh`): `cleanup` asks before it signals when it runs on a terminal;
  with no terminal it refuses (exit status 3) unless `--yes`; `--dry-run` asks nothing.

  The task runs in a fresh VM whose registry is empty, which is safe: ownership is read
  from the markers each worker carries, so the workers of your running application (another
  live BEAM) are `foreign` and protected, and only orphans of dead BEAMs are ended.

  Exits with status 1 when `status`/`find` see orphans or `cleanup` had errors.
  """

  use Mix.Task

  alias DSPex.Python.OrphanDetector

  @switches [
    pattern: :keep,
    grace: :integer,
    kill_wait: :integer,
    min_age: :integer,
    include_unmanaged: :boolean,
    dry_run: :boolean,
    yes: :boolean
  ]

  @impl true
  def run(argv) do
    {parsed, args, invalid} = OptionParser.parse(argv, strict: @switches)

    if invalid != [] do
      Mix.raise(
        "mix dspex.orphans: invalid option(s) #{inspect(invalid)}. See `mix help dspex.orphans`."
      )
    end

    command =
      case args do
        [] ->
          "status"

        [c] when c in ["status", "find", "cleanup"] ->
          c

        other ->
          Mix.raise(
            "mix dspex.orphans: unknown command #{inspect(other)}; use status, find or cleanup"
          )
      end

    Mix.Task.run("app.start")
    opts = detector_options(parsed)

    case command do
      "status" -> status(opts)
      "find" -> find(opts)
      "cleanup" -> cleanup(opts, parsed[:yes] == true)
    end
  end

  defp detector_options(parsed) do
    patterns = for {:pattern, p} <- parsed, do: p

    [
      pattern: if(patterns == [], do: nil, else: patterns),
      grace_ms: parsed[:grace],
      kill_wait_ms: parsed[:kill_wait],
      min_age_ms: parsed[:min_age],
      include_unmanaged: parsed[:include_unmanaged],
      dry_run: parsed[:dry_run]
    ]
    |> Enum.reject(fn {_, v} -> is_nil(v) end)
    |> DSPexProcess.Options.detector!()
    |> Keyword.take([
      :pattern,
      :grace_ms,
      :kill_wait_ms,
      :min_age_ms,
      :include_unmanaged,
      :dry_run
    ])
  rescue
    e in ArgumentError -> Mix.raise("mix dspex.orphans: #{Exception.message(e)}")
  end

  defp status(opts) do
    s = OrphanDetector.get_system_status(Keyword.drop(opts, [:grace_ms, :kill_wait_ms, :dry_run]))
    Mix.shell().info("DSPex process status")
    Mix.shell().info("  Matching processes: #{s.total_dspy_processes}")
    Mix.shell().info("  Orphans:            #{s.orphaned_processes}")

    Mix.shell().info(
      "  Protected:          active #{s.active}, starting #{s.starting}, foreign #{s.foreign}, " <>
        "unmanaged #{s.unmanaged}, zombie #{s.zombie}"
    )

    Mix.shell().info("  Health:             #{s.system_health}")
    fail_if(s.orphaned_processes > 0)
  end

  defp find(opts) do
    orphans =
      OrphanDetector.find_orphaned_processes(
        Keyword.drop(opts, [:grace_ms, :kill_wait_ms, :dry_run])
      )

    if orphans == [] do
      Mix.shell().info("No orphaned processes.")
    else
      for o <- orphans do
        owner = if o.owner, do: o.owner.pid, else: "-"
        Mix.shell().info("#{o.pid}\t#{o.reason}\towner #{owner}\t#{o.cmdline}")
      end
    end

    fail_if(orphans != [])
  end

  defp cleanup(opts, yes?) do
    confirm!(opts, yes?)
    r = OrphanDetector.cleanup_orphaned_processes(opts)

    for {orphan, outcome} <- r.details do
      Mix.shell().info("  pid #{inspect(Map.get(orphan, :pid))}: #{inspect(outcome)}")
    end

    Mix.shell().info("Cleanup complete#{if r.dry_run, do: " (dry run, nothing signalled)"}:")
    Mix.shell().info("  - Found: #{r.found} orphaned processes")
    Mix.shell().info("  - Terminated: #{r.terminated} processes")
    Mix.shell().info("  - Errors: #{r.errors}")
    p = r.protected
    # This VM's registry is empty: the application's workers are those of another live VM.
    Mix.shell().info("  - Preserved: #{p.active + p.starting + p.foreign} workers of live VMs")
    fail_if(r.errors > 0)
  end

  defp confirm!(opts, yes?) do
    unless yes? or opts[:dry_run] do
      count =
        length(
          OrphanDetector.find_orphaned_processes(
            Keyword.drop(opts, [:grace_ms, :kill_wait_ms, :dry_run])
          )
        )

      cond do
        count == 0 ->
          :ok

        not terminal?() ->
          Mix.shell().error("Refusing without --yes: no terminal to ask.")
          exit({:shutdown, 3})

        not Mix.shell().yes?("#{count} orphaned process(es) will be ended. Continue?") ->
          Mix.shell().info("Aborted.")
          exit({:shutdown, 3})

        true ->
          :ok
      end
    end
  end

  defp terminal? do
    case :io.getopts(:standard_io) do
      opts when is_list(opts) -> Keyword.get(opts, :terminal, false) == true
      _ -> false
    end
  end

  defp fail_if(true), do: exit({:shutdown, 1})
  defp fail_if(false), do: :ok
end
