defmodule Mix.Tasks.Dspex.Cli do
  @shortdoc "Prints the path of dspex-proc, or installs it into a folder on PATH"

  @moduledoc """
  The operator's way to `dspex-proc`, which `mix compile` builds into this project's
  `_build/<env>/lib/dspex_process/priv/bin/`.

      mix dspex.cli                      # prints its path
      mix dspex.cli install DIR          # copies it to DIR/dspex-proc (e.g. /usr/local/bin)

  `kill_python.sh` finds it on `PATH` once installed (and in `./_build` without that).
  From a source checkout, `cargo install --path native/dspex_process_cli` installs it into
  `~/.cargo/bin` instead.
  """

  use Mix.Task

  @impl true
  def run(args) do
    Mix.Task.run("compile", [])
    source = DSPexProcess.Worker.guard_executable()

    unless File.regular?(source) do
      Mix.raise("#{source} is missing: `mix compile` did not build dspex-proc")
    end

    case args do
      [] ->
        Mix.shell().info(source)

      ["install", dir] ->
        install(source, dir)

      other ->
        Mix.raise(
          "mix dspex.cli: unexpected arguments #{inspect(other)}; " <>
            "use `mix dspex.cli` or `mix dspex.cli install DIR`"
        )
    end
  end

  defp install(source, dir) do
    unless File.dir?(dir), do: Mix.raise("mix dspex.cli install: #{dir} is not a folder")
    dest = Path.join(dir, "dspex-proc")
    # Remove first: an installed copy may be running, and writing into it in place fails.
    _ = File.rm(dest)

    case File.cp(source, dest) do
      :ok ->
        File.chmod!(dest, 0o755)
        Mix.shell().info("installed #{dest}")

      {:error, reason} ->
        Mix.raise("mix dspex.cli install: cannot write #{dest}: #{:file.format_error(reason)}")
    end
  end
end
