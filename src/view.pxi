# View: a mapped view of a Mapping (MapViewOfFile / UnmapViewOfFile).
from cpython.buffer cimport PyBuffer_FillInfo, PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.string cimport memcpy
import operator as _operator
import sys as _sys
import weakref as _weakref

cdef object _np = None


cdef object numpy():
    global _np
    if _np is None:
        import numpy
        _np = numpy
    return _np


# np.dtype of the dtype strings and scalar types asarray() has seen: the
# common call skips NumPy's parser.  Bounded: past 256, new ones are parsed
# each time.
cdef dict _dtypes = {}


cdef object as_dtype(np, dtype):
    try:
        dt = np.dtype(dtype)
    except SyntaxError as exc:    # NumPy parses "(2," as Python and lets this out
        raise TypeError(f"data type {dtype!r} not understood: {exc}") from None
    except ValueError as exc:
        raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                         f"invalid dtype {dtype!r}: {exc}") from None
    if (type(dtype) is str or type(dtype) is type) and len(_dtypes) < 256:
        _dtypes[dtype] = dt
    return dt


# Copies above this size release the GIL.
cdef size_t NOGIL_COPY = 1 << 20


cdef View new_view(char *addr, size_t length, uint64_t offset, uint32_t access, bint is_file, name):
    cdef View v = View.__new__(View)
    v.addr = addr
    v.length_ = length
    v.offset = offset
    v.access_ = access
    v.is_file = is_file
    v.name = name
    return v


cdef tuple slice_indices(slice key, size_t length):
    """key.indices(length) with the step clamped to fit a Py_ssize_t, as
    PySlice_Unpack does for bytes: a step of 2**63 selects what sys.maxsize does."""
    start, stop, step = key.indices(length)
    return start, stop, max(-_sys.maxsize, min(step, _sys.maxsize))


cdef class _Placeholder:
    """The zero-filled range a closed view leaves where something may still
    point (see View.close), unmapped when the last holder lets it go: the
    View, and every memoryview of an asarray() array that outlived it."""
    cdef char *addr
    cdef size_t length

    def __dealloc__(self):
        cdef fmap_err e
        if self.addr != NULL:
            fmap_view_unmap(self.addr, self.length, &e)
            self.addr = NULL


# What weakref.finalize calls when a memoryview holding a placeholder dies:
# nothing; letting go of its argument is the point.
cdef object _keep = lambda placeholder: None


