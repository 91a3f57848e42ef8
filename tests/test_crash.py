"""SIGKILL where the contract speaks of crashes (DESIGN.md contract 7 and
"Linux: names over kernel-counted memory"): the memory and the name live
exactly as long as a live process holds them, and a process killed at any
instant, even inside the registry lock, leaves the registry consistent.
"""
import fcntl
import os
import random
import signal
import struct
import time

import pytest

import fmap
from fmap import _fmap
from children import _stderr_of, children, poll, run_python  # noqa: F401 - fixture
from conftest import shmem_kib

MiB = 1 << 20


def key(name):
    return b"L" + name.encode()


def listed_names():
    """Names in the registry, dead holders pruned first (registry_list prunes)."""
    return {k for k, *_ in _fmap.registry_list()}


def settled_counts():
    _fmap.registry_list()           # prune the records of dead processes
    return _fmap.registry_counts()


# ---- the creator dies, the object lives on ----------------------------------------

CREATOR = """
import sys, fmap
m = fmap.create(NAME, size=1 << 20)
v = m.map()
a = v.asarray("uint32")
a[:] = range(len(a))
print("ready", flush=True)
sys.stdin.read()
"""

HOLDER = """
import sys, fmap
m = fmap.open(NAME)
v = m.map()
print("ready", flush=True)
for line in sys.stdin:
    a = v.asarray("uint32")
    print("sum", int(a.astype("uint64").sum()), int(a[7]), flush=True)
    del a
"""


def test_creator_killed_object_and_name_survive(children, name):
    creator = children(CREATOR.replace("NAME", repr(name)))
    creator.expect("ready")
    holder = children(HOLDER.replace("NAME", repr(name)))
    holder.expect("ready")
    creator.kill()
    assert creator.proc.returncode == -signal.SIGKILL
    n = MiB // 4
    expected = n * (n - 1) // 2
    holder.send("read")
    assert holder.expect("sum") == f"sum {expected} 7"
    # a third process opens the name the dead creator made, and writes
    third = run_python(f"""
import fmap
m = fmap.open({name!r})
assert not m.created and m.size == 1 << 20
with m.map() as v:
    a = v.asarray("uint32")
    print(int(a.astype("uint64").sum()))
    a[7] = 77
    del a
""")
    assert third.returncode == 0, third.stderr.decode()
    assert int(third.stdout) == expected
    holder.send("read")
    assert holder.expect("sum") == f"sum {expected - 7 + 77} 77"
    assert key(name) in listed_names()
    holder.kill()
    assert key(name) not in listed_names()
    with pytest.raises(FileNotFoundError):
        fmap.open(name)


# ---- every holder killed: memory and name are freed --------------------------------

BIG = 256 * MiB

BIG_CREATOR = """
import sys, fmap
m = fmap.create(NAME, size=SIZE)
v = m.map()
a = v.asarray("uint8")
a[:] = 0xAB                          # touch every page: Shmem grows by SIZE
del a
print("ready", flush=True)
sys.stdin.read()
"""

