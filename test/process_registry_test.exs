defmodule DSPexProcess.ProcessRegistryTest do
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog
  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.ProcessRegistry

  setup do
    name = unique_name(:registry)
    pid = start_supervised!({ProcessRegistry, name: name, cleanup_interval: :infinity})
    %{reg: name, server: pid}
  end

  describe "registering a real python process" do
    test "records pid and start time; reads back; stats", %{reg: reg} do
      {port, os_pid} = start_python()
      assert :ok = ProcessRegistry.register_worker("w1", self(), os_pid, "fp-1", reg)

      assert {:ok, info} = ProcessRegistry.get_worker_info("w1", reg)
      assert info.elixir_pid == self()
      assert info.python_pid == os_pid
      assert info.python_start_time == start_time(os_pid)
      assert info.fingerprint == "fp-1"
      assert abs(info.registered_at - System.os_time(:second)) <= 2

      assert ProcessRegistry.get_stats(reg) == %{
               total_registered: 1,
               alive_workers: 1,
               dead_workers: 0,
               active_python_pids: 1
             }

      assert ProcessRegistry.get_active_python_pids(reg) == [os_pid]
      assert [{"w1", ^info}] = ProcessRegistry.list_all_workers(reg)
      assert [{"w1", ^info}] = ProcessRegistry.get_workers_by_fingerprint("fp-1", reg)
      assert [] = ProcessRegistry.get_workers_by_fingerprint("other", reg)
      Port.close(port)
    end

    test "nil python pid is allowed and filtered from active pids", %{reg: reg} do
      assert :ok = ProcessRegistry.register_worker(:no_pid, self(), nil, "fp", reg)

      assert {:ok, %{python_pid: nil, python_start_time: nil}} =
               ProcessRegistry.get_worker_info(:no_pid, reg)

      assert ProcessRegistry.get_active_python_pids(reg) == []

      assert %{total_registered: 1, alive_workers: 1, active_python_pids: 0} =
               ProcessRegistry.get_stats(reg)
    end

    test "worker ids may be any term; re-registering replaces", %{reg: reg} do
      {port, os_pid} = start_python()
      # Binary ids around the inline limit (21 bytes, 22 with the tag byte) and around and
      # past the NIF's 128-byte stack buffer; a bitstring; binaries that look like another
      # id's encoding.
      ids =
        ["s", :a, 42, {:pool, 1}, %{k: [1, 2]}, 1.5, <<0, 255>>] ++
          ["", String.duplicate("x", 21), String.duplicate("x", 22)] ++
          [String.duplicate("y", 127), String.duplicate("y", 128), String.duplicate("z", 200)] ++
          [<<1::3>>, :erlang.term_to_binary(:a), <<0, ?s>>, <<131>>]

      for id <- ids, do: assert(:ok = ProcessRegistry.register_worker(id, self(), nil, "x", reg))

      for id <- ids, do: assert({:ok, _} = ProcessRegistry.get_worker_info(id, reg))

      assert Enum.sort(Enum.map(ProcessRegistry.list_all_workers(reg), &elem(&1, 0))) ==
               Enum.sort(ids)

      assert :ok = ProcessRegistry.register_worker({:pool, 1}, self(), os_pid, "y", reg)

      assert {:ok, %{python_pid: ^os_pid, fingerprint: "y"}} =
               ProcessRegistry.get_worker_info({:pool, 1}, reg)

      assert length(ProcessRegistry.list_all_workers(reg)) == length(ids)

      for id <- ids, do: assert(:ok = ProcessRegistry.unregister_worker(id, reg))
      assert ProcessRegistry.list_all_workers(reg) == []
      assert :ok = ProcessRegistry.unregister_worker("never registered", reg)
      assert {:error, :not_found} = ProcessRegistry.get_worker_info("never registered", reg)
      Port.close(port)
    end

    test "a python pid that does not exist is an error", %{reg: reg} do
      {port, os_pid} = start_python()
      Port.close(port)
      assert eventually(fn -> not File.exists?("/proc/#{os_pid}") end)

      assert {:error, :no_such_process} =
               ProcessRegistry.register_worker("gone", self(), os_pid, "fp", reg)

      assert {:error, :not_found} = ProcessRegistry.get_worker_info("gone", reg)
    end
  end

  describe "dead workers" do
    test "a killed worker leaves at once, without the sweep", %{reg: reg} do
      {port, os_pid} = start_python()
      worker = spawn(fn -> Process.sleep(:infinity) end)
      :ok = ProcessRegistry.register_worker("w", worker, os_pid, "fp", reg)
      :ok = ProcessRegistry.register_worker("other", self(), nil, "fp", reg)

      Process.exit(worker, :kill)

      assert eventually(fn ->
               ProcessRegistry.get_worker_info("w", reg) == {:error, :not_found}
             end)

      assert [{"other", _}] = ProcessRegistry.list_all_workers(reg)
      Port.close(port)
    end

    test "one process owning several workers takes them all with it", %{reg: reg} do
      parent = self()

      owner =
        spawn(fn ->
          for i <- 1..5, do: :ok = ProcessRegistry.register_worker({:w, i}, self(), nil, "f", reg)
          send(parent, :registered)
          Process.sleep(:infinity)
        end)

      assert_receive :registered
      assert length(ProcessRegistry.list_all_workers(reg)) == 5
      Process.exit(owner, :kill)
      assert eventually(fn -> ProcessRegistry.list_all_workers(reg) == [] end)
    end

    test "an owner of many workers dies: all leave (off the schedulers) and its OS process ends",
         %{reg: reg} do
      # Past 1,000 entries, the `down` callback hands the removal and the guardian's notice
      # to a thread of its own: the notice must still arrive, and name the right process.
      %{script: script} = setup_bridge("bigowner")
      parent = self()

      owner =
        spawn(fn ->
          # A port program of this VM (the guardian ends only those) that lingers after
          # its port closes with its owner.
          port =
            Port.open({:spawn_executable, python()}, [
              :binary,
              {:packet, 4},
              args: [script, "--linger"]
            ])

          {:os_pid, os_pid} = Port.info(port, :os_pid)
          send(parent, {:os_pid, os_pid})
          :ok = ProcessRegistry.register_worker({:big, 0}, self(), os_pid, "big", reg)

          for i <- 1..1_500,
              do: :ok = ProcessRegistry.register_worker({:big, i}, self(), nil, "big", reg)

          send(parent, :registered)
          Process.sleep(:infinity)
        end)

      assert_receive {:os_pid, os_pid}, 10_000
      start = start_time(os_pid)
      assert_receive :registered, 10_000
      assert length(ProcessRegistry.get_workers_by_fingerprint("big", reg)) == 1_501

      verified? = fn ->
        MapSet.member?(:sys.get_state(DSPexProcess.Guardian).verified, {os_pid, start})
      end

      assert eventually(verified?, 5_000), "the guardian took it as this VM's port program"

      log =
        capture_log(fn ->
          Process.exit(owner, :kill)

          assert eventually(
                   fn -> ProcessRegistry.get_stats(reg).total_registered == 0 end,
                   5_000
                 )

          assert ProcessRegistry.get_workers_by_fingerprint("big", reg) == []
          assert eventually(fn -> not alive?(os_pid, start) end, 10_000)
          # The guardian logs when its ending thread reports, a moment after the process
          # is gone (seconds on a loaded machine): wait until it has taken the report (the
          # identity leaves its verified set), then for the line to be written.
          assert eventually(fn -> not verified?.() end, 10_000)

          Logger.flush()
        end)

      assert log =~ "ended OS process #{os_pid} (worker {:big, 0})"
    end

    test "an entry registered for an already-dead pid is swept and logged", %{reg: reg} do
      dead = dead_pid()
      :ok = ProcessRegistry.register_worker("zombie-entry", dead, nil, "fp", reg)
      :ok = ProcessRegistry.register_worker("live", self(), nil, "fp", reg)

      assert [{"zombie-entry", %{elixir_pid: ^dead}}] = ProcessRegistry.validate_workers(reg)
      assert %{dead_workers: 1, alive_workers: 1} = ProcessRegistry.get_stats(reg)

      log = capture_log(fn -> assert ProcessRegistry.cleanup_dead_workers(reg) == 1 end)
      assert log =~ "removed 1 dead worker"
      assert log =~ "zombie-entry"
      assert ProcessRegistry.validate_workers(reg) == []
      assert ProcessRegistry.cleanup_dead_workers(reg) == 0
      assert [{"live", _}] = ProcessRegistry.list_all_workers(reg)
    end

    test "the periodic sweep removes dead entries by itself" do
      name = unique_name(:swept)
      start_supervised!({ProcessRegistry, name: name, cleanup_interval: 20}, id: :swept)
      dead = dead_pid()

      log =
        capture_log(fn ->
          :ok = ProcessRegistry.register_worker("dead", dead, nil, "fp", name)
          assert eventually(fn -> ProcessRegistry.list_all_workers(name) == [] end)
          # The sweep logs right after it removes; let the line reach the capture.
          Process.sleep(300)
        end)

      assert log =~ "removed 1 dead worker"
    end
  end

  describe "restarts" do
    test "killing the registry process loses no registration", %{reg: reg, server: server} do
      {port, os_pid} = start_python()
      :ok = ProcessRegistry.register_worker("w1", self(), os_pid, "fp1", reg)
      :ok = ProcessRegistry.register_worker("w2", self(), nil, "fp2", reg)
      before = Enum.sort(ProcessRegistry.list_all_workers(reg))

      ref = Process.monitor(server)
      Process.exit(server, :kill)
      assert_receive {:DOWN, ^ref, :process, ^server, :killed}
      assert eventually(fn -> is_pid(Process.whereis(reg)) and Process.whereis(reg) != server end)

      assert Enum.sort(ProcessRegistry.list_all_workers(reg)) == before
      assert ProcessRegistry.get_active_python_pids(reg) == [os_pid]

      # Monitoring survives the restart too.
      worker = spawn(fn -> Process.sleep(:infinity) end)
      :ok = ProcessRegistry.register_worker("w3", worker, nil, "fp3", reg)
      Process.exit(worker, :kill)

      assert eventually(fn ->
               ProcessRegistry.get_worker_info("w3", reg) == {:error, :not_found}
             end)

      Port.close(port)
    end

    test "a registry stopped on purpose keeps every entry; a restart serves the same table",
         %{reg: reg} do
      :ok = ProcessRegistry.register_worker("w", self(), nil, "fp", reg)
      :ok = stop_supervised({ProcessRegistry, reg})
      refute Process.whereis(reg)

      assert {:ok, %{fingerprint: "fp"}} = ProcessRegistry.get_worker_info("w", reg)
      start_supervised!({ProcessRegistry, name: reg})
      assert {:ok, %{fingerprint: "fp"}} = ProcessRegistry.get_worker_info("w", reg)
    end

    test "GenServer.stop of the default registry process loses nothing; callers never notice" do
      :ok = ProcessRegistry.register_worker({:stop_default, self()}, self(), nil, "fp")
      server = Process.whereis(ProcessRegistry)
      :ok = GenServer.stop(server)
      assert {:ok, _} = ProcessRegistry.get_worker_info({:stop_default, self()})
      # The application's supervisor restarts it on the same table.
      assert eventually(fn -> is_pid(Process.whereis(ProcessRegistry)) end)
      assert {:ok, _} = ProcessRegistry.get_worker_info({:stop_default, self()})
      :ok = ProcessRegistry.unregister_worker({:stop_default, self()})
    end

    test "a name that was never started says how to start one" do
      name = unique_name(:never_started)

      error =
        assert_raise ProcessRegistry.NotRunningError, fn -> ProcessRegistry.get_stats(name) end

      assert Exception.message(error) =~ "supervision tree"
      assert Exception.message(error) =~ inspect(name)
    end

    test "the single-entry calls, which resolve the name natively, raise for an unknown name" do
      name = unique_name(:never_started_entry)

      for call <- [
            fn -> ProcessRegistry.register_worker("w", self(), nil, "fp", name) end,
            fn -> ProcessRegistry.unregister_worker("w", name) end,
            fn -> ProcessRegistry.get_worker_info("w", name) end
          ] do
        assert_raise ProcessRegistry.NotRunningError, call
      end

      # Nothing was created under the unknown name.
      assert_raise ProcessRegistry.NotRunningError, fn -> ProcessRegistry.get_stats(name) end
    end

    test "a name the NIF does not know (as after a NIF reload) is found and named again" do
      name = unique_name(:unnamed)
      table = DSPexProcess.Native.registry_new(false)
      # The table as `ensure_table/2` stores it, without the NIF's name for it.
      key = {ProcessRegistry, name}
      :persistent_term.put(key, table)
      on_exit(fn -> :persistent_term.erase(key) end)
      assert DSPexProcess.Native.registry_get(name, "w") == :not_running

      :ok = ProcessRegistry.register_worker("w", self(), nil, "fp", name)
      assert {:ok, %{fingerprint: "fp"}} = DSPexProcess.Native.registry_get(table, "w")
      # Named again: the NIF resolves the name itself from now on.
      assert {:ok, %{fingerprint: "fp"}} = DSPexProcess.Native.registry_get(name, "w")
      assert {:ok, %{fingerprint: "fp"}} = ProcessRegistry.get_worker_info("w", name)
      :ok = ProcessRegistry.unregister_worker("w", name)
      assert {:error, :not_found} = DSPexProcess.Native.registry_get(table, "w")
    end

    test "what is not a name, a registry's own table included, is refused as before" do
      name = unique_name(:by_table)
      start_supervised!({ProcessRegistry, name: name})
      table = ProcessRegistry.resource!(name)

      for bad <- [table, "a string", make_ref(), {:via, :x}] do
        assert_raise ArgumentError, ~r/named by an atom/, fn ->
          ProcessRegistry.register_worker("w", self(), nil, "fp", bad)
        end

        assert_raise ArgumentError, ~r/named by an atom/, fn ->
          ProcessRegistry.unregister_worker("w", bad)
        end

        assert_raise ArgumentError, fn -> ProcessRegistry.get_worker_info("w", bad) end
      end

      # The NIF itself (which decodes its own arguments) answers a wrong type with badarg.
      for args <- [
            [name, "w", :not_a_pid, nil, "fp"],
            [name, "w", self(), "not an integer", "fp"],
            [name, "w", self(), nil, :not_a_binary]
          ] do
        assert_raise ArgumentError, fn -> apply(DSPexProcess.Native, :registry_register, args) end
      end

      assert ProcessRegistry.get_stats(name).total_registered == 0
    end
  end

  describe "in a tree of its own (DSPex's supervisor lists it)" do
    test "the tree starts while the application's registry runs, and the table is shared" do
      assert ProcessRegistry.start_link([]) == :ignore

      {:ok, sup} =
        Supervisor.start_link(
          [{Registry, keys: :unique, name: unique_name(:reg)}, ProcessRegistry],
          strategy: :one_for_one
        )

      children = Supervisor.which_children(sup)
      assert {ProcessRegistry, :undefined, :worker, [ProcessRegistry]} in children
      assert Enum.any?(children, &match?({_, pid, :supervisor, [Registry]} when is_pid(pid), &1))

      :ok = ProcessRegistry.register_worker({:tree, self()}, self(), nil, "fp")
      :ok = Supervisor.stop(sup)
      # The tree is gone; the registry is not.
      assert {:ok, _} = ProcessRegistry.get_worker_info({:tree, self()})
      assert is_pid(Process.whereis(ProcessRegistry))
      :ok = ProcessRegistry.unregister_worker({:tree, self()})
    end
  end

  test "a listing over every shard says what get_worker_info says for each entry", %{reg: reg} do
    sleeper = Port.open({:spawn_executable, System.find_executable("sleep")}, args: ["30"])
    {:os_pid, os_pid} = Port.info(sleeper, :os_pid)
    start = start_time(os_pid)
    on_exit(fn -> if alive?(os_pid, start), do: kill9(os_pid, start) end)

    # Shared and unique fingerprints, ids of several term types, with and without a pid.
    ids =
      for i <- 1..3_000 do
        id = Enum.at(["w#{i}", {:tuple, i}, i, String.duplicate("x", 200) <> "#{i}"], rem(i, 4))
        fp = if rem(i, 3) == 0, do: "shared_#{rem(i, 7)}", else: "unique_#{i}"
        python = if rem(i, 5) == 0, do: os_pid
        :ok = ProcessRegistry.register_worker(id, self(), python, fp, reg)
        id
      end

    listed = ProcessRegistry.list_all_workers(reg)
    assert length(listed) == length(ids)
    assert Enum.sort(Enum.map(listed, &elem(&1, 0))) == Enum.sort(ids)

    for {id, info} <- listed do
      assert {:ok, ^info} = ProcessRegistry.get_worker_info(id, reg)
    end

    # Unregistered before the port closes: the guardian has nothing to end or log.
    Enum.each(ids, &ProcessRegistry.unregister_worker(&1, reg))
    Port.close(sleeper)
  end

  test "a listing under fingerprint churn gives each entry its own fingerprint", %{reg: reg} do
    for i <- 1..50_000,
        do: :ok = ProcessRegistry.register_worker({:filler, i}, self(), nil, "filler", reg)

    parent = self()

    # Fingerprints freed and made again while the listings run: a listing must never give
    # an entry a fingerprint that another entry had.
    churner =
      spawn_link(fn ->
        Stream.repeatedly(fn ->
          for {tag, fp} <- [a: "fpAAAA", b: "fpBBBB"] do
            for i <- 1..200,
                do: :ok = ProcessRegistry.register_worker({tag, i}, parent, nil, fp, reg)

            for i <- 1..200, do: :ok = ProcessRegistry.unregister_worker({tag, i}, reg)
          end
        end)
        |> Stream.run()
      end)

    wrong =
      for _ <- 1..30,
          {{tag, _}, %{fingerprint: fp}} <- ProcessRegistry.list_all_workers(reg),
          fp != %{filler: "filler", a: "fpAAAA", b: "fpBBBB"}[tag],
          do: {tag, fp}

    Process.unlink(churner)
    Process.exit(churner, :kill)
    assert wrong == []
  end

  test "100 processes register and unregister concurrently", %{reg: reg} do
    parent = self()

    tasks =
      for t <- 1..100 do
        spawn_link(fn ->
          for i <- 1..60 do
            id = {t, rem(i, 7)}

            if rem(i, 3) == 0,
              do: :ok = ProcessRegistry.unregister_worker(id, reg),
              else: :ok = ProcessRegistry.register_worker(id, self(), nil, "fp#{t}", reg)
          end

          # Leave a known state: ids {t, 0..3} registered, the rest removed.
          for k <- 0..6 do
            if k < 4,
              do: :ok = ProcessRegistry.register_worker({t, k}, self(), nil, "fp#{t}", reg),
              else: :ok = ProcessRegistry.unregister_worker({t, k}, reg)
          end

          send(parent, {:done, t})
          receive do: (:stop -> :ok)
        end)
      end

    for t <- 1..100, do: assert_receive({:done, ^t}, 10_000)

    assert %{total_registered: 400, alive_workers: 400, dead_workers: 0} =
             ProcessRegistry.get_stats(reg)

    assert length(ProcessRegistry.get_workers_by_fingerprint("fp42", reg)) == 4

    for pid <- tasks, do: send(pid, :stop)
    assert eventually(fn -> ProcessRegistry.get_stats(reg).total_registered == 0 end)
  end

  describe "bad input" do
    test "raises ArgumentError and leaves the registry unchanged", %{reg: reg} do
      {port, os_pid} = start_python()
      :ok = ProcessRegistry.register_worker("keep", self(), os_pid, "fp", reg)
      before = ProcessRegistry.list_all_workers(reg)
      own = String.to_integer(System.pid())

      bad = [
        {"w", self(), 0, "fp"},
        {"w", self(), -1, "fp"},
        {"w", self(), 1, "fp"},
        {"w", self(), own, "fp"},
        {"w", self(), "123", "fp"},
        {"w", self(), 1.5, "fp"},
        {"w", self(), 2 ** 80, "fp"},
        {"w", :not_a_pid, os_pid, "fp"},
        {"w", nil, os_pid, "fp"},
        {"w", self(), os_pid, :fp},
        {"w", self(), os_pid, nil},
        {"keep", self(), -5, "fp"}
      ]

      for {id, epid, ppid, fp} <- bad do
        assert_raise ArgumentError, fn ->
          ProcessRegistry.register_worker(id, epid, ppid, fp, reg)
        end
      end

      assert ProcessRegistry.list_all_workers(reg) == before
      assert_raise ArgumentError, fn -> ProcessRegistry.get_workers_by_fingerprint(1, reg) end
      assert_raise ArgumentError, fn -> ProcessRegistry.get_stats("not an atom") end
      Port.close(port)
    end

    test "pids the kernel cannot have are refused before reaching the NIF", %{reg: reg} do
      for pid <- [2 ** 31, 2 ** 40, 2 ** 64 + 7] do
        assert_raise ArgumentError, ~r/2\^31-1/, fn ->
          ProcessRegistry.register_worker("w", self(), pid, "fp", reg)
        end
      end

      assert ProcessRegistry.list_all_workers(reg) == []
    end

    test "options are validated" do
      assert_raise ArgumentError, ~r/unknown keys \[:bogus\]/, fn ->
        ProcessRegistry.start_link(bogus: 1)
      end

      # One message style for every option of the library.
      assert_raise ArgumentError,
                   ":cleanup_interval must be a positive integer or :infinity, got: 0",
                   fn -> ProcessRegistry.start_link(cleanup_interval: 0) end

      assert_raise ArgumentError, ":name must be an atom, got: \"x\"", fn ->
        ProcessRegistry.start_link(name: "x")
      end

      assert_raise ArgumentError,
                   ~r/^:grace_ms must be an integer from 0 to 86400000, got: -1$/,
                   fn ->
                     ProcessRegistry.start_link(cleanup_on_start: [grace_ms: -1])
                   end

      assert_raise ArgumentError, ":interval must be a positive integer, got: 0", fn ->
        DSPexProcess.OrphanMonitor.start_link(interval: 0)
      end

      assert_raise ArgumentError,
                   ~r/^:containment must be one of \[:auto, :cgroup, :none\]/,
                   fn ->
                     DSPexProcess.Guardian.validate!(containment: :maybe)
                   end

      assert_raise ArgumentError, ~r/keyword list/, fn -> ProcessRegistry.start_link(:oops) end
    end
  end

  test "the application starts the default registry" do
    assert is_pid(Process.whereis(ProcessRegistry))
    assert %{total_registered: _} = ProcessRegistry.get_stats()
  end
end
