# Mutex, Semaphore and Event: the three synchronization objects over the
# SyncHandle base and the waiting machinery of sync.pxi.

cdef class Mutex(SyncHandle):
    """A named or unnamed mutex shared between processes (CreateMutex).

    Recursive like a Windows mutex: the owning thread may acquire it again and
    must release it as many times.  Releasing it from a thread that does not
    own it raises PermissionError (winerror 288, ERROR_NOT_OWNER).

    Abandonment (WAIT_ABANDONED): when the owning thread or process dies
    holding the mutex (SIGKILL included), the next acquirer gets it and
    `abandoned` is True for that ownership; acquire() still returns True.
    Check it where you take the mutex, since what it guards may be half
    updated:

        with mutex:
            if mutex.abandoned:
                repair()

    `abandoned` is set when a thread becomes the owner (not changed by
    recursive acquisitions) and read while holding the mutex.

    `with mutex:` acquires and releases it (like threading.Lock); close() closes
    the handle.  Closing a handle while a thread of this process owns the
    mutex leaves the mutex owned (as on Windows) and its page mapped until it
    is released or the thread exits (then the next acquirer is told it was
    abandoned).
    """

    @classmethod
    def create(cls, name=None, *, owned=False, exclusive=False):
        """Create a mutex, or open it if the name exists (CreateMutex).  See
        fmap.sync.create_mutex."""
        return _shim["create_mutex"](name, owned=owned, exclusive=exclusive)

    @classmethod
    def open(cls, name):
        """Open an existing named mutex (OpenMutex).  See fmap.sync.open_mutex."""
        return _shim["open_mutex"](name)

    def acquire(self, timeout=None, *, spin=None):
        """Wait until this thread owns the mutex (WaitForSingleObject).

        timeout: seconds, None = forever; 0 = try once.  spin: microseconds
        to keep trying before going to sleep (None or 0 = sleep at once); it
        shortens the wake-up of a mutex released by a process on another CPU.
        Returns True when acquired (check `abandoned`), False on timeout.
        The GIL is released while blocked; Ctrl-C interrupts the wait.
        """
        cdef int64_t t = -1
        cdef uint64_t sp = 0
        if timeout is not None:
            t = parse_timeout(timeout)
        if spin is not None:
            sp = parse_spin(spin)
        return take_one(self, t, sp) == 1

    def release(self):
        """Release one level of ownership (ReleaseMutex).  PermissionError
        (winerror 288) when the calling thread does not own the mutex."""
        cdef fmap_err e
        if self.fd < 0:
            check_open(self)
        if fmap_mutex_release(self.page, &e) != FMAP_OK:
            raise_err(&e, f"cannot release {what_of(self)}")

    def __enter__(self):
        take_one(self, -1, 0)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.release()

    @property
    def owned(self):
        """True when the calling thread owns the mutex."""
        cdef fmap_syncstate st
        check_open(self)
        fmap_sync_state(self.page, &st)
        return bool(st.mine)

    cdef str _state(self):
        cdef fmap_syncstate st
        fmap_sync_state(self.page, &st)
        if st.mine:
            return f"owned by this thread (depth {st.depth})"
        if st.owner:
            return f"owned by thread {st.owner}"
        if st.abandoned:
            return "abandoned (its owner died; the next acquirer is told)"
        return "free"


