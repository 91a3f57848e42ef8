# Channel: a multi-producer multi-consumer message queue in shared memory
# (src/c/channel_linux.c), and Message, a slot lent out for writing or
# reading in place.  Names, lifetime and fork() come from Handle; waiting
# (timeouts, GIL-free slices with signal checks) follows sync.pxi.
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_ANY_CONTIGUOUS,
                             PyBUF_FULL_RO, PyBuffer_IsContiguous, PyBuffer_ToContiguous)
from cpython.object cimport Py_SIZE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_FromObject
from libc.string cimport memcpy

cdef extern from "Python.h":
    # With no exception type, an int too large either way is clipped to
    # PY_SSIZE_T_MIN / PY_SSIZE_T_MAX instead of raising OverflowError.
    Py_ssize_t ssize_clipped "PyNumber_AsSsize_t"(object o, void *exc) except? -1

# ReadFile on a pipe whose writers are gone: ERROR_BROKEN_PIPE; WriteFile on
# a pipe being closed: ERROR_NO_DATA.
ERROR_BROKEN_PIPE = 109
ERROR_NO_DATA = 232

CHANNEL_MAX_CAPACITY = FMAP_CHAN_MAX_CAPACITY
CHANNEL_MAX_PROCESSES = FMAP_CHAN_PARTS

cdef uint32_t KIND_BYTES = 0
cdef uint32_t KIND_ARRAY = 1
cdef uint32_t BATCH = 64           # slots claimed at once by send_many; recv_many's default
cdef uint32_t RECV_CHUNK = 32      # messages recv_many claims at once
cdef size_t RECV_MANY_BYTES = 65536
cdef double DEFAULT_SPIN_US = 50.0
# An array message: its description, then its data at ARRAY_ALIGN.
#   u32 ndim | u32 dtype length | dtype.str (up to 24 bytes) | ndim x u64 shape
cdef size_t ARRAY_META = 32
cdef size_t ARRAY_ALIGN = 64
cdef int ARRAY_MAX_DIMS = 32
assert ARRAY_META + 8 * ARRAY_MAX_DIMS <= FMAP_CHAN_ROOM
assert ARRAY_MAX_DIMS == 32         # the size of recv_array's dims buffer


class EndOfStream(EOFError):
    """The channel was closed and every message sent before has been received.
    `winerror` is 109 (ERROR_BROKEN_PIPE, what ReadFile says when a pipe's
    writers are gone)."""
    winerror = ERROR_BROKEN_PIPE


cdef class ChanMap:
    """One process's mapping of a channel: shared by its Channel handle and
    the Messages lent out, so the memory stays mapped while a slot is in use."""

    def __dealloc__(self):
        fmap_chan_unmap(&self.m)


cdef inline size_t array_meta_size(int ndim) noexcept:
    cdef size_t n = ARRAY_META + 8 * <size_t>ndim
    return (n + ARRAY_ALIGN - 1) // ARRAY_ALIGN * ARRAY_ALIGN


# (np.dtype, item size) of the codes received arrays carried, once vetted
# (None: a code send_array would not have sent); bounded, since the codes
# come from other processes.  The dtype's attributes, read for every
# message, cost a small array's recv_array a fifth of its time.
cdef dict _array_dtypes = {}


# The code sent for each dtype sent (None: not sendable); bounded likewise.
# Working it out (dt.str, four attributes) costs more than the rest of a
# small array's send_array.
cdef dict _send_codes = {}


cdef object code_of(dt):
    try:
        return _send_codes[dt]
    except KeyError:
        pass
    code = dt.str.encode("ascii") if sendable_dtype(dt) else None
    if len(_send_codes) < 256:
        _send_codes[dt] = code
    return code


cdef object dtype_of(bytes code):
    """(dtype, item size) for a received array's code; None when send_array
    could not have sent it."""
    try:
        return _array_dtypes[code]
    except KeyError:
        pass
    try:
        dt = numpy().dtype(code.decode("ascii"))
    except Exception:
        return None                 # not remembered: it may have been a MemoryError
    entry = (dt, dt.itemsize) if sendable_dtype(dt) else None
    if len(_array_dtypes) < 256:
        _array_dtypes[code] = entry
    return entry


cdef bint shape_fits(const uint64_t *dims, uint32_t ndim, uint64_t itemsize,
                     uint64_t nbytes) noexcept:
    """Whether an array of these dimensions and item size holds exactly
    nbytes.  NumPy also refuses a shape whose non-zero dimensions' product
    does not fit an intp, even when another dimension is 0."""
    cdef uint64_t count = itemsize, extent = itemsize, d
    cdef uint32_t i
    for i in range(ndim):
        d = dims[i]
        if d == 0:
            count = 0
        elif extent > <uint64_t>PY_SSIZE_T_MAX // d:
            return False
        else:
            extent *= d
            count *= d          # count <= extent: no overflow either
    return count == nbytes


