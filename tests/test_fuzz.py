"""Arbitrary arguments to every entry point: only documented exceptions, each
ValueError and OSError with its `winerror`, never a crash (DESIGN.md: "Bad input
never crashes the interpreter").  Successful calls are checked against what
they were asked, and everything made is closed."""
import os
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fmap

G = fmap.ALLOCATION_GRANULARITY

# What fmap documents; OverflowError is not among them: a number out of range
# is a ValueError (or an IndexError for an index), as for Python's own types.
DOCUMENTED = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
              IndexError, BufferError, fmap.WrongTypeError)

fuzz = settings(max_examples=800, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

huge_ints = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([-1, 0, 1, (1 << 31) - 1, 1 << 31, (1 << 63) - 1, 1 << 63,
                     (1 << 64) - 1, 1 << 64, -(1 << 63), G, G - 1, G + 1]),
)
anything = st.one_of(
    st.none(), st.booleans(), huge_ints, st.floats(), st.text(max_size=8),
    st.binary(max_size=8), st.lists(st.integers(-3, 3), max_size=3).map(tuple),
    st.just(object()), st.just(np.int64(3)), st.just(np.float32(1.0)),
)
name_chars = st.one_of(
    st.characters(),                     # any code point, surrogates included
    st.sampled_from(["\\", "\0", "/", ".", "\u00e9", "\U0001f600", "\ud800", " "]),
)
names = st.one_of(
    st.none(), st.just(""),
    st.text(name_chars, max_size=12),
    st.tuples(st.sampled_from(["Local\\", "Global\\", "local\\", "\\", "Session\\1\\"]),
              st.text(name_chars, max_size=8)).map("".join),
    st.integers(200, 300).map(lambda n: "n" * n),
    st.binary(max_size=5), st.integers(), st.floats(),
)
accesses = st.one_of(st.sampled_from(["r", "rw", "c"]), anything)


def check_error(exc, allowed=DOCUMENTED):
    assert isinstance(exc, allowed), f"undocumented {type(exc).__name__}: {exc}"
    if isinstance(exc, (OSError, ValueError)):
        assert isinstance(getattr(exc, "winerror", None), int), f"{exc!r} has no winerror"


