"""Mappings and views within one process: DESIGN.md's contract, rule by rule.

Rules that need other processes or crashes (the rest of 6 and 7) are in
test_crossprocess.py and test_crash.py; file-backed storage (5, 8) in test_file.py.
"""
import ctypes
import gc
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fmap
from children import children  # noqa: F401 - fixture
from conftest import raises

G = fmap.ALLOCATION_GRANULARITY

ERROR_FILE_NOT_FOUND = 2
ERROR_PATH_NOT_FOUND = 3
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_HANDLE = 6
ERROR_INVALID_PARAMETER = 87
ERROR_BAD_PATHNAME = 161
ERROR_ALREADY_EXISTS = 183
ERROR_FILENAME_EXCED_RANGE = 206
ERROR_INVALID_ADDRESS = 487
ERROR_MAPPED_ALIGNMENT = 1132


def test_constants():
    assert fmap.ALLOCATION_GRANULARITY == 65536
    assert fmap.PAGE_SIZE == os.sysconf("SC_PAGE_SIZE")
    assert issubclass(fmap.WrongTypeError, OSError)


def test_objects_are_made_by_create_and_map():
    with pytest.raises(TypeError):
        fmap.Mapping()
    with pytest.raises(TypeError):
        fmap.View()


# ---- rule 1: paging-file storage needs size > 0, checked before the name lookup

@pytest.mark.parametrize("size", [0, None, -1])
def test_size_required_and_positive(name, size):
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.create(name, size=size)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.create(size=size)
    with raises(FileNotFoundError):          # nothing was created on the way
        fmap.open(name)


def test_size_checked_before_lookup_of_existing_name(name, closer):
    m = closer(fmap.create(name, size=4096))
    # Opening would succeed (created False) if the name were looked up first.
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.create(name, size=0)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.create(name)
    assert not m.closed


def test_size_checked_before_lookup_of_name_of_another_type(name, closer):
    closer(fmap.Mutex.create(name))
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.create(name, size=0)            # not WrongTypeError: the name is never looked up


def test_size_checked_before_lookup_of_name_held_by_another_process(name, children):
    child = children(textwrap.dedent(f"""
        import sys, fmap
        m = fmap.create({name!r}, size=4096)
        print("ready", flush=True)
        sys.stdin.read()
        m.close()
    """))
    child.expect("ready")
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.create(name, size=0)
    with fmap.create(name, size=4096) as m:         # the control: the name is there
        assert m.created is False
    rc, err = child.finish()
    assert rc == 0, err


@pytest.mark.parametrize("size", [1.0, "1", b"1", True, [1]])
def test_size_type(size):
    with pytest.raises(TypeError):
        fmap.create(size=size)


def test_size_too_big():
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.create(size=1 << 63)


# ---- size: exact, never page-rounded

@pytest.mark.parametrize("size", [1, 4095, 4097, 100000, G + 1])
def test_size_exact_on_create_and_open(name, size, closer):
    m = closer(fmap.create(name, size=size))
    assert m.size == size and type(m.size) is int
    o = closer(fmap.open(name))
    assert o.size == size
    again = closer(fmap.create(name, size=size + 12345))
    assert again.size == size
    v = closer(o.map())
    assert len(v) == v.length == size
    v[size - 1] = 0xAB
    assert v[-1] == 0xAB
    with pytest.raises(IndexError):
        v[size]
    assert len(v[:]) == size
    assert memoryview(v).nbytes == size


# ---- rule 2: create of an existing name opens it; the existing object wins

def test_create_existing_returns_it(name, closer):
    m = closer(fmap.create(name, size=4097))
    assert m.created is True
    v = closer(m.map())
    v[:5] = b"hello"
    again = closer(fmap.create(name, size=100000))
    assert again.created is False
    assert again.size == 4097
    assert again.name == name
    w = closer(again.map())
    assert w[:5] == b"hello"


