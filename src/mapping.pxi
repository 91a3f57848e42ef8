# Mapping: a file-mapping object (CreateFileMapping / OpenFileMapping).
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uintptr_t

ALLOCATION_GRANULARITY = 65536   # Windows' value, on every OS: portable offsets
PAGE_SIZE = fmap_page_size()

ACCESS = {"r": FMAP_A_READ, "rw": FMAP_A_WRITE, "c": FMAP_A_COPY}
# (0: a Mapping made by __new__, never opened)
ACCESS_NAMES = {0: "none", FMAP_A_READ: "r", FMAP_A_WRITE: "rw", FMAP_A_COPY: "c"}

# Set by the Python shim: the argument-checking create/open behind the
# Mapping.create / Mapping.open class methods.
_shim = {}


cdef uint32_t parse_access(object access, str what) except 0:
    try:
        return ACCESS[access]
    except (KeyError, TypeError):
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f'{what}: access must be "r", "rw" or "c", not {access!r}') from None


cdef Mapping new_mapping(name, bytes key, int fd, const fmap_objinfo *info, uint32_t access,
                         bint created, bint populate, file):
    cdef Mapping m = Mapping.__new__(Mapping)
    m.fd = fd
    m.otype = FMAP_T_MAPPING
    m.name = name
    m.key = key
    m.size = info.size
    m.protect_ = info.protect
    m.access_ = access
    m.flags = info.flags
    m.dev = info.dev
    m.ino = info.ino
    m.created = created
    m.populate = populate
    m.file = file
    return m


cdef int commit_memory(int fd, uint64_t size, name) except -1:
    """Allocate a new memfd's memory now (populate=True), checking signals
    between steps; MemoryError (ERROR_COMMITMENT_LIMIT) when it cannot be had."""
    cdef fmap_err e
    cdef fmap_commit c
    cdef int rc
    c.done = 0
    c.chunk = 0
    c.avail = 0
    while c.done < size:
        with nogil:
            rc = fmap_memfd_commit(fd, size, &c, &e)
        if rc == FMAP_OK or rc == FMAP_WAIT_INTR:
            PyErr_CheckSignals()      # between steps: Ctrl-C & co. end it here
            continue
        raise_err(&e, f"cannot create mapping {describe(name)} of {size} bytes with "
                      f"populate=True (about {c.avail} bytes of memory can be had)")
    return 0


cdef Mapping open_existing(name, bytes key, uint32_t protect, bint exclusive, what):
    """create()'s first step when it will commit memory: the existing object
    (its own parameters win, as ever), or None when the name is free; so that
    no gigabytes are committed only to be dropped for an object that exists."""
    cdef fmap_err e
    cdef fmap_objinfo info
    cdef fmap_hold hold
    cdef int rc, fd = -1
    cdef fmap_reg *reg = get_registry(what)
    cdef const char *k = key
    cdef size_t klen = len(key)
    with nogil:
        rc = fmap_reg_open(reg, k, klen, FMAP_T_MAPPING, protect == FMAP_A_WRITE,
                           &fd, &info, &hold, &e)
    if rc == FMAP_ENOTFOUND:
        return None
    if rc != FMAP_OK:
        raise_err(&e, what)
    m = new_mapping(name, key, fd, &info, capped_access(protect, info.protect), False,
                    info.flags & FMAP_F_COMMITTED, None)
    m.hold = hold
    live_add(m)
    if exclusive:
        m.close()
        e.status = FMAP_EEXIST
        e.sys = _errno.EEXIST
        e.call = "lookup"
        raise_err(&e, what)
    return m


