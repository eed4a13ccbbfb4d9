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

    installed =
      for {source, folder} <-
            Enum.map(@artifacts, fn {file, folder} -> {Path.join(target, file), folder} end) ++
              Enum.map(@sources, fn {file, folder} -> {Path.join(root, file), folder} end) do
        dest = Path.join([Mix.Project.app_path(), "priv", folder])
        File.mkdir_p!(dest)
        install(source, Path.join(dest, Path.basename(source)))
      end

    if Enum.any?(installed), do: {:ok, []}, else: {:noop, []}
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
      deps: []
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
