"""populate=True: memory committed at creation, as Windows commits a paging-file
section, and a clean MemoryError (ERROR_COMMITMENT_LIMIT) when the machine
cannot give it; never the OOM killer, never SIGBUS.

Sizes that must fail are several times RAM + swap, so a check that is missing
would try to allocate them: those run in a child that a watchdog kills as
soon as the machine's shared memory grows past GUARD.  Nothing here allocates
more than 1 GiB.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fmap
from conftest import raises, shmem_kib

ERROR_INVALID_HANDLE = 6
ERROR_ALREADY_EXISTS = 183
ERROR_COMMITMENT_LIMIT = 1455
MiB = 1 << 20
GUARD = 2 << 30


def _meminfo_kib(field):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/meminfo")


# Surely more than the machine has: four times its RAM and swap.
HUGE = 4 * (_meminfo_kib("MemTotal") + _meminfo_kib("SwapTotal")) * 1024


# For the children: their memfds (labelled "fmap:<name>") and a view's smaps.
CHILD_PRELUDE = """
import json, os, fmap

def memfds():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:fmap"):
                out.append(fd)
        except OSError:
            pass
    return len(out)

def view_kib(address, field):
    start = f"{address:x}-"
    with open("/proc/self/smaps") as f:
        lines = iter(f)
        for line in lines:
            if line.startswith(start):
                for entry in lines:
                    if entry.startswith(field + ":"):
                        return int(entry.split()[1])
"""


def guarded(code, timeout=60):
    """Run code in a child that must print one JSON line; kill it the moment
    the machine's shared memory has grown by GUARD (a missing check filling a
    memfd), and fail."""
    base = shmem_kib() * 1024
    child = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while child.poll() is None:
            if shmem_kib() * 1024 - base > GUARD:
                child.kill()
                pytest.fail("the child allocated past the guard: populate did not check "
                            "the memory available")
            if time.monotonic() > deadline:
                child.kill()
                pytest.fail(f"the child ran past {timeout} s")
            time.sleep(0.002)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _view_kib(address, field):
    start = f"{address:x}-"
    with open("/proc/self/smaps") as f:
        lines = iter(f)
        for line in lines:
            if line.startswith(start):
                for entry in lines:
                    if entry.startswith(field + ":"):
                        return int(entry.split()[1])
    raise AssertionError(f"no mapping at {address:#x}")


# ---- more than the machine has

@pytest.mark.parametrize("named", [True, False])
def test_populate_past_memory_is_memoryerror(name, named):
    r = guarded(f"""
        name = {name if named else None!r}
        try:
            fmap.create(name, size={HUGE}, populate=True)
            out = {{"raised": None}}
        except MemoryError as exc:
            out = {{"raised": "MemoryError", "winerror": getattr(exc, "winerror", None),
                    "message": str(exc)}}
        out["memfds"] = memfds()
        if name:
            try:
                fmap.open(name).close()
                out["name"] = "taken"
            except FileNotFoundError:
                out["name"] = "free"
        print(json.dumps(out))
    """)
    assert r["raised"] == "MemoryError", r
    assert r["winerror"] == ERROR_COMMITMENT_LIMIT
    assert "populate=True" in r["message"] and str(HUGE) in r["message"]
    assert r["memfds"] == 0                      # nothing is left allocated
    if named:
        assert r["name"] == "free"               # nor named


def test_failed_populate_leaves_no_record(name):
    r = guarded(f"""
        before = fmap._fmap.registry_counts()
        try:
            fmap.create({name!r}, size={HUGE}, populate=True)
        except MemoryError:
            pass
        after = fmap._fmap.registry_counts()
        with fmap.create({name!r}, size=4096) as m:    # the name makes a new object
            print(json.dumps({{"same": before == after, "created": m.created}}))
    """)
    assert r == {"same": True, "created": True}


# ---- what populate does and does not commit

def test_populate_commits_the_memory(name, closer):
    size = 64 * MiB + 100
    m = closer(fmap.create(name, size=size, populate=True))
    assert os.fstat(m.fileno()).st_blocks * 512 >= size      # before any view
    v = closer(m.map())
    assert _view_kib(v.address, "Rss") * 1024 >= size - fmap.PAGE_SIZE
    o = closer(fmap.open(name))                  # views are prefaulted only
    w = closer(o.map())                          # for create(populate=True)
    assert _view_kib(w.address, "Rss") == 0


def test_populate_of_an_existing_lazy_object_commits_nothing(name):
    # The existing object's parameters win: its memory is not committed by an
    # opener, and its views are not prefaulted (that would allocate it all).
    r = guarded(f"""
        lazy = fmap.create({name!r}, size={HUGE})
        m = fmap.create({name!r}, size=4096, populate=True)
        v = m.map(length=256 << 20)
        print(json.dumps({{"created": m.created, "size": m.size,
                           "rss": view_kib(v.address, "Rss"),
                           "blocks": os.fstat(m.fileno()).st_blocks}}))
        v.close(); m.close(); lazy.close()
    """)
    assert r == {"created": False, "size": HUGE, "rss": 0, "blocks": 0}


@pytest.mark.parametrize("other", ["mapping", "mutex"])
def test_name_checks_come_before_committing(name, other):
    # FileExistsError / WrongTypeError, not MemoryError: no commit is tried.
    make = "fmap.create(name, size=4096)" if other == "mapping" else "fmap.Mutex.create(name)"
    r = guarded(f"""
        name = {name!r}
        held = {make}
        try:
            fmap.create(name, size={HUGE}, populate=True, exclusive={other == "mapping"})
            out = None
        except Exception as exc:
            out = [type(exc).__name__, getattr(exc, "winerror", None)]
        print(json.dumps(out))
        held.close()
    """)
    if other == "mapping":
        assert r == ["FileExistsError", ERROR_ALREADY_EXISTS]
    else:
        assert r == ["WrongTypeError", ERROR_INVALID_HANDLE]


def test_populate_read_only_object(closer):
    m = closer(fmap.create(size=4 * MiB, protect="r", populate=True))
    v = closer(m.map())
    assert v[:] == bytes(4 * MiB)


def test_copy_view_is_prefaulted_without_copying(closer):
    # MAP_POPULATE write-faults a private writable mapping: every page of a
    # copy-on-write view would become a private copy.
    size = 16 * MiB
    m = closer(fmap.create(size=size, populate=True))
    closer(m.map())[:4] = b"data"
    c = closer(m.map("c"))
    assert _view_kib(c.address, "Anonymous") == 0
    assert _view_kib(c.address, "Rss") * 1024 == size
    c[:4] = b"mine"
    assert _view_kib(c.address, "Anonymous") * 1024 == fmap.PAGE_SIZE
    assert closer(m.map())[:4] == b"data"


# ---- signals while committing

class Pester:
    """Send the main thread `signum` every `interval` seconds (a timer signal
    would fight pytest-timeout's SIGALRM, and CPU timers fire only on the way
    back to user space)."""

    def __init__(self, signum, interval):
        self.signum, self.interval = signum, interval
        self.main = threading.get_ident()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.interval):
            signal.pthread_kill(self.main, self.signum)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        try:
            self.stop.set()
        finally:
            self.thread.join(10)


def _memfd_bytes(name):
    """Bytes allocated to this process's memfd of mapping `name`, -1 if none."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:fmap:{name} "):
                return os.stat(f"/proc/self/fd/{fd}").st_blocks * 512
        except OSError:
            pass
    return -1