def test_existing_protection_wins(name, closer):
    closer(fmap.create(name, size=4096, protect="r"))
    again = closer(fmap.create(name, size=4096, protect="rw"))
    assert again.created is False
    assert again.protect == "r"
    assert again.access == "r"
    with raises(PermissionError, winerror=ERROR_ACCESS_DENIED):
        again.map("rw")
    with closer(again.map()) as v:
        assert v.access == "r"


def test_exclusive(name, closer):
    m = closer(fmap.create(name, size=4096, exclusive=True))
    assert m.created
    with raises(FileExistsError, winerror=ERROR_ALREADY_EXISTS) as info:
        fmap.create(name, size=4096, exclusive=True)
    assert name in str(info.value)
    assert not m.closed
    m.close()
    # the name went with the last handle: exclusive creation works again
    with fmap.create(name, size=4096, exclusive=True) as m2:
        assert m2.created


# ---- rule 3: one namespace with the other object types

def test_name_of_another_type(name, closer):
    closer(fmap.Mutex.create(name))
    for call in (lambda: fmap.create(name, size=4096),
                 lambda: fmap.create(name, size=4096, exclusive=True),
                 lambda: fmap.open(name),
                 lambda: fmap.open(name, access="r")):
        with raises(fmap.WrongTypeError, winerror=ERROR_INVALID_HANDLE):
            call()


def test_mapping_name_blocks_other_types(name, closer):
    closer(fmap.create(name, size=4096))
    with raises(fmap.WrongTypeError, winerror=ERROR_INVALID_HANDLE):
        fmap.Mutex.create(name)


# ---- rule 4: names

def test_open_missing(name):
    with raises(FileNotFoundError, winerror=ERROR_FILE_NOT_FOUND) as info:
        fmap.open(name)
    assert name in str(info.value)


def test_names_are_case_sensitive(closer, name):
    upper = name.upper()
    closer(fmap.create(upper, size=4096))
    with raises(FileNotFoundError):
        fmap.open(name)
    lower = closer(fmap.create(name, size=4096))
    assert lower.created


def test_local_prefix_is_the_default_namespace(name, closer):
    m = closer(fmap.create(name, size=4096))
    closer(m.map())[:3] = b"abc"
    local = closer(fmap.open("Local\\" + name))
    assert local.name == "Local\\" + name
    assert closer(local.map())[:3] == b"abc"
    again = closer(fmap.create("Local\\" + name, size=4096))
    assert again.created is False


def test_global_prefix_is_another_namespace(name, closer):
    closer(fmap.create(name, size=4096))
    with raises(FileNotFoundError):
        fmap.open("Global\\" + name)
    g = closer(fmap.create("Global\\" + name, size=4096))
    assert g.created
    closer(g.map())[:1] = b"g"
    assert closer(closer(fmap.open(name)).map())[:1] == b"\0"
    assert closer(closer(fmap.open("Global\\" + name)).map())[:1] == b"g"


@pytest.mark.parametrize("bad, code", [
    ("a\\b", ERROR_PATH_NOT_FOUND),
    ("\\a", ERROR_BAD_PATHNAME),
    ("Local\\a\\b", ERROR_PATH_NOT_FOUND),
    ("Local\\\\a", ERROR_BAD_PATHNAME),
    ("Global\\", ERROR_BAD_PATHNAME),
    ("Local\\", ERROR_BAD_PATHNAME),
    ("Session\\1\\a", ERROR_PATH_NOT_FOUND),
    ("a\0b", ERROR_BAD_PATHNAME),
    ("\0", ERROR_BAD_PATHNAME),
    ("\ud800", ERROR_BAD_PATHNAME),
    ("a" * 256, ERROR_FILENAME_EXCED_RANGE),
    ("\u00e9" * 128, ERROR_FILENAME_EXCED_RANGE),   # 256 bytes of UTF-8
])
def test_bad_names(bad, code):
    with raises(ValueError, winerror=code):
        fmap.create(bad, size=4096)
    with raises(ValueError, winerror=code):
        fmap.create(bad, size=4096, exclusive=True)
    with raises(ValueError, winerror=code):
        fmap.open(bad)


