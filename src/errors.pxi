# The one chokepoint: a C status plus the errno saved at the failing call
# becomes one exception, with `winerror` set to the Windows code for the case.
import errno as _errno


class WrongTypeError(OSError):
    """The name is held by an object of another type (Windows: ERROR_INVALID_HANDLE)."""


# Windows error codes fmap reports (winerror.h).
ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_HANDLE = 6
ERROR_NOT_ENOUGH_MEMORY = 8
ERROR_INVALID_PARAMETER = 87
ERROR_DISK_FULL = 112
ERROR_ALREADY_EXISTS = 183
ERROR_INVALID_ADDRESS = 487
ERROR_FILE_INVALID = 1006
ERROR_MAPPED_ALIGNMENT = 1132
ERROR_FILE_CORRUPT = 1392
ERROR_NO_SYSTEM_RESOURCES = 1450
ERROR_COMMITMENT_LIMIT = 1455
ERROR_TIMEOUT = 1460
ERROR_TOO_MANY_OPEN_FILES = 4
ERROR_GEN_FAILURE = 31
ERROR_NOT_OWNER = 288
ERROR_TOO_MANY_POSTS = 298

# (0: a handle made by __new__, never opened: "handle is closed" all the same)
_TYPE_NAMES = {0: "handle", FMAP_T_MAPPING: "mapping", FMAP_T_MUTEX: "mutex",
               FMAP_T_SEMAPHORE: "semaphore", FMAP_T_EVENT: "event",
               FMAP_T_CHANNEL: "channel"}

# errno of a failed system call -> (Windows code, reason)
_ERRNO_TABLE = {
    _errno.ENOENT: (ERROR_FILE_NOT_FOUND, "no such file"),
    _errno.EACCES: (ERROR_ACCESS_DENIED, "permission denied"),
    _errno.EPERM: (ERROR_ACCESS_DENIED, "operation not permitted"),
    _errno.EEXIST: (ERROR_ALREADY_EXISTS, "already exists"),
    _errno.ENOMEM: (ERROR_NOT_ENOUGH_MEMORY, "not enough memory"),
    _errno.ENOSPC: (ERROR_DISK_FULL, "no space left"),
    _errno.EFBIG: (ERROR_DISK_FULL, "file too large"),
    _errno.EMFILE: (ERROR_TOO_MANY_OPEN_FILES, "too many open files"),
    _errno.ENFILE: (ERROR_TOO_MANY_OPEN_FILES, "too many open files in the system"),
    _errno.EISDIR: (ERROR_ACCESS_DENIED, "is a directory"),   # CreateFile on a directory
    _errno.EBADF: (ERROR_INVALID_HANDLE, "bad file descriptor"),
    _errno.EINVAL: (ERROR_INVALID_PARAMETER, "invalid argument"),
}

# Checks the C layer reports by name with a fixed errno: their own reason.
_CHECK_REASONS = {
    "empty file": (ERROR_FILE_INVALID, "the file is empty and no size was given"),
    "not a regular file": (ERROR_INVALID_PARAMETER, "not a regular file"),
    "file opened read-only": (ERROR_ACCESS_DENIED,
                              'a file opened read-only can back only "r" and "c" mappings'),
    "file opened write-only": (ERROR_ACCESS_DENIED, "a file opened write-only cannot be mapped"),
    # Windows: STATUS_SECTION_TOO_BIG -> ERROR_NOT_ENOUGH_MEMORY (Wine kernel32/tests/virtual.c)
    "file smaller than size": (ERROR_NOT_ENOUGH_MEMORY,
                               'the file is smaller than size and only "rw" protection may grow it'),
}


cdef object make_error(cls_or_errno, int winerror, str message):
    """Build an exception carrying `winerror`."""
    if isinstance(cls_or_errno, int):
        exc = OSError(cls_or_errno, message)     # picks FileNotFoundError & co. by errno
    else:
        exc = cls_or_errno(message)
    exc.winerror = winerror
    return exc