def _create(name, bytes key, uint64_t size, uint32_t protect, bint exclusive, bint populate,
            int fd, file):
    """The core of fmap.create; the shim has checked the arguments.

    fd is -1 for paging-file storage, else a file's fd that this call owns from
    now on: kept as the handle, or closed when an existing object wins or on error.

    populate, for paging-file storage, commits the memory before the name is
    published (and outside the registry lock: it can take seconds); views of
    a committed object, or of a file, are prefaulted.
    """
    cdef fmap_err e
    cdef fmap_newobj spec
    cdef fmap_objinfo info
    cdef fmap_hold hold
    cdef int created = 1, rc, ofd = -1
    cdef fmap_reg *reg = NULL
    what = lambda: f"cannot create mapping {describe(name)}"
    if fd >= 0:
        with nogil:
            rc = fmap_file_prepare(fd, protect, &size, &e)
        if rc != FMAP_OK:
            fmap_close_fd(fd)
            raise_err(&e, what)
    label = b"fmap:" + (key[1:200] if key is not None else b"")
    spec.fd = fd
    spec.flags = FMAP_F_FILE if fd >= 0 else 0
    spec.size = size
    spec.protect = protect
    spec.label = label
    spec.init = NULL
    spec.init_ctx = NULL
    if populate and fd < 0:
        if key is not None:
            m = open_existing(name, key, protect, exclusive, what)
            if m is not None:
                return m
        with nogil:
            rc = fmap_memfd_new(&spec, &fd, &e)
        if rc != FMAP_OK:
            raise_err(&e, what)
        try:
            commit_memory(fd, size, name)
        except BaseException:
            fmap_close_fd(fd)
            raise
        spec.fd = fd          # registered as it is, committed
        spec.flags = FMAP_F_COMMITTED
    if key is None:
        if fd < 0:
            with nogil:
                rc = fmap_memfd_new(&spec, &ofd, &e)
            if rc != FMAP_OK:
                raise_err(&e, what)
        else:
            ofd = fd
        if fmap_fd_info(ofd, &info, &e) != FMAP_OK:
            fmap_close_fd(ofd)
            raise_err(&e, what)
        info.type = FMAP_T_MAPPING
        info.protect = protect
        info.flags = spec.flags
        info.size = size
        return new_mapping(None, None, ofd, &info, protect, True, populate, file)
    try:
        reg = get_registry(what)
    except BaseException:
        fmap_close_fd(fd)
        raise
    cdef const char *k = key
    cdef size_t klen = len(key)
    with nogil:
        rc = fmap_reg_create(reg, k, klen, FMAP_T_MAPPING, &spec, exclusive,
                             protect == FMAP_A_WRITE, &ofd, &info, &hold, &created, &e)
    if rc != FMAP_OK:
        fmap_close_fd(fd)
        raise_err(&e, what)
    if not created:
        fmap_close_fd(fd)     # the existing object wins (ERROR_ALREADY_EXISTS)
        file = None
        # its memory was committed at its creation, or is not ours to commit
        populate = populate and info.flags & (FMAP_F_FILE | FMAP_F_COMMITTED)
    m = new_mapping(name, key, ofd, &info, capped_access(protect, info.protect),
                    created, populate, file)
    m.hold = hold
    live_add(m)
    return m


def _open(name, bytes key, uint32_t access, uint64_t dev=0, uint64_t ino=0):
    """The core of fmap.open.  dev and ino, when given, must match (unpickling)."""
    cdef fmap_err e
    cdef fmap_objinfo info
    cdef fmap_hold hold
    cdef int rc, fd = -1
    what = lambda: f"cannot open mapping {describe(name)}"
    cdef fmap_reg *reg = get_registry(what)
    cdef const char *k = key
    cdef size_t klen = len(key)
    with nogil:
        rc = fmap_reg_open(reg, k, klen, FMAP_T_MAPPING, access == FMAP_A_WRITE,
                           &fd, &info, &hold, &e)
    if rc != FMAP_OK:
        raise_err(&e, what)
    m = new_mapping(name, key, fd, &info, capped_access(access, info.protect), False,
                    False, None)
    m.hold = hold
    live_add(m)
    if dev and (info.dev != dev or info.ino != ino):
        m.close()
        raise make_error(_errno.ENOENT, ERROR_FILE_NOT_FOUND,
                         f"{what()}: the mapping that was passed is gone; the name now "
                         "names another object")
    return m


