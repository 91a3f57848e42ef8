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
    void fmap_reg_fork_parent(fmap_hold *hold, int child)
    int fmap_newest_child()
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
    ctypedef struct fmap_waiter:
        uint32_t mark
        int32_t slot
        uint32_t counted
    void fmap_wait_begin(fmap_sync *s, fmap_waiter *w)
    int fmap_wait_end(fmap_sync *s, fmap_waiter *w, int keep)
    int fmap_sync_trywait(fmap_sync *s, fmap_waiter *w, int ask, int *depth, int *abandoned,
                          fmap_err *e)
    int fmap_sync_wait(fmap_sync *s, fmap_waiter *w, uint64_t spin_ns, uint64_t deadline,
                       int ask, uint64_t ask_ns, int *depth, int *abandoned, fmap_err *e)
    int fmap_sync_try_any(fmap_sync **v, fmap_waiter *w, int n, int ask, int *index,
                          int *depth, int *abandoned, fmap_err *e)
    int fmap_sync_wait_any(fmap_sync **v, fmap_waiter *w, int n, uint64_t spin_ns,
                           uint64_t deadline, int ask, int *index, int *depth, int *abandoned,
                           fmap_err *e)
    int fmap_mutex_release(fmap_sync *s, fmap_err *e)
    int fmap_sem_release(fmap_sync *s, uint32_t n, uint32_t *prev, fmap_err *e)
    void fmap_event_set(fmap_sync *s)
    void fmap_event_reset(fmap_sync *s)

    # channels (channel_linux.c)
    enum:
        FMAP_CHAN_PARTS
        FMAP_CHAN_ROOM
        FMAP_CHAN_MAX_CAPACITY
        FMAP_CHAN_CLOSED

    ctypedef struct fmap_chan:
        pass

    ctypedef struct fmap_chanspec:
        uint64_t capacity
        uint64_t msg_size

    ctypedef struct fmap_chanmap:
        fmap_chan *h
        uint64_t capacity
        uint64_t msg_size

    ctypedef struct fmap_chanstate:
        uint64_t head
        uint64_t tail
        uint32_t closed
        uint32_t parts
        uint32_t consumers_sleeping
        uint32_t producers_sleeping

    uint64_t fmap_chan_size(uint64_t capacity, uint64_t msg_size)
    int fmap_chan_init(void *ctx, int fd, fmap_err *e) noexcept
    int fmap_chan_map(int fd, fmap_chanmap *m, fmap_err *e)
    void fmap_chan_unmap(fmap_chanmap *m)
    void fmap_chan_state(fmap_chanmap *m, fmap_chanstate *st)
    uint64_t fmap_chan_pending(fmap_chanmap *m)
    int fmap_chan_ended(fmap_chanmap *m)
    int fmap_chan_reserve(fmap_chanmap *m, uint32_t n, uint64_t spin_max, uint64_t deadline,
                          uint64_t *pos, uint32_t *got, fmap_err *e)
    int fmap_chan_take(fmap_chanmap *m, uint32_t n, uint64_t spin_max, uint64_t deadline,
                       uint64_t *pos, uint32_t *got, fmap_err *e)
    char *fmap_chan_payload(fmap_chanmap *m, uint64_t pos)
    uint64_t fmap_chan_length(fmap_chanmap *m, uint64_t pos, uint32_t *kind)
    void fmap_chan_commit(fmap_chanmap *m, uint64_t pos, uint64_t len, uint32_t kind)
    void fmap_chan_set_length(fmap_chanmap *m, uint64_t pos, uint64_t len, uint32_t kind)
    void fmap_chan_publish(fmap_chanmap *m, uint64_t pos, uint32_t n)
    void fmap_chan_copy_in(fmap_chanmap *m, char *dst, const void *src, size_t n)
    void fmap_chan_copy_force(fmap_chanmap *m, int how)
    void fmap_chan_copy_state(fmap_chanmap *m, uint32_t out[4])
    void fmap_chan_copy_epoch(fmap_chanmap *m, uint64_t bytes, uint64_t ns)
    void fmap_chan_wake_consumers(fmap_chanmap *m, uint32_t n)
    void fmap_chan_discard(fmap_chanmap *m, uint64_t pos)
    void fmap_chan_withhold(fmap_chanmap *m, uint64_t pos)
    int fmap_chan_release(fmap_chanmap *m, uint64_t pos)
    void fmap_chan_release_run(fmap_chanmap *m, uint64_t pos, uint32_t n)
    void fmap_chan_wake_producers(fmap_chanmap *m, uint32_t n)
    void fmap_chan_close(fmap_chanmap *m)
    int fmap_chan_claim_unnamed(fmap_chanmap *m, int producer, uint32_t n, uint64_t *pos,
                                uint32_t *got, fmap_err *e)
    int fmap_chan_name_partly(fmap_chanmap *m, int producer, uint32_t k, fmap_err *e)
    int fmap_chan_send_racing_close(fmap_chanmap *m, int *saw_end, fmap_err *e)


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
    cdef object placeholder        # the _Placeholder close left (zeros), or None
    cdef size_t length_            # bytes the view shows
    cdef readonly object offset
    cdef uint32_t access_
    cdef bint is_file              # flush has work to do only for file-backed views
    cdef bint exposed              # the address left our hands (buffer, address): close leaves a placeholder
    cdef bint lending              # asarray() is taking an export: tracked in arrays, not exposed
    cdef Py_ssize_t exports        # buffers handed out and not yet released
    cdef Py_ssize_t busy           # our own GIL-free copies and flushes under way: close refuses
    cdef int busy_pid              # the process busy counts for (a forked child's starts at 0)
    cdef object name               # the mapping's name, for repr and messages
    cdef list arrays               # (weakref to the memoryview, dtype, shape) of asarray() arrays
    cdef Py_ssize_t arrays_prune_at  # len(arrays) at which dead entries are dropped
    cdef object __weakref__

    cdef int _check(self) except -1
    cdef int _range(self, uint64_t offset, uint64_t length, str what, uint64_t *out_len) except -1
    cdef void _busy(self, int by) noexcept
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


