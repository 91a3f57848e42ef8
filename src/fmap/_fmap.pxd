# The ownership map of the Cython core (src/_fmap.pyx, built as fmap._fmap; Cython
# finds a module's .pxd by its qualified name, hence here): every C-owned field
# says what owns it.
from libc.stdint cimport int32_t, uint32_t, uint64_t

cdef extern from "c/fmap.h" nogil:
    enum:
        FMAP_OK
        FMAP_ESYS
        FMAP_ENOTFOUND
        FMAP_EEXIST
        FMAP_EWRONGTYPE
        FMAP_EACCESS
        FMAP_EFULL
        FMAP_ECORRUPT
        FMAP_EUNSAFE
        FMAP_ETIMEOUT
        FMAP_EADDRINUSE
        FMAP_EGONE
        FMAP_ENOTOWNER
        FMAP_ELIMIT
        FMAP_EBADADDR
        FMAP_ECOMMIT
        FMAP_T_MAPPING
        FMAP_T_MUTEX
        FMAP_T_SEMAPHORE
        FMAP_T_EVENT
        FMAP_T_CHANNEL
        FMAP_A_READ
        FMAP_A_WRITE
        FMAP_A_COPY
        FMAP_F_FILE
        FMAP_F_COMMITTED
        FMAP_KEY_MAX

    ctypedef struct fmap_err:
        int status
        int sys
        const char *call

    ctypedef struct fmap_objinfo:
        uint32_t type
        uint32_t protect
        uint32_t flags
        uint64_t size
        uint64_t dev
        uint64_t ino

    ctypedef struct fmap_newobj:
        int fd
        uint32_t flags
        uint64_t size
        uint32_t protect
        const char *label
        int (*init)(void *ctx, int fd, fmap_err *e) noexcept nogil
        void *init_ctx

    ctypedef struct fmap_reg:
        pass

    ctypedef struct fmap_hold:
        fmap_reg *reg
        uint32_t entry
        uint32_t slot
        uint32_t pending
        uint64_t gen
        int fd

    ctypedef struct fmap_commit:
        uint64_t done
        uint64_t chunk
        uint64_t avail

    size_t fmap_page_size()
    int fmap_getpid()
    int fmap_memfd_new(const fmap_newobj *spec, int *fd, fmap_err *e)
    int fmap_memfd_commit(int fd, uint64_t size, fmap_commit *c, fmap_err *e)
    int fmap_file_prepare(int fd, uint32_t protect, uint64_t *size, fmap_err *e)
    int fmap_file_open(const char *path, uint32_t protect, int create, int *fd, int *created, fmap_err *e)
    int fmap_fd_info(int fd, fmap_objinfo *info, fmap_err *e)
    int fmap_fd_access(int fd, int *writable, fmap_err *e)
    int fmap_dup(int fd, int *out, fmap_err *e)
    void fmap_close_fd(int fd)
    int fmap_reach(int pid, int fd, int writable, uint64_t dev, uint64_t ino, int *out, fmap_err *e)
    int fmap_view_map(int fd, uint64_t offset, size_t length, uint32_t access,
                      int populate, void *fixed, void **out, fmap_err *e)
    int fmap_view_retire(void *addr, size_t length, fmap_err *e)
    int fmap_view_unmap(void *addr, size_t length, fmap_err *e)
    int fmap_view_flush(void *addr, size_t length, int wait, fmap_err *e)

    int fmap_reg_attach(const char *dir, int create_dir, fmap_reg **out, fmap_err *e)
    int fmap_reg_create(fmap_reg *r, const char *key, size_t keylen, uint32_t type,
                        const fmap_newobj *spec, int exclusive, int writable,
                        int *fd, fmap_objinfo *info, fmap_hold *hold, int *created,
                        fmap_err *e)
    int fmap_reg_open(fmap_reg *r, const char *key, size_t keylen, uint32_t type,
                      int writable, int *fd, fmap_objinfo *info, fmap_hold *hold,
                      fmap_err *e)
    int fmap_reg_release(fmap_hold *hold, fmap_err *e)
    int fmap_reg_fork_prepare(fmap_hold *hold, fmap_err *e)
    void fmap_reg_fork_parent(fmap_hold *hold)
    int fmap_reg_fork_child(fmap_hold *hold, fmap_err *e)
    ctypedef int (*fmap_reg_visit)(void *ctx, const char *key, size_t keylen,
                                   const fmap_objinfo *info, uint32_t nholders) noexcept
    int fmap_reg_list(fmap_reg *r, fmap_reg_visit visit, void *ctx, fmap_err *e)
    int fmap_reg_counts(fmap_reg *r, uint32_t *entries, uint32_t *holders, fmap_err *e)

    # synchronization objects (sync_linux.c)
    enum:
        FMAP_WAIT_TIMEOUT
        FMAP_WAIT_INTR
        FMAP_SYNC_OWNED
        FMAP_SYNC_MANUAL
        FMAP_WAIT_MAX

    ctypedef struct fmap_sync:
        pass

    ctypedef struct fmap_syncspec:
        uint32_t type
        uint32_t flags
        uint32_t initial
        uint32_t maximum
        fmap_sync *page

    ctypedef struct fmap_syncstate:
        uint32_t type
        uint32_t count
        uint32_t maximum
        uint32_t set
        uint32_t manual
        int32_t owner
        uint32_t depth
        int mine
        int abandoned

    size_t fmap_sync_size()
    uint64_t fmap_clock_ns()
    int fmap_sync_init(void *ctx, int fd, fmap_err *e) noexcept
    int fmap_sync_map(int fd, uint32_t type, fmap_sync **out, fmap_err *e)
    void fmap_sync_unmap(fmap_sync *s)
    void fmap_sync_discard(fmap_sync *s)
    void fmap_sync_state(fmap_sync *s, fmap_syncstate *st)
    int fmap_sync_trywait(fmap_sync *s, int *depth, int *abandoned, fmap_err *e)
    int fmap_sync_wait(fmap_sync *s, uint64_t spin_ns, uint64_t deadline, int *depth,
                       int *abandoned, fmap_err *e)
    int fmap_sync_try_any(fmap_sync **v, int n, int *index, int *depth, int *abandoned,
                          fmap_err *e)
    int fmap_sync_wait_any(fmap_sync **v, int n, uint64_t spin_ns, uint64_t deadline,
                           int *index, int *depth, int *abandoned, fmap_err *e)
    int fmap_mutex_release(fmap_sync *s, fmap_err *e)
    int fmap_sem_release(fmap_sync *s, uint32_t n, uint32_t *prev, fmap_err *e)
    void fmap_event_set(fmap_sync *s)
    void fmap_event_reset(fmap_sync *s)


