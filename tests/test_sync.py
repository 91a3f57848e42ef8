"""The contract of Mutex, Semaphore, Event and wait_any within one process
(other threads stand in for other owners).  Cross-process behaviour is in
test_sync_crossprocess.py, crashes and Ctrl-C in test_sync_crash.py."""
import pickle
from contextlib import closing
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmap
from fmap import sync

ERROR_INVALID_HANDLE = 6
ERROR_NOT_OWNER = 288
ERROR_TOO_MANY_POSTS = 298
ERROR_ALREADY_EXISTS = 183
ERROR_INVALID_PARAMETER = 87


@pytest.fixture
def closer():
    """Handles to close at the end of the test."""
    handles = []
    yield handles.append
    for h in handles:
        h.close()


def start_thread(target):
    """A daemon thread running target: one stuck in a wait fails its test (the
    joins are bounded) but cannot keep the interpreter from exiting."""
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def join(threads, timeout=10):
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), f"{t.name} did not finish in {timeout} s"


def in_thread(fn, *args, timeout=10):
    """Run fn in another thread; its result, or its exception re-raised."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    join([start_thread(run)], timeout)
    if "error" in out:
        raise out["error"]
    return out.get("value")


# ---- Mutex ---------------------------------------------------------------

def test_mutex_recursion(name, closer):
    m = fmap.Mutex.create(name)
    closer(m)
    assert m.created and not m.owned
    for depth in range(1, 4):
        assert m.acquire() is True
        assert f"depth {depth}" in repr(m)
    assert in_thread(m.acquire, 0) is False
    m.release()
    m.release()
    assert m.owned
    assert in_thread(m.acquire, 0.01) is False
    m.release()
    assert not m.owned and "free" in repr(m)
    with pytest.raises(PermissionError) as ei:
        m.release()
    assert ei.value.winerror == ERROR_NOT_OWNER


def test_mutex_release_by_other_thread(name, closer):
    m = fmap.Mutex.create(name)
    closer(m)
    m.acquire()
    with pytest.raises(PermissionError) as ei:
        in_thread(m.release)
    assert ei.value.winerror == ERROR_NOT_OWNER
    assert m.owned                        # unchanged
    m.release()
    assert in_thread(lambda: m.acquire(0) and (m.release() or True)) is True


def test_mutex_with_block_and_other_thread_waits(name, closer):
    m = fmap.Mutex.create(name)
    closer(m)
    got = []
    with m as held:
        assert held is m and m.owned and m.abandoned is False
        # blocks (GIL released) until we leave the block
        t = start_thread(lambda: got.append(m.acquire(timeout=10)) or m.release())
    join([t])
    assert got == [True]


def test_mutex_owned_at_creation(name, closer):
    m = fmap.Mutex.create(name, owned=True)
    closer(m)
    assert m.owned and in_thread(m.acquire, 0) is False
    # The name exists: bInitialOwner is ignored (CreateMutex).
    m2 = in_thread(lambda: fmap.Mutex.create(name, owned=True))
    closer(m2)
    assert m2.created is False and in_thread(m2.acquire, 0) is False
    m.release()
    m3 = fmap.Mutex.create(None, owned=True)   # unnamed, owned
    closer(m3)
    assert m3.owned and in_thread(m3.acquire, 0) is False
    m3.release()


def test_mutex_timeout_returns_false(name, closer):
    m = fmap.Mutex.create(name)
    closer(m)
    m.acquire()
    assert in_thread(lambda: m.acquire(timeout=0.05)) is False
    assert in_thread(lambda: m.acquire(timeout=0.01, spin=50)) is False
    m.release()


# ---- Semaphore -------------------------------------------------------------

def test_semaphore_counts_and_maximum(name, closer):
    s = fmap.Semaphore.create(name, initial=1, maximum=3)
    closer(s)
    assert (s.count, s.maximum, s.created) == (1, 3, True)
    assert s.release() == 1
    assert s.release(1) == 2
    with pytest.raises(ValueError) as ei:
        s.release()
    assert ei.value.winerror == ERROR_TOO_MANY_POSTS
    assert s.count == 3                   # unchanged
    for _ in range(3):
        assert s.acquire(timeout=0) is True
    assert s.acquire(timeout=0) is False
    assert s.acquire(timeout=0.05) is False
    with pytest.raises(ValueError) as ei:
        s.release(4)
    assert ei.value.winerror == ERROR_TOO_MANY_POSTS and s.count == 0
    assert s.release(3) == 0 and s.count == 3
    with s:
        assert s.count == 2
    assert s.count == 3
    assert "count=3 maximum=3" in repr(s)


@pytest.mark.parametrize("initial, maximum", [(2, 1), (-1, 5), (0, 0), (0, -3),
                                              (0, sync.SEMAPHORE_MAX + 1)])
def test_semaphore_bad_parameters(name, initial, maximum):
    with pytest.raises(ValueError) as ei:
        fmap.Semaphore.create(name, initial, maximum)
    assert ei.value.winerror == ERROR_INVALID_PARAMETER
    with pytest.raises(FileNotFoundError):
        fmap.Semaphore.open(name)         # checked before the name was touched


def test_semaphore_bad_release_counts(name, closer):
    s = fmap.Semaphore.create(name, 0, 5)
    closer(s)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            s.release(bad)
    for bad in (1.0, "1", None, True):
        with pytest.raises(TypeError):
            s.release(bad)
    with pytest.raises(ValueError) as ei:
        s.release(1 << 80)
    assert ei.value.winerror == ERROR_TOO_MANY_POSTS
    assert s.count == 0
    assert s.release(np.int64(2)) == 0 and s.count == 2   # as create() takes them


def test_semaphore_wakes_waiting_threads(name, closer):
    s = fmap.Semaphore.create(name, 0, 10)
    closer(s)
    results = []
    threads = [start_thread(lambda: results.append(s.acquire(timeout=10)))
               for _ in range(4)]
    s.release(4)
    join(threads)
    assert results == [True] * 4 and s.count == 0


# ---- Event -------------------------------------------------------------

def test_event_auto_reset(name, closer):
    e = fmap.Event.create(name)
    closer(e)
    assert not e.manual_reset and not e.is_set()
    assert e.wait(0) is False and e.wait(0.02) is False
    e.set()
    e.set()                               # setting a set event changes nothing
    assert e.is_set() and "auto-reset set" in repr(e)
    assert e.wait(0) is True
    assert e.wait(0) is False and not e.is_set()


def test_event_auto_reset_releases_exactly_one_waiter(name, closer):
    e = fmap.Event.create(name)
    closer(e)
    results = []
    threads = [start_thread(lambda: results.append(e.wait(timeout=1.0)))
               for _ in range(4)]
    e.set()
    join(threads)
    assert sorted(results) == [False, False, False, True]
    assert not e.is_set()


def test_event_manual_reset(name, closer):
    e = fmap.Event.create(name, manual_reset=True, initial=True)
    closer(e)
    assert e.manual_reset and e.is_set()
    assert e.wait() and e.wait(0) and e.wait(1)
    e.reset()
    assert e.wait(0) is False and e.wait(0.02) is False
    results = []
    threads = [start_thread(lambda: results.append(e.wait(timeout=10)))
               for _ in range(4)]
    e.set()
    join(threads)
    assert results == [True] * 4 and e.is_set()


def test_event_with_closes_handle(name):
    with fmap.Event.create(name) as e:
        assert not e.closed
    assert e.closed
    with pytest.raises(FileNotFoundError):
        fmap.Event.open(name)


# ---- wait_any --------------------------------------------------------------

def test_wait_any_timeout_and_index(name, closer):
    m = fmap.Mutex.create(name + "m")
    s = fmap.Semaphore.create(name + "s", 0, 5)
    e = fmap.Event.create(name + "e")
    for h in (m, s, e):
        closer(h)
    in_thread(m.acquire)                  # owned by a thread that is gone: abandoned
    objs = [s, e]
    assert fmap.wait_any(objs, timeout=0) is None
    assert fmap.wait_any(objs, timeout=0.05) is None
    s.release(2)
    e.set()
    assert fmap.wait_any(objs) == 0 and s.count == 1     # lowest index first, acquired
    assert fmap.wait_any(objs) == 0 and s.count == 0
    assert fmap.wait_any(objs) == 1 and not e.is_set()   # auto-reset consumed
    assert fmap.wait_any(objs, timeout=0) is None
    assert fmap.wait_any([e, m], timeout=5) == 1
    assert m.owned and m.abandoned
    m.release()


def test_wait_any_blocks_until_another_thread_signals(name, closer):
    m = fmap.Mutex.create(name + "m", owned=True)
    e = fmap.Event.create(name + "e", manual_reset=True)
    closer(m)
    closer(e)

    def waiter():
        i = fmap.wait_any([e, m], timeout=None)
        owned = m.owned
        if owned:
            m.release()
        return i, owned

    # timeout=None on purpose (the forever path); the closer's close() ends a
    # waiter that was never signalled, and the thread is a daemon.
    t_result = []
    t = start_thread(lambda: t_result.append(waiter()))
    m.release()                           # the waiter gets the mutex
    join([t])
    assert t_result == [(1, True)]
    t_result.clear()
    assert m.acquire(timeout=10)
    t = start_thread(lambda: t_result.append(waiter()))
    e.set()
    join([t])
    assert t_result == [(0, False)]
    m.release()


def test_wait_any_arguments(name, closer):
    e = fmap.Event.create(name)
    closer(e)
    with pytest.raises(ValueError):
        fmap.wait_any([])
    with pytest.raises(ValueError):
        fmap.wait_any([e] * (sync.MAXIMUM_WAIT_OBJECTS + 1))
    assert fmap.wait_any([e] * sync.MAXIMUM_WAIT_OBJECTS, timeout=0) is None
    with fmap.create(size=4096) as mapping:
        with pytest.raises(TypeError):
            fmap.wait_any([e, mapping])
    for bad in (e, "ab", 3):
        with pytest.raises(TypeError):
            fmap.wait_any(bad)
    with pytest.raises(ValueError):
        fmap.wait_any([e], timeout=-1)


# ---- one namespace, names, lifetime ------------------------------------

@pytest.mark.parametrize("cls", [fmap.Mutex, fmap.Semaphore, fmap.Event])
def test_wrong_type_with_a_mapping_both_ways(name, cls):
    with fmap.create(name, size=100):
        with pytest.raises(fmap.WrongTypeError) as ei:
            cls.create(name)
        assert ei.value.winerror == ERROR_INVALID_HANDLE
        with pytest.raises(fmap.WrongTypeError):
            cls.open(name)
    with closing(cls.create(None)) as unnamed:
        assert unnamed.name is None
    obj = cls.create(name)
    try:
        with pytest.raises(fmap.WrongTypeError):
            fmap.create(name, size=100)
        with pytest.raises(fmap.WrongTypeError):
            fmap.open(name)
        for other in {fmap.Mutex, fmap.Semaphore, fmap.Event} - {cls}:
            with pytest.raises(fmap.WrongTypeError):
                other.create(name)
            with pytest.raises(fmap.WrongTypeError):
                other.open(name)
    finally:
        obj.close()


def test_existing_parameters_win(name, closer):
    s = fmap.Semaphore.create(name + "s", 2, 7)
    closer(s)
    s2 = fmap.Semaphore.create(name + "s", 0, 1)
    closer(s2)
    assert (s2.created, s2.maximum, s2.count) == (False, 7, 2)
    with pytest.raises(FileExistsError) as ei:
        fmap.Semaphore.create(name + "s", exclusive=True)
    assert ei.value.winerror == ERROR_ALREADY_EXISTS
    e = fmap.Event.create(name + "e", manual_reset=True, initial=True)
    closer(e)
    e2 = fmap.Event.create(name + "e")
    closer(e2)
    assert (e2.created, e2.manual_reset, e2.is_set()) == (False, True, True)
    m = fmap.Mutex.create(name + "m")
    closer(m)
    m2 = fmap.Mutex.open(name + "m")
    closer(m2)
    assert m2.created is False
    with m2:                              # two handles, one mutex
        assert m.owned and in_thread(m.acquire, 0) is False


def test_name_goes_with_last_handle(name):
    s = fmap.Semaphore.create(name, 3, 5)
    s2 = fmap.Semaphore.open(name)
    s.close()
    assert s2.count == 3
    s2.close()
    with pytest.raises(FileNotFoundError):
        fmap.Semaphore.open(name)
    with closing(fmap.Semaphore.create(name, 0, 1)) as fresh:
        assert fresh.created and fresh.count == 0 and fresh.maximum == 1


def test_closed_handles(name):
    objs = [fmap.Mutex.create(name + "m"), fmap.Semaphore.create(name + "s", 0, 1),
            fmap.Event.create(name + "e")]
    for h in objs:
        h.close()
        h.close()                         # idempotent
        assert h.closed and "closed" in repr(h)
    calls = [objs[0].acquire, objs[0].release, objs[1].acquire, objs[1].release,
             objs[2].wait, objs[2].set, objs[2].reset, objs[2].is_set,
             lambda: fmap.wait_any(objs)]
    for call in calls:
        with pytest.raises(ValueError) as ei:
            call()
        assert ei.value.winerror == ERROR_INVALID_HANDLE


def test_close_while_another_thread_waits(name):
    e = fmap.Event.create(name)
    errors = []

    def waiter():
        try:
            e.wait()
        except ValueError as exc:
            errors.append(exc)

    t = start_thread(waiter)              # waits forever: close() must end it
    e.close()
    join([t])
    assert len(errors) == 1


def test_close_owned_mutex_keeps_it_owned(name, closer):
    """Closing a handle does not release the mutex (as on Windows); when the
    owning thread ends, the next acquirer is told it was abandoned."""
    m = fmap.Mutex.create(name)
    closer(m)

    def own_and_close():
        h = fmap.Mutex.open(name)
        h.acquire()
        h.close()
        return m.acquire(0)               # recursive through the other handle

    assert in_thread(own_and_close) is True
    assert m.acquire(timeout=5) is True and m.abandoned
    m.release()


def test_pickled_handles_in_one_process(name, closer):
    named = fmap.Event.create(name)
    unnamed = fmap.Semaphore.create(None, 1, 2)
    closer(named)
    closer(unnamed)
    a = pickle.loads(pickle.dumps(named))
    b = pickle.loads(pickle.dumps(unnamed))
    closer(a)
    closer(b)
    a.set()
    assert named.wait(0) and b.acquire(0) and unnamed.count == 0


def test_timeouts_and_spin_are_checked(name, closer):
    m = fmap.Mutex.create(name)
    closer(m)
    for bad in (-1, -0.5, float("nan")):
        with pytest.raises(ValueError):
            m.acquire(bad)
    for bad in ("1", b"", [], True):
        with pytest.raises(TypeError):
            m.acquire(bad)
    for bad in (-1, 2e6, float("nan")):
        with pytest.raises(ValueError):
            m.acquire(spin=bad)
    assert m.acquire(float("inf"), spin=0) and m.acquire(1 << 100, spin=1.5)
    m.release()
    m.release()


def test_names_follow_the_mapping_rules(name, closer):
    m = fmap.Mutex.create("Local\\" + name)
    closer(m)
    m2 = fmap.Mutex.open(name)            # "Local\\x" and "x" are one object
    closer(m2)
    assert m2.created is False
    with pytest.raises(ValueError):
        fmap.Mutex.create("a\\b")
    with pytest.raises(ValueError):
        fmap.Event.open("")
    with pytest.raises(TypeError):
        fmap.Semaphore.create(3)
    for cls in (fmap.Mutex, fmap.Semaphore, fmap.Event):
        with pytest.raises(TypeError):
            cls()


# ---- fuzzing --------------------------------------------------------------

_anything = st.one_of(st.none(), st.booleans(), st.integers(-5, 10), st.integers(),
                      st.floats(allow_nan=True), st.text(max_size=3), st.binary(max_size=3))


def _real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


@settings(max_examples=150, deadline=None)
@given(initial=_anything, maximum=_anything, release=_anything)
def test_fuzz_semaphore_arguments(initial, maximum, release):
    valid = (type(initial) is int and type(maximum) is int and
             0 <= initial <= maximum and 1 <= maximum <= sync.SEMAPHORE_MAX)
    try:
        s = fmap.Semaphore.create(None, initial, maximum)
    except (ValueError, TypeError):
        assert not valid
        return
    assert valid and (s.count, s.maximum) == (initial, maximum)
    try:
        prev = s.release(release)
    except (ValueError, TypeError):
        assert s.count == initial         # a refused release changes nothing
        assert not (type(release) is int and 1 <= release <= maximum - initial)
    else:
        assert prev == initial and s.count == initial + release <= maximum
    finally:
        s.close()


@settings(max_examples=150, deadline=None)
@given(timeout=_anything, spin=_anything, which=st.sampled_from("mse"))
def test_fuzz_wait_arguments(timeout, spin, which):
    valid = (timeout is None or _real(timeout) and timeout >= 0) and \
        (spin is None or _real(spin) and 0 <= spin <= 1e6)
    if timeout is None or _real(timeout) and timeout > 0.01:
        timeout = 0.01                    # valid and long: keep the test short
    h = {"m": lambda: fmap.Mutex.create(None, owned=True),
         "s": lambda: fmap.Semaphore.create(None, 0, 1),
         "e": lambda: fmap.Event.create(None)}[which]()
    wait = h.wait if which == "e" else h.acquire
    try:
        result = wait(timeout, spin=spin)
    except (ValueError, TypeError):
        assert not valid
    else:
        assert valid and result is (which == "m")   # only the owner's own mutex is free
    finally:
        h.close()


@settings(max_examples=100, deadline=None)
@given(manual=_anything, initial=_anything, exclusive=_anything, owned=_anything)
def test_fuzz_create_flags(manual, initial, exclusive, owned):
    # Flags are truth values, as in the Windows API's BOOL parameters.
    with fmap.Event.create(None, manual_reset=manual, initial=initial,
                           exclusive=exclusive) as e:
        assert e.manual_reset == bool(manual) and e.is_set() == bool(initial)
    m = fmap.Mutex.create(None, owned=owned, exclusive=exclusive)
    assert m.owned == bool(owned)
    if m.owned:
        m.release()
    m.close()


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=12))
def test_fuzz_names(text):
    try:
        e = fmap.Event.create("fz-" + text)
    except ValueError:
        return
    with e:
        assert e.name == "fz-" + text
        with pytest.raises(fmap.WrongTypeError):
            fmap.Mutex.open("fz-" + text)


@pytest.mark.parametrize("kind", ["mutex", "event", "semaphore"])
def test_a_header_rewritten_after_open_changes_nothing(kind):
    # The type, flags and maximum are read once, when a handle opens the
    # object, and kept in the handle: a process rewriting them in the page
    # later cannot make the handle act as another kind of object.  Before,
    # an owned mutex retyped as an event was unmapped by close() while
    # glibc's robust list still pointed into it, and the next robust lock
    # (the registry's) segfaulted.  In a child, so that a crash fails this
    # test only.
    from children import run_python
    code = f"""