def test_signal_handlers_run_while_committing(name, closer):
    # Handlers run between steps, not after the whole commit; on kernels that
    # stop a tmpfs fallocate at any signal, the commit resumes, with smaller
    # steps, and still finishes when signals keep coming.
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda *a: seen.append(_memfd_bytes(name)))
    try:
        with Pester(signal.SIGUSR1, 0.001):
            m = closer(fmap.create(name, size=1 << 30, populate=True))
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert os.fstat(m.fileno()).st_blocks * 512 == 1 << 30
    assert [b for b in seen if 0 <= b < 1 << 30], seen    # some ran midway


class Stop(Exception):
    pass


def test_exception_from_a_signal_handler_ends_the_commit(name):
    seen = []

    def stop(*a):
        seen.append(_memfd_bytes(name))
        if len(seen) == 1:
            raise Stop
    old = signal.signal(signal.SIGUSR1, stop)
    try:
        with pytest.raises(Stop), Pester(signal.SIGUSR1, 0.01):
            fmap.create(name, size=1 << 30, populate=True)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert 0 <= seen[0] < 1 << 30                # stopped before the end
    assert _memfd_bytes(name) == -1              # and what it had is gone
    with raises(FileNotFoundError):
        fmap.open(name)


def test_commit_does_not_hold_the_registry_lock(name, closer):
    # Committing gigabytes takes seconds; creates and opens of other names in
    # every process of the user must not wait for it (nor time out at 10 s).
    done = []
    t = threading.Thread(target=lambda: done.append(
        fmap.create(name, size=1 << 30, populate=True)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while _memfd_bytes(name) <= 0 and time.monotonic() < deadline:
            time.sleep(0.0005)
        closer(fmap.create(name + "-other", size=4096))
        assert 0 <= _memfd_bytes(name) < 1 << 30     # still committing
    finally:
        t.join(30)
        closer(done[0])
