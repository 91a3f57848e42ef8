# Synchronization objects, the common part: the SyncHandle base (a handle
# with the object's shared page), waiting (timeouts, spin, GIL-free slices
# with signal checks), wait_any (WaitForMultipleObjects with bWaitAll FALSE)
# and the factories behind Mutex/Semaphore/Event.create and .open.  The three
# classes are in sync_objects.pxi; the state in one shared page per object
# (src/c/sync_linux.c).  Names, lifetime and fork() come from Handle.
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t
import numbers as _numbers

# A blocked wait comes back for the GIL this often to run signal handlers, so
# Ctrl-C raises KeyboardInterrupt promptly even when no EINTR reaches the
# sleeping call (a signal handled by another thread).
cdef uint64_t SLICE_NS = 50000000
# wait_any: a mutex whose owner dies wakes nobody on the change counters that
# wait_any sleeps on, so it looks again this often.
cdef uint64_t ANY_SLICE_NS = 20000000
# Nothing wakes a mutex's waiters when its owner dies: they ask whether it is
# gone (a kill(2) and a /proc read) every ASK_NS in the first ASK_KEEN_NS of
# a wait, then every ASK_LATER_NS, so a long wait costs little; however
# often signals cut its sleeps short.
cdef uint64_t ASK_NS = 10000000
cdef uint64_t ASK_KEEN_NS = 1000000000
cdef uint64_t ASK_LATER_NS = 50000000


cdef inline uint64_t ask_every(uint64_t now, uint64_t start, uint64_t keen) nogil:
    return keen if now - start < ASK_KEEN_NS else ASK_LATER_NS


cdef inline bint ask_now(uint64_t now, uint64_t every, uint64_t *asked) nogil:
    """Whether this slice of a wait, asking every `every` ns, asks after a
    mutex's owner; if so, *asked (when the wait last asked) becomes now."""
    # three quarters: a slice as long as `every` still asks each time
    if now - asked[0] >= every - every // 4:
        asked[0] = now
        return True
    return False


cdef double MAX_SPIN_US = 1e6
cdef uint64_t FOREVER = <uint64_t>-1

MAXIMUM_WAIT_OBJECTS = FMAP_WAIT_MAX
SEMAPHORE_MAX = 0x7fffffff       # Windows' largest lMaximumCount (LONG_MAX)


cdef str what_of(Handle h):
    return f"{_TYPE_NAMES[h.otype]} {describe(h.name)}"