import mmap, os, struct
import fmap
MUTEX, SEMAPHORE, EVENT, MANUAL = 2, 3, 4, 2     # fmap.h
TYPE_AT, FLAGS_AT, MAXIMUM_AT = 12, 20, 24       # struct sync_page, sync_linux.c
kind = {kind!r}
if kind == "mutex":
    obj = fmap.Mutex.create()
elif kind == "event":
    obj = fmap.Event.create()                     # auto reset
else:
    obj = fmap.Semaphore.create(None, 0, 1)
fd = obj.__reduce__()[1][4]
with open(f"/proc/self/fd/{{fd}}", "r+b") as f:
    page = mmap.mmap(f.fileno(), 4096)
pk = lambda at, v: struct.pack_into("=I", page, at, v)
if kind == "mutex":
    obj.acquire()
    pk(TYPE_AT, EVENT)
    obj.close()                                   # still owned: the page stays mapped
    fmap.Event.create("fmap-test-retyped-" + str(os.getpid())).close()
    print("ok")
elif kind == "event":
    pk(TYPE_AT, MUTEX)
    pk(FLAGS_AT, MANUAL)
    print(obj.wait(0))                            # unset: False (not a free mutex)
    obj.set()
    print(obj.wait(0), obj.wait(0))               # auto reset still: True False