cdef class ChanMap:
    cdef fmap_chanmap m            # owned: the channel mapped and our participant record; unmapped at dealloc
    cdef object name               # the channel's name, for messages


cdef class Message:
    # A channel slot lent out: reserved to write, or received to read.
    cdef ChanMap cm                # keeps the slot's memory mapped while the message is in hand
    cdef char *addr                # the message's bytes in the slot; NULL once given back
    cdef uint64_t pos              # the slot's position in the ring
    cdef size_t length_
    cdef int pid                   # the process that claimed the slot: only it gives it back
    cdef uint32_t kind
    cdef bint reserved             # from reserve() (for repr: writing is cleared once it ends)
    cdef bint writing              # reserved (sent or discarded at the end), or received (released)
    cdef bint writable             # buffers are writable
    cdef bint finishing            # received and done with: given back at the last buffer release
    cdef Py_ssize_t exports        # buffers handed out and not yet released

    cdef int _check(self) except -1
    cdef str _channel(self)
    cdef str _not_ours(self)
    cdef void _give_back(self) noexcept
    cdef void _discard(self) noexcept
    cdef void _unexport(self) noexcept
    cdef object _lend(self)


cdef class Channel(Handle):
    cdef ChanMap cm                # the mapping while the handle is open; None once closed
    cdef readonly uint64_t capacity       # slots: messages in flight at most
    cdef readonly uint64_t message_size   # largest message, bytes
    cdef uint64_t spin_ns          # spin budget of this handle's waits

    cdef ChanMap _map(self)
    cdef int _close_handle(self) except -1
    cdef uint32_t _claim(self, ChanMap cm, bint produce, uint32_t n, object timeout,
                         uint64_t *pos) except 0
    cdef int _too_big(self, object n, str what) except -1
    cdef int _ended(self, bint produce) except -1
