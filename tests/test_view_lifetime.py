"""Views, buffer exports and NumPy: who keeps a view's memory, and what a stale
reference sees after close (DESIGN.md: Views, exports and NumPy)."""
import copy
import ctypes
import gc
import pickle
import sys
import warnings

import numpy as np
import pytest

import fmap
from children import run_python
from conftest import raises

ERROR_INVALID_PARAMETER = 87
SIZE = 3 * fmap.PAGE_SIZE + 100


@pytest.fixture
def mapping(closer):
    return closer(fmap.create(size=SIZE))


# ---- close() and exports

def test_close_refused_while_memoryview_lives(mapping):
    v = mapping.map()
    mv = memoryview(v)
    mv2 = memoryview(v)
    with raises(BufferError) as info:
        v.close()
    msg = str(info.value)
    assert "2 other buffer(s)" in msg and "memoryview" in msg
    assert not v.closed
    mv[0] = 5                                # still mapped and usable
    assert v[0] == 5
    mv.release()
    with raises(BufferError, match="1 other buffer"):
        v.close()
    mv2.release()
    v.close()
    assert v.closed


def test_memoryview_slices_share_one_export(mapping):
    v = mapping.map()
    with memoryview(v) as mv:
        part = mv[10:20]
        with raises(BufferError, match="1 other buffer"):
            v.close()
        part.release()
    v.close()


def test_memoryview_context_manager_releases(mapping):
    v = mapping.map()
    with memoryview(v) as mv:
        mv[:2] = b"ok"
    v.close()


def test_close_refused_while_array_lives(mapping):
    v = mapping.map()
    a = v.asarray("float32", shape=(2, 10))
    with raises(BufferError) as info:
        v.close()
    msg = str(info.value)
    assert "1 NumPy array" in msg and "float32" in msg
    assert not v.closed
    del a
    v.close()


def test_close_message_names_arrays_and_memoryviews(mapping):
    v = mapping.map()
    a = v.asarray()
    b = v.asarray("uint16", shape=4)
    mv = memoryview(v)
    with raises(BufferError) as info:
        v.close()
    msg = str(info.value)
    assert "2 NumPy array" in msg and "1 other buffer" in msg
    del a, b
    mv.release()
    v.close()


def test_close_message_counts_only_live_arrays(mapping):
    # asarray() keeps a record per array for this message and drops the dead
    # ones in batches: many short-lived arrays must neither be counted nor pile up.
    v = mapping.map()
    keep = v.asarray("uint16", shape=(3, 5))
    for i in range(1000):
        v.asarray("float32" if i % 2 else np.int8)
    with raises(BufferError) as info:
        v.close()
    assert "1 NumPy array(s) from asarray() (uint16[3, 5])" in str(info.value)
    assert "other buffer" not in str(info.value)
    del keep
    v.close()


def test_asarray_dtype_forms_agree(mapping):
    v = mapping.map()
    for spec in ("<u2", "uint16", np.uint16, np.dtype("uint16")):
        a = v.asarray(spec, shape=4)
        assert a.dtype == np.dtype("uint16") and a.shape == (4,)
    a = v.asarray("(2,3)i4", shape=2)        # a subarray dtype adds its dimensions
    assert a.shape == (2, 2, 3) and a.dtype == np.dtype("i4")


def test_context_manager_exit_refuses_with_live_export(mapping):
    with pytest.raises(BufferError):
        with mapping.map() as v:
            mv = memoryview(v)
    assert not v.closed
    mv.release()
    v.close()


def test_array_holds_export_through_reshape_and_slices(mapping):
    v = mapping.map()
    a = v.asarray("uint8", shape=(3, fmap.PAGE_SIZE))
    s = a[1:2, ::2].reshape(-1)[5:]
    t = a.T
    del a
    gc.collect()
    # The message names the array by the shape asarray() gave it, not the flat base.
    with raises(BufferError, match=r"uint8\[3, %d\]" % fmap.PAGE_SIZE):
        v.close()
    del t
    with raises(BufferError, match="NumPy array"):
        v.close()
    s[0] = 42
    assert v[fmap.PAGE_SIZE + 10] == 42
    del s
    v.close()


