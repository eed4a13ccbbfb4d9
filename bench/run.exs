# Benchmarks: `mix run bench/run.exs`
#
# Every row is measured side by side with its baseline in the same run and reported with a
# ratio, because these machines are noisy. Baselines are written here, for the benchmark:
# the reference's ETS registry and its pgrep scan and serial kill loop. Every process the
# benchmark starts carries a marker unique to this run and is ended before it exits.

alias DSPex.Python.{OrphanDetector, ProcessRegistry, Worker}

defmodule Bench do
  @moduledoc false

  def median(list), do: list |> Enum.sort() |> Enum.at(div(length(list), 2))

  def median_us(runs, fun) do
    for(_ <- 1..runs, do: elem(:timer.tc(fun), 0)) |> median()
  end

  # Median µs per op over batches of `batch` ops.
  def per_op_us(items, batch, fun) do
    items
    |> Enum.chunk_every(batch)
    |> Enum.map(fn chunk ->
      {t, _} = :timer.tc(fn -> Enum.each(chunk, fun) end)
      t / length(chunk)
    end)
    |> median()
  end

  def python do
    {path, 0} = System.cmd("python3", ["-c", "import sys; print(sys.executable)"])
    String.trim(path)
  end

  def rss_bytes do
    "/proc/self/status"
    |> File.read!()
    |> then(&Regex.run(~r/VmRSS:\s+(\d+) kB/, &1))
    |> Enum.at(1)
    |> String.to_integer()
    |> Kernel.*(1024)
  end

  # A Python process that forks `n` children, prints their pids and then either waits
  # (children die with it: PR_SET_PDEATHSIG) or exits, leaving them as real orphans that
  # lead their own session, half of them ignoring SIGTERM. `marker` is in every argv.
  @factory ~S"""
  import ctypes, os, signal, sys, time
  n, mode, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  libc = ctypes.CDLL(None)
  pids = []
  for i in range(n):
      pid = os.fork()
      if pid == 0:
          if mode == "orphans":
              os.setsid()
              if i % 2 == 1:
                  signal.signal(signal.SIGTERM, signal.SIG_IGN)
          else:
              libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
          while True:
              signal.pause()
      pids.append(pid)
  print(" ".join(map(str, pids)), flush=True)
  if mode == "orphans":
      os._exit(0)
  sys.stdin.read()
  """

  def spawn_processes(n, mode, marker) do
    port =
      Port.open({:spawn_executable, python()}, [
        :binary,
        {:line, 10_000_000},
        args: ["-c", @factory, Integer.to_string(n), mode, marker]
      ])

    pids =
      receive do
        {^port, {:data, {:eol, line}}} -> line |> String.split() |> Enum.map(&String.to_integer/1)
      after
        120_000 -> raise "factory did not start"
      end

    {port, pids}
  end

  def orphans(n, marker) do
    {_port, pids} = spawn_processes(n, "orphans", marker)
    # Until every child is re-parented, some are still children of the exiting factory.
    wait_until(fn -> length(OrphanDetector.find_orphaned_processes(pattern: marker)) == n end)
    pids
  end

  def wait_until(fun, deadline \\ System.monotonic_time(:millisecond) + 30_000) do
    cond do
      fun.() -> :ok
      System.monotonic_time(:millisecond) > deadline -> raise "timed out"
      true -> Process.sleep(20) && wait_until(fun, deadline)
    end
  end

  def alive?(pid), do: File.exists?("/proc/#{pid}") and not zombie?(pid)

  defp zombie?(pid) do
    case File.read("/proc/#{pid}/stat") do
      {:ok, stat} -> stat =~ ~r/\) [ZX] /
      _ -> true
    end
  end

  def fmt_us(us) when us >= 1_000_000, do: "#{Float.round(us / 1_000_000, 2)} s"
  def fmt_us(us) when us >= 1_000, do: "#{Float.round(us / 1_000, 2)} ms"
  def fmt_us(us), do: "#{Float.round(us / 1, 2)} µs"

  def ratio(base, ours) when ours > 0, do: "#{Float.round(base / ours, 1)}x"
  def ratio(_, _), do: "-"
end

