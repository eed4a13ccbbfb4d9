# The orphan demo: `mix run examples/orphan_demo.exs`
#
# 1. Starts 8 workers in this VM.
# 2. Starts a second VM with 3 unguarded workers that linger after their stdin closes (as the
#    old DSPex bridge did) and its guardian turned off (as a VM without this library), then
#    kills that VM with `kill -9`: its 3 workers are now orphans, for the detector.
# 3. Shows the status (degraded), the orphans, the cleanup report and the status again.
# 4. Stops its own workers. Nothing it started is left running.
#
# It works on a private copy of the bridge under a unique name, so it only ever sees and
# signals the processes it started itself, even on a shared machine.

alias DSPex.Python.OrphanDetector
alias DSPexProcess.Worker

defmodule Demo do
  def say(text), do: IO.puts("\n== " <> text)
  def show(label, term), do: IO.puts("#{label}: " <> inspect(term, pretty: true))

  @peer_code """
  script = System.fetch_env!("DEMO_SCRIPT")
  # Its guardian off: this VM leaks as a VM without the library would.
  Application.put_env(:dspex_process, :guardian, end_released: false, os_guardian: false)
  {:ok, _} = Application.ensure_all_started(:dspex_process)

  workers =
    for i <- 1..3 do
      {:ok, w} =
        DSPexProcess.Worker.start_link(
          worker_id: "peer_worker_\#{i}",
          script: script,
          args: ["--linger"],
          guard: false
        )

      {:ok, "pong"} = DSPexProcess.Worker.call(w, "ping")
      w
    end

  IO.puts("READY \#{System.pid()} " <> Enum.map_join(workers, " ", &DSPexProcess.Worker.os_pid/1))
  IO.read(:stdio, :line)
  """

  def start_peer(script) do
    elixir = System.find_executable("elixir") || raise "elixir is not on PATH"

    port =
      Port.open({:spawn_executable, elixir}, [
        :binary,
        :exit_status,
        {:line, 4096},
        env: [{~c"DEMO_SCRIPT", String.to_charlist(script)}],
        args: ["-pa", List.to_string(:code.lib_dir(:dspex_process, :ebin)), "-e", @peer_code]
      ])

    receive_ready(port)
  end

  defp receive_ready(port) do
    receive do
      {^port, {:data, {:eol, "READY " <> rest}}} ->
        [beam | workers] = rest |> String.split() |> Enum.map(&String.to_integer/1)
        {:ok, start} = DSPexProcess.Native.process_start_time(beam)
        {port, {beam, start}, workers}

      {^port, {:data, _other}} ->
        receive_ready(port)

      {^port, {:exit_status, status}} ->
        raise "the second VM exited with status #{status}"
    after
      30_000 -> raise "the second VM did not start"
    end
  end

  # The demo's own second VM, killed only while its pid still names it.
  def kill9(port, os_pid, start) do
    {:ok, ^start} = DSPexProcess.Native.process_start_time(os_pid)
    {_, 0} = System.cmd("kill", ["-9", Integer.to_string(os_pid)])
    receive do: ({^port, {:exit_status, _}} -> :ok), after: (10_000 -> raise "still alive")
  end
end

name =
  System.get_env("DSPEX_DEMO_NAME") ||
    "dspy_bridge_demo_#{System.pid()}_#{System.unique_integer([:positive])}.py"

dir = Path.join(System.tmp_dir!(), "dspex_process_demo")
File.mkdir_p!(dir)
script = Path.join(dir, name)
File.cp!(Worker.default_script(), script)
opts = [pattern: name]

try do
  Demo.say("Starting 8 workers in this VM (#{System.pid()})")

  workers =
    for i <- 1..8 do
      {:ok, w} = Worker.start_link(worker_id: "worker_#{i}", script: script)
      {:ok, "pong"} = Worker.call(w, "ping")
      w
    end

  IO.puts("python pids: #{Enum.map_join(workers, " ", &Worker.os_pid/1)}")

  Demo.say(
    "Starting a second VM with 3 lingering, unguarded workers and no guardian, then kill -9 of that VM"
  )

  {port, {beam, beam_start}, peer_workers} = Demo.start_peer(script)
  IO.puts("second VM #{beam}, its workers: #{Enum.join(peer_workers, " ")}")
  Demo.kill9(port, beam, beam_start)

  IO.puts(
    "VM #{beam} killed; its workers are still running: #{Enum.all?(peer_workers, &File.exists?("/proc/#{&1}"))}"
  )

  Demo.say("OrphanDetector.get_system_status/1")
  status = OrphanDetector.get_system_status(opts)
  Demo.show("status", Map.drop(status, [:orphan_details]))

  Demo.say("OrphanDetector.find_orphaned_processes/1")

  for o <- OrphanDetector.find_orphaned_processes(opts) do
    IO.puts(
      "  pid #{o.pid}  reason #{o.reason}  owner VM #{o.owner.pid}  worker #{o.owner.worker_id}"
    )
  end

  Demo.say("OrphanDetector.cleanup_orphaned_processes/1")
  report = OrphanDetector.cleanup_orphaned_processes(opts)

  IO.puts("""
  🧹 Cleanup complete:
    - Found: #{report.found} orphaned processes
    - Terminated: #{report.terminated} processes
    - Errors: #{report.errors}
    - Preserved: #{report.preserved_active} active workers\
  """)

  for {o, outcome} <- report.details, do: IO.puts("  pid #{o.pid}: #{inspect(outcome)}")

  Demo.say("OrphanDetector.get_system_status/1 again")
  after_status = OrphanDetector.get_system_status(opts)

  Demo.show(
    "status",
    Map.take(after_status, [:system_health, :orphaned_processes, :total_dspy_processes, :active])
  )

  Demo.say("Stopping this VM's workers")
  Enum.each(workers, &GenServer.stop/1)
  left = OrphanDetector.classify_processes(opts)
  IO.puts("processes left running: #{length(left)}")

  ok? =
    status.system_health == :degraded and report.found == 3 and report.terminated == 3 and
      report.preserved_active == 8 and after_status.system_health == :healthy and left == []

  IO.puts(if ok?, do: "\nDEMO OK", else: "\nDEMO FAILED")
  unless ok?, do: System.halt(1)
after
  File.rm(script)
end
