defmodule DSPexProcess.PolicyAgreementTest do
  # One cleanup policy lives in the Rust core; the CLI and the library both call it. On one
  # scenario (a killed VM's orphans, a live VM's workers), their reports agree field by field.
  use ExUnit.Case, async: false

  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.OrphanDetector
  alias DSPexProcess.Test.PeerBeam

  @moduletag timeout: 120_000
  @moduletag :capture_log

  setup do
    setup_bridge("policy")
  end

  test "dspex-proc and OrphanDetector report the same counts, health and dry-run report",
       %{script: script, pattern: pattern} do
    orphans = orphans_of_a_dead_beam(script, 3)
    live = PeerBeam.start(script, 2)
    live_ids = identities(live.worker_pids)
    cli = DSPexProcess.Worker.guard_executable()

    {status_json, 1} = System.cmd(cli, ["status", "--json", "--pattern", pattern])
    {cleanup_json, 0} = System.cmd(cli, ["cleanup", "--json", "--dry-run", "--pattern", pattern])

    status = OrphanDetector.get_system_status(pattern: pattern)
    report = OrphanDetector.cleanup_orphaned_processes(pattern: pattern, dry_run: true)

    # The scenario is what it should be...
    assert status.orphaned_processes == 3
    assert status.foreign == 2
    # ...and both sides see it alike, field by field.
    for {cli_field, value} <- [
          {"d['total_dspy_processes']", status.total_dspy_processes},
          {"d['orphaned_processes']", status.orphaned_processes},
          {"d['system_health']", status.system_health}
        ] do
      assert json(status_json, cli_field) == to_string(value), cli_field
    end

    for class <- [:active, :starting, :foreign, :unmanaged, :zombie, :orphan] do
      assert json(status_json, "d['classes']['#{class}']") ==
               to_string(Map.fetch!(status, class)),
             "class #{class}"
    end

    for field <- [:found, :terminated, :errors, :already_gone, :preserved_active] do
      assert json(cleanup_json, "d['#{field}']") == to_string(Map.fetch!(report, field)),
             "report field #{field}"
    end

    assert json(cleanup_json, "d['preserved_live_vm_workers']") ==
             to_string(
               report.protected.active + report.protected.starting + report.protected.foreign
             )

    assert json(cleanup_json, "sorted(x['pid'] for x in d['details'])") ==
             inspect(report.details |> Enum.map(fn {o, _} -> o.pid end) |> Enum.sort())

    # Dry runs signalled nothing; now the CLI ends them, and the live VM's workers stay.
    assert all_alive?(orphans)
    {_, 0} = System.cmd(cli, ["cleanup", "--yes", "--pattern", pattern])
    assert all_gone?(orphans)
    assert all_alive?(live_ids)
    PeerBeam.stop(live)
  end
end
