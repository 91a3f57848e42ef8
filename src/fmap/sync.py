"""Mutex, Semaphore, Event and wait_any: the Windows synchronization objects,
shared between processes, in the same namespace as mappings.

    lock = fmap.Mutex.create("frames.lock")
    with lock:
        if lock.abandoned:          # the last owner died holding it
            repair()
        ...
    ready = fmap.Event.create("frames.ready", manual_reset=True)
    ready.wait(timeout=5.0)         # True when set, False on timeout
    slots = fmap.Semaphore.create("frames.slots", initial=4, maximum=4)
    i = fmap.wait_any([ready, slots], timeout=1.0)   # index, or None on timeout

Names and lifetime are those of mappings: create() opens an existing object
of the same type (`created` False, the existing object's parameters win;
exclusive=True makes that FileExistsError); a name held by an object of
another type raises fmap.WrongTypeError in create and open; the name goes
with the last handle and the object with the last holder, crash or not.
Unnamed objects are shared by fork() or by pickling the handle.

Waiting: every wait takes a timeout in seconds (None = forever, 0 = try
once), returns a bool (wait_any: an index or None), releases the GIL while
blocked, and raises KeyboardInterrupt promptly on Ctrl-C.  `spin` (keyword,
microseconds, default none) keeps trying for that long before going to sleep:
a hand-off between processes on two CPUs then takes about a microsecond
instead of a scheduler wake-up, for up to that much CPU time per wait.  The
spinner yields the CPU every 2 microseconds, so on a machine with more
runnable threads than CPUs it does not starve the thread it waits for.

Abandonment (WAIT_ABANDONED): when a mutex's owning thread or process dies
holding it, the next acquirer gets it, acquire() returns True and
`mutex.abandoned` is True for that ownership (also after wait_any).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import _fmap
from .names import key_for, named

ERROR_INVALID_PARAMETER = 87
SEMAPHORE_MAX = _fmap.SEMAPHORE_MAX
MAXIMUM_WAIT_OBJECTS = _fmap.MAXIMUM_WAIT_OBJECTS

_MUTEX, _SEMAPHORE, _EVENT = 2, 3, 4          # FMAP_T_* of fmap.h
_OWNED, _MANUAL = 1, 2                        # FMAP_SYNC_* of fmap.h


def _bad(message: str, winerror: int = ERROR_INVALID_PARAMETER) -> ValueError:
    exc = ValueError(message)
    exc.winerror = winerror  # type: ignore[attr-defined]
    return exc


_count = _fmap.parse_count     # one check of int arguments, the core's


def _create(otype: int, name: str | None, exclusive: bool, flags: int, count: int,
            maximum: int) -> Any:
    """A new or opened handle of otype's class (the caller's return type)."""
    name, key = named(name)
    return _fmap._sync_create(otype, name, key, bool(exclusive), flags, count, maximum)


def _open(otype: int, name: str, kind: str) -> Any:
    """An opened handle of otype's class (the caller's return type)."""
    return _fmap._sync_open(otype, name, _name(name, kind))


def _name(name: Any, kind: str) -> bytes:
    key = key_for(name)
    if key is None:
        raise _bad(f"cannot open {kind} {name!r}: open needs a name; unnamed objects "
                   "are shared by inheritance or by pickling the handle")
    return key


def create_mutex(name: str | None = None, *, owned: bool = False,
                 exclusive: bool = False) -> _fmap.Mutex:
    """Create a mutex, or open it if the name exists (CreateMutex).

    name: None or "" for unnamed; "Local\\\\" and "Global\\\\" prefixes allowed.
    owned: the calling thread owns the new mutex (bInitialOwner); ignored
      when the name exists, as on Windows.
    exclusive: raise FileExistsError when the name exists.
    """
    return _create(_MUTEX, name, exclusive, _OWNED if owned else 0, 0, 0)


def open_mutex(name: str) -> _fmap.Mutex:
    """Open an existing named mutex (OpenMutex): FileNotFoundError when no live
    object has that name, WrongTypeError when another type holds it."""
    return _open(_MUTEX, name, "mutex")


def create_semaphore(name: str | None = None, initial: int = 0,
                     maximum: int = SEMAPHORE_MAX, *,
                     exclusive: bool = False) -> _fmap.Semaphore:
    """Create a semaphore, or open it if the name exists (CreateSemaphore).

    initial: the starting count, 0 <= initial <= maximum (ValueError otherwise).
    maximum: 1 to SEMAPHORE_MAX (2**31 - 1).
    When the name exists, its count and maximum win and `created` is False.
    """
    initial = _count(initial, "initial")
    maximum = _count(maximum, "maximum")
    if not 1 <= maximum <= SEMAPHORE_MAX:
        raise _bad(f"maximum must be between 1 and {SEMAPHORE_MAX}, not {maximum}")
    if not 0 <= initial <= maximum:
        raise _bad(f"initial must be between 0 and maximum ({maximum}), not {initial}")
    return _create(_SEMAPHORE, name, exclusive, 0, initial, maximum)


def open_semaphore(name: str) -> _fmap.Semaphore:
    """Open an existing named semaphore (OpenSemaphore)."""
    return _open(_SEMAPHORE, name, "semaphore")


def create_event(name: str | None = None, *, manual_reset: bool = False,
                 initial: bool = False, exclusive: bool = False) -> _fmap.Event:
    """Create an event, or open it if the name exists (CreateEvent).

    manual_reset: stay signalled until reset() and release every waiter;
      False (auto reset): each set() lets exactly one waiter through.
    initial: start signalled.
    When the name exists, its kind and state win and `created` is False.
    """
    return _create(_EVENT, name, exclusive, _MANUAL if manual_reset else 0,
                   1 if initial else 0, 0)


def open_event(name: str) -> _fmap.Event:
    """Open an existing named event (OpenEvent)."""
    return _open(_EVENT, name, "event")


def wait_any(objects: Iterable[_fmap.SyncHandle], timeout: float | None = None, *,
             spin: float | None = None) -> int | None:
    """Wait until one of the objects is signalled (WaitForMultipleObjects with
    bWaitAll FALSE) and return its index, or None on timeout.

    The object is acquired as a wait on it alone would: a mutex is owned
    (check its `abandoned`), a semaphore unit taken, an auto-reset event
    reset.  When several are signalled, the lowest index wins; a mutex
    whose owner died counts as signalled (abandoned).  objects: 1
    to MAXIMUM_WAIT_OBJECTS (64) Mutex, Semaphore or Event handles.
    timeout: seconds, None = forever, 0 = test.  spin: as for acquire().
    """
    if isinstance(objects, (str, bytes)) or not isinstance(objects, Iterable):
        raise TypeError(f"objects must be a sequence of Mutex, Semaphore or Event, "
                        f"not {type(objects).__name__}")
    objs = tuple(objects)
    if not 1 <= len(objs) <= MAXIMUM_WAIT_OBJECTS:
        raise _bad(f"wait_any takes 1 to {MAXIMUM_WAIT_OBJECTS} objects, not {len(objs)}")
    for o in objs:
        if not isinstance(o, _fmap.SyncHandle):
            raise TypeError(f"wait_any waits for Mutex, Semaphore or Event objects, "
                            f"not {type(o).__name__}")
    return _fmap._wait_any(objs, timeout, spin)


_fmap._shim.update(create_mutex=create_mutex, open_mutex=open_mutex,
                   create_semaphore=create_semaphore, open_semaphore=open_semaphore,
                   create_event=create_event, open_event=open_event)