def call(fn, *args, allowed=DOCUMENTED, **kwargs):
    """fn's result, or None after checking the exception it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every exception is checked here
        check_error(exc, allowed)
        return None


@fuzz
@given(name=names, size=st.one_of(st.integers(0, 1 << 20), huge_ints, anything),
       protect=accesses, exclusive=st.booleans(), populate=st.booleans())
def test_create(name, size, protect, exclusive, populate):
    small = isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 1 << 20
    # populate with a huge size would allocate it all: only with small ones
    m = call(fmap.create, name, size, protect=protect, exclusive=exclusive,
             populate=populate and small)
    if m is None:
        return
    try:
        assert m.created
        assert m.size == size and m.protect == protect
        assert m.name == (name or None)
        if name:
            again = call(fmap.create, name, 1, exclusive=exclusive)
            if exclusive:
                assert again is None
            else:
                assert again.size == size and not again.created
                again.close()
    finally:
        m.close()
    if name:
        with pytest.raises(FileNotFoundError):
            fmap.open(name)


@fuzz
@given(name=names, access=accesses)
def test_open(name, access):
    m = call(fmap.open, name, access)
    assert m is None            # nothing of these names exists


@fuzz
@given(name=names, access=accesses, size=st.integers(1, 3 * G))
def test_open_existing(name, access, size):
    m = call(fmap.create, name, size)
    if m is None:
        return
    try:
        o = call(fmap.open, name, access)
        if o is not None:
            assert name and o.size == size and o.access == access
            o.close()
        elif name and access in ("r", "rw", "c"):
            pytest.fail("open of an existing name failed")
    finally:
        m.close()


offsets = st.one_of(st.integers(0, 4).map(lambda k: k * G), huge_ints, anything)
lengths = st.one_of(st.integers(0, 3 * G + 10), huge_ints, anything)
addresses = st.one_of(st.none(), st.none(), st.integers(1, 1 << 32).map(lambda k: k * G),
                      huge_ints, anything)


@fuzz
@example(access=None, offset=0, length=10.9, address=None, protect="rw")    # was truncated to 10
@example(access=None, offset=65536.7, length=0, address=None, protect="rw")
@example(access=None, offset=0, length=0, address=float(1 << 40), protect="rw")
@given(access=st.one_of(st.none(), accesses), offset=offsets, length=lengths,
       address=addresses, protect=st.sampled_from(["r", "rw", "c"]))
def test_map(access, offset, length, address, protect):
    size = 3 * G + 5
    with fmap.create(size=size, protect=protect) as m:
        # an address outside user space has no memory to give: MemoryError (ENOMEM)
        v = call(m.map, access, offset, length, address=address,
                 allowed=DOCUMENTED + ((MemoryError,) if address is not None else ()))
        if v is None:
            return
        try:
            assert type(offset) is int or isinstance(offset, (bool, np.integer))
            assert offset % G == 0 and 0 <= offset < size
            assert v.offset == offset
            assert len(v) == (length or size - offset)
            assert v.access == (access or protect)
            if address is not None:
                assert v.address == address
            v[len(v) - 1]
        finally:
            v.close()


@fuzz
@example(file_backed=True, access="rw", offset=1.5, length=2.5, wait=False)
@given(file_backed=st.booleans(), access=st.sampled_from(["r", "rw", "c"]),
       offset=st.one_of(st.integers(0, 3 * G + 10), huge_ints, anything),
       length=st.one_of(st.integers(0, 3 * G + 10), huge_ints, anything), wait=anything)
def test_flush(tmp_path_factory, file_backed, access, offset, length, wait):
    size = 3 * G + 5
    if file_backed:
        path = tmp_path_factory.mktemp("flush") / "f.bin"
        m = fmap.create(file=path, size=size)
    else:
        m = fmap.create(size=size)
    try:
        with m.map(access) as v:
            done = call(lambda: v.flush(offset, length, wait=wait) or True)
            ok = (isinstance(offset, (int, np.integer)) and isinstance(length, (int, np.integer))
                  and 0 <= offset <= size and 0 <= length <= size - offset)
            assert bool(done) == ok, f"flush({offset!r}, {length!r}): {'accepted' if done else 'refused'}"
    finally:
        m.close()


dtypes = st.one_of(
    st.sampled_from(["uint8", "int16", "<u4", ">f8", "f2", "c16", "?", "S3", "U2", "V7", "V0",
                     "O", "M8[s]", "m8", "(2,3)i4", "i4,u1", "()i4", "(2,", "i4,,", "[",
                     "", "notadtype", "\0"]),
    st.builds(np.dtype, st.sampled_from(["u1", "i8", "f4"])),
    st.just([("a", "u1"), ("b", ">i4")]),
    st.just([("o", "O")]),
    anything,
)
shapes = st.one_of(
    st.none(), st.integers(-2, 100), huge_ints,
    st.lists(st.one_of(st.integers(-2, 20), huge_ints), max_size=4).map(tuple),
    st.integers(60, 70).map(lambda n: (1,) * n),
    anything,
)


# NumPy 2 warns of a deprecated dtype alias the fuzzing may pick ("a"): its
# warning about the user's dtype, passed on as it should be.
@pytest.mark.filterwarnings("ignore:Data type alias:DeprecationWarning")
@fuzz
@example(dtype="a", shape=None, offset=0, access="rw")         # the deprecated alias
@example(dtype="(2,", shape=None, offset=0, access="rw")       # SyntaxError from NumPy
@example(dtype="O", shape=None, offset=0, access="rw")
@example(dtype="(2,3)i4", shape=(2,), offset=0, access="rw")   # subarray dtype and a shape
@example(dtype="u1", shape=(0, 1 << 70), offset=0, access="rw")
@example(dtype="u1", shape=(1,) * 65, offset=0, access="rw")
@example(dtype="u1", shape=("3",), offset="16", access="rw")  # int() took strings
@given(dtype=dtypes, shape=shapes, offset=st.one_of(st.integers(-2, 5000), huge_ints, anything),
       access=st.sampled_from(["r", "rw", "c"]))
def test_asarray(dtype, shape, offset, access):
    with fmap.create(size=4096) as m:
        v = m.map(access)
        try:
            a = call(v.asarray, dtype, shape, offset)
            if a is not None:
                assert a.nbytes <= 4096 - offset
                assert a.flags.writeable == (access != "r")
                assert a.__array_interface__["data"][0] == v.address + offset
                del a
        finally:
            v.close()       # BufferError here would be an export left behind


keys = st.one_of(
    huge_ints, st.integers(-150, 150),
    st.builds(slice, st.one_of(st.none(), st.integers(-150, 150), huge_ints),
              st.one_of(st.none(), st.integers(-150, 150), huge_ints),
              st.one_of(st.none(), st.integers(-5, 5).filter(bool), huge_ints.filter(bool))),
    anything,
)
values = st.one_of(st.integers(-2, 300), st.binary(max_size=120), st.builds(bytearray, st.binary(max_size=60)),
                   st.builds(memoryview, st.binary(max_size=60)), anything)


@fuzz
@example(key=1 << 70, access="rw")                              # was OverflowError
@example(key=slice(None, None, 1 << 63), access="rw")
@example(key=slice(None, None, -(1 << 63) - 5), access="rw")
@given(key=keys, access=st.sampled_from(["r", "rw", "c"]))
def test_getitem(key, access):
    with fmap.create(size=100) as m:
        with m.map("rw") as w:
            w[:] = bytes(range(100))
        with m.map(access) as v:
            try:
                got = v[key]
            except Exception as exc:  # noqa: BLE001 - checked
                check_error(exc)
                got = exc
            try:
                want = bytes(range(100))[key]     # mmap-like: what bytes would give
            except Exception as exc:  # noqa: BLE001 - the model refused: fmap must too
                assert type(got) is type(exc), f"view[{key!r}]: {got!r}, bytes: {exc!r}"
            else:
                assert got == want


@fuzz
@example(key=slice(None, None, 1 << 63), value=b"x", access="rw")
@example(key=-(1 << 70), value=1, access="rw")
@example(key=0, value=np.uint8(7), access="rw")
@example(key=0, value=256, access="rw")
@example(key=slice(0, 10, 2), value=b"abc", access="rw")       # was ValueError, not IndexError
@given(key=keys, value=values, access=st.sampled_from(["r", "rw", "c"]))
def test_setitem(key, value, access):
    with fmap.create(size=100) as m:
        with m.map(access) as v:
            model = bytearray(v[:])
            try:
                v[key] = value
            except Exception as exc:  # noqa: BLE001 - checked
                check_error(exc)
                assert v[:] == bytes(model)        # a refused write changed nothing
                return
            assert access != "r"
            model[key] = value                     # what was written, bytearray says
            assert len(model) == 100, "a slice assignment of the wrong size was accepted"
            assert v[:] == bytes(model)


files = st.one_of(
    st.sampled_from(["data", "empty", "missing", ".", "data\0x", "", b"data", "a" * 300]),
    st.builds(pathlib.Path, st.sampled_from(["data", "missing", "sub/x"])),
    st.text(name_chars, max_size=10),
    # fds that are not open here; open ones may be pytest's capture files
    st.integers(-(1 << 70), -1), st.integers(1 << 20, 1 << 70),
    st.floats(), st.booleans(), st.just(object()), st.binary(max_size=4),
)


@fuzz
@example(file="data\0x", size=10, protect="rw")     # created "data" through the NUL
@example(file=1 << 40, size=None, protect="rw")       # was OverflowError
@given(file=files, size=st.one_of(st.none(), st.integers(0, 1 << 16), huge_ints, anything),
       protect=st.one_of(st.sampled_from(["r", "rw", "c"]), anything))
def test_create_file(tmp_path_factory, file, size, protect):
    d = tmp_path_factory.mktemp("file")
    (d / "data").write_bytes(b"x" * 100)
    (d / "empty").write_bytes(b"")
    before = sorted(os.listdir(d))
    cwd = os.getcwd()
    os.chdir(d)
    try:
        # a path or an fd may fail as open() and os.dup() fail: ENAMETOOLONG,
        # EISDIR, EFBIG, EBADF (all with winerror)
        path_errors = (OSError,) if isinstance(file, (str, bytes, os.PathLike, int)) else ()
        m = call(fmap.create, None, size, file=file, protect=protect,
                 allowed=DOCUMENTED + path_errors)
        if m is None:
            assert sorted(os.listdir(d)) == before    # a failed create leaves no file
            return
        try:
            assert m.protect == protect
            path = os.fsdecode(file)
            assert "\0" not in path
            real = os.path.getsize(path)
            assert m.size == (size or real) and real >= m.size
        finally:
            m.close()
    finally:
        os.chdir(cwd)
