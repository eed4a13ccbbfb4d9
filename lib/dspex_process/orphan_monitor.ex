defmodule DSPexProcess.OrphanMonitor do
  @moduledoc """
  Continuous orphan detection: a supervised process that looks for orphans periodically,
  logs them, and optionally ends them.

  Off by default. Start it in your tree:

      children = [
        {DSPexProcess.OrphanMonitor, interval: 60_000, auto_cleanup: true}
      ]

  or let the application start it: `config :dspex_process, orphan_monitor: [interval: 60_000]`.

  Each check runs in this process, off every caller's path; the scan itself runs on a dirty
  scheduler and the termination on its own thread.

  ## Options

    * `:interval` - milliseconds between checks (default `60_000`).
    * `:auto_cleanup` - end the orphans found (default `false`: only log them).
    * `:detector` - `DSPex.Python.OrphanDetector` options for the checks (pattern, grace...).
    * `:name` - default `DSPexProcess.OrphanMonitor`.
  """

  use GenServer
  require Logger

  alias DSPex.Python.OrphanDetector

  @type result :: %{
          required(:checked_at) => integer(),
          required(:orphans) => [OrphanDetector.orphan()],
          required(:cleanup) => map() | nil,
          optional(:error) => String.t()
        }

  @doc false
  def child_spec(opts) do
    %{id: Keyword.get(opts, :name, __MODULE__), start: {__MODULE__, :start_link, [opts]}}
  end

  @doc "Starts the monitor; invalid options raise `ArgumentError`."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts =
      DSPexProcess.Options.validate!(
        opts,
        [
          interval: {60_000, :pos_integer},
          auto_cleanup: {false, :boolean},
          detector: {[], {:fun, "a keyword list", &Keyword.keyword?/1}},
          name: {__MODULE__, :atom}
        ],
        "OrphanMonitor options"
      )

    DSPexProcess.Options.detector!(opts[:detector])
    GenServer.start_link(__MODULE__, opts, name: opts[:name])
  end

  @doc "Runs a check now and returns its result."
  @spec check_now(GenServer.server()) :: result()
  def check_now(server \\ __MODULE__), do: GenServer.call(server, :check, :infinity)

  @doc "The result of the last check, or `nil` before the first."
  @spec last_result(GenServer.server()) :: result() | nil
  def last_result(server \\ __MODULE__), do: GenServer.call(server, :last)

  @impl true
  def init(opts) do
    Process.send_after(self(), :tick, opts[:interval])
    {:ok, %{opts: opts, last: nil, running: nil, waiting: []}}
  end

  # Checks run in a task of their own, so that last_result/1 answers at once while a
  # cleanup waits out its grace, and a failing check never takes the monitor down.
  @impl true
  def handle_call(:check, from, state), do: {:noreply, start_check(state, from)}
  def handle_call(:last, _from, state), do: {:reply, state.last, state}

  @impl true
  def handle_info(:tick, state), do: {:noreply, start_check(state, nil)}

  def handle_info({:checked, task, result}, %{running: task} = state) do
    Enum.each(state.waiting, &GenServer.reply(&1, result))
    Process.send_after(self(), :tick, state.opts[:interval])
    {:noreply, %{state | last: result, running: nil, waiting: []}}
  end

  def handle_info(_message, state), do: {:noreply, state}

  defp start_check(%{running: nil} = state, from) do
    monitor = self()
    opts = state.opts
    {:ok, task} = Task.start(fn -> send(monitor, {:checked, self(), check(opts)}) end)
    %{state | running: task, waiting: List.wrap(from)}
  end

  # A check is already running: this caller gets its result.
  defp start_check(state, nil), do: state
  defp start_check(state, from), do: %{state | waiting: [from | state.waiting]}

  defp check(opts) do
    orphans = OrphanDetector.find_orphaned_processes(opts[:detector])

    if orphans != [] do
      Logger.warning(
        "DSPexProcess.OrphanMonitor found #{length(orphans)} orphan(s): " <>
          Enum.map_join(orphans, ", ", &"#{&1.pid} (#{&1.reason})")
      )
    end

    cleanup =
      if opts[:auto_cleanup] and orphans != [],
        do: OrphanDetector.cleanup_orphaned_processes(orphans, opts[:detector])

    %{checked_at: System.os_time(:second), orphans: orphans, cleanup: cleanup}
  rescue
    error ->
      Logger.error("DSPexProcess.OrphanMonitor check failed: #{Exception.message(error)}")

      %{
        checked_at: System.os_time(:second),
        orphans: [],
        cleanup: nil,
        error: Exception.message(error)
      }
  end
end