@pytest.mark.parametrize("good", [
    "a" * 255,
    "Local\\" + "b" * 255,
    "Global\\" + "c" * 255,
    "\u00e9" * 127 + "d",
    "\u540d\u524d \U0001f600 /.:*?\"<>|",
    "local\\x".replace("\\", "/"),
])
def test_good_names(good, closer):
    m = closer(fmap.create(good, size=10))
    assert m.created and m.name == good
    o = closer(fmap.open(good))
    assert o.size == 10


def test_lowercase_local_is_not_a_prefix(closer, name):
    # Prefixes are case-sensitive too; "local\\x" holds a backslash: an error.
    with raises(ValueError, winerror=ERROR_PATH_NOT_FOUND):
        fmap.create("local\\" + name, size=10)


@pytest.mark.parametrize("bad", [b"x", 1, ["x"], 1.5, object()])
def test_name_type(bad):
    with pytest.raises(TypeError):
        fmap.create(bad, size=10)
    with pytest.raises(TypeError):
        fmap.open(bad)


def test_str_subclass_name(name, closer):
    class S(str):
        pass
    m = closer(fmap.create(S(name), size=10))
    assert closer(fmap.open(name)).size == 10
    assert m.created


def test_empty_name_is_unnamed(closer):
    a = closer(fmap.create("", size=4096))
    b = closer(fmap.create("", size=4096))
    assert a.name is None and b.name is None
    assert a.created and b.created
    closer(a.map())[:1] = b"a"
    assert closer(b.map())[:1] == b"\0"      # two objects, not one named ""
    u = closer(fmap.create(size=4096))
    assert u.name is None
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.open("")
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.open(None)


# ---- protect and access

@pytest.mark.parametrize("protect", ["r", "rw", "c"])
def test_protect_and_default_access(name, protect, closer):
    m = closer(fmap.create(name, size=4096, protect=protect))
    assert m.protect == protect
    assert m.access == protect
    v = closer(m.map())
    assert v.access == protect


@pytest.mark.parametrize("bad", ["w", "RW", "", None, 1, ("r",), ["r"]])
def test_bad_protect_and_access(name, bad, closer):
    if bad is not None:
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
            fmap.create(name, size=10, protect=bad)
    m = closer(fmap.create(name, size=10))
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.open(name, access=bad)
    if bad is not None:
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
            m.map(access=bad)


def test_open_access(name, closer):
    m = closer(fmap.create(name, size=4096))
    for access in ("r", "rw", "c"):
        o = closer(fmap.open(name, access=access))
        assert o.access == access and o.protect == "rw" and o.created is False
        assert closer(o.map()).access == access


def test_open_rw_of_read_only_mapping_is_capped(name, closer):
    closer(fmap.create(name, size=4096, protect="r"))
    o = closer(fmap.open(name, access="rw"))
    assert o.protect == "r" and o.access == "r"
    with raises(PermissionError, winerror=ERROR_ACCESS_DENIED):
        o.map("rw")


# ---- rule 6: views

