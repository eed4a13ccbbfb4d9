defmodule DSPexProcess.LeakCheckTest do
  # The leak check is proven on real test suites: a script runs ExUnit in a VM of its own
  # with one leaking and one clean test, and the check's failure is the assertion.
  use ExUnit.Case, async: false

  import DSPexProcess.Test.OSProcess

  @moduletag timeout: 120_000

  setup do
    setup_bridge("leakcheck")
  end

  @suite """
  script = System.fetch_env!("LEAK_SCRIPT")
  python = System.fetch_env!("LEAK_PYTHON")
  {:ok, _} = Application.ensure_all_started(:dspex_process)
  ExUnit.start(autorun: false, seed: 0, formatters: [ExUnit.CLIFormatter])

  defmodule LeakyTest do
    use ExUnit.Case
    use DSPexProcess.LeakCheck

    test "starts a worker outside supervision and forgets it" do
      {:ok, w} = DSPexProcess.Worker.start(worker_id: "leaky", script: System.fetch_env!("LEAK_SCRIPT"),
                                           python: System.fetch_env!("LEAK_PYTHON"))
      IO.puts("LEAKED \#{DSPexProcess.Worker.os_pid(w)}")
    end
  end

  defmodule CleanTest do
    use ExUnit.Case
    setup context, do: DSPexProcess.LeakCheck.check(context)

    test "supervised workers, and a port the test owns, end with the test" do
      w = start_supervised!({DSPexProcess.Worker, worker_id: "clean", script: System.fetch_env!("LEAK_SCRIPT"),
                             python: System.fetch_env!("LEAK_PYTHON")})
      {:ok, "pong"} = DSPexProcess.Worker.call(w, "ping")
      port = Port.open({:spawn_executable, System.fetch_env!("LEAK_PYTHON")},
                       [:binary, args: [System.fetch_env!("LEAK_SCRIPT")]])
      {:os_pid, pid} = Port.info(port, :os_pid)
      :ok = DSPex.Python.ProcessRegistry.register_worker("by_the_test", self(), pid, "fp")
      IO.puts("CLEAN \#{DSPexProcess.Worker.os_pid(w)} \#{pid}")
    end
  end

  _ = {script, python}
  %{failures: failures} = ExUnit.run()
  IO.puts("FAILURES \#{failures}")
  """

  test "a leaking test fails, naming the process and the worker; a clean one passes",
       %{script: script} do
    ebin = List.to_string(:code.lib_dir(:dspex_process, :ebin))

    {out, _status} =
      System.cmd("elixir", ["-pa", ebin, "-e", @suite],
        env: [{"LEAK_SCRIPT", script}, {"LEAK_PYTHON", python()}],
        stderr_to_stdout: true
      )

    [_, leaked] = Regex.run(~r/LEAKED (\d+)/, out)
    assert out =~ "FAILURES 1", out
    assert out =~ "1 OS process(es) registered during the test outlived it", out
    assert out =~ ~s|OS process #{leaked} (worker "leaky", registered by #PID<|, out
    assert out =~ "2 tests, 1 failure", out
    # Only the leaky test failed.
    refute out =~ ~r/\d\) test supervised workers/, out
    assert out =~ ~r/1\) test starts a worker outside supervision/, out
  end

  test "options are checked" do
    assert_raise ArgumentError, ~r/:wait_ms must be nil or a non-negative integer, got: -1/, fn ->
      DSPexProcess.LeakCheck.check(%{}, wait_ms: -1)
    end

    assert_raise ArgumentError, ~r/:scope must be one of \[:test, :all\], got: :mine/, fn ->
      DSPexProcess.LeakCheck.check(%{}, scope: :mine)
    end

    assert_raise ArgumentError, fn -> DSPexProcess.LeakCheck.check(%{}, bogus: 1) end
  end
end
