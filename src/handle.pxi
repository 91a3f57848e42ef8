# Handles: what every named kernel object of fmap shares (mappings now,
# mutexes, semaphores, events and channels later): the fd, the holder record in
# the registry, closing, and following fork().
import gc as _gc
import os as _os
import warnings as _warnings

from cpython.mem cimport PyMem_Realloc
from cpython.ref cimport PyObject

_environ = _os.environ
# C globals, not the module's dict: finalizers find them even when they run
# after the interpreter has cleared the module at exit.
cdef object _warn = _warnings.warn

# The registry most recently attached, by directory.  fmap_reg_attach keeps
# every registry mapped for the life of the process, so the pointer stays valid.
cdef fmap_reg *_reg = NULL
cdef object _reg_dir = None


# os.environ's bytes-keyed store: read on every create/open (tests and tools
# change the variable at run time) without encoding the key each time.
_env_data = getattr(_environ, "_data", None)
_ENV_KEY = _os.fsencode("FMAP_RUNTIME_DIR")


def runtime_dir():
    """The per-user registry directory: $FMAP_RUNTIME_DIR or /dev/shm/fmap-<uid>."""
    d = _environ.get("FMAP_RUNTIME_DIR")
    return d if d else f"/dev/shm/fmap-{_os.geteuid()}"


cdef fmap_reg *get_registry(what) except NULL:
    global _reg, _reg_dir
    raw = _env_data.get(_ENV_KEY) if _env_data is not None else _environ.get("FMAP_RUNTIME_DIR")
    if _reg != NULL and raw == _reg_dir:
        return _reg
    d = runtime_dir()
    cdef fmap_err e
    cdef fmap_reg *r = NULL
    cdef bytes bd = _os.fsencode(d)
    if fmap_reg_attach(bd, 1, &r, &e) != FMAP_OK:
        raise_err(&e, what)
    _reg = r
    _reg_dir = raw
    return r


# Named handles alive in this process, for the fork hooks: borrowed pointers,
# each removed by its handle when it closes or dies.  Touched only with the GIL.
cdef PyObject **_live = NULL
cdef Py_ssize_t _nlive = 0
cdef Py_ssize_t _caplive = 0


cdef int live_add(Handle h) except -1:
    global _live, _nlive, _caplive
    cdef PyObject **grown
    if _nlive == _caplive:
        grown = <PyObject **>PyMem_Realloc(_live, (2 * _caplive + 16) * sizeof(PyObject *))
        if grown == NULL:
            raise MemoryError()
        _live = grown
        _caplive = 2 * _caplive + 16
    _live[_nlive] = <PyObject *>h
    h.live_index = _nlive
    _nlive += 1
    return 0


cdef void live_remove(Handle h) noexcept:
    global _nlive
    cdef Py_ssize_t i = h.live_index
    if i < 0:
        return
    _nlive -= 1
    if i != _nlive:
        _live[i] = _live[_nlive]
        (<Handle>_live[i]).live_index = i
    h.live_index = -1


def _fork_before():
    cdef fmap_err e
    cdef Py_ssize_t i
    for i in range(_nlive):
        fmap_reg_fork_prepare(&(<Handle>_live[i]).hold, &e)


def _fork_parent():
    # The child's pid goes into the records it is to claim, so that a child
    # killed before it could (in its first microseconds) frees them at once.
    cdef Py_ssize_t i
    cdef int child = fmap_newest_child() if _nlive else 0
    for i in range(_nlive):
        fmap_reg_fork_parent(&(<Handle>_live[i]).hold, child)


def _fork_child():
    # The child holds every handle the parent held (DESIGN.md: handles follow
    # fork()); it claims the records the parent added for it just before.
    cdef fmap_err e
    cdef Py_ssize_t i
    for i in range(_nlive):
        fmap_reg_fork_child(&(<Handle>_live[i]).hold, &e)


_os.register_at_fork(before=_fork_before, after_in_parent=_fork_parent,
                     after_in_child=_fork_child)