# no_gc: the collector must never clear cm ahead of __dealloc__ and
# __releasebuffer__, which give the slot back through it (a Message in a
# reference cycle would be cleared before it is deallocated, and its last
# memoryview may be released after that).  A Message refers only to its
# ChanMap, which refers only to a name, so it can be in no cycle: a frame
# in a cycle that holds one lets it go like any other reference, and the
# collector need not know it.  Untracked, with a free list, and final (a
# subclass could add a __dict__ and a cycle), a reserve() or receive()
# block of a 64 B message costs 15-20 ns less, of 160-210 ns.
@cython.no_gc
@cython.final
@cython.freelist(8)
cdef class Message:
    """A message slot lent out by Channel.reserve() (to write in place) or
    Channel.receive() / recv_array() (to read in place).

    The buffer protocol gives the message's bytes (writable when reserved,
    read-only when received); `asarray(dtype, shape)` a NumPy view of them.
    A reserved message is sent when its `with` block ends without an
    exception (discarded otherwise); a received message's slot goes back to
    the producers when its `with` block ends and every buffer taken from it
    has been released.
    """
    def __init__(self, *args, **kwargs):
        raise TypeError("Message objects come from Channel.reserve() and Channel.receive()")

    cdef int _check(self) except -1:
        if self.addr == NULL or self.finishing:
            raise make_error(ValueError, ERROR_INVALID_HANDLE,
                             f"the message of channel {self._channel()} is no longer "
                             "in hand (its with block ended)")
        if self.pid != fmap_getpid():
            raise make_error(ValueError, ERROR_INVALID_HANDLE, self._not_ours())
        return 0

    cdef str _channel(self):
        # (no channel: a Message made by Message.__new__, never in hand)
        return describe(self.cm.name if self.cm is not None else None)

    cdef str _not_ours(self):
        return (f"the message of channel {self._channel()} is process {self.pid}'s "
                "(it was " + ("reserved" if self.writing else "received") + " before a fork); "
                "only that process may use it or end it")

    cdef void _give_back(self) noexcept:
        # Received: the slot goes back to producers.  Only the claiming process
        # may: a forked child's copy of a Message never touches the parent's slot.
        if self.addr == NULL:
            return
        self.addr = NULL
        if self.pid == fmap_getpid():
            fmap_chan_release(&self.cm.m, self.pos)
            fmap_chan_wake_producers(&self.cm.m, 1)

    cdef void _discard(self) noexcept:
        if self.addr == NULL:
            return
        self.addr = NULL
        if self.pid == fmap_getpid():
            fmap_chan_discard(&self.cm.m, self.pos)

    def __getbuffer__(self, Py_buffer *buf, int flags):
        self._check()
        if (flags & PyBUF_WRITABLE) and not self.writable:
            raise BufferError("a received message is read-only")
        PyBuffer_FillInfo(buf, self, self.addr, self.length_, not self.writable, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self._unexport()

    cdef void _unexport(self) noexcept:
        self.exports -= 1
        if self.exports == 0 and self.finishing:
            self._give_back()

    cdef object _lend(self):
        # The base for a NumPy array over the message: see _Lent.  Checked
        # here, last: converting the caller's dtype and shape runs Python
        # code, which may have ended the message.
        self._check()
        cdef _Lent lent = _Lent.__new__(_Lent)
        lent.msg = self
        self.exports += 1
        return lent

    def __len__(self):
        return self.length_

    @property
    def nbytes(self):
        """The message's length in bytes."""
        return self.length_

    @property
    def in_hand(self):
        """True while the message can be used (its with block has not ended)."""
        return self.addr != NULL and not self.finishing

    def __getitem__(self, index):
        self._check()
        return memoryview(self)[index]

    def __setitem__(self, index, value):
        self._check()
        if not self.writable:
            raise TypeError("a received message is read-only")
        with memoryview(self) as mv:
            mv[index] = value

    def tobytes(self):
        """A copy of the message's bytes."""
        self._check()
        return PyBytes_FromStringAndSize(self.addr, self.length_)

    def asarray(self, dtype="uint8", shape=None):
        """A NumPy array over the message, zero copy (read-only when received).
        shape None = as many items as fit."""
        self._check()
        np = numpy()
        dt = np.dtype(dtype)
        if dt.itemsize == 0 or dt.hasobject:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"cannot view a message as dtype {dt}")
        if shape is None:
            return np.ndarray((self.length_ // dt.itemsize,), dt, self._lend())
        shape = tuple(shape) if not isinstance(shape, int) else (shape,)
        count = 1
        for s in shape:
            count *= _operator.index(s)
            if s < 0:
                raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                                 f"shape {shape} has a negative dimension")
        if count * dt.itemsize > self.length_:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"an array of shape {shape} and dtype {dt} needs "
                             f"{count * dt.itemsize} bytes; the message has {self.length_}")
        return np.ndarray(shape, dt, self._lend())

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.addr == NULL:
            return False
        if self.pid != fmap_getpid():
            # A forked child's copy: the slot is the parent's to send or
            # give back (committed twice, the ring would be broken).
            self.addr = NULL
            if exc_type is None:
                raise make_error(ValueError, ERROR_INVALID_HANDLE, self._not_ours())
            return False
        if self.writing:
            if self.exports:
                # Not sent, and its slot stays out of the producers' reach
                # until the last buffer goes: a stale memoryview must never
                # write into a later message.  Consumers skip it.
                n = self.exports
                fmap_chan_withhold(&self.cm.m, self.pos)
                self.writing = False
                self.finishing = True
                if exc_type is not None:
                    return False
                raise BufferError(
                    f"the reserved message was not sent: {n} buffer(s) taken from it "
                    "(a memoryview or array) are still alive, and could write into it "
                    "after it is sent; release them inside the with block")
            if exc_type is not None:
                self._discard()
                return False
            fmap_chan_commit(&self.cm.m, self.pos, self.length_, self.kind)
            fmap_chan_wake_consumers(&self.cm.m, 1)
            self.addr = NULL
            return False
        if self.exports:
            self.finishing = True     # given back at the last release
        else:
            self._give_back()
        return False

    def __dealloc__(self):
        if self.writing:
            self._discard()
        else:
            self._give_back()

    def __repr__(self):
        state = "in hand" if self.addr != NULL and not self.finishing else "done"
        kind = "reserved" if self.reserved else "received"
        return f"<fmap.Message {kind} {self.length_} bytes of channel {self._channel()} {state}>"

    def __reduce__(self):
        raise TypeError("a Message cannot be pickled or copied: it is a slot lent to this "
                        "process; send its bytes (tobytes()) instead")