def _reach(int pid, int fd, uint32_t access, uint32_t protect, uint32_t flags, uint64_t size,
           uint64_t dev, uint64_t ino):
    """Open an unnamed mapping passed from process pid (unpickling)."""
    cdef fmap_err e
    cdef fmap_objinfo info
    cdef int rc, out = -1
    access = capped_access(access, protect)
    with nogil:
        rc = fmap_reach(pid, fd, access == FMAP_A_WRITE, dev, ino, &out, &e)
    if rc != FMAP_OK:
        raise_err(&e, "cannot open the unnamed mapping passed from another process")
    info.type = FMAP_T_MAPPING
    info.protect = protect
    info.flags = flags
    info.size = size
    info.dev = dev
    info.ino = ino
    return new_mapping(None, None, out, &info, access, False, False, None)


def _duplicate(Mapping m, uint32_t access):
    """A second handle to m's object in this process (DuplicateHandle)."""
    check_open(m)
    if m.key is not None:
        return _open(m.name, m.key, access, m.dev, m.ino)
    return _reach(fmap_getpid(), m.fd, access, m.protect_, m.flags, m.size, m.dev, m.ino)


def _unpickle(name, key, pid, fd, access, protect, flags, size, dev, ino):
    if key is not None:
        return _open(name, key, access, dev, ino)
    return _reach(pid, fd, access, protect, flags, size, dev, ino)


cdef class Mapping(Handle):
    """A file-mapping object: memory (paging-file storage) or a file, named or not.

    Made by fmap.create() / fmap.open() (or Mapping.create / Mapping.open).
    Views of it come from map().  close() is CloseHandle: the name goes away
    with the last handle in any process; the memory when the last handle and
    the last view are gone, crash or not.
    """

    @classmethod
    def create(cls, *args, **kwargs):
        """Same as fmap.create()."""
        return _shim["create"](*args, **kwargs)

    @classmethod
    def open(cls, *args, **kwargs):
        """Same as fmap.open()."""
        return _shim["open"](*args, **kwargs)

    @property
    def protect(self):
        """The object's protection: "r", "rw" or "c"."""
        return ACCESS_NAMES[self.protect_]

    @property
    def access(self):
        """What this handle may map: "r", "rw" or "c"."""
        return ACCESS_NAMES[self.access_]

    def fileno(self):
        """The handle's file descriptor (owned by the Mapping)."""
        check_open(self)
        return self.fd

    def map(self, access=None, offset=0, length=0, *, address=None):
        """Map a view (MapViewOfFileEx).

        access: "r", "rw" or "c" (copy-on-write, private to the view); None =
        the handle's access.  offset: a multiple of ALLOCATION_GRANULARITY.
        length: bytes, 0 = to the end (a paging-file mapping's views may reach
        the end of its last page, as a Windows section's).  address: map
        exactly there (a multiple of ALLOCATION_GRANULARITY) or fail if the
        range is in use.
        """
        cdef fmap_err e
        cdef void *p = NULL
        cdef void *fixed = NULL
        cdef uint32_t acc
        cdef uint64_t off, ln, size, end
        cdef int rc, fd
        check_open(self)
        size = self.size
        # Windows rounds a paging-file section up to whole pages, and a view
        # may reach the end of its last page (Wine's virtual.c: 0x3452 bytes
        # make a 0x4000 section); a file's ends where the file's bytes do.
        # The page's tail is shared like the rest (the memfd has that page).
        end = size if self.flags & FMAP_F_FILE else (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        if access is None:
            acc = self.access_
        else:
            acc = parse_access(access, f"cannot map mapping {describe(self.name)}")
        if acc == FMAP_A_WRITE and self.access_ != FMAP_A_WRITE:
            raise make_error(_errno.EACCES, ERROR_ACCESS_DENIED,
                             f'cannot map a "rw" view of mapping {describe(self.name)}: '
                             f'the {"mapping" if self.protect_ != FMAP_A_WRITE else "handle"} '
                             f'is "{ACCESS_NAMES[self.access_]}"')
        try:
            # operator.index: Cython's conversion would truncate floats (1.5 -> 1)
            off = _operator.index(offset)
            ln = _operator.index(length)
        except (OverflowError, TypeError):
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"cannot map mapping {describe(self.name)}: offset and length "
                             f"must be non-negative integers, not {offset!r}, {length!r}") from None
        if off % ALLOCATION_GRANULARITY:
            raise make_error(ValueError, ERROR_MAPPED_ALIGNMENT,
                             f"cannot map at offset {off}: offsets are multiples of "
                             f"ALLOCATION_GRANULARITY ({ALLOCATION_GRANULARITY})")
        if ln == 0:
            if off >= size:
                raise make_error(ValueError, ERROR_ACCESS_DENIED,
                                 f"cannot map at offset {off}: mapping {describe(self.name)} "
                                 f"has {size} bytes")
            ln = size - off
        elif off > size or ln > end - off:
            raise make_error(ValueError, ERROR_ACCESS_DENIED,
                             f"cannot map {ln} bytes at offset {off}: mapping "
                             f"{describe(self.name)} has {size} bytes"
                             + (f" ({end} with the rest of its last page)" if end != size else ""))
        if address is not None:
            try:
                fixed = <void *><uintptr_t>_operator.index(address)
            except (OverflowError, TypeError):
                raise make_error(ValueError, ERROR_INVALID_ADDRESS,
                                 f"address must be a non-negative integer, not {address!r}") from None
            if <uintptr_t>fixed % ALLOCATION_GRANULARITY or fixed == NULL:
                raise make_error(ValueError, ERROR_MAPPED_ALIGNMENT,
                                 f"cannot map at address {address:#x}: addresses are non-zero "
                                 f"multiples of ALLOCATION_GRANULARITY ({ALLOCATION_GRANULARITY})")
        # Our own copy of the fd for the GIL-free map: a close() in another
        # thread meanwhile (or an __index__ above) frees self.fd's number,
        # which the next open anywhere may take, and the view would then be
        # of that file.
        check_open(self)
        if fmap_dup(self.fd, &fd, &e) != FMAP_OK:
            raise_err(&e, f"cannot map mapping {describe(self.name)}")
        with nogil:
            rc = fmap_view_map(fd, off, ln, acc, self.populate, fixed, &p, &e)
            fmap_close_fd(fd)
        if rc != FMAP_OK:
            where = f" at address {address:#x}" if address is not None else ""
            raise_err(&e, f"cannot map {ln} bytes of mapping {describe(self.name)} "
                          f"at offset {off}{where}")
        return new_view(<char *>p, ln, off, acc, self.flags & FMAP_F_FILE, self.name)

    def __reduce__(self):
        # Passing a handle to another process: a named mapping is reopened by
        # name (and checked to be the same object); an unnamed one through
        # this process's fd, which must stay open until the receiver has it.
        check_open(self)
        return (_unpickle, (self.name, self.key, fmap_getpid(), self.fd, self.access_,
                            self.protect_, self.flags, self.size, self.dev, self.ino))

    def __repr__(self):
        state = "closed" if self.fd < 0 else "open"
        what = describe(self.name)
        if self.file is not None:
            what += f" file={self.file!r}"
        return (f"<fmap.Mapping {what} size={self.size} protect={self.protect} "
                f"access={self.access} created={self.created} {state}>")