cdef class View:
    """A view of a Mapping: the buffer protocol (zero copy), mmap-like indexing,
    asarray() for NumPy.  close() is UnmapViewOfFile; it refuses while buffers
    (memoryviews, arrays) still use the view.
    """

    def __cinit__(self):
        self.addr = NULL
        self.placeholder = None
        self.arrays_prune_at = 8

    def __init__(self, *args, **kwargs):
        raise TypeError("View objects are made by Mapping.map()")

    cdef int _check(self) except -1:
        if self.addr == NULL:
            raise make_error(ValueError, ERROR_INVALID_ADDRESS,
                             f"view of mapping {describe(self.name)} is closed")
        return 0

    def __getbuffer__(self, Py_buffer *buf, int flags):
        self._check()
        if (flags & PyBUF_WRITABLE) and self.access_ == FMAP_A_READ:
            raise BufferError(f'view of mapping {describe(self.name)} is read-only ("r")')
        PyBuffer_FillInfo(buf, self, self.addr, self.length_, self.access_ == FMAP_A_READ, flags)
        self.exports += 1
        if not self.lending:
            self.exposed = True

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1

    @property
    def closed(self):
        return self.addr == NULL

    @property
    def address(self):
        """The view's base address (an int).  Valid while the view is open."""
        self._check()
        self.exposed = True
        return <uintptr_t>self.addr

    @property
    def length(self):
        return self.length_

    @property
    def access(self):
        """"r", "rw" or "c"."""
        return ACCESS_NAMES[self.access_]

    def __len__(self):
        return self.length_

    cdef void _busy(self, int by) noexcept:
        # Counted per process: a fork() taken during a copy leaves the
        # child a count that no thread of its own will ever lower.
        cdef int pid = fmap_getpid()
        if self.busy_pid != pid:
            self.busy_pid = pid
            self.busy = 0
        self.busy += by

    cdef bint _lent(self):
        """Is the memoryview of an asarray() array still alive?"""
        if self.arrays is not None:
            for t in self.arrays:
                if t[0]() is not None:
                    return True
        return False

    def _holders(self):
        """What still holds exports: for the BufferError message."""
        arrays = [f"{dt}{list(shape)}" for r, dt, shape in (self.arrays or ())
                  if r() is not None]
        parts = []
        if arrays:
            shapes = ", ".join(arrays[:3]) + (", ..." if len(arrays) > 3 else "")
            parts.append(f"{len(arrays)} NumPy array(s) from asarray() ({shapes})")
        others = self.exports - len(arrays)
        if others > 0:
            parts.append(f"{others} other buffer(s) such as memoryviews")
        return " and ".join(parts) or f"{self.exports} buffer(s)"

    def close(self):
        """Unmap the view (UnmapViewOfFile).  Idempotent.

        Raises BufferError while memoryviews or arrays made from the view are
        alive: release them first (memoryview.release(), del the array); and
        while another thread copies a large slice into it or flushes it.
        """
        cdef fmap_err e
        cdef int rc
        cdef char *addr = self.addr
        cdef _Placeholder ph
        if addr == NULL:
            return
        if self.exports:
            raise make_error(BufferError, ERROR_ACCESS_DENIED,
                             f"cannot close view of mapping {describe(self.name)}: "
                             f"{self._holders()} still use it; release them first "
                             "(memoryview.release(), del the array)")
        if self.busy and self.busy_pid == fmap_getpid():
            raise make_error(BufferError, ERROR_ACCESS_DENIED,
                             f"cannot close view of mapping {describe(self.name)}: a copy "
                             "into it or a flush of it is under way in another thread")
        self.addr = NULL
        if self.exposed or self._lent():
            # Something saw the address (np.ndarray(buffer=...) holds no export,
            # ctypes may keep a pointer, an asarray() array outlived its
            # memoryview's release()): leave zeros there until we are freed,
            # and until each such memoryview is: it no longer holds us (a
            # released memoryview lets go of its exporter) while its arrays
            # still point here.
            rc = fmap_view_retire(addr, self.length_, &e)
            if rc == FMAP_OK:
                ph = _Placeholder.__new__(_Placeholder)
                ph.addr = addr
                ph.length = self.length_
                self.placeholder = ph
                for t in self.arrays or ():
                    mv = t[0]()
                    if mv is not None:
                        # not at exit: the arrays may be read by then (a
                        # __del__, a daemon thread); the process takes it
                        _weakref.finalize(mv, _keep, ph).atexit = False
        else:
            rc = fmap_view_unmap(addr, self.length_, &e)
        if rc != FMAP_OK:
            raise_err(&e, f"cannot close view of mapping {describe(self.name)}")

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if self.addr != NULL:
            _warn(f"unclosed {unclosed_repr(self)}", ResourceWarning, source=self)
            if self.exports == 0:
                self.close()

    def __dealloc__(self):
        # (the placeholder goes with the last of its holders: see close)
        cdef fmap_err e
        if self.addr != NULL:
            fmap_view_unmap(self.addr, self.length_, &e)
            self.addr = NULL

    cdef int _range(self, uint64_t offset, uint64_t length, str what, uint64_t *out_len) except -1:
        if offset > self.length_ or length > self.length_ - offset:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"cannot {what} {length} bytes at offset {offset}: the view has "
                             f"{self.length_} bytes")
        out_len[0] = length if length else self.length_ - offset
        return 0

    def flush(self, offset=0, length=0, *, wait=False):
        """Write dirty pages to the file (FlushViewOfFile).  wait=True returns
        once they are on the device.  On paging-file storage: a no-op.
        offset and length are relative to the view; length 0 = to the end."""
        cdef fmap_err e
        cdef uint64_t off, ln, n
        cdef int rc, w = bool(wait)
        try:
            off = _operator.index(offset)     # no floats: Cython would truncate them
            ln = _operator.index(length)
        except (OverflowError, TypeError):
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"flush offset and length must be non-negative integers, "
                             f"not {offset!r}, {length!r}") from None
        # Checked after the arguments: their __index__ may have closed us.
        self._check()
        self._range(off, ln, "flush", &n)
        if not self.is_file or n == 0 or self.access_ == FMAP_A_COPY:
            return
        self._busy(1)           # another thread's close() waits for the msync
        try:
            with nogil:
                rc = fmap_view_flush(self.addr + off, n, w, &e)
        finally:
            self._busy(-1)
        if rc != FMAP_OK:
            raise_err(&e, f"cannot flush view of mapping {describe(self.name)}")

    def asarray(self, dtype="uint8", shape=None, offset=0):
        """A NumPy array over the view, zero copy.

        The array holds a buffer export for its whole life (np.frombuffer), so
        close() refuses while it lives.  Read-only views give read-only arrays.
        shape None = as many items as fit from offset to the end.
        """
        self._check()
        np = numpy()
        dt = _dtypes.get(dtype) if type(dtype) is str or type(dtype) is type else None
        if dt is None:
            dt = as_dtype(np, dtype)
        try:
            off = _operator.index(offset)     # int() would take 1.5 and "16"
        except TypeError:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"offset must be an integer, not {offset!r}") from None
        if off < 0 or off > self.length_:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"asarray offset {off} is outside the view of {self.length_} bytes")
        avail = self.length_ - off
        itemsize = dt.itemsize
        if itemsize == 0:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"dtype {dt} has no size")
        if shape is None:
            count = avail // itemsize
        else:
            try:
                shape = (_operator.index(shape),)
            except TypeError:
                try:
                    shape = tuple([_operator.index(s) for s in shape])
                except TypeError:
                    raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                                     f"shape must be an int or a tuple of ints, not {shape!r}") from None
            count = 1
            for s in shape:
                if s < 0:
                    raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                                     f"shape {shape} has a negative dimension")
                count *= s
            if count * itemsize > avail:
                raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                                 f"an array of shape {shape} and dtype {dt} needs "
                                 f"{count * itemsize} bytes; the view has {avail} "
                                 f"from offset {off}")
        # The export goes to np.frombuffer's memoryview, which every array
        # made from it keeps alive (as its base), and which is tracked below:
        # it does not expose the address as an unknown consumer does.
        self.lending = True
        try:
            # positional: NumPy parses keywords here at three times the cost
            base = np.frombuffer(self, dt, count, off)
            # a subarray dtype ("(2,3)i4") adds its own dimensions after the shape
            out = base if shape is None else base.reshape(shape + dt.shape)
        except ValueError as exc:    # object dtypes, more dimensions than NumPy allows
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"cannot make an array of dtype {dt} and shape {shape}: {exc}") from None
        finally:
            self.lending = False
        mv = base.base
        if type(mv) is not memoryview:    # a NumPy that holds the buffer otherwise
            self.exposed = True
            mv = base
        # The memoryview holds the export; the caller's shape names the array.
        # The description is formatted only for a BufferError (str(dtype) is
        # slow), and dead entries are dropped once the list has doubled.
        arrays = self.arrays
        if arrays is None:
            self.arrays = arrays = []
        elif len(arrays) >= self.arrays_prune_at:
            arrays[:] = [t for t in arrays if t[0]() is not None]
            self.arrays_prune_at = 2 * len(arrays) + 8
        arrays.append((_weakref.ref(mv), dt, out.shape))
        return out

    # mmap-like indexing: view[i] is an int, view[a:b] bytes.
    # The key and value are converted before the view is checked and its
    # address used, with no Python code between: an __index__ may close it.
    def __getitem__(self, key):
        cdef Py_ssize_t i, start, stop, step
        self._check()
        if isinstance(key, slice):
            start, stop, step = slice_indices(key, self.length_)
            if step == 1:
                self._check()
                return PyBytes_FromStringAndSize(self.addr + start, stop - start if stop > start else 0)
            with memoryview(self) as mv:
                return mv[key].tobytes()
        try:
            i = key
        except TypeError:
            raise TypeError(f"view indices must be integers or slices, not {type(key).__name__}") from None
        except OverflowError:    # as for list and mmap: an index too big to be one
            raise IndexError("view index out of range") from None
        if i < 0:
            i += self.length_
        if i < 0 or <size_t>i >= self.length_:
            raise IndexError("view index out of range")
        self._check()
        return <unsigned char>self.addr[i]

    def __setitem__(self, key, value):
        cdef Py_ssize_t i, start, stop, step, n
        cdef Py_buffer src
        cdef char *dst
        self._check()
        if self.access_ == FMAP_A_READ:
            raise make_error(TypeError, ERROR_ACCESS_DENIED,
                             f'view of mapping {describe(self.name)} is read-only ("r")')
        if isinstance(key, slice):
            start, stop, step = slice_indices(key, self.length_)
            if step != 1:
                # memoryview would refuse other formats and report a wrong
                # size as ValueError; check as the contiguous case does
                n = len(range(start, stop, step))
                with memoryview(value) as src_mv:
                    data = src_mv.tobytes()
                if len(data) != n:
                    raise IndexError(f"view slice assignment is wrong size: {len(data)} bytes "
                                     f"into a slice of {n}")
                with memoryview(self) as mv:
                    mv[key] = data
                return
            n = stop - start if stop > start else 0
            PyObject_GetBuffer(value, &src, PyBUF_SIMPLE)
            try:
                if src.len != n:
                    raise IndexError(f"view slice assignment is wrong size: {src.len} bytes "
                                     f"into a slice of {n}")
                self._check()
                dst = self.addr + start
                if <size_t>n > NOGIL_COPY:
                    self._busy(1)       # another thread's close() waits for the copy
                    try:
                        with nogil:
                            memcpy(dst, src.buf, n)
                    finally:
                        self._busy(-1)
                else:
                    memcpy(dst, src.buf, n)
            finally:
                PyBuffer_Release(&src)
            return
        try:
            i = key
        except TypeError:
            raise TypeError(f"view indices must be integers or slices, not {type(key).__name__}") from None
        except OverflowError:
            raise IndexError("view index out of range") from None
        if i < 0:
            i += self.length_
        if i < 0 or <size_t>i >= self.length_:
            raise IndexError("view index out of range")
        try:
            byte = _operator.index(value)     # as mmap: NumPy ints too, not floats
        except TypeError:
            raise TypeError(f"a byte is an int in range(256), not {type(value).__name__}") from None
        if not 0 <= byte <= 255:
            raise make_error(ValueError, ERROR_INVALID_PARAMETER,
                             f"a byte is an int in range(256), not {value!r}")
        self._check()
        self.addr[i] = <char><int>byte

    def __reduce__(self):
        raise TypeError("a View cannot be pickled: pass the Mapping and map it in the other process")

    def __repr__(self):
        if self.addr == NULL:
            return f"<fmap.View of {describe(self.name)} closed>"
        return (f"<fmap.View of {describe(self.name)} access={self.access} offset={self.offset} "
                f"length={self.length_} address={<uintptr_t>self.addr:#x} exports={self.exports}>")
