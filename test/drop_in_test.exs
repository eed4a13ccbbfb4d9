defmodule DSPexProcess.DropInTest do
  # DSPex's own pool, unchanged, with this library in place of its ProcessRegistry and
  # OrphanDetector. The client below is written from the facts of issue "drop-in": its
  # worker does not trap exits, opens a plain port, registers in init/1 ignoring the result,
  # unregisters then closes the port in terminate/2, stamps no markers; its bridge spins at
  # 100% CPU on stdin EOF; its tree lists DSPex.Python.ProcessRegistry as a child.
  #
  # Each scenario boots the client in a VM of its own and proves, by pid and start time,
  # that no Python process of it is left within 3 s, and that nothing else was signalled.
  use ExUnit.Case, async: false

  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.ProcessRegistry

  @moduletag timeout: 600_000
  @root Path.expand("..", __DIR__)
  @pool_size 3
  @left_within 3_000

  @mix_exs """
  defmodule DSPex.MixProject do
    use Mix.Project

    def project do
      [app: :dspex, version: "0.1.0", elixir: "~> 1.14",
       deps: [{:dspex_process, path: ROOT}]]
    end

    def application, do: [extra_applications: [:logger], mod: {DSPex.Application, []}]
  end
  """

  # The client's configuration. The reference's call forms run for real in these tests
  # (cleanup_orphaned_processes(nil) is a full cleanup), so the detector's defaults scope
  # them to this run's bridge; the VM-stop scenarios turn the OS guardian off, so that what
  # they prove is the stop's own doing.
  @config """
  import Config
  bridge = System.get_env("DSPEX_BRIDGE", "dspy_bridge.py")
  config :dspex_process, :detector, pattern: Path.basename(bridge), cgroups: false

  config :dspex_process, :guardian,
    os_guardian: System.get_env("DSPEX_OS_GUARDIAN", "true") == "true"
  """

  @application """
  defmodule DSPex.Application do
    use Application

    def start(_type, _args) do
      children = [
        {Registry, keys: :unique, name: DSPex.Python.Registry},
        DSPex.Python.ProcessRegistry,
        {DynamicSupervisor, strategy: :one_for_one, name: DSPex.Python.WorkerSupervisor},
        {DSPex.Python.Pool, size: String.to_integer(System.get_env("DSPEX_POOL_SIZE", "2"))}
      ]

      Supervisor.start_link(children, strategy: :one_for_one, name: DSPex.Supervisor)
    end
  end
  """

  @pool """
  defmodule DSPex.Python.Pool do
    use GenServer

    def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)
    def workers, do: GenServer.call(__MODULE__, :workers)

    def init(opts), do: {:ok, %{size: opts[:size], workers: []}, {:continue, :start}}

    def handle_continue(:start, state) do
      workers =
        for i <- 1..state.size do
          {:ok, pid} =
            DynamicSupervisor.start_child(DSPex.Python.WorkerSupervisor, {DSPex.Python.Worker, "worker_\#{i}"})

          pid
        end

      {:noreply, %{state | workers: workers}}
    end

    def handle_call(:workers, _from, state), do: {:reply, state.workers, state}
  end
  """

  # DSPex's worker as the issue describes it: no trap_exit, a plain Port.open, register
  # in init/1 ignoring the result, unregister then close in terminate/2, no markers.
  @worker """
  defmodule DSPex.Python.Worker do
    use GenServer

    def child_spec(worker_id),
      do: %{id: {__MODULE__, worker_id}, start: {__MODULE__, :start_link, [worker_id]}}

    def start_link(worker_id),
      do: GenServer.start_link(__MODULE__, worker_id, name: {:via, Registry, {DSPex.Python.Registry, worker_id}})

    def init(worker_id) do
      python = System.find_executable("python3")
      bridge = System.fetch_env!("DSPEX_BRIDGE")

      port =
        Port.open({:spawn_executable, python}, [
          :binary, :exit_status, {:packet, 4},
          args: [bridge, "--mode", "pool-worker", "--spin-on-eof"]
        ])

      {:os_pid, python_pid} = Port.info(port, :os_pid)
      fingerprint = "dspex_worker_\#{worker_id}_\#{System.system_time(:nanosecond)}_\#{:rand.uniform(1_000_000)}"
      DSPex.Python.ProcessRegistry.register_worker(worker_id, self(), python_pid, fingerprint)
      {:ok, %{id: worker_id, port: port, python_pid: python_pid}}
    end

    def handle_info({port, {:exit_status, status}}, %{port: port} = state),
      do: {:stop, {:python_exited, status}, state}

    def handle_info(_msg, state), do: {:noreply, state}

    def terminate(_reason, state) do
      DSPex.Python.ProcessRegistry.unregister_worker(state.id)
      Port.close(state.port)
    end
  end
  """

  # The test's handle on the client VM: commands on stdin, answers on stdout ("DRV ...").
  @driver """
  defmodule DSPexClientDriver do
    def main do
      wait_pool(String.to_integer(System.fetch_env!("DSPEX_POOL_SIZE")))
      say("READY \#{System.pid()} \#{DSPexProcess.Guardian.status().os_guardian || 0} \#{pids()}")
      loop()
    end

    defp wait_pool(size) do
      if length(DSPex.Python.ProcessRegistry.list_all_workers()) < size do
        Process.sleep(10)
        wait_pool(size)
      end
    end

    defp loop do
      case IO.gets("") do
        # System.stop/0 returns at once; returning from main would halt the VM instead.
        :eof -> System.stop(); Process.sleep(:infinity)
        line -> line |> String.trim() |> command(); loop()
      end
    end

    defp command("pids"), do: say("PIDS " <> pids())
    defp command("api") do
      report = DSPex.Python.OrphanDetector.cleanup_orphaned_processes(nil)
      stats = DSPex.Python.ProcessRegistry.get_stats()
      active = DSPex.Python.ProcessRegistry.get_active_python_pids()
      say("API \#{report.found} \#{report.terminated} \#{stats.alive_workers} \#{length(active)}")
    end
    defp command("app_stop") do
      :ok = Application.stop(:dspex)
      say("DONE")
    end
    defp command("gen_stop"), do: stop_first(&GenServer.stop/1)
    defp command("kill_worker"), do: stop_first(&Process.exit(&1, :kill))
    defp command("system_stop") do
      say("DONE")
      System.stop()
    end

    # Stops worker_1 and waits until its supervisor has started a new one.
    defp stop_first(how) do
      [{old, _}] = Registry.lookup(DSPex.Python.Registry, "worker_1")
      ref = Process.monitor(old)
      how.(old)
      receive do: ({:DOWN, ^ref, _, _, _} -> :ok)
      wait_new(old)
      say("DONE")
    end

    defp wait_new(old) do
      case Registry.lookup(DSPex.Python.Registry, "worker_1") do
        [{new, _}] when new != old -> :ok
        _ -> Process.sleep(10); wait_new(old)
      end
    end

    defp pids do
      entries =
        for {id, %{python_pid: p, python_start_time: s}} <- DSPex.Python.ProcessRegistry.list_all_workers(),
            p != nil, do: "\#{id}=\#{p}:\#{s}"

      entries |> Enum.sort() |> Enum.join(" ")
    end

    defp say(text), do: IO.puts("DRV " <> text)
  end
  """

  setup_all do
    dir = Path.join(System.tmp_dir!(), "dspex_client_#{System.unique_integer([:positive])}")
    File.mkdir_p!(Path.join(dir, "lib/dspex/python"))
    File.mkdir_p!(Path.join(dir, "config"))
    File.write!(Path.join(dir, "config/config.exs"), @config)
    File.write!(Path.join(dir, "mix.exs"), String.replace(@mix_exs, "ROOT", inspect(@root)))
    File.write!(Path.join(dir, "lib/dspex/application.ex"), @application)
    File.write!(Path.join(dir, "lib/dspex/python/pool.ex"), @pool)
    File.write!(Path.join(dir, "lib/dspex/python/worker.ex"), @worker)
    File.write!(Path.join(dir, "lib/driver.ex"), @driver)
    on_exit(fn -> File.rm_rf(dir) end)

    {out, status} = mix(dir, ["compile"])
    %{dir: dir, compile: {out, status}}
  end

  setup do
    bridge = setup_bridge("dropin")
    # A process of this VM under the same unique script name, and one registered here:
    # no scenario may touch either.
    decoys =
      for registered? <- [false, true] do
        port = Port.open({:spawn_executable, python()}, [:binary, args: [bridge.script]])
        {:os_pid, pid} = Port.info(port, :os_pid)
        on_exit(fn -> safe_close(port) end)

        if registered?,
          do: :ok = ProcessRegistry.register_worker({:decoy, pid}, self(), pid, "decoy")

        {pid, start_time(pid)}
      end

    Map.put(bridge, :decoys, decoys)
  end

  test "compiles next to DSPex's own modules without a redefinition warning, and releases",
       %{dir: dir, compile: {out, status}} do
    assert status == 0, out
    refute out =~ "redefining module", out
    assert out =~ "dspex_process"

    {out, status} = mix(dir, ["release", "--overwrite"], "prod")
    assert status == 0, out
    refute out =~ ~r/Duplicated modules/i, out
    assert File.exists?(Path.join(dir, "_build/prod/rel/dspex/bin/dspex"))
  end

  test "the tree starts as written, and the reference's call forms work", ctx do
    client = boot(ctx)
    send_line(client, "api")
    # cleanup_orphaned_processes(nil) ran (nothing to find); the pool is registered.
    assert "0 0 #{@pool_size} #{@pool_size}" == await(client, "API")
    stop_politely(client, ctx)
  end

  test "Application.stop of the client ends every Python process", ctx do
    client = boot(ctx)
    send_line(client, "app_stop")
    assert await(client, "DONE")
    assert_all_gone(client.pythons)
    assert_untouched(ctx)
    stop_politely(client, ctx)
  end

  test "GenServer.stop of a worker (its terminate/2 runs) ends its Python process", ctx do
    stop_one_worker(ctx, "gen_stop")
  end

  test "Process.exit(worker, :kill) ends its Python process; the restarted one runs", ctx do
    stop_one_worker(ctx, "kill_worker")
  end

  # worker_1 is stopped by `command`; its supervisor starts another. The old Python process
  # goes; the new one and the other workers' keep running.
  defp stop_one_worker(ctx, command) do
    client = boot(ctx)
    [{"worker_1", old} | others] = client.pythons
    send_line(client, command)
    assert await(client, "DONE")
    assert_all_gone([{"worker_1", old}])
    [{"worker_1", new} | _] = pythons(client)
    assert new != old
    Process.sleep(@left_within)
    for {_, id} <- [{"worker_1", new} | others], do: assert(alive?(id))
    assert_untouched(ctx)
    stop_politely(client, ctx)
  end

  test "System.stop/0 ends every Python process before the VM exits", ctx do
    client = boot(ctx, os_guardian: false)
    send_line(client, "system_stop")
    assert_receive {port, {:exit_status, 0}} when port == client.port, 30_000
    # Gone before the VM exited: ended by the stop itself, not by the OS guardian after it.
    for {_, id} <- client.pythons, do: refute(alive?(id))
    assert_untouched(ctx)
  end

  test "SIGTERM to the VM stops it normally: every Python process ends before it exits", ctx do
    client = boot(ctx, os_guardian: false)
    {beam, beam_start} = client.beam
    assert alive?(beam, beam_start)
    {_, 0} = System.cmd("kill", ["-TERM", Integer.to_string(beam)])
    assert_receive {port, {:exit_status, _}} when port == client.port, 30_000
    for {_, id} <- client.pythons, do: refute(alive?(id))
    assert_untouched(ctx)
  end

  test "kill -9 of the VM: the OS guardian ends every Python process, then exits", ctx do
    client = boot(ctx)
    {beam, beam_start} = client.beam
    kill9(beam, beam_start)
    assert_receive {port, {:exit_status, _}} when port == client.port, 10_000
    assert_all_gone(client.pythons)
    assert_gone(client.guardian, "the OS guardian")
    assert_untouched(ctx)
  end

  # The client VM

  defp boot(%{dir: dir, script: script}, opts \\ []) do
    mix = System.find_executable("mix")

    port =
      Port.open({:spawn_executable, mix}, [
        :binary,
        :exit_status,
        {:line, 16_384},
        cd: dir,
        env: [
          {~c"MIX_ENV", ~c"dev"},
          {~c"DSPEX_BRIDGE", String.to_charlist(script)},
          {~c"DSPEX_POOL_SIZE", ~c"#{@pool_size}"},
          {~c"DSPEX_OS_GUARDIAN", ~c"#{Keyword.get(opts, :os_guardian, true)}"}
        ],
        args: ["run", "-e", "DSPexClientDriver.main()"]
      ])

    [beam, guardian | pids] = port |> await_line("READY", 60_000) |> String.split()
    beam = String.to_integer(beam)
    beam_start = start_time(beam)
    # A failed test must not leave its client running.
    on_exit(fn -> if alive?(beam, beam_start), do: kill9(beam, beam_start) end)
    guardian = String.to_integer(guardian)
    # The VM-stop scenarios run without an OS guardian (0).
    assert guardian > 0 == Keyword.get(opts, :os_guardian, true)
    pythons = parse_pids(pids)
    assert length(pythons) == @pool_size
    for {_, id} <- pythons, do: assert(alive?(id))

    %{
      port: port,
      beam: {beam, beam_start},
      guardian: if(guardian > 0, do: {guardian, start_time(guardian)}),
      pythons: pythons
    }
  end

  defp pythons(client) do
    send_line(client, "pids")
    client |> await("PIDS") |> String.split() |> parse_pids()
  end

  defp parse_pids(words) do
    words
    |> Enum.map(fn word ->
      [id, pid, start] = String.split(word, ["=", ":"])
      {id, {String.to_integer(pid), String.to_integer(start)}}
    end)
    |> Enum.sort()
  end

  defp send_line(%{port: port}, line), do: Port.command(port, line <> "\n")

  defp await(%{port: port}, tag), do: await_line(port, tag, 30_000)

  defp await_line(port, tag, timeout) do
    receive do
      {^port, {:data, {:eol, "DRV " <> line}}} ->
        case String.split(line, " ", parts: 2) do
          [^tag, rest] -> rest
          [^tag] -> tag
          _ -> await_line(port, tag, timeout)
        end

      {^port, {:data, _other}} ->
        await_line(port, tag, timeout)

      {^port, {:exit_status, status}} ->
        flunk("the client VM exited with status #{status} while the test waited for #{tag}")
    after
      timeout -> flunk("the client VM did not answer #{tag} in #{timeout} ms")
    end
  end

  # Closing its stdin makes the driver call System.stop/0; its Python processes go too.
  defp stop_politely(client, _ctx) do
    Port.close(client.port)
    {beam, start} = client.beam
    assert eventually(fn -> not alive?(beam, start) end, 30_000)
    assert_all_gone(client.pythons)
  end

  # Assertions

  defp assert_all_gone(pythons) do
    for {worker_id, {pid, start}} <- pythons do
      assert eventually(fn -> not alive?(pid, start) end, @left_within),
             "python #{pid} of #{worker_id} is still running #{@left_within} ms later"
    end
  end

  defp assert_gone({pid, start}, what) do
    assert eventually(fn -> not alive?(pid, start) end, @left_within),
           "#{what} (#{pid}) outlived its VM"
  end

  defp assert_untouched(%{decoys: decoys}) do
    for {pid, start} <- decoys do
      assert alive?(pid, start), "a process the client did not start (#{pid}) was signalled"
    end
  end

  defp alive?({pid, start}), do: alive?(pid, start)

  defp mix(dir, args, env \\ "dev") do
    System.cmd("mix", args, cd: dir, env: [{"MIX_ENV", env}], stderr_to_stdout: true)
  end

  defp safe_close(port) do
    Port.close(port)
  rescue
    ArgumentError -> :ok
  end
end