else:
    pk(TYPE_AT, MUTEX)
    pk(MAXIMUM_AT, 100)
    print(obj.acquire(0))                         # count 0: False (not a free mutex)
    obj.release()
    try:
        obj.release()                             # over the maximum of 1
    except ValueError as exc:
        print(exc.winerror)                       # 298, ERROR_TOO_MANY_POSTS
"""
    done = run_python(code)
    assert done.returncode == 0, (done.returncode, done.stderr.decode())
    assert done.stdout.split() == {"mutex": [b"ok"], "event": [b"False", b"True", b"False"],
                                   "semaphore": [b"False", b"298"]}[kind]


MUTEX_PAGE = """
import mmap, os, random, struct, subprocess, sys
import fmap
LOCK_AT = 88                                     # struct sync_page: st (64) + 24, sync_linux.c
WAITERS, TID_MASK = 0x80000000, 0x3FFFFFFF       # rlock_linux.h
m = fmap.Mutex.create()
fd = m.__reduce__()[1][4]
with open(f"/proc/self/fd/{fd}", "r+b") as f:
    page = mmap.mmap(f.fileno(), 4096)
def forge(word):
    struct.pack_into("=Q", page, LOCK_AT, word)
def dead_tid():
    p = subprocess.Popen(["true"])
    p.wait()                                     # reaped: its id names nobody now
    return p.pid
