"""The Windows file-mapping functions under their own names, for code ported from C.

A thin layer over fmap's Pythonic API.  As in C, functions return a handle
(a Mapping), a view (a View, whose .address is lpBaseAddress), True, or on
failure None / False with the Windows error code left for GetLastError().
Handles and views stay alive until CloseHandle / UnmapViewOfFile, as in C,
even when the caller drops every reference.  Misuse that C could not even
express (a str where a number belongs) still raises TypeError.
"""
from __future__ import annotations

import threading
from collections import namedtuple
from typing import Any, Callable, Optional, Union

from . import _fmap
from .mapping import create as _create, open as _open

INVALID_HANDLE_VALUE = -1
NULL = None

PAGE_NOACCESS = 0x01
PAGE_READONLY = 0x02
PAGE_READWRITE = 0x04
PAGE_WRITECOPY = 0x08
PAGE_EXECUTE = 0x10
PAGE_EXECUTE_READ = 0x20
PAGE_EXECUTE_READWRITE = 0x40
PAGE_EXECUTE_WRITECOPY = 0x80
SEC_COMMIT = 0x08000000
SEC_RESERVE = 0x04000000
SEC_NOCACHE = 0x10000000
SEC_WRITECOMBINE = 0x40000000
SEC_LARGE_PAGES = 0x80000000
SEC_IMAGE = 0x01000000

FILE_MAP_COPY = 0x0001
FILE_MAP_WRITE = 0x0002
FILE_MAP_READ = 0x0004
FILE_MAP_EXECUTE = 0x0020
FILE_MAP_ALL_ACCESS = 0x000F001F

DUPLICATE_CLOSE_SOURCE = 0x1
DUPLICATE_SAME_ACCESS = 0x2

ERROR_SUCCESS = 0
ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_HANDLE = 6
ERROR_NOT_ENOUGH_MEMORY = 8
ERROR_INVALID_PARAMETER = 87
ERROR_ALREADY_EXISTS = 183
ERROR_INVALID_ADDRESS = 487
ERROR_FILE_INVALID = 1006
ERROR_MAPPED_ALIGNMENT = 1132

# A mapping's protection bounds the views it allows; a view is executable only
# when it asks for FILE_MAP_EXECUTE, which fmap refuses, so the PAGE_EXECUTE_*
# protections allow what their plain forms do.
_PROTECT = {PAGE_READONLY: "r", PAGE_READWRITE: "rw", PAGE_WRITECOPY: "c",
            PAGE_EXECUTE_READ: "r", PAGE_EXECUTE_READWRITE: "rw", PAGE_EXECUTE_WRITECOPY: "c"}
_SEC_FLAGS = SEC_COMMIT | SEC_RESERVE | SEC_NOCACHE | SEC_WRITECOMBINE

_tls = threading.local()
_lock = threading.Lock()
_handles: set = set()                         # open handles, kept alive as in C
_views: dict = {}                             # base address -> View, until UnmapViewOfFile

SYSTEM_INFO = namedtuple("SYSTEM_INFO", "dwPageSize dwAllocationGranularity")


def GetLastError() -> int:
    """The calling thread's last error code."""
    return getattr(_tls, "error", 0)


def SetLastError(code: int) -> None:
    _tls.error = int(code)


def GetSystemInfo() -> SYSTEM_INFO:
    return SYSTEM_INFO(_fmap.PAGE_SIZE, _fmap.ALLOCATION_GRANULARITY)


def _call(fn: Callable[[], Any], failed: Any) -> Any:
    """Run fn; on an fmap error record its Windows code and return `failed`."""
    try:
        result = fn()
    except (OSError, ValueError, BufferError, MemoryError) as exc:
        SetLastError(getattr(exc, "winerror", ERROR_INVALID_PARAMETER))
        return failed
    SetLastError(ERROR_SUCCESS)
    return result


def _done(fn: Callable[[], object]) -> bool:
    """_call for a call made for its effect: True once fn returned."""
    def run() -> bool:
        fn()
        return True
    return bool(_call(run, False))


