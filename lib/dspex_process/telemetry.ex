defmodule DSPexProcess.Telemetry do
  @moduledoc """
  `:telemetry` events of the library, emitted when the host application has `:telemetry`
  loaded (no dependency is declared: the call is made only when the module is present).

  | event | measurements | metadata |
  |---|---|---|
  | `[:dspex_process, :scan]` | `duration` (native time units), `matched`, `orphans` | `pattern` |
  | `[:dspex_process, :cleanup, :start]` | `system_time` | `pattern`, `dry_run` |
  | `[:dspex_process, :cleanup, :stop]` | `duration`, `found`, `terminated`, `errors`, `already_gone` | `pattern`, `dry_run` |
  | `[:dspex_process, :orphan, :terminated]` | `count` (always 1) | `pid`, `reason`, `outcome` |
  | `[:dspex_process, :registry, :sweep]` | `removed` | `registry` |

  Durations are in `:native` time units, as `:telemetry.span/3` reports them; convert with
  `System.convert_time_unit/3`.
  """

  @doc false
  @spec execute([atom()], map(), map()) :: :ok
  def execute(event, measurements, metadata) do
    # Loaded is enough: attaching a handler loads :telemetry, and with no handler there is
    # nobody to tell. Code.ensure_loaded?/1 would search the code path on every event.
    if function_exported?(:telemetry, :execute, 3) do
      apply(:telemetry, :execute, [event, measurements, metadata])
    end

    :ok
  end
end
