defmodule DSPex.Python.OrphanMonitor do
  @moduledoc """
  Continuous orphan detection: a supervised process that looks for orphans periodically,
  logs them, and optionally ends them.

  Off by default. Start it in your tree:

      children = [
        {DSPex.Python.OrphanMonitor, interval: 60_000, auto_cleanup: true}
      ]

  or let the application start it: `config :dspex_process, orphan_monitor: [interval: 60_000]`.

  Each check runs in this process, off every caller's path; the scan itself runs on a dirty
  scheduler and the termination on its own thread.

  ## Options

    * `:interval` - milliseconds between checks (default `60_000`).
    * `:auto_cleanup` - end the orphans found (default `false`: only log them).
    * `:detector` - `DSPex.Python.OrphanDetector` options for the checks (pattern, grace...).
    * `:name` - default `DSPex.Python.OrphanMonitor`.
  """

  use GenServer
  require Logger

  alias DSPex.Python.OrphanDetector

  @type result ::
          %{checked_at: integer(), orphans: [OrphanDetector.orphan()], cleanup: map() | nil}

  @doc false
  def child_spec(opts) do
    %{id: Keyword.get(opts, :name, __MODULE__), start: {__MODULE__, :start_link, [opts]}}
  end

  @doc "Starts the monitor; invalid options raise `ArgumentError`."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts =
      Keyword.validate!(opts,
        interval: 60_000,
        auto_cleanup: false,
        detector: [],
        name: __MODULE__
      )

    unless is_integer(opts[:interval]) and opts[:interval] > 0,
      do: raise(ArgumentError, "invalid :interval #{inspect(opts[:interval])}")

    unless is_boolean(opts[:auto_cleanup]),
      do: raise(ArgumentError, "invalid :auto_cleanup #{inspect(opts[:auto_cleanup])}")

    OrphanDetector.validate!(opts[:detector])
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
    state = %{opts: opts, last: nil}
    {:ok, schedule(state)}
  end

  @impl true
  def handle_call(:check, _from, state) do
    state = check(state)
    {:reply, state.last, state}
  end

  def handle_call(:last, _from, state), do: {:reply, state.last, state}

  @impl true
  def handle_info(:check, state), do: {:noreply, state |> check() |> schedule()}

  defp schedule(state) do
    Process.send_after(self(), :check, state.opts[:interval])
    state
  end

  defp check(%{opts: opts} = state) do
    orphans = OrphanDetector.find_orphaned_processes(opts[:detector])

    if orphans != [] do
      Logger.warning(
        "DSPex.Python.OrphanMonitor found #{length(orphans)} orphan(s): " <>
          Enum.map_join(orphans, ", ", &"#{&1.pid} (#{&1.reason})")
      )
    end

    cleanup =
      if opts[:auto_cleanup] and orphans != [],
        do: OrphanDetector.cleanup_orphaned_processes(orphans, opts[:detector])

    %{state | last: %{checked_at: System.os_time(:second), orphans: orphans, cleanup: cleanup}}
  end
end