cdef class Handle:
    # A kernel object this process holds: the Windows HANDLE.
    cdef int fd                    # owned: the object's fd; -1 once closed
    cdef fmap_hold hold            # owned: our holder record (hold.reg NULL: unnamed or not ours)
    cdef Py_ssize_t live_index     # position in the core's table of named handles, -1 if absent
    cdef uint32_t otype            # FMAP_T_*
    cdef uint32_t protect_         # the object's protection
    cdef uint32_t access_          # what this handle may do (<= protect_)
    cdef uint64_t dev, ino         # identity of the object, checked when passed between processes
    cdef readonly object name      # the name as given, or None when unnamed
    cdef bytes key                 # registry key (namespace byte + UTF-8), None when unnamed
    cdef readonly bint created     # False when it already existed (ERROR_ALREADY_EXISTS)
    cdef object __weakref__

    cdef int _close_handle(self) except -1


cdef class Mapping(Handle):
    cdef readonly object size      # exact size asked for, never page-rounded
    cdef uint32_t flags            # FMAP_F_FILE for file-backed
    cdef bint populate             # prefault views
    cdef readonly object file      # path or file object it was made from, for repr; None otherwise


cdef class View:
    cdef char *addr                # owned: the mapped range; NULL once closed
    cdef char *placeholder         # owned: zero-filled stand-in left by close, unmapped at dealloc
    cdef size_t length_            # bytes the view shows
    cdef readonly object offset
    cdef uint32_t access_
    cdef bint is_file              # flush has work to do only for file-backed views
    cdef bint exposed              # the address left our hands (buffer, address): close leaves a placeholder
    cdef bint lending              # asarray() is taking an export: tracked in arrays, not exposed
    cdef Py_ssize_t exports        # buffers handed out and not yet released
    cdef object name               # the mapping's name, for repr and messages
    cdef list arrays               # (weakref to the memoryview, dtype, shape) of asarray() arrays
    cdef Py_ssize_t arrays_prune_at  # len(arrays) at which dead entries are dropped
    cdef object __weakref__

    cdef int _check(self) except -1
    cdef int _range(self, uint64_t offset, uint64_t length, str what, uint64_t *out_len) except -1
    cdef bint _lent(self)


cdef class SyncHandle(Handle):
    # Base of Mutex, Semaphore and Event: a handle with the object's shared page.
    cdef fmap_sync *page           # owned: the object's page, mapped while the handle is open or waited on; NULL once unmapped
    cdef int waiting               # threads of this process blocked on page without the GIL: the last one unmaps a closed handle's page

    cdef int _unmap(self) except -1
    cdef int _close_handle(self) except -1
    cdef str _state(self)


cdef class Mutex(SyncHandle):
    cdef readonly bint abandoned   # the current (or last) ownership began with WAIT_ABANDONED

    cdef str _state(self)


cdef class Semaphore(SyncHandle):
    cdef readonly uint32_t maximum # fixed at creation

    cdef str _state(self)


cdef class Event(SyncHandle):
    cdef readonly bint manual_reset  # fixed at creation

    cdef str _state(self)
