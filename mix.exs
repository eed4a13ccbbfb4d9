defmodule Mix.Tasks.Compile.DspexNative do
  @moduledoc """
  Builds the Rust workspace with `cargo build --release` and puts the NIF under the
  application's `priv/native/`, the `dspex-proc` CLI under `priv/bin/` and the bridge
  stand-in under `priv/python/`.

  The project has no source `priv/` on purpose: Mix mirrors a source `priv/` into the build
  (by symlink, or by copying files *in place*), which would put build artifacts into the
  source tree of a `path:` dependency and overwrite a NIF that a running VM has mapped.
  Here only this task writes the application's `priv/`, and always by remove-then-copy.

  Cargo decides what is stale, so running it on every compile costs a fraction of a second
  when nothing changed. The library is removed before the copy: a running VM may have the old
  file mapped, and writing into it in place would corrupt that mapping.
  """
  use Mix.Task.Compiler

  # {file cargo builds, folder under the app's priv}
  @artifacts [{"libdspex_process_nif.so", "native"}, {"dspex-proc", "bin"}]
  # {file in the source tree, folder under the app's priv}
  @sources [{"python/dspy_bridge.py", "python"}]

  @impl true
  def manifests, do: [manifest()]

  defp manifest, do: Path.join(Mix.Project.manifest_path(), "compile.dspex_native")

  @impl true
  def run(_args) do
    root = Path.dirname(Mix.Project.project_file())
    cargo = System.find_executable("cargo") || Mix.raise(missing_cargo())

    case System.cmd(cargo, ["build", "--release", "--workspace", "--quiet"],
           cd: root,
           stderr_to_stdout: true,
           into: IO.stream(:stdio, :line)
         ) do
      {_, 0} -> :ok
      {_, status} -> Mix.raise("cargo build --release failed (exit status #{status}) in #{root}")
    end

    target = Path.join(System.get_env("CARGO_TARGET_DIR", Path.join(root, "target")), "release")

    sources =
      Enum.map(@artifacts, fn {file, _} -> Path.join(target, file) end) ++
        Enum.map(@sources, fn {file, _} -> Path.join(root, file) end)

    installed =
      for {source, dest} <- Enum.zip(sources, installed_paths()) do
        File.mkdir_p!(Path.dirname(dest))
        install(source, dest)
      end

    # What this task put into priv, for `clean/0`.
    File.mkdir_p!(Path.dirname(manifest()))
    File.write!(manifest(), Enum.join(installed_paths(), "\n"))

    if Enum.any?(installed), do: {:ok, []}, else: {:noop, []}
  end

  @doc """
  Removes what `run/1` installed into the application's priv (and priv's folders, when
  that leaves them empty). `mix clean` calls it; cargo's own build cache stays.
  """
  @impl true
  def clean do
    recorded =
      case File.read(manifest()) do
        {:ok, text} -> String.split(text, "\n", trim: true)
        {:error, _} -> []
      end

    paths = Enum.uniq(installed_paths() ++ recorded)
    Enum.each(paths, &File.rm/1)

    # Deepest first; File.rmdir only removes an empty folder.
    paths
    |> Enum.flat_map(&[Path.dirname(&1), Path.dirname(Path.dirname(&1))])
    |> Enum.uniq()
    |> Enum.sort_by(&(-String.length(&1)))
    |> Enum.each(&File.rmdir/1)

    File.rm(manifest())
    :ok
  end

  # Where each artifact and source file goes, in the order of @artifacts ++ @sources.
  defp installed_paths do
    for {file, folder} <- @artifacts ++ @sources do
      Path.join([Mix.Project.app_path(), "priv", folder, Path.basename(file)])
    end
  end

  defp install(source, dest) do
    unless File.exists?(source),
      do: Mix.raise("#{source} is missing: the build did not produce it")

    if same_file?(source, dest) do
      false
    else
      File.rm(dest)
      File.cp!(source, dest)
      true
    end
  end

  defp same_file?(a, b) do
    with {:ok, sa} <- File.stat(a, time: :posix), {:ok, sb} <- File.stat(b, time: :posix) do
      sa.size == sb.size and sa.mtime <= sb.mtime
    else
      _ -> false
    end
  end

  defp missing_cargo do
    "cargo was not found on PATH: dspex_process builds its Rust NIF with cargo. " <>
      "Install a Rust toolchain (https://rustup.rs) and compile again."
  end
end

defmodule DSPexProcess.MixProject do
  use Mix.Project

  def project do
    [
      app: :dspex_process,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:dspex_native | Mix.compilers()],
      elixirc_paths: elixirc_paths(Mix.env()),
      # DSPexProcess.LeakCheck is for the user's test suites, where ExUnit is loaded.
      xref: [exclude: [ExUnit.Callbacks, ExUnit.AssertionError]],
      deps: [],
      description: description(),
      package: package(),
      docs: docs()
    ]
  end

  defp description do
    "Keeps Elixir apps from leaking the OS processes (Python workers) they start through " <>
      "Ports: a registry by pid and start time that survives registry crashes, ownership " <>
      "markers, orphan detection and safe parallel termination. Rust NIF and CLI."
  end

  # What a user who fetches the package needs to build it: the Elixir sources, the whole
  # Rust workspace (the compiler task runs cargo), the bridge stand-in and the shell tool.
  # test/package_test.exs checks this list and builds a copy of exactly these files.
  defp package do
    [
      licenses: ["Apache-2.0"],
      links: %{"DSPex (the design this follows)" => "https://github.com/nshkrdotcom/DSPex"},
      files: ~w(lib mix.exs .formatter.exs README.md guides LICENSE Cargo.toml Cargo.lock
                native python kill_python.sh)
    ]
  end

  defp docs do
    [
      main: "readme",
      extras:
        ["README.md"] ++
          Enum.map(~w(usage operators guarantees benchmarks internals), &"guides/#{&1}.md") ++
          ["LICENSE"]
    ]
  end

  def application do
    [
      extra_applications: [:logger],
      mod: {DSPexProcess.Application, []}
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