defmodule Bench.RefRegistry do
  @moduledoc false
  # The reference's registry: a named public ETS set, {id, %{...}} entries.
  def new(name), do: :ets.new(name, [:set, :public, :named_table, read_concurrency: true])

  def register(t, id, pid, py, fp),
    do:
      :ets.insert(
        t,
        {id,
         %{
           elixir_pid: pid,
           python_pid: py,
           fingerprint: fp,
           registered_at: System.system_time(:second)
         }}
      )

  def lookup(t, id), do: :ets.lookup(t, id)
  def unregister(t, id), do: :ets.delete(t, id)

  def active_python_pids(t) do
    :ets.tab2list(t)
    |> Enum.filter(fn {_id, %{elixir_pid: pid}} -> Process.alive?(pid) end)
    |> Enum.map(fn {_id, %{python_pid: py}} -> py end)
    |> Enum.filter(&(&1 != nil))
  end
end

rows = []
add = fn rows, row -> rows ++ [row] end
marker = "dspy_bridge_bench_#{System.pid()}_#{System.unique_integer([:positive])}.py"
IO.puts("dspex_process benchmarks (marker #{marker})")

# --- 1. Registry --------------------------------------------------------------------------
n = 10_000
{:ok, _} = ProcessRegistry.start_link(name: :bench_registry, cleanup_interval: :infinity)
sleeper = Port.open({:spawn_executable, System.find_executable("sleep")}, args: ["600"])
{:os_pid, py} = Port.info(sleeper, :os_pid)
owners = for _ <- 1..n, do: spawn(fn -> receive do: (:stop -> :ok) end)
ids = for i <- 1..n, do: "worker_#{i}"
pairs = Enum.zip(ids, owners)
fp = "dspex_worker_bench_1795690000000000000_123456"
ets = Bench.RefRegistry.new(:bench_ets)

reg_ours =
  Bench.per_op_us(pairs, 100, fn {id, o} ->
    :ok = ProcessRegistry.register_worker(id, o, py, fp, :bench_registry)
  end)

reg_ets =
  Bench.per_op_us(pairs, 100, fn {id, o} -> Bench.RefRegistry.register(ets, id, o, py, fp) end)

look_ours =
  Bench.per_op_us(ids, 100, fn id ->
    {:ok, _} = ProcessRegistry.get_worker_info(id, :bench_registry)
  end)

look_ets = Bench.per_op_us(ids, 100, fn id -> [_] = Bench.RefRegistry.lookup(ets, id) end)

active_ours =
  Bench.median_us(21, fn -> ProcessRegistry.get_active_python_pids(:bench_registry) end)

active_ets = Bench.median_us(21, fn -> Bench.RefRegistry.active_python_pids(ets) end)

unreg_ours =
  Bench.per_op_us(ids, 100, fn id ->
    :ok = ProcessRegistry.unregister_worker(id, :bench_registry)
  end)

unreg_ets = Bench.per_op_us(ids, 100, fn id -> Bench.RefRegistry.unregister(ets, id) end)

# Memory: RSS growth minus the VM's own growth, for 50,000 entries in a fresh registry.
mem_n = 50_000
mem_owners = for _ <- 1..mem_n, do: spawn(fn -> receive do: (:stop -> :ok) end)
{:ok, _} = ProcessRegistry.start_link(name: :bench_mem, cleanup_interval: :infinity)
:erlang.garbage_collect()
{rss0, vm0} = {Bench.rss_bytes(), :erlang.memory(:total)}

Enum.with_index(mem_owners, fn o, i ->
  :ok = ProcessRegistry.register_worker("worker_#{i}", o, py, fp, :bench_mem)
end)

:erlang.garbage_collect()
{rss1, vm1} = {Bench.rss_bytes(), :erlang.memory(:total)}
native_bytes = max(rss1 - rss0 - (vm1 - vm0), 0) / mem_n
ets_mem = :ets.new(:bench_ets_mem, [:set, :public])

Enum.with_index(mem_owners, fn o, i ->
  Bench.RefRegistry.register(ets_mem, "worker_#{i}", o, py, fp)
end)

ets_bytes = :ets.info(ets_mem, :memory) * :erlang.system_info(:wordsize) / mem_n
Enum.each(mem_owners ++ owners, &send(&1, :stop))
Port.close(sleeper)