def _map_access(desired: int) -> Optional[str]:
    """A view's access as MapViewOfFile reads dwDesiredAccess: copy-on-write only
    for FILE_MAP_COPY alone (FILE_MAP_READ | FILE_MAP_COPY is a read-only view);
    None for what fmap refuses (an executable view, one with no access)."""
    if desired & FILE_MAP_EXECUTE:
        return None
    if desired == FILE_MAP_COPY:
        return "c"
    if desired & FILE_MAP_WRITE:
        return "rw"
    if desired & FILE_MAP_READ:
        return "r"
    return None


def _sec_flags_ok(flags: int) -> bool:
    """SEC_* flags as CreateFileMapping takes them: at most one of SEC_COMMIT
    and SEC_RESERVE, and SEC_NOCACHE or SEC_WRITECOMBINE only beside one of
    them (Wine's kernel32/tests/virtual.c, test_CreateFileMapping, and its
    server's get_mapping_flags)."""
    base = flags & (SEC_COMMIT | SEC_RESERVE)
    extra = flags & (SEC_NOCACHE | SEC_WRITECOMBINE)
    if base == SEC_COMMIT | SEC_RESERVE:
        return False
    return not extra or bool(base)


def CreateFileMapping(hFile: Any, lpFileMappingAttributes: Any, flProtect: int,
                      dwMaximumSizeHigh: int, dwMaximumSizeLow: int,
                      lpName: Optional[str]) -> Optional[_fmap.Mapping]:
    """hFile: INVALID_HANDLE_VALUE (or None) for paging-file storage, else a path,
    a file object or an fd.  GetLastError() is ERROR_ALREADY_EXISTS when the
    name existed."""
    protect = _PROTECT.get(flProtect & ~_SEC_FLAGS)
    if protect is None or not _sec_flags_ok(flProtect & _SEC_FLAGS):
        SetLastError(ERROR_INVALID_PARAMETER)
        return None
    size = (int(dwMaximumSizeHigh) << 32) | int(dwMaximumSizeLow)
    paging = hFile is None or (isinstance(hFile, int) and hFile == INVALID_HANDLE_VALUE)

    def make():
        if paging:
            return _create(lpName, size, protect=protect)
        return _create(lpName, size or None, file=hFile, protect=protect)

    h = _call(make, None)
    if h is not None:
        with _lock:
            _handles.add(h)
        SetLastError(ERROR_SUCCESS if h.created else ERROR_ALREADY_EXISTS)
    return h


CreateFileMappingA = CreateFileMappingW = CreateFileMapping


def OpenFileMapping(dwDesiredAccess: int, bInheritHandle: bool,
                    lpName: str) -> Optional[_fmap.Mapping]:
    access = _map_access(dwDesiredAccess)
    if access is None:
        SetLastError(ERROR_INVALID_PARAMETER)
        return None
    h = _call(lambda: _open(lpName, access), None)
    if h is not None:
        with _lock:
            _handles.add(h)
    return h


OpenFileMappingA = OpenFileMappingW = OpenFileMapping


def MapViewOfFileEx(hFileMappingObject: _fmap.Mapping, dwDesiredAccess: int,
                    dwFileOffsetHigh: int, dwFileOffsetLow: int,
                    dwNumberOfBytesToMap: int, lpBaseAddress: Optional[int]) -> Optional[_fmap.View]:
    access = _map_access(dwDesiredAccess)
    if access is None:
        SetLastError(ERROR_INVALID_PARAMETER)
        return None
    if not isinstance(hFileMappingObject, _fmap.Mapping):
        SetLastError(ERROR_INVALID_HANDLE)
        return None
    offset = (int(dwFileOffsetHigh) << 32) | int(dwFileOffsetLow)
    v = _call(lambda: hFileMappingObject.map(access, offset, dwNumberOfBytesToMap,
                                             address=lpBaseAddress or None), None)
    if v is not None:
        with _lock:
            _views[v.address] = v
    return v