cpdef object parse_count(object value, str what):
    """An int argument (any index but a bool), or a TypeError that says so.
    The shim's counts (fmap.sync._count) are this one too."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        return _operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None


cdef int64_t parse_timeout(object timeout) except -2:
    """None or inf -> -1 (forever); seconds -> ns."""
    cdef double t
    if timeout is None:
        return -1
    if (type(timeout) is float or type(timeout) is int or
            (isinstance(timeout, _numbers.Real) and not isinstance(timeout, bool))):
        try:
            t = float(timeout)
        except OverflowError:
            t = float("inf") if timeout > 0 else -1.0
    else:
        raise TypeError(f"timeout must be a number of seconds or None, not "
                        f"{type(timeout).__name__}")
    if not t >= 0:    # negative or NaN
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f"timeout must be >= 0 seconds or None (forever), not {timeout!r}")
    if t >= 9e9:      # beyond any deadline the clock can express: forever
        return -1
    return <int64_t>(t * 1e9)


cdef uint64_t parse_spin(object spin) except? 0xffffffffffffffff:
    """Microseconds to spin before sleeping -> ns."""
    cdef double s
    if spin is None:
        return 0
    if type(spin) is float or type(spin) is int or (
            isinstance(spin, _numbers.Real) and not isinstance(spin, bool)):
        try:
            s = float(spin)
        except OverflowError:
            s = float("inf")
    else:
        raise TypeError(f"spin must be a number of microseconds or None, not "
                        f"{type(spin).__name__}")
    if not (0 <= s <= MAX_SPIN_US):
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f"spin must be between 0 and {MAX_SPIN_US:.0f} microseconds, not {spin!r}")
    return <uint64_t>(s * 1000)


cdef int end_wait(SyncHandle h) except -1:
    h.waiting -= 1
    if h.fd < 0 and h.waiting == 0:
        h._unmap()     # closed while we waited: the last waiter unmaps
    return 0


cdef int check_not_closed_waiting(SyncHandle h) except -1:
    if h.fd < 0:
        raise make_error(ValueError, ERROR_INVALID_HANDLE,
                         f"{what_of(h)} was closed while a wait on it was blocked")
    return 0


cdef int take_one(SyncHandle h, int64_t timeout_ns, uint64_t spin_ns) except -1:
    """Acquire (wait for) one object: 1 done, 0 timed out.  The fast path keeps
    the GIL; the blocking path releases it in slices and checks signals between."""
    cdef fmap_err e
    cdef int rc, depth = 0, ab = 0
    cdef fmap_sync *page
    cdef fmap_waiter w
    cdef uint64_t now, end, until, start, every, asked = 0
    cdef bint ask
    if h.fd < 0:
        check_open(h)
    page = h.page
    fmap_wait_begin(page, &w)
    # Whether a busy mutex's owner is gone is asked here only when this try
    # is the whole wait; else on the way to sleep, after any spin.
    rc = fmap_sync_trywait(page, &w, timeout_ns == 0, &depth, &ab, &e)
    if rc == FMAP_WAIT_TIMEOUT:
        if timeout_ns == 0:
            return 0
        now = start = fmap_clock_ns()
        end = FOREVER if timeout_ns < 0 else now + <uint64_t>timeout_ns
        h.waiting += 1
        try:
            while True:
                until = now + SLICE_NS
                if until > end:
                    until = end
                every = ask_every(now, start, ASK_NS)
                ask = ask_now(now, every, &asked)
                with nogil:
                    rc = fmap_sync_wait(page, &w, spin_ns, until, ask, every, &depth, &ab, &e)
                if rc != FMAP_WAIT_TIMEOUT and rc != FMAP_WAIT_INTR:
                    break
                spin_ns = 0
                PyErr_CheckSignals()
                check_not_closed_waiting(h)
                now = fmap_clock_ns()
                if now >= end:
                    # A set() that released us at the last moment counts.
                    if not fmap_wait_end(page, &w, 1):
                        return 0
                    rc = FMAP_OK
                    break
        finally:
            # An event's wait slot, when the wait ends any other way (an
            # exception from a signal handler, the handle closed, an error):
            # a release already made in it goes to the next waiter.
            fmap_wait_end(page, &w, 0)
            end_wait(h)
    if rc != FMAP_OK:
        raise_err(&e, f"cannot wait for {what_of(h)}")
    if depth == 1 and h.otype == FMAP_T_MUTEX:
        (<Mutex>h).abandoned = ab
    return 1


cdef class SyncHandle(Handle):
    """Base of Mutex, Semaphore and Event: a handle on a named (or unnamed)
    synchronization object.  close() is CloseHandle."""

    def __cinit__(self):
        self.page = NULL

    cdef int _unmap(self) except -1:
        cdef fmap_sync *p = self.page
        if p != NULL:
            self.page = NULL
            fmap_sync_unmap(p)
        return 0

    cdef int _close_handle(self) except -1:
        try:
            Handle._close_handle(self)
        finally:
            # A thread blocked on the page without the GIL unmaps it when it
            # comes back.
            if self.waiting == 0:
                self._unmap()
        return 0

    def __dealloc__(self):
        if self.page != NULL:
            fmap_sync_unmap(self.page)
            self.page = NULL

    def __reduce__(self):
        # As for Mapping: reopened by name (and checked to be the same object),
        # an unnamed one through this process's fd.
        check_open(self)
        return (_sync_unpickle, (self.otype, self.name, self.key, fmap_getpid(), self.fd,
                                 self.dev, self.ino))

    cdef str _state(self):
        return ""

    def __repr__(self):
        if self.fd < 0:
            return f"<fmap.{type(self).__name__} {describe(self.name)} closed>"
        return (f"<fmap.{type(self).__name__} {describe(self.name)} {self._state()} "
                f"created={self.created} open>")


def _wait_any(tuple objects, timeout=None, spin=None):
    """The core of fmap.wait_any; the shim has checked that objects is a tuple
    of 1..MAXIMUM_WAIT_OBJECTS SyncHandles."""
    cdef fmap_err e
    cdef fmap_sync *pages[64]        # FMAP_WAIT_MAX
    cdef fmap_waiter ws[64]
    cdef int n = len(objects), i, idx = -1, depth = 0, ab = 0, rc
    cdef int64_t t = parse_timeout(timeout)
    cdef uint64_t sp = parse_spin(spin)
    cdef uint64_t now, end, until, start, asked = 0
    cdef bint ask
    cdef SyncHandle h
    if n < 1 or n > FMAP_WAIT_MAX:
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f"wait_any takes 1 to {FMAP_WAIT_MAX} objects, not {n}")
    for i in range(n):
        h = objects[i]
        check_open(h)
        pages[i] = h.page
        fmap_wait_begin(pages[i], &ws[i])
    rc = fmap_sync_try_any(pages, ws, n, t == 0, &idx, &depth, &ab, &e)     # as take_one
    if rc == FMAP_WAIT_TIMEOUT:
        if t == 0:
            return None
        now = start = fmap_clock_ns()
        end = FOREVER if t < 0 else now + <uint64_t>t
        for i in range(n):
            (<SyncHandle>objects[i]).waiting += 1
        try:
            while True:
                until = now + ANY_SLICE_NS
                if until > end:
                    until = end
                # a mutex's owner asked after every slice at first (nothing
                # in between), then every ASK_LATER_NS
                ask = ask_now(now, ask_every(now, start, ANY_SLICE_NS), &asked)
                with nogil:
                    rc = fmap_sync_wait_any(pages, ws, n, sp, until, ask, &idx, &depth, &ab,
                                            &e)
                if rc != FMAP_WAIT_TIMEOUT and rc != FMAP_WAIT_INTR:
                    break
                sp = 0
                PyErr_CheckSignals()
                for i in range(n):
                    check_not_closed_waiting(objects[i])
                now = fmap_clock_ns()
                if now >= end:
                    # as take_one: a release at the last moment counts
                    rc = fmap_sync_try_any(pages, ws, n, 0, &idx, &depth, &ab, &e)
                    if rc == FMAP_WAIT_TIMEOUT:
                        return None
                    break
        finally:
            for i in range(n):
                # releases into the slots of objects not taken are passed on
                fmap_wait_end(pages[i], &ws[i], 0)
                end_wait(objects[i])
    if rc != FMAP_OK:
        raise_err(&e, "wait_any failed")
    h = objects[idx]
    if depth == 1 and h.otype == FMAP_T_MUTEX:
        (<Mutex>h).abandoned = ab
    return idx


cdef SyncHandle new_sync(uint32_t otype, name, bytes key, int fd, fmap_sync *page,
                         const fmap_objinfo *info, bint created):
    cdef SyncHandle h
    cdef fmap_syncstate st
    fmap_sync_state(page, &st)
    if otype == FMAP_T_MUTEX:
        h = Mutex.__new__(Mutex)
    elif otype == FMAP_T_SEMAPHORE:
        h = Semaphore.__new__(Semaphore)
        (<Semaphore>h).maximum = st.maximum
    else:
        h = Event.__new__(Event)
        (<Event>h).manual_reset = st.manual
    h.fd = fd
    h.page = page
    h.otype = otype
    h.name = name
    h.key = key
    h.protect_ = FMAP_A_WRITE
    h.access_ = FMAP_A_WRITE
    h.dev = info.dev
    h.ino = info.ino
    h.created = created
    return h


def _sync_create(uint32_t otype, name, bytes key, bint exclusive, uint32_t flags,
                 uint32_t initial, uint32_t maximum):
    """The core of Mutex/Semaphore/Event.create; the shim has checked the arguments."""
    cdef fmap_err e
    cdef fmap_newobj spec
    cdef fmap_syncspec sp
    cdef fmap_objinfo info
    cdef fmap_hold hold
    cdef fmap_sync *page = NULL
    cdef int created = 1, rc, fd = -1
    cdef fmap_reg *reg
    kind = _TYPE_NAMES[otype]
    what = lambda: f"cannot create {kind} {describe(name)}"
    sp.type = otype
    sp.flags = flags
    sp.initial = initial
    sp.maximum = maximum
    sp.page = NULL
    label = b"fmap-" + kind.encode() + b":" + (key[1:200] if key is not None else b"")
    spec.fd = -1
    spec.flags = 0
    spec.size = fmap_sync_size()
    spec.protect = FMAP_A_WRITE
    spec.label = label
    spec.init = fmap_sync_init
    spec.init_ctx = &sp
    if key is None:
        with nogil:
            rc = fmap_memfd_new(&spec, &fd, &e)
            if rc == FMAP_OK:
                rc = fmap_sync_init(&sp, fd, &e)
            if rc == FMAP_OK:
                rc = fmap_fd_info(fd, &info, &e)
        if rc != FMAP_OK:
            if sp.page != NULL:
                fmap_sync_discard(sp.page)
            fmap_close_fd(fd)
            raise_err(&e, what)
        return new_sync(otype, None, None, fd, sp.page, &info, True)
    reg = get_registry(what)
    cdef const char *k = key
    cdef size_t klen = len(key)
    with nogil:
        rc = fmap_reg_create(reg, k, klen, otype, &spec, exclusive, 1, &fd, &info, &hold,
                             &created, &e)
    if rc != FMAP_OK:
        if sp.page != NULL:       # laid out, then registering failed
            fmap_sync_discard(sp.page)
        raise_err(&e, what)
    if created:
        page = sp.page
    elif _map_existing(otype, fd, &hold, &page, what) < 0:
        return None   # not reached: _map_existing raised
    h = new_sync(otype, name, key, fd, page, &info, created)
    h.hold = hold
    live_add(h)
    return h


cdef int _map_existing(uint32_t otype, int fd, fmap_hold *hold, fmap_sync **page,
                       what) except -1:
    """Map an opened object's page; on failure give up the fd and the holder record."""
    cdef fmap_err e, e2
    cdef int rc
    with nogil:
        rc = fmap_sync_map(fd, otype, page, &e)
    if rc != FMAP_OK:
        if hold.reg != NULL:
            fmap_reg_release(hold, &e2)
        fmap_close_fd(fd)
        raise_err(&e, what)
    return 0