cdef uint32_t capped_access(uint32_t wanted, uint32_t protect) noexcept:
    """A handle's access: what was asked, within what the object allows."""
    if wanted == FMAP_A_WRITE and protect != FMAP_A_WRITE:
        return protect
    return wanted


cdef class Handle:
    """Base of fmap's kernel objects: one handle, like a Windows HANDLE."""

    def __cinit__(self):
        self.fd = -1
        self.live_index = -1
        self.hold.reg = NULL

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} objects are made by "
                        f"{type(self).__name__}.create() or .open()")

    cdef int _close_handle(self) except -1:
        # Invalidate first, release after: a second close (another thread, a
        # re-entrant finalizer) finds nothing to do.
        cdef int fd = self.fd
        cdef fmap_err e
        cdef int rc = FMAP_OK
        if fd < 0:
            return 0
        self.fd = -1
        live_remove(self)
        if self.hold.reg != NULL:
            with nogil:
                rc = fmap_reg_release(&self.hold, &e)
        fmap_close_fd(fd)
        if rc != FMAP_OK:
            raise_err(&e, f"closing {_TYPE_NAMES[self.otype]} {describe(self.name)}")
        return 0

    @property
    def closed(self):
        """True once close() was called (CloseHandle)."""
        return self.fd < 0

    def close(self):
        """Close the handle (CloseHandle).  Idempotent.  The name goes with the
        last handle in any process; the memory with the last handle and view."""
        self._close_handle()

    def __enter__(self):
        if self.fd < 0:
            raise make_error(ValueError, ERROR_INVALID_HANDLE,
                             f"{_TYPE_NAMES[self.otype]} {describe(self.name)} is closed")
        return self

    def __exit__(self, *exc):
        self._close_handle()

    def __del__(self):
        if self.fd >= 0:
            _warn(f"unclosed {unclosed_repr(self)}", ResourceWarning, source=self)
            self._close_handle()

    def __dealloc__(self):
        cdef fmap_err e
        if self.fd >= 0:    # finalizer skipped (interpreter shutdown): C cleanup only
            live_remove(self)
            if self.hold.reg != NULL:
                fmap_reg_release(&self.hold, &e)
            fmap_close_fd(self.fd)
            self.fd = -1


cdef str unclosed_repr(obj):
    """repr(obj) for a finalizer's warning.  A handle still held at exit (by a
    multiprocessing child's Process object, say) may be finalized after the
    module's dict was cleared, and repr() then finds the names it uses gone."""
    try:
        return repr(obj)
    except Exception:
        return f"<fmap.{type(obj).__name__}>"


cdef int check_open(Handle h) except -1:
    if h.fd < 0:
        raise make_error(ValueError, ERROR_INVALID_HANDLE,
                         f"{_TYPE_NAMES[h.otype]} {describe(h.name)} is closed")
    return 0


def registry_counts():
    """(live names, holder records) in this user's registry; for tests and tools."""
    cdef fmap_err e
    cdef uint32_t n = 0, k = 0
    cdef fmap_reg *r = get_registry("reading the registry")
    if fmap_reg_counts(r, &n, &k, &e) != FMAP_OK:
        raise_err(&e, "reading the registry")
    return n, k


cdef int _visit(void *ctx, const char *key, size_t keylen, const fmap_objinfo *info,
                uint32_t nholders) noexcept with gil:
    try:
        (<list>ctx).append((key[:keylen], _TYPE_NAMES.get(info.type, "?"), info.size, nholders))
        return 0
    except BaseException:
        return 1


def registry_list():
    """[(key, type, size, holders)] of every live name, dead holders pruned first."""
    cdef fmap_err e
    cdef list out = []
    cdef int rc
    cdef fmap_reg *r = get_registry("reading the registry")
    # _visit runs with the registry locked; a garbage collection there could
    # finalize an unclosed handle, whose close takes that lock again.
    collecting = _gc.isenabled()
    _gc.disable()
    try:
        rc = fmap_reg_list(r, _visit, <void *>out, &e)
    finally:
        if collecting:
            _gc.enable()
    if rc != FMAP_OK:
        raise_err(&e, "reading the registry")
    return out