BIG_HOLDER = """
import sys, fmap
m = fmap.open(NAME)
v = m.map()
assert v[12345] == 0xAB
if VIEW_ONLY:
    m.close()                        # the view alone keeps the memory
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def shmem_quiet():
    """Shmem is system-wide: runs of this suite in parallel (several checkouts,
    CI jobs) take turns at the tests that measure it."""
    fd = os.open("/tmp/fmap-tests-shmem.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        assert poll(lambda: _try_flock(fd), timeout=120, interval=0.1), \
            "another run held the Shmem lock for 2 minutes"
        yield
    finally:
        os.close(fd)


def _try_flock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def test_killing_every_holder_frees_memory_and_name(children, name, shmem_quiet):
    before = shmem_kib()
    procs = [children(BIG_CREATOR.replace("NAME", repr(name)).replace("SIZE", str(BIG)))]
    procs[0].expect("ready", timeout=60)
    for view_only in (False, True):
        p = children(BIG_HOLDER.replace("NAME", repr(name)).replace("VIEW_ONLY", str(view_only)))
        procs.append(p)
        p.expect("ready")
    grown = shmem_kib() - before
    assert grown >= (BIG - 32 * MiB) // 1024, f"Shmem grew by {grown} KiB only"
    creator, holder, view_only = procs
    for p in (creator, holder):
        p.kill()
        assert p.proc.returncode == -signal.SIGKILL
    # no handle left anywhere: the name is gone although a view still maps
    # the memory, and that view keeps all of it (contract 7)
    with pytest.raises(FileNotFoundError):
        fmap.open(name)
    time.sleep(0.2)
    assert shmem_kib() - before >= (BIG - 32 * MiB) // 1024, "the memory went with a view still mapped"
    view_only.kill()
    back = poll(lambda: shmem_kib() - before < 32 * 1024, timeout=10)
    assert back, f"Shmem still {shmem_kib() - before} KiB above its level after SIGKILL"
    with pytest.raises(FileNotFoundError):
        fmap.open(name)
    with fmap.create(name, size=BIG) as m:
        assert m.created and m.size == BIG
        with m.map("r") as v:
            a = v.asarray("uint64")
            assert not a.any(), "a re-created name must be zeroed"
            del a
    assert poll(lambda: shmem_kib() - before < 32 * 1024, timeout=10)


# ---- killed in the middle of create / open / map / close -----------------------------

LOOPER = """
import os, random, sys, fmap
names = NAMES
rnd = random.Random(os.getpid())
kept = []
print("ready", flush=True)
while True:
    m = fmap.create(rnd.choice(names), size=65536)
    v = m.map()
    v[0] = (v[0] + 1) % 256
    try:
        o = fmap.open(rnd.choice(names), access=rnd.choice(["r", "rw"]))
        with o.map("r") as w:
            w[1]
        o.close()
    except FileNotFoundError:
        pass
    v.close()
    if rnd.random() < 0.3:
        kept.append(m)            # keep some handles: names outlive single loops
    else:
        m.close()
    if len(kept) > 3:
        kept.pop(0).close()
"""


def _check_running(procs):
    for p in procs:
        rc = p.proc.poll()
        assert rc is None, f"looper {p.pid} exited ({rc}) before being killed:\n" \
                           f"{_stderr_of(p.proc)}"


def _registry_usable(names, timeout=5.0):
    """Every name can be created (fresh, zeroed) and opened, within timeout."""
    t0 = time.monotonic()
    for n in names:
        with pytest.raises(FileNotFoundError):
            fmap.open(n)
        with fmap.create(n, size=65536, exclusive=True) as m, m.map() as v:
            assert m.created and v[0] == 0
            with fmap.open(n) as o:
                assert not o.created
    assert time.monotonic() - t0 < timeout


def test_kills_during_create_open_close_loops_leave_registry_consistent(children, name):
    names = [f"{name}-{i}" for i in range(3)]
    baseline = settled_counts()
    rnd = random.Random(1234)
    code = LOOPER.replace("NAMES", repr(names))
    for _ in range(6):
        procs = [children(code) for _ in range(4)]
        for p in procs:
            p.expect("ready")
        time.sleep(rnd.uniform(0.05, 0.3))
        _check_running(procs)
        for p in rnd.sample(procs, len(procs)):
            p.kill()
            time.sleep(rnd.uniform(0, 0.03))    # the others go on meanwhile
    assert not set(map(key, names)) & listed_names()
    assert settled_counts() == baseline
    _registry_usable(names)
    assert settled_counts() == baseline


# The registry header, as laid out by src/c/fmap_linux.c (reg_header): read
# straight from the file to see the lock's owner and the repair count.
def _header_fields(path):
    with open(path, "rb") as f:
        head = f.read(256)
    if head[:8] != b"FMAPREG\x01":
        pytest.skip("registry layout changed: update _header_fields")
    lock_size = struct.unpack_from("=I", head, 36)[0]
    lock_word = struct.unpack_from("=I", head, 40)[0]    # its low half: the owner's TID
    after = (40 + lock_size + 7) & ~7
    # generation (u64), tombstones, entry_hint, holder_hint, entries_used, holders_used, repairs
    _, _, _, _, entries, holders, repairs = struct.unpack_from("=QIIIIII", head, after)
    return lock_word, entries, holders, repairs


def _stopped(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] in ("T", "t")


TIGHT = """
import fmap
names = NAMES
print("ready", flush=True)
i = 0
while True:
    m = fmap.create(names[i % len(names)], size=4096)
    m.close()
    i += 1
