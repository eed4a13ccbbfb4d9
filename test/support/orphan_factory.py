"""Makes many real processes at once, for tests and benchmarks (stdlib only).

    python3 orphan_factory.py N MODE MARKER

Forks N children whose argv (this one's) contains MARKER, prints their pids on one line,
then:
  MODE=orphans     exits, so the children are re-parented: real orphans. Each child leads
                   its own session, like a port program; odd ones ignore SIGTERM. The
                   factory first runs itself again as a script *named* MARKER (a symlink
                   in a temporary folder, removed once the children exist), so that MARKER
                   is the script the children's interpreter runs: what the detector asks
                   of a process without ownership markers.
  MODE=background  waits for stdin to close; the children die with it (PR_SET_PDEATHSIG).
"""

import ctypes
import os
import shutil
import signal
import sys
import tempfile

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


def run_as_marker(marker):
    folder = tempfile.mkdtemp(prefix="dspex_factory_")
    link = os.path.join(folder, marker)
    os.symlink(os.path.abspath(sys.argv[0]), link)
    os.execv(sys.executable, [sys.executable, link] + sys.argv[1:])


def main():
    count, mode = int(sys.argv[1]), sys.argv[2]
    marker = sys.argv[3] if len(sys.argv) > 3 else None
    if mode == "orphans" and marker and os.path.basename(sys.argv[0]) != marker:
        run_as_marker(marker)
    pids = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            child(index, mode)
        pids.append(pid)
    if mode == "orphans" and marker:
        shutil.rmtree(os.path.dirname(sys.argv[0]), ignore_errors=True)
    print(" ".join(map(str, pids)), flush=True)
    if mode == "orphans":
        os._exit(0)
    sys.stdin.read()


if __name__ == "__main__":
    main()
