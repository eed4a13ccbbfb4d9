#!/usr/bin/env python3
"""Stand-in for the DSPex Python bridge (stdlib only), for the demo and the tests.

It speaks the Port protocol of the real bridge's pool workers: each message on stdin and
stdout is a 4-byte big-endian length followed by the payload ({:packet, 4}). Requests are
short UTF-8 commands:

    ping            -> pong
    echo TEXT       -> TEXT
    pid             -> this process's pid
    children        -> the pids of the children it forked, space separated
    env NAME        -> the value of an environment variable ("" when unset)
    escaped         -> the pid of the process --spawn-escaper left behind ("" without it)
    alloc MIB       -> allocates (and touches) MIB mebibytes, a mebibyte at a time, and
                       keeps them: "allocated MIB" (a memory limit kills it first)
    fork N          -> forks N children that sleep while it lives: "forked K" when all
                       came, "forked K ERRNO-NAME" when fork failed after K (EAGAIN: a
                       pids limit)

Flags:
    --mode MODE          accepted for compatibility (pool-worker)
    --ignore-sigterm     ignore SIGTERM (only SIGKILL ends it)
    --linger             keep running after stdin closes, as the old DSPex bridge did:
                         this is how its orphans were born
    --spawn-children N   fork N children into the same process group; they exit when
                         the parent is gone unless the parent lingers
    --spin-on-eof        busy-loop at 100% CPU once stdin closes, as DSPex's real bridge
                         does: its leak, for tests of an unmodified client
    --spawn-escaper      fork a child that calls setsid() and forks again, then exits: the
                         grandchild (re-parented, in a session and group of its own) execs
                         `sleep 3600`, an argv that matches no pattern. What daemonizing
                         code does; only a cgroup keeps track of it
"""

import argparse
import errno
import os
import signal
import struct
import sys
import time


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="pool-worker")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--linger", action="store_true")
    parser.add_argument("--spawn-children", type=int, default=0, metavar="N")
    parser.add_argument("--spin-on-eof", action="store_true")
    parser.add_argument("--spawn-escaper", action="store_true")
    # Extra arguments (e.g. a unique test marker) are accepted and ignored.
    args, _unknown = parser.parse_known_args(argv)
    return args


def child_loop(parent):
    # Stay while the parent that forked us lives; a lingering parent keeps us alive too.
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(0)


def spawn_children(count):
    pids = []
    parent = os.getpid()
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            child_loop(parent)
        pids.append(pid)
    return pids


def spawn_escaper():
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.close(read_end)
        os.setsid()
        if os.fork() == 0:
            os.write(write_end, str(os.getpid()).encode())
            # The pipe is close-on-exec: the reader sees EOF once the exec is done.
            os.execvp("sleep", ["sleep", "3600"])
        os._exit(0)
    os.close(write_end)
    pid = b""
    while True:
        chunk = os.read(read_end, 32)
        if not chunk:
            break
        pid += chunk
    os.close(read_end)
    os.wait()
    return pid.decode()


def read_exact(stream, size):
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


HELD = []


def allocate(mib):
    for _ in range(mib):
        HELD.append(b"\x01" * (1 << 20))
    return "allocated %d" % mib


def fork_many(count):
    parent = os.getpid()
    forked = 0
    try:
        for _ in range(count):
            if os.fork() == 0:
                child_loop(parent)
            forked += 1
    except OSError as error:
        return "forked %d %s" % (forked, errno.errorcode.get(error.errno, error.errno))
    return "forked %d" % forked


def answer(request, children, escaped=""):
    command, _, rest = request.decode("utf-8", "replace").partition(" ")
    if command == "ping":
        return "pong"
    if command == "echo":
        return rest
    if command == "pid":
        return str(os.getpid())
    if command == "children":
        return " ".join(str(p) for p in children)
    if command == "env":
        return os.environ.get(rest, "")
    if command == "escaped":
        return escaped
    if command == "alloc":
        return allocate(int(rest))
    if command == "fork":
        return fork_many(int(rest))
    return "error: unknown command " + command


def serve(children, escaped=""):
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = read_exact(stdin, 4)
        if header is None:
            return
        (length,) = struct.unpack(">I", header)
        request = read_exact(stdin, length)
        if request is None:
            return
        reply = answer(request, children, escaped).encode("utf-8")
        stdout.write(struct.pack(">I", len(reply)) + reply)
        stdout.flush()


def main():
    args = parse_args(sys.argv[1:])
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children = spawn_children(args.spawn_children)
    escaped = spawn_escaper() if args.spawn_escaper else ""
    serve(children, escaped)
    if args.spin_on_eof:
        while True:
            pass
    if args.linger:
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
