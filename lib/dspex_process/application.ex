defmodule DSPexProcess.Application do
  @moduledoc """
  Starts the default `DSPex.Python.ProcessRegistry` so `iex -S mix` can use it at once.

  Configuration (`config :dspex_process, ...`):

    * `:start_registry` - start the default registry (default `true`). Set it to `false`
      to put `DSPex.Python.ProcessRegistry` in your own supervision tree instead.
    * `:registry` - options for the default registry (see `DSPex.Python.ProcessRegistry`).
    * `:orphan_monitor` - options for a `DSPexProcess.OrphanMonitor` to start (periodic
      detection, optionally cleanup). Not started unless set.
  """
  use Application

  @impl true
  def start(_type, _args) do
    registry =
      if Application.get_env(:dspex_process, :start_registry, true),
        do: [{DSPex.Python.ProcessRegistry, Application.get_env(:dspex_process, :registry, [])}],
        else: []

    monitor =
      case Application.get_env(:dspex_process, :orphan_monitor) do
        nil -> []
        opts -> [{DSPexProcess.OrphanMonitor, opts}]
      end

    children = registry ++ monitor

    Supervisor.start_link(children, strategy: :one_for_one, name: DSPexProcess.Supervisor)
  end
end
