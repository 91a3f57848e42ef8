"""File-backed mappings: DESIGN.md contract rules 5 and 8, within one process."""
import os
import pathlib

import pytest

import fmap
from conftest import raises

G = fmap.ALLOCATION_GRANULARITY

ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_HANDLE = 6
ERROR_NOT_ENOUGH_MEMORY = 8
ERROR_INVALID_PARAMETER = 87
ERROR_FILE_INVALID = 1006


def content(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def data(tmp_path):
    """A file of 3 * G + 5 known bytes."""
    p = tmp_path / "data.bin"
    p.write_bytes(bytes(range(256)) * (3 * G // 256) + b"tail!")
    return p


# ---- where the file comes from

@pytest.mark.parametrize("kind", [str, pathlib.Path, os.fsencode])
def test_from_path(data, kind, closer):
    m = closer(fmap.create(file=kind(data)))
    assert m.size == 3 * G + 5                     # size None = the file's size
    assert m.created and m.name is None and m.protect == "rw"
    v = closer(m.map())
    assert v[:] == content(data)


def test_missing_path_is_created_for_rw(tmp_path, closer):
    p = tmp_path / "new.bin"
    m = closer(fmap.create(file=p, size=5000))
    assert p.exists() and p.stat().st_size == 5000
    closer(m.map())[:3] = b"new"
    assert content(p)[:3] == b"new"


@pytest.mark.parametrize("protect", ["r", "c"])
def test_missing_path_is_not_created_read_only(tmp_path, protect):
    p = tmp_path / "missing.bin"
    with raises(FileNotFoundError, winerror=ERROR_FILE_NOT_FOUND):
        fmap.create(file=p, size=4096, protect=protect)
    assert not p.exists()


def test_file_created_by_a_failed_create_is_removed(tmp_path):
    p = tmp_path / "new.bin"
    with raises(ValueError, winerror=ERROR_FILE_INVALID):
        fmap.create(file=p)                        # empty and no size
    assert not p.exists()


def test_existing_file_not_removed_by_a_failed_create(tmp_path):
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    with raises(ValueError, winerror=ERROR_FILE_INVALID):
        fmap.create(file=p)
    assert p.exists()


def test_from_file_object(data, closer):
    with open(data, "r+b") as f:
        m = closer(fmap.create(file=f))
    # the mapping owns its own descriptor: closing the file object changes nothing
    assert m.size == 3 * G + 5
    v = closer(m.map())
    v[:4] = b"FOBJ"
    assert content(data)[:4] == b"FOBJ"
    assert m.file is not None and "file=" in repr(m)


def test_buffered_writes_are_flushed_before_mapping(tmp_path, closer):
    p = tmp_path / "buffered.bin"
    with open(p, "w+b") as f:
        f.write(b"buffered")                        # still in Python's buffer
        m = closer(fmap.create(file=f))
        assert m.size == 8
        assert closer(m.map())[:] == b"buffered"


def test_from_fd(data, closer):
    fd = os.open(data, os.O_RDWR)
    try:
        m = closer(fmap.create(file=fd))
    finally:
        os.close(fd)
    assert m.size == 3 * G + 5
    v = closer(m.map(offset=G))
    assert v[:4] == bytes(range(4))
    v[:4] = b"byfd"
    assert content(data)[G:G + 4] == b"byfd"


@pytest.mark.parametrize("fd", [-1, 1 << 31, 1 << 64, 99999])
def test_bad_fd(fd):
    with raises(OSError, winerror=ERROR_INVALID_HANDLE):
        fmap.create(file=fd)


@pytest.mark.parametrize("bad", [1.5, True, None.__class__, object(), [b"x"]])
def test_bad_file_argument(bad):
    with pytest.raises(TypeError):
        fmap.create(file=bad)


def test_path_with_nul(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with raises(ValueError):
        fmap.create(file="a\0b", size=10)
    assert os.listdir(tmp_path) == []              # no file "a" made on the way


def test_not_a_regular_file(tmp_path):
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.create(file=tmp_path, protect="r")
    # A directory cannot be opened read-write; CreateFile's code for it is 5.
    with raises(IsADirectoryError, winerror=5):
        fmap.create(file=tmp_path)


# ---- rule 5: sizes

def test_larger_size_grows_the_file(data, closer):
    m = closer(fmap.create(file=data, size=4 * G + 1))
    assert m.size == 4 * G + 1
    assert data.stat().st_size == 4 * G + 1
    v = closer(m.map(offset=3 * G))
    assert v[:5] == b"tail!" and v[5:] == bytes(G + 1 - 5)
    v[-1] = 0x7F
    assert content(data)[-1] == 0x7F


@pytest.mark.parametrize("protect", ["r", "c"])
def test_only_rw_grows_the_file(data, protect):
    before = data.stat().st_size
    with raises(ValueError, winerror=ERROR_NOT_ENOUGH_MEMORY):   # Windows: STATUS_SECTION_TOO_BIG
        fmap.create(file=data, size=before + 1, protect=protect)
    assert data.stat().st_size == before


def test_smaller_size_maps_part_of_the_file(data, closer):
    m = closer(fmap.create(file=data, size=100))
    assert m.size == 100
    with raises(ValueError):
        m.map(offset=G)
    assert len(closer(m.map())) == 100
    assert data.stat().st_size == 3 * G + 5        # the file is not cut


@pytest.mark.parametrize("size", [None, 0])
def test_empty_file_needs_a_size(tmp_path, size):
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    for protect in ("rw", "r", "c"):
        with raises(ValueError, winerror=ERROR_FILE_INVALID):
            fmap.create(file=p, size=size, protect=protect)


def test_empty_file_with_size(tmp_path, closer):
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    m = closer(fmap.create(file=p, size=10))
    assert m.size == 10 and p.stat().st_size == 10


# ---- rule 5: a file opened read-only backs only "r" and "c"

def test_read_only_file_object(data, closer):
    with open(data, "rb") as f:
        with raises(PermissionError, winerror=ERROR_ACCESS_DENIED):
            fmap.create(file=f)
        r = closer(fmap.create(file=f, protect="r"))
        c = closer(fmap.create(file=f, protect="c"))
    assert r.protect == "r" and c.protect == "c"
    with raises(PermissionError, winerror=ERROR_ACCESS_DENIED):
        r.map("rw")
    with raises(PermissionError, winerror=ERROR_ACCESS_DENIED):
        c.map("rw")
    assert closer(r.map())[:4] == bytes(range(4))
    cv = closer(c.map())
    cv[:4] = b"priv"
    assert cv[:4] == b"priv"
    assert content(data)[:4] == bytes(range(4))


def test_read_only_fd(data):
    fd = os.open(data, os.O_RDONLY)
    try:
        with raises(PermissionError, winerror=ERROR_ACCESS_DENIED):
            fmap.create(file=fd)
    finally:
        os.close(fd)


def test_read_only_path_protect_opens_read_only(data, closer):
    os.chmod(data, 0o444)
    try:
        m = closer(fmap.create(file=data, protect="r"))
        assert closer(m.map())[:4] == bytes(range(4))
    finally:
        os.chmod(data, 0o644)


def test_write_only_file_cannot_be_mapped(data):
    with open(data, "wb") as f:
        for protect in ("r", "rw", "c"):
            with raises(PermissionError, winerror=ERROR_ACCESS_DENIED):
                fmap.create(file=f, size=10, protect=protect)


# ---- writes reach the file; copy-on-write never does

@pytest.mark.parametrize("wait", [False, True])
def test_rw_writes_reach_the_file(data, wait, closer):
    m = closer(fmap.create(file=data))
    v = closer(m.map(offset=G, length=G))
    v[:5] = b"hello"
    v[-3:] = b"end"
    v.flush(wait=wait)
    got = content(data)
    assert got[G:G + 5] == b"hello" and got[2 * G - 3:2 * G] == b"end"
    assert got[:G] == (bytes(range(256)) * (G // 256))      # the rest as it was


def test_writes_through_numpy_reach_the_file(data, closer):
    m = closer(fmap.create(file=data))
    v = closer(m.map())
    a = v.asarray("uint32", shape=(4,))
    a[:] = [1, 2, 3, 4]
    del a
    v.flush(wait=True)
    v.close()
    m.close()
    assert content(data)[:16] == b"".join(i.to_bytes(4, "little") for i in (1, 2, 3, 4))


def test_file_writes_are_seen_by_views(data, closer):
    v = closer(closer(fmap.create(file=data)).map())
    with open(data, "r+b") as f:
        f.seek(10)
        f.write(b"fromfile")
    assert v[10:18] == b"fromfile"


def test_copy_on_write_never_writes_the_file(data, closer):
    before = content(data)
    m = closer(fmap.create(file=data, protect="c"))
    assert m.protect == "c"
    c = closer(m.map())
    c[:8] = b"copyonwr"
    c.flush()
    c.flush(wait=True)
    assert c[:8] == b"copyonwr"
    c.close()
    m.close()
    assert content(data) == before


def test_copy_on_write_view_of_rw_file_mapping(data, closer):
    before = content(data)
    m = closer(fmap.create(file=data))
    rw = closer(m.map())
    c = closer(m.map("c"))
    c[:4] = b"cccc"
    c.flush(wait=True)
    assert rw[:4] == before[:4]
    assert content(data) == before
    rw[4:8] = b"wwww"
    rw.flush(wait=True)
    assert content(data)[4:8] == b"wwww"
    assert content(data)[:4] == before[:4]


# ---- named file-backed mappings

def test_named_file_mapping_opened_by_name(name, data, closer):
    m = closer(fmap.create(name, file=data))
    assert m.created and m.name == name
    o = closer(fmap.open(name))
    assert o.size == 3 * G + 5 and o.protect == "rw"
    v = closer(o.map())
    assert v[:] == content(data)
    v[:6] = b"byname"
    v.flush()
    assert content(data)[:6] == b"byname"
    assert closer(m.map())[:6] == b"byname"


def test_existing_name_wins_over_another_file(name, data, tmp_path, closer):
    other = tmp_path / "other.bin"
    other.write_bytes(b"other" * 100)
    closer(fmap.create(name, file=data))
    again = closer(fmap.create(name, file=other))
    assert again.created is False
    assert again.size == 3 * G + 5
    assert again.file is None
    assert closer(again.map())[:4] == bytes(range(4))
    paging = closer(fmap.create(name, size=10))
    assert paging.created is False and paging.size == 3 * G + 5


def test_name_of_a_file_mapping_goes_with_last_handle(name, data, closer):
    m = fmap.create(name, file=data)
    v = closer(m.map())
    m.close()
    with raises(FileNotFoundError):
        fmap.open(name)
    v[:4] = b"late"                            # the view still reaches the file
    v.flush(wait=True)
    assert content(data)[:4] == b"late"


# ---- rule 8: flush

def test_flush_arguments(data, closer):
    v = closer(closer(fmap.create(file=data)).map(offset=G))
    n = len(v)
    v[0] = 1
    v.flush()
    v.flush(0, 0)
    v.flush(0, n)
    v.flush(n, 0)
    v.flush(4096, 10)
    v.flush(1, 1)                              # unaligned offsets are fine
    v.flush(offset=n - 1, length=1, wait=True)
    for off, ln in [(0, n + 1), (n + 1, 0), (n, 1), (1, n), (1 << 63, 1), (1, (1 << 64) - 1)]:
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
            v.flush(off, ln)
    for bad in (-1, 1 << 64, 1.0, "0", None, b""):
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
            v.flush(bad)
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
            v.flush(0, bad)


def test_flush_read_only_view(data, closer):
    v = closer(closer(fmap.create(file=data, protect="r")).map())
    v.flush()
    v.flush(wait=True)
    with raises(ValueError):
        v.flush(0, len(v) + 1)


def test_flush_on_paging_file_storage_validates_but_does_nothing(closer):
    v = closer(closer(fmap.create(size=4097)).map())
    v[0] = 1
    v.flush()
    v.flush(0, 4097, wait=True)
    v.flush(4097, 0)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        v.flush(0, 4098)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        v.flush(-1)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        v.flush(0.5)
    assert v[0] == 1


def test_flush_closed_view(data, closer):
    m = closer(fmap.create(file=data))
    v = m.map()
    v.close()
    with raises(ValueError, match="closed"):
        v.flush()
