defmodule DSPexProcess.RegistryModel do
  @moduledoc """
  A PropEr state machine (`:proper_statem`) for `DSPex.Python.ProcessRegistry`: random
  command sequences run against a real registry, real owner processes and real OS processes,
  and every answer is checked against a plain model (a map of entries and a list of owners).

  Commands: start an owner process; register an id (no OS pid, a fresh OS process, or a pid
  that cannot exist); re-register an id (the same commands on an id in use); unregister;
  kill an owner (`Process.exit(owner, :kill)`); kill the registry process and let its
  supervisor restart it (entries must survive); and the queries `get_worker_info`,
  `list_all_workers`, `get_workers_by_fingerprint`, `get_stats`, `get_active_python_pids`,
  `validate_workers`, plus the sweep `cleanup_dead_workers`.

  The registry under test has a name of its own and runs under a supervisor of the test.
  Its table outlives its processes (by design), so each case starts by emptying it. The
  commands find the registry, and the resources they start, in the process dictionary of
  the test process, which is where `:proper_statem.run_commands/2` runs them.
  """

  alias DSPex.Python.ProcessRegistry

  @ids ["w1", "w2", :w3, {:w, 4}, 5]
  @fingerprints ["fp_a", "fp_b", "fp_c"]
  # Linux pids stay below PID_MAX_LIMIT (2^22): these can never name a process.
  @missing_pids [4_194_305, 0x7FFFFFFF]
  @max_owners 4

  # --- the state machine --------------------------------------------------------------

  # owners: [{owner, alive?}] in start order; entries: id => entry.
  def initial_state, do: %{owners: [], entries: %{}}

  def command(s) do
    ids = :proper_types.elements(@ids)
    fps = :proper_types.elements(@fingerprints)
    owners = Enum.map(s.owners, &elem(&1, 0))
    alive = for {o, true} <- s.owners, do: o

    :proper_types.frequency(
      [
        {if(length(owners) < @max_owners, do: 3, else: 0), call(:start_owner, [])},
        {3, call(:unregister, [ids])},
        {1, call(:restart_registry, [])},
        {3, call(:get, [ids])},
        {2, call(:list, [])},
        {2, call(:by_fingerprint, [fps])},
        {2, call(:stats, [])},
        {2, call(:active_pids, [])},
        {1, call(:dead_workers, [])},
        {1, call(:sweep, [])}
      ] ++
        if owners == [] do
          []
        else
          owner = :proper_types.elements(owners)
          python = :proper_types.elements([:none, :os])

          [
            {8, call(:register, [ids, owner, python, fps])},
            {1,
             call(:register_missing_pid, [ids, owner, :proper_types.elements(@missing_pids), fps])}
          ]
        end ++
        if(alive == [], do: [], else: [{2, call(:kill_owner, [:proper_types.elements(alive)])}])
    )
  end

  defp call(fun, args), do: {:call, __MODULE__, fun, args}

  # Shrinking removes commands: an owner must still be one this sequence started.
  def precondition(s, {:call, _, :register, [_, owner, _, _]}), do: known?(s, owner)
  def precondition(s, {:call, _, :register_missing_pid, [_, owner, _, _]}), do: known?(s, owner)
  def precondition(s, {:call, _, :kill_owner, [owner]}), do: {owner, true} in s.owners
  def precondition(s, {:call, _, :start_owner, []}), do: length(s.owners) < @max_owners
  def precondition(_s, _call), do: true

  defp known?(s, owner), do: List.keymember?(s.owners, owner, 0)

  def next_state(s, owner, {:call, _, :start_owner, []}),
    do: %{s | owners: s.owners ++ [{owner, true}]}

  def next_state(s, result, {:call, _, :register, [id, owner, _python, fp]}) do
    entry = %{owner: owner, result: result, fingerprint: fp, alive: alive?(s, owner)}
    %{s | entries: Map.put(s.entries, id, entry)}
  end

  def next_state(s, _result, {:call, _, :unregister, [id]}),
    do: %{s | entries: Map.delete(s.entries, id)}

  def next_state(s, _result, {:call, _, :kill_owner, [owner]}) do
    owners = List.keyreplace(s.owners, owner, 0, {owner, false})
    entries = Map.reject(s.entries, fn {_, e} -> e.owner == owner and e.alive end)
    %{s | owners: owners, entries: entries}
  end

  def next_state(s, _result, {:call, _, :sweep, []}),
    do: %{s | entries: Map.filter(s.entries, fn {_, e} -> e.alive end)}

  def next_state(s, _result, {:call, _, :restart_registry, []}) do
    # A deliberately wrong model, for the test that proves failures are found and shrunk.
    if Process.get({__MODULE__, :mutant}) == :restart_loses_entries,
      do: %{s | entries: %{}},
      else: s
  end

  def next_state(s, _result, _query), do: s

  defp alive?(s, owner), do: {owner, true} in s.owners

  def postcondition(_s, {:call, _, :start_owner, []}, owner), do: is_pid(owner)

  def postcondition(_s, {:call, _, :register, [_, _, python, _]}, {answer, identity, _, _}),
    do: answer == :ok and python == :none == (identity == nil)

  def postcondition(_s, {:call, _, :register_missing_pid, _}, answer),
    do: answer == {:error, :no_such_process}

  def postcondition(_s, {:call, _, :unregister, _}, answer), do: answer == :ok
  def postcondition(_s, {:call, _, :kill_owner, _}, leftovers), do: leftovers == []
  def postcondition(_s, {:call, _, :restart_registry, []}, answer), do: answer == :restarted

  def postcondition(s, {:call, _, :get, [id]}, answer) do
    case {Map.fetch(s.entries, id), answer} do
      {:error, {:error, :not_found}} -> true
      {{:ok, entry}, {:ok, info}} -> matches?(entry, info)
      _ -> false
    end
  end

  def postcondition(s, {:call, _, :list, []}, answer), do: same_entries?(s.entries, answer)

  def postcondition(s, {:call, _, :by_fingerprint, [fp]}, answer),
    do: same_entries?(Map.filter(s.entries, fn {_, e} -> e.fingerprint == fp end), answer)

  def postcondition(s, {:call, _, :dead_workers, []}, answer),
    do: same_entries?(Map.reject(s.entries, fn {_, e} -> e.alive end), answer)

  def postcondition(s, {:call, _, :sweep, []}, removed),
    do: removed == Enum.count(s.entries, fn {_, e} -> not e.alive end)

  def postcondition(s, {:call, _, :stats, []}, answer) do
    entries = Map.values(s.entries)
    alive = Enum.filter(entries, & &1.alive)

    answer == %{
      total_registered: length(entries),
      alive_workers: length(alive),
      dead_workers: length(entries) - length(alive),
      active_python_pids: Enum.count(alive, &(python(&1) != nil))
    }
  end

  def postcondition(s, {:call, _, :active_pids, []}, answer) do
    expected = for {_, e} <- s.entries, e.alive, {pid, _} <- [python(e)], do: pid
    Enum.sort(answer) == Enum.sort(expected)
  end

  defp python(%{result: {_answer, identity, _, _}}), do: identity

  # The info the registry gives for a model entry; registered_at is the Unix second of the
  # call, somewhere between the clock readings taken around it.
  defp matches?(%{result: {_, identity, t0, t1}} = entry, info) do
    {pid, start} = identity || {nil, nil}

    Map.drop(info, [:registered_at]) == %{
      elixir_pid: entry.owner,
      python_pid: pid,
      python_start_time: start,
      fingerprint: entry.fingerprint
    } and info.registered_at in t0..t1
  end

  defp same_entries?(expected, answer) do
    ids = Enum.map(answer, &elem(&1, 0))

    length(ids) == map_size(expected) and Enum.uniq(ids) == ids and
      Enum.all?(answer, fn {id, info} ->
        Map.has_key?(expected, id) and matches?(expected[id], info)
      end)
  end

  # --- the commands ---------------------------------------------------------------------

  defp registry, do: Process.get({__MODULE__, :registry})

  defp remember(key, value), do: Process.put({__MODULE__, key}, [value | recalled(key)])
  defp recalled(key), do: Process.get({__MODULE__, key}, [])

  def start_owner do
    owner = spawn(fn -> receive do: (:stop -> :ok) end)
    remember(:owners, owner)
    owner
  end

  def register(id, owner, python, fp) do
    identity = if python == :os, do: start_os_process()
    t0 = System.os_time(:second)

    answer =
      ProcessRegistry.register_worker(id, owner, identity && elem(identity, 0), fp, registry())

    {answer, identity, t0, System.os_time(:second)}
  end

  def register_missing_pid(id, owner, pid, fp),
    do: ProcessRegistry.register_worker(id, owner, pid, fp, registry())

  def unregister(id), do: ProcessRegistry.unregister_worker(id, registry())

  # The registry's native monitor removes a dead owner's entries; the DOWN message this
  # process gets and that monitor are not ordered, so wait (up to 2 s) for the entries to go.
  # Returns the entries still naming the owner.
  def kill_owner(owner) do
    ref = Process.monitor(owner)
    Process.exit(owner, :kill)
    receive do: ({:DOWN, ^ref, :process, ^owner, _} -> :ok)
    leftovers = fn -> for {_, %{elixir_pid: ^owner}} = e <- list(), do: e end
    DSPexProcess.Test.OSProcess.eventually(fn -> leftovers.() == [] end, 2_000)
    leftovers.()
  end

  # Kills the registry process; its supervisor starts a new one under the same name.
  def restart_registry do
    old = Process.whereis(registry())
    ref = Process.monitor(old)
    Process.exit(old, :kill)
    receive do: ({:DOWN, ^ref, :process, ^old, _} -> :ok)

    restarted? = fn -> Process.whereis(registry()) not in [nil, old] end

    if DSPexProcess.Test.OSProcess.eventually(restarted?, 2_000),
      do: :restarted,
      else: :not_restarted
  end

  def get(id), do: ProcessRegistry.get_worker_info(id, registry())
  def list, do: ProcessRegistry.list_all_workers(registry())
  def by_fingerprint(fp), do: ProcessRegistry.get_workers_by_fingerprint(fp, registry())
  def stats, do: ProcessRegistry.get_stats(registry())
  def active_pids, do: ProcessRegistry.get_active_python_pids(registry())
  def dead_workers, do: ProcessRegistry.validate_workers(registry())
  def sweep, do: ProcessRegistry.cleanup_dead_workers(registry())

  # A throwaway OS process: `cat` on a port's stdin, which exits when the port closes (at
  # the end of the case, or if the test process dies). The library may end it sooner (when
  # its entry's owner dies); nothing here assumes it lives. Its start time is read here,
  # independently of the library, to check what the registry records.
  defp start_os_process do
    port = Port.open({:spawn_executable, System.find_executable("cat")}, [:binary])
    {:os_pid, os_pid} = Port.info(port, :os_pid)
    remember(:ports, port)
    {os_pid, DSPexProcess.Test.OSProcess.start_time(os_pid)}
  end

  # --- one case -------------------------------------------------------------------------

  @doc """
  Runs `commands` against the registry `name`, emptied first, then ends the owners and the
  OS processes the case started. Returns `:proper_statem.run_commands/2`'s answer.
  """
  def run(commands, name) do
    Process.put({__MODULE__, :registry}, name)

    for {id, _} <- ProcessRegistry.list_all_workers(name),
        do: ProcessRegistry.unregister_worker(id, name)

    [] = ProcessRegistry.list_all_workers(name)

    try do
      :proper_statem.run_commands(__MODULE__, commands)
    after
      for owner <- recalled(:owners), do: Process.exit(owner, :kill)
      for port <- recalled(:ports), do: close(port)
      Process.delete({__MODULE__, :owners})
      Process.delete({__MODULE__, :ports})
    end
  end

  defp close(port) do
    Port.close(port)
  rescue
    # Its program already exited (ended by the library), which closed the port.
    ArgumentError -> :ok
  end