"""

FUTEX_TID_MASK = 0x3FFFFFFF


def test_killed_inside_the_registry_lock_is_repaired(children, name, runtime_dir):
    names = [f"{name}-{i}" for i in range(2)]
    baseline = settled_counts()
    reg_file = os.path.join(runtime_dir, "registry.v2")
    _, entries, holders, repairs_before = _header_fields(reg_file)
    assert (entries, holders) == baseline, "header offsets do not match registry_counts()"
    code = TIGHT.replace("NAMES", repr(names))
    procs = [children(code) for _ in range(3)]
    for p in procs:
        p.expect("ready")
    victim = procs[0]
    # Stop the victim until it is caught holding the lock (its TID in the
    # lock word), then SIGKILL it there: the next locker finds the owner gone
    # and must repair the registry.
    caught = False
    for _ in range(500):
        os.kill(victim.pid, signal.SIGSTOP)
        assert poll(lambda: _stopped(victim.pid), timeout=5, interval=0.0005)
        word = _header_fields(reg_file)[0]
        if word & FUTEX_TID_MASK == victim.pid:
            victim.kill()
            caught = True
            break
        os.kill(victim.pid, signal.SIGCONT)
        time.sleep(random.uniform(0, 0.005))
    assert caught, "never caught the looping child inside the registry lock"
    time.sleep(0.2)                       # the others carry on past the repair
    _check_running(procs[1:])
    t0 = time.monotonic()
    counts_now = _fmap.registry_counts()  # takes the lock: repairs if nobody did yet
    assert time.monotonic() - t0 < 2, "the registry lock stayed blocked after the owner died"
    assert counts_now[0] <= len(names)
    assert _header_fields(reg_file)[3] > repairs_before, "no repair ran"
    for p in procs[1:]:
        p.kill()
    assert not set(map(key, names)) & listed_names()
    assert settled_counts() == baseline
    _registry_usable(names)
    assert settled_counts() == baseline


def test_a_collection_inside_registry_list_does_not_reenter_the_lock(name, runtime_dir):
    # registry_list() calls back into Python for each name with the registry
    # locked.  A garbage collection there once finalized an unclosed handle
    # (a cycle's), whose close took the lock again from the same thread: the
    # lock took itself for a dead process's, "repaired" the registry and was
    # released under the walk (found by helper 45, at a GC threshold of 11).
    import gc
    import warnings
    reg_file = os.path.join(runtime_dir, "registry.v2")
    keep = [fmap.create(f"{name}-{i}", size=1) for i in range(50)]

    class Cycle:
        pass
    threshold = gc.get_threshold()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            for t in range(1, 40):
                gc.collect()
                gc.disable()
                c = Cycle()
                c.c = c
                c.m = fmap.create(f"{name}-cycle", size=1)
                del c
                repairs = _header_fields(reg_file)[3]
                gc.set_threshold(t)
                gc.enable()
                _fmap.registry_list()
                gc.set_threshold(*threshold)
                assert _header_fields(reg_file)[3] == repairs, f"re-entered at threshold {t}"
                gc.collect()
    finally:
        gc.set_threshold(*threshold)
        gc.enable()
        for m in keep:
            m.close()
