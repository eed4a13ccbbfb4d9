defmodule DSPexProcess.Guardian do
  @moduledoc """
  Makes sure no registered OS process outlives its owner, for any client of
  `DSPex.Python.ProcessRegistry` — including code that only calls `register_worker/4`, does
  not trap exits and stamps no markers (DSPex's own pool). The `:dspex_process` application
  starts it; there is one per VM.

  Three layers, from the first to fire to the last resort:

    * **Owner exit.** An OS process leaves the registry when its Elixir owner exits for any
      reason (normal stop, supervisor shutdown, `:kill`), when its entry is unregistered, or
      when its id is registered again for another process. `:release_delay_ms` later, if it
      is neither registered again (in any registry of this VM) nor held by an open port of
      this VM, the guardian ends it: SIGTERM to it and its process group, SIGKILL after
      `:grace_ms`. An open port is watched until it closes. Every signal goes through the
      identity-checked terminator (pid + start time, pinned by a pidfd), on an OS thread of
      its own, so a recycled pid is never signalled and no scheduler waits.
    * **VM stop.** On a normal stop (`System.stop/0`, `:init.stop/0`, SIGTERM to the VM,
      `Application.stop(:dspex_process)`), every registered and every released process is
      ended before the guardian returns, in its `terminate/2`.
    * **VM crash.** A small OS process, `dspex-proc guard`, runs beside the VM as a port and
      is told of every registration. When the VM dies (`kill -9`, the OOM killer), it ends
      what is still registered — the same identity checks — and exits. It never outlives
      the VM by more than that cleanup.

  ## Containment

  With `containment: :auto` (the default) the guardian gives this VM a cgroup v2 of its
  own, `dspex-<pidns>-<vm pid>-<vm start>`, under the VM's cgroup, when the hierarchy lets
  it (root, or a delegated subtree), and moves every OS process registered in a guarded
  registry into a leaf of its own there, `w-<pid>-<start>`, as soon as it hears of the
  registration (`DSPexProcess.Worker` enters its leaf before `exec`, so nothing it forks
  starts outside). Ending a registered process then ends its leaf: SIGTERM to every process
  in it, and after the grace `cgroup.kill`, which reaches every descendant whatever its
  session, process group or argv; the empty leaf is removed. `dspex-proc guard` does the
  same for the whole per-VM cgroup when the VM is killed. `containment/0` says which mode
  is active and why.

    * `:auto` - use cgroups when possible, otherwise today's pid/group tracking.
    * `:cgroup` - require them: the guardian (and so the application) does not start when
      they are impossible, with the reason.
    * `:none` - never use cgroups.

  ## Configuration

      config :dspex_process, :guardian,
        end_released: true,
        release_delay_ms: 500,
        grace_ms: 1_000,
        kill_wait_ms: 1_000,
        os_guardian: true,
        containment: :auto

    * `:end_released` - end OS processes that leave the registry (owner exit, unregister).
      `false` leaves them running (and tells the OS guardian to forget them). Default `true`.
    * `:release_delay_ms` - how long a released process may wait to be registered again or
      taken by a port before it is ended. Default `500`.
    * `:grace_ms` - SIGTERM to SIGKILL. Default `1_000`.
    * `:kill_wait_ms` - how long to wait after SIGKILL before reporting a survivor.
      Default `1_000`.
    * `:end_on_stop` - end every registered process when the VM stops normally.
      Default `true`.
    * `:os_guardian` - run `dspex-proc guard` for the VM-crash layer. Default `true`.
    * `:containment` - `:auto`, `:cgroup` or `:none` (see above). Default `:auto`.
  """

  use GenServer
  require Logger

  alias DSPex.Python.ProcessRegistry
  alias DSPexProcess.{Native, Termination}

  @ms {:integer, 0, 600_000}
  # How long the guardian lets releases gather before it takes them.
  @release_batch_ms 2
  @schema [
    end_released: {true, :boolean},
    release_delay_ms: {500, @ms},
    grace_ms: {1_000, @ms},
    kill_wait_ms: {1_000, @ms},
    end_on_stop: {true, :boolean},
    os_guardian: {true, :boolean},
    containment: {:auto, {:in, [:auto, :cgroup, :none]}}
  ]

  @typedoc "An OS process: its pid and its start time (clock ticks since boot)."
  @type identity :: {pos_integer(), non_neg_integer()}

  @doc false
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    opts = validate!(opts)

    %{
      id: __MODULE__,
      start: {__MODULE__, :start_link, [opts]},
      # terminate/2 ends every registered process: give it the whole escalation.
      shutdown: opts[:grace_ms] + opts[:kill_wait_ms] + 5_000
    }
  end

  @doc "Starts the guardian of this VM (the application does it); options as above."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    GenServer.start_link(__MODULE__, validate!(opts), name: __MODULE__)
  end

  @doc """
  What the guardian does now: its options, whether the OS guardian runs (and its pid), and
  the released processes it is waiting on.
  """
  @spec status() :: %{
          options: keyword(),
          os_guardian: pos_integer() | nil,
          pending: [identity()]
        }
  def status, do: GenServer.call(__MODULE__, :status)

  @typedoc """
  The containment in use: `mode` is `:cgroup` or `:none`, `requested` the option, `reason`
  why (the per-VM cgroup, or what made cgroups impossible), `cgroup` the per-VM cgroup's
  directory (cgroup v2), `controllers` those the leaves can take limits from (`memory`,
  `pids`, `cpu`), `hierarchies` where each of them comes from (`:v2`, or `:v1` on a
  hybrid host where cgroup2 lacks it), `v1_cgroups` the per-VM cgroup of this VM in the v1
  hierarchy of each `:v1` controller, and `controllers_reason` why a controller is not
  taken from v2, and why the missing ones are missing.
  """
  @type containment :: %{
          mode: :cgroup | :none,
          requested: :auto | :cgroup | :none,
          reason: String.t(),
          cgroup: String.t() | nil,
          controllers: [String.t()],
          hierarchies: %{optional(String.t()) => :v1 | :v2},
          v1_cgroups: %{optional(String.t()) => String.t()},
          controllers_reason: String.t()
        }

  @doc """
  Which containment this VM uses and why (see "Containment"). Answered by the native side,
  without a call to the guardian.
  """
  @spec containment() :: containment()
  def containment, do: Native.containment_status()

  @typedoc "A registration seen while watching (see `watch_registrations/0`)."
  @type registration :: %{
          os_pid: pos_integer(),
          start_time: non_neg_integer(),
          worker_id: term(),
          owner: pid(),
          lineage: [pid()]
        }

  @doc """
  Starts recording every registration with an OS pid, in every registry of this VM, until
  `stop_watching/1`. Used by `DSPexProcess.LeakCheck`.
  """
  @spec watch_registrations() :: reference()
  def watch_registrations, do: GenServer.call(__MODULE__, :watch)

  @doc """
  Stops a recording and returns its registrations, oldest first. Each carries the owner's
  `lineage`: its `$ancestors` and `$callers` at registration, as pids.
  """
  @spec stop_watching(reference()) :: [registration()]
  def stop_watching(ref) when is_reference(ref), do: GenServer.call(__MODULE__, {:unwatch, ref})

  @doc """
  Validates guardian options; raises `ArgumentError` naming the option and the value.
  """
  @spec validate!(keyword()) :: keyword()
  def validate!(opts),
    do: DSPexProcess.Options.validate!(opts, @schema, "guardian options")

  # GenServer

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)

    case Native.containment_start(opts[:containment]) do
      {:ok, containment} -> start(opts, containment)
      {:error, reason} -> {:stop, {:containment_unavailable, reason}}
    end
  end

  defp start(opts, containment) do
    if containment.requested == :auto and containment.mode == :none do
      Logger.info("DSPexProcess.Guardian: #{containment.reason}; pid and group tracking only")
    end

    :ok = Native.guardian_attach(self())
    # Notices a previous guardian left untaken (it was killed) are taken first.
    send(self(), :dspex_notices)

    state = %{
      containment: containment,
      opts: opts,
      port: nil,
      os_pid: nil,
      # identity => {worker_id, due (monotonic ms)}
      pending: %{},
      # identities verified as this VM's port programs when they registered
      verified: MapSet.new(),
      timer: nil,
      # the delayed take of a burst of releases, until notices are taken
      notices_timer: nil,
      # watch ref => registrations, newest first
      watches: %{}
    }

    {:ok, start_os_guardian(state)}
  end

  @impl true
  def handle_call(:status, _from, state) do
    {:reply, %{options: state.opts, os_guardian: state.os_pid, pending: Map.keys(state.pending)},
     state}
  end

  def handle_call(:watch, _from, state) do
    ref = make_ref()
    {:reply, ref, %{state | watches: Map.put(state.watches, ref, [])}}
  end

  def handle_call({:unwatch, ref}, _from, state) do
    {seen, watches} = Map.pop(state.watches, ref, [])
    {:reply, Enum.reverse(seen), %{state | watches: watches}}
  end

  @impl true
  def handle_info(:dspex_notices, state) do
    {:noreply, take_notices(state)}
  end

  # Releases only: taken a few ms later, so that a burst of them wakes the guardian once
  # (a released process is ended only after `release_delay_ms` anyway).
  def handle_info(:dspex_notices_soon, state) do
    timer = Process.send_after(self(), :dspex_notices, @release_batch_ms)
    {:noreply, %{state | notices_timer: timer}}
  end

  def handle_info(:check, state) do
    {:noreply, check(%{state | timer: nil})}
  end

  def handle_info({:ended, outcomes}, state) do
    gone =
      for {{pid, start} = id, worker_id, outcome} <- outcomes, reduce: [] do
        gone ->
          case outcome do
            {:ok, how} when how in [:graceful, :force_killed] ->
              Logger.info(
                "DSPexProcess.Guardian ended OS process #{pid} (worker #{inspect(worker_id)}), " <>
                  "which outlived its owner (#{how})"
              )

              [id | gone]

            {:ok, :already_gone} ->
              [id | gone]

            {:error, error} ->
              Logger.warning(
                "DSPexProcess.Guardian could not end OS process #{pid} (start time #{start}, " <>
                  "worker #{inspect(worker_id)}): #{inspect(error)}"
              )

              gone
          end
      end

    tell(state, "-", gone)
    {:noreply, %{state | verified: MapSet.difference(state.verified, MapSet.new(gone))}}
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    Logger.warning(
      "DSPexProcess.Guardian: dspex-proc guard exited (status #{status}); starting another"
    )

    {:noreply, start_os_guardian(%{state | port: nil, os_pid: nil})}
  end

  def handle_info({:EXIT, port, _reason}, %{port: port} = state) do
    {:noreply, start_os_guardian(%{state | port: nil, os_pid: nil})}
  end

  def handle_info(_message, state), do: {:noreply, state}

  @impl true
  def terminate(reason, state) do
    # A crash is not a stop: a restarted guardian takes over, the workers stay. This one
    # stays attached (its pid dead), so that notices queued meanwhile wait for the next
    # guardian, which takes them first; detached, they would be dropped. (Releases this one
    # had already taken and was waiting out are lost with it: the successor does not know
    # them. If no successor comes, `DSPexProcess.Application.stop/1` detaches.)
    if stop_reason?(reason) do
      :ok = Native.guardian_attach(nil)
      # Owners that died during the stop may have queued notices after the exit signal.
      state = take_notices(state)

      if state.opts[:end_on_stop] do
        end_everything(state)
        # Empty now: the per-VM cgroup goes (a later start makes it again).
        Native.containment_stop()
      end
    end

    # The OS guardian stands down: what is left is ended, or a restarted guardian (with a
    # guard of its own, told of everything registered) takes over. Without this line (a
    # guardian killed outright, a VM halted or killed), the guard waits for the VM to exit
    # and then ends what is still registered.
    stand_down(state)
    :ok
  end

  defp stand_down(%{port: nil}), do: :ok

  defp stand_down(%{port: port}) do
    Port.command(port, ".\n")
    :ok
  rescue
    ArgumentError -> :ok
  end

  # Moves a registered process into its own leaf (a dirty NIF: a cgroup.procs write can
  # wait on a kernel lock). The guardian hears of every registration, so no caller waits.
  defp contain(%{containment: %{mode: :cgroup}}, {pid, start}, worker_id) do
    case Native.cgroup_enter(pid, start) do
      result when result in [:moved, :already, :gone, :none] ->
        :ok

      {:elsewhere, path} ->
        Logger.debug(
          "DSPexProcess.Guardian: OS process #{pid} (worker #{inspect(worker_id)}) is in " <>
            "cgroup #{path}, not this VM's: left there, without containment"
        )

      :raced ->
        Logger.warning(
          "DSPexProcess.Guardian: OS process #{pid} exited while it was moved into its " <>
            "cgroup and its pid was reused; the new process was moved back"
        )

      {:error, reason} ->
        Logger.warning(
          "DSPexProcess.Guardian: could not move OS process #{pid} (worker " <>
            "#{inspect(worker_id)}) into its cgroup: #{reason}"
        )
    end
  end

  defp contain(_state, _id, _worker_id), do: :ok

  defp record(%{watches: watches} = state, _pid, _start, _worker_id, _owner)
       when map_size(watches) == 0,
       do: state

  defp record(state, pid, start, worker_id, owner) do
    registration = %{
      os_pid: pid,
      start_time: start,
      worker_id: worker_id,
      owner: owner,
      lineage: lineage(owner)
    }

    %{state | watches: Map.new(state.watches, fn {ref, seen} -> {ref, [registration | seen]} end)}
  end

  defp lineage(owner) do
    case Process.info(owner, :dictionary) do
      {:dictionary, dict} ->
        for key <- [:"$ancestors", :"$callers"],
            entry <- List.wrap(dict[key]),
            pid = if(is_atom(entry), do: Process.whereis(entry), else: entry),
            is_pid(pid),
            do: pid

      nil ->
        []
    end
  end

  # The live workers of the guarded registries that are this VM's port programs now.
  defp verified_live(state) do
    for {pid, start} = id <- Native.registries_live(ProcessRegistry.running_resources()),
        MapSet.member?(state.verified, id) or Native.port_child_identity?(pid, start),
        do: id
  end

  # Releases

  # The registries release only processes read as this VM's port programs when they
  # registered (see `release_of` in the NIF's `registry.rs`): the guardian's to end, also
  # when their registration was heard by a predecessor that was killed.
  defp release(%{opts: opts} = state, released) do
    if opts[:end_released] do
      due = now() + opts[:release_delay_ms]

      pending =
        Enum.reduce(released, state.pending, fn {pid, start, worker_id}, pending ->
          Map.put(pending, {pid, start}, {worker_id, due})
        end)

      schedule(%{state | pending: pending})
    else
      hand_off(state, Enum.map(released, fn {pid, start, _} -> {pid, start} end))
    end
  end

  # Processes given up on purpose: out of this VM's cgroup and off the guard's list, so
  # nothing ends them with the VM.
  defp hand_off(state, []), do: state

  defp hand_off(state, ids) do
    if state.containment.mode == :cgroup do
      for {pid, start} <- ids do
        case Native.cgroup_dissolve(pid, start) do
          :ok ->
            :ok

          # The leaf stays; whether the process is still in it is not known here. If it
          # is, it ends with this VM's cgroup (a dead VM's cgroups are emptied).
          :leaf_left ->
            Logger.warning(
              "DSPexProcess.Guardian: OS process #{pid} was handed off but its cgroup leaf " <>
                "could not be removed; if the process is still in it, it will end with this VM"
            )

          :v1_leaf_left ->
            Logger.warning(
              "DSPexProcess.Guardian: OS process #{pid} was handed off but its cgroup v1 " <>
                "leaf could not be removed; if the process is still in it, it keeps that " <>
                "leaf's limits (it does not end with this VM)"
            )
        end
      end
    end

    tell(state, "-", ids)
    %{state | verified: MapSet.difference(state.verified, MapSet.new(ids))}
  end

  defp check(state) do
    now = now()
    {due, waiting} = Enum.split_with(state.pending, fn {_id, {_wid, at}} -> at <= now end)
    ids = Enum.map(due, fn {id, _} -> id end)
    held_by_registry = Native.registries_hold(ProcessRegistry.running_resources(), ids)
    port_pids = port_os_pids()
    later = now + state.opts[:release_delay_ms]

    {to_end, still_waiting} =
      due
      |> Enum.zip(held_by_registry)
      |> Enum.reduce({[], Map.new(waiting)}, fn
        # Registered again: in a guarded registry it stays this VM's, on the guard's list;
        # in unguarded ones only, it is handed off (below).
        {_, held}, acc when is_boolean(held) ->
          acc

        {{{pid, _} = id, {wid, _}}, nil}, {to_end, waiting} ->
          if MapSet.member?(port_pids, pid),
            do: {to_end, Map.put(waiting, id, {wid, later})},
            else: {[{id, wid} | to_end], waiting}
      end)

    # Registered again only in unguarded registries: handed off, like end_released: false.
    handed_off = for {{id, _}, false} <- Enum.zip(due, held_by_registry), do: id

    end_async(to_end, state.opts)
    state |> hand_off(handed_off) |> Map.put(:pending, still_waiting) |> schedule()
  end

  defp end_async([], _opts), do: :ok

  defp end_async(targets, opts) do
    guardian = self()

    # The terminator answers by message; waiting for it here would hold up registrations.
    spawn(fn ->
      outcomes = Termination.run(Enum.map(targets, &elem(&1, 0)), termination_opts(opts))

      send(
        guardian,
        {:ended, Enum.zip_with(targets, outcomes, fn {id, wid}, o -> {id, wid, o} end)}
      )
    end)

    :ok
  end

  defp schedule(%{pending: pending} = state) when map_size(pending) == 0, do: state
  defp schedule(%{timer: timer} = state) when timer != nil, do: state

  defp schedule(state) do
    next = state.pending |> Enum.map(fn {_, {_, at}} -> at end) |> Enum.min()
    %{state | timer: Process.send_after(self(), :check, max(next - now(), 0))}
  end

  defp port_os_pids do
    for port <- Port.list(), {:os_pid, pid} <- [Port.info(port, :os_pid)], into: MapSet.new() do
      pid
    end
  end

  # VM stop

  defp stop_reason?(reason),
    do: reason in [:normal, :shutdown] or match?({:shutdown, _}, reason)

  # The registries queue their notices natively, in order, and wake the guardian with one
  # message while it has some to take (see `registry.rs` in the NIF).
  defp take_notices(state) do
    # A delayed take still to come would find nothing: everything is taken now.
    if state.notices_timer, do: Process.cancel_timer(state.notices_timer, info: false)
    Enum.reduce(Native.guardian_take_notices(), %{state | notices_timer: nil}, &notice/2)
  end

  defp notice({:registered, {pid, start} = id, worker_id, owner, guarded, port_child}, state) do
    # Only a process proven to be this VM's port program is ever ended by the guardian: a
    # pid that was recycled before the registry read it is someone else's. The registry's
    # own read of the process says so (its parent is this VM's port helper).
    state =
      if guarded and port_child do
        tell(state, "+", [id])
        contain(state, id, worker_id)
        %{state | verified: MapSet.put(state.verified, id)}
      else
        state
      end

    record(state, pid, start, worker_id, owner)
  end

  defp notice({:released, released}, state), do: release(state, released)

  defp notice({:unread, pid, worker_id, reason}, state) do
    Logger.warning(
      "DSPexProcess.Guardian: worker #{inspect(worker_id)} registered OS process #{pid}, " <>
        "which could not be read afterwards (#{reason}); it is recorded without one"
    )

    state
  end

  defp end_everything(state) do
    registered = verified_live(state)
    targets = Enum.uniq(Map.keys(state.pending) ++ registered)
    outcomes = Termination.run(targets, termination_opts(state.opts))

    ended = Enum.count(outcomes, &match?({:ok, how} when how in [:graceful, :force_killed], &1))

    if ended > 0 do
      Logger.info("DSPexProcess.Guardian ended #{ended} registered OS process(es) on stop")
    end

    for {{pid, _}, {:error, error}} <- Enum.zip(targets, outcomes) do
      Logger.warning(
        "DSPexProcess.Guardian could not end OS process #{pid} on stop: #{inspect(error)}"
      )
    end

    tell(state, "-", for({id, {:ok, _}} <- Enum.zip(targets, outcomes), do: id))
  end

  defp termination_opts(opts),
    do: [grace_ms: opts[:grace_ms], kill_wait_ms: opts[:kill_wait_ms]]

  # The OS guardian

  defp start_os_guardian(%{opts: opts} = state) do
    exe = DSPexProcess.Worker.guard_executable()

    cond do
      not opts[:os_guardian] ->
        state

      not File.regular?(exe) ->
        Logger.warning(
          "DSPexProcess.Guardian: #{exe} is missing (run `mix compile`); without it, the OS " <>
            "processes registered here are not ended if this VM is killed"
        )

        state

      true ->
        {beam_pid, beam_start, _ns} = Native.beam_identity()

        cgroup =
          case state.containment do
            %{mode: :cgroup, cgroup: dir, v1_cgroups: v1} ->
              v1 = v1 |> Map.values() |> Enum.uniq() |> Enum.flat_map(&["--cgroup-v1", &1])
              ["--cgroup", dir | v1]

            _ ->
              []
          end

        args =
          ["guard", "--vm-pid", beam_pid, "--vm-start", beam_start] ++
            ["--grace", opts[:grace_ms], "--kill-wait", opts[:kill_wait_ms]] ++ cgroup

        port =
          Port.open({:spawn_executable, exe}, [
            :binary,
            :exit_status,
            args: Enum.map(args, &to_string/1)
          ])

        {:os_pid, os_pid} = Port.info(port, :os_pid)
        state = %{state | port: port, os_pid: os_pid}
        # A restarted guardian learns what is registered now, and what still waits.
        # A restarted guardian learns what is registered now (verified again as this VM's
        # port programs), and what still waits.
        state = %{state | verified: MapSet.new(verified_live(state))}
        tell(state, "+", MapSet.to_list(state.verified) ++ Map.keys(state.pending))
        state
    end
  end

  defp tell(_state, _sign, []), do: :ok
  defp tell(%{port: nil}, _sign, _ids), do: :ok

  defp tell(%{port: port}, sign, ids) do
    lines =
      for {pid, start} <- ids,
          do: [sign, ?\s, Integer.to_string(pid), ?\s, Integer.to_string(start), ?\n]

    Port.command(port, lines)
    :ok
  rescue
    # The port just closed; its exit message restarts it with the full list.
    ArgumentError -> :ok
  end

  defp now, do: System.monotonic_time(:millisecond)
end