end

defmodule DSPexProcess.RegistryModelTest do
  # PropEr (Debian's erlang-proper, on the OTP code path) drives the registry through random
  # command sequences. The number of cases is fixed; the seed is printed and
  # DSPEX_PROPER_SEED replays it; a failure is shrunk to a minimal sequence and shown with
  # the answer of every command.
  use ExUnit.Case, async: false

  alias DSPexProcess.RegistryModel

  @cases 300
  @moduletag timeout: 120_000
  # The sweep logs what it removes.
  @moduletag :capture_log

  setup_all do
    unless Code.ensure_loaded?(:proper) do
      raise "PropEr is missing: install Debian's erlang-proper (.ci/run does)"
    end

    :ok
  end

  setup do
    # The cases kill the registry process on purpose; this supervisor restarts it each time.
    name = :"dspex_registry_model_#{System.unique_integer([:positive])}"
    registry = {DSPex.Python.ProcessRegistry, name: name, cleanup_interval: :infinity}
    options = [strategy: :one_for_one, max_restarts: 100_000, max_seconds: 1]

    start_supervised!(%{
      id: :registry_model_supervisor,
      start: {Supervisor, :start_link, [[registry], options]},
      type: :supervisor
    })

    %{registry: name}
  end

  defp property(registry) do
    :proper.forall(:proper_statem.commands(RegistryModel), fn commands ->
      {_history, _state, result} = RegistryModel.run(commands, registry)
      result == :ok
    end)
  end

  # Seeds PropEr's generator: PropEr 1.2 keeps the process's :rand state when one is set.
  defp seed! do
    seed =
      String.to_integer(System.get_env("DSPEX_PROPER_SEED") || "#{:erlang.phash2(make_ref())}")

    :rand.seed(:exsplus, {seed, seed + 1, seed + 2})
    seed
  end

  # Sequences of about 10 to 60 commands.
  defp check(registry, cases) do
    :proper.quickcheck(property(registry), [
      :long_result,
      :quiet,
      numtests: cases,
      start_size: 10,
      max_size: 60
    ])
  end

  # The shrunk sequence, run once more, each command with its answer.
  defp explain([commands], registry) do
    {history, _state, result} = RegistryModel.run(commands, registry)
    answers = Enum.map(history, &elem(&1, 1)) ++ [result]

    steps =
      commands
      |> Enum.zip(answers)
      |> Enum.map_join("\n", fn {{:set, var, call}, answer} ->
        "  #{inspect(var)} = #{inspect(call)}\n      -> #{inspect(answer)}"
      end)

    "#{length(commands)} commands, result #{inspect(result)}:\n#{steps}"
  end

  test "the registry answers as the model says, over #{@cases} random command sequences",
       %{registry: registry} do
    seed = seed!()
    context = "PropEr seed #{seed} (rerun with DSPEX_PROPER_SEED=#{seed})"
    IO.puts("\nregistry model: #{@cases} cases, #{context}")

    case check(registry, @cases) do
      true ->
        :ok

      counterexample ->
        flunk("#{context}\nshrunk counterexample, #{explain(counterexample, registry)}")
    end
  end

  test "a wrong model is caught and its counterexample shrinks", %{registry: registry} do
    seed = seed!()
    Process.put({RegistryModel, :mutant}, :restart_loses_entries)

    try do
      assert [commands] = check(registry, 200),
             "PropEr seed #{seed}: a model that forgets entries on restart passed"

      calls = for {:set, _, {:call, _, fun, _}} <- commands, do: fun
      # The smallest failures: an owner, a registration, the restart, one query.
      assert length(calls) <= 5, "seed #{seed}: not shrunk: #{inspect(calls)}"
      assert :start_owner in calls and :register in calls and :restart_registry in calls
    after
      Process.delete({RegistryModel, :mutant})
    end
  end
end
