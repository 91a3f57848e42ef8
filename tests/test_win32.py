"""fmap.win32: the Windows functions by name, with Windows' error codes.

Each check follows a Wine conformance test (dlls/kernel32/tests/virtual.c,
dlls/ntdll/tests/om.c) or the Windows documentation.
"""
import os

import pytest

from fmap import win32 as w

PAGING = w.INVALID_HANDLE_VALUE


@pytest.fixture
def close_all():
    made = []
    yield made
    for h in made:
        if h is not None and not h.closed:
            w.CloseHandle(h)


def test_paging_file_needs_a_size(name):
    assert w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 0, name) is None
    assert w.GetLastError() == w.ERROR_INVALID_PARAMETER


def test_existing_name_returns_existing_object(name, close_all):
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 0x1000, name)
    assert h is not None and w.GetLastError() == 0
    h2 = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 0x8000, name)
    close_all += [h, h2]
    assert w.GetLastError() == w.ERROR_ALREADY_EXISTS
    assert h2.size == 0x1000


def test_names_are_case_sensitive(name, close_all):
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 4096, name + "-mapping")
    close_all.append(h)
    assert w.OpenFileMapping(w.FILE_MAP_READ, False, name + "-MAPPING") is None
    assert w.GetLastError() == w.ERROR_FILE_NOT_FOUND


def test_backslash_in_name(name):
    assert w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 4096, name + "\\x") is None
    assert w.GetLastError() == 3            # ERROR_PATH_NOT_FOUND
    assert w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 4096, "Local\\\\x") is None
    assert w.GetLastError() == 161          # ERROR_BAD_PATHNAME


@pytest.mark.parametrize("protect", [w.PAGE_NOACCESS, w.PAGE_EXECUTE, 0])
def test_unsupported_protection(name, protect):
    assert w.CreateFileMapping(PAGING, None, protect, 0, 4096, name) is None
    assert w.GetLastError() == w.ERROR_INVALID_PARAMETER


def test_view_alignment_and_bounds(name, close_all):
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 0x3452, name)
    close_all.append(h)
    v = w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 0, 0x3452)      # exact size maps
    assert v is not None and len(v) == 0x3452
    assert w.UnmapViewOfFile(v)
    assert w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 0, 0x3453) is None
    assert w.GetLastError() == w.ERROR_ACCESS_DENIED            # STATUS_INVALID_VIEW_SIZE
    assert w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 1, 0) is None
    assert w.GetLastError() == w.ERROR_MAPPED_ALIGNMENT


@pytest.mark.parametrize("protect,writable", [(w.PAGE_READONLY, False), (w.PAGE_WRITECOPY, False),
                                              (w.PAGE_READWRITE, True)])
def test_access_matrix(name, close_all, protect, writable):
    h = w.CreateFileMapping(PAGING, None, protect, 0, 4096, name)
    close_all.append(h)
    for access in (w.FILE_MAP_READ, w.FILE_MAP_COPY):
        v = w.MapViewOfFile(h, access, 0, 0, 0)
        assert v is not None, w.GetLastError()
        w.UnmapViewOfFile(v)
    v = w.MapViewOfFile(h, w.FILE_MAP_WRITE, 0, 0, 0)
    if writable:
        assert v is not None
        w.UnmapViewOfFile(v)
    else:
        assert v is None and w.GetLastError() == w.ERROR_ACCESS_DENIED


def test_read_handle_cannot_map_write(name, close_all):
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 4090, "Local\\" + name)
    r = w.OpenFileMapping(w.FILE_MAP_READ, False, "Local\\" + name)
    close_all += [h, r]
    assert w.MapViewOfFile(r, w.FILE_MAP_WRITE, 0, 0, 0) is None
    assert w.GetLastError() == w.ERROR_ACCESS_DENIED
    v = w.MapViewOfFile(r, w.FILE_MAP_READ, 0, 0, 0)
    assert v is not None and len(v) == 4090
    w.UnmapViewOfFile(v)


def test_name_goes_with_last_handle_view_stays(name):
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 4096, name)
    h2 = w.OpenFileMapping(w.FILE_MAP_ALL_ACCESS, False, name)
    v = w.MapViewOfFile(h, w.FILE_MAP_WRITE, 0, 0, 0)
    v[0] = 0x5A
    assert w.CloseHandle(h2) and w.CloseHandle(h)
    assert v[0] == 0x5A                                    # the view is still readable
    assert w.OpenFileMapping(w.FILE_MAP_READ, False, name) is None
    assert w.GetLastError() == w.ERROR_FILE_NOT_FOUND
    h3 = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 4096, name)
    assert w.GetLastError() == 0                           # a new object
    v3 = w.MapViewOfFile(h3, w.FILE_MAP_READ, 0, 0, 0)
    assert v3[0] == 0
    w.UnmapViewOfFile(v3)
    w.UnmapViewOfFile(v)
    w.CloseHandle(h3)


