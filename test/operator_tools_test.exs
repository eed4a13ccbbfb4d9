defmodule DSPexProcess.OperatorToolsTest do
  # The PDEATHSIG guard, the dspex-proc CLI, kill_python.sh, the mix task and the demo,
  # all against real BEAMs and real processes. Not async: several BEAMs per test.
  use ExUnit.Case, async: false

  import ExUnit.CaptureIO
  import ExUnit.CaptureLog
  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.OrphanDetector
  alias DSPexProcess.Worker
  alias DSPexProcess.Test.PeerBeam

  @moduletag timeout: 180_000
  @root Path.expand("..", __DIR__)

  setup do
    "ops" |> setup_bridge() |> Map.put(:cli, Worker.guard_executable())
  end

  describe "the PDEATHSIG guard" do
    test "guarded workers die with their BEAM; unguarded ones stay for the detector",
         %{script: script, pattern: pattern} do
      guarded = PeerBeam.start(script, 3, ["--linger"], guard: true)
      unguarded = PeerBeam.start(script, 2, ["--linger"], guard: false)
      guarded_ids = identities(guarded.worker_pids)
      unguarded_ids = identities(unguarded.worker_pids)

      PeerBeam.kill(guarded)
      PeerBeam.kill(unguarded)

      assert eventually(fn -> all_gone?(guarded_ids) end, 1_000),
             "guarded workers outlived their BEAM by more than a second"

      assert all_alive?(unguarded_ids)
      orphans = OrphanDetector.find_orphaned_processes(pattern: pattern)
      assert Enum.sort(Enum.map(orphans, & &1.pid)) == Enum.sort(unguarded.worker_pids)
    end

    test "a guarded worker keeps its pid through the exec and works normally", %{script: script} do
      pid = start_supervised!({Worker, worker_id: :guarded, script: script, python: python()})
      {:ok, os_pid} = Worker.call(pid, "pid")
      assert String.to_integer(os_pid) == Worker.os_pid(pid)
    end

    test "dspex-proc exec runs the command in place and reports exec failures", %{cli: cli} do
      assert {"hello\n", 0} =
               System.cmd(cli, ["exec", "--pdeathsig", "TERM", "--", "echo", "hello"])

      assert {out, 127} =
               System.cmd(cli, ["exec", "--", "/nonexistent/program"], stderr_to_stdout: true)

      assert out =~ "/nonexistent/program"

      assert {_, 2} =
               System.cmd(cli, ["exec", "--pdeathsig", "NOPE", "--", "true"],
                 stderr_to_stdout: true
               )

      assert {_, 2} = System.cmd(cli, ["exec"], stderr_to_stdout: true)

      # Same pid: the shell's $$ is the pid the exec wrapper was started with.
      port =
        Port.open({:spawn_executable, cli}, [
          :binary,
          :exit_status,
          args: ["exec", "--", "sh", "-c", "echo $$"]
        ])

      {:os_pid, os_pid} = Port.info(port, :os_pid)
      assert_receive {^port, {:data, out}}, 5_000
      assert String.trim(out) == Integer.to_string(os_pid)
      assert_receive {^port, {:exit_status, 0}}, 5_000
    end
  end

  describe "dspex-proc" do
    test "finds and ends the orphans of a dead BEAM while a live BEAM's workers survive",
         %{script: script, pattern: pattern, cli: cli} do
      orphan_ids = orphans_of_a_dead_beam(script, 3)
      live = PeerBeam.start(script, 2)
      live_ids = identities(live.worker_pids)

      {out, 1} = System.cmd(cli, ["find", "--json", "--pattern", pattern])

      pids =
        json(
          out,
          ~S|" ".join(str(o["pid"]) for o in sorted(d["orphans"], key=lambda o: o["pid"]))|
        )

      assert pids == orphan_ids |> Enum.map(&elem(&1, 0)) |> Enum.sort() |> Enum.join(" ")
      assert json(out, ~S|set(o["reason"] for o in d["orphans"])|) == "{'owner_dead'}"

      {out, 1} = System.cmd(cli, ["status", "--json", "--pattern", pattern])

      assert json(
               out,
               ~S|d["orphaned_processes"], d["total_dspy_processes"], d["classes"]["foreign"]|
             ) == "3 5 2"

      # No terminal and no --yes: refused, nothing signalled.
      {_, 3} = System.cmd(cli, ["cleanup", "--pattern", pattern], stderr_to_stdout: true)
      assert all_alive?(orphan_ids)

      {out, 0} = System.cmd(cli, ["cleanup", "--dry-run", "--json", "--pattern", pattern])
      assert json(out, ~S|d["found"], d["terminated"], d["dry_run"]|) == "3 0 True"
      assert all_alive?(orphan_ids)

      {out, 0} = System.cmd(cli, ["cleanup", "--yes", "--grace", "2000", "--pattern", pattern])
      assert out =~ "Found: 3 orphaned processes"
      assert out =~ "Terminated: 3 processes"
      assert out =~ "Errors: 0"
      assert out =~ "Preserved: 2 workers of live VMs"

      assert all_gone?(orphan_ids)
      assert all_alive?(live_ids)
      {out, 0} = System.cmd(cli, ["status", "--pattern", pattern])
      assert out =~ "Health:             healthy"
      PeerBeam.stop(live)
    end

    test "bad arguments print usage and exit 2", %{cli: cli} do
      for args <- [
            ["bogus"],
            [],
            ["cleanup", "--grace", "soon"],
            ["find", "--pattern", ""],
            ["status", "--pattern", "a\tb", "--nope"]
          ] do
        {out, code} = System.cmd(cli, args, stderr_to_stdout: true)
        assert code == 2, "#{inspect(args)} exited #{code}: #{out}"
        assert out =~ "Usage" or out =~ "--help" or out =~ "invalid pattern"
      end

      {out, 0} = System.cmd(cli, ["--help"])
      assert out =~ "Exit codes:"
    end
  end

  describe "kill_python.sh" do
    defp kill_python(args),
      do: System.cmd("bash", [Path.join(@root, "kill_python.sh") | args], stderr_to_stdout: true)

    # Runs kill_python.sh and, every 2 ms until it exits, reads the command line and the
    # environment of it and of every process under it. Returns
    # {exit status, output, the script's pid, %{pid => [each distinct cmdline/environ seen]}}.
    defp watch_kill_python(args) do
      port =
        Port.open({:spawn_executable, System.find_executable("bash")}, [
          :binary,
          :exit_status,
          :stderr_to_stdout,
          args: [Path.join(@root, "kill_python.sh") | args]
        ])

      {:os_pid, script_pid} = Port.info(port, :os_pid)
      {status, out, seen} = watch(port, script_pid, "", %{})
      {status, out, script_pid, seen}
    end

    defp watch(port, script_pid, out, seen) do
      receive do
        {^port, {:data, data}} ->
          watch(port, script_pid, out <> data, seen)

        {^port, {:exit_status, status}} ->
          {status, out, seen}
      after
        2 ->
          seen =
            for pid <- [script_pid | descendants(script_pid)],
                file <- ["cmdline", "environ"],
                {:ok, text} <- [File.read("/proc/#{pid}/#{file}")],
                reduce: seen do
              acc -> Map.update(acc, pid, [text], &Enum.uniq([text | &1]))
            end

          watch(port, script_pid, out, seen)
      end
    end

    defp descendants(pid) do
      kids =
        case File.read("/proc/#{pid}/task/#{pid}/children") do
          {:ok, text} -> text |> String.split() |> Enum.map(&String.to_integer/1)
          {:error, _} -> []
        end

      kids ++ Enum.flat_map(kids, &descendants/1)
    end

    # /proc/PID/cmdline of the script that watch_kill_python(args) runs.
    defp script_cmdline(args) do
      argv = [System.find_executable("bash"), Path.join(@root, "kill_python.sh") | args]
      Enum.map_join(argv, &(&1 <> <<0>>))
    end

    defp printable(text), do: String.replace(text, <<0>>, " ")

    # The erl that the script started: its node name holds the script's pid.
    defp erl_processes(seen, script_pid) do
      for {pid, texts} <- seen,
          pid != script_pid,
          Enum.any?(texts, &String.contains?(&1, "kill_python_#{script_pid}")),
          do: {pid, texts}
    end

    # Processes started from a shell, outside any BEAM's ports: what manual mode is for.
    defp start_by_hand(script, count, args) do
      for _ <- 1..count do
        port =
          Port.open({:spawn_executable, System.find_executable("sh")}, [
            :binary,
            args: ["-c", ~s(exec 2>/dev/null; "$PY" "$SCRIPT" --linger $EXTRA; exit 0)],
            env: [
              {~c"PY", String.to_charlist(python())},
              {~c"SCRIPT", String.to_charlist(script)},
              {~c"EXTRA", String.to_charlist(Enum.join(args, " "))}
            ]
          ])

        {:os_pid, sh} = Port.info(port, :os_pid)
        assert eventually(fn -> children(sh) != [] end)
        [child] = children(sh)
        {child, start_time(child)}
      end
    end

    defp children(pid) do
      case File.read("/proc/#{pid}/task/#{pid}/children") do
        {:ok, text} -> text |> String.split() |> Enum.map(&String.to_integer/1)
        _ -> []
      end
    end

    test "intelligent mode ends orphans and preserves a live BEAM's workers",
         %{script: script, pattern: pattern, cli: cli} do
      orphan_ids = orphans_of_a_dead_beam(script, 3)
      live = PeerBeam.start(script, 2)
      live_ids = identities(live.worker_pids)

      # The one confirmation rule: no terminal and no --yes, nothing is signalled.
      {out, 3} = kill_python(["--pattern", pattern, "--cli", cli])
      assert out =~ "no terminal"
      assert all_alive?(orphan_ids)

      {out, 0} = kill_python(["--pattern", pattern, "--cli", cli, "--dry-run"])
      assert out =~ "Dry run complete: nothing was signalled"
      refute out =~ "cleanup completed"
      assert all_alive?(orphan_ids)

      {out, 0} = kill_python(["--pattern", pattern, "--cli", cli, "--grace", "2000", "--yes"])
      assert out =~ "intelligent"
      assert out =~ "Found: 3 orphaned processes"
      assert out =~ "Terminated: 3 processes"
      assert out =~ "Preserved: 2 workers of live VMs"
      assert out =~ "✅ Intelligent cleanup completed successfully"
      assert all_gone?(orphan_ids)
      assert all_alive?(live_ids)
      PeerBeam.stop(live)
    end

    test "run from a consumer project, it finds the dspex-proc that project built",
         %{script: script, pattern: pattern} do
      orphan_ids = orphans_of_a_dead_beam(script, 2)
      tmp = Path.join(System.tmp_dir!(), "kp_consumer_#{System.unique_integer([:positive])}")
      on_exit(fn -> File.rm_rf(tmp) end)
      # The script lives apart from any build (as in deps/dspex_process of a hex install)...
      File.mkdir_p!(Path.join(tmp, "lib_copy"))
      File.cp!(Path.join(@root, "kill_python.sh"), Path.join(tmp, "lib_copy/kill_python.sh"))
      # ...and the consumer's own build holds the CLI.
      bin = Path.join(tmp, "app/_build/dev/lib/dspex_process/priv/bin")
      File.mkdir_p!(bin)
      File.cp!(DSPexProcess.Worker.guard_executable(), Path.join(bin, "dspex-proc"))

      {out, 0} =
        System.cmd(
          "bash",
          [Path.join(tmp, "lib_copy/kill_python.sh"), "--pattern", pattern, "--dry-run"],
          cd: Path.join(tmp, "app"),
          stderr_to_stdout: true
        )

      assert out =~ "dspex-proc found"
      refute out =~ "Manual cleanup mode"
      assert out =~ "Found: 2 orphaned processes"
      assert all_alive?(orphan_ids)

      {_, 0} =
        System.cmd(Path.join(bin, "dspex-proc"), ["cleanup", "--yes", "--pattern", pattern])

      assert all_gone?(orphan_ids)
    end

    test "node mode asks a live node, whose own workers are active",
         %{script: script, pattern: pattern} do
      orphan_ids = orphans_of_a_dead_beam(script, 2)
      sname = "kp_peer_#{System.unique_integer([:positive])}"
      cookie = "cookie_#{System.unique_integer([:positive])}"
      node = PeerBeam.start(script, 2, [], sname: sname, cookie: cookie)
      node_ids = identities(node.worker_pids)

      {:ok, host} = :inet.gethostname()

      node_args = ["--pattern", pattern, "--node", "#{sname}@#{host}", "--cookie", cookie]
      {out, 3} = kill_python(node_args)
      assert out =~ "no terminal"
      {out, 0} = kill_python(node_args ++ ["--dry-run"])
      assert out =~ "🧹 Cleanup complete (dry run, nothing signalled):"
      assert out =~ "Found: 2 orphaned processes"
      assert out =~ "Dry run complete"
      assert all_alive?(orphan_ids)

      {out, 0} = kill_python(node_args ++ ["--grace", "2000", "--yes"])
      assert out =~ "🧹 Cleanup complete:"
      refute out =~ "\\x{"
      assert out =~ "Found: 2 orphaned processes"
      assert out =~ "Terminated: 2 processes"
      assert out =~ "Preserved: 2 active workers"
      assert all_gone?(orphan_ids)
      assert all_alive?(node_ids)

      {out, 4} =
        kill_python([
          "--pattern",
          pattern,
          "--node",
          "nobody_here@#{host}",
          "--cookie",
          cookie,
          "--yes"
        ])

      assert out =~ "did not answer"
      PeerBeam.stop(node)
    end

    test "node mode keeps the cookie off every command line (and out of erl's environment)",
         %{script: script, pattern: pattern} do
      sname = "kp_cookie_#{System.unique_integer([:positive])}"
      cookie = "kp_secret_" <> Base.encode16(:crypto.strong_rand_bytes(12), case: :lower)
      node = PeerBeam.start(script, 1, [], sname: sname, cookie: cookie)
      {:ok, host} = :inet.gethostname()
      target = ["--pattern", pattern, "--node", "#{sname}@#{host}", "--dry-run"]

      cookie_file = Path.join(System.tmp_dir!(), "#{sname}.cookie")
      File.write!(cookie_file, cookie <> "\n")
      File.chmod!(cookie_file, 0o600)
      on_exit(fn -> File.rm(cookie_file) end)

      # With --cookie-file the cookie is on no command line at all, the script's included.
      {status, out, script_pid, seen} =
        watch_kill_python(target ++ ["--cookie-file", cookie_file])

      assert status == 0, out
      assert out =~ "Dry run complete: nothing was signalled"
      erl = erl_processes(seen, script_pid)
      assert erl != [], "erl was never seen: #{inspect(Map.keys(seen))}"

      for {pid, texts} <- seen, text <- texts do
        refute text =~ cookie, "the cookie is readable in /proc/#{pid}: #{printable(text)}"
      end

      # erl found it in a private HOME, which is gone with the script.
      [home | _] =
        for {_, texts} <- erl,
            t <- texts,
            [_, h] <- [Regex.run(~r/(?:^|\0)HOME=([^\0]*)/, t)],
            do: h

      assert Path.basename(home) =~ ~r/^kill_python_cookie\./
      refute File.exists?(home)

      # With --cookie the script's own argv holds it (the caller chose so; the script's
      # forks, such as command substitutions, share that argv); erl's does not.
      {status, out, script_pid, seen} = watch_kill_python(target ++ ["--cookie", cookie])
      assert status == 0, out
      erl = erl_processes(seen, script_pid)
      assert erl != []
      own_argv = script_cmdline(target ++ ["--cookie", cookie])

      for {pid, texts} <- seen, text <- texts, text != own_argv do
        refute text =~ cookie, "the cookie is readable in /proc/#{pid}: #{printable(text)}"
      end

      # (the exclusion above is the script's real command line)
      assert own_argv in seen[script_pid]

      # A wrong cookie is refused by the node: the script reports it cannot reach it.
      {status, out, _, _} = watch_kill_python(target ++ ["--cookie", cookie <> "_wrong"])
      assert status == 4, out
      PeerBeam.stop(node)
    end

    test "manual mode: --dry-run and no terminal without --yes signal nothing; --yes ends all",
         %{script: script, pattern: pattern} do
      ids = start_by_hand(script, 2, []) ++ start_by_hand(script, 1, ["--ignore-sigterm"])

      {out, 0} = kill_python(["--manual", "--pattern", pattern, "--dry-run"])
      assert out =~ "Manual cleanup mode"
      assert out =~ "Cannot distinguish active workers from orphaned processes"
      assert out =~ "Dry run"
      assert all_alive?(ids)

      {out, 3} = kill_python(["--manual", "--pattern", pattern])
      assert out =~ "Refusing without --yes"
      assert all_alive?(ids)

      {out, 0} = kill_python(["--manual", "--pattern", pattern, "--yes", "--grace", "300"])
      assert out =~ "Found: 3 processes"
      assert out =~ "Terminated: 3 processes"
      assert out =~ "Errors: 0"
      assert all_gone?(ids)
    end

    test "bad arguments exit 2 with usage" do
      for args <- [["--bogus"], ["--grace", "soon"], ["--pattern"], ["--cookie", "c"]] do
        {out, 2} = kill_python(args)
        assert out =~ "Usage: kill_python.sh"
      end
    end
  end

  describe "mix dspex.cli" do
    test "prints the CLI's path and installs it where kill_python.sh finds it on PATH",
         %{script: script, pattern: pattern} do
      {path, 0} = System.cmd("mix", ["dspex.cli"], env: [{"MIX_ENV", "test"}])
      assert String.trim(path) == DSPexProcess.Worker.guard_executable()

      dir = Path.join(System.tmp_dir!(), "dspex_cli_bin_#{System.unique_integer([:positive])}")
      File.mkdir_p!(dir)
      on_exit(fn -> File.rm_rf(dir) end)
      {out, 0} = System.cmd("mix", ["dspex.cli", "install", dir], env: [{"MIX_ENV", "test"}])
      assert out =~ "installed #{dir}/dspex-proc"
      {version, 0} = System.cmd(Path.join(dir, "dspex-proc"), ["--version"])
      assert version =~ "dspex-proc"

      {out, status} =
        System.cmd("mix", ["dspex.cli", "install", Path.join(dir, "missing")],
          env: [{"MIX_ENV", "test"}],
          stderr_to_stdout: true
        )

      assert status != 0
      assert out =~ "is not a folder"

      # A copy of the script far from any build, and no _build in the current folder:
      # only PATH can lead it to the CLI.
      copy = Path.join(dir, "kill_python.sh")
      File.cp!(Path.join(@root, "kill_python.sh"), copy)
      orphan_ids = orphans_of_a_dead_beam(script, 1)

      {out, 0} =
        System.cmd("bash", [copy, "--pattern", pattern, "--dry-run"],
          cd: dir,
          env: [{"PATH", dir <> ":" <> System.get_env("PATH")}],
          stderr_to_stdout: true
        )

      assert out =~ "dspex-proc found"
      assert out =~ "Found: 1 orphaned processes"

      {_, 0} =
        System.cmd(Path.join(dir, "dspex-proc"), ["cleanup", "--yes", "--pattern", pattern])

      assert all_gone?(orphan_ids)
    end
  end

  describe "mix dspex.orphans" do
    test "status, find and cleanup inside the project", %{script: script, pattern: pattern} do
      orphan_ids = orphans_of_a_dead_beam(script, 2)
      task = &Mix.Tasks.Dspex.Orphans.run/1

      out =
        capture_io(fn ->
          assert catch_exit(task.(["status", "--pattern", pattern])) == {:shutdown, 1}
        end)

      assert out =~ "Orphans:            2"

      out =
        capture_io(fn ->
          assert catch_exit(task.(["find", "--pattern", pattern])) == {:shutdown, 1}
        end)

      for {pid, _} <- orphan_ids, do: assert(out =~ "#{pid}\towner_dead")

      # No terminal, no --yes: refused, nothing signalled.
      out =
        capture_io(:stderr, fn ->
          assert catch_exit(task.(["cleanup", "--pattern", pattern])) == {:shutdown, 3}
        end)

      assert out =~ "no terminal"
      assert all_alive?(orphan_ids)

      capture_log(fn ->
        out =
          capture_io(fn ->
            task.(["cleanup", "--pattern", pattern, "--grace", "2000", "--yes"])
          end)

        assert out =~ "Terminated: 2 processes"
        assert out =~ "Preserved: 0 workers of live VMs"
      end)

      assert all_gone?(orphan_ids)
      assert_raise Mix.Error, ~r/unknown command/, fn -> task.(["explode"]) end
      assert_raise Mix.Error, ~r/invalid option/, fn -> task.(["--grace", "x"]) end
      assert_raise Mix.Error, ~r/pattern/, fn -> task.(["find", "--pattern", ""]) end
    end
  end

  test "the demo runs to the end and leaves nothing behind" do
    name = "dspy_bridge_demo_test_#{System.unique_integer([:positive])}.py"

    {out, status} =
      System.cmd("mix", ["run", "examples/orphan_demo.exs"],
        cd: @root,
        env: [{"MIX_ENV", "test"}, {"DSPEX_DEMO_NAME", name}],
        stderr_to_stdout: true
      )

    assert status == 0, out
    assert out =~ "system_health: :degraded"
    assert out =~ "Found: 3 orphaned processes"
    assert out =~ "Terminated: 3 processes"
    assert out =~ "Preserved: 8 active workers"
    assert out =~ "system_health: :healthy"
    assert out =~ "DEMO OK"
    assert OrphanDetector.classify_processes(pattern: name) == []
  end
end
