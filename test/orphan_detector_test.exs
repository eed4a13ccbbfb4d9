defmodule DSPexProcess.OrphanDetectorTest do
  # Not async: these tests start BEAMs and dozens of processes; running them one at a time
  # keeps the machine's load, and so the timings they rely on, predictable.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.{OrphanDetector, ProcessRegistry}
  alias DSPexProcess.Worker
  alias DSPexProcess.Test.PeerBeam

  @moduletag timeout: 120_000

  setup do
    setup_bridge("det")
  end

  defp start_workers(script, count, args \\ []) do
    for _ <- 1..count do
      id = {:test_worker, System.unique_integer([:positive])}

      pid =
        start_supervised!(
          {Worker, worker_id: id, script: script, python: python(), args: args},
          id: id
        )

      # A round trip proves python has exec'd and serves: until then /proc shows the
      # forking helper's argv, and the process would not match the pattern yet.
      {:ok, "pong"} = Worker.call(pid, "ping")
      {pid, Worker.info(pid)}
    end
  end

  defp leak_workers(script, count, args) do
    for _ <- 1..count, do: leak_worker(script, args)
  end

  defp gone?(%{os_pid: pid, start_time: start}), do: not alive?(pid, start)
  defp gone?(%{pid: pid, start_time: start}), do: not alive?(pid, start)

  describe "after a real BEAM crash" do
    test "finds exactly the dead BEAM's workers and ends them, protecting our active ones",
         %{script: script, pattern: pattern} do
      active = start_workers(script, 4)
      peer = PeerBeam.start(script, 3, ["--linger"])
      PeerBeam.kill(peer)

      orphans = OrphanDetector.find_orphaned_processes(pattern: pattern)
      assert Enum.sort(Enum.map(orphans, & &1.pid)) == Enum.sort(peer.worker_pids)

      for o <- orphans do
        assert o.reason == :owner_dead
        assert o.owner.pid == peer.os_pid
        assert o.owner.worker_id =~ "peer_"
        assert o.pgid == o.pid
        assert o.cmdline =~ pattern
        assert is_integer(o.detected_at) and is_integer(o.start_time)
      end

      status = OrphanDetector.get_system_status(pattern: pattern)
      assert status.orphaned_processes == 3
      assert status.total_dspy_processes == 7
      assert status.active == 4
      assert status.system_health == :critical

      log =
        capture_log(fn ->
          report = OrphanDetector.cleanup_orphaned_processes(pattern: pattern, grace_ms: 2_000)
          send(self(), {:report, report})
        end)

      assert_received {:report, report}
      assert %{found: 3, terminated: 3, errors: 0, preserved_active: 4} = report
      assert Enum.all?(report.details, &match?({_, {:ok, :graceful}}, &1))
      for pid <- peer.worker_pids, do: assert(log =~ "pid #{pid} (owner_dead) graceful")

      assert Enum.all?(orphans, &gone?/1)
      assert Enum.all?(active, fn {pid, info} -> Process.alive?(pid) and not gone?(info) end)
      assert OrphanDetector.get_system_status(pattern: pattern).system_health == :healthy
    end

    test "the registry's cleanup_on_start ends orphans of dead BEAMs",
         %{script: script, pattern: pattern} do
      peer = PeerBeam.start(script, 2, ["--linger"])
      starts = Map.new(peer.worker_pids, &{&1, start_time(&1)})
      PeerBeam.kill(peer)
      assert length(OrphanDetector.find_orphaned_processes(pattern: pattern)) == 2

      name = unique_name(:cleanup_on_start)

      capture_log(fn ->
        start_supervised!(
          {ProcessRegistry, name: name, cleanup_on_start: [pattern: pattern, grace_ms: 2_000]}
        )

        assert eventually(
                 fn -> OrphanDetector.find_orphaned_processes(pattern: pattern) == [] end,
                 10_000
               )
      end)

      # An exiting process drops its argv (so it no longer matches) a moment before it
      # leaves /proc: wait for the identities themselves.
      assert eventually(fn -> Enum.all?(starts, fn {pid, start} -> not alive?(pid, start) end) end)
    end
  end

  test "workers of another live BEAM are foreign and survive cleanup",
       %{script: script, pattern: pattern} do
    peer = PeerBeam.start(script, 3)
    starts = Map.new(peer.worker_pids, &{&1, start_time(&1)})

    classes = OrphanDetector.classify_processes(pattern: pattern)
    assert Enum.sort(Enum.map(classes, & &1.pid)) == Enum.sort(peer.worker_pids)
    assert Enum.all?(classes, &(&1.class == :foreign))
    assert OrphanDetector.find_orphaned_processes(pattern: pattern, min_age_ms: 0) == []

    report = OrphanDetector.cleanup_orphaned_processes(pattern: pattern, min_age_ms: 0)
    assert %{found: 0, terminated: 0, protected: %{foreign: 3}} = report

    # Even when named explicitly, they are refused.
    forged = Enum.map(classes, &Map.take(&1, [:pid, :start_time]))

    capture_log(fn ->
      report = OrphanDetector.cleanup_orphaned_processes(forged, pattern: pattern)
      assert report.terminated == 0
      assert Enum.all?(report.details, &match?({_, {:error, {:not_an_orphan, :foreign}}}, &1))
    end)

    for {pid, start} <- starts, do: assert(alive?(pid, start))
    PeerBeam.stop(peer)
    for {pid, start} <- starts, do: assert(eventually(fn -> not alive?(pid, start) end))
  end

  test "a leaked worker becomes an orphan once older than min_age_ms, and not before",
       %{script: script, pattern: pattern} do
    [leaked] = leak_workers(script, 1, [])
    [{_pid, active}] = start_workers(script, 1)
    # Its Elixir process is gone and so is its registry entry, but python lingers.
    assert eventually(fn ->
             ProcessRegistry.get_active_python_pids()
             |> Enum.member?(leaked.os_pid)
             |> Kernel.not()
           end)

    assert alive?(leaked.os_pid, leaked.start_time)

    classes = OrphanDetector.classify_processes(pattern: pattern, min_age_ms: 3_600_000)
    assert %{class: :starting} = Enum.find(classes, &(&1.pid == leaked.os_pid))
    assert OrphanDetector.find_orphaned_processes(pattern: pattern, min_age_ms: 3_600_000) == []

    assert [orphan] = OrphanDetector.find_orphaned_processes(pattern: pattern, min_age_ms: 0)
    assert orphan.pid == leaked.os_pid
    assert orphan.reason == :worker_gone
    assert orphan.owner.pid == String.to_integer(System.pid())

    capture_log(fn ->
      assert %{found: 1, terminated: 1, preserved_active: 1} =
               OrphanDetector.cleanup_orphaned_processes([orphan], pattern: pattern, min_age_ms: 0)
    end)

    assert gone?(leaked)
    refute gone?(active)
  end

  test "stubborn orphans are force-killed after the grace, with their children, in parallel",
       %{script: script, pattern: pattern} do
    leaked = leak_workers(script, 50, ["--ignore-sigterm", "--spawn-children", "1"])

    children =
      for w <- leaked do
        # The bridge forks before serving; its child carries the same argv.
        assert eventually(fn -> length(children_of(w.os_pid)) == 1 end)
        [child] = children_of(w.os_pid)
        %{pid: child, start_time: start_time(child)}
      end

    orphans = OrphanDetector.find_orphaned_processes(pattern: pattern, min_age_ms: 0)
    # 50 workers and their 50 forked children.
    assert length(orphans) == 100

    {micros, report} =
      :timer.tc(fn ->
        capture_log(fn ->
          send(
            self(),
            {:report,
             OrphanDetector.cleanup_orphaned_processes(
               pattern: pattern,
               min_age_ms: 0,
               grace_ms: 500
             )}
          )
        end)

        assert_received {:report, report}
        report
      end)

    assert report.errors == 0
    leaders = MapSet.new(leaked, & &1.os_pid)

    for {orphan, outcome} <- report.details, MapSet.member?(leaders, orphan.pid) do
      assert outcome == {:ok, :force_killed}
    end

    assert Enum.all?(leaked, &gone?/1)
    assert Enum.all?(children, fn c -> eventually(fn -> gone?(c) end) end)
    # One shared grace of 0.5 s, not fifty: far below the 25 s of a serial cleanup.
    assert micros < 5_000_000, "cleanup took #{div(micros, 1000)} ms"
  end

  defp children_of(pid) do
    case File.read("/proc/#{pid}/task/#{pid}/children") do
      {:ok, text} -> text |> String.split() |> Enum.map(&String.to_integer/1)
      _ -> []
    end
  end

  test "unmanaged processes are left alone unless opted in", %{script: script, pattern: pattern} do
    # Started from a detached shell (as by hand, outside any BEAM): its parent is that
    # shell, alive and not ours. The paths go in the environment so that only python's argv
    # names the script.
    detach_and_run(script, [])

    assert eventually(fn -> length(OrphanDetector.classify_processes(pattern: pattern)) == 1 end)
    [proc] = OrphanDetector.classify_processes(pattern: pattern)
    assert proc.class == :unmanaged
    assert proc.owner == nil

    report = OrphanDetector.cleanup_orphaned_processes(pattern: pattern, min_age_ms: 0)
    assert %{found: 0, protected: %{unmanaged: 1}} = report
    assert alive?(proc.pid, proc.start_time)

    capture_log(fn ->
      report =
        OrphanDetector.cleanup_orphaned_processes(
          pattern: pattern,
          include_unmanaged: true,
          grace_ms: 2_000
        )

      assert [{%{reason: :unmanaged, pid: pid}, {:ok, :graceful}}] = report.details
      assert pid == proc.pid
    end)

    refute alive?(proc.pid, proc.start_time)
  end

  describe "refusals and bad input" do
    test "forged, stale and dangerous entries are refused and nothing is signalled",
         %{script: script, pattern: pattern} do
      [{wpid, active}] = start_workers(script, 1)
      [leaked] = leak_workers(script, 1, [])
      own = String.to_integer(System.pid())

      requests = [
        %{pid: active.os_pid, start_time: active.start_time},
        %{pid: leaked.os_pid, start_time: leaked.start_time - 1},
        %{pid: own, start_time: start_time(own)},
        %{pid: 1, start_time: 1},
        %{pid: 0},
        %{pid: -1},
        %{pid: "123"},
        %{pid: 2 ** 70},
        %{nopid: true},
        :not_a_map
      ]

      report =
        capture_log(fn ->
          send(
            self(),
            {:report,
             OrphanDetector.cleanup_orphaned_processes([%{pid: active.os_pid} | requests],
               pattern: pattern,
               min_age_ms: 0
             )}
          )
        end)

      assert report =~ "refused"
      assert_received {:report, report}
      assert report.terminated == 0

      outcomes = Enum.map(report.details, &elem(&1, 1))

      assert [
               # No start time: no identity, refused.
               {:error, :invalid_entry},
               {:error, {:not_an_orphan, :active}},
               {:ok, :already_gone},
               {:error, :not_a_match},
               {:error, :invalid_entry},
               {:error, :invalid_entry},
               {:error, :invalid_entry},
               {:error, :invalid_entry},
               {:error, :invalid_entry},
               {:error, :invalid_entry},
               {:error, :invalid_entry}
             ] = outcomes

      assert Process.alive?(wpid) and alive?(active.os_pid, active.start_time)
      assert alive?(leaked.os_pid, leaked.start_time)

      # The leaked worker with its true identity is a real orphan: this one goes.
      capture_log(fn ->
        report =
          OrphanDetector.cleanup_orphaned_processes(
            [%{pid: leaked.os_pid, start_time: leaked.start_time}],
            pattern: pattern,
            min_age_ms: 0,
            grace_ms: 2_000
          )

        assert report.terminated == 1
      end)
    end

    test "the native terminator refuses this BEAM and invalid pids" do
      own = String.to_integer(System.pid())
      {:ok, start} = DSPexProcess.Native.process_start_time(own)

      # This BEAM's pid is refused whatever start time comes with it.
      assert [
               {:error, :refused_self},
               {:error, :invalid_pid},
               {:error, :invalid_pid},
               {:error, :refused_self}
             ] =
               DSPexProcess.Termination.run(
                 [{own, start}, {1, 0}, {-5, 0}, {own, start + 1}],
                 grace_ms: 100,
                 kill_wait_ms: 100
               )
    end

    test "invalid options raise ArgumentError naming them" do
      bad = [
        [pattern: ""],
        [pattern: "a\0b"],
        [pattern: []],
        [pattern: List.duplicate("x", 65)],
        [pattern: String.duplicate("x", 4097)],
        [pattern: :atom],
        [grace_ms: -1],
        [grace_ms: "1"],
        [kill_wait_ms: 1.5],
        [min_age_ms: nil],
        [kill_group: :yes],
        [dry_run: 1],
        [include_unmanaged: "true"],
        [allow_other_users: nil],
        [reasons: [:bogus]],
        [registry: "name"],
        [bogus: 1]
      ]

      for opts <- bad,
          fun <- [
            :find_orphaned_processes,
            :cleanup_orphaned_processes,
            :get_system_status,
            :validate_detection_system
          ] do
        [{key, _}] = opts

        assert_raise ArgumentError, ~r/#{key}/, fn -> apply(OrphanDetector, fun, [opts]) end
      end

      assert_raise ArgumentError, fn -> OrphanDetector.find_orphaned_processes(:oops) end

      assert_raise ArgumentError, fn ->
        OrphanDetector.cleanup_orphaned_processes([%{pid: 5}], :oops)
      end
    end

    test "dry run reports and signals nothing", %{script: script, pattern: pattern} do
      [leaked] = leak_workers(script, 1, [])

      report =
        capture_log(fn ->
          send(
            self(),
            {:r,
             OrphanDetector.cleanup_orphaned_processes(
               pattern: pattern,
               min_age_ms: 0,
               dry_run: true
             )}
          )
        end)

      assert report =~ "dry_run"

      assert_received {:r,
                       %{found: 1, terminated: 0, dry_run: true, details: [{_, {:ok, :dry_run}}]}}

      assert alive?(leaked.os_pid, leaked.start_time)

      capture_log(fn ->
        OrphanDetector.cleanup_orphaned_processes(pattern: pattern, min_age_ms: 0)
      end)

      assert gone?(leaked)
    end
  end

  test "validate_detection_system reports capabilities and confirms orphans",
       %{script: script, pattern: pattern} do
    [leaked] = leak_workers(script, 1, [])
    result = OrphanDetector.validate_detection_system(pattern: pattern, min_age_ms: 0)

    assert %{status: :ok, all_dspy_processes: 1, validation_test: [{pid, true}]} = result
    assert pid == leaked.os_pid
    assert result.system_commands.proc_filesystem
    assert result.native.pidfd

    capture_log(fn ->
      OrphanDetector.cleanup_orphaned_processes(pattern: pattern, min_age_ms: 0)
    end)
  end
end