cdef Message new_message(ChanMap cm, uint64_t pos, size_t length, uint32_t kind, bint writing):
    cdef Message msg = Message.__new__(Message)
    msg.cm = cm
    msg.pos = pos
    msg.addr = fmap_chan_payload(&cm.m, pos)
    msg.length_ = length
    msg.kind = kind
    msg.pid = fmap_getpid()
    msg.writing = writing
    msg.writable = writing
    msg.reserved = writing
    return msg


# The base of every NumPy array over a message, holding one of the message's
# buffer exports for as long as it lives (np.ndarray(buffer=) keeps the
# object, not an export).  np.frombuffer's base would be a memoryview, and its
# release() (a.base.release()) would give the slot back under the live array:
# a later message written into it, or a segfault once the channel is detached.
@cython.no_gc_clear
@cython.final
cdef class _Lent:
    cdef Message msg

    def __getbuffer__(self, Py_buffer *buf, int flags):
        # Not in a forked child, whose copy of the message is not its own
        # (once it leaves the with block, its address is NULL): the arrays
        # it inherited still point at the slot, new buffers do not.
        if self.msg is None or self.msg.addr == NULL or self.msg.pid != fmap_getpid():
            raise BufferError("the message is not in hand in this process")
        PyBuffer_FillInfo(buf, self, self.msg.addr, self.msg.length_,
                          not self.msg.writable, flags)

    def __releasebuffer__(self, Py_buffer *buf):
        pass

    def __dealloc__(self):
        if self.msg is not None:
            self.msg._unexport()


