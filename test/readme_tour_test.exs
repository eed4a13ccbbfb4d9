defmodule DSPexProcess.ReadmeTourTest do
  # The README's tour is DSPexProcess's moduledoc: this runs it, line by line, as written.
  use ExUnit.Case, async: false

  @moduletag timeout: 60_000

  doctest DSPexProcess
end