def MapViewOfFile(hFileMappingObject: _fmap.Mapping, dwDesiredAccess: int,
                  dwFileOffsetHigh: int, dwFileOffsetLow: int,
                  dwNumberOfBytesToMap: int) -> Optional[_fmap.View]:
    return MapViewOfFileEx(hFileMappingObject, dwDesiredAccess, dwFileOffsetHigh,
                           dwFileOffsetLow, dwNumberOfBytesToMap, None)


def _view_at(lpBaseAddress: Union[_fmap.View, int, None]) -> Optional[_fmap.View]:
    """The open view containing lpBaseAddress (or lpBaseAddress itself, a View);
    None for NULL or an address in no view."""
    if isinstance(lpBaseAddress, _fmap.View):
        return None if lpBaseAddress.closed else lpBaseAddress
    if lpBaseAddress is None:
        return None
    if not isinstance(lpBaseAddress, int):
        raise TypeError(f"lpBaseAddress must be a View, an address (int) or NULL, "
                        f"not {type(lpBaseAddress).__name__}")
    with _lock:
        v = _views.get(lpBaseAddress)
        if v is None:
            v = next((w for a, w in _views.items() if a <= lpBaseAddress < a + len(w)), None)
    return v


def UnmapViewOfFile(lpBaseAddress: Union[_fmap.View, int, None]) -> bool:
    """Unmap the view at lpBaseAddress (a View, or any address inside it: Windows
    unmaps the whole view for an interior address, Wine kernel32/tests/virtual.c)."""
    v = _view_at(lpBaseAddress)
    if v is None:
        SetLastError(ERROR_INVALID_ADDRESS)
        return False
    address = v.address
    if not _done(v.close):
        return False
    with _lock:
        _views.pop(address, None)
    return True


def FlushViewOfFile(lpBaseAddress: Union[_fmap.View, int, None],
                    dwNumberOfBytesToFlush: int) -> bool:
    """Flush from lpBaseAddress (anywhere in a view) for that many bytes (0 = to the end)."""
    v = _view_at(lpBaseAddress)
    if v is None:
        SetLastError(ERROR_INVALID_ADDRESS)
        return False
    start = lpBaseAddress - v.address if isinstance(lpBaseAddress, int) else 0
    n = min(int(dwNumberOfBytesToFlush), len(v) - start) if dwNumberOfBytesToFlush else 0
    return _done(lambda: v.flush(start, n))


def FlushFileBuffers(lpBaseAddress: Union[_fmap.View, int, None]) -> bool:
    """fmap's nearest: flush the whole view and wait for the device."""
    v = _view_at(lpBaseAddress)
    if v is None:
        SetLastError(ERROR_INVALID_HANDLE)
        return False
    return _done(lambda: v.flush(wait=True))


def CloseHandle(hObject: Any) -> bool:
    if not isinstance(hObject, _fmap.Handle) or hObject.closed:
        SetLastError(ERROR_INVALID_HANDLE)
        return False
    ok = _done(hObject.close)
    with _lock:
        _handles.discard(hObject)
    return ok


def DuplicateHandle(hSourceHandle: _fmap.Mapping, dwDesiredAccess: int = 0,
                    dwOptions: int = DUPLICATE_SAME_ACCESS) -> Optional[_fmap.Mapping]:
    """A second handle to the same object, in this process.  (To pass a handle
    to another process, pickle the Mapping.)"""
    if not isinstance(hSourceHandle, _fmap.Mapping) or hSourceHandle.closed:
        SetLastError(ERROR_INVALID_HANDLE)
        return None
    access = (hSourceHandle.access if dwOptions & DUPLICATE_SAME_ACCESS
              else _map_access(dwDesiredAccess))
    if access is None:
        SetLastError(ERROR_INVALID_PARAMETER)
        return None
    code = _fmap.ACCESS[access]
    h = _call(lambda: _fmap._duplicate(hSourceHandle, code), None)
    if h is not None:
        with _lock:
            _handles.add(h)
        if dwOptions & DUPLICATE_CLOSE_SOURCE:
            CloseHandle(hSourceHandle)
            SetLastError(ERROR_SUCCESS)
    return h
