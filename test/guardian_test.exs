defmodule DSPexProcess.GuardianTest do
  # The guardian ends only what it can prove is this VM's: a process registered by mistake
  # (a pid that is no port program of this VM: recycled, or someone else's) is never ended
  # when it leaves the registry, nor told to the OS guard.
  use ExUnit.Case, async: false

  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.ProcessRegistry

  @moduletag timeout: 60_000

  test "a registered pid that is not a port program of this VM is never ended" do
    marker = "dspex_guardian_stranger_#{System.unique_integer([:positive])}"
    [{pid, start}] = make_orphans(1, marker) |> Enum.take(1)
    on_exit(fn -> if alive?(pid, start), do: kill9(pid, start) end)

    owner = spawn(fn -> receive do: (:never -> :ok) end)
    :ok = ProcessRegistry.register_worker({:stranger, pid}, owner, pid, "fp_stranger")
    Process.exit(owner, :kill)

    # Well past the release delay and the grace: had the guardian taken it for ours, it
    # would be gone.
    g = DSPexProcess.Guardian.status().options
    Process.sleep(g[:release_delay_ms] + g[:grace_ms] + 500)
    assert alive?(pid, start), "the guardian ended a process that was not this VM's"
    refute {pid, start} in DSPexProcess.Guardian.status().pending
  end

  test "a guardian killed more often than its supervisor allows is detached when the application stops" do
    # In a VM of its own: the application must go down for good. Four kills in a row exceed
    # the supervisor's three restarts in five seconds; a killed guardian stays attached (for
    # a successor that never comes). A registration with a live guardian attached is staged
    # (its /proc read left to the guardian); without one, it is read at once.
    code = """
    Application.put_env(:dspex_process, :guardian, os_guardian: false, containment: :none)
    {:ok, _} = Application.ensure_all_started(:dspex_process)

    for _ <- 1..4 do
      case Process.whereis(DSPexProcess.Guardian) do
        nil ->
          :ok

        g ->
          ref = Process.monitor(g)
          Process.exit(g, :kill)
          receive do: ({:DOWN, ^ref, _, _, _} -> :ok)
          Process.sleep(50)
      end
    end

    stopped = fn -> not List.keymember?(Application.started_applications(), :dspex_process, 0) end
    Enum.find(1..100, fn _ -> stopped.() or (Process.sleep(20) && false) end)
    IO.puts("STOPPED \#{stopped.()}")
    port = Port.open({:spawn_executable, System.find_executable("sleep")}, args: ["30"])
    {:os_pid, os} = Port.info(port, :os_pid)
    :ok = DSPex.Python.ProcessRegistry.register_worker("after_stop", self(), os, "fp")
    IO.puts("STAGED \#{DSPexProcess.Native.registry_staged()}")
    System.cmd("kill", [to_string(os)])
    """

    ebin = List.to_string(:code.lib_dir(:dspex_process, :ebin))
    {out, 0} = System.cmd(System.find_executable("elixir"), ["-pa", ebin, "-e", code])
    assert out =~ "STOPPED true", out
    assert out =~ "STAGED 0", out
  end

  test "a port program of this VM is ended once its owner is gone" do
    parent = self()

    owner =
      spawn(fn ->
        {_port, pid} = start_lingering_python()
        :ok = ProcessRegistry.register_worker({:ours, pid}, self(), pid, "fp_ours")
        send(parent, {:pid, pid})
        receive do: (:never -> :ok)
      end)

    pid = receive do: ({:pid, p} -> p)
    start = start_time(pid)
    Process.exit(owner, :kill)
    assert eventually(fn -> not alive?(pid, start) end, 5_000)
  end

  test "every port program of a burst of unregistrations is ended" do
    # Releases queued back to back join one notice: none of them may be lost on the way.
    tag = System.unique_integer([:positive])
    started = for _ <- 1..4, do: start_lingering_python()
    ids = for {_port, pid} <- started, do: {pid, start_time(pid)}
    on_exit(fn -> for {p, s} <- ids, alive?(p, s), do: kill9(p, s) end)

    for {pid, _} <- ids,
        do: :ok = ProcessRegistry.register_worker({:burst, tag, pid}, self(), pid, "fp_#{tag}")

    # Most likely the guardian takes the registrations first (a status call waits for the
    # messages already in its mailbox), so the releases below queue, and join, on their own;
    # the one notice queue keeps them after the registrations either way.
    _ = DSPexProcess.Guardian.status()
    for {pid, _} <- ids, do: :ok = ProcessRegistry.unregister_worker({:burst, tag, pid})
    # A released process held by an open port is waited on until the port closes; these
    # ignore the EOF on their stdin (they sleep), so only the guardian ends them.
    for {port, _} <- started, do: Port.close(port)

    g = DSPexProcess.Guardian.status().options
    assert eventually(fn -> all_gone?(ids) end, g[:release_delay_ms] + g[:grace_ms] + 5_000)
  end

  test "a process handed off to an unguarded registry within the delay is left running" do
    unguarded = unique_name(:handoff)
    :ok = ProcessRegistry.ensure_table(unguarded, guardian: false)
    parent = self()

    # The keeper opens the port and keeps it; it hands the registration on.
    keeper =
      spawn(fn ->
        {_port, pid} = start_lingering_python()
        send(parent, {:pid, pid})
        receive do: (:never -> :ok)
      end)

    pid = receive do: ({:pid, p} -> p)
    start = start_time(pid)
    on_exit(fn -> if alive?(pid, start), do: kill9(pid, start) end)
    first = spawn(fn -> receive do: (:never -> :ok) end)
    :ok = ProcessRegistry.register_worker({:handoff, pid}, first, pid, "fp", ProcessRegistry)
    # The registration reached the guardian (and was verified) before the hand-off.
    _ = DSPexProcess.Guardian.status()
    :ok = ProcessRegistry.unregister_worker({:handoff, pid})
    :ok = ProcessRegistry.register_worker({:handoff, pid}, self(), pid, "fp", unguarded)
    # The port closes: only the unguarded registry holds it now.
    Process.exit(keeper, :kill)
    Process.exit(first, :kill)

    g = DSPexProcess.Guardian.status().options
    Process.sleep(g[:release_delay_ms] + g[:grace_ms] + 500)
    assert alive?(pid, start), "a process handed off to an unguarded registry was ended"
    refute {pid, start} in DSPexProcess.Guardian.status().pending

    # Handed off for good: with containment, out of its leaf, so the VM's end spares it.
    if DSPexProcess.Guardian.containment().mode == :cgroup do
      refute File.read!("/proc/#{pid}/cgroup") =~ "/w-", "still in the VM's leaf"
    end

    :ok = ProcessRegistry.unregister_worker({:handoff, pid}, unguarded)
  end
end
