#!/usr/bin/env python3
"""Synchronization objects: fmap against its peers, one run.

    python benchmarks/sync.py [--quick] [--spin US] [--json PATH]

a. uncontended acquire + release, in one process: fmap.Mutex and
   fmap.Semaphore against threading.Lock, multiprocessing.Lock and
   posix_ipc.Semaphore (the same loop over bound methods for all).
b. cross-process ping-pong round trip: this process signals, a forked partner
   answers, n times: two fmap auto-reset Events (sleeping waits, then with
   `spin`), against os.pipe, multiprocessing.Pipe and two posix_ipc
   semaphores.

Each row is the median over --rounds timed rounds (7; 3 with --quick, after
one warm-up round) of the per-operation time of a round; the implementations
of a section run interleaved round by round (benchmarks/_common.py).  Ratios
are against threading.Lock for a and os.pipe for b (lower is faster).
Targets (issue 3): a under 0.150 µs for fmap; b no slower than os.pipe when
sleeping and under 5 µs with spin.  Figures depend on the machine's load:
a ping-pong needs both processes on a CPU at once.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

fmap, FMAP_STATUS = C.optional_import("fmap")
posix_ipc, PIPC_STATUS = C.optional_import("posix_ipc")


# ------------------------------------------------------------ a. uncontended

def _acquire_release(make, close=None):
    """A Case body factory: n acquire+release pairs over bound methods."""
    def setup(n):
        return make()

    def body(obj, n):
        acq, rel = obj.acquire, obj.release
        for _ in range(n):
            acq()
            rel()

    def cleanup(obj, failed):
        if close is not None:
            close(obj)
    return setup, body, cleanup


def _with_block(make, close):
    def body(obj, n):
        for _ in range(n):
            with obj:
                pass
    return (lambda n: make()), body, (lambda obj, failed: close(obj))


def _posix_sem():
    name = "/" + C.unique_names("sem", 1)[0]
    s = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=1)
    s.unlink()       # the open semaphore stays usable
    return s


def uncontended_cases():
    cases = []

    def add(impl, status, factory, note=""):
        if status != C.OK:
            cases.append(C.Case(impl, status=status))
            return
        setup, body, cleanup = factory()
        cases.append(C.Case(impl, body=body, setup=setup, cleanup=cleanup, note=note))

    add("fmap.Mutex", FMAP_STATUS,
        lambda: _acquire_release(lambda: fmap.Mutex.create(None), lambda m: m.close()))
    add("fmap.Mutex (with)", FMAP_STATUS,
        lambda: _with_block(lambda: fmap.Mutex.create(None), lambda m: m.close()))
    add("fmap.Semaphore", FMAP_STATUS,
        lambda: _acquire_release(lambda: fmap.Semaphore.create(None, 1, 1),
                                 lambda s: s.close()))
    add("threading.Lock", C.OK, lambda: _acquire_release(threading.Lock))
    add("threading.Lock (with)", C.OK, lambda: _with_block(threading.Lock, lambda l: None))
    add("threading.RLock", C.OK, lambda: _acquire_release(threading.RLock))
    add("multiprocessing.Lock", C.OK, lambda: _acquire_release(multiprocessing.Lock))
    add("posix_ipc.Semaphore", PIPC_STATUS,
        lambda: _acquire_release(_posix_sem, lambda s: s.close()))
    return cases


# ------------------------------------------------------------ b. ping-pong

def _partner(fn, n):
    """Fork a process that runs fn(n) and exits; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(n)
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid, failed):
    deadline = time.monotonic() + (1 if failed else 30)
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.waitstatus_to_exitcode(status) != 0 and not failed:
                raise RuntimeError("ping-pong partner failed")
            return
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def pingpong_case(impl, status, make, note=""):
    """make() -> (state, ping(n) run here, pong(n) run by the partner, close)."""
    if status != C.OK:
        return C.Case(impl, status=status)

    def setup(n):
        state, ping, pong, close = make()
        return state, ping, close, _partner(pong, n)

    def body(st, n):
        st[1](n)

    def cleanup(st, failed):
        _reap(st[3], failed)
        st[2]()
    return C.Case(impl, body=body, setup=setup, cleanup=cleanup, note=note)


def _fmap_events(spin):
    def make():
        a, b = fmap.Event.create(None), fmap.Event.create(None)
        wa, wb = a.wait, b.wait

        def ping(n):
            for _ in range(n):
                a.set()
                wb(None, spin=spin)

        def pong(n):
            for _ in range(n):
                wa(None, spin=spin)
                b.set()
        return None, ping, pong, lambda: (a.close(), b.close())
    return make


def _os_pipe():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    read, write = os.read, os.write

    def ping(n):
        for _ in range(n):
            write(w1, b"x")
            read(r2, 1)

    def pong(n):
        for _ in range(n):
            read(r1, 1)
            write(w2, b"x")

    def close():
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    return None, ping, pong, close


def _mp_pipe():
    here, there = multiprocessing.Pipe()

    def ping(n):
        send, recv = here.send_bytes, here.recv_bytes
        for _ in range(n):
            send(b"x")
            recv()

    def pong(n):
        send, recv = there.send_bytes, there.recv_bytes
        for _ in range(n):
            recv()
            send(b"x")
    return None, ping, pong, lambda: (here.close(), there.close())


def _posix_sems():
    a, b = _posix_sem(), _posix_sem()
    a.acquire()
    b.acquire()        # both start at 0

    def ping(n):
        rel, acq = a.release, b.acquire
        for _ in range(n):
            rel()
            acq()

    def pong(n):
        rel, acq = b.release, a.acquire
        for _ in range(n):
            acq()
            rel()
    return None, ping, pong, lambda: (a.close(), b.close())


def pingpong_cases(spin):
    return [
        pingpong_case("fmap.Event x2", FMAP_STATUS, _fmap_events(None) if fmap else None),
        pingpong_case(f"fmap.Event x2, spin={spin:g}us", FMAP_STATUS,
                      _fmap_events(spin) if fmap else None),
        pingpong_case("os.pipe x2", C.OK, _os_pipe),
        pingpong_case("multiprocessing.Pipe", C.OK, _mp_pipe),
        pingpong_case("posix_ipc.Semaphore x2", PIPC_STATUS, _posix_sems if posix_ipc else None),
    ]


def main():
    p = C.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--spin", type=float, default=50.0,
                   help="fmap's spin before sleeping in the spinning ping-pong, µs (default 50)")
    args = p.parse_args()
    rounds = C.rounds_for(args)
    print(f"sync benchmark: {rounds} rounds; {C.environment()}", file=sys.stderr)
    rows_a = C.run_cases("uncontended acquire+release", uncontended_cases(),
                         C.ops_for(args, 1_000_000, 200_000), rounds)
    rows_b = C.run_cases("ping-pong round trip", pingpong_cases(args.spin),
                         C.ops_for(args, 5_000, 1_000), rounds)
    print(C.format_table(rows_a, "threading.Lock", title="a. uncontended acquire + release"))
    print("\nin ns: " + ", ".join(f"{r.impl} {r.median_us * 1000:.0f}"
                                  for r in rows_a if r.median_us is not None))
    print()
    print(C.format_table(rows_b, "os.pipe x2", title="b. cross-process ping-pong round trip"))
    if args.json:
        C.write_json(args.json, rows_a + rows_b, meta={"rounds": rounds, "spin_us": args.spin})


if __name__ == "__main__":
    main()
