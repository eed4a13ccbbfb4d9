# The containment tests need cgroups this user can create (root here, or a delegated
# subtree); elsewhere they are excluded, and the reason is printed.
containment = DSPexProcess.Guardian.containment()

exclude =
  if containment.mode == :cgroup do
    []
  else
    IO.puts("cgroup containment tests excluded: #{containment.reason}")
    [:cgroup]
  end

# No cgroup may be left behind by the suite: every per-VM cgroup of a VM started during this
# run whose VM is gone must have been removed, and this VM's own must hold no empty leaf.
suite_start = File.read!("/proc/self/stat") |> String.split(") ") |> List.last()
suite_start = suite_start |> String.split() |> Enum.at(19) |> String.to_integer()

ExUnit.after_suite(fn _ ->
  mount = DSPexProcess.Native.capabilities().cgroup2_mount

  leftovers =
    if mount do
      for dir <- Path.wildcard(Path.join(mount, "**/dspex-*-*-*")),
          [_, pid, start] <- [Regex.run(~r/dspex-\d+-(\d+)-(\d+)$/, dir)],
          String.to_integer(start) >= suite_start,
          pid = String.to_integer(pid),
          DSPexProcess.Native.process_start_time(pid) != {:ok, String.to_integer(start)} or
            Path.wildcard(Path.join(dir, "w-*")) != [],
          do: dir
    else
      []
    end

  unless leftovers == [] do
    IO.puts(:stderr, "cgroups left behind by the suite: #{inspect(leftovers)}")
    System.at_exit(fn _ -> exit({:shutdown, 1}) end)
  end
end)

ExUnit.start(exclude: exclude)
