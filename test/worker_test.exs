defmodule DSPexProcess.WorkerTest do
  use ExUnit.Case, async: true

  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.ProcessRegistry
  alias DSPexProcess.Worker

  setup do
    {script, pattern} = unique_bridge("worker")
    reg = unique_name(:worker_registry)
    start_supervised!({ProcessRegistry, name: reg, cleanup_interval: :infinity})

    on_exit(fn ->
      kill_leftovers(pattern)

      File.rm(script)
    end)

    %{script: script, reg: reg}
  end

  defp worker_opts(ctx, extra \\ []) do
    [worker_id: "w#{System.unique_integer([:positive])}", script: ctx.script, registry: ctx.reg]
    |> Keyword.merge(extra)
  end

  test "round-trips requests, stamps markers and registers its process", ctx do
    opts = worker_opts(ctx, worker_id: {:pool, 7})
    pid = start_supervised!({Worker, opts})

    assert {:ok, "pong"} = Worker.call(pid, "ping")
    assert {:ok, "héllo wörld"} = Worker.call(pid, "echo héllo wörld")
    info = Worker.info(pid)
    assert {:ok, os_pid} = Worker.call(pid, "pid")
    assert String.to_integer(os_pid) == info.os_pid

    assert {:ok, System.pid()} == Worker.call(pid, "env DSPEX_OWNER_PID")
    assert {:ok, "{:pool, 7}"} == Worker.call(pid, "env DSPEX_WORKER_ID")
    assert {:ok, info.fingerprint} == Worker.call(pid, "env DSPEX_FINGERPRINT")
    assert {:ok, Worker.run_id()} == Worker.call(pid, "env DSPEX_RUN_ID")
    {:ok, owner_start} = Worker.call(pid, "env DSPEX_OWNER_START")
    assert String.to_integer(owner_start) == start_time(String.to_integer(System.pid()))
    assert info.fingerprint =~ ~r/^dspex_worker_\{:pool, 7\}_\d+_\d+$/

    assert {:ok, entry} = ProcessRegistry.get_worker_info({:pool, 7}, ctx.reg)
    assert entry.elixir_pid == pid
    assert entry.python_pid == info.os_pid
    assert entry.python_start_time == info.start_time
    assert entry.python_start_time == start_time(info.os_pid)
  end

  test "stopping ends its python process and unregisters", ctx do
    opts = worker_opts(ctx)
    pid = start_supervised!({Worker, opts})
    {:ok, "pong"} = Worker.call(pid, "ping")
    info = Worker.info(pid)

    :ok = stop_supervised({Worker, opts[:worker_id]})
    refute alive?(info.os_pid, info.start_time)
    assert {:error, :not_found} = ProcessRegistry.get_worker_info(opts[:worker_id], ctx.reg)
  end

  test "a python that ignores SIGTERM and stdin EOF is killed after the grace", ctx do
    opts = worker_opts(ctx, args: ["--ignore-sigterm", "--linger"], shutdown_grace_ms: 200)
    pid = start_supervised!({Worker, opts})
    {:ok, "pong"} = Worker.call(pid, "ping")
    info = Worker.info(pid)

    {micros, :ok} = :timer.tc(fn -> stop_supervised({Worker, opts[:worker_id]}) end)
    refute alive?(info.os_pid, info.start_time)
    assert micros >= 200_000
  end

  test "its forked children go with it", ctx do
    opts =
      worker_opts(ctx, args: ["--spawn-children", "2", "--ignore-sigterm"], shutdown_grace_ms: 200)

    pid = start_supervised!({Worker, opts})
    {:ok, children} = Worker.call(pid, "children")

    children =
      children
      |> String.split()
      |> Enum.map(&{String.to_integer(&1), start_time(String.to_integer(&1))})

    assert length(children) == 2

    :ok = stop_supervised({Worker, opts[:worker_id]})
    assert eventually(fn -> Enum.all?(children, fn {p, s} -> not alive?(p, s) end) end)
  end

  @tag :capture_log
  test "when python exits the worker stops with its status", ctx do
    Process.flag(:trap_exit, true)
    {:ok, pid} = Worker.start_link(worker_opts(ctx))
    {:ok, os_pid} = Worker.call(pid, "pid")
    os_pid = String.to_integer(os_pid)
    kill9(os_pid, Worker.info(pid).start_time)
    assert_receive {:EXIT, ^pid, {:python_exited, 137}}, 5_000
  end

  test "a worker cannot start without a registry", ctx do
    Process.flag(:trap_exit, true)

    assert {:error, %ProcessRegistry.NotRunningError{name: :no_such_registry}} =
             Worker.start_link(worker_opts(ctx, registry: :no_such_registry))
  end

  test "invalid options raise ArgumentError naming them", ctx do
    base = worker_opts(ctx)

    for {key, value} <- [
          python: "/nonexistent/python3",
          script: "/nonexistent/bridge.py",
          args: "--linger",
          args: [:linger],
          env: [{"A", 1}],
          env: %{"A" => "1"},
          registry: "reg",
          shutdown_grace_ms: -1,
          bogus: 1
        ] do
      assert_raise ArgumentError, ~r/#{key}/, fn ->
        Worker.start_link(Keyword.put(base, key, value))
      end
    end

    assert_raise ArgumentError, ~r/worker_id/, fn -> Worker.start_link(script: ctx.script) end
    assert_raise ArgumentError, fn -> Worker.start_link(:nope) end
  end
end