cdef int raise_err(const fmap_err *e, what) except -1:
    """Raise the exception for a failed C call.  `what` says what was asked: a
    str, or a callable making it.  (Not a lambda in a hot function: Cython
    builds a closure's scope at every call of the function that holds it, not
    when the lambda runs; an f-string in the failure branch costs nothing.)"""
    cdef int st = e.status
    if not isinstance(what, str):
        what = what()
    cdef int sys = e.sys
    call = e.call.decode() if e.call != NULL else "?"
    if st == FMAP_ENOTFOUND:
        raise make_error(_errno.ENOENT, ERROR_FILE_NOT_FOUND, f"{what}: no object of that name exists")
    if st == FMAP_EEXIST:
        raise make_error(_errno.EEXIST, ERROR_ALREADY_EXISTS, f"{what}: the name exists (exclusive=True)")
    if st == FMAP_EWRONGTYPE:
        exc = WrongTypeError(_errno.EEXIST, f"{what}: the name is held by an object of another type")
        exc.winerror = ERROR_INVALID_HANDLE
        raise exc
    if st == FMAP_EACCESS:
        raise make_error(_errno.EACCES, ERROR_ACCESS_DENIED,
                         f"{what}: the object exists but its holders cannot be reached "
                         "(another user, or a process that is not dumpable)")
    if st == FMAP_EFULL:
        raise make_error(_errno.ENOSPC, ERROR_NO_SYSTEM_RESOURCES,
                         f"{what}: no room: {call} are all in use")
    if st == FMAP_ECORRUPT:
        raise make_error(_errno.EINVAL, ERROR_FILE_CORRUPT,
                         f"{what}: {call}; is another fmap version using this runtime "
                         "directory? Set FMAP_RUNTIME_DIR to separate them")
    if st == FMAP_EUNSAFE:
        raise make_error(_errno.EPERM, ERROR_ACCESS_DENIED,
                         f"{what}: refusing the runtime directory {runtime_dir()!r}: {call} "
                         "(it must be a real directory, owned by this user, mode 0700)")
    if st == FMAP_ETIMEOUT:
        raise make_error(_errno.ETIMEDOUT, ERROR_TIMEOUT,
                         f"{what}: the registry lock stayed held for over 10 seconds "
                         "(is a process holding it stopped?)")
    if st == FMAP_EADDRINUSE:
        raise make_error(_errno.EEXIST, ERROR_INVALID_ADDRESS, f"{what}: that address range is in use")
    if st == FMAP_EGONE:
        raise make_error(_errno.ENOENT, ERROR_FILE_NOT_FOUND,
                         f"{what}: the process that passed the handle no longer holds it")
    if st == FMAP_ENOTOWNER:
        raise make_error(_errno.EPERM, ERROR_NOT_OWNER,
                         f"{what}: the calling thread does not own it")
    if st == FMAP_EBADADDR:
        raise make_error(ValueError, ERROR_INVALID_ADDRESS,
                         f"{what}: that address range is outside the process's address space")
    if st == FMAP_ECOMMIT:
        # CreateFileMapping of a paging-file section fails this way when the
        # commit limit (RAM + paging file) cannot cover it.
        raise make_error(MemoryError, ERROR_COMMITMENT_LIMIT,
                         f"{what}: not enough memory to commit it")
    if st == FMAP_ELIMIT:
        raise make_error(ValueError, ERROR_TOO_MANY_POSTS,
                         f"{what}: the count would pass the maximum; it is unchanged")
    # FMAP_ESYS: a system call or a named check failed with errno `sys`.
    if call in _CHECK_REASONS:
        code, reason = _CHECK_REASONS[call]
        if sys == _errno.EINVAL:
            raise make_error(ValueError, code, f"{what}: {reason}")
        raise make_error(sys, code, f"{what}: {reason}")
    code, reason = _ERRNO_TABLE.get(sys, (ERROR_GEN_FAILURE, None))
    import os
    reason = f"{call} failed: {os.strerror(sys) if sys else reason}"
    if sys == _errno.ENOMEM:
        raise make_error(MemoryError, code, f"{what}: {reason}")
    if sys == _errno.EINVAL:
        raise make_error(ValueError, code, f"{what}: {reason}")
    raise make_error(sys, code, f"{what}: {reason}")


cdef inline str describe(name):
    return "unnamed" if name is None else f'"{name}"'
