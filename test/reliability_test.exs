defmodule DSPexProcess.ReliabilityTest do
  # The battery behind the README's guarantees: randomized protection, PID reuse for real,
  # hostile input, other users, stress, stubborn and vanishing targets, NIF load failure.
  # Not async: BEAMs, hundreds of processes, and timing-sensitive assertions.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.{OrphanDetector, ProcessRegistry}
  alias DSPexProcess.{Native, Termination, Worker}
  alias DSPexProcess.Test.PeerBeam

  @moduletag timeout: 300_000

  setup do
    setup_bridge("rel")
  end

  defp start_worker(script, args \\ []) do
    id = {:rel, System.unique_integer([:positive])}

    pid =
      start_supervised!({Worker, worker_id: id, script: script, python: python(), args: args},
        id: id
      )

    {:ok, "pong"} = Worker.call(pid, "ping")
    info = Worker.info(pid)
    {pid, {info.os_pid, info.start_time}}
  end

  defp leak_identity(script) do
    info = leak_worker(script)
    {info.os_pid, info.start_time}
  end

  # A process whose child has exited but is never reaped: a zombie that carries nothing
  # to match, under a parent that itself matches (a script named by the pattern, run by
  # one of our ports, so active).
  defp zombie_family(script) do
    code = ~S"""
    import os, sys, time
    child = os.fork()
    if child == 0:
        os._exit(0)
    print(child, flush=True)
    while True: time.sleep(1)
    """

    dir = Path.join(System.tmp_dir!(), "dspex_zombie_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    parent_script = Path.join(dir, Path.basename(script))
    File.write!(parent_script, code)

    port =
      Port.open({:spawn_executable, python()}, [
        :binary,
        {:line, 100},
        args: [parent_script]
      ])

    {:os_pid, parent} = Port.info(port, :os_pid)
    zombie = receive do: ({^port, {:data, {:eol, line}}} -> String.to_integer(line))
    File.rm_rf!(dir)
    true = eventually(fn -> File.read!("/proc/#{zombie}/stat") =~ ~r/\) Z / end)
    {port, {parent, start_time(parent)}, zombie}
  end

  describe "randomized protection" do
    test "20 seeded rounds: every protected process survives, every orphan goes",
         %{script: script, pattern: pattern} do
      seed = String.to_integer(System.get_env("DSPEX_SEED") || "#{:erlang.phash2(make_ref())}")
      :rand.seed(:exsss, {seed, seed, seed})
      foreign = PeerBeam.start(script, 2)
      foreign_ids = Enum.map(foreign.worker_pids, &{&1, start_time(&1)})

      for round <- 1..20 do
        active = for _ <- 1..:rand.uniform(3), do: start_worker(script)
        leaked = for _ <- 0..(:rand.uniform(3) - 1)//1, do: leak_identity(script)
        reparented = make_orphans(:rand.uniform(4) - 1, Path.basename(script))
        unmanaged = for _ <- 0..(:rand.uniform(2) - 1)//1, do: detach_and_run(script, [])

        dead_beam =
          if :rand.uniform(4) == 1 do
            peer = PeerBeam.start(script, 1, ["--linger"])
            PeerBeam.kill(peer)
            Enum.map(peer.worker_pids, &{&1, start_time(&1)})
          else
            []
          end

        {zport, zparent, zombie} =
          if :rand.uniform(3) == 1, do: zombie_family(script), else: {nil, nil, nil}

        protected =
          Enum.map(active, &elem(&1, 1)) ++ foreign_ids ++ unmanaged ++ List.wrap(zparent)

        orphans = leaked ++ reparented ++ dead_beam
        context = "seed #{seed}, round #{round} (rerun with DSPEX_SEED=#{seed})"

        before = OrphanDetector.classify_processes(pattern: pattern, min_age_ms: 0)

        {report, _log} =
          with_log(fn ->
            OrphanDetector.cleanup_orphaned_processes(
              pattern: pattern,
              min_age_ms: 0,
              grace_ms: 1_000
            )
          end)

        assert report.found == length(orphans),
               "#{context}: expected #{inspect(orphans)}, found " <>
                 "#{inspect(Enum.map(report.details, fn {o, r} -> {o.pid, o.reason, r} end))}; " <>
                 "classified before: #{inspect(before, limit: :infinity)}"

        assert report.errors == 0, context
        assert all_alive?(protected), "a protected process was touched: #{context}"
        assert eventually(fn -> all_gone?(orphans) end), "an orphan survived: #{context}"
        if zombie, do: assert(File.read!("/proc/#{zombie}/stat") =~ ~r/\) Z /, context)

        # Next round starts clean: stop this round's own processes.
        for {pid, _} <- active, do: :ok = GenServer.stop(pid)
        if zport, do: Port.close(zport)
        kill_listed(unmanaged ++ List.wrap(zparent))
      end

      PeerBeam.stop(foreign)
    end
  end

  defp kill_listed(ids), do: Termination.run(ids, grace_ms: 0, kill_wait_ms: 1_000)

  describe "PID reuse for real" do
    @helper ~S"""
    import os, sys
    py, script, last = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if last >= 0:
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(last))
    pid = os.fork()
    if pid == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.execv(py, [py, script, "--linger"])
    print(pid, flush=True)
    """

    @in_namespace ~S"""
    script = System.fetch_env!("REUSE_SCRIPT")
    py = System.fetch_env!("REUSE_PY")
    helper = System.fetch_env!("REUSE_HELPER")
    pattern = Path.basename(script)
    alias DSPex.Python.OrphanDetector
    # The namespace dies with its guard: a cgroup named in it could not be judged outside.
    Application.put_env(:dspex_process, :guardian, containment: :none)
    {:ok, _} = Application.ensure_all_started(:dspex_process)

    orphan = fn last ->
      {out, 0} = System.cmd(py, ["-c", helper, py, script, Integer.to_string(last)])
      String.to_integer(String.trim(out))
    end

    wait = fn f -> Enum.find_value(1..500, fn _ -> f.() || (Process.sleep(10) && nil) end) end
    a = orphan.(-1)
    [recorded] = wait.(fn -> match?([_], l = OrphanDetector.find_orphaned_processes(pattern: pattern)) && l end)
    {_, 0} = System.cmd("kill", ["-9", Integer.to_string(a)])
    true = wait.(fn -> not File.exists?("/proc/#{a}") end)

    # Make the next process take the dead orphan's pid.
    b = Enum.find_value(1..20, fn _ -> (b = orphan.(a - 1)) == a && b end)
    true = is_integer(b)
    [now] = wait.(fn -> match?([_], l = OrphanDetector.find_orphaned_processes(pattern: pattern)) && l end)
    IO.puts("REUSE #{recorded.pid} #{recorded.start_time} #{now.pid} #{now.start_time}")

    report = OrphanDetector.cleanup_orphaned_processes([recorded], pattern: pattern)
    [{_, outcome}] = report.details
    alive = File.exists?("/proc/#{b}") and not (File.read!("/proc/#{b}/stat") =~ ~r/\) Z /)
    IO.puts("OUTCOME #{inspect(outcome)} terminated=#{report.terminated} b_alive=#{alive}")
    OrphanDetector.cleanup_orphaned_processes(pattern: pattern, grace_ms: 1_000)
    """

    test "a new process that takes a recorded orphan's pid is never signalled", %{script: script} do
      unshare = System.find_executable("unshare") || flunk("unshare (util-linux) is needed")
      ebin = List.to_string(:code.lib_dir(:dspex_process, :ebin))
      elixir = System.find_executable("elixir")

      {out, status} =
        System.cmd(
          unshare,
          [
            "--pid",
            "--fork",
            "--mount-proc",
            "sh",
            "-c",
            ~s("$0" -pa "$1" -e "$2"; exit $?),
            elixir,
            ebin,
            @in_namespace
          ],
          env: [{"REUSE_SCRIPT", script}, {"REUSE_PY", python()}, {"REUSE_HELPER", @helper}],
          stderr_to_stdout: true
        )

      assert status == 0, out
      [_, pid_a, start_a, pid_b, start_b] = Regex.run(~r/REUSE (\d+) (\d+) (\d+) (\d+)/, out)
      assert pid_a == pid_b, "the pid was not reused: #{out}"
      assert start_a != start_b
      assert out =~ "OUTCOME {:ok, :already_gone} terminated=0 b_alive=true"
    end
  end

  describe "hostile input" do
    defp random_term(0),
      do:
        Enum.random([
          0,
          -1,
          1,
          2 ** 70,
          -(2 ** 70),
          1.5,
          :atom,
          "",
          <<0, 255>>,
          [],
          {},
          %{},
          self(),
          make_ref(),
          nil,
          true
        ])

    defp random_term(depth) do
      case :rand.uniform(8) do
        1 -> :rand.uniform(2 ** 40) - 2 ** 39
        2 -> :crypto_free_bytes |> then(fn _ -> :rand.bytes(:rand.uniform(64)) end)
        3 -> for _ <- 1..:rand.uniform(4), do: random_term(depth - 1)
        4 -> List.to_tuple(for _ <- 1..:rand.uniform(3), do: random_term(depth - 1))
        5 -> %{random_term(depth - 1) => random_term(depth - 1)}
        6 -> String.duplicate("x", :rand.uniform(5000))
        7 -> Enum.random([:infinity, :ok, System.pid(), String.to_integer(System.pid())])
        _ -> random_term(0)
      end
    end

    test "every NIF takes 2,000 random terms without crashing the VM or signalling" do
      seed = :erlang.phash2(make_ref())
      :rand.seed(:exsss, {seed, 1, 2})
      reg = unique_name(:hostile)
      start_supervised!({ProcessRegistry, name: reg, cleanup_interval: :infinity})
      resource = ProcessRegistry.resource!(reg)
      me = {String.to_integer(System.pid()), start_time(String.to_integer(System.pid()))}

      # Every NIF but those that change the VM's own state (which guardian process to
      # tell, containment on or off, moving processes between cgroups, removing cgroups)
      # takes random terms; terminate_start gets only targets that cannot name a live
      # process of ours (pid <= 1 or beyond pid_max), so a random term can never signal.
      stateful = [
        guardian_attach: 1,
        guardian_take_notices: 0,
        containment_start: 1,
        containment_stop: 0,
        cgroup_enter: 2,
        cgroup_dissolve: 2,
        remove_dead_vm_cgroups: 0,
        terminate_start: 3,
        load_nif: 0
      ]

      nifs = Native.__info__(:functions) -- [{:library_path, 0}, {:load_error, 0} | stateful]
      assert {:detect, 5} in nifs and {:port_child?, 1} in nifs

      for _ <- 1..2_000 do
        {name, arity} = Enum.random(nifs)
        args = for _ <- 1..arity//1, do: Enum.random([random_term(2), resource, random_term(0)])

        try do
          apply(Native, name, args)
        rescue
          e in [ArgumentError, ErlangError] -> e
        end
      end

      for targets <- [
            [{1, 0}],
            [{0, 0}, {-1, 5}],
            [{2 ** 40, 1}],
            [me],
            :nope,
            [{:a, :b}],
            [1, 2]
          ],
          grace <- [0, -1, :x] do
        try do
          Native.terminate_start(
            targets,
            %{grace_ms: grace, kill_wait_ms: 0, kill_group: true, allow_other_users: false},
            1
          )
        rescue
          e in [ArgumentError, ErlangError] -> e
        end
      end

      # Still alive, still answering, and the registry is intact.
      assert %{total_registered: _} = ProcessRegistry.get_stats(reg)
      assert Process.alive?(self())

      for _ <- 1..7,
          do:
            receive(
              do:
                ({:dspex_terminated, 1, outcomes} ->
                   assert Enum.all?(outcomes, &match?({:error, _}, &1))),
              after: (100 -> :ok)
            )
    end

    test "public functions refuse bad input with clear errors" do
      for bad <- [1.5, "name", {:a}, self()] do
        assert_raise ArgumentError, fn -> ProcessRegistry.get_stats(bad) end
      end

      assert_raise ProcessRegistry.NotRunningError, fn -> ProcessRegistry.get_stats(nil) end

      for pattern <- [
            "",
            "a\0b",
            String.duplicate("y", 4097),
            [],
            List.duplicate("z", 65),
            [:x],
            42
          ] do
        assert_raise ArgumentError, ~r/pattern/, fn ->
          OrphanDetector.find_orphaned_processes(pattern: pattern)
        end
      end

      huge = List.duplicate(%{pid: 2 ** 70, start_time: 1}, 10_000)

      {report, _log} =
        with_log(fn ->
          OrphanDetector.cleanup_orphaned_processes(huge, pattern: "dspex_nothing_matches_this.py")
        end)

      assert report.found == 10_000 and report.terminated == 0 and report.errors == 10_000
    end
  end

  describe "other users" do
    test "an orphan owned by nobody is refused by default and ended when allowed", %{
      script: script,
      pattern: pattern
    } do
      # The bridge, lingering, as nobody, detached (its parent exits: re-parented).
      :ok = start_nobody_orphan(script)

      assert eventually(fn ->
               match?(
                 [%{uid: uid}] when uid != 0,
                 OrphanDetector.find_orphaned_processes(pattern: pattern)
               )
             end)

      [orphan] = OrphanDetector.find_orphaned_processes(pattern: pattern)
      assert orphan.uid != 0 and orphan.reason == :reparented

      {report, _log} =
        with_log(fn -> OrphanDetector.cleanup_orphaned_processes(pattern: pattern) end)

      assert [{_, {:error, :refused_other_user}}] = report.details
      assert alive?(orphan.pid, orphan.start_time)

      {report, _log} =
        with_log(fn ->
          OrphanDetector.cleanup_orphaned_processes(
            pattern: pattern,
            allow_other_users: true,
            grace_ms: 2_000
          )
        end)

      assert report.terminated == 1
      assert eventually(fn -> not alive?(orphan.pid, orphan.start_time) end)
    end
  end

  describe "stress" do
    test "200 processes churn the registry while 300 orphans are cleaned up", %{
      script: script,
      pattern: pattern
    } do
      reg = unique_name(:stress)
      start_supervised!({ProcessRegistry, name: reg, cleanup_interval: :infinity})
      active = for _ <- 1..4, do: start_worker(script)
      orphans = make_orphans(300, pattern)
      parent = self()
      :erlang.system_monitor(self(), [{:long_schedule, 50}])

      churners =
        for t <- 1..200 do
          spawn_link(fn ->
            for i <- 1..200 do
              if rem(i, 2) == 0,
                do: :ok = ProcessRegistry.unregister_worker({t, rem(i, 5)}, reg),
                else:
                  :ok = ProcessRegistry.register_worker({t, rem(i, 5)}, self(), nil, "fp", reg)
            end

            for k <- 0..4,
                do: :ok = ProcessRegistry.register_worker({t, k}, self(), nil, "fp", reg)

            send(parent, {:churned, t})
            receive do: (:stop -> :ok)
          end)
        end

      {report, _log} =
        with_log(fn ->
          OrphanDetector.cleanup_orphaned_processes(pattern: pattern, grace_ms: 500)
        end)

      for t <- 1..200, do: assert_receive({:churned, ^t}, 30_000)
      :erlang.system_monitor(:undefined)

      assert report.found == 300 and report.terminated == 300 and report.errors == 0
      assert report.preserved_active == 4
      assert eventually(fn -> all_gone?(orphans) end)
      assert all_alive?(Enum.map(active, &elem(&1, 1)))
      assert %{total_registered: 1000, alive_workers: 1000} = ProcessRegistry.get_stats(reg)
      for pid <- churners, do: send(pid, :stop)
      assert eventually(fn -> ProcessRegistry.get_stats(reg).total_registered == 0 end)

      stalls =
        for {:monitor, _, :long_schedule, info} <- flush(), inspect(info) =~ "DSPex", do: info

      assert stalls == [], "our NIFs held a scheduler for > 50 ms: #{inspect(stalls)}"
    end
  end

  defp flush(acc \\ []) do
    receive do
      m -> flush([m | acc])
    after
      0 -> acc
    end
  end

  describe "VMs" do
    test "a VM in a target's process group is never signalled, nor is a VM as a target" do
      # A port program (its own group) that starts a second VM inside that group.
      code = ~S"""
      import subprocess, sys, time
      vm = subprocess.Popen(["erl", "-noshell", "-eval", "timer:sleep(60000)."])
      print(vm.pid, flush=True)
      while True: time.sleep(1)
      """

      port = Port.open({:spawn_executable, python()}, [:binary, {:line, 100}, args: ["-c", code]])
      {:os_pid, leader} = Port.info(port, :os_pid)
      wrapper = receive do: ({^port, {:data, {:eol, line}}} -> String.to_integer(line))

      # `erl` is a script that execs the VM under the same pid.
      assert eventually(
               fn -> match?({:ok, "beam" <> _}, File.read("/proc/#{wrapper}/comm")) end,
               10_000
             )

      vm = {wrapper, start_time(wrapper)}

      assert [{:error, :refused_vm}] = Termination.run([vm], grace_ms: 100, kill_wait_ms: 100)

      assert [{:ok, _}] =
               Termination.run([{leader, start_time(leader)}], grace_ms: 300, kill_wait_ms: 1_000)

      assert alive?(elem(vm, 0), elem(vm, 1)), "the VM in the group was signalled"
      kill9(wrapper, elem(vm, 1))
      assert eventually(fn -> not alive?(elem(vm, 0), elem(vm, 1)) end)
      if Port.info(port), do: Port.close(port)
    end
  end

  describe "stubborn and vanishing targets" do
    test "a target still there after kill_wait is reported still_alive; nothing hangs",
         %{pattern: pattern} do
      # A process in uninterruptible sleep cannot be made here without a hung filesystem;
      # what can be made is a target that has not finished dying when kill_wait runs out.
      [{pid, start}] = make_orphans(2, pattern) |> Enum.filter(fn _ -> true end) |> Enum.drop(1)

      {micros, [outcome]} =
        :timer.tc(fn -> Termination.run([{pid, start}], grace_ms: 0, kill_wait_ms: 0) end)

      assert outcome in [{:ok, :force_killed}, {:error, :still_alive}]
      assert micros < 2_000_000
      assert eventually(fn -> not alive?(pid, start) end)
    end

    test "processes that exit during scans and cleanups are only ever already_gone",
         %{pattern: pattern} do
      # Short-lived matching processes appear and vanish while detection and cleanup run.
      {:ok, spawner} =
        Task.start_link(fn ->
          for _ <- 1..60 do
            make_orphans(4, pattern)
            |> Enum.each(fn identity ->
              spawn(fn ->
                Process.sleep(:rand.uniform(30))
                # Identity-checked: cleanup may have ended it and its pid been reused.
                Termination.run([identity], grace_ms: 0, kill_wait_ms: 0)
              end)
            end)

            Process.sleep(5)
          end
        end)

      ref = Process.monitor(spawner)
      outcomes = cleanup_until_down(ref, pattern, [])
      assert outcomes != []

      assert Enum.all?(
               outcomes,
               &(&1 in [{:ok, :graceful}, {:ok, :force_killed}, {:ok, :already_gone}])
             ),
             inspect(Enum.uniq(outcomes))
    end
  end

  defp cleanup_until_down(ref, pattern, acc) do
    {report, _log} =
      with_log(fn ->
        OrphanDetector.cleanup_orphaned_processes(pattern: pattern, grace_ms: 50)
      end)

    acc = acc ++ Enum.map(report.details, &elem(&1, 1))

    receive do
      {:DOWN, ^ref, _, _, _} -> acc
    after
      0 -> cleanup_until_down(ref, pattern, acc)
    end
  end

  describe "NIF load failure" do
    for {label, path_fun} <- [
          missing: quote(do: "/nonexistent/dir/libdspex_process_nif"),
          wrong: quote(do: bogus_library())
        ] do
      test "a #{label} library gives an error naming the path" do
        path = unquote(path_fun)
        ebin = List.to_string(:code.lib_dir(:dspex_process, :ebin))

        # The call is compiled only after the path is set: compiling a call to the module
        # would load it, and its NIF, first.
        code = """
        Application.put_env(:dspex_process, :nif_path, #{inspect(path)})

        Code.eval_string(~S[
          try do
            DSPexProcess.Native.registry_new(true)
          rescue
            e -> IO.puts("ERROR " <> Exception.message(e))
          end
        ])
        """

        {out, 0} = System.cmd("elixir", ["-pa", ebin, "-e", code], stderr_to_stdout: true)
        assert out =~ "ERROR could not load the dspex_process NIF from #{path}.so"
        assert out =~ "mix compile"
      end
    end
  end

  defp bogus_library do
    path = Path.join(System.tmp_dir!(), "dspex_bogus_#{System.unique_integer([:positive])}")
    File.write!(path <> ".so", "this is not an ELF file")
    path
  end
end
