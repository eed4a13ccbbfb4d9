defmodule :telemetry do
  # A minimal stand-in for the :telemetry library (hex is unreachable here), with the same
  # attach/detach/execute calls, so the tests can prove that the library emits its events
  # when :telemetry is loaded. Only compiled for tests.
  @moduledoc false

  def attach(id, event, fun, config) do
    :persistent_term.put({__MODULE__, id}, {event, fun, config})
    ids = :persistent_term.get({__MODULE__, :ids}, [])
    :persistent_term.put({__MODULE__, :ids}, [id | ids])
    :ok
  end

  def detach(id) do
    :persistent_term.erase({__MODULE__, id})
    ids = :persistent_term.get({__MODULE__, :ids}, [])
    :persistent_term.put({__MODULE__, :ids}, List.delete(ids, id))
    :ok
  end

  def execute(event, measurements, metadata) do
    for id <- :persistent_term.get({__MODULE__, :ids}, []),
        {^event, fun, config} <- [:persistent_term.get({__MODULE__, id}, nil)] do
      fun.(event, measurements, metadata, config)
    end

    :ok
  end
end