def _sync_open(uint32_t otype, name, bytes key, uint64_t dev=0, uint64_t ino=0):
    """The core of Mutex/Semaphore/Event.open.  dev and ino, when given, must
    match (unpickling)."""
    cdef fmap_err e
    cdef fmap_objinfo info
    cdef fmap_hold hold
    cdef fmap_sync *page = NULL
    cdef int rc, fd = -1
    kind = _TYPE_NAMES[otype]
    what = lambda: f"cannot open {kind} {describe(name)}"
    cdef fmap_reg *reg = get_registry(what)
    cdef const char *k = key
    cdef size_t klen = len(key)
    with nogil:
        rc = fmap_reg_open(reg, k, klen, otype, 1, &fd, &info, &hold, &e)
    if rc != FMAP_OK:
        raise_err(&e, what)
    _map_existing(otype, fd, &hold, &page, what)
    h = new_sync(otype, name, key, fd, page, &info, False)
    h.hold = hold
    live_add(h)
    if dev and (info.dev != dev or info.ino != ino):
        h.close()
        raise make_error(_errno.ENOENT, ERROR_FILE_NOT_FOUND,
                         f"{what()}: the {kind} that was passed is gone; the name now "
                         "names another object")
    return h


def _sync_reach(uint32_t otype, int pid, int fd, uint64_t dev, uint64_t ino):
    """Open an unnamed object passed from process pid (unpickling)."""
    cdef fmap_err e
    cdef fmap_objinfo info
    cdef fmap_sync *page = NULL
    cdef int rc, out = -1
    cdef fmap_hold nohold
    what = f"cannot open the unnamed {_TYPE_NAMES[otype]} passed from another process"
    with nogil:
        rc = fmap_reach(pid, fd, 1, dev, ino, &out, &e)
    if rc != FMAP_OK:
        raise_err(&e, what)
    nohold.reg = NULL
    _map_existing(otype, out, &nohold, &page, what)
    info.dev = dev
    info.ino = ino
    return new_sync(otype, None, None, out, page, &info, False)


def _sync_unpickle(otype, name, key, pid, fd, dev, ino):
    if key is not None:
        return _sync_open(otype, name, key, dev, ino)
    return _sync_reach(otype, pid, fd, dev, ino)
