#!/usr/bin/env python3
"""Lifecycle costs of named shared memory: fmap against its peers, one run.

    python benchmarks/lifecycle.py [--quick] [--json PATH]

a. create + map + close of a fresh named 1 MiB object (a new name each time;
   for POSIX peers "close" includes the unlink that a Windows-model object
   does not need).
b. attach to an existing named 1 MiB object: open by name + map + close.
c. attach to a 256 MiB object that ANOTHER process created (and filled) and
   get a NumPy uint8 array over all of it, then drop the array and close.
d. b, with the 1 MiB object created and held by ANOTHER process.

Each row is the median, over ``--rounds`` timed rounds (7; 3 with --quick)
after one warm-up round, of the per-operation time of a round of many
operations; the implementations of a section run interleaved, round by round.  Ratios are against the raw /dev/shm system calls for a and b and
against SharedArray for c (lower is faster).  Peers that are not installed
are reported as such.

Notes on fairness:
* multiprocessing.shared_memory on Python < 3.13 registers every attach with
  the resource tracker (one pipe write per open; CPython gh-82300); the cost
  is part of what users pay and is included.  The benchmark keeps the tracker
  consistent (every name it registers is unregistered), so it warns about
  nothing at exit.
* Every object created is removed even on error or Ctrl-C: POSIX names are
  unlinked in ``finally`` blocks and a last sweep removes anything under
  /dev/shm that carries this run's prefix.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import select
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SHM_DIR = "/dev/shm"
SMALL = 1 << 20
BIG_DEFAULT_MIB = 256
RAW = "raw /dev/shm"
SA = "SharedArray"
FILL = 1  # byte value helpers write into the big objects

# The fmap import is allowed to fail (package not built yet): rows say so.
fmap, FMAP_STATUS = C.optional_import("fmap")
np, NP_STATUS = C.optional_import("numpy")
posix_ipc, PIPC_STATUS = C.optional_import("posix_ipc")
SharedArray, SA_STATUS = C.optional_import("SharedArray")
if np is None and SA_STATUS == C.OK:  # SharedArray is useless without numpy
    SharedArray, SA_STATUS = None, NP_STATUS
from multiprocessing import resource_tracker, shared_memory  # noqa: E402

SharedMemory = shared_memory.SharedMemory
RUN_PREFIX = f"fmb{os.getpid()}_"


# ---------------------------------------------------------------- cleanup utils

def _shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _unlink_quiet(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _sweep_paths(names, *, via_shared_memory=False) -> int:
    """Remove whatever is left of ``names`` in /dev/shm; return how many.

    For names made by multiprocessing.shared_memory the removal goes through
    SharedMemory.unlink so that the resource tracker's registry stays in step.
    """
    left = 0
    for name in names:
        path = _shm_path(name)
        if not os.path.exists(path):
            continue
        left += 1
        if via_shared_memory:
            try:
                s = SharedMemory(name=name)  # registers (again: a set)
                s.close()
                s.unlink()  # unregisters
                continue
            except Exception:
                pass
        _unlink_quiet(path)
    return left


def _cleanup_names(label, *, via_shared_memory=False):
    def cleanup(names, failed):
        left = _sweep_paths(names, via_shared_memory=via_shared_memory)
        if left and not failed:
            print(f"  warning: {label} left {left} objects in {SHM_DIR}", file=sys.stderr)
    return cleanup


def final_sweep() -> None:
    try:
        leftovers = [e for e in os.listdir(SHM_DIR) if e.startswith(RUN_PREFIX)]
    except OSError:
        return
    for e in leftovers:
        _unlink_quiet(_shm_path(e))
    if leftovers:
        print(f"  warning: removed {len(leftovers)} leftover objects from {SHM_DIR}",
              file=sys.stderr)


# ----------------------------------------------------- a. create + map + close

def bench_create(args, rounds):
    n = C.ops_for(args, 3000, 300)
    bench = f"a. create+map+close {SMALL >> 20} MiB"
    size = SMALL

    def names(n):
        return C.unique_names("a", n)

    # fmap: the memory and the name go away with the last handle / view.
    def fmap_body(names, n):
        create = fmap.create
        for name in names:
            m = create(name, size=size)
            v = m.map()
            v.close()
            m.close()

    def smem_body(names, n):
        for name in names:
            s = SharedMemory(name=name, create=True, size=size)
            s.close()
            s.unlink()

    def pipc_body(names, n):
        PSM, O_CREX = posix_ipc.SharedMemory, posix_ipc.O_CREX
        mm_ = mmap.mmap
        for name in names:
            p = PSM("/" + name, O_CREX, size=size)
            mm = mm_(p.fd, size)
            p.close_fd()
            mm.close()
            p.unlink()

    def sa_body(names, n):
        create, delete, u8 = SharedArray.create, SharedArray.delete, np.uint8
        for name in names:
            uri = "shm://" + name
            a = create(uri, size, dtype=u8)
            del a
            delete(uri)

    def raw_body(names, n):
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
        o_open, o_trunc, o_close, o_unlink, mm_ = (os.open, os.ftruncate, os.close,
                                                   os.unlink, mmap.mmap)
        prefix = SHM_DIR + "/"
        for name in names:
            path = prefix + name
            fd = o_open(path, flags, 0o600)
            o_trunc(fd, size)
            mm = mm_(fd, size)
            mm.close()
            o_close(fd)
            o_unlink(path)

    cases = [
        C.Case("fmap", fmap_body, FMAP_STATUS, setup=names),
        C.Case("shared_memory", smem_body, setup=names,
               cleanup=_cleanup_names("shared_memory", via_shared_memory=True)),
        C.Case("posix_ipc", pipc_body, PIPC_STATUS, setup=names,
               cleanup=_cleanup_names("posix_ipc")),
        C.Case(SA, sa_body, SA_STATUS, setup=names, cleanup=_cleanup_names(SA)),
        C.Case(RAW, raw_body, setup=names, cleanup=_cleanup_names(RAW)),
    ]
    return C.run_cases(bench, cases, n, rounds)


# ------------------------------------------------------ b. open + map + close

def bench_attach(args, rounds):
    n = C.ops_for(args, 5000, 500)
    bench = f"b. open+map+close {SMALL >> 20} MiB"
    size = SMALL
    cases = []
    failed = []

    def add(stack, impl, status, make):
        """``make(stack)`` creates the object (registering its removal on the
        stack) and returns the timed body."""
        if status != C.OK:
            cases.append(C.Case(impl, status=status))
            return
        try:
            cases.append(C.Case(impl, make(stack)))
        except Exception as e:
            failed.append(C.error_row(bench, impl, e))

    def fmap_make(stack):
        name = C.unique_names("b", 1)[0]
        m0 = fmap.create(name, size=size, exclusive=True)
        stack.callback(m0.close)

        def body(_, n):
            fopen = fmap.open
            for _ in range(n):
                m = fopen(name)
                v = m.map()
                v.close()
                m.close()
        return body

    # Each attach re-registers the same name with the resource tracker (a
    # set); the creator's unlink unregisters it once.
    def smem_make(stack):
        name = C.unique_names("b", 1)[0]
        s0 = SharedMemory(name=name, create=True, size=size)
        stack.callback(s0.unlink)
        stack.callback(s0.close)

        def body(_, n):
            for _ in range(n):
                s = SharedMemory(name=name)
                s.close()
        return body

    def pipc_make(stack):
        name = C.unique_names("b", 1)[0]
        pname = "/" + name
        stack.callback(_unlink_quiet, _shm_path(name))
        p0 = posix_ipc.SharedMemory(pname, posix_ipc.O_CREX, size=size)
        p0.close_fd()

        def body(_, n):
            PSM, mm_ = posix_ipc.SharedMemory, mmap.mmap
            for _ in range(n):
                p = PSM(pname)
                mm = mm_(p.fd, p.size)
                p.close_fd()
                mm.close()
        return body

    def sa_make(stack):
        name = C.unique_names("b", 1)[0]
        uri = "shm://" + name
        stack.callback(_unlink_quiet, _shm_path(name))
        a0 = SharedArray.create(uri, size, dtype=np.uint8)
        del a0

        def body(_, n):
            attach = SharedArray.attach
            for _ in range(n):
                a = attach(uri)
                del a
        return body

    def raw_make(stack):
        path = _shm_path(C.unique_names("b", 1)[0])
        stack.callback(_unlink_quiet, path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

        def body(_, n):
            o_open, o_fstat, o_close, mm_, flags = (os.open, os.fstat, os.close,
                                                    mmap.mmap, os.O_RDWR)
            for _ in range(n):
                fd = o_open(path, flags)
                mm = mm_(fd, o_fstat(fd).st_size)
                o_close(fd)
                mm.close()
        return body

    with contextlib.ExitStack() as stack:
        add(stack, "fmap", FMAP_STATUS, fmap_make)
        add(stack, "shared_memory", C.OK, smem_make)
        add(stack, "posix_ipc", PIPC_STATUS, pipc_make)
        add(stack, SA, SA_STATUS, sa_make)
        add(stack, RAW, C.OK, raw_make)
        rows = C.run_cases(bench, cases, n, rounds)
    return rows + failed


# ------------------------------- c. ndarray over an object made by another process

def helper_main(argv):
    """``lifecycle.py --helper IMPL NAME SIZE``: create NAME with IMPL, fill it,
    print "ready", wait for stdin EOF (the parent is done or dead), destroy it."""
    impl, name, size = argv[0], argv[1], int(argv[2])
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    keep = []
    cleanup = []
    try:
        if impl == "fmap":
            import fmap as fm
            m = fm.create(name, size=size, exclusive=True)
            keep.append(m)
            v = m.map()
            a = v.asarray("uint8")
            a[:] = FILL
            del a
            v.close()
            cleanup.append(m.close)
        elif impl == "shared_memory":
            import numpy as _np
            s = SharedMemory(name=name, create=True, size=size)
            cleanup.append(s.unlink)
            a = _np.ndarray((size,), _np.uint8, buffer=s.buf)
            a[:] = FILL
            del a
            s.close()
        elif impl == SA:
            import numpy as _np
            import SharedArray as _sa
            uri = "shm://" + name
            a = _sa.create(uri, size, dtype=_np.uint8)
            cleanup.append(lambda: _sa.delete(uri))
            a[:] = FILL
            del a
        elif impl in ("posix_ipc", RAW):
            if impl == "posix_ipc":
                import posix_ipc as _pi
                p = _pi.SharedMemory("/" + name, _pi.O_CREX, size=size)
                cleanup.append(p.unlink)
                fd = p.fd
            else:
                path = _shm_path(name)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                cleanup.append(lambda: os.unlink(path))
                os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
            os.close(fd)
            chunk = bytes([FILL]) * (1 << 20)
            while mm.tell() < size:
                mm.write(chunk[:size - mm.tell()])
            mm.close()
        else:
            raise SystemExit(f"unknown impl {impl!r}")
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.read()  # returns at EOF: the parent closed stdin or died
    finally:
        for f in reversed(cleanup):
            try:
                f()
            except Exception:
                pass
    return 0


class Helper:
    """A child process that holds one big object until stopped."""

    def __init__(self, impl, name, size, timeout=120.0):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--helper", impl, name, str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if line.strip() != b"ready":
            err = b""
            self.stop()
            try:
                err = self.proc.stderr.read() or b""
            except Exception:
                pass
            msg = err.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"helper for {impl} failed: {msg[-1] if msg else 'no output'}")

    def stop(self):
        p = self.proc
        try:
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
        except Exception:
            pass
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def bench_numpy(args, rounds):
    n = C.ops_for(args, 2000, 250)
    size = args.big_mib << 20
    bench = f"c. attach ndarray {args.big_mib} MiB"
    cases = []
    failed = []

    def check(a):
        if a.nbytes != size or a.dtype != np.uint8 or a[0] != FILL or a[-1] != FILL:
            raise RuntimeError(f"attached array is wrong: nbytes={a.nbytes} "
                               f"dtype={a.dtype} first={a[0]} last={a[-1]}")

    def add(stack, impl, helper_impl, status, make):
        """Start a helper process that creates and fills the object with
        ``helper_impl``; ``make(name, stack)`` returns (body, verify)."""
        if status != C.OK:
            cases.append(C.Case(impl, status=status))
            return
        name = C.unique_names("c", 1)[0]
        stack.callback(_unlink_quiet, _shm_path(name))  # helper killed early
        try:
            helper = Helper(helper_impl, name, size)
            stack.callback(helper.stop)
            body, verify = make(name, stack)
            verify()  # untimed: are we attaching to the object the helper filled?
            cases.append(C.Case(impl, body))
        except Exception as e:
            failed.append(C.error_row(bench, impl, e))
            print(f"  [{bench} / {impl}] {failed[-1].status}", file=sys.stderr)

    # fmap: explicit release, the documented way
    def fmap_make(name, stack):
        def body(_, n):
            fopen = fmap.open
            for _ in range(n):
                m = fopen(name)
                v = m.map()
                a = v.asarray("uint8")
                del a
                v.close()
                m.close()

        def verify():
            with fmap.open(name) as m, m.map() as v:
                a = v.asarray("uint8")
                check(a)
                del a
        return body, verify

    # fmap: the one-liner, everything released by deallocation
    def fmap_chain_make(name, stack):
        def body(_, n):
            fopen = fmap.open
            for _ in range(n):
                a = fopen(name).map().asarray("uint8")
                del a

        def verify():
            a = fmap.open(name).map().asarray("uint8")
            check(a)
            del a
        return body, verify

    def sa_make(name, stack):
        uri = "shm://" + name

        def body(_, n):
            attach = SharedArray.attach
            for _ in range(n):
                a = attach(uri)
                del a

        def verify():
            a = SharedArray.attach(uri)
            check(a)
            del a
        return body, verify

    def smem_make(name, stack):
        shape, u8 = (size,), np.uint8
        # Attaches register "/name" with our tracker (CPython gh-82300); the
        # helper owns and unlinks it, so unregister it once at the end.
        stack.callback(resource_tracker.unregister, "/" + name, "shared_memory")

        def body(_, n):
            nd = np.ndarray
            for _ in range(n):
                s = SharedMemory(name=name)
                a = nd(shape, u8, buffer=s.buf)
                del a
                s.close()

        def verify():
            s = SharedMemory(name=name)
            a = np.ndarray(shape, u8, buffer=s.buf)
            check(a)
            del a
            s.close()
        return body, verify

    def pipc_make(name, stack):
        pname = "/" + name

        def body(_, n):
            PSM, mm_, fb, u8 = posix_ipc.SharedMemory, mmap.mmap, np.frombuffer, np.uint8
            for _ in range(n):
                p = PSM(pname)
                mm = mm_(p.fd, p.size)
                p.close_fd()
                a = fb(mm, u8)
                del a
                mm.close()

        def verify():
            p = posix_ipc.SharedMemory(pname)
            mm = mmap.mmap(p.fd, p.size)
            p.close_fd()
            a = np.frombuffer(mm, np.uint8)
            check(a)
            del a
            mm.close()
        return body, verify

    def raw_make(name, stack):
        path = _shm_path(name)

        def body(_, n):
            o_open, o_fstat, o_close, mm_, fb, u8 = (os.open, os.fstat, os.close, mmap.mmap,
                                                     np.frombuffer, np.uint8)
            flags = os.O_RDWR
            for _ in range(n):
                fd = o_open(path, flags)
                mm = mm_(fd, o_fstat(fd).st_size)
                o_close(fd)
                a = fb(mm, u8)
                del a
                mm.close()

        def verify():
            fd = os.open(path, os.O_RDWR)
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
            os.close(fd)
            a = np.frombuffer(mm, np.uint8)
            check(a)
            del a
            mm.close()
        return body, verify

    def need_np(status):
        return status if NP_STATUS == C.OK else NP_STATUS

    with contextlib.ExitStack() as stack:
        add(stack, "fmap", "fmap", need_np(FMAP_STATUS), fmap_make)
        add(stack, "fmap (one-liner, freed by del)", "fmap", need_np(FMAP_STATUS),
            fmap_chain_make)
        add(stack, SA, SA, SA_STATUS, sa_make)
        add(stack, "shared_memory", "shared_memory", NP_STATUS, smem_make)
        add(stack, "posix_ipc", "posix_ipc", need_np(PIPC_STATUS), pipc_make)
        add(stack, RAW, RAW, NP_STATUS, raw_make)
        rows = C.run_cases(bench, cases, n, rounds)
    return rows + failed


# ------------------------------ d. open + map + close of another process's object

def bench_attach_other(args, rounds):
    """Section b, but the object is held by another process (a helper), as it
    is when processes share memory: no peer can take a shortcut through a
    handle or a cache of its own."""
    n = C.ops_for(args, 5000, 500)
    size = SMALL
    bench = f"d. open+map+close {size >> 20} MiB, another process's"
    cases = []
    failed = []

    def add(stack, impl, helper_impl, status, make):
        if status != C.OK:
            cases.append(C.Case(impl, status=status))
            return
        name = C.unique_names("d", 1)[0]
        stack.callback(_unlink_quiet, _shm_path(name))  # helper killed early
        try:
            helper = Helper(helper_impl, name, size)
            stack.callback(helper.stop)
            cases.append(C.Case(impl, make(name, stack)))
        except Exception as e:
            failed.append(C.error_row(bench, impl, e))
            print(f"  [{bench} / {impl}] {failed[-1].status}", file=sys.stderr)

    def fmap_make(name, stack):
        def body(_, n):
            fopen = fmap.open
            for _ in range(n):
                m = fopen(name)
                v = m.map()
                v.close()
                m.close()
        return body

    def smem_make(name, stack):
        stack.callback(resource_tracker.unregister, "/" + name, "shared_memory")

        def body(_, n):
            for _ in range(n):
                s = SharedMemory(name=name)
                s.close()
        return body

    def pipc_make(name, stack):
        pname = "/" + name

        def body(_, n):
            PSM, mm_ = posix_ipc.SharedMemory, mmap.mmap
            for _ in range(n):
                p = PSM(pname)
                mm = mm_(p.fd, p.size)
                p.close_fd()
                mm.close()
        return body

    def sa_make(name, stack):
        uri = "shm://" + name

        def body(_, n):
            attach = SharedArray.attach
            for _ in range(n):
                a = attach(uri)
                del a
        return body

    def raw_make(name, stack):
        path = _shm_path(name)

        def body(_, n):
            o_open, o_fstat, o_close, mm_, flags = (os.open, os.fstat, os.close,
                                                    mmap.mmap, os.O_RDWR)
            for _ in range(n):
                fd = o_open(path, flags)
                mm = mm_(fd, o_fstat(fd).st_size)
                o_close(fd)
                mm.close()
        return body

    with contextlib.ExitStack() as stack:
        add(stack, "fmap", "fmap", FMAP_STATUS, fmap_make)
        add(stack, "shared_memory", "shared_memory", NP_STATUS, smem_make)
        add(stack, "posix_ipc", "posix_ipc", PIPC_STATUS, pipc_make)
        add(stack, SA, SA, SA_STATUS, sa_make)
        add(stack, RAW, RAW, C.OK, raw_make)
        rows = C.run_cases(bench, cases, n, rounds)
    return rows + failed


# ------------------------------------------------------------------------ main

SECTIONS = {"a": bench_create, "b": bench_attach, "c": bench_numpy, "d": bench_attach_other}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--helper"]:
        return helper_main(argv[1:])
    p = C.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--only", default="abcd",
                   help="which sections to run, e.g. 'ab' (default: abcd)")
    p.add_argument("--big-mib", type=int, default=BIG_DEFAULT_MIB,
                   help=f"size of the section c object in MiB (default {BIG_DEFAULT_MIB})")
    args = p.parse_args(argv)
    rounds = C.rounds_for(args)

    # Turn SIGTERM into an exception so that every finally block runs.
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    t0 = time.monotonic()
    print(f"lifecycle: rounds={rounds} quick={args.quick} fmap: {FMAP_STATUS}", file=sys.stderr)
    rows = {}
    try:
        for key in args.only:
            if key in SECTIONS:
                rows[key] = SECTIONS[key](args, rounds)
    finally:
        final_sweep()

    out = []
    titles = {"a": ("named create + map + close (POSIX peers also unlink)", RAW),
              "b": ("open existing name + map + close", RAW),
              "c": ("NumPy array over an object made by another process", [SA, RAW]),
              "d": ("open + map + close of an object another process holds", RAW)}
    for key, section_rows in rows.items():
        title, baseline = titles[key]
        out.append(C.format_table(section_rows, baseline, title=title))
        out.append("")
    elapsed = time.monotonic() - t0
    env = C.environment()
    out.append(f"Python {env['python']}, {env['machine']}, {env['cpus']} CPUs; "
               f"median of {rounds} rounds; ratio = impl / baseline (lower is faster); "
               f"run took {elapsed:.1f} s")
    print("\n".join(out))
    if args.json:
        all_rows = [r for section_rows in rows.values() for r in section_rows]
        C.write_json(args.json, all_rows, meta={"benchmark": "lifecycle", "rounds": rounds,
                                                "quick": args.quick, "elapsed_s": elapsed,
                                                "big_mib": args.big_mib})
    return 0


if __name__ == "__main__":
    sys.exit(main())
