"""Several processes, one object: names, pickling and fork() share the memory
(DESIGN.md contract 6 and 7, "Handles follow fork()").

Real separate processes (multiprocessing spawn and fork, os.fork, python -c);
every wait is bounded (children.py).
"""
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import time

import numpy as np
import pytest

import fmap
from fmap import _fmap
from children import join, poll, run_python, wait_pid

CONTEXTS = ["spawn", "fork"]
Q_TIMEOUT = 30


def _report(q, fn, *args):
    """Run fn in a child and put ("ok", result) or ("error", repr) on q."""
    try:
        q.put(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent
        q.put(("error", f"{type(exc).__name__}: {exc}"))


def _result(q, proc):
    """The child's result; the child is killed if it does not deliver in time."""
    try:
        status, value = q.get(timeout=Q_TIMEOUT)
        assert join(proc) == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert status == "ok", value
    return value


def _run(ctx_name, fn, *args):
    ctx = multiprocessing.get_context(ctx_name)
    q = ctx.Queue()
    p = ctx.Process(target=_report, args=(q, fn) + args)
    p.start()
    return _result(q, p)


# ---- by name -----------------------------------------------------------------

def _open_by_name(name):
    m = fmap.open(name)
    with m.map() as v:
        a = v.asarray("float64", shape=(1024,))
        seen = bytes(v[8192:8197]), bool((a == np.arange(1024.0)).all())
        a[:] *= -1                      # the parent reads these through its own view
        v[8197:8202] = b"child"
        del a
    sizes = m.size, m.created
    m.close()
    return seen + sizes


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_child_opens_by_name_and_both_see_writes(ctx, name):
    with fmap.create(name, size=10_000) as m, m.map() as v:
        a = v.asarray("float64", shape=(1024,))
        a[:] = np.arange(1024.0)
        v[8192:8197] = b"paren"
        hello, array_ok, size, created = _run(ctx, _open_by_name, name)
        assert (hello, array_ok) == (b"paren", True)
        assert (size, created) == (10_000, False)
        # the child's writes, through the view mapped before the child started
        assert (a == -np.arange(1024.0)).all()
        assert v[8192:8202] == b"parenchild"
        del a


def _two_views_each(name, me, nprocs, deadline_s):
    with fmap.open(name) as m:
        return _two_views_body(m, me, nprocs, deadline_s)


def _two_views_body(m, me, nprocs, deadline_s):
    """Write my slots through each of two views, then wait until every slot of
    every process is visible through both views; no flush, no remapping."""
    whole = m.map()                                   # offset 0, to the end
    upper = m.map(offset=fmap.ALLOCATION_GRANULARITY)  # the second granule only
    a0 = whole.asarray("uint64")[fmap.ALLOCATION_GRANULARITY // 8:]
    a1 = upper.asarray("uint64")
    a0[2 * me] = 1000 + me            # slot (me, view 0)
    a1[2 * me + 1] = 2000 + me        # slot (me, view 1)
    want = np.array([[1000 + i, 2000 + i] for i in range(nprocs)], dtype="uint64").ravel()
    deadline = time.monotonic() + deadline_s
    while not ((a0[:2 * nprocs] == want).all() and (a1[:2 * nprocs] == want).all()):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {me} sees {a0[:2 * nprocs]} / {a1[:2 * nprocs]}")
        time.sleep(0.001)
    del a0, a1
    whole.close()
    upper.close()
    return me


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_three_processes_two_views_each_see_each_other(ctx, name):
    c = multiprocessing.get_context(ctx)
    nprocs = 3        # the parent and two children
    q = c.Queue()
    with fmap.create(name, size=2 * fmap.ALLOCATION_GRANULARITY) as m:
        procs = [c.Process(target=_report, args=(q, _two_views_each, name, me, nprocs, 20))
                 for me in (1, 2)]
        for p in procs:
            p.start()
        try:
            assert _two_views_body(m, 0, nprocs, 20) == 0
            results = sorted(_result(q, p) for p in procs)
            assert results == [1, 2]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)


def _open_then_create(name):
    try:
        fmap.open(name)
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("opened a name whose last handle was closed")
    with fmap.create(name, size=4096) as m, m.map() as v:
        fresh = (m.created, bytes(v[:8]))
        v[:8] = b"newobjct"
    return fresh


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_name_goes_with_last_handle_while_a_view_lives(ctx, name):
    # Contract 7 across processes: a view keeps the memory, not the name.
    m = fmap.create(name, size=4096)
    v = m.map()
    v[:8] = b"oldobjct"
    m.close()
    assert _run(ctx, _open_then_create, name) == (True, bytes(8))
    assert v[:8] == b"oldobjct"          # another object: ours is untouched
    v.close()


# ---- pickling ----------------------------------------------------------------

def _use_passed(named, unnamed, readonly):
    out = []
    for m in (named, unnamed):
        with m.map() as v:
            out.append(bytes(v[:6]))
            v[6:12] = b"-child"
        out.append((m.name, m.size, m.access))
    try:
        readonly.map("rw")
    except PermissionError:
        out.append("denied")
    with readonly.map() as v:
        out.append(bytes(v[:12]))
    for m in (named, unnamed, readonly):
        m.close()
    return out


def test_pickled_mappings_reach_a_spawned_child(name):
    c = multiprocessing.get_context("spawn")
    q = c.Queue()
    with fmap.create(name, size=5000) as named, fmap.create(size=7000) as unnamed, \
            named.map() as nv, unnamed.map() as uv:
        nv[:6] = b"named:"
        uv[:6] = b"anon: "
        ro = fmap.open(name, access="r")
        # Process args are pickled at start(): a named mapping travels by name,
        # an unnamed one through this process's fd (held open until the child has it).
        p = c.Process(target=_report, args=(q, _use_passed, named, unnamed, ro))
        p.start()
        out = _result(q, p)
        ro.close()
        assert out[0] == b"named:" and out[1] == (name, 5000, "rw")
        assert out[2] == b"anon: " and out[3] == (None, 7000, "rw")
        assert out[4] == "denied" and out[5] == b"named:-child"
        assert nv[:12] == b"named:-child"
        assert uv[:12] == b"anon: -child"


def _unpickle_and_read(blob):
    m = pickle.loads(blob)
    with m.map() as v:
        data = bytes(v[:4])
    m.close()
    return data


def test_pickled_unnamed_mapping_needs_the_sender_alive():
    # The receiver reaches the object through the sender's fd: once the sender
    # closed it, unpickling fails cleanly (FileNotFoundError), never wrongly.
    m = fmap.create(size=4096)
    with m.map() as v:
        v[:4] = b"abcd"
    blob = pickle.dumps(m)
    assert _run("spawn", _unpickle_and_read, blob) == b"abcd"
    m.close()
    with pytest.raises(FileNotFoundError):
        _run_raising("spawn", _unpickle_and_read, blob)


def test_pickled_name_reincarnated_is_refused(name):
    # A pickle names one object; a new object under the same name is not it.
    m = fmap.create(name, size=4096)
    blob = pickle.dumps(m)
    m.close()
    with fmap.create(name, size=4096) as again:
        assert again.created
        with pytest.raises(FileNotFoundError, match="gone"):
            _run_raising("spawn", _unpickle_and_read, blob)


def _run_raising(ctx_name, fn, *args):
    """_run, re-raising the child's exception class by name (builtins only)."""
    import builtins
    ctx = multiprocessing.get_context(ctx_name)
    q = ctx.Queue()
    p = ctx.Process(target=_report, args=(q, fn) + args)
    p.start()
    try:
        status, value = q.get(timeout=Q_TIMEOUT)
        assert join(p) == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
    if status == "ok":
        return value
    cls, _, msg = value.partition(": ")
    raise getattr(builtins, cls, RuntimeError)(msg)


# ---- fork() ---------------------------------------------------------------

def _fork_with_pipes(child):
    """os.fork(); the child runs child(rd, wr) and _exit()s (0 on success).
    Returns (pid, rd, wr) of the parent's ends."""
    p2c_r, p2c_w = os.pipe()
    c2p_r, c2p_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(p2c_w)
            os.close(c2p_r)
            child(p2c_r, c2p_w)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the pipe
            try:
                os.write(c2p_w, f"error {type(exc).__name__}: {exc}\n".encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(p2c_r)
    os.close(c2p_w)
    return pid, c2p_r, p2c_w


def _read_line(fd, timeout=Q_TIMEOUT):
    import select
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line from the child within {timeout} s (got {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"the child closed its pipe (got {buf!r})")
        buf += chunk
    line = buf.decode().strip()
    assert not line.startswith("error"), line
    return line


def test_forked_child_holds_the_handles_after_the_parent_closes(name):
    m = fmap.create(name, size=4096)
    with m.map() as v:
        v[:6] = b"parent"

    def child(rd, wr):
        assert os.read(rd, 1) == b"c"              # the parent has closed its handle
        assert not m.closed                        # inherited, still ours
        again = fmap.open(name)                    # the name lives: we hold it
        with again.map() as v:
            assert v[:6] == b"parent"
            v[6:11] = b"+fork"
        again.close()
        os.write(wr, b"opened\n")
        assert os.read(rd, 1) == b"x"
        # exit without closing m: like a crash, the kernel drops our fd

    pid, rd, wr = _fork_with_pipes(child)
    try:
        m.close()           # right after fork: the child's pending record keeps the name
        os.write(wr, b"c")
        assert _read_line(rd) == "opened"
        listed = {key: holders for key, _, _, holders in _fmap.registry_list()}
        assert listed.get(b"L" + name.encode()) == 1, "the child is the one holder"
        with fmap.open(name) as m2, m2.map() as v:
            assert v[:11] == b"parent+fork"
            assert not m2.created
        os.write(wr, b"x")
        assert wait_pid(pid) == 0
    finally:
        os.close(rd)
        os.close(wr)
    # the child was the last holder and is gone: so is the name
    with pytest.raises(FileNotFoundError):
        fmap.open(name)


def _open_after_parent_closed(name, closed):
    assert closed.wait(Q_TIMEOUT)
    with fmap.open(name) as m, m.map() as v:
        return bytes(v[:5])


def test_fork_context_child_holds_the_name(name):
    c = multiprocessing.get_context("fork")
    q = c.Queue()
    closed = c.Event()
    m = fmap.create(name, size=4096)
    with m.map() as v:
        v[:5] = b"hello"
    p = c.Process(target=_report, args=(q, _open_after_parent_closed, name, closed))
    p.start()
    m.close()
    closed.set()
    assert _result(q, p) == b"hello"


def test_forked_child_closing_its_copy_keeps_the_parents_name(name):
    # A forked child never tears down its parent's objects (STYLE.md Lifetimes).
    with fmap.create(name, size=4096) as m:
        def child(rd, wr):
            m.close()
            os.write(wr, b"closed\n")

        pid, rd, wr = _fork_with_pipes(child)
        try:
            assert _read_line(rd) == "closed"
            assert wait_pid(pid) == 0
        finally:
            os.close(rd)
            os.close(wr)
        out = run_python(f"import fmap; m = fmap.open({name!r}); print(m.size)")
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.strip() == b"4096"


EXEC_SOCKET = """
import os, socket, time
s = socket.socket()
os.dup2(s.fileno(), FD)     # the inherited fd number now names a socket
time.sleep(60)
"""


def test_child_that_execs_after_fork_never_blocks_open(name):
    # The forked child claims a holder record, then exec() closes the
    # (close-on-exec) fd and the new program reuses its number: the record is
    # stale, and opening through it (ENXIO for a socket) must just skip it.
    with fmap.create(name, size=4096) as m:
        code = EXEC_SOCKET.replace("FD", str(m.fileno()))
        pid = os.fork()
        if pid == 0:
            try:
                os.execv(sys.executable, [sys.executable, "-c", code])
            finally:
                os._exit(127)
        try:
            assert _socket_at(pid, m.fileno())
            with fmap.open(name) as again:
                assert not again.created
        finally:
            os.kill(pid, signal.SIGKILL)
            wait_pid(pid)


def _socket_at(pid, fd, timeout=Q_TIMEOUT):
    """Wait until the exec'd child pid has put a socket at fd."""
    def socket_there():
        try:
            return os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            return False
    return poll(socket_there, timeout=timeout)


def test_unpickling_after_the_fd_number_was_reused_by_a_socket():
    m = fmap.create(size=4096)
    fd = m.fileno()
    blob = pickle.dumps(m)
    m.close()
    s = socket.socket()
    try:
        if s.fileno() != fd:
            os.dup2(s.fileno(), fd)
        with pytest.raises(FileNotFoundError, match="no longer holds it"):
            _run_raising("spawn", _unpickle_and_read, blob)
    finally:
        if s.fileno() != fd:
            os.close(fd)
        s.close()


def test_unnamed_mapping_is_inherited_by_fork():
    u = fmap.create(size=3 * 4096)
    v = u.map()
    v[:6] = b"parent"

    def child(rd, wr):
        with u.map() as w:                       # a new view through the inherited handle
            assert w[:6] == b"parent"
            w[4096:4101] = b"child"
        v[8192:8199] = b"through"                # the inherited view is shared too
        u.close()
        os.write(wr, b"done\n")

    pid, rd, wr = _fork_with_pipes(child)
    try:
        assert _read_line(rd) == "done"
        assert wait_pid(pid) == 0
    finally:
        os.close(rd)
        os.close(wr)
    assert v[4096:4101] == b"child"
    assert v[8192:8199] == b"through"
    v.close()
    u.close()


# ---- access ----------------------------------------------------------------

def _readonly_child(name):
    out = []
    m = fmap.open(name, access="r")
    try:
        m.map("rw")
    except PermissionError as exc:
        out.append(("rw", getattr(exc, "winerror", None)))
    v = m.map()
    a = v.asarray()
    out.append(("view", v.access, memoryview(v).readonly, a.flags.writeable, v[:4]))
    try:
        v[0] = 1
    except TypeError:
        out.append("setitem refused")
    try:
        a[0] = 1
    except ValueError:
        out.append("array refused")
    del a
    v.close()
    m.close()
    # an "r"-protected object: even an "rw" request gets an "r" handle
    r = fmap.open(name + "-ro", access="rw")
    out.append(("capped", r.access))
    try:
        r.map("rw")
    except PermissionError:
        out.append("capped refused")
    r.close()
    return out


def test_read_only_handle_in_another_process_cannot_write(name):
    with fmap.create(name, size=4096) as m, fmap.create(name + "-ro", size=4096, protect="r") as r, \
            m.map() as v:
        v[:4] = b"safe"
        out = _run("spawn", _readonly_child, name)
        assert out[0] == ("rw", 5)
        assert out[1] == ("view", "r", True, False, b"safe")
        assert out[2:] == ["setitem refused", "array refused", ("capped", "r"), "capped refused"]
        assert v[:4] == b"safe"


# ---- exiting with live objects ------------------------------------------------

LIVE_AT_EXIT = {
    "globals": """
import fmap
m = fmap.create(NAME, size=1 << 20)
u = fmap.create(size=65536)
v = m.map(); w = m.map("r"); uv = u.map()
mv = memoryview(v)
a = v.asarray("float32", shape=(512, 512)); a[:] = 1
b = uv.asarray("uint8")
ro = fmap.open(NAME, access="r")
print("ok")
""",
    "cycle": """
import gc, fmap
gc.disable()
class Box:
    pass
box = Box()
box.self = box
box.m = fmap.create(NAME, size=1 << 16)
box.v = box.m.map()
box.a = box.v.asarray("int64")
box.mv = memoryview(box.v)[10:20]
box.a[:] = 7
del box
print("ok")
""",
    "closed-mapping-open-view": """
import fmap
m = fmap.create(NAME, size=1 << 16)
v = m.map()
a = v.asarray()
m.close()
a[:] = 3
print("ok")
""",
    "forked-child-exits-normally": """
import os, sys, fmap
m = fmap.create(NAME, size=1 << 16)
v = m.map(); a = v.asarray(); a[:] = 5
pid = os.fork()
if pid == 0:
    sys.exit(0)           # full interpreter shutdown with the inherited objects
_, status = os.waitpid(pid, 0)
assert status == 0, status
assert fmap.open(NAME).size == 1 << 16      # the child's exit left our name alone
print("ok")
""",
    "daemon-thread-writing": """
import threading, time, fmap
m = fmap.create(NAME, size=1 << 20)
v = m.map()
a = v.asarray()
started = threading.Event()
def spin():
    started.set()
    while True:
        a[:] += 1
threading.Thread(target=spin, daemon=True).start()
started.wait(10)
time.sleep(0.05)
print("ok")
""",
    "finalizer-reads-array": """
import fmap
class Box:
    def __del__(self):
        assert int(self.a.sum()) == 4096      # the view is still mapped under it
box = Box()
box.self = box
box.m = fmap.create(NAME, size=4096)
box.v = box.m.map()
box.a = box.v.asarray()
box.a[:] = 1
del box
print("ok")
""",
    "sync-and-mapping": """
import fmap
m = fmap.create(NAME, size=4096)
mx = fmap.Mutex.create(NAME + "-mutex")
mx.acquire()
v = m.map()
print("ok")
""",
}


@pytest.mark.parametrize("case", sorted(LIVE_AT_EXIT))
def test_exit_with_live_objects_prints_nothing(case, name):
    # uvloop tests/test_dealloc.py: a process that exits holding everything
    # must neither crash nor print a traceback or an "Exception ignored" line.
    out = run_python(LIVE_AT_EXIT[case].replace("NAME", repr(name)))
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"ok\n"
    assert out.stderr == b""
    with pytest.raises(FileNotFoundError):
        fmap.open(name)         # and its names went with it
