defmodule DSPexProcess do
  @moduledoc """
  Keeps Elixir applications from leaking the OS processes they start through Ports.

  The pieces:

    * `DSPex.Python.ProcessRegistry` - worker id ↔ Elixir pid ↔ OS process (pid and start
      time), in native memory that outlives the registry process.
    * `DSPexProcess.Guardian` - ends every registered OS process that outlives its owner,
      on owner exit, VM stop and VM crash.
    * `DSPex.Python.OrphanDetector` - finds and safely ends what still escapes.
    * `DSPexProcess.Worker` - a port owner that stamps ownership markers and guards its
      Python process with a parent-death signal.
    * `DSPexProcess.LeakCheck` - an ExUnit check for your own test suites.

  ## A tour

  The README's tour, run by the test suite as a doctest:

  #{__DIR__ |> Path.join("../README.md") |> File.read!() |> String.split("<!-- tour -->") |> Enum.at(1) |> String.replace(~r/^```(elixir)?$/m, "") |> String.trim() |> String.replace(~r/^/m, "    ")}
  """

  @external_resource Path.expand("../README.md", __DIR__)
end