cdef class Channel(Handle):
    """A message queue between any number of producer and consumer processes,
    in shared memory (named or unnamed, in the namespace of mappings).

    Every message is delivered once, to one consumer, intact; each producer's
    messages arrive in the order it sent them.  A full channel blocks senders
    (backpressure), an empty one blocks receivers; every wait takes a timeout
    in seconds (None = forever, 0 = do not wait; TimeoutError, winerror 1460,
    when it passes), releases the GIL and is interruptible by Ctrl-C.

    Waiting spins first, for up to `spin` microseconds (adaptively: less
    while spinning does not pay), then sleeps on a futex, so a busy pipeline
    never enters the kernel and an idle one uses no CPU.

    Crashes: a producer killed while writing a message (in reserve() or
    send()) loses that message, never delivered in part; a consumer killed
    while holding a received message (receive(), recv_array()) loses that
    one message (it is not delivered again).  Batches claim their slots
    together: killed inside send_many(), a producer loses the batch it was
    writing (up to 64 messages; those before it were sent); inside
    recv_many(), a consumer loses every message that call had taken.
    Either way the slots are given back and nothing blocks for longer than
    a few tens of milliseconds.

    close() ends the stream: senders get BrokenPipeError (winerror 232) from
    then on, receivers get every message sent before and then
    fmap.EndOfStream.  `with channel:` calls close() at its end; detach()
    closes only this handle (CloseHandle), leaving the stream open.
    """
    @classmethod
    def create(cls, name=None, capacity=64, *, message_size=65536, exclusive=False):
        """Create a channel, or open it if the name exists.  See fmap.channel.create."""
        return _shim["create_channel"](name, capacity, message_size=message_size,
                                       exclusive=exclusive)

    @classmethod
    def open(cls, name):
        """Open an existing named channel."""
        return _shim["open_channel"](name)

    cdef ChanMap _map(self):
        """The mapping, for the length of a call (a close() in another thread
        drops the handle's reference, not the caller's)."""
        if self.fd < 0:
            check_open(self)
        return self.cm

    cdef int _close_handle(self) except -1:
        try:
            Handle._close_handle(self)
        finally:
            self.cm = None     # unmapped once no Message of it is in hand either
        return 0

    # ---- waiting ----------------------------------------------------------

    cdef uint32_t _claim(self, ChanMap cm, bint produce, uint32_t n, object timeout,
                         uint64_t *pos) except 0:
        """Claim up to n slots (produce) or messages: how many; raises on timeout,
        end of stream and errors."""
        cdef fmap_err e
        cdef uint32_t got = 0
        cdef int rc
        cdef int64_t t = -1
        cdef uint64_t now, end, until, spin = self.spin_ns
        if timeout is not None:
            t = parse_timeout(timeout)
        if produce:
            rc = fmap_chan_reserve(&cm.m, n, spin, 0, pos, &got, &e)
        else:
            rc = fmap_chan_take(&cm.m, n, spin, 0, pos, &got, &e)
        if rc == FMAP_WAIT_TIMEOUT:
            if t != 0:
                now = fmap_clock_ns()
                end = FOREVER if t < 0 else now + <uint64_t>t
                while True:
                    until = now + SLICE_NS
                    if until > end:
                        until = end
                    with nogil:
                        if produce:
                            rc = fmap_chan_reserve(&cm.m, n, spin, until, pos, &got, &e)
                        else:
                            rc = fmap_chan_take(&cm.m, n, spin, until, pos, &got, &e)
                    if rc != FMAP_WAIT_TIMEOUT and rc != FMAP_WAIT_INTR:
                        break
                    spin = 0
                    PyErr_CheckSignals()
                    if self.fd < 0:
                        raise make_error(ValueError, ERROR_INVALID_HANDLE,
                                         f"channel {describe(self.name)} was closed while "
                                         "a wait on it was blocked")
                    now = fmap_clock_ns()
                    if now >= end:
                        break
        if rc == FMAP_OK:
            return got
        if rc == FMAP_WAIT_TIMEOUT or rc == FMAP_WAIT_INTR:
            raise make_error(_errno.ETIMEDOUT, ERROR_TIMEOUT,     # TimeoutError
                             f"channel {describe(self.name)}: "
                             + ("no free slot" if produce else "no message")
                             + f" within {timeout} seconds")
        if rc == FMAP_CHAN_CLOSED:
            self._ended(produce)
        raise_err(&e, f"cannot use channel {describe(self.name)}")

    cdef int _ended(self, bint produce) except -1:
        if produce:
            raise make_error(_errno.EPIPE, ERROR_NO_DATA,         # BrokenPipeError
                             f"cannot send on channel {describe(self.name)}: it was closed")
        raise EndOfStream(f"channel {describe(self.name)} was closed and every message "
                          "sent before has been received")

    cdef int _too_big(self, object n, str what) except -1:
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f"cannot send {what} of {n} bytes on channel {describe(self.name)}: "
                         f"its messages hold at most {self.message_size} bytes")

    # ---- bytes ------------------------------------------------------------

    def send(self, data, timeout=None):
        """Send a copy of data (any bytes-like object: its bytes in C order,
        as bytes(data) gives them) as one message; waits while the channel
        is full."""
        cdef Py_buffer view
        cdef uint64_t pos
        cdef char *dst
        cdef const char *src
        cdef Py_ssize_t n
        cdef bint have_view = False
        cdef ChanMap cm = self._map()
        if type(data) is bytes:
            src = PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_FULL_RO)   # strided ones too
            have_view = True
            src = <const char *>view.buf
            n = view.len
        try:
            if <uint64_t>n > self.message_size:
                self._too_big(n, "a message")
            self._claim(cm, True, 1, timeout, &pos)
            dst = fmap_chan_payload(&cm.m, pos)
            if have_view and not PyBuffer_IsContiguous(&view, b'C'):
                gather(&cm.m, pos, dst, &view)
            else:
                copy_in(cm, dst, src, n)
            fmap_chan_commit(&cm.m, pos, n, KIND_BYTES)
            fmap_chan_wake_consumers(&cm.m, 1)
        finally:
            if have_view:
                PyBuffer_Release(&view)

    def recv(self, timeout=None):
        """The next message, as bytes (for an array, its data).  Waits while
        the channel is empty; fmap.EndOfStream once it is closed and drained."""
        cdef uint64_t pos
        cdef uint32_t kind
        cdef size_t n, skip = 0
        cdef char *src
        cdef ChanMap cm = self._map()
        self._claim(cm, False, 1, timeout, &pos)
        src = fmap_chan_payload(&cm.m, pos)
        n = fmap_chan_length(&cm.m, pos, &kind)
        if kind == KIND_ARRAY:
            skip = array_data_offset(src, n)
        try:
            out = copy_out(src + skip, n - skip)
        finally:
            fmap_chan_release(&cm.m, pos)
            fmap_chan_wake_producers(&cm.m, 1)
        return out

    def send_many(self, messages, timeout=None):
        """Send every message of an iterable of bytes-like objects, claiming
        slots in batches; returns how many were sent.  timeout bounds each
        wait for free slots (TimeoutError when one passes).  An exception
        raised once sending began (a timeout, a message too big or not
        bytes-like, Ctrl-C, the end of the stream) carries `sent`: the
        messages before it went, in order; none after it did.  A list that
        shrinks while it is sent (another thread) raises RuntimeError."""
        cdef Py_buffer view
        cdef uint64_t pos
        cdef uint32_t got, i
        cdef Py_ssize_t n, sent = 0
        cdef const char *src
        cdef bint have_view
        cdef ChanMap cm = self._map()
        items = messages if type(messages) is list or type(messages) is tuple else list(messages)
        total = len(items)
        if total == 0:
            # Nothing to send, but the same answers as a send: WriteFile of
            # no bytes on a pipe whose reader is gone fails as well.
            if timeout is not None:
                parse_timeout(timeout)
            if fmap_chan_ended(&cm.m):
                self._ended(True)
        try:
            while sent < total:
                want = total - sent
                got = self._claim(cm, True, BATCH if want > BATCH else want, timeout, &pos)
                i = 0
                try:
                    while i < got:
                        # The caller's list may shrink under us (another
                        # thread while we waited for slots, a timeout's
                        # __float__, a __buffer__): indexed unchecked, so
                        # checked here (a copy of the list would cost more).
                        if sent + i >= Py_SIZE(items):
                            raise make_error(RuntimeError, ERROR_INVALID_PARAMETER,
                                             f"the list of messages changed size during "
                                             f"send_many: {sent + i} sent of {total}")
                        item = items[sent + i]
                        have_view = False
                        if type(item) is bytes:
                            src = PyBytes_AS_STRING(item)
                            n = PyBytes_GET_SIZE(item)
                        else:
                            PyObject_GetBuffer(item, &view, PyBUF_FULL_RO)
                            have_view = True
                            src = <const char *>view.buf
                            n = view.len
                        try:
                            if <uint64_t>n > self.message_size:
                                self._too_big(n, f"message {sent + i}")
                            if have_view and not PyBuffer_IsContiguous(&view, b'C'):
                                gather(&cm.m, pos + i, fmap_chan_payload(&cm.m, pos + i), &view)
                            else:
                                copy_in(cm, fmap_chan_payload(&cm.m, pos + i), src, n)
                        finally:
                            if have_view:
                                PyBuffer_Release(&view)
                        fmap_chan_set_length(&cm.m, pos + i, n, KIND_BYTES)
                        i += 1
                finally:
                    # The copied ones go out together; if an item failed, its
                    # slot and the rest go back.
                    fmap_chan_publish(&cm.m, pos, i)
                    sent += i
                    while i < got:
                        fmap_chan_discard(&cm.m, pos + i)
                        i += 1
                    fmap_chan_wake_consumers(&cm.m, got)
        except BaseException as exc:
            try:
                exc.sent = sent
            except AttributeError:      # an exception type without a __dict__
                pass
            raise
        return sent

    def recv_many(self, max_count=BATCH, timeout=None):
        """Messages that are there, as a list of bytes: at least one (waits
        for it), at most max_count, and no more than about 64 KiB of them
        past the first (a larger batch would only make the allocator give
        the memory back to the system and fault it in again for every
        batch).  fmap.EndOfStream once closed and drained."""
        cdef uint64_t pos
        cdef uint32_t got, i, kind, chunk
        cdef size_t n, skip, total = 0
        cdef char *src
        cdef Py_ssize_t want
        cdef fmap_err e
        cdef int rc
        cdef ChanMap cm = self._map()
        count = parse_count(max_count, "max_count")
        if count < 1:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"max_count must be at least 1, not {count}")
        # A huge count means "as many as there are": clamp before the C int.
        want = <Py_ssize_t>min(count, PY_SSIZE_T_MAX)
        out = []
        # The first claim, before any size is seen, assumes full-size messages.
        n = 1 + RECV_MANY_BYTES // cm.m.msg_size if cm.m.msg_size else RECV_CHUNK
        chunk = <uint32_t>min(want, RECV_CHUNK, n)
        got = self._claim(cm, False, chunk, timeout, &pos)
        while True:
            i = 0
            try:
                while i < got:
                    src = fmap_chan_payload(&cm.m, pos + i)
                    n = fmap_chan_length(&cm.m, pos + i, &kind)
                    skip = array_data_offset(src, n) if kind == KIND_ARRAY else 0
                    out.append(copy_out(src + skip, n - skip))
                    total += n
                    i += 1
            finally:
                fmap_chan_release_run(&cm.m, pos, got)     # copied or not: all go back
                fmap_chan_wake_producers(&cm.m, got)
            want -= got
            if want <= 0 or total >= RECV_MANY_BYTES:
                return out
            # as many more as fit the bytes left, at the sizes seen so far
            n = (RECV_MANY_BYTES - total) * <size_t>len(out) // (total + 1) + 1
            chunk = <uint32_t>(want if <size_t>want < n else n)
            if chunk > 4096:
                chunk = 4096
            rc = fmap_chan_take(&cm.m, chunk, 0, 0, &pos, &got, &e)   # what is there, no wait
            if rc != FMAP_OK:
                return out     # none there, or the end of the stream (reported next call)

    # ---- in place ---------------------------------------------------------

    def reserve(self, nbytes, timeout=None):
        """A Message of nbytes to write in place: `with ch.reserve(n) as buf:`
        sends it when the block ends, discards it on an exception.  Its place
        in the stream is taken now: until the block ends, consumers wait for
        it before any message claimed after it, by any producer."""
        cdef uint64_t pos
        cdef Py_ssize_t n
        cdef ChanMap cm = self._map()
        # An int goes straight to C: parse_count's lookups and int() of the
        # limit were 40% of a 64 B reserve() block (370 ns; 205 ns now).
        size = nbytes if type(nbytes) is int else parse_count(nbytes, "nbytes")
        n = ssize_clipped(size, NULL)
        if n < 0:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"nbytes must be >= 0, not {size}")
        if <uint64_t>n > self.message_size:
            self._too_big(size, "a message")
        self._claim(cm, True, 1, timeout, &pos)
        return new_message(cm, pos, n, KIND_BYTES, True)

    def receive(self, timeout=None):
        """The next message, in place: `with ch.receive() as buf:` reads it
        without a copy; its slot goes back when the block ends (or, if a
        buffer taken from it lives on, when the last one is released)."""
        cdef uint64_t pos
        cdef uint32_t kind
        cdef size_t n, skip = 0
        cdef ChanMap cm = self._map()
        self._claim(cm, False, 1, timeout, &pos)
        n = fmap_chan_length(&cm.m, pos, &kind)
        if kind == KIND_ARRAY:
            skip = array_data_offset(fmap_chan_payload(&cm.m, pos), n)
        msg = new_message(cm, pos, n, kind, False)
        msg.addr += skip
        msg.length_ -= skip
        return msg

    # ---- arrays -----------------------------------------------------------

    def send_array(self, arr, timeout=None):
        """Send a NumPy array (one copy in): dtype and shape travel with it.
        Object and structured dtypes are refused."""
        cdef uint64_t pos
        cdef size_t meta, nbytes
        cdef char *dst
        cdef Py_buffer view
        cdef int ndim, i
        cdef ChanMap cm = self._map()
        np = numpy()
        if type(arr) is not np.ndarray:
            arr = np.asarray(arr)
        dt = arr.dtype
        code = code_of(dt)
        if code is None:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"cannot send an array of dtype {dt}: send_array takes plain "
                             "numeric, bool, bytes, str and datetime dtypes of non-empty items")
        # What goes out is fixed here, before the wait for a slot: the shape
        # (a tuple of its own), and for a contiguous array its buffer, held.
        # Another thread may reshape or retype the array in place meanwhile
        # (a.shape = ..., a.dtype = ...), or a timeout's __float__ may.
        shape = arr.shape
        ndim = len(shape)
        if ndim > ARRAY_MAX_DIMS or len(code) > 24:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"cannot send an array of {ndim} dimensions and dtype {dt}")
        meta = array_meta_size(ndim)          # fits the slot's FMAP_CHAN_ROOM
        count = 1
        for s in shape:
            count *= s
        nbytes = count * dt.itemsize
        if nbytes > self.message_size:
            self._too_big(nbytes, "an array")
        contiguous = arr.flags.c_contiguous
        if contiguous:
            PyObject_GetBuffer(arr, &view, PyBUF_ANY_CONTIGUOUS)
        try:
            if contiguous and <size_t>view.len != nbytes:
                raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                                 "cannot send the array: its shape or dtype changed as it was sent")
            self._claim(cm, True, 1, timeout, &pos)
            dst = fmap_chan_payload(&cm.m, pos)
            try:
                (<uint32_t *>dst)[0] = ndim
                (<uint32_t *>dst)[1] = len(code)
                memcpy(dst + 8, <char *>code, len(code))
                for i in range(ndim):
                    (<uint64_t *>(dst + ARRAY_META))[i] = shape[i]
                if contiguous:
                    copy_in(cm, dst + meta, view.buf, nbytes)
                else:
                    np.copyto(np.asarray(_SlotBytes.wrap(dst + meta, nbytes)).view(dt)
                              .reshape(shape), arr, casting="no")
            except BaseException:
                fmap_chan_discard(&cm.m, pos)
                raise
        finally:
            if contiguous:
                PyBuffer_Release(&view)
        fmap_chan_commit(&cm.m, pos, meta + nbytes, KIND_ARRAY)
        fmap_chan_wake_consumers(&cm.m, 1)

    def recv_array(self, timeout=None):
        """The next message as a NumPy array that views it in place (no copy;
        writable, it is this consumer's).  Its slot goes back to the
        producers when the array and every view of it are gone; the ring is
        in order, so until then producers that come round to that slot,
        `capacity` messages later, wait for it.  A message sent as bytes
        comes as a uint8 array."""
        cdef uint64_t pos
        cdef uint32_t kind, ndim, codelen
        cdef size_t n, meta
        cdef char *src
        cdef Message msg
        cdef uint32_t i
        cdef uint64_t dims[32]          # ARRAY_MAX_DIMS
        cdef ChanMap cm = self._map()
        self._claim(cm, False, 1, timeout, &pos)
        src = fmap_chan_payload(&cm.m, pos)
        n = fmap_chan_length(&cm.m, pos, &kind)
        msg = new_message(cm, pos, n, kind, False)
        msg.writable = True         # the consumer's own: a writable array
        try:
            np = numpy()
            if kind != KIND_ARRAY:
                a = np.ndarray((n,), np.uint8, msg._lend())
                msg.finishing = True    # given back when the array goes
                return a
            # The description comes from another process: anything
            # send_array would not have written is refused, before NumPy
            # sees it (an empty item type would divide by zero, an object
            # one is refused by NumPy with an error of its own).
            entry = None
            meta = array_header(src, n, &ndim, &codelen)
            if meta:
                # Read once: what is checked is what NumPy gets.
                memcpy(dims, src + ARRAY_META, 8 * ndim)
                entry = dtype_of(PyBytes_FromStringAndSize(src + 8, codelen))
                if entry is not None and not shape_fits(dims, ndim, entry[1], n - meta):
                    entry = None
            if entry is None:
                raise make_error(ValueError, ERROR_FILE_CORRUPT,
                                 f"channel {describe(self.name)}: a malformed array message")
            shape = tuple([dims[i] for i in range(ndim)])
            a = np.ndarray(shape, entry[0], msg._lend(), meta)
            msg.finishing = True        # given back when the array and its views go
            return a
        except BaseException:
            msg.finishing = False
            msg._give_back()
            raise

    # ---- the stream -------------------------------------------------------

    def close(self):
        """End the stream and close this handle.  Idempotent.  Senders (in any
        process) get BrokenPipeError from now on; receivers get what was sent
        before, then fmap.EndOfStream."""
        if self.fd >= 0:
            fmap_chan_close(&self.cm.m)
        self._close_handle()

    def detach(self):
        """Close this handle only (CloseHandle): the stream goes on."""
        self._close_handle()

    def __exit__(self, *exc):
        self.close()

    @property
    def ended(self):
        """True once the stream was closed (by any process)."""
        cdef ChanMap cm = self._map()
        return bool(fmap_chan_ended(&cm.m))

    def __len__(self):
        """Slots producers have claimed and consumers have not yet passed (a
        snapshot): the messages waiting, and also any being written (an open
        reserve(), a send under way) and those given back unsent behind
        them.  So more than receivers can take now, at times; drain with
        recv(timeout=0) or recv_many, not by counting."""
        cdef ChanMap cm = self._map()
        return <Py_ssize_t>fmap_chan_pending(&cm.m)

    @property
    def spin(self):
        """Microseconds a wait may spin before sleeping (adaptive up to this;
        0 = sleep at once).  Per handle."""
        return self.spin_ns / 1000.0

    @spin.setter
    def spin(self, value):
        self.spin_ns = parse_spin(value)

    def stats(self):
        """A snapshot of the shared state, for diagnostics: a dict of sent
        (slots claimed by producers), taken (by consumers), pending (len()),
        ended, processes (attached: those that created or opened it, and
        forked children from their first send or receive on it), and
        sleeping producers and consumers."""
        cdef fmap_chanstate st
        cdef ChanMap cm = self._map()
        fmap_chan_state(&cm.m, &st)
        return {"sent": st.head, "taken": st.tail,
                "pending": st.head - st.tail if st.head > st.tail else 0,
                "ended": bool(st.closed), "processes": st.parts,
                "producers_sleeping": st.producers_sleeping,
                "consumers_sleeping": st.consumers_sleeping}

    def __iter__(self):
        """Messages as bytes until the end of the stream."""
        while True:
            try:
                yield self.recv()
            except EndOfStream:
                return

    def __reduce__(self):
        check_open(self)
        return (_channel_unpickle, (self.name, self.key, fmap_getpid(), self.fd,
                                    self.dev, self.ino))

    def __repr__(self):
        if self.fd < 0:
            return f"<fmap.Channel {describe(self.name)} closed>"
        pending = fmap_chan_pending(&self.cm.m)
        ended = " ended" if self.ended else ""
        return (f"<fmap.Channel {describe(self.name)} capacity={self.capacity} "
                f"message_size={self.message_size} pending={pending}{ended} "
                f"created={self.created} open>")