cdef class Semaphore(SyncHandle):
    """A named or unnamed counting semaphore shared between processes
    (CreateSemaphore).

    acquire() takes one unit, waiting while the count is 0; release(n) adds n
    and returns the previous count.  Releasing past `maximum` raises
    ValueError (winerror 298, ERROR_TOO_MANY_POSTS) and leaves the count
    unchanged.  `with sem:` acquires one unit and releases it.
    """

    @classmethod
    def create(cls, name=None, initial=0, maximum=SEMAPHORE_MAX, *, exclusive=False):
        """Create a semaphore, or open it if the name exists (CreateSemaphore).
        See fmap.sync.create_semaphore."""
        return _shim["create_semaphore"](name, initial, maximum, exclusive=exclusive)

    @classmethod
    def open(cls, name):
        """Open an existing named semaphore (OpenSemaphore)."""
        return _shim["open_semaphore"](name)

    def acquire(self, timeout=None, *, spin=None):
        """Take one unit, waiting while the count is 0 (WaitForSingleObject).

        timeout: seconds, None = forever, 0 = try once; spin: microseconds to
        keep trying before sleeping.  Returns True when taken, False on timeout.
        """
        cdef int64_t t = -1
        cdef uint64_t sp = 0
        if timeout is not None:
            t = parse_timeout(timeout)
        if spin is not None:
            sp = parse_spin(spin)
        return take_one(self, t, sp) == 1

    def release(self, count=1):
        """Add count units (ReleaseSemaphore); returns the previous count.
        ValueError (winerror 298) when that would pass the maximum: the count
        stays as it was."""
        cdef fmap_err e
        cdef uint32_t n = 1, prev = 0
        if count is not _ONE:         # the default, 1, skips the checks
            n = parse_release_count(count)
        if self.fd < 0:
            check_open(self)
        if fmap_sem_release(self.page, n, &prev, &e) != FMAP_OK:
            raise_err(&e, f"cannot release {what_of(self)} by {count}")
        return prev

    def __enter__(self):
        take_one(self, -1, 0)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.release()

    @property
    def count(self):
        """The current count (a snapshot: other processes may change it)."""
        cdef fmap_syncstate st
        check_open(self)
        fmap_sync_state(self.page, &st)
        return st.count

    cdef str _state(self):
        cdef fmap_syncstate st
        fmap_sync_state(self.page, &st)
        return f"count={st.count} maximum={st.maximum}"


cdef object _ONE = 1


cdef uint32_t parse_release_count(object count) except 0:
    if isinstance(count, bool):
        raise TypeError(f"count must be an int, not {type(count).__name__}")
    try:
        count = _operator.index(count)     # NumPy ints too, as create() takes them
    except TypeError:
        raise TypeError(f"count must be an int, not {type(count).__name__}") from None
    if count < 1:
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f"count must be at least 1, not {count}")
    # Past any maximum, it is clamped to one more than the largest: the C
    # layer then reports ERROR_TOO_MANY_POSTS with the count unchanged.
    return min(count, SEMAPHORE_MAX + 1)


cdef class Event(SyncHandle):
    """A named or unnamed event shared between processes (CreateEvent).

    set() signals it; wait() returns once it is signalled.  An auto-reset
    event (the default) lets exactly one waiter through per set() and turns
    unsignalled again; a manual-reset event releases every waiter and stays
    signalled until reset().  `with event:` closes the handle at the end, as
    for a Mapping.
    """

    @classmethod
    def create(cls, name=None, *, manual_reset=False, initial=False, exclusive=False):
        """Create an event, or open it if the name exists (CreateEvent).
        See fmap.sync.create_event."""
        return _shim["create_event"](name, manual_reset=manual_reset, initial=initial,
                                     exclusive=exclusive)

    @classmethod
    def open(cls, name):
        """Open an existing named event (OpenEvent)."""
        return _shim["open_event"](name)

    def wait(self, timeout=None, *, spin=None):
        """Wait until the event is signalled (WaitForSingleObject); for an
        auto-reset event, this wait resets it.

        timeout: seconds, None = forever, 0 = test; spin: microseconds to
        keep testing before sleeping (shortens a cross-process hand-off to
        about a microsecond, for up to that much CPU; it yields the CPU every
        2 microseconds).  Returns True when signalled, False on timeout.
        """
        cdef int64_t t = -1
        cdef uint64_t sp = 0
        if timeout is not None:
            t = parse_timeout(timeout)
        if spin is not None:
            sp = parse_spin(spin)
        return take_one(self, t, sp) == 1

    def set(self):
        """Signal the event (SetEvent): a manual-reset event releases every
        wait pending now and stays signalled; an auto-reset event releases
        the longest pending wait, or, with none pending, stays signalled
        until one wait takes it."""
        if self.fd < 0:
            check_open(self)
        fmap_event_set(self.page)

    def reset(self):
        """Make the event unsignalled (ResetEvent).  As on Windows, waits
        that an earlier set() released stay released, even those whose
        threads have not run yet."""
        if self.fd < 0:
            check_open(self)
        fmap_event_reset(self.page)

    def is_set(self):
        """True when the event is signalled (a snapshot; it does not reset it)."""
        cdef fmap_syncstate st
        check_open(self)
        fmap_sync_state(self.page, &st)
        return bool(st.set)

    cdef str _state(self):
        cdef fmap_syncstate st
        fmap_sync_state(self.page, &st)
        return (f"{'manual' if st.manual else 'auto'}-reset "
                f"{'set' if st.set else 'unset'}")
