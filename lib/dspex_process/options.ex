defmodule DSPexProcess.Options do
  @moduledoc """
  Option validation for every module of the library, with one message style:

      :grace_ms must be a non-negative integer, got: -1

  A schema is a keyword list of `{key, {default, check}}`. Checks:

    * `:boolean`, `:atom` (not `nil`, `true` or `false`), `:non_neg_integer`,
      `:pos_integer`, `{:integer, min, max}`
    * `{:in, values}` - one of `values`
    * `{:or, [check]}` - any of the checks
    * `{:value, value}` - exactly `value` (e.g. `:infinity`)
    * `{:list_of, check, min..max}` - a list of that many elements, each passing `check`
    * `{:pattern}` - a literal argv pattern: 1 to 4096 bytes, no NUL
    * `{:fun, description, fun}` - `fun.(value)` is true; `description` says what is expected

  Unknown keys raise `ArgumentError` naming them (`Keyword.validate!/2`).
  """

  @typedoc "One check (see the module documentation)."
  @type check ::
          :boolean
          | :atom
          | :non_neg_integer
          | :pos_integer
          | {:integer, integer(), integer()}
          | {:in, [term()]}
          | {:or, [check()]}
          | {:value, term()}
          | {:list_of, check(), Range.t()}
          | {:pattern}
          | {:fun, String.t(), (term() -> boolean())}

  @typedoc "Option name => {default, check}."
  @type schema :: [{atom(), {term(), check()}}]

  @max_ms 86_400_000

  @detector_reasons [:owner_dead, :worker_gone, :reparented, :cgroup_owner_dead, :unmanaged]

  @detector [
    pattern: {"dspy_bridge.py", {:or, [{:pattern}, {:list_of, {:pattern}, 1..64}]}},
    registry: {DSPex.Python.ProcessRegistry, :atom},
    min_age_ms: {5_000, {:integer, 0, @max_ms}},
    grace_ms: {1_000, {:integer, 0, @max_ms}},
    kill_wait_ms: {1_000, {:integer, 0, @max_ms}},
    kill_group: {true, :boolean},
    include_unmanaged: {false, :boolean},
    allow_other_users: {false, :boolean},
    reasons: {@detector_reasons, {:list_of, {:in, @detector_reasons}, 1..5}},
    dry_run: {false, :boolean},
    metrics: {false, :boolean},
    cgroups: {true, :boolean}
  ]

  @doc """
  Validates `opts` against `schema` and fills in the defaults; `what` names the options in
  the error for a value that is not a keyword list.
  """
  @spec validate!(term(), schema(), String.t()) :: keyword()
  def validate!(opts, schema, what) do
    unless is_list(opts) and Keyword.keyword?(opts) do
      raise ArgumentError, "#{what} must be a keyword list, got: #{inspect(opts, limit: 10)}"
    end

    opts = Keyword.validate!(opts, Enum.map(schema, fn {key, {default, _}} -> {key, default} end))
    for {key, {_, check}} <- schema, do: check!(key, Keyword.fetch!(opts, key), check)
    opts
  end

  @doc "Raises `ArgumentError` unless `value` of option `key` passes `check`."
  @spec check!(atom(), term(), check()) :: :ok
  def check!(key, value, check) do
    if ok?(value, check) do
      :ok
    else
      raise ArgumentError,
            "#{inspect(key)} must be #{describe(check)}, got: #{inspect(value, limit: 10)}"
    end
  end

  @doc """
  The options of `DSPex.Python.OrphanDetector` (documented there), validated, with
  `:pattern` always a list. `config :dspex_process, :detector, [...]` gives defaults that
  the options override. Shared by the detector, `DSPexProcess.OrphanMonitor`, the
  registry's `:cleanup_on_start` and `mix dspex.orphans`.
  """
  @spec detector!(term()) :: keyword()
  def detector!(opts) do
    # `config :dspex_process, :detector, [...]` sets defaults (a pattern, `cgroups: false`).
    defaults = Application.get_env(:dspex_process, :detector, [])

    opts =
      if Keyword.keyword?(defaults) and is_list(opts),
        do: Keyword.merge(defaults, opts),
        else: opts

    opts
    |> validate!(@detector, "OrphanDetector options")
    |> Keyword.update!(:pattern, &List.wrap/1)
  end

  @doc "The reasons a detector option `:reasons` may hold."
  @spec detector_reasons() :: [atom()]
  def detector_reasons, do: @detector_reasons

  defp ok?(v, :boolean), do: is_boolean(v)
  defp ok?(v, :atom), do: is_atom(v) and v not in [nil, true, false]
  defp ok?(v, :non_neg_integer), do: is_integer(v) and v >= 0
  defp ok?(v, :pos_integer), do: is_integer(v) and v > 0
  defp ok?(v, {:integer, min, max}), do: is_integer(v) and v >= min and v <= max
  defp ok?(v, {:in, values}), do: v in values
  defp ok?(v, {:or, checks}), do: Enum.any?(checks, &ok?(v, &1))
  defp ok?(v, {:value, value}), do: v === value
  defp ok?(v, {:fun, _, fun}), do: fun.(v) == true

  defp ok?(v, {:list_of, check, min..max}) do
    is_list(v) and length(v) in min..max and Enum.all?(v, &ok?(&1, check))
  end

  defp ok?(v, {:pattern}) do
    is_binary(v) and byte_size(v) in 1..4096 and not String.contains?(v, <<0>>)
  end

  defp describe(:boolean), do: "a boolean"
  defp describe(:atom), do: "an atom"
  defp describe(:non_neg_integer), do: "a non-negative integer"
  defp describe(:pos_integer), do: "a positive integer"
  defp describe({:integer, min, max}), do: "an integer from #{min} to #{max}"
  defp describe({:in, values}), do: "one of #{inspect(values)}"
  defp describe({:or, checks}), do: Enum.map_join(checks, " or ", &describe/1)
  defp describe({:value, value}), do: inspect(value)
  defp describe({:fun, description, _}), do: description
  defp describe({:pattern}), do: "a pattern of 1 to 4096 bytes without NUL"

  defp describe({:list_of, check, min..max}),
    do: "a list of #{min} to #{max} elements, each #{describe(check)}"
end