def test_unmap_interior_address_and_bad_address(name, close_all):
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 8192, name)
    close_all.append(h)
    v = w.MapViewOfFile(h, w.FILE_MAP_WRITE, 0, 0, 0)
    base = v.address
    assert w.UnmapViewOfFile(base + 100)
    assert v.closed
    assert not w.UnmapViewOfFile(base)
    assert w.GetLastError() == w.ERROR_INVALID_ADDRESS


def test_map_view_ex_address_conflict(name, close_all):
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 65536, name)
    close_all.append(h)
    v = w.MapViewOfFile(h, w.FILE_MAP_WRITE, 0, 0, 0)
    # An address inside the view that is not 64K-aligned (v.address + 0x1000
    # itself is aligned when the view starts one page below a 64K boundary).
    inside = v.address + (0x1000 if (v.address + 0x1000) % 65536 else 0x2000)
    assert w.MapViewOfFileEx(h, w.FILE_MAP_WRITE, 0, 0, 0, inside) is None
    assert w.GetLastError() == w.ERROR_MAPPED_ALIGNMENT
    if v.address % 65536 == 0:
        assert w.MapViewOfFileEx(h, w.FILE_MAP_WRITE, 0, 0, 0, v.address) is None
        assert w.GetLastError() == w.ERROR_INVALID_ADDRESS
    w.UnmapViewOfFile(v)


def test_file_backed_and_flush(tmp_path, close_all):
    path = tmp_path / "f.bin"
    path.write_bytes(b"")
    with open(path, "rb") as f:
        assert w.CreateFileMapping(f, None, w.PAGE_READONLY, 0, 0, None) is None
        assert w.GetLastError() == w.ERROR_FILE_INVALID
        assert w.CreateFileMapping(f, None, w.PAGE_READWRITE, 0, 4096, None) is None
        assert w.GetLastError() == w.ERROR_ACCESS_DENIED
    path.write_bytes(b"\0" * 0x3456)
    with open(path, "rb") as f:
        assert w.CreateFileMapping(f, None, w.PAGE_READONLY, 0, 0x3457, None) is None
        assert w.GetLastError() == w.ERROR_NOT_ENOUGH_MEMORY   # STATUS_SECTION_TOO_BIG
    h = w.CreateFileMapping(str(path), None, w.PAGE_READWRITE, 0, 0x10000, None)
    close_all.append(h)
    assert os.path.getsize(path) == 0x10000                    # grown
    v = w.MapViewOfFile(h, w.FILE_MAP_WRITE, 0, 0, 0)
    v[:4] = b"wine"
    assert w.FlushViewOfFile(v.address + 2, 0)
    assert w.FlushFileBuffers(v)
    assert path.read_bytes()[:4] == b"wine"
    assert w.UnmapViewOfFile(v)
    assert not w.FlushViewOfFile(v.address if not v.closed else 1, 0)
    assert w.GetLastError() == w.ERROR_INVALID_ADDRESS


def test_duplicate_and_close_handle(name):
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 4096, name)
    d = w.DuplicateHandle(h, 0, w.DUPLICATE_SAME_ACCESS | w.DUPLICATE_CLOSE_SOURCE)
    assert h.closed and d.access == "rw"
    assert not w.CloseHandle(h) and w.GetLastError() == w.ERROR_INVALID_HANDLE
    r = w.DuplicateHandle(d, w.FILE_MAP_READ, 0)
    assert r.access == "r"
    assert w.CloseHandle(d) and w.CloseHandle(r)
    u = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 4096, None)
    u2 = w.DuplicateHandle(u)
    a = w.MapViewOfFile(u, w.FILE_MAP_WRITE, 0, 0, 0)
    b = w.MapViewOfFile(u2, w.FILE_MAP_READ, 0, 0, 0)
    a[7] = 9
    assert b[7] == 9
    w.UnmapViewOfFile(a), w.UnmapViewOfFile(b), w.CloseHandle(u), w.CloseHandle(u2)


def test_system_info():
    info = w.GetSystemInfo()
    assert info.dwAllocationGranularity == 65536
    assert info.dwPageSize == os.sysconf("SC_PAGE_SIZE")