cdef inline void copy_in(ChanMap cm, char *dst, const void *src, size_t n) noexcept:
    """A message's bytes into its slot (fmap_chan_copy_in), without the GIL
    when they are many."""
    if n >= NOGIL_COPY:
        with nogil:
            fmap_chan_copy_in(&cm.m, dst, src, n)
    else:
        fmap_chan_copy_in(&cm.m, dst, src, n)


cdef inline object copy_out(const char *src, size_t n):
    """A copy of a message's bytes, made without the GIL when they are many.
    The caller holds the slot and the mapping (its local ChanMap), so a
    close() or detach() in another thread meanwhile unmaps nothing."""
    cdef char *dst
    if n < NOGIL_COPY:
        return PyBytes_FromStringAndSize(src, n)
    out = PyBytes_FromStringAndSize(NULL, n)
    dst = PyBytes_AS_STRING(out)
    with nogil:
        memcpy(dst, src, n)
    return out


cdef int gather(fmap_chanmap *m, uint64_t pos, char *dst, Py_buffer *view) except -1:
    """Copy a strided buffer into a slot, in C order (one copy, as for any other)."""
    if PyBuffer_ToContiguous(dst, view, view.len, b'C') < 0:
        fmap_chan_discard(m, pos)
        raise MemoryError("cannot copy a non-contiguous buffer into the channel")
    return 0


