"""Makes many real processes at once, for tests and benchmarks (stdlib only).

    python3 orphan_factory.py N MODE MARKER

Forks N children whose argv (this one's) contains MARKER, prints their pids on one line,
then:
  MODE=orphans     exits, so the children are re-parented: real orphans. Each child leads
                   its own session, like a port program; odd ones ignore SIGTERM.
  MODE=background  waits for stdin to close; the children die with it (PR_SET_PDEATHSIG).
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def child(index, mode):
    if mode == "orphans":
        os.setsid()
        if index % 2 == 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    while True:
        signal.pause()


def main():
    count, mode = int(sys.argv[1]), sys.argv[2]
    pids = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            child(index, mode)
        pids.append(pid)
    print(" ".join(map(str, pids)), flush=True)
    if mode == "orphans":
        os._exit(0)
    sys.stdin.read()


if __name__ == "__main__":
    main()
