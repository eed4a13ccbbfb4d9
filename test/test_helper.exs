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

# No cgroup may be left behind by the suite: every per-VM cgroup (cgroup2, and cgroup v1 on a
# hybrid host) of a VM started during this run whose VM is gone must have been removed (this VM's own is checked by scripts/test.sh
# after this VM exits).
suite_start = File.read!("/proc/self/stat") |> String.split(") ") |> List.last()
suite_start = suite_start |> String.split() |> Enum.at(19) |> String.to_integer()

defmodule DSPexProcess.Test.CgroupLeftovers do
  @moduledoc false
  # Per-VM cgroups of VMs started during the suite that are dead, and empty leaves of this
  # VM's own. A VM still running (another suite on a shared machine) is not judged; a dead
  # VM's guard may still be at work (it waits its turn behind other terminations on the
  # host), so this is polled for a while.
  def find(mounts, suite_start) do
    me = String.to_integer(System.pid())

    for mount <- mounts,
        dir <- Path.wildcard(Path.join(mount, "**/dspex-*-*-*")),
        [_, pid, start] <- [Regex.run(~r/dspex-\d+-(\d+)-(\d+)$/, dir)],
        start = String.to_integer(start),
        start >= suite_start,
        pid = String.to_integer(pid),
        leftover?(dir, pid, start, me),
        do: dir
  end

  # This VM's own cgroup is judged by scripts/test.sh once this VM has exited (its guard
  # removes it then); here, the cgroups of the VMs the suite started and killed.
  defp leftover?(_dir, pid, start, me) do
    pid != me and DSPexProcess.Native.process_start_time(pid) != {:ok, start}
  end

  def await(mount, suite_start, tries) do
    case find(mount, suite_start) do
      [] -> []
      left when tries <= 0 -> left
      _ -> Process.sleep(100) && await(mount, suite_start, tries - 1)
    end
  end
end

ExUnit.after_suite(fn _ ->
  # The cgroup2 hierarchy and, on a hybrid host, the v1 hierarchies of the limit
  # controllers, which hold per-VM cgroups named the same way.
  caps = DSPexProcess.Native.capabilities()
  mounts = Enum.uniq(List.wrap(caps.cgroup2_mount) ++ Map.values(caps.cgroup_v1_mounts))
  leftovers = DSPexProcess.Test.CgroupLeftovers.await(mounts, suite_start, 200)

  unless leftovers == [] do
    IO.puts(:stderr, "cgroups left behind by the suite: #{inspect(leftovers)}")
    System.at_exit(fn _ -> exit({:shutdown, 1}) end)
  end
end)

# This machine may be shared: the detector's pass over dead VMs' cgroups is host-wide, so
# it is off unless a test turns it on for cgroups it made itself.
Application.put_env(:dspex_process, :detector, cgroups: false)
System.put_env("DSPEX_PROC_NO_CGROUPS", "1")

ExUnit.start(exclude: exclude)