cdef bint sendable_dtype(dt) except -1:
    return not (dt.hasobject or dt.fields is not None or dt.subdtype is not None
                or dt.itemsize == 0)


cdef size_t array_header(const char *src, size_t n, uint32_t *ndim, uint32_t *codelen) noexcept:
    """Where an array message's data starts, 0 when its description is bad;
    its ndim and dtype code length, read once (another process could
    change them meanwhile: only the values checked here may be used)."""
    cdef uint32_t head[2]
    cdef size_t meta
    if n < ARRAY_META:
        return 0
    memcpy(head, src, sizeof(head))
    ndim[0] = head[0]
    codelen[0] = head[1]
    if head[0] > <uint32_t>ARRAY_MAX_DIMS or head[1] > 24 or head[1] == 0:
        return 0
    meta = array_meta_size(head[0])
    return meta if meta <= n else 0


cdef size_t array_data_offset(const char *src, size_t n) noexcept:
    """Where an array message's data starts; 0 when its description is bad."""
    cdef uint32_t ndim, codelen
    return array_header(src, n, &ndim, &codelen)


cdef class _SlotBytes:
    # A writable buffer over raw slot memory, for np.copyto of a
    # non-contiguous array; lives only inside send_array.
    cdef char *addr
    cdef size_t length

    @staticmethod
    cdef _SlotBytes wrap(char *addr, size_t length):
        cdef _SlotBytes b = _SlotBytes.__new__(_SlotBytes)
        b.addr = addr
        b.length = length
        return b

    def __getbuffer__(self, Py_buffer *buf, int flags):
        PyBuffer_FillInfo(buf, self, self.addr, self.length, 0, flags)

    def __releasebuffer__(self, Py_buffer *buf):
        pass


