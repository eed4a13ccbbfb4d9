defmodule DSPexProcess.Application do
  @moduledoc """
  Creates the default registry's table, starts `DSPexProcess.Guardian` (no registered OS
  process outlives its owner) and the default `DSPex.Python.ProcessRegistry` process, so
  `iex -S mix` can use them at once. A tree that lists `DSPex.Python.ProcessRegistry` too
  starts as written (see "Starting" in its docs).

  Configuration (`config :dspex_process, ...`):

    * `:start_registry` - start the default registry's sweeping process (default `true`).
      The table exists either way. Set it to `false` to run that process, with your
      options, in your own supervision tree.
    * `:registry` - options for the default registry (see `DSPex.Python.ProcessRegistry`).
    * `:guardian` - options for `DSPexProcess.Guardian`.
    * `:orphan_monitor` - options for a `DSPexProcess.OrphanMonitor` to start (periodic
      detection, optionally cleanup). Not started unless set.
  """
  use Application

  @impl true
  def start(_type, _args) do
    registry_opts = Application.get_env(:dspex_process, :registry, [])
    :ok = DSPex.Python.ProcessRegistry.ensure_table(DSPex.Python.ProcessRegistry, registry_opts)
    guardian = [{DSPexProcess.Guardian, Application.get_env(:dspex_process, :guardian, [])}]

    registry =
      if Application.get_env(:dspex_process, :start_registry, true),
        do: [{DSPex.Python.ProcessRegistry, registry_opts}],
        else: []

    monitor =
      case Application.get_env(:dspex_process, :orphan_monitor) do
        nil -> []
        opts -> [{DSPexProcess.OrphanMonitor, opts}]
      end

    children = guardian ++ registry ++ monitor

    Supervisor.start_link(children, strategy: :one_for_one, name: DSPexProcess.Supervisor)
  end

  # The tree is gone, however it went (a stop, or a guardian that crashed more often than
  # its supervisor allows): no guardian is coming back. A crashed guardian stays attached
  # for its successor (see `DSPexProcess.Guardian`), so detach here, or registries that
  # outlive the application would queue notices for a dead pid until the VM stops.
  @impl true
  def stop(_state) do
    :ok = DSPexProcess.Native.guardian_attach(nil)
  end
end
