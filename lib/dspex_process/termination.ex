defmodule DSPexProcess.Termination do
  # Runs the native terminator and waits for its answer in the calling process. The
  # terminator works on an OS thread of its own, so a grace period of seconds never holds a
  # BEAM scheduler, normal or dirty.
  @moduledoc false

  alias DSPexProcess.Native

  @type target :: {integer(), non_neg_integer()}
  @type outcome ::
          {:ok, :graceful | :force_killed | :already_gone} | {:error, term()}

  @doc """
  Terminates `targets` (`{os_pid, start_time}`) in parallel: SIGTERM, one shared `grace_ms`,
  SIGKILL, `kill_wait_ms`. One outcome per target, in order.
  """
  @spec run([target()], keyword()) :: [outcome()]
  def run([], _opts), do: []

  def run(targets, opts) do
    grace = Keyword.fetch!(opts, :grace_ms)
    kill_wait = Keyword.fetch!(opts, :kill_wait_ms)
    tag = System.unique_integer([:positive])

    options = %{
      grace_ms: grace,
      kill_wait_ms: kill_wait,
      kill_group: Keyword.get(opts, :kill_group, true),
      allow_other_users: Keyword.get(opts, :allow_other_users, false)
    }

    :ok = Native.terminate_start(targets, options, tag)

    # The thread always answers within grace + kill_wait plus a few /proc reads per target.
    receive do
      {:dspex_terminated, ^tag, outcomes} -> outcomes
    after
      grace + kill_wait + 60_000 ->
        raise "dspex_process: the native terminator did not answer for #{length(targets)} targets"
    end
  end
end