@pytest.mark.parametrize("offset", [1, 4096, G - 1, G + 4096, 3 * G // 2])
def test_offset_alignment(offset, closer):
    m = closer(fmap.create(size=4 * G))
    with raises(ValueError, winerror=ERROR_MAPPED_ALIGNMENT) as info:
        m.map(offset=offset)
    assert str(offset) in str(info.value)


def test_offset_and_length(closer):
    m = closer(fmap.create(size=2 * G + 100))
    v = closer(m.map())
    assert (v.offset, len(v)) == (0, 2 * G + 100)
    v[G:G + 3] = b"xyz"
    w = closer(m.map(offset=G))
    assert (w.offset, len(w)) == (G, G + 100)        # length 0 = to the end
    assert w[:3] == b"xyz"
    x = closer(m.map(offset=2 * G, length=100))
    assert len(x) == 100
    y = closer(m.map(offset=G, length=5))
    assert len(y) == 5 and y[:] == b"xyz\0\0"


@pytest.mark.parametrize("offset, length", [
    (0, 2 * G + fmap.PAGE_SIZE + 1), (G, G + fmap.PAGE_SIZE + 1), (2 * G, fmap.PAGE_SIZE + 1),
    (2 * G, 1 << 40), (3 * G, 0), (3 * G, 1),
    (1 << 62, 0), (1 << 62, 1 << 62), (0, (1 << 64) - 1),
])
def test_view_past_the_end(offset, length, closer):
    m = closer(fmap.create(size=2 * G + 100))
    with raises(ValueError) as info:
        m.map(offset=offset, length=length)
    assert f"has {2 * G + 100} bytes" in str(info.value)


def test_a_view_may_reach_the_end_of_the_last_page(closer, tmp_path):
    # As a Windows paging-file section: whole pages, though m.size stays exact.
    m = closer(fmap.create(size=2 * G + 100))
    with m.map(offset=2 * G, length=fmap.PAGE_SIZE) as v, m.map(offset=2 * G) as whole:
        assert len(whole) == 100 and m.size == 2 * G + 100
        v[fmap.PAGE_SIZE - 1] = 5
        with m.map("r", 0, 2 * G + fmap.PAGE_SIZE) as r:
            assert r[2 * G + 100] == 0 and r[-1] == 5     # the same page, shared
    # A file's mapping ends with its bytes.
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    f = closer(fmap.create(file=str(path)))
    with raises(ValueError, match="has 100 bytes$"):
        f.map(length=101)


def test_past_the_end_message(name, closer):
    # the message DESIGN.md gives as the model
    m = closer(fmap.create(name, size=4096))
    with raises(ValueError, match=rf'^cannot map 8192 bytes at offset 0: mapping "{name}" has 4096 bytes$'):
        m.map(length=8192)


def test_offset_equal_to_size_with_length_zero(closer):
    m = closer(fmap.create(size=G))
    with raises(ValueError):
        m.map(offset=G)


@pytest.mark.parametrize("bad", [-1, -G, 1 << 64, 1.0, 0.0, float(G), "0", None, b"", [0]])
def test_offset_and_length_must_be_ints(bad, closer):
    m = closer(fmap.create(size=2 * G))
    with raises(ValueError):
        m.map(offset=bad)
    with raises(ValueError):
        m.map(length=bad)


def test_views_see_each_others_writes_at_once(closer):
    m = closer(fmap.create(size=2 * G))
    a = closer(m.map())
    b = closer(m.map(offset=G))
    c = closer(m.map("rw"))
    r = closer(m.map("r"))
    a[G + 5] = 7
    assert b[5] == 7 and c[G + 5] == 7 and r[G + 5] == 7
    b[:4] = b"\1\2\3\4"
    assert a[G:G + 4] == b"\1\2\3\4"
    arr = c.asarray("uint32")
    mv = memoryview(a)
    arr[0] = 0xDEADBEEF
    assert mv[:4].tobytes() == (0xDEADBEEF).to_bytes(4, sys.byteorder)
    mv[4] = 9
    assert arr[1] == 9
    assert r.asarray()[4] == 9
    mv.release()
    del arr


def test_two_handles_share_memory(name, closer):
    a = closer(closer(fmap.create(name, size=4096)).map())
    b = closer(closer(fmap.open(name)).map())
    a[:3] = b"abc"
    assert b[:3] == b"abc"
    b[3] = ord("d")
    assert a[:4] == b"abcd"


def test_write_view_of_read_only_mapping(closer):
    m = closer(fmap.create(size=4096, protect="r"))
    with raises(PermissionError, winerror=ERROR_ACCESS_DENIED):
        m.map("rw")
    assert closer(m.map("r")).access == "r"


def test_write_view_of_read_only_handle(name, closer):
    closer(fmap.create(name, size=4096))
    for access in ("r", "c"):
        h = closer(fmap.open(name, access=access))
        with raises(PermissionError, winerror=ERROR_ACCESS_DENIED):
            h.map("rw")


def test_read_view_is_not_writable(closer):
    m = closer(fmap.create(size=4096))
    w = closer(m.map())
    w[:2] = b"ok"
    v = closer(m.map("r"))
    with raises(TypeError):
        v[0] = 1
    with raises(TypeError):
        v[0:2] = b"no"
    with raises(TypeError):
        v[::2] = b"n" * 2048
    mv = memoryview(v)
    assert mv.readonly
    with pytest.raises(TypeError):
        mv[0] = 1
    mv.release()
    a = v.asarray()
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1
    with pytest.raises(ValueError):
        a.flags.writeable = True
    del a
    with pytest.raises((TypeError, BufferError)):
        ctypes.c_char.from_buffer(v)          # asks for a writable buffer
    assert w[:2] == b"ok"
    v.close()                                 # the failed request left no export


@pytest.mark.parametrize("protect, access", [("rw", "r"), ("r", "r")])
def test_read_only_pages(protect, access):
    # Writing through the address of a read view: the pages themselves refuse.
    code = textwrap.dedent(f"""
        import ctypes, faulthandler, fmap
        faulthandler.disable()
        m = fmap.create(size=4096, protect={protect!r})
        v = m.map({access!r})
        print("mapped", flush=True)
        ctypes.memset(v.address, 1, 1)
        print("wrote", flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["mapped"], p.stdout + p.stderr
    assert p.returncode == -11               # SIGSEGV


# ---- copy-on-write views

def test_copy_on_write_view(closer):
    m = closer(fmap.create(size=2 * G))
    rw = closer(m.map("rw"))
    rw[:8] = b"original"
    rw[G:G + 4] = b"page"
    c = closer(m.map("c"))
    assert c.access == "c"
    assert c[:8] == b"original"
    c[:8] = b"private!"
    arr = c.asarray(offset=G, shape=4)
    assert arr.flags.writeable
    arr[:] = 0
    del arr
    assert c[:8] == b"private!" and c[G:G + 4] == b"\0" * 4
    assert rw[:8] == b"original" and rw[G:G + 4] == b"page"
    fresh = closer(m.map())
    assert fresh[:8] == b"original"
    c2 = closer(m.map("c"))
    assert c2[:8] == b"original"


def test_copy_on_write_view_of_read_only_mapping(closer):
    m = closer(fmap.create(size=4096, protect="r"))
    c = closer(m.map("c"))
    c[:3] = b"cow"
    assert c[:3] == b"cow"
    assert closer(m.map())[:3] == b"\0\0\0"


def test_copy_on_write_mapping(name, closer):
    m = closer(fmap.create(name, size=4096, protect="c"))
    with raises(PermissionError):
        m.map("rw")
    c = closer(m.map())
    c[:1] = b"x"
    assert closer(m.map())[:1] == b"\0"
    assert closer(closer(fmap.open(name)).map())[:1] == b"\0"


# ---- fixed addresses and populate

def _free_aligned_address(m, length):
    """A 64 KiB-aligned address where `length` bytes were free a moment ago."""
    probe = m.map()
    start = probe.address
    assert len(probe) >= length + G
    probe.close()
    del probe          # frees the placeholder that close left at the address
    gc.collect()
    return (start + G - 1) // G * G


def test_map_at_fixed_address(closer):
    m = closer(fmap.create(size=4 * G))
    for attempt in range(5):    # another allocation may take the range first
        target = _free_aligned_address(m, G)
        try:
            v = closer(m.map(length=G, address=target))
            break
        except OSError as exc:
            assert exc.winerror == ERROR_INVALID_ADDRESS
    else:
        pytest.fail("could not map at a fixed address that was just free")
    assert v.address == target
    v[:5] = b"fixed"
    assert closer(m.map())[:5] == b"fixed"
    assert ctypes.string_at(target, 5) == b"fixed"
    with raises(OSError, winerror=ERROR_INVALID_ADDRESS):
        m.map(length=G, address=target)          # the range is in use
    assert v[:5] == b"fixed"                     # the failed map touched nothing


def test_map_over_another_allocation_fails(closer):
    m = closer(fmap.create(size=G))
    buf = ctypes.create_string_buffer(4 * G)     # something of ours lives in this range
    aligned = (ctypes.addressof(buf) + G - 1) // G * G
    buf[aligned - ctypes.addressof(buf)] = b"k"
    with raises(OSError, winerror=ERROR_INVALID_ADDRESS):
        m.map(address=aligned)
    assert buf[aligned - ctypes.addressof(buf)] == b"k"


@pytest.mark.parametrize("bad", [1, G + 1, G // 2, 4096])
def test_fixed_address_alignment(bad, closer):
    m = closer(fmap.create(size=G))
    with raises(ValueError, winerror=ERROR_MAPPED_ALIGNMENT):
        m.map(address=bad)


@pytest.mark.parametrize("bad", [0, -G, 1 << 64, float(G), "65536"])
def test_fixed_address_invalid(bad, closer):
    m = closer(fmap.create(size=G))
    with raises(ValueError):
        m.map(address=bad)


@pytest.mark.parametrize("top", [1 << 47, (1 << 47) - G, (1 << 64) - G])
def test_fixed_address_past_user_space(top, closer):
    # Past the top of the address space is a bad address (487), not a lack of memory.
    m = closer(fmap.create(size=G))
    with raises(ValueError, winerror=ERROR_INVALID_ADDRESS, match="address space"):
        m.map(address=top)


def _rss_kib(address):
    start = f"{address:x}-"
    with open("/proc/self/smaps") as f:
        lines = iter(f)
        for line in lines:
            if line.startswith(start):
                for field in lines:
                    if field.startswith("Rss:"):
                        return int(field.split()[1])
    raise AssertionError(f"no mapping at {address:#x}")


def test_populate(name, closer):
    size = 64 * fmap.PAGE_SIZE
    m = closer(fmap.create(name, size=size, populate=True))
    v = closer(m.map())
    assert _rss_kib(v.address) * 1024 == size      # prefaulted, nothing touched
    assert v[:] == bytes(size)
    v[:4] = b"full"
    assert closer(closer(fmap.open(name)).map())[:4] == b"full"
    lazy = closer(fmap.create(size=size))
    assert _rss_kib(closer(lazy.map()).address) == 0   # the control


# ---- rule 7 within one process: lifetime of memory and of names

def test_view_outlives_its_mapping(name, closer):
    m = fmap.create(name, size=4096)
    v = closer(m.map())
    v[:5] = b"alive"
    m.close()
    assert v[:5] == b"alive"
    v[5:10] = b"still"
    assert bytes(memoryview(v)[:10]) == b"alivestill"


def test_name_goes_with_last_handle_even_with_views(name, closer):
    m = fmap.create(name, size=4096)
    o = fmap.open(name)
    v = closer(m.map())
    v[:3] = b"old"
    m.close()
    assert fmap.open(name).close() is None         # o still holds the name
    o.close()
    with raises(FileNotFoundError, winerror=ERROR_FILE_NOT_FOUND):
        fmap.open(name)
    new = closer(fmap.create(name, size=4096))
    assert new.created is True
    nv = closer(new.map())
    assert nv[:] == bytes(4096)                    # a new object: zeroed
    nv[:3] = b"new"
    assert v[:3] == b"old"                         # and not the old memory


def test_recreated_name_gives_zeroed_memory(name):
    for i in range(3):
        with fmap.create(name, size=8192) as m:
            assert m.created
            with m.map() as v:
                assert v[:] == bytes(8192)
                v[:] = bytes([i + 1]) * 8192


# ---- rule 9: close

def test_mapping_close_is_idempotent(name):
    m = fmap.create(name, size=10)
    assert not m.closed
    m.close()
    assert m.closed
    m.close()
    assert m.closed


def test_closed_mapping_refuses_use(name):
    m = fmap.create(name, size=10)
    m.close()
    for call in (m.map, m.fileno, lambda: pickle.dumps(m), m.__enter__):
        with raises(ValueError, winerror=ERROR_INVALID_HANDLE, match="closed"):
            call()
    with pytest.raises(ValueError):
        with m:
            pass
    assert m.size == 10 and m.name == name     # plain attributes stay readable


def test_view_close_is_idempotent(closer):
    m = closer(fmap.create(size=10))
    v = m.map()
    assert not v.closed
    v.close()
    assert v.closed
    v.close()
    assert v.closed


def test_closed_view_refuses_use(closer):
    m = closer(fmap.create(size=10))
    v = m.map()
    v.close()
    calls = [lambda: v[0], lambda: v[:2], lambda: v.__setitem__(0, 1),
             lambda: v.__setitem__(slice(0, 1), b"x"), v.flush, v.asarray,
             lambda: v.address, lambda: memoryview(v), v.__enter__,
             lambda: np.frombuffer(v, np.uint8)]
    for call in calls:
        with raises(ValueError, match="closed"):
            call()


def test_context_managers(name):
    with fmap.create(name, size=10) as m:
        with m.map() as v:
            v[0] = 1
        assert v.closed and not m.closed
    assert m.closed


def test_classmethods(name, closer):
    m = closer(fmap.Mapping.create(name, size=4097))
    assert isinstance(m, fmap.Mapping) and m.created and m.size == 4097
    o = closer(fmap.Mapping.open(name, access="r"))
    assert isinstance(o, fmap.Mapping) and o.access == "r" and not o.created
    with raises(FileNotFoundError):
        fmap.Mapping.open(name + "-missing")
    with raises(FileExistsError):
        fmap.Mapping.create(name, size=1, exclusive=True)


def test_reprs(name):
    m = fmap.create(name, size=4097)
    v = m.map()
    r = repr(m)
    assert f'"{name}"' in r and "size=4097" in r and "open" in r and "closed" not in r
    rv = repr(v)
    assert name in rv and "length=4097" in rv and "closed" not in rv
    v.close()
    m.close()
    r = repr(m)
    assert f'"{name}"' in r and "size=4097" in r and r.endswith("closed>")
    assert name in repr(v) and "closed" in repr(v)
    with fmap.create(size=5) as u:
        assert "unnamed" in repr(u) and "size=5" in repr(u)


def test_fileno(closer):
    m = closer(fmap.create(size=4097))
    fd = m.fileno()
    assert os.fstat(fd).st_size == 4097


# ---- a second handle in the process that holds one

@pytest.mark.parametrize("protect, access, mode", [
    ("rw", "rw", os.O_RDWR), ("rw", "r", os.O_RDONLY), ("rw", "c", os.O_RDONLY),
    ("r", "rw", os.O_RDONLY), ("c", "rw", os.O_RDONLY),
])
def test_open_in_the_holding_process_gets_only_its_access(name, closer, protect, access, mode):
    # Opening a name this process holds duplicates its fd when the access is
    # the same; a handle must never share a more capable file than it asked for.
    import fcntl
    m = closer(fmap.create(name, size=4096, protect=protect))
    o = closer(fmap.open(name, access=access))
    assert fcntl.fcntl(o.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == mode
    assert os.fstat(o.fileno()).st_ino == os.fstat(m.fileno()).st_ino
    if mode == os.O_RDONLY:
        with raises(PermissionError):
            o.map("rw")


def test_open_does_not_trust_an_own_fd_closed_behind_its_back(name):
    # A record of this process names fd N; N now holds another file: it is
    # not the object, and the record is stale (the name had no other holder).
    m = fmap.create(name, size=4096)
    fd = m.fileno()
    with open(os.devnull, "rb") as other:
        os.dup2(other.fileno(), fd)
    try:
        with raises(FileNotFoundError):
            fmap.open(name)
    finally:
        m.close()                       # closes the /dev/null now at fd