# ---- creation ---------------------------------------------------------------

cdef Channel new_channel(name, bytes key, int fd, ChanMap cm, const fmap_objinfo *info,
                         bint created):
    cdef Channel ch = Channel.__new__(Channel)
    ch.fd = fd
    ch.otype = FMAP_T_CHANNEL
    ch.name = name
    ch.key = key
    ch.protect_ = FMAP_A_WRITE
    ch.access_ = FMAP_A_WRITE
    ch.dev = info.dev
    ch.ino = info.ino
    ch.created = created
    ch.cm = cm
    ch.capacity = cm.m.capacity
    ch.message_size = cm.m.msg_size
    ch.spin_ns = <uint64_t>(DEFAULT_SPIN_US * 1000)
    # An exact str: a subclass's __dict__ could hold a Message of this
    # channel, a cycle the collector cannot see (Messages are untracked).
    cm.name = None if name is None else PyUnicode_FromObject(name)
    return ch


cdef ChanMap map_channel(int fd, fmap_hold *hold, what):
    """Map a channel; on failure give up the fd and the holder record."""
    cdef fmap_err e, e2
    cdef int rc
    cdef ChanMap cm = ChanMap.__new__(ChanMap)
    with nogil:
        rc = fmap_chan_map(fd, &cm.m, &e)
    if rc != FMAP_OK:
        if hold != NULL and hold.reg != NULL:
            fmap_reg_release(hold, &e2)
        fmap_close_fd(fd)
        raise_err(&e, what)
    return cm


