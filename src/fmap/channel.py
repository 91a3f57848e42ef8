"""Channel: a message queue between processes, in shared memory.

    ch = fmap.Channel.create("frames", capacity=64, message_size=1 << 20)
    ch.send(b"header")                   # one copy in
    ch.send_array(frame)                 # dtype and shape travel with it
    with ch.reserve(4096) as buf:        # write in place; sent at the end
        buf[:5] = b"hello"
    ch.close()                           # end of stream

    rx = fmap.Channel.open("frames")     # in another process
    rx.recv()                            # -> bytes
    a = rx.recv_array()                  # an ndarray over the message: no copy
    with rx.receive() as buf:            # read in place
        ...
    rx.recv()                            # fmap.EndOfStream: closed and drained

Names and lifetime are those of mappings (one namespace: a name held by
another type raises fmap.WrongTypeError); a Channel pickles (it reopens by
name, or an unnamed one through the sending process), so multiprocessing and
ProcessPoolExecutor workers can take one as an argument.
"""
from __future__ import annotations

from . import _fmap
from .names import key_for, named
from .sync import _bad, _count

MAX_CAPACITY = _fmap.CHANNEL_MAX_CAPACITY
MAX_MESSAGE_SIZE = 1 << 40
EndOfStream = _fmap.EndOfStream


def create(name: str | None = None, capacity: int = 64, *, message_size: int = 65536,
           exclusive: bool = False) -> _fmap.Channel:
    """Create a channel, or open it if the name exists.

    capacity: messages in flight at most (sent and not yet received or still
      in hand), rounded up to a power of two, up to 2**24.
    message_size: the largest message in bytes; for send_array, the largest
      array's data (its dtype and shape, up to 32 dimensions, have room of
      their own), up to 2**40.  The channel takes about 40 KiB plus
      capacity x (message_size + 400) bytes of shared memory, at most 64 TiB;
      only the parts that messages touch are ever allocated.
    When the name exists, its sizes win and `created` is False; exclusive=True
    makes that FileExistsError.
    """
    name, key = named(name)
    cap = _count(capacity, "capacity")
    size = _count(message_size, "message_size")
    if not 1 <= cap <= MAX_CAPACITY:
        raise _bad(f"capacity must be between 1 and {MAX_CAPACITY}, not {cap}")
    if not 0 <= size <= MAX_MESSAGE_SIZE:
        raise _bad(f"message_size must be between 0 and 2**40, not {size}")
    cap = 1 << (cap - 1).bit_length()
    return _fmap._channel_create(name, key, cap, size, bool(exclusive))


def open(name: str) -> _fmap.Channel:  # noqa: A001 - the fmap vocabulary
    """Open an existing named channel (FileNotFoundError when there is none)."""
    key = key_for(name)
    if key is None:
        raise _bad(f"cannot open channel {name!r}: open needs a name; unnamed channels "
                   "are shared by inheritance or by pickling the handle")
    return _fmap._channel_open(name, key)


_fmap._shim.update(create_channel=create, open_channel=open)
