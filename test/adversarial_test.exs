defmodule DSPexProcess.AdversarialTest do
  # Issue 12: what an adversarial review found, each on real processes, real /proc and real
  # signals. Every scan and cleanup uses a bridge copied under a name unique to the test, so
  # only processes the test started can ever be seen or signalled.
  # Not async: hundreds of processes, other users, mount namespaces.
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import DSPexProcess.Test.OSProcess

  alias DSPex.Python.OrphanDetector
  alias DSPexProcess.Worker

  @moduletag timeout: 300_000
  @root Path.expand("..", __DIR__)

  setup do
    "adv" |> setup_bridge() |> Map.put(:cli, Worker.guard_executable())
  end

  # Runs `cmd` detached from this VM (setsid in a background subshell, which the launcher
  # leaves behind): its parent is PID 1 (or the host's subreaper), as for anything started
  # by cron, nohup or a systemd unit. setsid execs in place, so `$!` is the command's pid.
  defp detached(cmd, args) do
    {out, 0} =
      System.cmd("sh", [
        "-c",
        ~s(setsid "$@" </dev/null >/dev/null 2>&1 & echo $!),
        "sh",
        cmd | args
      ])

    pid = out |> String.trim() |> String.to_integer()
    assert eventually(fn -> ppid_of(pid) not in [nil, System.pid() |> String.to_integer()] end)
    {pid, start_time(pid)}
  end

  defp ppid_of(pid) do
    case File.read("/proc/#{pid}/stat") do
      {:ok, stat} ->
        [_, rest] = Regex.run(~r/\)([^)]*)$/s, stat)
        rest |> String.split() |> Enum.at(1) |> String.to_integer()

      _ ->
        nil
    end
  end

  describe "item 1: naming the pattern does not make a worker" do
    test "cleaners, tail and a shell script re-parented to PID 1 are never condemned",
         %{script: script, pattern: pattern, cli: cli} do
      # One orphan that ignores SIGTERM keeps the first cleaner busy for its grace; the
      # other, which does not, it ends at once.
      [first, orphan] = make_orphans(2, pattern)
      cleaner = detached(cli, ["cleanup", "--yes", "--grace", "6000", "--pattern", pattern])

      shell_cleaner =
        detached("bash", [
          Path.join(@root, "kill_python.sh"),
          "--pattern",
          pattern,
          "--cli",
          cli,
          "--grace",
          "6000",
          "--yes"
        ])

      tail = detached("tail", ["-f", script])
      # python3 -c CODE SCRIPT: the script is an argument, not what python runs.
      inline = detached(python(), ["-c", "import time; time.sleep(60)", script])
      bystanders = [cleaner, shell_cleaner, tail, inline]

      assert eventually(fn -> all_alive?(bystanders) end)
      # The cleaner is at work (under load it may take a moment to start).
      assert eventually(fn -> all_gone?([first]) end, 10_000)

      classified =
        OrphanDetector.classify_processes(pattern: pattern, min_age_ms: 0)
        |> Enum.map(& &1.pid)

      for {pid, _} <- bystanders do
        refute pid in classified, "#{pid} was taken for a worker: #{inspect(classified)}"
      end

      {report, _log} =
        with_log(fn ->
          OrphanDetector.cleanup_orphaned_processes(
            pattern: pattern,
            include_unmanaged: true,
            grace_ms: 500
          )
        end)

      assert Enum.map(report.details, fn {o, _} -> o.pid end) == [elem(orphan, 0)]
      assert eventually(fn -> all_gone?([orphan]) end)
      assert all_alive?([tail, inline]), "a bystander was signalled"

      Enum.each([tail, inline], fn {pid, start} -> kill9(pid, start) end)
    end

    test "a worker started through the python3 on PATH (a pyenv shim here) and the exec wrapper is found",
         %{script: script, pattern: pattern} do
      shim = System.find_executable("python3")

      {:ok, w} = Worker.start(worker_id: {:adv, :shim}, script: script, python: shim, guard: true)

      {:ok, "pong"} = Worker.call(w, "ping")
      pid = Worker.os_pid(w)
      assert [%{pid: ^pid, class: :active}] = OrphanDetector.classify_processes(pattern: pattern)
      GenServer.stop(w)
    end
  end

  describe "item 2: hidepid" do
    test "a cleaner that cannot see a live VM never condemns its workers",
         %{script: script, pattern: pattern, cli: cli} do
      unshare = System.find_executable("unshare") || flunk("unshare (util-linux) is needed")
      setpriv = System.find_executable("setpriv") || flunk("setpriv (util-linux) is needed")

      # Workers run as nobody; this VM (their owner and their parent's parent) runs as root.
      wrapper = Path.join(Path.dirname(script), "as_nobody_#{System.unique_integer([:positive])}")

      File.write!(wrapper, """
      #!/bin/sh
      exec #{setpriv} --reuid=nobody --regid=nogroup --clear-groups #{python()} "$@"
      """)

      File.chmod!(wrapper, 0o755)
      on_exit(fn -> File.rm(wrapper) end)

      {:ok, marked} =
        Worker.start(worker_id: {:adv, :hidden}, script: script, python: wrapper, guard: false)

      {:ok, "pong"} = Worker.call(marked, "ping")
      marked_id = {Worker.os_pid(marked), Worker.info(marked).start_time}

      # Unmarked, as nobody, its parent the VM's port helper (root).
      # It exits when its stdin closes (no --linger): Port.close ends it.
      unmarked_port = Port.open({:spawn_executable, wrapper}, [:binary, args: [script]])

      {:os_pid, unmarked_pid} = Port.info(unmarked_port, :os_pid)

      assert eventually(fn ->
               match?({:ok, "Uid:\t65534" <> _}, uid_line(unmarked_pid)) and
                 File.read!("/proc/#{unmarked_pid}/cmdline") =~ pattern
             end)

      unmarked_id = {unmarked_pid, start_time(unmarked_pid)}

      # A real orphan of nobody, re-parented: still ended from behind hidepid.
      :ok = start_nobody_orphan(script)

      assert eventually(fn ->
               Enum.any?(
                 OrphanDetector.find_orphaned_processes(pattern: pattern),
                 &(&1.uid != 0 and &1.reason == :reparented)
               )
             end)

      [orphan] =
        for o <- OrphanDetector.find_orphaned_processes(pattern: pattern), o.uid != 0, do: o

      inner =
        ~s(mount -t proc -o hidepid=2 proc /proc && ) <>
          ~s(exec "$0" --reuid=nobody --regid=nogroup --clear-groups "$1" cleanup --yes --json ) <>
          ~s(--include-unmanaged --grace 2000 --pattern "$2")

      {out, status} =
        System.cmd(unshare, ["--mount", "sh", "-c", inner, setpriv, cli, pattern],
          stderr_to_stdout: true
        )

      assert status == 0, out
      # What the cleaner saw: only its own uid's processes; the VM and PID 1 hidden.
      assert json(out, "d['found']") == "1", out
      assert json(out, "d['details'][0]['pid']") == Integer.to_string(orphan.pid), out
      assert json(out, "d['classes']['foreign']") == "2", out
      assert all_alive?([marked_id, unmarked_id]), "a worker of a live VM was ended: #{out}"
      assert eventually(fn -> not alive?(orphan.pid, orphan.start_time) end)

      GenServer.stop(marked)
      Port.close(unmarked_port)
    end
  end

  defp uid_line(pid) do
    with {:ok, status} <- File.read("/proc/#{pid}/status"),
         [line] <- Regex.run(~r/^Uid:.*$/m, status) do
      {:ok, line}
    else
      _ -> :error
    end
  end

  describe "item 3: out of descriptors" do
    test "with ulimit -n 64, 300 orphans are all ended, none reported gone while alive",
         %{pattern: pattern, cli: cli} do
      orphans = make_orphans(300, pattern)

      {out, status} =
        System.cmd(
          "sh",
          [
            "-c",
            ~s(ulimit -n 64 && exec "$0" cleanup --yes --json --grace 500 --pattern "$1"),
            cli,
            pattern
          ],
          stderr_to_stdout: true
        )

      assert status == 0, out
      assert json(out, "d['found']") == "300"
      assert json(out, "d['terminated']") == "300", out
      assert json(out, "d['errors']") == "0"
      assert json(out, "d['already_gone']") == "0"
      assert eventually(fn -> all_gone?(orphans) end)
    end
  end

  describe "item 5: concurrent cleaners" do
    test "three cleaners of the same 200 orphans end each once and say so",
         %{pattern: pattern, cli: cli} do
      orphans = make_orphans(200, pattern)

      runs =
        1..3
        |> Enum.map(fn _ ->
          Task.async(fn ->
            System.cmd(cli, ["cleanup", "--yes", "--json", "--grace", "500", "--pattern", pattern])
          end)
        end)
        |> Enum.map(&Task.await(&1, 120_000))

      assert Enum.all?(runs, fn {_, status} -> status == 0 end), inspect(runs)

      outcomes =
        Enum.flat_map(runs, fn {out, _} ->
          out
          |> json(~S|"\n".join(f"{x['pid']} {x['outcome']}" for x in d['details'])|)
          |> String.split("\n", trim: true)
          |> Enum.map(&String.split/1)
        end)

      ended = for [pid, o] <- outcomes, o in ["graceful", "force_killed"], do: pid

      terminated =
        Enum.sum(for {out, _} <- runs, do: String.to_integer(json(out, "d['terminated']")))

      # Each orphan ended by exactly one cleaner; the others found it gone.
      assert terminated == 200
      assert Enum.sort(ended) == Enum.sort(Enum.map(orphans, &Integer.to_string(elem(&1, 0))))

      assert Enum.all?(outcomes, fn [_, o] ->
               o in ["graceful", "force_killed", "already_gone"]
             end)

      # Odd ones ignore SIGTERM: whoever ended them killed them.
      stubborn = for {{pid, _}, i} <- Enum.with_index(orphans), rem(i, 2) == 1, do: "#{pid}"
      assert Enum.all?(outcomes, fn [pid, o] -> pid not in stubborn or o != "graceful" end)
      assert eventually(fn -> all_gone?(orphans) end)
    end
  end

  describe "item 7: descendants that left the session" do
    test "a worker's stop ends a setsid child that does not match the pattern",
         %{script: script} do
      marker = "dspex_adv_child_#{System.unique_integer([:positive])}"
      pid_file = Path.join(System.tmp_dir!(), marker)

      # The worker's script forks a child that calls setsid() and runs `sleep` (no pattern
      # in its argv, another session and group), writes the child's pid, then waits.
      code = """
      import os, sys, time
      child = os.fork()
      if child == 0:
          os.setsid()
          os.execvp("sleep", ["sleep", "600"])
      with open(sys.argv[-2], "w") as f:
          f.write(str(child))
      sys.stdin.read()
      """

      parent_script = Path.join(Path.dirname(script), "#{marker}.py")
      File.write!(parent_script, code)
      on_exit(fn -> File.rm(parent_script) end)

      {:ok, w} =
        Worker.start(
          worker_id: {:adv, :family},
          script: parent_script,
          python: python(),
          args: [pid_file, marker],
          guard: false
        )

      worker_id = {Worker.os_pid(w), Worker.info(w).start_time}
      assert eventually(fn -> match?({:ok, <<_, _::binary>>}, File.read(pid_file)) end, 5_000)
      child = pid_file |> File.read!() |> String.to_integer()
      File.rm(pid_file)
      child_id = {child, start_time(child)}

      # Whatever happens below, nothing of this test outlives it.
      on_exit(fn ->
        if Process.alive?(w), do: GenServer.stop(w)
        DSPexProcess.Termination.run([child_id], grace_ms: 0, kill_wait_ms: 1_000)
      end)

      # The fork is done when the pid is written; the exec of sleep comes a moment later.
      assert eventually(fn ->
               File.read("/proc/#{child}/cmdline") == {:ok, "sleep\0" <> "600\0"}
             end)

      assert alive?(child, elem(child_id, 1))

      GenServer.stop(w)

      assert eventually(fn -> all_gone?([worker_id, child_id]) end, 3_000),
             "the setsid child survived its worker's stop"
    end
  end

  describe "item 9: unwritable stdout" do
    test "dspex-proc > /dev/full and into a closed pipe ends every orphan, never panics",
         %{pattern: pattern, cli: cli} do
      for how <- [:dev_full, :closed_pipe] do
        orphans = make_orphans(4, pattern)

        {out, status} =
          case how do
            :dev_full ->
              System.cmd(
                "sh",
                [
                  "-c",
                  ~s("$0" cleanup --yes --grace 300 --pattern "$1" >/dev/full),
                  cli,
                  pattern
                ],
                stderr_to_stdout: true
              )

            :closed_pipe ->
              # A pipe whose reader is closed before the CLI starts: every write is EPIPE.
              code = """
              import os, subprocess, sys
              r, w = os.pipe()
              os.close(r)
              p = subprocess.run([sys.argv[1], "cleanup", "--yes", "--grace", "300",
                                  "--pattern", sys.argv[2]], stdout=w, stderr=subprocess.PIPE)
              sys.stdout.write(p.stderr.decode())
              sys.exit(p.returncode)
              """

              System.cmd(python(), ["-c", code, cli, pattern])
          end

        assert status == 74, "#{how}: #{out}"
        refute out =~ "panicked", out
        assert out =~ "could not write the report", out
        assert eventually(fn -> all_gone?(orphans) end), "#{how}: orphans survived"
      end
    end
  end

  describe "a scan out of descriptors" do
    test "dspex-proc says /proc could not be read and ends nothing; with descriptors it ends them",
         %{pattern: pattern, cli: cli} do
      orphans = make_orphans(2, pattern)
      cleanup = ["cleanup", "--yes", "--grace", "300", "--pattern", pattern]

      # Four descriptors: stdin, stdout, stderr and one more. Listing /proc takes it; then
      # a scan thread opening /proc or a cmdline is out of descriptors (EMFILE).
      starved = """
      import os, resource, sys
      resource.setrlimit(resource.RLIMIT_NOFILE, (4, 4))
      os.execv(sys.argv[1], sys.argv[1:])
      """

      {out, status} = System.cmd(python(), ["-c", starved, cli | cleanup], stderr_to_stdout: true)

      assert status == 71, out
      assert out =~ "could not read /proc in full", out
      refute out =~ "No orphaned processes", out
      refute out =~ "panicked", out
      assert all_alive?(orphans), "a scan that failed ended something"

      {out, status} = System.cmd(cli, cleanup, stderr_to_stdout: true)
      assert status == 0, out
      assert eventually(fn -> all_gone?(orphans) end), out
    end
  end

  describe "item 10: exec under PID 1" do
    test "dspex-proc exec whose parent is PID 1 from the start runs the command", %{cli: cli} do
      unshare = System.find_executable("unshare") || flunk("unshare (util-linux) is needed")

      # In a new PID namespace the shell is PID 1, and it forks the wrapper.
      {out, status} =
        System.cmd(
          unshare,
          [
            "--pid",
            "--fork",
            "sh",
            "-c",
            ~s("$0" exec --pdeathsig KILL -- sh -c 'echo ran with parent $PPID'; echo "rc=$?"),
            cli
          ],
          stderr_to_stdout: true
        )

      assert status == 0, out
      assert out =~ "ran with parent 1", out
      assert out =~ "rc=0", out
    end
  end

  describe "item 12: clear start errors" do
    test "a non-executable interpreter, a 200 KB id and NUL bytes are named", %{script: script} do
      not_exec = Path.join(Path.dirname(script), "not_exec_#{System.unique_integer([:positive])}")
      File.write!(not_exec, "#!/bin/sh\n")
      File.chmod!(not_exec, 0o644)
      on_exit(fn -> File.rm(not_exec) end)

      start = fn opts ->
        Worker.start(
          Keyword.merge([worker_id: {:adv, :bad}, script: script, python: python()], opts)
        )
      end

      assert_raise ArgumentError, ~r/not executable/, fn -> start.(python: not_exec) end

      assert_raise ArgumentError, ~r/:worker_id.*E2BIG/s, fn ->
        start.(worker_id: String.duplicate("x", 200_000))
      end

      assert_raise ArgumentError, ~r/:worker_id.*NUL byte/s, fn ->
        start.(worker_id: "a\0b")
      end

      assert_raise ArgumentError, ~r/:args.*NUL byte/s, fn -> start.(args: ["a\0b"]) end
      assert_raise ArgumentError, ~r/:env.*NUL byte/s, fn -> start.(env: [{"K", "a\0b"}]) end

      assert_raise ArgumentError, ~r/:args.*E2BIG/s, fn ->
        start.(args: [String.duplicate("y", 200_000)])
      end

      # Nothing was spawned for any of them.
      assert OrphanDetector.classify_processes(pattern: Path.basename(script)) == []
      # And a worker with sane values still starts.
      {:ok, w} = start.(worker_id: String.duplicate("z", 1_000))
      assert {:ok, "pong"} = Worker.call(w, "ping")
      GenServer.stop(w)
    end
  end
end
