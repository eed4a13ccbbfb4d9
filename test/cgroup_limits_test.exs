defmodule DSPexProcess.CgroupLimitsTest do
  # Cgroup limits enforced on real workers, as root. On a hybrid host (cgroup2 without the
  # memory, pids and cpu controllers, cgroup v1 with them) they come from v1 leaves named like
  # the v2 ones; these tests prove that path, and are skipped, with the reason, only where a
  # v1 hierarchy of the controller is truly absent (a unified host). Not async: cgroups,
  # memory pressure and timing. Every worker runs a bridge copied under a name unique to
  # the run, and only its own processes are signalled.
  use ExUnit.Case, async: false

  import DSPexProcess.Test.OSProcess
  import ExUnit.CaptureLog

  alias DSPexProcess.{Guardian, Native, Worker}

  @moduletag :cgroup

  # Which v1 hierarchies this host mounts, read here on its own (not through the library).
  @v1 "/proc/self/mountinfo"
      |> File.read!()
      |> String.split("\n")
      |> Enum.flat_map(fn line ->
        case String.split(line, " - ") do
          [_, "cgroup " <> rest] -> rest |> String.split() |> Enum.at(1, "") |> String.split(",")
          _ -> []
        end
      end)

  setup do
    setup_bridge("limits")
  end

  # The cgroup path of `os_pid` in the v1 hierarchy of `controller`.
  defp v1_path(os_pid, controller) do
    "/proc/#{os_pid}/cgroup"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(fn line ->
      case String.split(line, ":", parts: 3) do
        [_, list, path] -> if controller in String.split(list, ","), do: path
        _ -> nil
      end
    end)
  end

  # Starts a worker with `limits` and returns it with its leaves: {v2 leaf dir, v1 leaf dir}.
  defp start_limited(ctx, controller, limits) do
    containment = Guardian.containment()
    assert containment.mode == :cgroup
    assert containment.hierarchies[controller] == :v1, inspect(containment)
    vm_v1 = containment.v1_cgroups[controller]
    assert vm_v1 =~ ~r{/dspex-\d+-\d+-\d+$}
    # Named like the v2 per-VM cgroup.
    assert Path.basename(vm_v1) == Path.basename(containment.cgroup)

    {:ok, w} =
      Worker.start(
        worker_id: "limited_#{controller}",
        script: ctx.script,
        python: python(),
        limits: limits
      )

    assert {:ok, "pong"} = Worker.call(w, "ping")
    %{os_pid: os_pid, start_time: start} = Worker.info(w)
    leaf = "w-#{os_pid}-#{start}"
    v1_leaf = Path.join(vm_v1, leaf)
    v2_leaf = Path.join(containment.cgroup, leaf)
    # Entered before exec: in both leaves, named after itself.
    assert String.ends_with?(v1_path(os_pid, controller), "/" <> leaf)
    assert String.ends_with?(cgroup_v2_path(os_pid), "/" <> leaf)
    assert File.dir?(v1_leaf) and File.dir?(v2_leaf)
    {w, os_pid, start, v1_leaf, v2_leaf}
  end

  defp read(dir, file), do: dir |> Path.join(file) |> File.read!() |> String.trim()

  defp assert_no_leaf_left(dirs) do
    assert eventually(fn -> not Enum.any?(dirs, &File.exists?/1) end, 5_000),
           "left behind: #{inspect(Enum.filter(dirs, &File.exists?/1))}"

    # No v1 leaf of this VM at all (only workers with cgroup limits get one, and this
    # module starts the only such workers of this VM). Its v2 per-VM cgroup may hold the
    # leaves of other modules' live processes.
    v1 = Map.values(Guardian.containment().v1_cgroups)

    assert eventually(fn -> Enum.all?(v1, &(Path.wildcard("#{&1}/w-*") == [])) end),
           "v1 leaves left: #{inspect(Enum.flat_map(v1, &Path.wildcard("#{&1}/w-*")))}"
  end

  if "memory" in @v1 do
    test "a worker that allocates past memory_max (64 MiB) is killed by its v1 memory leaf and stops with {:memory_limit_exceeded, _}; no leaf is left",
         ctx do
      limit = 64 * 1024 * 1024

      log =
        capture_log(fn ->
          {w, os_pid, start, v1_leaf, v2_leaf} = start_limited(ctx, "memory", memory_max: limit)

          assert read(v1_leaf, "memory.limit_in_bytes") == Integer.to_string(limit)

          if File.exists?(Path.join(v1_leaf, "memory.memsw.limit_in_bytes")),
            do: assert(read(v1_leaf, "memory.memsw.limit_in_bytes") == Integer.to_string(limit))

          # No rlimit stands in: the cgroup limit is the one in force.
          assert File.read!("/proc/#{os_pid}/limits") =~ ~r/Max address space\s+unlimited/
          ref = Process.monitor(w)
          # Well within the limit, then past it.
          assert {:ok, "allocated 16"} = Worker.call(w, "alloc 16")
          assert {:error, :python_exited} = Worker.call(w, "alloc 256", 30_000)
          assert_receive {:DOWN, ^ref, :process, ^w, {:memory_limit_exceeded, 137}}, 10_000
          refute alive?(os_pid, start)
          assert_no_leaf_left([v1_leaf, v2_leaf])
        end)

      assert log =~ "killed by its cgroup's memory limit"
    end
  else
    @tag skip: "no cgroup v1 hierarchy has the memory controller on this host (unified mode)"
    test "a worker past memory_max is killed by its v1 memory leaf", do: :ok
  end

  if "memory" in @v1 do
    test "a worker within memory_max is not reported as a memory kill when it stops", ctx do
      {w, os_pid, start, v1_leaf, v2_leaf} =
        start_limited(ctx, "memory", memory_max: 256 * 1024 * 1024)

      assert {:ok, "allocated 16"} = Worker.call(w, "alloc 16")
      assert read(v1_leaf, "memory.oom_control") =~ ~r/^oom_kill 0$/m
      :ok = GenServer.stop(w)
      refute alive?(os_pid, start)
      assert_no_leaf_left([v1_leaf, v2_leaf])
    end
  end

  if "pids" in @v1 do
    test "pids_max (4) limits the worker's tree through its v1 pids leaf: the fork past it fails with EAGAIN; no leaf is left",
         ctx do
      {w, os_pid, start, v1_leaf, v2_leaf} = start_limited(ctx, "pids", pids_max: 4)
      assert read(v1_leaf, "pids.max") == "4"
      # Python itself is one of the four.
      assert {:ok, "forked 3 EAGAIN"} = Worker.call(w, "fork 10")
      assert read(v1_leaf, "pids.current") == "4"
      :ok = GenServer.stop(w)
      refute alive?(os_pid, start)
      assert_no_leaf_left([v1_leaf, v2_leaf])
    end
  else
    @tag skip: "no cgroup v1 hierarchy has the pids controller on this host (unified mode)"
    test "pids_max limits forks through the v1 pids leaf", do: :ok
  end

  if "cpu" in @v1 do
    test "cpu_weight lands in cpu.shares of its v1 cpu leaf as systemd maps it (50 -> 512, 1 -> 10); no leaf is left",
         ctx do
      for {weight, shares} <- [{50, "512"}, {1, "10"}] do
        {w, os_pid, start, v1_leaf, v2_leaf} = start_limited(ctx, "cpu", cpu_weight: weight)
        assert read(v1_leaf, "cpu.shares") == shares
        # No nice value stands in.
        stat = "/proc/#{os_pid}/stat" |> File.read!() |> String.split(") ") |> List.last()
        assert stat |> String.split() |> Enum.at(16) == "0"
        :ok = GenServer.stop(w)
        refute alive?(os_pid, start)
        assert_no_leaf_left([v1_leaf, v2_leaf])
      end
    end
  else
    @tag skip: "no cgroup v1 hierarchy has the cpu controller on this host (unified mode)"
    test "cpu_weight lands in cpu.shares of the v1 cpu leaf", do: :ok
  end

  if "memory" in @v1 do
    test "a process left only in a dead VM's v1 leaf (out of every cgroup2 one: handed off) is no orphan of that VM; its v1 cgroup goes once empty" do
      # A made-up dead VM (a pid that has exited) with a v1 memory per-VM cgroup beside this
      # VM's, and a sleeper this test started in a leaf of it, in no per-VM cgroup2 one.
      own = Path.dirname(Guardian.containment().v1_cgroups["memory"])
      {_, _, ns} = Native.beam_identity()
      {dead, 0} = System.cmd("sh", ["-c", "echo $$"])
      {sleeper, 0} = System.cmd("sh", ["-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
      sleeper = sleeper |> String.trim() |> String.to_integer()
      start = start_time(sleeper)
      dir = Path.join(own, "dspex-#{ns}-#{String.trim(dead)}-#{start}")
      leaf = Path.join(dir, "w-#{sleeper}-#{start}")

      on_exit(fn ->
        # Ended by identity (pid and start time), never by a pid that may be reused; its
        # cgroups are empty then and go.
        if alive?(sleeper, start),
          do: DSPexProcess.Termination.run([{sleeper, start}], grace_ms: 0, kill_wait_ms: 1_000)

        File.rmdir(leaf)
        File.rmdir(dir)
      end)

      File.mkdir!(dir)
      File.mkdir!(leaf)
      File.write!(Path.join(leaf, "cgroup.procs"), "#{sleeper}")
      assert String.ends_with?(v1_path(sleeper, "memory"), "/w-#{sleeper}-#{start}")

      pattern = "no_such_script_#{System.unique_integer([:positive])}.py"
      found = DSPex.Python.OrphanDetector.find_orphaned_processes(pattern: pattern, cgroups: true)
      refute Enum.any?(found, &(&1.pid == sleeper)), inspect(found)

      {out, _} =
        System.cmd(Worker.guard_executable(), ["find", "--json", "--pattern", pattern],
          env: [{"DSPEX_PROC_NO_CGROUPS", nil}]
        )

      refute json(out, "[o['pid'] for o in d['orphans']]") =~ ~r/\b#{sleeper}\b/
      # Seen as a dead VM's cgroup all the same: kept while it holds the sleeper, removed
      # once empty.
      Native.remove_dead_vm_cgroups()
      assert File.dir?(leaf)
      assert alive?(sleeper, start)
      File.write!(Path.join(own, "cgroup.procs"), "#{sleeper}")

      assert eventually(fn ->
               Native.remove_dead_vm_cgroups()
               not File.exists?(dir)
             end)

      assert alive?(sleeper, start)
    end
  end

  test "the containment report says where each controller comes from and why" do
    c = Guardian.containment()
    caps = Native.capabilities()

    for controller <- ["memory", "pids", "cpu"] do
      case c.hierarchies[controller] do
        :v1 ->
          assert controller in c.controllers
          assert String.starts_with?(c.v1_cgroups[controller], caps.cgroup_v1_mounts[controller])
          assert c.controllers_reason =~ "#{controller} from cgroup v1 instead"

        :v2 ->
          assert controller in c.controllers

        nil ->
          refute controller in c.controllers
          assert c.controllers_reason =~ "#{controller} not from cgroup v1 either"
      end
    end

    for controller <- @v1, controller in ["memory", "pids", "cpu"] do
      assert caps.cgroup_v1_mounts[controller]
    end
  end
end
