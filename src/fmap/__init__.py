"""fmap: the Windows file-mapping model of shared memory, for Python.

    m = fmap.create("frames", size=64 << 20)   # create, or open if it exists
    with m.map() as v:
        a = v.asarray("float32", shape=(1024, 1024))

Memory lives exactly as long as some process holds a handle or a view of it,
crash or not; the name goes with the last handle.  See README.md.
"""
from ._fmap import (
    ALLOCATION_GRANULARITY,
    PAGE_SIZE,
    Channel,
    EndOfStream,
    Event,
    Handle,
    Mapping,
    Message,
    Mutex,
    Semaphore,
    View,
    WrongTypeError,
    runtime_dir,
)
from .mapping import create, open
from .sync import wait_any
from . import channel as _channel  # noqa: F401  (Channel.create / .open)

__all__ = [
    "ALLOCATION_GRANULARITY",
    "PAGE_SIZE",
    "Channel",
    "EndOfStream",
    "Event",
    "Handle",
    "Mapping",
    "Message",
    "Mutex",
    "Semaphore",
    "View",
    "WrongTypeError",
    "create",
    "open",
    "runtime_dir",
    "wait_any",
]
__version__ = "0.1.0"
