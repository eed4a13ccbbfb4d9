defmodule DSPex.Test.OSProcess do
  @moduledoc """
  Real OS processes for tests. Every process is started by the test that uses it, owned by
  a Port (so it exits on stdin EOF when the port closes) and never signalled by anything
  else.
  """

  @doc "Starts `python3` waiting on stdin; returns `{port, os_pid}`."
  def start_python(extra_args \\ []) do
    python = System.find_executable("python3") || raise "python3 is needed for the tests"

    port =
      Port.open({:spawn_executable, python}, [
        :binary,
        args: ["-c", "import sys; sys.stdin.read()" | extra_args]
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    {port, os_pid}
  end

  @doc "Field 22 of /proc/PID/stat, counted from the last `)`."
  def start_time(os_pid) do
    stat = File.read!("/proc/#{os_pid}/stat")
    [_, rest] = Regex.run(~r/\)([^)]*)$/s, stat)
    rest |> String.split() |> Enum.at(19) |> String.to_integer()
  end

  @doc "Polls `fun` every 5 ms until it returns truthy or `timeout` ms pass."
  def eventually(fun, timeout \\ 2_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    poll(fun, deadline)
  end

  defp poll(fun, deadline) do
    cond do
      fun.() ->
        true

      System.monotonic_time(:millisecond) > deadline ->
        false

      true ->
        Process.sleep(5)
        poll(fun, deadline)
    end
  end

  @doc "A process that has exited: its pid is dead."
  def dead_pid do
    {pid, ref} = spawn_monitor(fn -> :ok end)
    receive do: ({:DOWN, ^ref, _, _, _} -> pid)
  end

  @doc "A unique registry name for one test."
  def unique_name(tag), do: :"#{tag}_#{System.unique_integer([:positive])}"
end