def _channel_create(name, bytes key, uint64_t capacity, uint64_t message_size, bint exclusive):
    """The core of Channel.create; the shim has checked the arguments."""
    cdef fmap_err e
    cdef fmap_newobj spec
    cdef fmap_chanspec cs
    cdef fmap_objinfo info
    cdef fmap_hold hold
    cdef int created = 1, rc, fd = -1
    cdef fmap_reg *reg
    what = lambda: f"cannot create channel {describe(name)}"
    cs.capacity = capacity
    cs.msg_size = message_size
    label = b"fmap-channel:" + (key[1:200] if key is not None else b"")
    spec.fd = -1
    spec.flags = 0
    spec.size = fmap_chan_size(capacity, message_size)
    spec.protect = FMAP_A_WRITE
    spec.label = label
    spec.init = fmap_chan_init
    spec.init_ctx = &cs
    if spec.size == 0:
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f"{what()}: capacity {capacity} x message_size {message_size} is too large")
    hold.reg = NULL
    if key is None:
        with nogil:
            rc = fmap_memfd_new(&spec, &fd, &e)
            if rc == FMAP_OK:
                rc = fmap_chan_init(&cs, fd, &e)
            if rc == FMAP_OK:
                rc = fmap_fd_info(fd, &info, &e)
        if rc != FMAP_OK:
            fmap_close_fd(fd)
            raise_err(&e, what)
        return new_channel(None, None, fd, map_channel(fd, NULL, what), &info, True)
    reg = get_registry(what)
    cdef const char *k = key
    cdef size_t klen = len(key)
    with nogil:
        rc = fmap_reg_create(reg, k, klen, FMAP_T_CHANNEL, &spec, exclusive, 1, &fd, &info,
                             &hold, &created, &e)
    if rc != FMAP_OK:
        raise_err(&e, what)
    cm = map_channel(fd, &hold, what)
    ch = new_channel(name, key, fd, cm, &info, created)
    ch.hold = hold
    live_add(ch)
    return ch


def _channel_open(name, bytes key, uint64_t dev=0, uint64_t ino=0):
    """The core of Channel.open.  dev and ino, when given, must match (unpickling)."""
    cdef fmap_err e
    cdef fmap_objinfo info
    cdef fmap_hold hold
    cdef int rc, fd = -1
    what = lambda: f"cannot open channel {describe(name)}"
    cdef fmap_reg *reg = get_registry(what)
    cdef const char *k = key
    cdef size_t klen = len(key)
    with nogil:
        rc = fmap_reg_open(reg, k, klen, FMAP_T_CHANNEL, 1, &fd, &info, &hold, &e)
    if rc != FMAP_OK:
        raise_err(&e, what)
    cm = map_channel(fd, &hold, what)
    ch = new_channel(name, key, fd, cm, &info, False)
    ch.hold = hold
    live_add(ch)
    if dev and (info.dev != dev or info.ino != ino):
        ch.detach()
        raise make_error(_errno.ENOENT, ERROR_FILE_NOT_FOUND,
                         f"{what()}: the channel that was passed is gone; the name now "
                         "names another object")
    return ch


def _channel_reach(int pid, int fd, uint64_t dev, uint64_t ino):
    """Open an unnamed channel passed from process pid (unpickling)."""
    cdef fmap_err e
    cdef fmap_objinfo info
    cdef int rc, out = -1
    what = "cannot open the unnamed channel passed by pickling"
    with nogil:
        rc = fmap_reach(pid, fd, 1, dev, ino, &out, &e)
    if rc != FMAP_OK:
        raise_err(&e, what)
    info.dev = dev
    info.ino = ino
    return new_channel(None, None, out, map_channel(out, NULL, what), &info, False)


def _channel_unpickle(name, key, pid, fd, dev, ino):
    if key is not None:
        return _channel_open(name, key, dev, ino)
    return _channel_reach(pid, fd, dev, ino)


def _channel_claim_unnamed(Channel ch, bint producer, uint32_t n):
    """Test hook: claim up to n slots (producer) or messages without naming
    this process in them, as a claimer killed between the cursor's swap and
    the names leaves the ring; (position, count), or None when there was
    nothing to claim.  Only for tests, in a process they then kill."""
    cdef fmap_err e
    cdef uint64_t pos = 0
    cdef uint32_t got = 0
    cdef ChanMap cm = ch._map()
    rc = fmap_chan_claim_unnamed(&cm.m, producer, n, &pos, &got, &e)
    if rc == FMAP_OK:
        return pos, got
    if rc < 0 or rc == FMAP_CHAN_CLOSED:
        return None
    raise_err(&e, "cannot claim")


def _channel_send_racing_close(Channel ch):
    """Test hook: send an empty message while, between this send's read of
    the closed flag and its claim, another process closes the channel and a
    consumer looks for the end.  (whether the message went out, whether
    that consumer found the end), or None when the channel was full."""
    cdef fmap_err e
    cdef int saw_end = 0
    cdef ChanMap cm = ch._map()
    rc = fmap_chan_send_racing_close(&cm.m, &saw_end, &e)
    if rc == FMAP_OK or rc == FMAP_CHAN_CLOSED:
        return rc == FMAP_OK, bool(saw_end)
    if rc < 0:
        return None
    raise_err(&e, "cannot send")


def _channel_name_partly(Channel ch, bint producer, uint32_t k):
    """Test hook: name at most k slots of the newest claim on one side that
    are still unnamed, as a process killed part-way through that leaves
    them.  Only for tests."""
    cdef fmap_err e
    cdef ChanMap cm = ch._map()
    if fmap_chan_name_partly(&cm.m, producer, k, &e) != FMAP_OK:
        raise_err(&e, "cannot name")


_COPY_KINDS = {"choose": 0, "plain": 1, "streaming": 2}


def _channel_copy_choice(Channel ch, force=None, epoch=None):
    """Test hook for how this handle copies messages in (plain or streaming
    stores, chosen by timing both).  force: "choose", "plain" or
    "streaming".  epoch: (nbytes, ns), ends a timing epoch as if nbytes had
    been copied in ns nanoseconds.  Returns the choice as it then stands:
    (streaming, phase, epochs left before the next trial, backoff)."""
    cdef uint32_t out[4]
    cdef ChanMap cm = ch._map()
    if force is not None:
        fmap_chan_copy_force(&cm.m, _COPY_KINDS[force])
    if epoch is not None:
        nbytes, ns = epoch
        fmap_chan_copy_epoch(&cm.m, nbytes, ns)
    fmap_chan_copy_state(&cm.m, out)
    return bool(out[0]), ("use", "warm", "try")[out[1]], out[2], out[3]