rows =
  rows
  |> add.([
    "registry register (median/op)",
    Bench.fmt_us(reg_ours),
    Bench.fmt_us(reg_ets),
    Bench.ratio(reg_ets, reg_ours),
    "<= 2 µs",
    reg_ours <= 2.0,
    "ours also reads /proc/PID/stat for the start time"
  ])
  |> add.([
    "registry lookup (median/op)",
    Bench.fmt_us(look_ours),
    Bench.fmt_us(look_ets),
    Bench.ratio(look_ets, look_ours),
    "<= 2 µs",
    look_ours <= 2.0,
    ""
  ])
  |> add.([
    "registry unregister (median/op)",
    Bench.fmt_us(unreg_ours),
    Bench.fmt_us(unreg_ets),
    Bench.ratio(unreg_ets, unreg_ours),
    "<= 2 µs",
    unreg_ours <= 2.0,
    ""
  ])
  |> add.([
    "get_active_python_pids, 10k entries",
    Bench.fmt_us(active_ours),
    Bench.fmt_us(active_ets),
    Bench.ratio(active_ets, active_ours),
    ">= 2x faster",
    active_ets / active_ours >= 2,
    ""
  ])
  |> add.([
    "memory per entry (50k entries)",
    "#{round(native_bytes)} B",
    "#{round(ets_bytes)} B",
    Bench.ratio(ets_bytes, native_bytes),
    "<= 256 B",
    native_bytes <= 256,
    "native: RSS growth minus VM growth"
  ])

IO.puts("registry rows done")

# --- 2. Scan ------------------------------------------------------------------------------
script = Path.join(System.tmp_dir!(), marker)
File.cp!(Worker.default_script(), script)

{factory, extra} =
  Bench.spawn_processes(1000, "background", "dspex_bench_background_#{System.pid()}")

workers =
  for i <- 1..20,
      do:
        elem(
          Worker.start_link(
            worker_id: "bench_#{i}",
            script: script,
            python: Bench.python(),
            registry: :bench_registry
          ),
          1
        )

Enum.each(workers, &({:ok, "pong"} = Worker.call(&1, "ping")))
host_procs = length(Path.wildcard("/proc/[0-9]*"))
ref_active = Enum.map(workers, &Worker.os_pid/1)

ref_scan = fn ->
  # The reference: pgrep -f, then per pid: exists, cmdline check, not a zombie, not active.
  {out, _} = System.cmd("pgrep", ["-f", marker])
  pids = out |> String.split() |> Enum.map(&String.to_integer/1)

  for pid <- pids -- ref_active,
      File.exists?("/proc/#{pid}"),
      {:ok, cmd} = File.read("/proc/#{pid}/cmdline"),
      String.contains?(cmd, marker),
      {:ok, stat} = File.read("/proc/#{pid}/stat"),
      not (stat =~ ~r/\) Z /),
      do: pid
end

scan_ours =
  Bench.median_us(21, fn -> [] = OrphanDetector.find_orphaned_processes(pattern: marker) end)

scan_ref = Bench.median_us(11, fn -> ref_scan.() end)
Enum.each(workers, &GenServer.stop/1)
Port.close(factory)
Bench.wait_until(fn -> not Enum.any?(extra, &Bench.alive?/1) end)

rows =
  add.(rows, [
    "find_orphaned_processes, #{host_procs} processes on host",
    Bench.fmt_us(scan_ours),
    Bench.fmt_us(scan_ref),
    Bench.ratio(scan_ref, scan_ours),
    "<= 20 ms, >= 10x",
    scan_ours <= 20_000 and scan_ref / scan_ours >= 10,
    "baseline: pgrep -f + per-pid /proc checks"
  ])

IO.puts("scan row done")

# --- 3 & 4. Cleanup and scheduler health ----------------------------------------------------
grace = 500

serial_10 =
  (fn ->
     pids = Bench.orphans(10, marker)

     {t, _} =
       :timer.tc(fn ->
         for pid <- pids do
           {_, 0} = System.cmd("kill", ["-TERM", "#{pid}"])
           Process.sleep(1000)
           if Bench.alive?(pid), do: System.cmd("kill", ["-KILL", "#{pid}"])
         end
       end)

     Bench.wait_until(fn -> not Enum.any?(pids, &Bench.alive?/1) end)
     t
   end).()

