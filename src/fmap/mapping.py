"""create() and open(): argument checking and defaults for mappings.

The Cython core trusts what it gets from here; everything a user passes is
checked in this file, before any name is looked up (DESIGN.md contract 1).
"""
from __future__ import annotations

import errno
import operator
import os
from typing import Any

from . import _fmap
from .names import key_for, named

ERROR_INVALID_HANDLE = 6
ERROR_INVALID_PARAMETER = 87
MAX_SIZE = (1 << 63) - 1


def _bad(cls: type, message: str, winerror: int = ERROR_INVALID_PARAMETER) -> Exception:
    exc = cls(message)
    exc.winerror = winerror
    return exc


def _access(value: Any, what: str) -> int:
    try:
        return _fmap.ACCESS[value]
    except (KeyError, TypeError):
        raise _bad(ValueError, f'{what} must be "r", "rw" or "c", not {value!r}') from None


def _size(size: Any, *, required: bool) -> int:
    if size is None:
        if required:
            raise _bad(ValueError, "size is required for paging-file storage (and must be > 0)")
        return 0
    if isinstance(size, bool):
        raise TypeError("size must be an int, not bool")
    try:
        size = operator.index(size)
    except TypeError:
        raise TypeError(f"size must be an int, not {type(size).__name__}") from None
    if size < 0 or size > MAX_SIZE:
        raise _bad(ValueError, f"size must be between 0 and 2**63-1, not {size}")
    if required and size == 0:
        raise _bad(ValueError, "size must be > 0 for paging-file storage")
    return size


def _file_fd(file: Any, protect: int) -> tuple[int, str | None]:
    """An fd the core may own for `file` (a path, a file object or an fd),
    and the path of a file this call created (to remove if creation fails)."""
    if isinstance(file, bool):
        raise TypeError("file must be a path, a file object or an fd, not bool")
    if isinstance(file, int):
        return _fmap._dup(_fd(file)), None
    if isinstance(file, (str, bytes, os.PathLike)):
        fd, created = _fmap._open_file(file, protect, True)
        return fd, (os.fsdecode(file) if created else None)
    fileno = getattr(file, "fileno", None)
    if fileno is None:
        raise TypeError(f"file must be a path, a file object or an fd, not {type(file).__name__}")
    flush = getattr(file, "flush", None)
    if flush is not None:
        flush()          # buffered writes belong in the file before it is mapped
    return _fmap._dup(_fd(fileno())), None


def _fd(fd: int) -> int:
    # The core takes a C int; a number past it is a bad descriptor, not an OverflowError.
    if not 0 <= fd <= 0x7FFFFFFF:
        exc = OSError(errno.EBADF, f"cannot use file descriptor {fd} for a mapping: "
                                   "bad file descriptor")
        exc.winerror = ERROR_INVALID_HANDLE  # type: ignore[attr-defined]
        raise exc
    return fd


def create(name: str | None = None, size: int | None = None, *, file: Any = None,
           protect: str = "rw", exclusive: bool = False, populate: bool = False) -> _fmap.Mapping:
    """Create a file mapping, or open it if the name exists (CreateFileMapping).

    name: None or "" for unnamed; "Local\\\\" and "Global\\\\" prefixes allowed.
    size: bytes, required for paging-file storage; for a file, None (or 0) is
      the file's size and a larger size grows the file ("rw" only).
    file: a path (created if missing, for "rw"), a file object or an fd.
    protect: "r", "rw" or "c" (copy-on-write).
    exclusive: raise FileExistsError when the name exists, instead of opening it.
    populate: commit the memory now, as Windows commits a paging-file section
      at creation, and prefault the views.  When the machine (counting swap
      and the memory cgroup) cannot give it all, MemoryError with winerror
      1455 (ERROR_COMMITMENT_LIMIT), and nothing is left allocated or named.
      For a file, only the views are prefaulted.

    When the name exists, the existing object's size and protection win and
    `created` is False (ERROR_ALREADY_EXISTS); so does its populate: memory
    another process created without it is not committed here.

    Without populate, paging-file memory is allocated a page at a time on
    first touch, as Linux does for all shared memory.  If the machine runs out
    of memory then, the kernel's OOM killer ends some process (the one
    touching is a likely choice); with vm.overcommit_memory=2 the touching
    process gets SIGBUS.  fmap cannot turn that into an exception.  The size
    of /dev/shm is no limit here: the memory is a memfd, not a file there.

    A file is only as safe as its writers: another process that truncates it
    makes a touch of a view past the new end SIGBUS, as with mmap (Windows
    refuses that truncation; Linux cannot).
    """
    prot = _access(protect, "protect")
    size = _size(size, required=file is None)
    name, key = named(name)
    if file is None:
        return _fmap._create(name, key, size, prot, bool(exclusive), bool(populate), -1, None)
    fd, made = _file_fd(file, prot)
    try:
        return _fmap._create(name, key, size, prot, bool(exclusive), bool(populate), fd, file)
    except BaseException:
        if made is not None:
            try:
                os.unlink(made)
            except OSError:
                pass
        raise


def open(name: str, access: str = "rw") -> _fmap.Mapping:
    """Open an existing named mapping (OpenFileMapping).

    FileNotFoundError when no live object has that name; WrongTypeError when
    an object of another type holds it.  access: "r", "rw" or "c".
    """
    acc = _access(access, "access")
    key = key_for(name)
    if key is None:
        raise _bad(ValueError, "open needs a name; unnamed mappings are shared by "
                               "inheritance or by pickling the Mapping")
    return _fmap._open(name, key, acc)


_fmap._shim.update(create=create, open=open)
