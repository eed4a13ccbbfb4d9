defmodule DSPexProcess.PathDependencyTest do
  # The README says the library works from another mix project through `path:`. This builds
  # such a project in a temp folder and uses the registry and the detector from it.
  use ExUnit.Case, async: false

  @moduletag timeout: 300_000
  @root Path.expand("..", __DIR__)

  test "a project with {:dspex_process, path: ...} compiles it, loads the NIF and runs" do
    dir = Path.join(System.tmp_dir!(), "dspex_consumer_#{System.unique_integer([:positive])}")
    File.mkdir_p!(Path.join(dir, "lib"))
    on_exit(fn -> File.rm_rf(dir) end)

    File.write!(Path.join(dir, "mix.exs"), """
    defmodule Consumer.MixProject do
      use Mix.Project

      def project do
        [app: :consumer, version: "0.1.0", elixir: "~> 1.14",
         deps: [{:dspex_process, path: #{inspect(@root)}}]]
      end

      def application, do: [extra_applications: [:logger]]
    end
    """)

    code = """
    IO.puts("APP " <> inspect(Mix.Project.config()[:app]))
    :ok = DSPex.Python.ProcessRegistry.register_worker("w", self(), nil, "fp")
    IO.puts("STATS " <> inspect(DSPex.Python.ProcessRegistry.get_stats()))
    IO.puts("ORPHANS " <> inspect(DSPex.Python.OrphanDetector.find_orphaned_processes(pattern: "dspex_consumer_none.py")))
    IO.puts("CLI " <> to_string(File.exists?(DSPexProcess.Worker.guard_executable())))
    """

    {out, status} =
      System.cmd("mix", ["run", "-e", code],
        cd: dir,
        env: [{"MIX_ENV", "dev"}],
        stderr_to_stdout: true
      )

    assert status == 0, out
    assert out =~ "APP :consumer"

    assert out =~
             "STATS %{active_python_pids: 0, alive_workers: 1, dead_workers: 0, total_registered: 1}"

    assert out =~ "ORPHANS []"
    assert out =~ "CLI true"
    # The consumer's build wrote nothing into this source tree (a source priv/ would be
    # mirrored into every build, over NIFs that running VMs have mapped).
    refute File.exists?(Path.join(@root, "priv"))
  end
end
