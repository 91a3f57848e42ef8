# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, auto_pickle=False
"""fmap's Cython core: owns every OS handle and buffer; one error translator.

Policy (argument checking, names, defaults, the public functions) lives in the
Python shim, fmap/; the platform layer in src/c/ speaks plain C.
"""
cimport cython
from libc.stdint cimport uint32_t, uint64_t

include "errors.pxi"
include "handle.pxi"
include "view.pxi"
include "mapping.pxi"
include "sync.pxi"
include "sync_objects.pxi"
include "channel.pxi"
