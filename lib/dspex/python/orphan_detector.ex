defmodule DSPex.Python.OrphanDetector do
  @moduledoc """
  Finds the worker processes that nobody owns any more and ends them, without touching an
  active worker, a worker of another live BEAM, or an unrelated process.

  ## How a process is classified

  Every live process that the pattern names as a worker (literal bytes, never a regex; by
  default `dspy_bridge.py`) gets exactly one class: `:zombie`, `:active`, `:starting`,
  `:foreign`, `:unmanaged` or `:orphan` (with its reason: `:owner_dead`, `:worker_gone`,
  `:reparented`). Only orphans are ended; `:unmanaged` ones too with
  `include_unmanaged: true`. A process carrying the library's markers is a candidate when
  any argument (or its basename) equals the pattern; one without markers only when the
  pattern names its program (`argv[0]`) or the script its interpreter runs — a process that
  merely names the pattern in its arguments is not a worker. The table that decides, with
  every rule beyond it, is in the usage guide (`guides/usage.md`, "Orphan detection and
  cleanup").

  Markers are environment variables that `DSPexProcess.Worker` stamps on each Python
  process (the owner BEAM's pid and start time, a run id, the worker id, the fingerprint),
  read back from `/proc/PID/environ`. They make ownership outlive the owner's memory: a
  BEAM started after a crash, or the CLI, can tell whose worker a process is.

  A scan that cannot read `/proc` in full for want of descriptors or memory (EMFILE,
  ENFILE, ENOMEM) raises a `RuntimeError` that says so, from every function that scans:
  what it did not read may hold orphans or workers, so it reports nothing as found and
  ends nothing. (`dspex-proc` exits with status 71 for the same reason.)

  ## Cgroups of dead VMs

  With cgroup containment (see `DSPexProcess.Guardian`), every registered process lives in
  a leaf of its VM's cgroup, `dspex-<pidns>-<vm pid>-<vm start>`, named with the VM's
  identity. When that VM is dead (its pid gone or another process now, or a zombie; judged
  only in the reader's own pid namespace, and a pid that cannot be read counts as alive),
  everything still in its cgroup is an orphan with reason `:cgroup_owner_dead`, whatever
  its argv, session or process group (a daemon the worker double-forked). Processes the
  pattern already classified keep that class. Cleanup ends them with their leaf
  (`cgroup.kill` after the grace) and removes the emptied cgroups of dead VMs. The option
  `cgroups: false` turns this pass off.

  When no registry is running, this BEAM's own processes are never condemned (there is no
  way to tell a live one from a leaked one), but orphans of dead BEAMs still are.

  ## Termination

  Cleanup classifies again at the moment it acts, pins every target with a pidfd after
  re-checking its start time, sends SIGTERM to all of them at once (with the members of
  the process group a target leads, its descendants found by parent links, and its
  containment cgroup), waits on one shared deadline (`:grace_ms`), sends SIGKILL to the
  survivors and waits `:kill_wait_ms` more: many orphans take about one grace period, not
  one each. It never signals PID 1, this BEAM, its ancestors, its own
  process group, or another user's process (unless `allow_other_users: true`).

  ## Options

  Every function takes a keyword list; unknown keys and bad values raise `ArgumentError`.

    * `:pattern` - a string or a list of strings (1 to 64, each 1 to 4096 bytes, no NUL),
      matched literally as described above. Default `"dspy_bridge.py"`.
    * `:registry` - the registry whose counts `get_system_status/1` reports. Default
      `DSPex.Python.ProcessRegistry`. (Classification counts the workers of *every*
      running registry as active, and the OS process of every open port of this VM.)
    * `:min_age_ms` - this BEAM's own unregistered processes younger than this are
      `:starting`, not orphans. Default `5_000`.
    * `:grace_ms` - time between SIGTERM and SIGKILL. Default `1_000`.
    * `:kill_wait_ms` - time to wait after SIGKILL before reporting `{:error, :still_alive}`.
      Default `1_000`.
    * `:kill_group` - signal the whole process group of targets that lead one. Default `true`.
    * `:include_unmanaged` - treat `:unmanaged` processes as orphans (reason `:unmanaged`).
      Default `false`.
    * `:allow_other_users` - allow signalling processes of another uid. Default `false`.
    * `:reasons` - act only on orphans with these reasons (`:owner_dead`, `:worker_gone`,
      `:reparented`, `:cgroup_owner_dead`, `:unmanaged`). Default: all.
    * `:cgroups` - also report the processes in the cgroups of dead VMs
      (`:cgroup_owner_dead`, see above). Default `true`.
    * `:dry_run` - report what cleanup would do, signal nothing. Default `false`.
    * `:metrics` - `get_system_status/1` adds `:metrics`: each live registered worker's
      `rss_bytes`, `cpu_time_ms`, `threads`, `state` and `age_ms`, with totals. Default
      `false`.
  """

  require Logger

  alias DSPex.Python.ProcessRegistry
  alias DSPexProcess.{Native, Options, Telemetry, Termination}

  @protected_classes [:active, :starting, :foreign, :unmanaged, :zombie]

  @type reason :: :owner_dead | :worker_gone | :reparented | :cgroup_owner_dead | :unmanaged
  @type owner :: %{
          pid: pos_integer(),
          start_time: non_neg_integer(),
          run_id: String.t() | nil,
          worker_id: String.t() | nil,
          fingerprint: String.t() | nil
        }
  @type orphan :: %{
          pid: pos_integer(),
          cmdline: String.t(),
          start_time: non_neg_integer(),
          detected_at: integer(),
          reason: reason(),
          pgid: integer(),
          uid: non_neg_integer(),
          age_ms: non_neg_integer(),
          owner: owner() | nil
        }
  @type outcome ::
          {:ok, :graceful | :force_killed | :already_gone | :dry_run} | {:error, term()}
  @type cleanup_report :: %{
          found: non_neg_integer(),
          terminated: non_neg_integer(),
          errors: non_neg_integer(),
          preserved_active: non_neg_integer(),
          details: [{orphan() | term(), outcome()}],
          already_gone: non_neg_integer(),
          protected: %{atom() => non_neg_integer()},
          dry_run: boolean()
        }

  @doc """
  The orphans on this host now, each with its reason, identity and owner markers.
  Signals nothing.
  """
  @spec find_orphaned_processes(keyword()) :: [orphan()]
  def find_orphaned_processes(opts \\ []) do
    opts = validate!(opts)
    opts |> detect() |> orphans()
  end

  @doc """
  Ends orphans and reports what happened.

  With options (or none), it finds the orphans now and ends them. With a list of orphans
  (as returned by `find_orphaned_processes/1`) it treats the list as a request: each entry
  is classified again and signalled only if it is still an orphan with the same pid and
  start time (both are required); anything else is reported and left alone. An empty list
  is an empty request and does nothing.

  Each detail is `{orphan, outcome}` where outcome is `{:ok, :graceful}`,
  `{:ok, :force_killed}`, `{:ok, :already_gone}`, `{:ok, :dry_run}` or `{:error, reason}`.
  """
  @spec cleanup_orphaned_processes() :: cleanup_report()
  def cleanup_orphaned_processes, do: cleanup_now(validate!([]))

  @doc """
  See `cleanup_orphaned_processes/0`: with options, or with a list of orphans. `nil` (the
  reference's default argument) is the zero-arity call.
  """
  @spec cleanup_orphaned_processes([orphan()] | keyword() | nil) :: cleanup_report()
  def cleanup_orphaned_processes(orphans_or_opts)

  def cleanup_orphaned_processes(nil), do: cleanup_orphaned_processes()

  # An empty list is an empty request (a filtered find that found nothing): no-op.
  def cleanup_orphaned_processes([]), do: cleanup_orphaned_processes([], [])

  def cleanup_orphaned_processes([{key, _} | _] = opts) when is_atom(key),
    do: cleanup_now(validate!(opts))

  def cleanup_orphaned_processes(orphans) when is_list(orphans),
    do: cleanup_orphaned_processes(orphans, [])

  def cleanup_orphaned_processes(other), do: cleanup_now(validate!(other))

  @doc "Ends the listed orphans (see `cleanup_orphaned_processes/1`) with options."
  @spec cleanup_orphaned_processes([orphan()], keyword()) :: cleanup_report()
  def cleanup_orphaned_processes(orphans, opts) when is_list(orphans) do
    opts = validate!(opts)
    detections = detect(opts)
    current = Map.new(orphans(detections), &{&1.pid, &1})
    by_pid = Map.new(detections, &{&1.pid, &1})

    {targets, refused} =
      orphans
      |> Enum.map(&vet_request(&1, current, by_pid))
      |> Enum.split_with(&match?({:target, _}, &1))

    targets = Enum.map(targets, fn {:target, orphan} -> orphan end)
    refused = Enum.map(refused, fn {:refused, entry, outcome} -> {entry, outcome} end)
    execute(targets, refused, detections, opts)
  end

  def cleanup_orphaned_processes(other, _opts) do
    raise ArgumentError, "expected a list of orphans, got: #{inspect(other)}"
  end

  @doc """
  Registry counts, orphan counts and the system's health.

  `system_health` follows the orphan ratio (orphans / matching processes): `:healthy` at 0,
  `:good` under 10 %, `:degraded` under 30 %, `:critical` above. The counts of each
  protected class are included.
  """
  @spec get_system_status(keyword()) :: map()
  def get_system_status(opts \\ []) do
    opts = validate!(opts)
    detections = detect(opts)
    orphans = orphans(detections)
    summary = summary(detections, length(orphans), [])

    %{
      registry: registry_stats(opts[:registry]),
      orphaned_processes: length(orphans),
      total_dspy_processes: summary.total,
      system_health: summary.health,
      orphan_details: orphans
    }
    |> Map.merge(summary.counts)
    |> then(
      &if(opts[:metrics], do: Map.put(&1, :metrics, worker_metrics(opts[:registry])), else: &1)
    )
  end

  # Metrics of the registry's live workers, in one dirty pass over /proc, with totals.
  defp worker_metrics(registry) do
    workers =
      try do
        ProcessRegistry.list_all_workers(registry)
      rescue
        ProcessRegistry.NotRunningError -> []
      end
      |> Enum.filter(fn {_id, info} -> info.python_pid end)

    metrics =
      Native.process_metrics(
        Enum.map(workers, fn {_, i} -> {i.python_pid, i.python_start_time} end)
      )

    per_worker =
      for {{id, info}, m} <- Enum.zip(workers, metrics), m do
        Map.merge(m, %{worker_id: id, python_pid: info.python_pid})
      end

    totals =
      Enum.reduce(per_worker, %{workers: 0, rss_bytes: 0, cpu_time_ms: 0, threads: 0}, fn m,
                                                                                          acc ->
        %{
          workers: acc.workers + 1,
          rss_bytes: acc.rss_bytes + m.rss_bytes,
          cpu_time_ms: acc.cpu_time_ms + m.cpu_time_ms,
          threads: acc.threads + m.threads
        }
      end)

    %{workers: per_worker, totals: totals}
  end

  @doc """
  Checks that detection works here: what it finds, whether each orphan is confirmed by a
  second, independent classification, and what the system offers (`pgrep`, `kill`, `/proc`,
  pidfds, readable environments).
  """
  @spec validate_detection_system(keyword()) :: map()
  def validate_detection_system(opts \\ []) do
    opts = validate!(opts)
    detections = detect(opts)
    orphans = orphans(detections)
    again = opts |> detect() |> orphans() |> Map.new(&{{&1.pid, &1.start_time}, true})
    native = Map.put(Native.capabilities(), :containment, Native.containment_status())

    %{
      status: if(native.proc_filesystem, do: :ok, else: :error),
      all_dspy_processes: length(detections),
      active_workers: Enum.count(detections, &(&1.class == :active)),
      validation_test: Enum.map(orphans, &{&1.pid, Map.has_key?(again, {&1.pid, &1.start_time})}),
      system_commands: %{
        pgrep_available: System.find_executable("pgrep") != nil,
        kill_available: System.find_executable("kill") != nil,
        proc_filesystem: native.proc_filesystem
      },
      native: native
    }
  end

  @doc """
  `get_system_status/1` of every connected node, each acting on its own host, keyed by
  node: `%{node => {:ok, status} | {:error, reason}}`. A node that cannot be reached, or
  fails, is reported, never raised.

  Takes the detector's options (sent to every node), plus `:nodes` (default: this node
  and `Node.list/0`) and `:timeout` in ms (default: 15 s, or `grace_ms + kill_wait_ms`
  plus 10 s when that is longer).
  """
  @spec cluster_status(keyword()) :: %{node() => {:ok, map()} | {:error, term()}}
  def cluster_status(opts \\ []), do: cluster(:get_system_status, opts)

  @doc """
  `cleanup_orphaned_processes/1` on every connected node, each on its own host, keyed by
  node, like `cluster_status/1`.
  """
  @spec cluster_cleanup(keyword()) :: %{node() => {:ok, cleanup_report()} | {:error, term()}}
  def cluster_cleanup(opts \\ []), do: cluster(:cleanup_orphaned_processes, opts)

  defp cluster(fun, opts) do
    unless is_list(opts) and Keyword.keyword?(opts) do
      raise ArgumentError, "cluster options must be a keyword list, got: #{inspect(opts)}"
    end

    {nodes, opts} = Keyword.pop(opts, :nodes, [node() | Node.list()])
    {timeout, opts} = Keyword.pop(opts, :timeout)
    # Validated here too, so that bad options fail once, loudly, not once per node.
    local = validate!(opts)
    # A cleanup may legitimately take grace + kill_wait on every node.
    timeout = timeout || max(15_000, local[:grace_ms] + local[:kill_wait_ms] + 10_000)

    Options.check!(:nodes, nodes, {:list_of, :atom, 0..100_000})
    Options.check!(:timeout, timeout, :pos_integer)
    args = if opts == [], do: [], else: [opts]

    nodes
    |> :erpc.multicall(__MODULE__, fun, args, timeout)
    |> Enum.zip(nodes)
    |> Map.new(fn
      {{:ok, result}, node} -> {node, {:ok, result}}
      {{:error, {:erpc, reason}}, node} -> {node, {:error, reason}}
      {{class, reason}, node} -> {node, {:error, {class, reason}}}
    end)
  end

  @doc """
  Every matching process with its class (`:active`, `:starting`, `:foreign`, `:unmanaged`,
  `:zombie`, `:orphan`), for diagnostics.
  """
  @spec classify_processes(keyword()) :: [map()]
  def classify_processes(opts \\ []) do
    opts |> validate!() |> detect()
  end

  # Internals

  defp cleanup_now(opts) do
    detections = detect(opts)
    execute(orphans(detections), [], detections, opts)
  end

  defp execute(targets, refused, detections, opts) do
    started = System.monotonic_time()
    meta = %{pattern: opts[:pattern], dry_run: opts[:dry_run]}

    Telemetry.execute(
      [:dspex_process, :cleanup, :start],
      %{system_time: System.system_time()},
      meta
    )

    outcomes =
      cond do
        targets == [] ->
          []

        opts[:dry_run] ->
          Enum.map(targets, fn _ -> {:ok, :dry_run} end)

        true ->
          Termination.run(Enum.map(targets, &{&1.pid, &1.start_time}), opts)
      end

    # The emptied cgroups of dead VMs (and the empty ones they left) go.
    if opts[:cgroups] and not opts[:dry_run], do: Native.remove_dead_vm_cgroups()

    details = Enum.zip(targets, outcomes) ++ refused
    Enum.each(details, &report_outcome/1)
    summary = summary(detections, length(targets), Enum.map(details, &elem(&1, 1)))

    report = %{
      found: summary.found,
      terminated: summary.terminated,
      errors: summary.errors,
      already_gone: summary.already_gone,
      preserved_active: summary.preserved_active,
      protected: Map.take(summary.counts, @protected_classes),
      details: details,
      dry_run: opts[:dry_run]
    }

    measurements =
      report
      |> Map.take([:found, :terminated, :errors, :already_gone])
      |> Map.put(:duration, System.monotonic_time() - started)

    Telemetry.execute([:dspex_process, :cleanup, :stop], measurements, meta)
    report
  end

  defp report_outcome({entry, outcome} = detail) do
    log_outcome(detail)

    Telemetry.execute([:dspex_process, :orphan, :terminated], %{count: 1}, %{
      pid: field(entry, :pid),
      reason: field(entry, :reason),
      outcome: outcome
    })
  end

  # Request entries may be anything a caller passed: read them defensively.
  defp field(%{} = entry, key), do: Map.get(entry, key)
  defp field(_entry, _key), do: nil

  # Identity is pid *and* start time: an entry without both is refused.
  defp vet_request(%{pid: pid, start_time: wanted_start} = entry, current, by_pid)
       when is_integer(pid) and is_integer(wanted_start) do
    case {Map.get(current, pid), Map.get(by_pid, pid)} do
      {%{start_time: ^wanted_start} = orphan, _} ->
        {:target, orphan}

      {%{}, _} ->
        {:refused, entry, {:ok, :already_gone}}

      {nil, %{class: class, start_time: ^wanted_start}} ->
        {:refused, entry, {:error, {:not_an_orphan, class}}}

      {nil, _} ->
        gone_or_not_a_match(entry, pid, wanted_start)
    end
  end

  defp vet_request(entry, _current, _by_pid), do: {:refused, entry, {:error, :invalid_entry}}

  defp gone_or_not_a_match(entry, pid, wanted_start) do
    case pid > 1 and pid <= 0x7FFFFFFF and Native.process_start_time(pid) do
      {:ok, ^wanted_start} -> {:refused, entry, {:error, :not_a_match}}
      {:ok, _other} -> {:refused, entry, {:ok, :already_gone}}
      {:error, :no_such_process} -> {:refused, entry, {:ok, :already_gone}}
      _ -> {:refused, entry, {:error, :invalid_entry}}
    end
  end

  defp log_outcome({%{pid: pid, reason: reason}, {:ok, result}}) do
    Logger.info("DSPex orphan cleanup: pid #{pid} (#{reason}) #{result}")
  end

  defp log_outcome({entry, {:error, error}}) do
    Logger.warning(
      "DSPex orphan cleanup: refused or failed for #{describe(entry)}: #{inspect(error)}"
    )
  end

  defp log_outcome({entry, {:ok, result}}) do
    Logger.info("DSPex orphan cleanup: #{describe(entry)} #{result}")
  end

  defp describe(entry) do
    case field(entry, :pid) do
      nil -> inspect(entry)
      pid -> "pid #{inspect(pid)}"
    end
  end

  defp detect(opts) do
    registries = ProcessRegistry.running_resources()
    # Without any registry nothing of ours can be told apart as leaked: protect it all.
    min_age = if registries == [], do: 0xFFFFFFFFFFFF, else: opts[:min_age_ms]

    started = System.monotonic_time()

    case Native.detect(registries, open_port_pids(), opts[:pattern], min_age, selection(opts)) do
      {:ok, detections} ->
        detections = detections ++ cgroup_orphans(detections, opts)

        Telemetry.execute(
          [:dspex_process, :scan],
          %{
            duration: System.monotonic_time() - started,
            matched: length(detections),
            orphans: Enum.count(detections, &(&1.class == :orphan))
          },
          %{pattern: opts[:pattern]}
        )

        detections

      {:error, {:proc_unreadable, message}} ->
        raise RuntimeError,
              "could not read /proc in full (#{message}): nothing was classified or ended"

      {:error, reason} ->
        raise ArgumentError, "invalid :pattern (#{reason})"
    end
  end

  # The processes in dead VMs' cgroups that the pattern did not already classify.
  defp cgroup_orphans(detections, opts) do
    if opts[:cgroups] do
      seen = MapSet.new(detections, & &1.pid)
      Enum.reject(Native.detect_cgroup_orphans(selection(opts)), &MapSet.member?(seen, &1.pid))
    else
      []
    end
  end

  # The processes the core's policy made targets under the caller's selection.
  defp selection(opts) do
    %{
      include_unmanaged: opts[:include_unmanaged],
      reasons: Enum.map(opts[:reasons], &to_string/1)
    }
  end

  defp orphans(detections) do
    now = System.os_time(:second)

    for %{target: reason} = d when reason != nil <- detections do
      d
      |> Map.take([:pid, :cmdline, :start_time, :pgid, :uid, :age_ms, :owner])
      |> Map.merge(%{reason: reason, detected_at: now})
    end
  end

  # The core's policy counts the classes, judges the health and counts the report, as the
  # CLI does.
  defp summary(detections, orphans, outcomes) do
    Native.policy_summary(Enum.map(detections, & &1.class), orphans, outcomes)
  end

  # The OS processes behind this VM's open ports are in use, registered or not.
  defp open_port_pids do
    for port <- Port.list(),
        {:os_pid, pid} <- [Port.info(port, :os_pid)],
        is_integer(pid),
        do: pid
  end

  defp registry_stats(name) do
    ProcessRegistry.get_stats(name)
  rescue
    ProcessRegistry.NotRunningError -> nil
  end

  defp validate!(opts), do: Options.detector!(opts)
end