def _open_file(path, uint32_t protect, bint create):
    """Open a path for a file-backed mapping; (fd, created).  Errors through the chokepoint."""
    cdef fmap_err e
    cdef int fd = -1, created = 0, rc
    cdef bytes p
    cdef const char *cp
    try:
        p = _os.fsencode(path)
    except UnicodeEncodeError as exc:     # a lone surrogate: no file can have that name
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f"cannot open file {path!r} for a mapping: {exc}") from None
    if b"\0" in p:      # C would see a shorter path and open another file
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f"cannot open file {_os.fsdecode(path)!r} for a mapping: "
                         "embedded null byte")
    cp = p
    with nogil:
        rc = fmap_file_open(cp, protect, create, &fd, &created, &e)
    if rc != FMAP_OK:
        raise_err(&e, f"cannot open file {_os.fsdecode(path)!r} for a mapping")
    return fd, bool(created)


def _dup(int fd):
    """Duplicate a caller's fd (file objects, fds): the Mapping owns its copy."""
    cdef fmap_err e
    cdef int out = -1
    if fmap_dup(fd, &out, &e) != FMAP_OK:
        raise_err(&e, f"cannot use file descriptor {fd} for a mapping")
    return out


def _close_fd(int fd):
    fmap_close_fd(fd)
