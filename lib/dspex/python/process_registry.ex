defmodule DSPex.Python.ProcessRegistry do
  @moduledoc """
  Maps each worker to its Elixir process and its OS (Python) process.

  The entries live in native memory (a concurrent hash map inside a NIF resource), not in
  this GenServer and not in ETS. The resource is kept in `:persistent_term` under the
  registry's name, so a crash and restart of the registry process loses no registration.

  Each entry records the Python process by **pid and start time** (read from
  `/proc/PID/stat` for the process pinned by a pidfd when the worker registered), so a
  recycled pid can never pass for the process that was registered.

  When a worker's Elixir process exits, its entries leave the registry at once: the
  resource monitors every registered Elixir pid. A periodic sweep (`:cleanup_interval`)
  remains as a safety net and logs whatever it removes.

  ## Starting

  A registry is its native table plus, optionally, a process that sweeps it. The
  `:dspex_process` application creates the table of the default registry,
  `DSPex.Python.ProcessRegistry`, and starts its process, so the registry works as soon as
  the application runs. A tree may list it as well, as DSPex's own does:

      children = [
        DSPex.Python.ProcessRegistry,
        # or with options:
        # {DSPex.Python.ProcessRegistry, name: MyApp.Workers, cleanup_interval: 10_000}
      ]

  The rule: **one process per name; the table outlives every process.** Starting a registry
  whose name already runs returns `:ignore` (the supervisor records the child as not
  started and goes on), so a tree starts as written whether or not it lists the registry.
  The table of a name is created by the first start and is never erased: stopping, killing
  or restarting any registry process loses no registration, and every caller keeps using
  the table while any tree that uses it runs. To give the default registry's process your
  own options, set `config :dspex_process, start_registry: false` and list it in your tree.

  ## Options

    * `:name` - the name to register under (an atom). Every function takes the name as
      its last, optional argument. Default: `DSPex.Python.ProcessRegistry`.
    * `:cleanup_interval` - milliseconds between safety-net sweeps of dead workers, a
      positive integer or `:infinity`. Default: `30_000`.
    * `:cleanup_on_start` - when the registry starts, end the orphans whose owner BEAM is
      dead (reason `:owner_dead`), e.g. the workers of a previous run that crashed.
      `false` (default), `true`, or a keyword list of `DSPex.Python.OrphanDetector`
      options (such as `:pattern` or `:grace_ms`). It runs after `init/1` returns, so it
      never delays the start.
    * `:guardian` - `true` (default): `DSPexProcess.Guardian` ends this registry's OS
      processes once they leave it (owner exit, unregister) and when the VM stops or dies.
      `false`: the caller manages them (the detector still finds what leaks). Fixed when
      the name's table is created.

  Calls work directly against the native table (they do not go through the GenServer), so
  they stay fast under load and keep working while the registry process restarts.
  """

  use GenServer
  require Logger

  alias DSPexProcess.Native

  @default_name __MODULE__
  @default_interval 30_000
  @names_key {__MODULE__, :__running_names__}

  @typedoc "The name a registry runs under."
  @type registry :: atom()

  @typedoc "Any term: a string, atom, integer, tuple..."
  @type worker_id :: term()

  @type worker_info :: %{
          elixir_pid: pid(),
          python_pid: pos_integer() | nil,
          python_start_time: non_neg_integer() | nil,
          fingerprint: String.t(),
          registered_at: integer()
        }

  @type stats :: %{
          total_registered: non_neg_integer(),
          alive_workers: non_neg_integer(),
          dead_workers: non_neg_integer(),
          active_python_pids: non_neg_integer()
        }

  defmodule NotRunningError do
    @moduledoc "Raised when a registry function is called and no such registry was started."
    defexception [:name]

    @impl true
    def message(%{name: name}) do
      "no DSPex.Python.ProcessRegistry named #{inspect(name)} is running. " <>
        "Add `#{inspect(DSPex.Python.ProcessRegistry)}` (or " <>
        "`{DSPex.Python.ProcessRegistry, name: #{inspect(name)}}`) to your supervision " <>
        "tree, or start it with DSPex.Python.ProcessRegistry.start_link(name: " <>
        "#{inspect(name)}). The :dspex_process application starts the default one unless " <>
        "`config :dspex_process, start_registry: false` is set."
    end
  end

  @doc """
  A child spec; the id is the module for the default name and `{module, name}` otherwise,
  so several registries can share a supervisor.
  """
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    name = Keyword.get(opts, :name, @default_name)
    id = if name == @default_name, do: __MODULE__, else: {__MODULE__, name}
    %{id: id, start: {__MODULE__, :start_link, [opts]}, type: :worker}
  end

  @doc """
  Starts a registry. See the module documentation for the options; invalid options raise
  `ArgumentError`.
  """
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts = validate_options!(opts)

    case GenServer.start_link(__MODULE__, opts, name: opts[:name]) do
      # One process per name: the one already running serves the same table.
      {:error, {:already_started, _pid}} -> :ignore
      other -> other
    end
  end

  @doc """
  Creates the table of the registry `name` unless it exists; never replaces one. The
  application does this for the default name at start; `start_link/1` does it for its own.
  """
  @spec ensure_table(registry(), keyword()) :: :ok
  def ensure_table(name \\ @default_name, opts \\ []) when is_atom(name) do
    key = storage_key(name)
    guarded = Keyword.get(opts, :guardian, true)

    DSPexProcess.Options.check!(:guardian, guarded, :boolean)

    if :persistent_term.get(key, nil) == nil do
      # Two creators at once must not each put a table: one would lose its entries.
      :global.trans({key, self()}, fn -> create_table(name, key, guarded) end, [node()])
    end

    :ok
  end

  defp create_table(name, key, guarded) do
    if :persistent_term.get(key, nil) == nil do
      resource = Native.registry_new(guarded)
      :ok = Native.registry_name(name, resource)
      :persistent_term.put(key, resource)
      :persistent_term.put(@names_key, Enum.uniq([name | running_names()]))
    end
  end

  @doc """
  Registers a worker. Re-registering an id replaces its entry.

  `python_pid` is the OS pid of the worker's process (`Port.info(port, :os_pid)`), or `nil`
  when unknown. It is pinned now and its start time read before any registry call answers
  (see the registry section of `guides/usage.md`); `{:error, :no_such_process}` if it does not
  exist. Raises `ArgumentError` for a non-local or non-pid `elixir_pid`, a `python_pid` that
  is not an integer greater than 1, the BEAM's own OS pid, or a non-binary fingerprint.
  """
  @spec register_worker(worker_id(), pid(), pos_integer() | nil, String.t(), registry()) ::
          :ok | {:error, :no_such_process | :permission_denied | :proc_read_failed}
  def register_worker(worker_id, elixir_pid, python_pid, fingerprint, registry \\ @default_name) do
    check_elixir_pid!(elixir_pid)
    check_python_pid!(python_pid)
    check_fingerprint!(fingerprint)

    case Native.registry_register(name!(registry), worker_id, elixir_pid, python_pid, fingerprint) do
      :not_running ->
        resource = renamed!(registry)
        Native.registry_register(resource, worker_id, elixir_pid, python_pid, fingerprint)

      result ->
        result
    end
  end

  @doc """
  Removes a worker's entry. Unknown ids are fine. The OS process it named is ended shortly
  after unless it is registered again or held by an open port (see `DSPexProcess.Guardian`).
  """
  @spec unregister_worker(worker_id(), registry()) :: :ok
  def unregister_worker(worker_id, registry \\ @default_name) do
    case Native.registry_unregister(name!(registry), worker_id) do
      :not_running -> Native.registry_unregister(renamed!(registry), worker_id)
      :ok -> :ok
    end
  end

  @doc """
  The entry of one worker. The second argument is the registry's name, or options:
  `registry:` and `metrics: true`, which adds `:metrics` — the Python process's
  `rss_bytes`, `cpu_time_ms`, `threads`, `state` and `age_ms`, read from `/proc` now
  (`nil` when it has no live process).
  """
  @spec get_worker_info(worker_id(), registry() | keyword()) ::
          {:ok, worker_info()} | {:error, :not_found}
  def get_worker_info(worker_id, registry_or_opts \\ @default_name)

  def get_worker_info(worker_id, registry) when is_atom(registry) do
    case Native.registry_get(registry, worker_id) do
      :not_running -> Native.registry_get(renamed!(registry), worker_id)
      result -> result
    end
  end

  def get_worker_info(worker_id, opts) when is_list(opts) do
    opts =
      DSPexProcess.Options.validate!(
        opts,
        [registry: {@default_name, :atom}, metrics: {false, :boolean}],
        "get_worker_info options"
      )

    with {:ok, info} <- get_worker_info(worker_id, opts[:registry]) do
      if opts[:metrics], do: {:ok, Map.put(info, :metrics, metrics_of(info))}, else: {:ok, info}
    end
  end

  def get_worker_info(_worker_id, other) do
    raise ArgumentError, "expected a registry name or options, got: #{inspect(other)}"
  end

  defp metrics_of(%{python_pid: nil}), do: nil

  defp metrics_of(%{python_pid: pid, python_start_time: start}) do
    [metrics] = Native.process_metrics([{pid, start}])
    metrics
  end

  @doc "Every entry, as `{worker_id, info}` pairs, in no particular order."
  @spec list_all_workers(registry()) :: [{worker_id(), worker_info()}]
  def list_all_workers(registry \\ @default_name) do
    Native.registry_list(resource!(registry))
  end

  @doc "The entries whose fingerprint is `fingerprint`."
  @spec get_workers_by_fingerprint(String.t(), registry()) :: [{worker_id(), worker_info()}]
  def get_workers_by_fingerprint(fingerprint, registry \\ @default_name) do
    check_fingerprint!(fingerprint)
    Native.registry_by_fingerprint(resource!(registry), fingerprint)
  end

  @doc """
  The OS pids of workers whose Elixir process is alive; entries without a pid are skipped.
  """
  @spec get_active_python_pids(registry()) :: [pos_integer()]
  def get_active_python_pids(registry \\ @default_name) do
    Native.registry_active_python_pids(resource!(registry))
  end

  @doc """
  The entries whose Elixir process is dead (normally none: a dead worker leaves at once;
  an entry registered for an already-dead process stays until a sweep).
  """
  @spec validate_workers(registry()) :: [{worker_id(), worker_info()}]
  def validate_workers(registry \\ @default_name) do
    Native.registry_dead_workers(resource!(registry))
  end

  @doc "Removes the entries whose Elixir process is dead; returns how many it removed."
  @spec cleanup_dead_workers(registry()) :: non_neg_integer()
  def cleanup_dead_workers(registry \\ @default_name) do
    registry |> remove_dead() |> length()
  end

  @doc "Counts of registered, alive and dead workers and of active Python pids."
  @spec get_stats(registry()) :: stats()
  def get_stats(registry \\ @default_name) do
    Native.registry_stats(resource!(registry))
  end

  @doc false
  # The native tables of every registry of this VM: the detector counts the workers of all
  # of them as active, whichever registry the caller names.
  @spec running_resources() :: [reference()]
  def running_resources do
    for name <- running_names(), r = :persistent_term.get(storage_key(name), nil), do: r
  end

  defp running_names, do: :persistent_term.get(@names_key, [])

  @doc false
  # The native resource, for the other modules of this library.
  @spec resource!(registry()) :: reference()
  def resource!(registry) when is_atom(registry) do
    case :persistent_term.get(storage_key(registry), nil) do
      nil -> raise NotRunningError, name: registry
      resource -> resource
    end
  end

  def resource!(registry) do
    raise ArgumentError, "a registry is named by an atom, got: #{inspect(registry)}"
  end

  # The single-entry calls give the NIF the registry's name, which it resolves itself; it
  # answers :not_running for a name it does not know, and the call goes through
  # `renamed!/1`.
  defp name!(registry) when is_atom(registry), do: registry
  defp name!(registry), do: resource!(registry)

  # The table of a name the NIF does not know (a name never started raises here; one whose
  # NIF was reloaded since is named again, so that later calls resolve it natively).
  defp renamed!(registry) do
    resource = resource!(registry)
    :ok = Native.registry_name(registry, resource)
    resource
  end

  # GenServer

  @impl true
  def init(opts) do
    :ok = ensure_table(opts[:name], guardian: opts[:guardian])

    state = %{name: opts[:name], interval: opts[:cleanup_interval]}
    schedule_sweep(state)

    case opts[:cleanup_on_start] do
      false -> {:ok, state}
      detector_opts -> {:ok, state, {:continue, {:cleanup_on_start, detector_opts}}}
    end
  end

  @impl true
  def handle_continue({:cleanup_on_start, detector_opts}, state) do
    report = DSPex.Python.OrphanDetector.cleanup_orphaned_processes(detector_opts)

    if report.found > 0 do
      Logger.info(
        "#{inspect(state.name)} ended #{report.terminated} of " <>
          "#{report.found} orphan(s) of dead BEAMs on start (#{report.errors} error(s))"
      )
    end

    {:noreply, state}
  end

  @impl true
  def handle_info(:sweep, state) do
    remove_dead(state.name)
    schedule_sweep(state)
    {:noreply, state}
  end

  def handle_info(_message, state), do: {:noreply, state}

  defp remove_dead(registry) do
    removed = Native.registry_remove_dead(resource!(registry))

    DSPexProcess.Telemetry.execute(
      [:dspex_process, :registry, :sweep],
      %{removed: length(removed)},
      %{
        registry: registry
      }
    )

    if removed != [] do
      Logger.info(
        "#{inspect(registry)} removed #{length(removed)} dead " <>
          "worker(s): #{inspect(removed)}"
      )
    end

    removed
  end

  defp schedule_sweep(%{interval: :infinity}), do: :ok
  defp schedule_sweep(%{interval: ms}), do: Process.send_after(self(), :sweep, ms)

  defp storage_key(name), do: {__MODULE__, name}

  defp validate_options!(opts) do
    opts =
      DSPexProcess.Options.validate!(
        opts,
        [
          name: {@default_name, :atom},
          cleanup_interval: {@default_interval, {:or, [:pos_integer, {:value, :infinity}]}},
          cleanup_on_start:
            {false, {:or, [:boolean, {:fun, "a keyword list", &Keyword.keyword?/1}]}},
          guardian: {true, :boolean}
        ],
        "ProcessRegistry options"
      )

    Keyword.update!(opts, :cleanup_on_start, &cleanup_on_start_options!(&1, opts[:name]))
  end

  defp cleanup_on_start_options!(false, _name), do: false
  defp cleanup_on_start_options!(true, name), do: cleanup_on_start_options!([], name)

  defp cleanup_on_start_options!(detector_opts, name) do
    [registry: name, reasons: [:owner_dead]]
    |> Keyword.merge(detector_opts)
    |> DSPexProcess.Options.detector!()
  end

  defp check_elixir_pid!(pid) when is_pid(pid) and node(pid) == node(), do: :ok

  defp check_elixir_pid!(other) do
    raise ArgumentError,
          "elixir_pid must be a local pid, got: #{inspect(other)}"
  end

  defp check_python_pid!(nil), do: :ok

  # Linux pids fit in 31 bits (pid_max <= 2^22); anything larger is not a process.
  defp check_python_pid!(pid) when is_integer(pid) and pid > 1 and pid <= 0x7FFFFFFF do
    if Integer.to_string(pid) == System.pid() do
      raise ArgumentError, "python_pid #{pid} is this BEAM's own OS pid"
    end

    :ok
  end

  defp check_python_pid!(other) do
    raise ArgumentError,
          "python_pid must be nil or an integer from 2 to 2^31-1, got: #{inspect(other)}"
  end

  defp check_fingerprint!(fp) when is_binary(fp), do: :ok

  defp check_fingerprint!(other) do
    raise ArgumentError, "fingerprint must be a string, got: #{inspect(other)}"
  end
end
