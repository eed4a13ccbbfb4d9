defmodule DSPexProcess.ContainmentTest do
  # Cgroup containment against real processes, real cgroups and real VMs. Not async: VMs,
  # cgroups and timing. Every cgroup here is made by the library for a VM this test started
  # (or this test VM), and every process is one this test started.
  use ExUnit.Case, async: false

  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.{OrphanDetector, ProcessRegistry}
  alias DSPexProcess.{Guardian, Native, Worker}
  alias DSPexProcess.Test.PeerBeam

  @moduletag :cgroup

  setup do
    setup_bridge("cgroup")
  end

  defp mount, do: Native.capabilities().cgroup2_mount

  defp vm_dir(beam_pid, beam_start) do
    {_, _, ns} = Native.beam_identity()

    Path.wildcard(Path.join(mount(), "**/dspex-#{ns}-#{beam_pid}-#{beam_start}"))
    |> List.first()
  end

  # {pid, start} of every process in a per-VM cgroup's leaves.
  defp members(dir) do
    for leaf <- Path.wildcard(Path.join(dir, "w-*")),
        {:ok, text} <- [File.read(Path.join(leaf, "cgroup.procs"))],
        pid <- String.split(text),
        pid = String.to_integer(pid),
        {:ok, start} <- [Native.process_start_time(pid)],
        do: {pid, start}
  end

  # The peer's per-VM cgroups in the v1 hierarchies of the limit controllers (hybrid mode),
  # by controller.
  defp v1_dirs(beam_pid, beam_start) do
    {_, _, ns} = Native.beam_identity()

    for {controller, mount} <- Native.capabilities().cgroup_v1_mounts,
        dir <- Path.wildcard(Path.join(mount, "**/dspex-#{ns}-#{beam_pid}-#{beam_start}")),
        do: {controller, dir}
  end

  # Limits that put a peer's workers in v1 leaves too, where the host has them.
  @peer_limits [memory_max: 512 * 1024 * 1024, pids_max: 64, cpu_weight: 100]

  # Each v1 per-VM cgroup of the peer holds one leaf per worker, each with its worker.
  defp assert_v1_leaves(v1, workers) do
    for {_controller, dir} <- v1 do
      leaves = Path.wildcard(Path.join(dir, "w-*"))
      assert length(leaves) == length(workers)

      for {pid, start} <- workers do
        leaf = Path.join(dir, "w-#{pid}-#{start}")
        assert "#{pid}" in String.split(File.read!(Path.join(leaf, "cgroup.procs")))
      end
    end
  end

  defp all_gone(ids, timeout \\ 5_000),
    do: eventually(fn -> Enum.all?(ids, fn {p, s} -> not alive?(p, s) end) end, timeout)

  test "a worker's setsid, double-forked grandchild (argv `sleep 3600`) ends when the worker stops; its leaf goes",
       ctx do
    containment = Guardian.containment()
    assert containment.mode == :cgroup

    {:ok, w} = Worker.start(worker_id: "escaper", script: ctx.script, args: ["--spawn-escaper"])

    {:ok, escaped} = Worker.call(w, "escaped")
    escaped = String.to_integer(escaped)
    escaped_id = {escaped, start_time(escaped)}
    %{os_pid: os_pid, start_time: start} = Worker.info(w)
    leaf = "w-#{os_pid}-#{start}"
    leaf_dir = Path.join(containment.cgroup, leaf)

    # It entered its leaf before exec: what it forked is there too, even after setsid.
    assert String.ends_with?(cgroup_v2_path(os_pid), "/" <> leaf)
    assert String.ends_with?(cgroup_v2_path(escaped), "/" <> leaf)
    refute File.read!("/proc/#{escaped}/cmdline") =~ ctx.pattern
    assert OrphanDetector.find_orphaned_processes(pattern: ctx.pattern, min_age_ms: 0) == []

    :ok = GenServer.stop(w)
    assert all_gone([escaped_id, {os_pid, start}])
    refute File.exists?(leaf_dir)
  end

  test "a process registered by plain Port.open is moved into its leaf by the guardian and ends with it",
       ctx do
    {port, os_pid} = start_python([ctx.pattern])
    start = start_time(os_pid)
    registry = ProcessRegistry
    id = {:plain, System.unique_integer([:positive])}
    :ok = ProcessRegistry.register_worker(id, self(), os_pid, "fp", registry)
    leaf = "w-#{os_pid}-#{start}"
    assert eventually(fn -> String.ends_with?(cgroup_v2_path(os_pid), "/" <> leaf) end)

    Port.close(port)
    :ok = ProcessRegistry.unregister_worker(id, registry)
    assert all_gone([{os_pid, start}])
    assert eventually(fn -> not File.exists?(Path.join(Guardian.containment().cgroup, leaf)) end)
  end

  test "kill -9 of a VM: its OS guardian ends every process in its cgroup, the escaped one too, and removes the cgroup",
       ctx do
    peer =
      PeerBeam.start(ctx.script, 2, ["--spawn-escaper"],
        guardian: true,
        guard: false,
        limits: @peer_limits
      )

    dir = vm_dir(peer.os_pid, peer.start_time)
    assert dir, "the peer made no cgroup"
    inside = members(dir)
    # Two workers and their two escaped grandchildren.
    assert length(inside) == 4
    workers = Enum.map(peer.worker_pids, &{&1, start_time(&1)})
    assert Enum.all?(workers, &(&1 in inside))
    # On a hybrid host, their limits put them in v1 leaves too.
    v1 = v1_dirs(peer.os_pid, peer.start_time)
    assert length(v1) == map_size(Native.capabilities().cgroup_v1_mounts)
    assert_v1_leaves(v1, workers)

    PeerBeam.kill(peer)

    assert all_gone(inside, 10_000),
           "left: #{inspect(Enum.filter(inside, &alive?(elem(&1, 0), elem(&1, 1))))}"

    assert eventually(fn -> not File.exists?(dir) end, 5_000)

    assert eventually(fn -> not Enum.any?(v1, fn {_, d} -> File.exists?(d) end) end, 5_000),
           "v1 cgroups left: #{inspect(v1)}"
  end

  test "kill -9 of a VM without its OS guardian: a later cleanup ends its leftovers (:cgroup_owner_dead for the escaped ones) and removes the cgroup",
       ctx do
    peer =
      PeerBeam.start(ctx.script, 2, ["--spawn-escaper", "--linger"],
        guardian: false,
        containment: :cgroup,
        limits: @peer_limits
      )

    dir = vm_dir(peer.os_pid, peer.start_time)
    inside = members(dir)
    assert length(inside) == 4
    v1 = v1_dirs(peer.os_pid, peer.start_time)
    assert length(v1) == map_size(Native.capabilities().cgroup_v1_mounts)
    assert_v1_leaves(v1, Enum.map(peer.worker_pids, &{&1, start_time(&1)}))
    PeerBeam.kill(peer)
    Process.sleep(200)
    assert Enum.all?(inside, fn {p, s} -> alive?(p, s) end), "leftovers expected"

    # The cgroup pass (off by default in this suite) for the cgroup of the VM just killed.
    found = OrphanDetector.find_orphaned_processes(pattern: ctx.pattern, cgroups: true)
    reasons = found |> Enum.filter(&({&1.pid, &1.start_time} in inside)) |> Enum.map(& &1.reason)

    assert Enum.sort(reasons) == [
             :cgroup_owner_dead,
             :cgroup_owner_dead,
             :owner_dead,
             :owner_dead
           ]

    escaped =
      for %{reason: :cgroup_owner_dead} = o <- found, {o.pid, o.start_time} in inside, do: o

    assert Enum.all?(escaped, &(&1.owner.pid == peer.os_pid and &1.cmdline == "sleep 3600"))

    # The CLI, from outside any VM, does the cleanup.
    {out, 0} =
      System.cmd(
        Worker.guard_executable(),
        [
          "cleanup",
          "--json",
          "--yes",
          "--grace",
          "300",
          "--pattern",
          ctx.pattern
        ],
        env: [{"DSPEX_PROC_NO_CGROUPS", nil}]
      )

    assert out =~ ~s("reason": "cgroup_owner_dead")
    assert all_gone(inside)
    assert eventually(fn -> not File.exists?(dir) end)

    assert eventually(fn -> not Enum.any?(v1, fn {_, d} -> File.exists?(d) end) end),
           "v1 cgroups left: #{inspect(v1)}"
  end

  test "run as nobody (no writable cgroup), :auto falls back and :cgroup refuses to start with the reason" do
    setpriv = System.find_executable("setpriv") || flunk("setpriv (util-linux) is needed")
    elixir = System.find_executable("elixir")
    ebin = :code.lib_dir(:dspex_process, :ebin) |> List.to_string()

    code = """
    Application.put_env(:dspex_process, :guardian, containment: :auto, os_guardian: false)
    {:ok, _} = Application.ensure_all_started(:dspex_process)
    c = DSPexProcess.Guardian.containment()
    IO.puts("AUTO \#{c.mode} \#{c.requested} \#{c.reason}")
    :ok = Application.stop(:dspex_process)
    Application.put_env(:dspex_process, :guardian, containment: :cgroup, os_guardian: false)
    {:error, reason} = Application.ensure_all_started(:dspex_process)
    IO.puts("REQUIRED \#{inspect(reason)}")
    """

    {out, 0} =
      System.cmd(
        setpriv,
        ["--reuid=nobody", "--regid=nogroup", "--clear-groups", elixir, "-pa", ebin, "-e", code],
        env: [{"HOME", System.tmp_dir!()}],
        stderr_to_stdout: true
      )

    assert out =~ ~r/AUTO none auto no cgroup containment: .*cgroup\.procs is not writable/
    assert out =~ "containment: :cgroup is impossible here"
    assert out =~ "Delegate=yes"
  end

  test "cgroup limits of a worker without a cgroup (an unguarded registry) fall back to rlimits, with a warning",
       ctx do
    unguarded = :"limits_unguarded_#{System.unique_integer([:positive])}"
    :ok = ProcessRegistry.ensure_table(unguarded, guardian: false)

    log =
      ExUnit.CaptureLog.capture_log(fn ->
        {:ok, w} =
          Worker.start(
            worker_id: "limits",
            script: ctx.script,
            registry: unguarded,
            limits: [memory_max: 900_000_000, cpu_weight: 1, pids_max: 64]
          )

        # Python answers once the wrapper has exec'd it.
        assert {:ok, "pong"} = Worker.call(w, "ping")
        os_pid = Worker.os_pid(w)
        limits = File.read!("/proc/#{os_pid}/limits")
        assert limits =~ ~r/Max address space\s+900000000\s+900000000/
        nice = "/proc/#{os_pid}/stat" |> File.read!() |> String.split(") ") |> List.last()
        assert nice |> String.split() |> Enum.at(16) == "19"
        GenServer.stop(w)
      end)

    assert log =~ "limit :memory_max needs the cgroup controller memory"
    assert log =~ "this worker has no cgroup"
    assert log =~ "RLIMIT_AS 900000000 stands in"
    assert log =~ "limit :pids_max needs the cgroup controller pids"
    assert log =~ "nice 19 stands in"
  end
end
