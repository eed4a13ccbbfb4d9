defmodule DSPexProcess.Native do
  # The NIF boundary. Every function here is replaced by its Rust twin when the library
  # loads; the Elixir bodies only run when it did not, and then say why.
  @moduledoc false

  @on_load :load_nif
  @library "libdspex_process_nif"

  @doc false
  def load_nif do
    path = library_path()

    case :erlang.load_nif(String.to_charlist(path), 0) do
      :ok ->
        :ok

      {:error, {reason, text}} ->
        message =
          "could not load the dspex_process NIF from #{path}.so " <>
            "(#{reason}: #{text}). Compile the project with `mix compile` " <>
            "(it needs cargo), or set config :dspex_process, :nif_path to the library path " <>
            "without its .so suffix."

        :persistent_term.put({__MODULE__, :load_error}, message)
        :logger.error(~c"dspex_process: ~ts", [message])
        # Load the module anyway so callers get this message instead of an
        # UndefinedFunctionError.
        :ok
    end
  end

  @doc false
  def library_path do
    case Application.get_env(:dspex_process, :nif_path) do
      nil -> Path.join([priv_dir(), "native", @library])
      path -> path
    end
  end

  defp priv_dir do
    case :code.priv_dir(:dspex_process) do
      {:error, :bad_name} -> Path.expand("../../../priv", __DIR__)
      dir -> List.to_string(dir)
    end
  end

  @doc false
  def load_error, do: :persistent_term.get({__MODULE__, :load_error}, nil)

  # Each stub's body. `:erlang.nif_error/1` is how a NIF stub fails: it raises like
  # `:erlang.error/1`, and Dialyzer knows such stubs are replaced when the library loads
  # (a plain `raise` would make every stub, and every caller, "no local return"). The
  # reason is an exception struct, so callers still rescue a NifNotLoadedError that says
  # why the load failed.
  defp not_loaded do
    :erlang.nif_error(
      DSPexProcess.NifNotLoadedError.exception(
        message: load_error() || "the dspex_process NIF is not loaded"
      )
    )
  end

  # Registry
  def registry_new(_guarded), do: not_loaded()
  def registry_name(_name, _registry), do: not_loaded()

  def registry_register(_registry, _worker_id, _elixir_pid, _python_pid, _fingerprint),
    do: not_loaded()

  def registry_unregister(_registry, _worker_id), do: not_loaded()
  def registry_get(_registry, _worker_id), do: not_loaded()
  def registry_list(_registry), do: not_loaded()
  def registry_by_fingerprint(_registry, _fingerprint), do: not_loaded()
  def registry_active_python_pids(_registry), do: not_loaded()
  def registry_dead_workers(_registry), do: not_loaded()
  def registry_remove_dead(_registry), do: not_loaded()
  def registry_stats(_registry), do: not_loaded()
  def guardian_attach(_pid), do: not_loaded()
  def guardian_take_notices, do: not_loaded()
  def registry_staged, do: not_loaded()
  def registries_live(_registries), do: not_loaded()
  def registries_hold(_registries, _targets), do: not_loaded()
  def registry_guarded(_registry), do: not_loaded()

  # Containment (dirty I/O scheduler)
  def containment_start(_mode), do: not_loaded()
  def containment_status, do: not_loaded()
  def containment_stop, do: not_loaded()
  def cgroup_enter(_pid, _start_time), do: not_loaded()
  def cgroup_dissolve(_pid, _start_time), do: not_loaded()
  def cgroup_oom_kills(_pid, _start_time), do: not_loaded()
  def detect_cgroup_orphans(_selection), do: not_loaded()
  def remove_dead_vm_cgroups, do: not_loaded()

  # Detection (dirty I/O scheduler) and termination (its own OS thread)
  def detect(_registries, _port_pids, _patterns, _min_age_ms, _selection), do: not_loaded()
  def policy_summary(_classes, _orphans, _outcomes), do: not_loaded()

  # options: %{grace_ms, kill_wait_ms, kill_group, allow_other_users}
  def terminate_start(_targets, _options, _tag), do: not_loaded()

  def beam_identity, do: not_loaded()

  def marker_env(_beam_pid, _beam_start, _pid_ns, _run_id, _worker_id, _fingerprint),
    do: not_loaded()

  def port_child?(_os_pid), do: not_loaded()
  def port_child_identity?(_os_pid, _start_time), do: not_loaded()
  def process_metrics(_targets), do: not_loaded()
  def capabilities, do: not_loaded()
  def process_start_time(_pid), do: not_loaded()
end

defmodule DSPexProcess.NifNotLoadedError do
  @moduledoc "Raised when a function needs the native library and it failed to load."
  defexception [:message]
end
