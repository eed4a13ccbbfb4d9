defmodule DSPexProcess.Worker do
  @moduledoc """
  Owns one Python worker process through a Port, and keeps the registry and the process's
  ownership markers true for its whole life.

  On start it opens a Port to `python3 <script> --mode pool-worker <args>`, reads the OS pid
  with `Port.info(port, :os_pid)`, makes a fingerprint (`dspex_worker_<id>_<ns>_<rand>`),
  stamps the ownership markers into the process's environment (`DSPEX_OWNER_PID`,
  `DSPEX_OWNER_START`, `DSPEX_RUN_ID`, `DSPEX_WORKER_ID`, `DSPEX_FINGERPRINT`) and registers
  with `DSPex.Python.ProcessRegistry`.

  It traps exits. When it stops it unregisters, ends its own Python process with its
  process group and its descendants (found by parent links, whatever their session):
  SIGTERM, SIGKILL after `:shutdown_grace_ms`, each signal only after the process's pid and
  start time are checked again; then it closes the port.

  Start errors are named before anything is spawned: an interpreter that is not executable,
  a worker id, argument or environment string with a NUL byte, or longer than the kernel
  takes (E2BIG), each raise `ArgumentError` saying so. A spawn that still fails stops the
  worker with `{:spawn_failed, program, reason}`.

  ## Options

    * `:worker_id` (required) - any term; it names the registry entry.
    * `:python` - the interpreter; default `python3` from `PATH`.
    * `:script` - default: the bundled stand-in, the app's `priv/python/dspy_bridge.py`.
    * `:args` - extra arguments after `--mode pool-worker` (strings). Default `[]`.
    * `:env` - extra environment, `[{name, value}]` strings. Default `[]`.
    * `:registry` - the registry name. Default `DSPex.Python.ProcessRegistry`.
    * `:name` - a name to register the GenServer under (optional).
    * `:shutdown_grace_ms` - SIGTERM to SIGKILL when stopping. Default `1_000`.
    * `:guard` - start Python through `dspex-proc exec --pdeathsig SIG`, which sets
      `PR_SET_PDEATHSIG` and then execs Python in place (same pid): when the BEAM dies, even
      by `kill -9`, the kernel signals the worker at once. `true` (default, SIGKILL),
      `false`, or one of `:kill`, `:term`, `:int`, `:hup`, `:quit`, `:usr1`, `:usr2`.
      Children that the worker forks are not covered by the guard; the detector finds them.
    * `:limits` - resource limits set by the wrapper before it execs Python:
      `address_space:` bytes (RLIMIT_AS), `open_files:` count (RLIMIT_NOFILE), `nice:`
      -20..19; and, through the worker's cgroup (see containment below), `memory_max:`
      bytes (`memory.max`), `pids_max:` count (`pids.max`), `cpu_weight:` 1..10_000
      (`cpu.weight`). Where containment is off or the controller is not enabled for this
      VM's cgroup (`DSPexProcess.Guardian.containment/0` says which and why), a warning is
      logged and the rlimit stands in: `memory_max` becomes RLIMIT_AS (unless
      `address_space` is set), `cpu_weight` a nice value (100 is 0, 1 is 19, 10_000 is
      -20); `pids_max` has no per-tree rlimit and is not enforced then. On a hybrid host
      (cgroup2 without these controllers, cgroup v1 with them) they come from v1 instead:
      the worker also enters a leaf of each v1 hierarchy its limits need, where
      `memory_max` is `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`),
      `pids_max` `pids.max` and `cpu_weight` `cpu.shares` (weight × 1024 / 100, as
      systemd maps them). Invalid values raise `ArgumentError`. Default `[]`.

  ## Containment

  When the guardian runs cgroup containment (`DSPexProcess.Guardian.containment/0` is
  `mode: :cgroup`) and the registry is guarded, Python starts through `dspex-proc exec
  --cgroup DIR`, which puts itself in a leaf cgroup of its own before it execs Python: every
  process Python forks, even one that calls `setsid()` and double-forks, starts inside and
  ends with the worker (`cgroup.kill` after the grace). A worker killed by the memory
  controller (`memory.max`, or the v1 `memory.limit_in_bytes` on a hybrid host) stops with
  `{:memory_limit_exceeded, exit_status}` and logs it.

  ## Example

      {:ok, worker} = DSPexProcess.Worker.start_link(worker_id: "w1")
      {:ok, "pong"} = DSPexProcess.Worker.call(worker, "ping")
  """

  use GenServer
  require Logger

  alias DSPex.Python.ProcessRegistry
  alias DSPexProcess.Native

  @type option ::
          {:worker_id, term()}
          | {:python, String.t()}
          | {:script, String.t()}
          | {:args, [String.t()]}
          | {:env, [{String.t(), String.t()}]}
          | {:registry, atom()}
          | {:name, GenServer.name()}
          | {:shutdown_grace_ms, non_neg_integer()}
          | {:guard, boolean() | atom()}
          | {:limits,
             [
               address_space: pos_integer(),
               open_files: pos_integer(),
               nice: -20..19,
               memory_max: pos_integer(),
               pids_max: pos_integer(),
               cpu_weight: 1..10_000
             ]}

  @doc "A child spec whose id is `{DSPexProcess.Worker, worker_id}`."
  @spec child_spec([option()]) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{
      id: {__MODULE__, Keyword.get(opts, :worker_id)},
      start: {__MODULE__, :start_link, [opts]},
      shutdown: Keyword.get(opts, :shutdown_grace_ms, 1_000) + 5_000
    }
  end

  @doc "Starts a worker; invalid options raise `ArgumentError`."
  @spec start_link([option()]) :: GenServer.on_start()
  def start_link(opts), do: start_with(&GenServer.start_link/3, opts)

  @doc "Starts a worker outside a supervision tree (not linked to the caller)."
  @spec start([option()]) :: GenServer.on_start()
  def start(opts), do: start_with(&GenServer.start/3, opts)

  defp start_with(start, opts) do
    opts = validate!(opts)
    start.(__MODULE__, opts, if(opts[:name], do: [name: opts[:name]], else: []))
  end

  @doc """
  Sends `request` (a binary) to the Python process and waits for its reply.
  """
  @spec call(GenServer.server(), binary(), timeout()) :: {:ok, binary()} | {:error, term()}
  def call(worker, request, timeout \\ 5_000) when is_binary(request) do
    GenServer.call(worker, {:request, request}, timeout)
  end

  @doc "The worker's id, OS pid, start time and fingerprint."
  @spec info(GenServer.server()) :: %{
          worker_id: term(),
          os_pid: pos_integer(),
          start_time: non_neg_integer(),
          fingerprint: String.t()
        }
  def info(worker), do: GenServer.call(worker, :info)

  @doc "The OS pid of the worker's Python process."
  @spec os_pid(GenServer.server()) :: pos_integer()
  def os_pid(worker), do: info(worker).os_pid

  @doc """
  The ownership markers this BEAM stamps on `worker_id`'s process, as `{name, value}`.
  """
  @spec markers(term(), String.t()) :: [{String.t(), String.t()}]
  def markers(worker_id, fingerprint) do
    {beam_pid, beam_start, pid_ns} = beam_identity()
    # The names and their format live in the core, beside the parser that reads them back.
    {:ok, env} =
      Native.marker_env(beam_pid, beam_start, pid_ns, run_id(), id_string(worker_id), fingerprint)

    env
  end

  @doc "The `dspex-proc` executable that the mix compiler puts under the app's `priv/bin`."
  @spec guard_executable() :: String.t()
  def guard_executable do
    Path.join([:code.priv_dir(:dspex_process), "bin", "dspex-proc"])
  end

  defp guard_executable! do
    path = guard_executable()

    if File.regular?(path) do
      path
    else
      raise ArgumentError,
            "the :guard option needs #{path} (built by `mix compile`); " <>
              "compile the project or pass guard: false"
    end
  end

  @doc "The default script: the bundled bridge stand-in."
  @spec default_script() :: String.t()
  def default_script do
    Path.join([:code.priv_dir(:dspex_process), "python", "dspy_bridge.py"])
  end

  # GenServer

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)

    # Refuse before spawning anything: a worker that cannot register must not run.
    try do
      ProcessRegistry.resource!(opts[:registry])
      start_python(opts)
    rescue
      error in ProcessRegistry.NotRunningError -> {:stop, error}
    end
  end

  defp start_python(opts) do
    id = opts[:worker_id]
    fingerprint = fingerprint(id)
    env = markers(id, fingerprint) ++ opts[:env]

    python_argv = [opts[:python], opts[:script], "--mode", "pool-worker" | opts[:args]]

    # The wrapper enters the cgroup, sets the death signal and the limits, then execs
    # Python in place.
    {cgroup, limits} = containment(opts)
    wrapper = cgroup ++ limit_args(limits)

    {program, args} =
      case {opts[:guard], wrapper} do
        {false, []} ->
          {opts[:python], tl(python_argv)}

        {signal, wrapper} ->
          death = ["--pdeathsig", signal || "none"]
          {guard_executable!(), ["exec" | death] ++ wrapper ++ ["--" | python_argv]}
      end

    case open_port(program, args, env) do
      {:ok, port} -> register(port, id, fingerprint, Keyword.put(opts, :contained, cgroup != []))
      {:error, reason} -> {:stop, {:spawn_failed, program, reason}}
    end
  end

  # Everything that can be checked is checked before (validate!/1); what is left (a
  # filesystem mounted noexec, a file removed meanwhile) is an error naming the program.
  defp open_port(program, args, env) do
    {:ok,
     Port.open({:spawn_executable, program}, [
       :binary,
       :exit_status,
       {:packet, 4},
       args: args,
       env: Enum.map(env, fn {k, v} -> {String.to_charlist(k), String.to_charlist(v)} end)
     ])}
  rescue
    e in ErlangError -> {:error, e.original}
  end

  defp register(port, id, fingerprint, opts) do
    {:os_pid, os_pid} = Port.info(port, :os_pid)

    # Registration records the start time; checking *after* it that the pid is still our
    # port program proves the recorded identity is our Python's, not a recycled pid's.
    with :ok <-
           ProcessRegistry.register_worker(id, self(), os_pid, fingerprint, opts[:registry]),
         :ok <- check_port_child(os_pid, id, opts[:registry]),
         {:ok, %{python_start_time: start}} <-
           ProcessRegistry.get_worker_info(id, opts[:registry]) do
      {:ok,
       %{
         id: id,
         port: port,
         os_pid: os_pid,
         start_time: start,
         fingerprint: fingerprint,
         registry: opts[:registry],
         contained: opts[:contained],
         grace: opts[:shutdown_grace_ms],
         waiting: :queue.new()
       }}
    else
      {:error, reason} ->
        Port.close(port)
        {:stop, {:registration_failed, reason}}
    end
  end

  defp check_port_child(os_pid, id, registry) do
    if Native.port_child?(os_pid) do
      :ok
    else
      :ok = ProcessRegistry.unregister_worker(id, registry)
      {:error, :not_a_port_child}
    end
  end

  @impl true
  def handle_call({:request, request}, from, state) do
    Port.command(state.port, request)
    {:noreply, %{state | waiting: :queue.in(from, state.waiting)}}
  end

  def handle_call(:info, _from, state) do
    info = %{
      worker_id: state.id,
      os_pid: state.os_pid,
      start_time: state.start_time,
      fingerprint: state.fingerprint
    }

    {:reply, info, state}
  end

  @impl true
  def handle_info({port, {:data, reply}}, %{port: port} = state) do
    case :queue.out(state.waiting) do
      {{:value, from}, rest} ->
        GenServer.reply(from, {:ok, reply})
        {:noreply, %{state | waiting: rest}}

      {:empty, _} ->
        {:noreply, state}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    for from <- :queue.to_list(state.waiting), do: GenServer.reply(from, {:error, :python_exited})
    {:stop, exit_reason(state, status), %{state | port: nil, waiting: :queue.new()}}
  end

  def handle_info({:EXIT, port, _reason}, %{port: port} = state) do
    {:stop, :port_closed, %{state | port: nil}}
  end

  def handle_info(_message, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    try do
      ProcessRegistry.unregister_worker(state.id, state.registry)
    rescue
      ProcessRegistry.NotRunningError -> :ok
    end

    # The process is ended while the port still holds it open: closing first would let it
    # exit on stdin EOF before it is pinned, and its descendants that left its session
    # (setsid) could then no longer be found by their parent links.
    [outcome] =
      DSPexProcess.Termination.run([{state.os_pid, state.start_time}],
        grace_ms: state.grace,
        kill_wait_ms: 1_000
      )

    if state.port, do: safe_close(state.port)

    case outcome do
      {:ok, _} ->
        :ok

      {:error, error} ->
        Logger.warning(
          "DSPexProcess.Worker #{inspect(state.id)} could not end its python process " <>
            "#{state.os_pid}: #{inspect(error)}"
        )
    end
  end

  # The memory controller counts its kills in the leaf's memory.events (v2) or
  # memory.oom_control (v1), read here, before the leaf is removed in terminate/2.
  defp exit_reason(%{contained: true} = state, status) do
    case Native.cgroup_oom_kills(state.os_pid, state.start_time) do
      n when is_integer(n) and n > 0 ->
        Logger.error(
          "DSPexProcess.Worker #{inspect(state.id)}: python process #{state.os_pid} was " <>
            "killed by its cgroup's memory limit"
        )

        {:memory_limit_exceeded, status}

      _ ->
        {:python_exited, status}
    end
  end

  defp exit_reason(_state, status), do: {:python_exited, status}

  defp safe_close(port) do
    Port.close(port)
  rescue
    ArgumentError -> :ok
  end

  # Helpers

  defp fingerprint(id) do
    "dspex_worker_#{id_string(id)}_#{System.system_time(:nanosecond)}_#{:rand.uniform(1_000_000)}"
  end

  defp id_string(id) when is_binary(id), do: id
  defp id_string(id) when is_atom(id) or is_integer(id), do: to_string(id)
  defp id_string(id), do: inspect(id)

  defp beam_identity do
    case :persistent_term.get({__MODULE__, :beam_identity}, nil) do
      nil ->
        identity = Native.beam_identity()
        :persistent_term.put({__MODULE__, :beam_identity}, identity)
        identity

      identity ->
        identity
    end
  end

  @doc false
  # Random per VM boot: tells this run's workers from a previous run's with the same pid.
  def run_id do
    case :persistent_term.get({__MODULE__, :run_id}, nil) do
      nil ->
        id = Base.encode16(:rand.bytes(8), case: :lower)
        :persistent_term.put({__MODULE__, :run_id}, id)
        id

      id ->
        id
    end
  end

  defp validate!(opts) do
    unless is_list(opts) and Keyword.keyword?(opts) do
      raise ArgumentError, "Worker options must be a keyword list, got: #{inspect(opts)}"
    end

    unless Keyword.has_key?(opts, :worker_id) do
      raise ArgumentError, "DSPexProcess.Worker needs a :worker_id"
    end

    opts =
      Keyword.validate!(opts, [
        :worker_id,
        :name,
        python: nil,
        script: nil,
        args: [],
        env: [],
        registry: ProcessRegistry,
        shutdown_grace_ms: 1_000,
        guard: true,
        limits: []
      ])

    python = opts[:python] || System.find_executable("python3")
    script = opts[:script] || default_script()

    check!(
      is_binary(python) and File.regular?(python),
      :python,
      opts[:python] || "python3",
      "an existing file (default: python3 on PATH)"
    )

    check_executable!(python)
    check!(is_binary(script) and File.regular?(script), :script, script, "an existing file")

    check!(
      is_list(opts[:args]) and Enum.all?(opts[:args], &is_binary/1),
      :args,
      opts[:args],
      "a list of strings"
    )

    check!(
      is_list(opts[:env]) and
        Enum.all?(opts[:env], &match?({k, v} when is_binary(k) and is_binary(v), &1)),
      :env,
      opts[:env],
      "a list of {name, value} strings"
    )

    check_exec_strings!(opts[:worker_id], [python, script | opts[:args]], opts[:env])

    DSPexProcess.Options.check!(:registry, opts[:registry], :atom)
    DSPexProcess.Options.check!(:shutdown_grace_ms, opts[:shutdown_grace_ms], :non_neg_integer)

    opts
    |> Keyword.put(:python, python)
    |> Keyword.put(:script, script)
    |> Keyword.update!(:guard, &guard_signal!/1)
    |> Keyword.update!(:limits, &limits!/1)
  end

  @limits [
    address_space: "--rlimit-as",
    open_files: "--rlimit-nofile",
    nice: "--nice",
    memory_max: "--memory-max",
    pids_max: "--pids-max",
    cpu_weight: "--cpu-weight"
  ]

  @limits_description "a keyword list of address_space, open_files, memory_max, pids_max " <>
                        "(positive integers), nice (-20..19) and cpu_weight (1..10_000)"

  # {limit key, cgroup controller}
  @cgroup_limits [memory_max: "memory", pids_max: "pids", cpu_weight: "cpu"]

  defp limits!(limits) do
    unless Keyword.keyword?(limits), do: invalid!(:limits, limits, @limits_description)

    for {key, value} <- limits do
      ok? =
        case key do
          k when k in [:address_space, :open_files, :memory_max, :pids_max] ->
            is_integer(value) and value > 0

          :nice ->
            is_integer(value) and value in -20..19

          :cpu_weight ->
            is_integer(value) and value in 1..10_000

          _ ->
            false
        end

      check!(ok?, :limits, [{key, value}], @limits_description)
    end

    limits
  end

  # The wrapper's cgroup arguments, and the limits with the cgroup ones that cannot be had
  # replaced by their rlimit stand-ins.
  defp containment(opts) do
    status = Native.containment_status()

    cgroup =
      if status.mode == :cgroup and
           Native.registry_guarded(ProcessRegistry.resource!(opts[:registry])),
         do: ["--cgroup", status.cgroup],
         else: []

    available = if cgroup == [], do: [], else: status.controllers

    limits =
      Enum.flat_map(opts[:limits], fn {key, value} = limit ->
        controller = @cgroup_limits[key]

        if controller == nil or controller in available,
          do: [limit],
          else: fall_back(key, value, opts[:limits], status, cgroup == [])
      end)

    # On a hybrid host, the controllers cgroup2 lacks come from v1: the wrapper enters a
    # leaf of each v1 hierarchy one of its limits needs.
    v1 =
      for {key, _} <- limits,
          controller = @cgroup_limits[key],
          controller in available,
          status.hierarchies[controller] == :v1,
          uniq: true,
          do: status.v1_cgroups[controller]

    {cgroup ++ Enum.flat_map(v1, &["--cgroup-v1", &1]), limits}
  end

  defp fall_back(key, value, limits, status, no_cgroup?) do
    why =
      if no_cgroup?,
        do: "this worker has no cgroup (#{status.reason})",
        else: status.controllers_reason

    {stand_in, text} =
      case key do
        :memory_max ->
          if Keyword.has_key?(limits, :address_space),
            do: {[], "address_space is set and stands"},
            else: {[address_space: value], "RLIMIT_AS #{value} stands in"}

        :cpu_weight ->
          nice = nice_of_weight(value)

          if Keyword.has_key?(limits, :nice),
            do: {[], "nice is set and stands"},
            else: {[nice: nice], "nice #{nice} stands in"}

        :pids_max ->
          {[], "no rlimit counts a process tree: not enforced"}
      end

    Logger.warning(
      "DSPexProcess.Worker: limit #{inspect(key)} needs the cgroup controller " <>
        "#{@cgroup_limits[key]}: #{why}; #{text}"
    )

    stand_in
  end

  # systemd's mapping of cpu.weight to nice: 100 is 0, each factor 1.25 is one step.
  defp nice_of_weight(weight) do
    round(-:math.log(weight / 100) / :math.log(1.25)) |> max(-20) |> min(19)
  end

  defp limit_args(limits) do
    Enum.flat_map(limits, fn {key, value} -> [@limits[key], Integer.to_string(value)] end)
  end

  @guard_signals [:kill, :term, :int, :hup, :quit, :usr1, :usr2]

  defp guard_signal!(false), do: false
  defp guard_signal!(true), do: "KILL"

  defp guard_signal!(signal) when signal in @guard_signals,
    do: signal |> Atom.to_string() |> String.upcase()

  defp guard_signal!(other) do
    raise ArgumentError,
          ":guard must be a boolean or one of #{inspect(@guard_signals)}, got: #{inspect(other)}"
  end

  # A program that exists but cannot be run gives a clear error here, not an :eacces from
  # inside the port.
  defp check_executable!(path) do
    case File.stat(path) do
      {:ok, %{type: :regular, mode: mode}} when Bitwise.band(mode, 0o111) != 0 ->
        :ok

      _ ->
        raise ArgumentError,
              ":python must be an executable file, got: #{inspect(path)} " <>
                "(not executable: permission denied)"
    end
  end

  # The kernel's limit on one argument or environment string (MAX_ARG_STRLEN): longer ones
  # make execve fail with E2BIG.
  @max_arg_bytes 131_072
  # The worker id is stamped twice (DSPEX_WORKER_ID and inside DSPEX_FINGERPRINT).
  @max_id_bytes 65_536

  # What execve cannot take: NUL bytes (they end a C string) and strings past the kernel's
  # limit. Checked before anything is spawned.
  defp check_exec_strings!(worker_id, argv, env) do
    id = id_string(worker_id)

    cond do
      String.contains?(id, <<0>>) ->
        raise ArgumentError,
              ":worker_id must be free of NUL bytes (it is passed in an environment " <>
                "variable), got: #{inspect(worker_id, limit: 5, printable_limit: 64)}"

      byte_size(id) > @max_id_bytes ->
        raise ArgumentError,
              ":worker_id must be at most #{@max_id_bytes} bytes as a string (it is " <>
                "stamped in the worker's environment, where the kernel refuses longer " <>
                "strings: E2BIG), got: #{byte_size(id)} bytes"

      true ->
        :ok
    end

    for arg <- argv, do: check_exec_string!(:args, arg)
    for {k, v} <- env, do: check_exec_string!(:env, k <> "=" <> v)

    for {k, _} <- env, k == "" or String.contains?(k, "=") do
      raise ArgumentError, ":env names must be non-empty and without \"=\", got: #{inspect(k)}"
    end

    :ok
  end

  defp check_exec_string!(key, string) do
    cond do
      String.contains?(string, <<0>>) ->
        raise ArgumentError,
              "#{inspect(key)} must be free of NUL bytes (a program cannot take them), " <>
                "got: #{inspect(string, printable_limit: 64)}"

      byte_size(string) >= @max_arg_bytes ->
        raise ArgumentError,
              "#{inspect(key)} must be strings of at most #{@max_arg_bytes - 1} bytes (the " <>
                "kernel refuses longer ones: E2BIG), got: a string of #{byte_size(string)} bytes"

      true ->
        :ok
    end
  end

  # The message style of DSPexProcess.Options, for checks that need more than a schema.
  defp check!(true, _key, _value, _expected), do: :ok
  defp check!(false, key, value, expected), do: invalid!(key, value, expected)

  @spec invalid!(atom(), term(), String.t()) :: no_return()
  defp invalid!(key, value, expected) do
    raise ArgumentError, "#{inspect(key)} must be #{expected}, got: #{inspect(value, limit: 10)}"
  end
end