def alive(tid):
    try:
        os.kill(tid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
"""


@pytest.mark.parametrize("forge", ["beside", "dead-owner", "any-word"])
def test_a_forged_mutex_page_costs_the_mutex_not_the_process(forge):
    # Any holder of a mutex can write its page.  The mutex was a robust
    # pthread mutex, whose robust-list links sat in the page: glibc follows
    # them on unlock, so forged links made release() write anywhere (a
    # segfault), and a lock word naming a dead thread without the kernel's
    # owner-died bit blocked every acquirer for good.  Now the page holds one
    # lock word, never used as an address, and an owner that is gone is
    # noticed by the next taker.  In a child, so that a crash fails this test
    # only.
    from children import run_python
    code = MUTEX_PAGE + f"""
forge_kind = {forge!r}
if forge_kind == "beside":
    # Everything after the lock word (where glibc kept its list links), while
    # owned; the release and the next owner must not care.
    m.acquire()
    page[LOCK_AT + 8:] = bytes((i * 37 + 11) & 0xFF for i in range(4096 - LOCK_AT - 8))
    m.release()
    print(m.acquire(0), m.abandoned, m.owned)
    m.release()
elif forge_kind == "dead-owner":
    forge(dead_tid() | 12345 << 32)
    print("abandoned" in repr(m), m.acquire(timeout=5), m.abandoned)
    m.release()
    print(m.acquire(0), m.abandoned)
    m.release()
else:
    # Any value at all in the lock word, nobody owning the mutex in truth:
    # it is taken (free, gone or "our own" owner) unless the word names a
    # live thread, and then the wait times out; a taken one is released.
    rnd = random.Random(7)
    me = os.getpid()
    words = [0, 2**64 - 1, WAITERS, TID_MASK, 1, me, me | WAITERS, 1 << 32, me | 5 << 32]
    words += [rnd.getrandbits(64) for _ in range(400)]
    words += [rnd.getrandbits(32) << 32 | rnd.randrange(1, 40000) for _ in range(400)]
    taken = busy = 0
    for w in words:
        forge(w)
        tid = w & TID_MASK
        alive_before = tid and alive(tid)
        if m.acquire(timeout=0.02):
            taken += 1
            m.release()
            assert struct.unpack_from("=Q", page, LOCK_AT)[0] == 0, hex(w)
        else:
            busy += 1
            # (a thread may come or go during the attempt: asked on both sides)
            assert tid and tid != me and (alive_before or alive(tid)), hex(w)
    forge(0)
    print(taken > 700, busy >= 1)
    print(m.acquire(0), m.abandoned)
"""
    done = run_python(code)
    assert done.returncode == 0, (done.returncode, done.stderr.decode())
    assert done.stdout.split() == {"beside": [b"True", b"False", b"True"],
                                   "dead-owner": [b"True", b"True", b"True", b"True", b"False"],
                                   "any-word": [b"True", b"True", b"True", b"False"]}[forge]


def test_a_mutex_owner_that_execs_abandons_it(closer):
    # exec() keeps the thread's id and start time but not the program: a
    # mutex its thread owned is abandoned, as the kernel's robust list made
    # it.  (The lock asks where the owner's stack starts, which every exec
    # places anew.)
    import os
    import time
    m = fmap.Mutex.create()
    closer(m)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                              # pragma: no cover - the child
        try:
            m.acquire()
            os.write(w, b"x")
            os.execv("/bin/sleep", ["sleep", "30"])
        finally:
            os._exit(1)
    try:
        os.close(w)
        assert os.read(r, 1) == b"x"
        deadline = time.monotonic() + 10
        while open(f"/proc/{pid}/comm").read().strip() != "sleep":   # exec done
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert m.acquire(timeout=5) and m.abandoned
        m.release()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(r)


def test_without_proc_a_live_owner_keeps_the_mutex():
    # Where /proc cannot show the owner (not mounted here; hidepid or another
    # user elsewhere), nothing says it is gone: it keeps the mutex.  A first
    # version took that for a dead owner and let a second thread in.
    import shutil
    import subprocess
    import sys
    import os
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to hide /proc")
    code = """
import threading, fmap
m = fmap.Mutex.create()
m.acquire()
got = []
t = threading.Thread(target=lambda: got.append(m.acquire(timeout=0.3)))
t.start()
t.join()
print(got, m.owned)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(["unshare", "-m", "sh", "-c", 'umount -l /proc && exec "$0" -c "$1"',
                           sys.executable, code], capture_output=True, timeout=60, env=env)
    if done.returncode != 0 and b"unshare" in done.stderr:
        pytest.skip(f"unshare failed: {done.stderr.decode()[-200:]}")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.split() == [b"[False]", b"True"]


def test_open_refuses_a_mismatched_header(name, closer):
    import mmap
    import os
    m = fmap.Mutex.create(name)
    closer(m)
    # Find the object's memfd among our fds by its label and break the version.
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"/memfd:fmap-mutex:{name} "):
            break
    else:
        pytest.fail("the mutex's memfd was not found")
    with open(f"/proc/self/fd/{fd}", "r+b") as f, mmap.mmap(f.fileno(), 4096) as page:
        assert page[:8] == b"FMAPSYN\x01"
        page[8] ^= 0xFF                   # version
        with pytest.raises(OSError) as ei:
            fmap.Mutex.open(name)
        assert ei.value.winerror == 1392 and "header" in str(ei.value)
        page[8] ^= 0xFF
    fmap.Mutex.open(name).close()
