defmodule DSPexProcess.MonitoringTest do
  # Beyond the reference: continuous detection, worker metrics, telemetry events, the
  # cluster view over real :peer nodes, and resource limits for workers.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.{OrphanDetector, ProcessRegistry}
  alias DSPexProcess.{OrphanMonitor, Worker}

  @moduletag timeout: 120_000

  setup do
    setup_bridge("mon")
  end

  describe "OrphanMonitor" do
    test "finds orphans periodically, logs them, and cleans up only when asked", %{
      script: script,
      pattern: pattern
    } do
      leaked = leak_worker(script)
      detector = [pattern: pattern, min_age_ms: 0, grace_ms: 1_000]

      log =
        capture_log(fn ->
          start_supervised!({OrphanMonitor, name: :watch_only, interval: 50, detector: detector},
            id: :watch_only
          )

          assert eventually(fn ->
                   match?(%{orphans: [_]}, OrphanMonitor.last_result(:watch_only))
                 end)
        end)

      assert log =~ "OrphanMonitor found 1 orphan(s): #{leaked.os_pid} (worker_gone)"
      assert %{orphans: [%{pid: pid}], cleanup: nil} = OrphanMonitor.last_result(:watch_only)
      assert pid == leaked.os_pid
      assert alive?(leaked.os_pid, leaked.start_time)
      stop_supervised(:watch_only)

      capture_log(fn ->
        start_supervised!(
          {OrphanMonitor,
           name: :cleaner, interval: 60_000, auto_cleanup: true, detector: detector},
          id: :cleaner
        )

        assert %{cleanup: %{terminated: 1}} = OrphanMonitor.check_now(:cleaner)
      end)

      refute alive?(leaked.os_pid, leaked.start_time)
      assert %{orphans: [], cleanup: nil} = OrphanMonitor.check_now(:cleaner)
    end

    test "validates its options" do
      for opts <- [
            [interval: 0],
            [interval: :soon],
            [auto_cleanup: 1],
            [detector: [pattern: ""]],
            [bogus: 1]
          ] do
        assert_raise ArgumentError, fn -> OrphanMonitor.start_link(opts) end
      end
    end
  end

  describe "worker metrics" do
    test "per worker and in the system status, with totals, matching /proc", %{
      script: script,
      pattern: pattern
    } do
      workers =
        for i <- 1..2 do
          id = {:metrics, i}

          pid =
            start_supervised!(
              {Worker,
               worker_id: id, script: script, python: python(), args: ["--spawn-children", "1"]},
              id: id
            )

          {:ok, "pong"} = Worker.call(pid, "ping")
          {id, Worker.info(pid)}
        end

      {id, info} = hd(workers)
      assert {:ok, %{metrics: m}} = ProcessRegistry.get_worker_info(id, metrics: true)

      vm_rss =
        Regex.run(~r/VmRSS:\s+(\d+) kB/, File.read!("/proc/#{info.os_pid}/status"))
        |> Enum.at(1)
        |> String.to_integer()

      assert_in_delta m.rss_bytes, vm_rss * 1024, vm_rss * 1024 * 0.2
      assert m.threads >= 1 and m.age_ms > 0 and m.cpu_time_ms >= 0
      assert m.state in [:sleeping, :running]
      refute Map.has_key?(elem(ProcessRegistry.get_worker_info(id), 1), :metrics)

      status = OrphanDetector.get_system_status(pattern: pattern, metrics: true)
      ours = Enum.filter(status.metrics.workers, &match?({:metrics, _}, &1.worker_id))
      assert length(ours) == 2
      totals = status.metrics.totals
      assert totals.workers == length(status.metrics.workers)
      assert totals.rss_bytes == Enum.sum(Enum.map(status.metrics.workers, & &1.rss_bytes))
      assert totals.threads == Enum.sum(Enum.map(status.metrics.workers, & &1.threads))

      assert_raise ArgumentError, ~r/metrics/, fn ->
        ProcessRegistry.get_worker_info(id, metrics: :yes)
      end

      assert_raise ArgumentError, ~r/bogus/, fn ->
        ProcessRegistry.get_worker_info(id, bogus: 1)
      end
    end
  end

  describe "telemetry" do
    setup do
      parent = self()

      events = [
        [:dspex_process, :scan],
        [:dspex_process, :cleanup, :start],
        [:dspex_process, :cleanup, :stop],
        [:dspex_process, :orphan, :terminated],
        [:dspex_process, :registry, :sweep]
      ]

      for e <- events do
        :telemetry.attach(
          {__MODULE__, e},
          e,
          fn event, m, meta, _ -> send(parent, {:event, event, m, meta}) end,
          nil
        )
      end

      on_exit(fn -> for e <- events, do: :telemetry.detach({__MODULE__, e}) end)
    end

    test "scan, cleanup and each orphan fire events with the documented shape", %{
      script: script,
      pattern: pattern
    } do
      leaked = leak_worker(script)

      capture_log(fn ->
        OrphanDetector.cleanup_orphaned_processes(
          pattern: pattern,
          min_age_ms: 0,
          grace_ms: 1_000
        )
      end)

      assert_received {:event, [:dspex_process, :scan], %{duration: d, matched: 1, orphans: 1},
                       %{pattern: [^pattern]}}

      assert is_integer(d) and d > 0

      assert_received {:event, [:dspex_process, :cleanup, :start], %{system_time: _},
                       %{pattern: [^pattern], dry_run: false}}

      assert_received {:event, [:dspex_process, :orphan, :terminated], %{count: 1},
                       %{pid: pid, reason: :worker_gone, outcome: {:ok, :graceful}}}

      assert pid == leaked.os_pid

      assert_received {:event, [:dspex_process, :cleanup, :stop],
                       %{duration: _, found: 1, terminated: 1, errors: 0, already_gone: 0},
                       %{dry_run: false}}
    end

    test "the registry sweep fires an event" do
      name = unique_name(:tele_sweep)
      start_supervised!({ProcessRegistry, name: name, cleanup_interval: 20})
      dead = dead_pid()

      capture_log(fn ->
        :ok = ProcessRegistry.register_worker("gone", dead, nil, "fp", name)

        assert_receive {:event, [:dspex_process, :registry, :sweep], %{removed: 1},
                        %{registry: ^name}},
                       2_000
      end)
    end
  end

  describe "cluster view" do
    setup do
      unless Node.alive?() do
        System.cmd("epmd", ["-daemon"])
        {:ok, _} = Node.start(:"dspex_test_#{System.pid()}", :shortnames)
      end

      # The peers run Elixir and this library from this build's code paths.
      paths =
        Enum.flat_map([:elixir, :logger, :dspex_process], &[~c"-pa", :code.lib_dir(&1, :ebin)])

      peers =
        for i <- 1..2 do
          name = :"dspex_peer_#{i}_#{System.unique_integer([:positive])}"
          {:ok, peer, node} = :peer.start(%{name: name, args: paths})
          {:ok, _} = :erpc.call(node, :application, :ensure_all_started, [:dspex_process])
          # Their log lines would reach this node's console through the group leader.
          :ok = :erpc.call(node, Logger, :configure, [[level: :warning]])
          {peer, node}
        end

      on_exit(fn -> for {peer, _} <- peers, do: :peer.stop(peer) end)
      %{nodes: Enum.map(peers, &elem(&1, 1))}
    end

    test "status and cleanup of every node, keyed by node, unreachable ones reported",
         %{script: script, pattern: pattern, nodes: [n1, n2]} do
      # A leaked worker on the first peer: an orphan there (its VM lives, its worker died).
      {:ok, w} =
        :erpc.call(n1, Worker, :start, [
          [worker_id: :remote, script: script, python: python(), args: ["--linger"]]
        ])

      {:ok, "pong"} = :erpc.call(n1, Worker, :call, [w, "ping"])
      %{os_pid: os_pid, start_time: start} = :erpc.call(n1, Worker, :info, [w])
      :erpc.call(n1, Process, :exit, [w, :kill])
      Process.sleep(200)

      opts = [pattern: pattern, min_age_ms: 0]

      status =
        OrphanDetector.cluster_status(
          opts ++ [nodes: [node(), n1, n2, :nobody@nohost], timeout: 10_000]
        )

      assert {:ok,
              %{orphaned_processes: 1, orphan_details: [%{pid: ^os_pid, reason: :worker_gone}]}} =
               status[n1]

      # From every other node the same process is another live VM's: foreign, protected.
      assert {:ok, %{orphaned_processes: 0, foreign: 1}} = status[n2]
      assert {:ok, %{orphaned_processes: 0, foreign: 1}} = status[node()]
      assert {:error, :noconnection} = status[:nobody@nohost]

      cleanup = OrphanDetector.cluster_cleanup(opts ++ [grace_ms: 1_000, nodes: [node(), n1, n2]])
      assert {:ok, %{terminated: 1}} = cleanup[n1]
      assert {:ok, %{found: 0}} = cleanup[n2]
      assert {:ok, %{found: 0}} = cleanup[node()]
      refute alive?(os_pid, start)
      assert_raise ArgumentError, fn -> OrphanDetector.cluster_status(nodes: "all") end
      assert_raise ArgumentError, fn -> OrphanDetector.cluster_status(pattern: "") end
      assert_raise ArgumentError, fn -> OrphanDetector.cluster_status(:all) end
    end
  end

  describe "resource limits" do
    test "address space, open files and nice are applied before Python starts", %{script: script} do
      limits = [address_space: 1_500_000_000, open_files: 77, nice: 7]

      pid =
        start_supervised!(
          {Worker,
           worker_id: :limited, script: script, python: python(), guard: false, limits: limits}
        )

      {:ok, "pong"} = Worker.call(pid, "ping")
      os_pid = Worker.os_pid(pid)
      proc_limits = File.read!("/proc/#{os_pid}/limits")
      assert proc_limits =~ ~r/Max address space\s+1500000000\s+1500000000/
      assert proc_limits =~ ~r/Max open files\s+77\s+77/
      [_, rest] = Regex.run(~r/\)([^)]*)$/s, File.read!("/proc/#{os_pid}/stat"))
      assert rest |> String.split() |> Enum.at(16) == "7"

      for bad <- [[address_space: 0], [open_files: -1], [nice: 20], [nice: "1"], [cpu: 1], :none] do
        assert_raise ArgumentError, ~r/limits/, fn ->
          Worker.start_link(worker_id: :bad, script: script, limits: bad)
        end
      end
    end
  end
end
