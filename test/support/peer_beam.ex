defmodule DSPexProcess.Test.PeerBeam do
  @moduledoc """
  A second, real BEAM (an `elixir` OS process loading this application) that starts
  workers, reports their pids, and waits. The test can stop it politely (close its stdin)
  or `kill -9` it to make real orphans.
  """

  import DSPexProcess.Test.OSProcess

  defstruct [:port, :os_pid, :start_time, :worker_pids]

  @peer_code """
  [count | args] = System.argv()
  script = System.fetch_env!("PEER_SCRIPT")
  python = System.fetch_env!("PEER_PYTHON")
  guard = System.fetch_env!("PEER_GUARD") == "true"

  containment = String.to_atom(System.fetch_env!("PEER_CONTAINMENT"))

  # Without its guardian, the peer leaves real orphans when it is killed, for the detector.
  if System.fetch_env!("PEER_GUARDIAN") == "false",
    do:
      Application.put_env(:dspex_process, :guardian,
        end_released: false,
        os_guardian: false,
        containment: containment
      ),
    else: Application.put_env(:dspex_process, :guardian, containment: containment)

  {:ok, _} = Application.ensure_all_started(:dspex_process)

  # "memory_max=N,pids_max=N,...": the workers' :limits.
  limits =
    for pair <- String.split(System.get_env("PEER_LIMITS", ""), ",", trim: true) do
      [key, value] = String.split(pair, "=")
      {String.to_existing_atom(key), String.to_integer(value)}
    end

  workers =
    for i <- 1..String.to_integer(count) do
      {:ok, w} =
        DSPexProcess.Worker.start_link(
          worker_id: "peer_\#{i}",
          script: script,
          python: python,
          args: args,
          guard: guard,
          limits: limits
        )

      w
    end

  Enum.each(workers, fn w -> {:ok, "pong"} = DSPexProcess.Worker.call(w, "ping") end)
  pids = Enum.map(workers, &DSPexProcess.Worker.os_pid/1)
  IO.puts("READY \#{System.pid()} \#{Enum.join(pids, " ")}")
  IO.read(:stdio, :line)
  Enum.each(workers, &GenServer.stop/1)
  System.halt(0)
  """

  @doc """
  Starts a peer BEAM running `count` workers of `script` with `args`; `guard: true` starts
  them through the PDEATHSIG guard (default `false`, so that they can be orphaned), and
  `guardian: true` runs the library's guardian there (default `false`: a killed peer leaves
  orphans). `containment:` is the guardian's option there (default `:auto` with the
  guardian, `:none` without it: a peer without protection leaves its orphans outside any
  cgroup). `limits:` are the workers' `:limits` (default none). Returns once every worker
  answers.
  """
  def start(script, count, args \\ [], opts \\ []) do
    guard = Keyword.get(opts, :guard, false)
    guardian = Keyword.get(opts, :guardian, false)
    containment = Keyword.get(opts, :containment, if(guardian, do: :auto, else: :none))
    elixir = System.find_executable("elixir") || raise "elixir is needed for the tests"
    ebin = :code.lib_dir(:dspex_process, :ebin) |> List.to_string()

    port =
      Port.open({:spawn_executable, elixir}, [
        :binary,
        :exit_status,
        {:line, 4096},
        # The script goes in the environment: the peer's own argv must not match it.
        env: [
          {~c"PEER_SCRIPT", String.to_charlist(script)},
          {~c"PEER_PYTHON", String.to_charlist(python())},
          {~c"PEER_GUARD", ~c"#{guard}"},
          {~c"PEER_GUARDIAN", ~c"#{guardian}"},
          {~c"PEER_CONTAINMENT", ~c"#{containment}"},
          {~c"PEER_LIMITS",
           opts
           |> Keyword.get(:limits, [])
           |> Enum.map_join(",", fn {k, v} -> "#{k}=#{v}" end)
           |> String.to_charlist()}
        ],
        args:
          distribution(opts) ++ ["-pa", ebin, "-e", @peer_code, Integer.to_string(count)] ++ args
      ])

    await_ready(port, "")
  end

  # `sname: name, cookie: cookie` makes the peer a distributed node.
  defp distribution(opts) do
    case Keyword.fetch(opts, :sname) do
      {:ok, sname} -> ["--sname", sname, "--cookie", Keyword.fetch!(opts, :cookie)]
      :error -> []
    end
  end

  defp await_ready(port, acc) do
    receive do
      {^port, {:data, {:eol, line}}} ->
        case String.split(acc <> line) do
          ["READY", beam | pids] ->
            os_pid = String.to_integer(beam)

            %__MODULE__{
              port: port,
              os_pid: os_pid,
              start_time: start_time(os_pid),
              worker_pids: Enum.map(pids, &String.to_integer/1)
            }

          _ ->
            await_ready(port, "")
        end

      {^port, {:data, {:noeol, part}}} ->
        await_ready(port, acc <> part)

      {^port, {:exit_status, status}} ->
        raise "peer BEAM exited with status #{status} before it was ready"
    after
      30_000 -> raise "peer BEAM did not start in 30 s"
    end
  end

  @doc "Kills the peer BEAM with SIGKILL and waits until it is gone."
  def kill(%__MODULE__{port: port, os_pid: os_pid, start_time: start}) do
    kill9(os_pid, start)

    receive do
      {^port, {:exit_status, _}} -> :ok
    after
      10_000 -> raise "peer BEAM #{os_pid} survived kill -9"
    end
  end

  @doc "Stops the peer politely: its workers stop, then it halts."
  def stop(%__MODULE__{port: port, os_pid: os_pid}) do
    Port.close(port)
    true = eventually(fn -> not File.exists?("/proc/#{os_pid}") end, 15_000)
    :ok
  end
end
