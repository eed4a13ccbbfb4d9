defmodule DSPexProcess.PackageTest do
  # What a hex package of this project would hold, and the proof that it is enough: the
  # file list is expanded from mix.exs's `package[:files]` the way `mix hex.build` expands
  # it, then exactly those files are copied to a temp folder and built there. Also: the
  # compiler task's clean/0 and `mix clean` remove what it installed into priv.
  use ExUnit.Case, async: false

  @moduletag timeout: 600_000
  @root Path.expand("..", __DIR__)

  # Hex's expansion: each entry is a path or a wildcard relative to the project root; a
  # directory brings everything under it (hidden files too); the package holds the files.
  defp package_files do
    Mix.Project.config()[:package][:files]
    |> Enum.map(&Path.join(@root, &1))
    |> Enum.flat_map(&Path.wildcard/1)
    |> Enum.flat_map(&dir_files/1)
    |> Enum.filter(&File.regular?/1)
    |> Enum.map(&Path.relative_to(&1, @root))
    |> Enum.uniq()
    |> Enum.sort()
  end

  defp dir_files(path) do
    case File.lstat(path) do
      {:ok, %File.Stat{type: :directory}} ->
        [path | path |> File.ls!() |> Enum.flat_map(&dir_files(Path.join(path, &1)))]

      _ ->
        [path]
    end
  end

  defp regular_files_under(dir) do
    for path <- Path.wildcard(Path.join([@root, dir, "**", "*"]), match_dot: true),
        File.regular?(path),
        do: Path.relative_to(path, @root)
  end

  # The workspace members named in Cargo.toml (entries may be wildcards).
  defp workspace_members do
    toml = File.read!(Path.join(@root, "Cargo.toml"))
    [_, list] = Regex.run(~r/^members\s*=\s*\[([^\]]*)\]/m, toml)

    for [_, pattern] <- Regex.scan(~r/"([^"]+)"/, list),
        dir <- Path.wildcard(Path.join(@root, pattern)),
        File.regular?(Path.join(dir, "Cargo.toml")),
        do: Path.relative_to(dir, @root)
  end

  test "the package holds what a build needs and nothing of the build or the tests" do
    files = package_files()
    members = workspace_members()
    assert "native/dspex_process_nif" in members, "workspace members: #{inspect(members)}"

    needed =
      ~w(mix.exs README.md LICENSE Cargo.toml Cargo.lock kill_python.sh python/dspy_bridge.py) ++
        regular_files_under("lib") ++
        Enum.flat_map(
          members,
          &[Path.join(&1, "Cargo.toml") | regular_files_under(Path.join(&1, "src"))]
        )

    assert needed -- files == []
    assert "native/dspex_process_nif/src/lib.rs" in files

    for file <- files do
      parts = Path.split(file)
      refute hd(parts) in ~w(_build deps test priv bench scripts .git .ci), file
      refute "target" in parts, file
      refute "proptest-regressions" in parts, file
    end
  end

  test "exactly the package's files build, load the NIF and run; clean removes what compile installed" do
    tmp = Path.join(System.tmp_dir!(), "dspex_package_#{System.unique_integer([:positive])}")
    pkg = Path.join(tmp, "dspex_process")
    on_exit(fn -> File.rm_rf(tmp) end)

    for file <- package_files() do
      dest = Path.join(pkg, file)
      File.mkdir_p!(Path.dirname(dest))
      File.cp!(Path.join(@root, file), dest)
      File.chmod!(dest, File.stat!(Path.join(@root, file)).mode)
    end

    # A cargo target of its own, seeded with a copy of this tree's release build: crates.io
    # dependencies are reused, while the package's own crates (a different path, hence
    # different build units) are compiled from the copied sources. This tree's target is
    # left untouched.
    target = Path.join(tmp, "target")
    File.mkdir_p!(target)
    ours = System.get_env("CARGO_TARGET_DIR", Path.join(@root, "target"))

    if File.dir?(Path.join(ours, "release")) do
      {_, 0} = System.cmd("cp", ["-a", Path.join(ours, "release"), target])
    end

    env = [{"MIX_ENV", "prod"}, {"CARGO_TARGET_DIR", target}]
    mix = fn args -> System.cmd("mix", args, cd: pkg, env: env, stderr_to_stdout: true) end
    priv = Path.join(pkg, "_build/prod/lib/dspex_process/priv")

    installed =
      Enum.map(
        ~w(native/libdspex_process_nif.so bin/dspex-proc python/dspy_bridge.py),
        &Path.join(priv, &1)
      )

    manifest = Path.join(pkg, "_build/prod/lib/dspex_process/.mix/compile.dspex_native")

    {out, status} = mix.(["compile"])
    assert status == 0, out
    assert Enum.all?(installed, &File.regular?/1), out
    assert File.regular?(manifest)

    code = """
    :ok = DSPex.Python.ProcessRegistry.register_worker("w", self(), nil, "fp")
    IO.puts("STATS " <> inspect(DSPex.Python.ProcessRegistry.get_stats()))
    IO.puts("CLI " <> to_string(File.regular?(DSPexProcess.Worker.guard_executable())))
    """

    {out, status} = mix.(["run", "-e", code])
    assert status == 0, out

    assert out =~
             "STATS %{active_python_pids: 0, alive_workers: 1, dead_workers: 0, total_registered: 1}"

    assert out =~ "CLI true"

    # The compiler task's clean/0 alone: its files go, the compiled modules stay.
    {out, status} =
      mix.(["run", "--no-compile", "--no-start", "-e", "Mix.Tasks.Compile.DspexNative.clean()"])

    assert status == 0, out
    assert Enum.all?(installed, &(not File.exists?(&1)))
    refute File.exists?(priv)
    refute File.exists?(manifest)
    assert File.regular?(Path.join(pkg, "_build/prod/lib/dspex_process/ebin/dspex_process.app"))

    # Compiling again installs them again; `mix clean` removes them.
    {out, 0} = mix.(["compile"])
    assert Enum.all?(installed, &File.regular?/1), out
    {out, 0} = mix.(["clean"])
    assert Enum.all?(installed, &(not File.exists?(&1))), out
    refute File.exists?(manifest)

    # Nothing was written into the package's sources (no priv/, Cargo.lock unchanged).
    refute File.exists?(Path.join(pkg, "priv"))
    assert File.read!(Path.join(pkg, "Cargo.lock")) == File.read!(Path.join(@root, "Cargo.lock"))
  end
end
