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
    # A paging-file section is whole pages (virtual.c: 0x3452 bytes make a
    # 0x4000 section), and a view may reach the end of the last one.
    end = -(-0x3452 // w.GetSystemInfo().dwPageSize) * w.GetSystemInfo().dwPageSize
    v = w.MapViewOfFile(h, w.FILE_MAP_WRITE, 0, 0, end)
    assert v is not None and len(v) == end
    v[end - 1] = 0x77
    h2 = w.OpenFileMapping(w.FILE_MAP_READ, False, name)
    close_all.append(h2)
    r = w.MapViewOfFile(h2, w.FILE_MAP_READ, 0, 0, end)
    assert r[end - 1] == 0x77                                   # shared like the rest
    assert w.UnmapViewOfFile(v) and w.UnmapViewOfFile(r)
    assert w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 0, end + 1) is None
    assert w.GetLastError() == w.ERROR_ACCESS_DENIED            # STATUS_INVALID_VIEW_SIZE
    assert w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 1, 0) is None
    assert w.GetLastError() == w.ERROR_MAPPED_ALIGNMENT


def test_a_file_sections_views_end_with_its_bytes(tmp_path, close_all):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\1" * 0x3452)
    h = w.CreateFileMapping(str(path), None, w.PAGE_READONLY, 0, 0, None)
    close_all.append(h)
    v = w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 0, 0x3452)
    assert v is not None and len(v) == 0x3452
    assert w.UnmapViewOfFile(v)
    assert w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 0, 0x3453) is None
    assert w.GetLastError() == w.ERROR_ACCESS_DENIED            # STATUS_INVALID_VIEW_SIZE


@pytest.mark.parametrize("protect,access", [(w.PAGE_EXECUTE_READ, "r"),
                                            (w.PAGE_EXECUTE_READWRITE, "rw"),
                                            (w.PAGE_EXECUTE_WRITECOPY, "c")])
def test_execute_protections_allow_their_plain_views(name, close_all, protect, access):
    # virtual.c, test_CreateFileMapping_protection: these are accepted; the
    # views they allow are executable only with FILE_MAP_EXECUTE, refused here.
    h = w.CreateFileMapping(PAGING, None, protect, 0, 4096, name)
    assert h is not None, w.GetLastError()
    close_all.append(h)
    assert h.access == access
    v = w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 0, 0)
    assert v is not None and w.UnmapViewOfFile(v)
    assert w.MapViewOfFile(h, w.FILE_MAP_READ | w.FILE_MAP_EXECUTE, 0, 0, 0) is None
    assert w.GetLastError() == w.ERROR_INVALID_PARAMETER


@pytest.mark.parametrize("flags,ok", [
    (0, True), (w.SEC_COMMIT, True), (w.SEC_RESERVE, True),
    (w.SEC_COMMIT | w.SEC_NOCACHE, True), (w.SEC_RESERVE | w.SEC_WRITECOMBINE, True),
    (w.SEC_RESERVE | w.SEC_COMMIT, False), (w.SEC_NOCACHE, False), (w.SEC_WRITECOMBINE, False),
    (w.SEC_LARGE_PAGES, False), (w.SEC_RESERVE | w.SEC_LARGE_PAGES, False),
    (w.SEC_COMMIT | w.SEC_NOCACHE | w.SEC_WRITECOMBINE, True)])
def test_section_flags(name, close_all, flags, ok):
    # virtual.c, test_CreateFileMapping's sec_flag_tests (anonymous mappings)
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE | flags, 0, 4096, name)
    close_all.append(h)
    assert (h is not None) == ok
    assert w.GetLastError() == (0 if ok else w.ERROR_INVALID_PARAMETER)


def test_a_view_is_copy_on_write_for_file_map_copy_alone(name, close_all):
    # kernelbase's MapViewOfFileEx: PAGE_WRITECOPY only when the access is
    # FILE_MAP_COPY itself; with FILE_MAP_READ beside it, a read-only view.
    h = w.CreateFileMapping(PAGING, None, w.PAGE_READWRITE, 0, 4096, name)
    close_all.append(h)
    c = w.MapViewOfFile(h, w.FILE_MAP_COPY, 0, 0, 0)
    r = w.MapViewOfFile(h, w.FILE_MAP_READ | w.FILE_MAP_COPY, 0, 0, 0)
    rw = w.MapViewOfFile(h, w.FILE_MAP_ALL_ACCESS, 0, 0, 0)
    assert (c.access, r.access, rw.access) == ("c", "r", "rw")
    assert w.MapViewOfFile(h, 0, 0, 0, 0) is None               # no access: refused
    assert w.GetLastError() == w.ERROR_INVALID_PARAMETER
    for v in (c, r, rw):
        w.UnmapViewOfFile(v)


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
    # NULL (what a failed MapViewOfFile returns), with a view open or not
    v2 = w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 0, 0)
    for call in (lambda: w.UnmapViewOfFile(w.NULL), lambda: w.FlushViewOfFile(w.NULL, 0),
                 lambda: w.UnmapViewOfFile(w.MapViewOfFile(h, w.FILE_MAP_READ, 0, 1, 0))):
        assert call() is False
        assert w.GetLastError() == w.ERROR_INVALID_ADDRESS
    assert not w.FlushFileBuffers(w.NULL) and w.GetLastError() == w.ERROR_INVALID_HANDLE
    with pytest.raises(TypeError, match="lpBaseAddress"):
        w.UnmapViewOfFile("0x1000")
    assert w.UnmapViewOfFile(v2)


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
