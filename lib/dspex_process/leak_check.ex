defmodule DSPexProcess.LeakCheck do
  @moduledoc """
  An ExUnit check for your own test suites: a test fails when an OS process registered
  during it is still running after it, and the failure names the process and its worker id.

      defmodule MyApp.PoolTest do
        use ExUnit.Case, async: true
        use DSPexProcess.LeakCheck

        test "the pool stops its workers" do
          ...
        end
      end

  `use DSPexProcess.LeakCheck, wait_ms: 0` passes options. The same from a setup block:

      setup context, do: DSPexProcess.LeakCheck.check(context, wait_ms: 0)

  It counts the registrations (in any `DSPex.Python.ProcessRegistry` of the VM, guarded or
  not) whose Elixir owner is the test process or has it among its `$ancestors` or
  `$callers` — processes the test started, linked, supervised (`start_supervised/2`) or
  called through `Task` — so tests running at the same time (`async: true`) do not blame
  each other. After the test (its `on_exit`), each of those OS processes has `:wait_ms` to
  end; one still running then, with the same pid and start time, fails the test.

  Options:

    * `:wait_ms` - how long a process may take to end after the test. Default: the
      guardian's `release_delay_ms + grace_ms + kill_wait_ms` plus 500, so that a process
      the library ends on its own once its owner is gone does not count as a leak. `0` is
      strict: everything must be gone when the test ends.
    * `:scope` - `:test` (default, as above) or `:all` (every registration made while the
      test ran, for `async: false` suites whose workers belong to shared processes).

  It needs the `:dspex_process` application (its `DSPexProcess.Guardian`) running.
  """

  alias DSPexProcess.{Guardian, Native}

  @doc "Adds the check to every test of the case (a `setup` with these options)."
  defmacro __using__(opts) do
    quote do
      setup context, do: DSPexProcess.LeakCheck.check(context, unquote(opts))
    end
  end

  @doc """
  A `setup` callback: records the registrations of this test and checks them when it ends.
  Returns `:ok`; raises `ArgumentError` on bad options.
  """
  @spec check(map(), keyword()) :: :ok
  def check(context \\ %{}, opts \\ [])

  def check(_context, opts) when is_list(opts) do
    opts = validate!(opts)
    test = self()
    ref = Guardian.watch_registrations()

    ExUnit.Callbacks.on_exit({__MODULE__, ref}, fn ->
      ref
      |> Guardian.stop_watching()
      |> Enum.filter(&in_scope?(&1, test, opts[:scope]))
      |> Enum.uniq_by(&{&1.os_pid, &1.start_time})
      |> still_running(opts[:wait_ms])
      |> report!()
    end)

    :ok
  end

  def check(_context, opts), do: validate!(opts)

  defp validate!(opts) do
    opts =
      DSPexProcess.Options.validate!(
        opts,
        [
          wait_ms: {nil, {:or, [{:value, nil}, :non_neg_integer]}},
          scope: {:test, {:in, [:test, :all]}}
        ],
        "LeakCheck options"
      )

    Keyword.update!(opts, :wait_ms, &(&1 || default_wait()))
  end

  defp default_wait do
    g = Guardian.status().options
    g[:release_delay_ms] + g[:grace_ms] + g[:kill_wait_ms] + 500
  end

  defp in_scope?(_registration, _test, :all), do: true

  defp in_scope?(%{owner: owner, lineage: lineage}, test, :test),
    do: owner == test or test in lineage

  defp still_running(registrations, wait_ms) do
    deadline = System.monotonic_time(:millisecond) + wait_ms
    poll(registrations, deadline)
  end

  defp poll(registrations, deadline) do
    running = Enum.filter(registrations, &running?/1)

    if running == [] or System.monotonic_time(:millisecond) >= deadline do
      running
    else
      Process.sleep(20)
      poll(running, deadline)
    end
  end

  # Same pid and start time, and not a zombie.
  defp running?(%{os_pid: pid, start_time: start}) do
    case Native.process_metrics([{pid, start}]) do
      [%{state: state}] -> state not in [:zombie, :dead]
      [nil] -> false
    end
  end

  defp report!([]), do: :ok

  defp report!(leaked) do
    lines =
      Enum.map_join(leaked, "\n", fn r ->
        "  OS process #{r.os_pid} (worker #{inspect(r.worker_id)}, registered by " <>
          "#{inspect(r.owner)}) is still running"
      end)

    raise ExUnit.AssertionError,
      message:
        "#{length(leaked)} OS process(es) registered during the test outlived it:\n" <> lines
  end
end