def test_array_copy_does_not_hold_export(mapping):
    v = mapping.map()
    v[0] = 9
    c = v.asarray().copy()
    v.close()
    assert c[0] == 9


def test_exports_of_mapping_closed_first(closer, name):
    m = fmap.create(name, size=SIZE)
    v = closer(m.map())
    a = v.asarray()
    m.close()
    a[:3] = [1, 2, 3]
    assert v[:3] == b"\1\2\3"
    with raises(BufferError):
        v.close()
    del a


# ---- stale references after close

def test_stale_ndarray_reads_zeros_and_writes_nowhere(mapping, closer):
    v = mapping.map()
    other = closer(mapping.map())
    v[:4] = b"data"
    stale = np.ndarray((SIZE,), np.uint8, buffer=v)   # holds no export
    assert bytes(stale[:4]) == b"data"
    v.close()                                         # allowed: no export
    assert stale.base is v
    assert not stale.any()                            # zeros, no crash
    stale[:] = 0xEE                                   # writes go nowhere shared
    assert other[:4] == b"data"
    assert other[4:] == bytes(SIZE - 4)
    fresh = closer(mapping.map())
    assert fresh[:4] == b"data"


def test_address(mapping, closer):
    v = mapping.map()
    other = closer(mapping.map())
    addr = v.address
    assert isinstance(addr, int) and addr % fmap.PAGE_SIZE == 0
    assert addr != other.address
    other[:5] = b"hello"
    assert ctypes.string_at(addr, 5) == b"hello"
    ctypes.memmove(addr + 5, b"world", 5)
    assert other[5:10] == b"world"
    v.close()
    with raises(ValueError, match="closed"):
        v.address
    # the old address stays readable while the View object lives: zeros
    assert ctypes.string_at(addr, SIZE) == bytes(SIZE)
    ctypes.memmove(addr, b"stale", 5)                 # writes nowhere shared
    assert other[:10] == b"helloworld"


def test_memoryview_address_is_view_address(mapping):
    v = mapping.map()
    mv = memoryview(v)
    c = ctypes.c_char.from_buffer(mv)
    assert ctypes.addressof(c) == v.address
    del c
    mv.release()
    v.close()


# ---- asarray

