"""Leak loops (psutil tests/test_memleaks.py): many create/map/close cycles
leave file descriptors, mappings, RSS and the registry where they were."""
import gc
import os
import signal
import subprocess
import sys
import time

import pytest

import fmap
from fmap import _fmap
from children import wait_pid

CYCLES = 100_000
WARMUP = 5_000


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def map_count():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def rss_kib():
    """(private RSS, shared RSS) in KiB.  The shared part grows while create
    walks through registry slots not touched before (the registry file is
    mapped for good); that is bounded by the registry's size, not a leak."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "RssShmem"):
                fields[k] = int(v.split()[0])
    return fields["RssAnon"] + fields["RssFile"], fields["RssShmem"]


def snapshot():
    gc.collect()
    private, shared = rss_kib()
    return {"fds": fd_count(), "maps": map_count(), "rss": private, "shmem": shared,
            "registry": _fmap.registry_counts()}


def cycle(i, name):
    """One create/map/close, in one of several shapes."""
    kind = i % 10
    if kind == 0:                             # an array holds an export, then goes
        m = fmap.create(name, size=4096)
        v = m.map()
        a = v.asarray("uint32", shape=(1024,))
        a[i % 1024] = i
        del a
        v.close()
        m.close()
    elif kind == 1:                           # the view outlives its handle
        m = fmap.create(name, size=4096)
        v = m.map()
        m.close()
        v[1] = 1
        v.close()
    elif kind == 2:                           # a second handle by name, a read view
        with fmap.create(name, size=4096) as m, fmap.open(name, access="r") as o:
            with o.map() as v:
                v[0]
    elif kind == 3:                           # unnamed
        with fmap.create(size=4096) as u, u.map() as v:
            with memoryview(v) as mv:
                mv[0] = 1
    else:
        m = fmap.create(name, size=4096)
        v = m.map()
        v[0] = 1
        v.close()
        m.close()


def assert_loop_leaks_nothing(cycle, name, warmup, cycles, rss_kib):
    """Run cycle(i, name) warmup times, then cycles times between two
    snapshots: fds, mappings, shared memory and registry names flat, private
    RSS grown by less than rss_kib."""
    for i in range(warmup):
        cycle(i, name)
    before = snapshot()
    t0 = time.monotonic()
    for i in range(cycles):
        cycle(i, name)
    elapsed = time.monotonic() - t0
    after = snapshot()
    assert after["fds"] == before["fds"], (before, after)
    # Python's allocator may map an arena or two; one leaked mapping per cycle
    # would show as thousands
    assert abs(after["maps"] - before["maps"]) <= 8, (before, after)
    assert after["rss"] - before["rss"] < rss_kib, (before, after)
    registry_kib = os.path.getsize(os.path.join(fmap.runtime_dir(), "registry.v2")) // 1024
    assert after["shmem"] - before["shmem"] <= registry_kib, (before, after)
    assert after["registry"] == before["registry"], (before, after)
    assert elapsed < 60, f"{cycles} cycles took {elapsed:.1f} s"


def test_create_map_close_loop_leaks_nothing(name):
    # 100 bytes leaked per cycle would be ~10 MiB
    assert_loop_leaks_nothing(cycle, name, WARMUP, CYCLES, rss_kib=4096)
    with pytest.raises(FileNotFoundError):
        fmap.open(name)


def test_fork_loop_leaves_no_holder_records(name):
    # Every fork() adds a pending record per named handle for the child to
    # claim; children that exit (closing or not) must not leave them behind.
    _fmap.registry_list()
    baseline = _fmap.registry_counts()
    handles = [fmap.create(f"{name}-{k}", size=4096) for k in range(3)]
    with_ours = _fmap.registry_counts()
    assert with_ours == (baseline[0] + 3, baseline[1] + 3)
    fds = fd_count()
    for i in range(60):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:                   # this copy of pytest must never return into the run
                if i % 2:
                    for h in handles:
                        h.close()
                code = 0
            finally:
                os._exit(code)
        assert wait_pid(pid, 10) == 0
    _fmap.registry_list()                  # prunes the records of exited children
    assert _fmap.registry_counts() == with_ours
    assert fd_count() == fds
    for h in handles:
        h.close()
    assert _fmap.registry_counts() == baseline


FORK_AMONG_MANY = r"""
import os, sys, time
os.register_at_fork(after_in_child=lambda: time.sleep(0.5))  # before fmap's: delays its claim
import fmap
name = sys.argv[1]
older = []
for _ in range(int(sys.argv[2])):                 # unreaped: all in the children file
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    older.append(pid)
m = fmap.create(name, size=4096)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    time.sleep(0.8)                               # claimed by now
    try:
        fmap.open(name).close()
        os.write(w, b"kept")
    except FileNotFoundError:
        os.write(w, b"lost")
    os._exit(0)
os.close(w)
m.close()                # the child holds it now, its record still pending
try:
    fmap.open(name).close()                       # (an open prunes what is over)
    parent = "kept"
except FileNotFoundError:
    parent = "lost"
print(parent, os.read(r, 16).decode())
os.waitpid(pid, 0)
for p in older:
    os.waitpid(p, 0)
"""


def test_a_fork_child_is_found_among_many_older_children(name):
    # The parent names its newest child in the records the child is to claim
    # (see below).  With 800 older children unreaped, the children file is
    # more than a page: one read of it ended at an older child, a zombie, and
    # the live child's record went at once, its name with it, while it held
    # the object.
    out = subprocess.run([sys.executable, "-c", FORK_AMONG_MANY, name, "800"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["kept", "kept"], out.stdout + out.stderr


def test_a_fork_child_killed_before_it_claims_its_records_holds_nothing(name):
    # fork() adds a pending record per named handle, which the child claims
    # in its first microseconds.  A child killed before then (at once, as a
    # pool torn down does) held the name, and made the parent's close() wait,
    # for the records' whole 2 s; the parent now names the child in them, and
    # a dead child frees them at once.  (A child that claimed first is an
    # ordinary dead holder: this fails only when some kill lands first, which
    # most of these do.)
    for i in range(5):
        m = fmap.create(f"{name}-{i}", size=4096)
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(30)
            finally:
                os._exit(0)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        t = time.monotonic()
        m.close()
        took = time.monotonic() - t
        assert took < 0.5, f"close() waited {took:.2f} s for a dead child"
        t = time.monotonic()
        with pytest.raises(FileNotFoundError):
            fmap.open(f"{name}-{i}")
        assert time.monotonic() - t < 0.5