rows =
  Enum.reduce([20, 100, 500], rows, fn count, rows ->
    pids = Bench.orphans(count, marker)
    parent = self()

    ticker =
      spawn(fn ->
        tick = fn tick, worst ->
          t0 = System.monotonic_time(:microsecond)

          receive do
            {:stop, from} -> send(from, {:worst, worst})
          after
            1 -> tick.(tick, max(worst, System.monotonic_time(:microsecond) - t0 - 1_000))
          end
        end

        tick.(tick, 0)
      end)

    :erlang.system_monitor(parent, [{:long_schedule, 5}])

    {t, report} =
      :timer.tc(fn ->
        OrphanDetector.cleanup_orphaned_processes(pattern: marker, grace_ms: grace)
      end)

    :erlang.system_monitor(:undefined)
    send(ticker, {:stop, parent})
    worst = receive do: ({:worst, w} -> w)

    long =
      Stream.repeatedly(fn ->
        receive do: ({:monitor, _, :long_schedule, info} -> info), after: (0 -> nil)
      end)
      |> Enum.take_while(&(&1 != nil))

    ours_long = Enum.count(long, &(inspect(&1) =~ "DSPex.Python.Native"))
    true = report.found == count and report.terminated == count and report.errors == 0
    false = Enum.any?(pids, &Bench.alive?/1)
    extrapolated = serial_10 / 10 * count

    rows =
      add.(rows, [
        "cleanup #{count} orphans (half ignore TERM), grace #{grace} ms",
        Bench.fmt_us(t),
        Bench.fmt_us(extrapolated) <> " (est.)",
        Bench.ratio(extrapolated, t),
        "<= grace + 300 ms",
        t <= (grace + 300) * 1000,
        "baseline: serial TERM, sleep 1 s, KILL; measured for 10, scaled to #{count}"
      ])

    if count == 500 do
      add.(rows, [
        "scheduler health during the 500 cleanup",
        "worst 1 ms-tick delay #{Bench.fmt_us(worst)}",
        "#{length(long)} long_schedule events (all)",
        "-",
        "< 5 ms, no NIF long_schedule",
        worst < 5_000 and ours_long == 0,
        "#{ours_long} long_schedule events from our NIFs"
      ])
    else
      rows
    end
  end)

IO.puts("cleanup rows done")

# --- 5. Worker start ------------------------------------------------------------------------
python = Bench.python()

start_time = fn opts ->
  Bench.median_us(15, fn ->
    {:ok, w} =
      Worker.start_link(
        [worker_id: make_ref(), script: script, python: python, registry: :bench_registry] ++ opts
      )

    send(self(), {:started, w})
  end)
  |> tap(fn _ -> for _ <- 1..15, do: receive(do: ({:started, w} -> GenServer.stop(w))) end)
end

unguarded = start_time.(guard: false)
guarded = start_time.(guard: true)

bare =
  Bench.median_us(15, fn ->
    port =
      Port.open({:spawn_executable, python}, [
        :binary,
        {:packet, 4},
        args: [script, "--mode", "pool-worker"]
      ])

    {:os_pid, _} = Port.info(port, :os_pid)
    send(self(), {:port, port})
  end)

for _ <- 1..15, do: receive(do: ({:port, p} -> Port.close(p)))

{reg_port, reg_os} =
  (fn ->
     p = Port.open({:spawn_executable, python}, args: [script])
     {:os_pid, o} = Port.info(p, :os_pid)
     {p, o}
   end).()

register_alone =
  Bench.median_us(101, fn ->
    :ok = ProcessRegistry.register_worker(:one, self(), reg_os, fp, :bench_registry)
  end)

Port.close(reg_port)
File.rm(script)

rows =
  rows
  |> add.([
    "Worker.start_link, unguarded",
    Bench.fmt_us(unguarded),
    Bench.fmt_us(bare) <> " (bare Port)",
    "+" <> Bench.fmt_us(unguarded - bare),
    "registration < 1 ms",
    register_alone < 1_000,
    "register_worker alone: #{Bench.fmt_us(register_alone)}"
  ])
  |> add.([
    "Worker.start_link, guarded (PDEATHSIG)",
    Bench.fmt_us(guarded),
    Bench.fmt_us(bare) <> " (bare Port)",
    "+" <> Bench.fmt_us(guarded - bare),
    "-",
    true,
    "the guard adds one exec of dspex-proc"
  ])

# --- the table ------------------------------------------------------------------------------
cpu =
  "/proc/cpuinfo"
  |> File.read!()
  |> then(&Regex.run(~r/model name\s*:\s*(.*)/, &1))
  |> then(&((&1 && Enum.at(&1, 1)) || "unknown CPU"))

{kernel, 0} = System.cmd("uname", ["-r"])

IO.puts("""

Machine: #{System.schedulers_online()} cores, #{cpu}, Linux #{String.trim(kernel)}, OTP #{System.otp_release()}, Elixir #{System.version()}
Command: mix run bench/run.exs

| row | ours | baseline | ratio | target | met | note |
|---|---|---|---|---|---|---|\
""")

for [name, ours, base, ratio, target, met, note] <- rows do
  IO.puts(
    "| #{name} | #{ours} | #{base} | #{ratio} | #{target} | #{if met, do: "yes", else: "**no**"} | #{note} |"
  )
end