def test_asarray_defaults(mapping):
    v = mapping.map()
    a = v.asarray()
    assert a.dtype == np.uint8 and a.shape == (SIZE,)
    b = v.asarray("float64")
    assert b.shape == (SIZE // 8,)
    c = v.asarray("int32", offset=8)
    assert c.shape == ((SIZE - 8) // 4,)
    c[0] = -2
    assert a[8:12].view("int32")[0] == -2
    d = v.asarray("int32", shape=(2, 3), offset=4)
    assert d.shape == (2, 3) and d.flags.c_contiguous and d.flags.writeable
    e = v.asarray(np.dtype(">u2"), shape=1)
    e[0] = 0x0102
    assert v[:2] == b"\1\2"
    f = v.asarray(shape=0)
    assert f.shape == (0,)
    g = v.asarray(offset=SIZE)
    assert g.shape == (0,)
    h = v.asarray("(2,3)i4", shape=(2,))
    assert h.shape == (2, 2, 3) and h.dtype == np.int32
    s = v.asarray([("a", "<u4"), ("b", "u1")], shape=(3,))
    assert s.dtype.names == ("a", "b")
    del a, b, c, d, e, f, g, h, s
    v.close()


def test_asarray_of_read_only_view(closer):
    m = closer(fmap.create(size=SIZE))
    v = closer(m.map("r"))
    a = v.asarray("uint16")
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1


@pytest.mark.parametrize("kwargs, words", [
    (dict(shape=SIZE + 1), "needs"),
    (dict(dtype="float64", shape=(SIZE // 8 + 1,)), "needs"),
    (dict(shape=(2, SIZE)), "needs"),
    (dict(shape=10, offset=SIZE - 9), "needs"),
    (dict(shape=(-1,)), "negative"),
    (dict(shape=(2, -3)), "negative"),
    (dict(offset=-1), "outside"),
    (dict(offset=SIZE + 1), "outside"),
    (dict(offset=1.5), "integer"),
    (dict(offset="8"), "integer"),
    (dict(offset=None), "integer"),
    (dict(shape=(2.0,)), "shape"),
    (dict(shape="12"), "shape"),
    (dict(shape=1.0), "shape"),
    (dict(dtype="V0"), "no size"),
    (dict(dtype="O"), "OBJECT"),
    (dict(dtype=[("o", "O")], shape=1), "dtype"),
    (dict(shape=(1,) * 65), "dimension"),
    (dict(shape=(0, 1 << 70)), "dtype"),
])
def test_asarray_checks(mapping, kwargs, words):
    v = mapping.map()
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER) as info:
        v.asarray(**kwargs)
    assert words in str(info.value)
    v.close()                                          # no export left behind


@pytest.mark.parametrize("dtype", ["notadtype", object(), 3.5])
def test_asarray_bad_dtype(mapping, dtype):
    v = mapping.map()
    with pytest.raises(TypeError):
        v.asarray(dtype)
    v.close()


def test_asarray_refused_after_close(mapping):
    v = mapping.map()
    v.close()
    with raises(ValueError, match="closed"):
        v.asarray()


# ---- pickling, warnings, reference counts

def test_views_cannot_be_pickled(mapping):
    v = mapping.map()
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="pickled"):
            pickle.dumps(v, proto)
    with pytest.raises(TypeError):
        copy.copy(v)
    v.close()


def _collect_warnings(make):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
        gc.collect()
    return [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_unclosed_view_warns(mapping, closer):
    other = closer(mapping.map())

    def make():
        v = mapping.map()
        v[:3] = b"gc!"
    ws = _collect_warnings(make)
    assert len(ws) == 1 and "unclosed" in str(ws[0].message) and "View" in str(ws[0].message)
    assert other[:3] == b"gc!"


def test_unclosed_mapping_warns(name):
    def make():
        fmap.create(name, size=10)
    ws = _collect_warnings(make)
    assert len(ws) == 1 and "unclosed" in str(ws[0].message) and name in str(ws[0].message)
    with raises(FileNotFoundError):                   # the finalizer closed the handle
        fmap.open(name)


def test_closed_objects_do_not_warn(name):
    def make():
        m = fmap.create(name, size=10)
        v = m.map()
        v.close()
        m.close()
    assert _collect_warnings(make) == []


def test_memoryview_does_not_leak_view_references(mapping):
    v = mapping.map()
    before = sys.getrefcount(v)
    for _ in range(100):
        mv = memoryview(v)
        assert sys.getrefcount(v) > before            # the memoryview holds it
        mv.release()
    assert sys.getrefcount(v) == before
    for _ in range(100):
        with memoryview(v) as mv:
            mv[0] = 1
    del mv
    assert sys.getrefcount(v) == before
    v.close()


def test_asarray_does_not_leak_view_references(mapping):
    v = mapping.map()
    before = sys.getrefcount(v)
    for _ in range(100):
        a = v.asarray("uint16", shape=(2, 3))
        assert sys.getrefcount(v) > before
        del a
    gc.collect()
    assert sys.getrefcount(v) == before
    v.close()


def test_getitem_setitem_do_not_leak_view_references(mapping):
    v = mapping.map()
    before = sys.getrefcount(v)
    for _ in range(100):
        v[::3] = bytes(len(range(0, SIZE, 3)))
        v[::-2]
        v[1:3] = b"ab"
    assert sys.getrefcount(v) == before
    v.close()


def test_view_is_freed_when_unreferenced(mapping):
    import weakref
    v = mapping.map()
    a = v.asarray()
    r = weakref.ref(v)
    del a
    v.close()
    del v
    gc.collect()
    assert r() is None


def test_mapping_is_freed_when_unreferenced(name):
    import weakref
    m = fmap.create(name, size=10)
    v = m.map()
    r = weakref.ref(m)
    m.close()
    del m
    assert r() is None                                 # views do not keep it
    v.close()


# ---- the address range of a closed view

def test_placeholder_of_a_live_view_is_never_reused(closer):
    # A stale array keeps its View, hence its placeholder: no later view may
    # take that range, and the array keeps reading zeros.
    m = closer(fmap.create(size=SIZE))
    v = m.map()
    v[:4] = b"data"
    stale = np.ndarray((SIZE,), np.uint8, buffer=v)     # holds no export
    v.close()
    del v
    others = [closer(m.map()) for _ in range(8)]
    for w in others:
        w[:4] = b"next"
        assert not (w.address <= stale.ctypes.data < w.address + len(w))
    assert not stale.any()


def _mapped_at(address, length):
    """Is exactly [address, address + length) one mapping of this process?"""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo == address:
                return hi - lo >= length
    return False


def test_close_after_asarray_arrays_are_gone_unmaps(closer):
    # An asarray() array's pointer is valid while the array lives (NumPy's
    # rule); once every array is gone, close() unmaps as for a view nobody saw,
    # one system call instead of a placeholder's two.
    m = closer(fmap.create(size=SIZE))
    v = m.map()
    a = v.asarray("uint8")
    address = a.ctypes.data
    b = a[1:].reshape(-1)
    del a
    with raises(BufferError):
        v.close()                                # b keeps the export
    del b
    v.close()
    assert not _mapped_at(address, SIZE)


def test_array_that_outlives_a_released_memoryview_reads_zeros(closer):
    # memoryview.release() on an array's base gives the export back while the
    # array still points into the view: close must leave a placeholder.
    m = closer(fmap.create(size=SIZE))
    v = m.map()
    v[:4] = b"data"
    a = v.asarray("uint8")
    a.base.release()
    v.close()
    assert _mapped_at(a.ctypes.data, SIZE)
    assert not a.any()
    a[:4] = 1                                    # writes nowhere shared
    assert closer(m.map())[:4] == b"data"


def test_an_array_outlives_its_released_memoryview_and_the_view(closer):
    # The released memoryview no longer holds the View, which may then be
    # freed while the array still points into it: the zeros stay until the
    # array (and its memoryview) go, not until the View does.
    m = closer(fmap.create(size=SIZE))
    v = m.map()
    a = v.asarray("uint8")
    a.base.release()
    v.close()
    address = a.ctypes.data
    del v
    gc.collect()
    assert _mapped_at(address, SIZE)             # checked before a touch would crash
    assert not a.any()
    del a
    gc.collect()
    assert not _mapped_at(address, SIZE)


ARRAY_READ_AT_EXIT = """
import fmap
m = fmap.create(size=4096)
v = m.map()
a = v.asarray()
a[:] = 7
a.base.release()
v.close()
del v
assert a.sum() == 0                 # (NumPy imports what sum() needs now, not at exit)

class Holder:
    def __del__(self):      # runs at exit, after atexit hooks
        print("at exit", int(self.arr.sum()), flush=True)

h = Holder()
h.arr = a
del a
"""


def test_the_zeros_stay_for_an_array_read_at_exit():
    # weakref.finalize's own atexit hook once let the zeros go while such an
    # array could still be read (a __del__ at teardown): SIGSEGV.
    out = run_python(ARRAY_READ_AT_EXIT)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode() == "at exit 0\n"


FORK_DURING_A_COPY = """
import os, threading, time, fmap
N = 256 << 20
m = fmap.create(size=N)
v = m.map()
data = bytes(N)
t = threading.Thread(target=lambda: v.__setitem__(slice(0, N), data))
t.start()
time.sleep(0.002)                   # the copy runs (about 20-60 ms)
pid = os.fork()
if pid == 0:
    try:
        v.close()
        os._exit(0)
    except BufferError:
        os._exit(3)
t.join()
_, status = os.waitpid(pid, 0)
v.close()
print("child", os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_during_a_copy_can_close_the_view():
    # The copy's busy count came along into the child, where no thread would
    # ever lower it: close() refused there for good.
    out = run_python(FORK_DURING_A_COPY)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "child 0"


CLOSED_BY_AN_ARGUMENT = """
import os, sys, tempfile, fmap

class Closing:
    # an argument whose conversion closes the object first
    def __init__(self, obj, value):
        self.obj, self.value = obj, value
    def __index__(self):
        self.obj.close()
        return self.value

def attempt(what, make, act):
    obj = make()
    try:
        act(obj)
    except ValueError as e:
        print(what, e.winerror, flush=True)
    else:
        print(what, "no error", flush=True)

m = fmap.create(size=1 << 16)
view = lambda: m.map()
attempt("get", view, lambda v: v[Closing(v, 3)])
attempt("slice", view, lambda v: v[Closing(v, 0):8])
attempt("set", view, lambda v: v.__setitem__(Closing(v, 3), 1))
attempt("setvalue", view, lambda v: v.__setitem__(3, Closing(v, 1)))
attempt("setslice", view, lambda v: v.__setitem__(slice(Closing(v, 0), 8), bytes(8)))
attempt("map", lambda: fmap.create(size=1 << 16), lambda h: h.map(offset=Closing(h, 0)))
path = os.path.join(tempfile.mkdtemp(), "f")
f = fmap.create(file=path, size=1 << 16)
attempt("flush", lambda: f.map(), lambda v: v.flush(Closing(v, 0)))
"""


def test_an_argument_that_closes_the_object_gets_a_clear_error():
    # Each of these once used the address (NULL + offset) or the fd (-1)
    # after the conversion closed it: SIGSEGV, or EBADF.
    out = run_python(CLOSED_BY_AN_ARGUMENT)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split("\n")[:-1] == [
        "get 487", "slice 487", "set 487", "setvalue 487", "setslice 487", "map 6", "flush 487"]


CLOSE_DURING_A_COPY = """
import threading, fmap
N = 64 << 20
m = fmap.create(size=N)
data = bytes(N)
refused = 0
for _ in range(5):
    v = m.map()
    t = threading.Thread(target=lambda: v.__setitem__(slice(0, N), data))
    t.start()
    while t.is_alive():
        try:
            v.close()
        except BufferError:
            refused += 1            # the copy runs without the GIL: not under it
        except ValueError:
            pass
    t.join()
    v.close()
print("refused", refused > 0)
"""


def test_close_in_another_thread_waits_for_a_copy_into_the_view():
    # A copy of more than 1 MiB runs without the GIL; close() in another
    # thread once unmapped the view under it (SIGSEGV).
    out = run_python(CLOSE_DURING_A_COPY)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "refused True"


@pytest.mark.parametrize("exposure", ["address", "memoryview", "ndarray(buffer=)"])
def test_other_exposures_still_leave_a_placeholder(closer, exposure):
    m = closer(fmap.create(size=SIZE))
    v = m.map()
    v.asarray("uint8")                           # an asarray array came and went
    if exposure == "address":
        address = v.address
    elif exposure == "memoryview":
        with memoryview(v) as mv:
            address = np.frombuffer(mv, np.uint8).ctypes.data
    else:
        address = np.ndarray((SIZE,), np.uint8, buffer=v).ctypes.data
    v.close()
    assert _mapped_at(address, SIZE)
    assert ctypes.string_at(address, 4) == bytes(4)
