defmodule DSPexProcess.Test.OSProcess do
  @moduledoc """
  Real OS processes for tests. Every process is started by the test that uses it and owned
  by a Port; most exit on stdin EOF when the port closes, the lingering ones (as DSPex's
  bridge) do not. Each is signalled only by its test or by the library under test, always
  by pid and start time.
  """

  @doc """
  The real interpreter behind `python3`, resolved once. Where `python3` is a pyenv shim,
  the shim forks helper shells that carry the same argv for a moment; tests that count
  processes want one process per spawn.
  """
  def python do
    case :persistent_term.get({__MODULE__, :python}, nil) do
      nil ->
        shim = System.find_executable("python3") || raise "python3 is needed for the tests"
        {path, 0} = System.cmd(shim, ["-c", "import sys; print(sys.executable)"])
        path = String.trim(path)
        :persistent_term.put({__MODULE__, :python}, path)
        path

      path ->
        path
    end
  end

  @doc "Starts `python3` waiting on stdin; returns `{port, os_pid}`."
  def start_python(extra_args \\ []),
    do: open_python("import sys; sys.stdin.read()", extra_args, [:binary])

  @doc """
  Starts `python3` sleeping 60 s, with the port options DSPex's worker uses (a plain
  `Port.open` with `:binary`, `:exit_status`, `{:packet, 4}`); it ignores stdin, so it
  outlives its port. Returns `{port, os_pid}`.
  """
  def start_lingering_python(extra_args \\ []),
    do:
      open_python("import time; time.sleep(60)", extra_args, [
        :binary,
        :exit_status,
        {:packet, 4}
      ])

  defp open_python(code, extra_args, options) do
    port =
      Port.open({:spawn_executable, python()}, [{:args, ["-c", code | extra_args]} | options])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    {port, os_pid}
  end

  @doc """
  Field 22 of /proc/PID/stat, counted from the last `)`.

  The tests read `/proc` with this small parser of their own on purpose: they judge the
  library's identity checks, so they do not reuse the core's parser (a shared bug would
  hide itself). The library has one parser, in the Rust core.
  """
  def start_time(os_pid) do
    stat = File.read!("/proc/#{os_pid}/stat")
    [_, rest] = Regex.run(~r/\)([^)]*)$/s, stat)
    rest |> String.split() |> Enum.at(19) |> String.to_integer()
  end

  @doc "Polls `fun` every 5 ms until it returns truthy or `timeout` ms pass."
  def eventually(fun, timeout \\ 2_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    poll(fun, deadline)
  end

  defp poll(fun, deadline) do
    cond do
      fun.() ->
        true

      System.monotonic_time(:millisecond) > deadline ->
        false

      true ->
        Process.sleep(5)
        poll(fun, deadline)
    end
  end

  @doc "A process that has exited: its pid is dead."
  def dead_pid do
    {pid, ref} = spawn_monitor(fn -> :ok end)
    receive do: ({:DOWN, ^ref, _, _, _} -> pid)
  end

  @doc """
  A copy of the bundled bridge under a name unique to this test run, in a temp folder:
  scans and cleanups that use its basename as the pattern can only ever see processes this
  test started.
  """
  def unique_bridge(tag) do
    name = "dspy_bridge_#{tag}_#{System.unique_integer([:positive])}_#{System.pid()}.py"
    dir = Path.join(System.tmp_dir!(), "dspex_process_test")
    File.mkdir_p!(dir)
    path = Path.join(dir, name)
    File.cp!(DSPexProcess.Worker.default_script(), path)
    {path, name}
  end

  @doc "Whether the process `os_pid` still runs with start time `start` (zombies count as gone)."
  def alive?(os_pid, start) do
    case File.read("/proc/#{os_pid}/stat") do
      {:ok, stat} ->
        [_, rest] = Regex.run(~r/\)([^)]*)$/s, stat)
        [state | _] = fields = String.split(rest)
        state not in ["Z", "X"] and String.to_integer(Enum.at(fields, 19)) == start

      {:error, _} ->
        false
    end
  end

  @doc """
  Sends SIGKILL to an OS process that the calling test started itself, only while `os_pid`
  still has `start` as its start time: never a process that took a recycled pid. (For VMs,
  which the library's terminator refuses by design.)
  """
  def kill9(os_pid, start) when is_integer(os_pid) and os_pid > 1 do
    true = alive?(os_pid, start)
    {_, 0} = System.cmd("kill", ["-9", Integer.to_string(os_pid)])
    :ok
  end

  @doc """
  Ends whatever a failed test left running under its own unique `pattern` (and only
  that): SIGKILL after the identity check, through the library's terminator.
  """
  def kill_leftovers(pattern) do
    leftovers = DSPex.Python.OrphanDetector.classify_processes(pattern: pattern)

    # The pattern is unique to the test, so another user's match is the test's own too.
    DSPexProcess.Termination.run(Enum.map(leftovers, &{&1.pid, &1.start_time}),
      grace_ms: 0,
      kill_wait_ms: 1_000,
      allow_other_users: true
    )
  end

  @doc """
  Runs `python script --linger extra_args` under a shell that detached from this VM
  (`setsid`, its launcher exits): the python's parent is a live shell that no BEAM owns,
  as when someone starts the bridge by hand. Returns `{os_pid, start_time}` of python.
  """
  def detach_and_run(script, extra_args) do
    marker = "dspex_detached_#{System.unique_integer([:positive])}"

    {_, 0} =
      System.cmd(
        "sh",
        [
          "-c",
          ~s(setsid sh -c 'exec 2>/dev/null; "$PY" "$SCRIPT" --linger $EXTRA; exit 0' "$MARK" </dev/null >/dev/null 2>&1 &)
        ],
        env: [
          {"PY", python()},
          {"SCRIPT", script},
          {"EXTRA", Enum.join(extra_args, " ")},
          {"MARK", marker}
        ]
      )

    {:ok, pid} = wait_for_child_of_shell(marker)
    {pid, start_time(pid)}
  end

  # The shell's child once it runs Python: `--linger` as an argument of its own (the
  # shell's fork before the exec carries the marker too, and `--linger` inside its script
  # text). Looked for once per poll, and the pid found is the one returned.
  defp wait_for_child_of_shell(marker) do
    finder = fn ->
      Enum.find_value(pids_with_arg(marker), fn shell ->
        with {:ok, kids} <- File.read("/proc/#{shell}/task/#{shell}/children"),
             [kid | _] <- String.split(kids),
             {:ok, cmd} <- File.read("/proc/#{kid}/cmdline"),
             true <- "--linger" in String.split(cmd, <<0>>) do
          String.to_integer(kid)
        else
          _ -> nil
        end
      end)
    end

    deadline = System.monotonic_time(:millisecond) + 5_000

    Stream.repeatedly(fn -> finder.() end)
    |> Stream.each(fn found -> if !found, do: Process.sleep(10) end)
    |> Enum.find(fn found -> found || System.monotonic_time(:millisecond) > deadline end)
    |> case do
      nil -> :error
      pid -> {:ok, pid}
    end
  end

  # Processes with `arg` as one of their argv elements (only ever a marker unique to a test).
  defp pids_with_arg(arg) do
    for "/proc/" <> pid <- Path.wildcard("/proc/[0-9]*"),
        {:ok, cmd} <- [File.read("/proc/#{pid}/cmdline")],
        arg in String.split(cmd, <<0>>),
        do: String.to_integer(pid)
  end

  @factory Path.expand("orphan_factory.py", __DIR__)

  @doc """
  `n` real orphans whose argv holds `marker`: forked by a Python factory that then exits,
  so they are re-parented; each leads its own session and odd ones ignore SIGTERM.
  Returns `[{os_pid, start_time}]` once every one is re-parented.
  """
  def make_orphans(n, marker) do
    {out, 0} = System.cmd(python(), [@factory, Integer.to_string(n), "orphans", marker])
    pids = out |> String.split() |> Enum.map(&String.to_integer/1)
    # The factory has exited; wait until the kernel has re-parented every child.
    reparented? = fn p ->
      case File.read("/proc/#{ppid(p)}/cmdline") do
        {:ok, cmd} -> not String.contains?(cmd, "orphan_factory.py")
        _ -> false
      end
    end

    true = eventually(fn -> Enum.all?(pids, reparented?) end, 10_000)

    Enum.map(pids, &{&1, start_time(&1)})
  end

  defp ppid(pid) do
    [_, rest] = Regex.run(~r/\)([^)]*)$/s, File.read!("/proc/#{pid}/stat"))
    rest |> String.split() |> Enum.at(1) |> String.to_integer()
  end

  @doc """
  For a test's `setup`: a unique bridge copy, and on exit the end of whatever still runs
  under its name, then the file. Returns `%{script: path, pattern: basename}`.
  """
  def setup_bridge(tag) do
    {script, pattern} = unique_bridge(tag)

    ExUnit.Callbacks.on_exit(fn ->
      kill_leftovers(pattern)
      File.rm(script)
    end)

    %{script: script, pattern: pattern}
  end

  @unguarded DSPexProcess.Test.Unguarded

  @doc """
  A real leak: a `--linger` worker whose Elixir process is killed. Returns its
  `Worker.info/1` once the port is closed (until then its process is in use).

  It registers in a registry with `guardian: false`: otherwise the guardian would end it,
  and the detector tests need something left to find.
  """
  def leak_worker(script, args \\ []) do
    :ok = DSPex.Python.ProcessRegistry.ensure_table(@unguarded, guardian: false)

    {:ok, w} =
      DSPexProcess.Worker.start(
        registry: @unguarded,
        worker_id: {:leak, System.unique_integer([:positive])},
        script: script,
        python: python(),
        args: ["--linger" | args]
      )

    {:ok, "pong"} = DSPexProcess.Worker.call(w, "ping")
    info = DSPexProcess.Worker.info(w)
    Process.exit(w, :kill)
    true = eventually(fn -> not port_open?(info.os_pid) end)
    info
  end

  @doc "Whether an open port of this VM runs `os_pid`."
  def port_open?(os_pid) do
    Enum.any?(Port.list(), &(Port.info(&1, :os_pid) == {:os_pid, os_pid}))
  end

  @doc "The cgroup v2 path of `os_pid` (its `0::` line in `/proc/PID/cgroup`), or nil."
  def cgroup_v2_path(os_pid) do
    "/proc/#{os_pid}/cgroup"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(fn line -> with "0::" <> path <- line, do: path, else: (_ -> nil) end)
  end

  @doc "A unique registry name for one test."
  def unique_name(tag), do: :"#{tag}_#{System.unique_integer([:positive])}"

  @doc "`{os_pid, start_time}` of each pid, read now."
  def identities(pids), do: Enum.map(pids, &{&1, start_time(&1)})

  @doc "Whether every `{os_pid, start_time}` is gone."
  def all_gone?(ids), do: Enum.all?(ids, fn {p, s} -> not alive?(p, s) end)

  @doc "Whether every `{os_pid, start_time}` still runs."
  def all_alive?(ids), do: Enum.all?(ids, fn {p, s} -> alive?(p, s) end)

  @doc """
  A field of a JSON text, read with python3's json module (Elixir 1.14 has no decoder):
  `expression` is Python over `d`, the decoded document.
  """
  def json(text, expression) do
    code = "import json, sys; d = json.load(sys.stdin); print(#{expression})"

    {out, 0} =
      System.cmd("sh", ["-c", ~s(printf '%s' "$J" | "$0" -c "$1"), python(), code],
        env: [{"J", text}]
      )

    String.trim(out)
  end

  @doc "The `{os_pid, start_time}` of the lingering workers of a peer VM killed with -9."
  def orphans_of_a_dead_beam(script, count) do
    peer = DSPexProcess.Test.PeerBeam.start(script, count, ["--linger"])
    ids = identities(peer.worker_pids)
    DSPexProcess.Test.PeerBeam.kill(peer)
    ids
  end

  @doc """
  Starts `script` (the bridge, lingering) as `nobody`, detached in a session of its own:
  its launcher exits, so it is re-parented, an orphan of another user.
  """
  def start_nobody_orphan(script) do
    setpriv = System.find_executable("setpriv") || raise "setpriv (util-linux) is needed"

    {_, 0} =
      System.cmd("sh", [
        "-c",
        ~s(setsid "$0" --reuid=nobody --regid=nogroup --clear-groups "$1" "$2" --linger </dev/null >/dev/null 2>&1 &),
        setpriv,
        python(),
        script
      ])

    :ok
  end
end
