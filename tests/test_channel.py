"""fmap.Channel within one process: the contract of every API point.

Creation and names (the namespace of mappings), send/recv and their in-place
and array forms, batches, timeouts and backpressure, the end of the stream,
Message lifetime, repr/len/stats/spin, the lifetime of the name and of the
memory, pickling, and an unnamed channel across fork().  Other processes and
crashes are in test_channel_crossprocess.py and test_channel_crash.py.
"""
import array
import gc
import os
import pickle
import time

import numpy as np
import pytest

import fmap
from conftest import raises
from children import Background, poll, run_python, wait_pid

ERROR_FILE_NOT_FOUND = 2
ERROR_INVALID_HANDLE = 6
ERROR_INVALID_PARAMETER = 87
ERROR_BROKEN_PIPE = 109
ERROR_ALREADY_EXISTS = 183
ERROR_NO_DATA = 232
ERROR_TIMEOUT = 1460

WAIT = 10.0      # the bound on any wait that should end at once


def make(closer, name=None, capacity=8, **kw):
    kw.setdefault("message_size", 256)
    return closer(fmap.Channel.create(name, capacity, **kw))


def channel_maps(label):
    """Lines of /proc/self/maps that map a channel whose memfd label holds `label`."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "fmap-channel:" + label in line)


# ---- creation ---------------------------------------------------------------

def test_types():
    assert issubclass(fmap.EndOfStream, EOFError)
    assert fmap.EndOfStream.winerror == ERROR_BROKEN_PIPE
    with pytest.raises(TypeError):
        fmap.Channel()
    with pytest.raises(TypeError):
        fmap.Message()
    assert fmap.Channel.create is not None and fmap.Channel.open is not None


def test_create_defaults(closer):
    ch = closer(fmap.Channel.create())
    assert ch.capacity == 64 and ch.message_size == 65536
    assert ch.created and ch.name is None and not ch.closed and not ch.ended
    assert len(ch) == 0
    assert ch.spin == 50.0


@pytest.mark.parametrize("asked, got", [(1, 1), (2, 2), (3, 4), (5, 8), (64, 64), (65, 128),
                                        (1000, 1024), ((1 << 16) + 1, 1 << 17)])
def test_capacity_rounds_up_to_a_power_of_two(closer, asked, got):
    ch = make(closer, capacity=asked, message_size=0)
    assert ch.capacity == got
    # exactly `got` messages fit, the next one waits
    assert ch.send_many([b""] * got, timeout=0) == got
    with raises(TimeoutError, winerror=ERROR_TIMEOUT):
        ch.send(b"", timeout=0)
    assert len(ch) == got


@pytest.mark.parametrize("capacity", [0, -1, (1 << 24) + 1, 1 << 30])
def test_capacity_out_of_range(capacity):
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="capacity"):
        fmap.Channel.create(None, capacity)


@pytest.mark.parametrize("size", [-1, (1 << 40) + 1])
def test_message_size_out_of_range(size):
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="message_size"):
        fmap.Channel.create(None, 4, message_size=size)


def test_capacity_times_message_size_too_large(name):
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="too large"):
        fmap.Channel.create(name, 1 << 24, message_size=1 << 40)
    with pytest.raises(FileNotFoundError):
        fmap.Channel.open(name)


@pytest.mark.parametrize("kw", [dict(capacity="4"), dict(capacity=4.0), dict(capacity=True),
                                dict(capacity=None), dict(message_size=1.5),
                                dict(message_size="8"), dict(message_size=False)])
def test_argument_types(kw):
    with pytest.raises(TypeError):
        fmap.Channel.create(None, **kw)


def test_numpy_ints_are_accepted(closer):
    ch = closer(fmap.Channel.create(None, np.int64(3), message_size=np.uint16(100)))
    assert (ch.capacity, ch.message_size) == (4, 100)


def test_message_size_zero(closer):
    ch = make(closer, capacity=2, message_size=0)
    ch.send(b"")
    ch.send(bytearray())
    assert ch.recv(timeout=0) == b"" and ch.recv_many(timeout=0) == [b""]
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        ch.send(b"x")
    with ch.reserve(0) as m:
        assert len(m) == 0
    with ch.receive(timeout=0) as m:
        assert m.tobytes() == b""


def test_named_create_then_open(closer, name):
    a = make(closer, name, capacity=5, message_size=100)
    assert a.created and a.name == name and (a.capacity, a.message_size) == (8, 100)
    b = closer(fmap.Channel.open(name))
    assert not b.created and b.name == name and (b.capacity, b.message_size) == (8, 100)
    # create of an existing name opens it: the existing sizes win
    c = closer(fmap.Channel.create(name, 2, message_size=1 << 20))
    assert not c.created and (c.capacity, c.message_size) == (8, 100)
    a.send(b"one")
    assert c.recv(timeout=WAIT) == b"one"


def test_exclusive(closer, name):
    a = closer(fmap.Channel.create(name, exclusive=True))
    assert a.created
    with raises(FileExistsError, winerror=ERROR_ALREADY_EXISTS) as info:
        fmap.Channel.create(name, exclusive=True)
    assert name in str(info.value)
    a.close()
    b = closer(fmap.Channel.create(name, exclusive=True))
    assert b.created


def test_exclusive_is_ignored_for_unnamed(closer):
    assert closer(fmap.Channel.create(None, exclusive=True)).created
    assert closer(fmap.Channel.create("", exclusive=True)).created


def test_open_missing(name):
    with raises(FileNotFoundError, winerror=ERROR_FILE_NOT_FOUND) as info:
        fmap.Channel.open(name)
    assert name in str(info.value)


@pytest.mark.parametrize("bad", [None, ""])
def test_open_needs_a_name(bad):
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        fmap.Channel.open(bad)


@pytest.mark.parametrize("bad", ["a\\b", "\0", "a" * 256, "Local\\"])
def test_bad_names(bad):
    with raises(ValueError):
        fmap.Channel.create(bad)
    with raises(ValueError):
        fmap.Channel.open(bad)


def test_good_names(closer):
    for good in ("Local\\chan-x", "Global\\chan-y", "\u540d\u524d \U0001f600"):
        ch = closer(fmap.Channel.create(good, 2, message_size=8))
        assert ch.created and ch.name == good
        other = closer(fmap.Channel.open(good))
        ch.send(b"hi")
        assert other.recv(timeout=WAIT) == b"hi"


OTHER_TYPES = {
    "mapping": lambda n: fmap.create(n, size=4096),
    "mutex": lambda n: fmap.Mutex.create(n),
    "semaphore": lambda n: fmap.Semaphore.create(n, 0, 1),
    "event": lambda n: fmap.Event.create(n),
}
OPENERS = {
    "mapping": lambda n: fmap.open(n),
    "mutex": lambda n: fmap.Mutex.open(n),
    "semaphore": lambda n: fmap.Semaphore.open(n),
    "event": lambda n: fmap.Event.open(n),
}


@pytest.mark.parametrize("kind", sorted(OTHER_TYPES))
def test_name_held_by_another_type(closer, name, kind):
    closer(OTHER_TYPES[kind](name))
    for call in (lambda: fmap.Channel.create(name),
                 lambda: fmap.Channel.create(name, exclusive=True),
                 lambda: fmap.Channel.open(name)):
        with raises(fmap.WrongTypeError, winerror=ERROR_INVALID_HANDLE):
            call()


@pytest.mark.parametrize("kind", sorted(OTHER_TYPES))
def test_channel_name_blocks_other_types(closer, name, kind):
    make(closer, name)
    for call in (lambda: OTHER_TYPES[kind](name), lambda: OPENERS[kind](name)):
        with raises(fmap.WrongTypeError, winerror=ERROR_INVALID_HANDLE):
            call()


# ---- send / recv ------------------------------------------------------------

def test_send_takes_any_bytes_like(closer):
    ch = make(closer, capacity=16)
    items = [b"bytes", bytearray(b"bytearray"), memoryview(b"xmemoryviewx")[1:-1],
             array.array("i", [1, 2, 3]), np.arange(5, dtype=np.uint16),
             np.arange(6, dtype=np.float64).reshape(2, 3), b""]
    for item in items:
        ch.send(item)
    assert len(ch) == len(items)
    for item in items:
        got = ch.recv(timeout=0)
        assert type(got) is bytes and got == bytes(item)


@pytest.mark.parametrize("bad", ["text", None, 5, 1.0, [1, 2], object()])
def test_send_refuses_non_buffers(closer, bad):
    ch = make(closer)
    with pytest.raises(TypeError):
        ch.send(bad)
    assert len(ch) == 0


def test_send_non_contiguous_buffer(closer):
    # Either a copy of its bytes is sent, or a documented error with its winerror
    # (DESIGN.md: every ValueError carries winerror); never a bare numpy error.
    ch = make(closer)
    data = np.arange(20, dtype=np.uint8)[::2]
    try:
        ch.send(data)
    except (ValueError, BufferError) as exc:
        assert isinstance(getattr(exc, "winerror", None), int), f"{exc!r} has no winerror"
        assert len(ch) == 0
    else:
        assert ch.recv(timeout=0) == data.tobytes()


def test_send_copies_once(closer):
    ch = make(closer)
    buf = bytearray(b"original")
    ch.send(buf)
    buf[:] = b"changed!"
    assert ch.recv(timeout=0) == b"original"


def test_fifo_single_producer(closer):
    ch = make(closer, capacity=64, message_size=8)
    for round_ in range(5):                  # wraps the ring several times
        for i in range(50):
            ch.send((round_ * 50 + i).to_bytes(8, "little"))
        for i in range(50):
            assert int.from_bytes(ch.recv(timeout=0), "little") == round_ * 50 + i


def test_message_size_is_the_limit(closer):
    ch = make(closer, message_size=100)
    ch.send(b"x" * 100)
    assert ch.recv(timeout=0) == b"x" * 100
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="100"):
        ch.send(b"x" * 101)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        ch.reserve(101)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        ch.send_array(np.zeros(101, np.uint8))
    assert len(ch) == 0
    with raises(TimeoutError):
        ch.recv(timeout=0)


# ---- timeouts and backpressure ------------------------------------------------

def test_recv_timeout_zero_on_empty(closer):
    ch = make(closer)
    t0 = time.monotonic()
    for call in (ch.recv, ch.recv_many, ch.receive, ch.recv_array):
        with raises(TimeoutError, winerror=ERROR_TIMEOUT):
            call(timeout=0)
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("timeout", [0.3, 0.5])
def test_recv_timeout_waits_that_long(closer, timeout):
    ch = make(closer)
    t0 = time.monotonic()
    with raises(TimeoutError, winerror=ERROR_TIMEOUT) as info:
        ch.recv(timeout=timeout)
    elapsed = time.monotonic() - t0
    # not much longer either: 0.2 s of slack for a loaded machine
    assert timeout - 0.01 <= elapsed < timeout + 0.2, elapsed
    assert str(timeout) in str(info.value)


@pytest.mark.parametrize("bad", [-1, -0.001, float("nan"), float("-inf")])
def test_bad_timeouts(closer, bad):
    ch = make(closer)
    ch.send(b"x")
    for call in (lambda: ch.send(b"y", timeout=bad), lambda: ch.recv(timeout=bad),
                 lambda: ch.recv_many(timeout=bad), lambda: ch.reserve(1, timeout=bad),
                 lambda: ch.receive(timeout=bad), lambda: ch.send_array([1], timeout=bad),
                 lambda: ch.recv_array(timeout=bad), lambda: ch.send_many([b"z"], timeout=bad),
                 lambda: ch.send_many([], timeout=bad)):
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="timeout"):
            call()
    assert ch.recv(timeout=0) == b"x" and len(ch) == 0      # nothing moved


@pytest.mark.parametrize("bad", ["1", True, [1], object()])
def test_timeout_types(closer, bad):
    ch = make(closer)
    with pytest.raises(TypeError):
        ch.recv(timeout=bad)
    with pytest.raises(TypeError):
        ch.send(b"x", timeout=bad)


def test_infinite_timeouts(closer):
    ch = make(closer, capacity=1)
    for forever in (None, float("inf"), 1e300, 10 ** 30):
        bg = Background(lambda: ch.recv(timeout=forever))
        time.sleep(0.02)
        ch.send(b"late")
        assert bg.result() == b"late"


def test_full_channel_blocks_senders(closer):
    ch = make(closer, capacity=4)
    for i in range(4):
        ch.send(bytes([i]), timeout=0)
    for call in (lambda: ch.send(b"x", timeout=0), lambda: ch.reserve(1, timeout=0),
                 lambda: ch.send_array([1], timeout=0)):
        with raises(TimeoutError, winerror=ERROR_TIMEOUT):
            call()
    t0 = time.monotonic()
    with raises(TimeoutError, winerror=ERROR_TIMEOUT, match="no free slot"):
        ch.send(b"x", timeout=0.1)
    assert 0.09 <= time.monotonic() - t0 < 1.0
    assert len(ch) == 4
    assert ch.recv(timeout=0) == b"\0"
    ch.send(b"\4", timeout=0)
    assert [ch.recv(timeout=0) for _ in range(4)] == [bytes([i]) for i in range(1, 5)]


def test_blocked_send_wakes_when_a_slot_frees(closer):
    ch = make(closer, capacity=1)
    ch.send(b"first")
    bg = Background(lambda: ch.send(b"second", timeout=WAIT))
    time.sleep(0.1)
    assert bg.thread.is_alive()              # waiting for the slot
    assert ch.recv(timeout=0) == b"first"
    bg.result()
    assert ch.recv(timeout=WAIT) == b"second"


def test_a_spinning_sender_takes_a_lone_free_slot_soon(closer):
    # A producer of a full ring waits, while it spins, for 16 free slots
    # (GATE_SLOTS in channel_linux.c), but for 50 us of its wait at most: a
    # slot that stays the only free one is taken then, not at the end of a
    # long spin (here up to the 50 ms of the first wait slice).  Best of
    # three, for a host that stops this machine's CPUs now and then.
    ch = make(closer, capacity=64, message_size=64)
    ch.spin = 1e6
    delays = []
    for attempt in range(3):
        for i in range(64):
            ch.send(bytes([i]))
        sent = []
        bg = Background(lambda: sent.append(ch.send(b"x", timeout=WAIT) or time.perf_counter()))
        time.sleep(0.005)
        assert bg.thread.is_alive()              # spinning
        freed = time.perf_counter()
        assert ch.recv(timeout=0) == bytes([0])
        bg.result()
        delays.append(sent[0] - freed)
        assert [ch.recv(timeout=0) for _ in range(64)][-1] == b"x"
        if delays[-1] < 0.025:
            break
    assert min(delays) < 0.025, delays


def test_blocked_recv_wakes_on_send(closer):
    ch = make(closer)
    ch.spin = 0                              # straight to the futex
    for data in (b"a", b"b"):
        bg = Background(lambda: ch.recv(timeout=WAIT))
        time.sleep(0.05)
        t0 = time.monotonic()
        ch.send(data)
        assert bg.result() == data
        assert time.monotonic() - t0 < 1.0


# ---- copying in: plain or streaming stores --------------------------------------
#
# Messages of 1 KiB and more are copied into their slot with plain stores or
# with streaming ones, whichever this handle has timed as the faster (see
# fmap_chan_copy_in).  The numbers here are the C code's: CP_FIRST epochs
# before the first trial, CP_USE_EPOCHS between trials, doubled per backoff
# step up to CP_BACKOFF_MAX, CP_TRY_EPOCHS timed in a trial.

CP_FIRST, CP_USE_EPOCHS, CP_TRY_EPOCHS, CP_BACKOFF_MAX = 3, 30, 2, 4

COPY_SIZES = [1023, 1024, 1025, 1087, 4096, 4097, 9000, 65536 + 13]


def into_trial(ch):
    """Feed a fresh handle CP_FIRST epochs of 1 MB/ms: it begins a trial of
    streaming stores.  The state it is left in."""
    for _ in range(CP_FIRST):
        state = fmap._fmap._channel_copy_choice(ch, epoch=(10 ** 6, 10 ** 6))
    assert state == (True, "warm", 0, 0)
    return state


@pytest.mark.parametrize("kind", ["plain", "streaming", "choose"])
def test_messages_copied_either_way_arrive_intact(closer, kind):
    ch = make(closer, capacity=16, message_size=70000)
    fmap._fmap._channel_copy_choice(ch, force=kind)
    if kind == "choose":                    # into a trial: streaming stores
        into_trial(ch)
    data = os.urandom(70000 + 64)
    for n in COPY_SIZES:
        for skew in (0, 1, 7, 63):          # source and slot lines not aligned alike
            msg = memoryview(data)[skew:skew + n]
            ch.send(msg)
            assert ch.recv() == msg
            assert ch.send_many([msg, msg[1:]]) == 2
            assert [ch.recv(), ch.recv()] == [msg, msg[1:]]
            a = np.frombuffer(data, np.uint8, n, skew)
            ch.send_array(a)
            assert np.array_equal(ch.recv_array(), a)
    a = np.arange(5000, dtype=np.float64).reshape(50, 100)
    ch.send_array(a)
    assert np.array_equal(ch.recv_array(), a)


def test_small_messages_are_not_timed(closer):
    ch = make(closer, capacity=16, message_size=2048)
    start = fmap._fmap._channel_copy_choice(ch)
    assert start == (False, "use", 0, 0)
    for _ in range(3000):                   # 3 MB, under 1 KiB a message
        ch.send(bytes(1023))
        ch.recv()
    assert fmap._fmap._channel_copy_choice(ch) == start
    for _ in range(3000):                   # 2.9 MB in messages of 1 KiB: two epochs timed
        ch.send(bytes(1024))
        ch.recv()
    assert fmap._fmap._channel_copy_choice(ch) == (False, "use", CP_FIRST - 2, 0)


def test_forced_kinds_are_not_timed(closer):
    ch = make(closer, capacity=16, message_size=4096)
    for kind in ("plain", "streaming"):
        before = fmap._fmap._channel_copy_choice(ch, force=kind)
        for _ in range(2000):
            ch.send(bytes(4096))
            ch.recv()
        assert fmap._fmap._channel_copy_choice(ch) == before


def test_copy_choice_keeps_the_faster_kind(closer):
    """The trial logic, fed epochs of a given rate (bytes per us)."""
    ch = make(closer, capacity=4, message_size=4096)
    choice = fmap._fmap._channel_copy_choice

    def epoch(rate):
        return choice(ch, epoch=(rate * 1000, 1000000))    # 1 ms at `rate`

    def use(rate, epochs):
        for _ in range(epochs - 1):
            state = epoch(rate)
            assert state[1] == "use"
        return epoch(rate)                 # the last one: the trial begins

    def trial(settle, rate):
        """The other kind: one epoch settling (a ring of 4 slots fills in
        one), then CP_TRY_EPOCHS timed."""
        assert epoch(settle)[1] == "try"
        for _ in range(CP_TRY_EPOCHS - 1):
            assert epoch(rate)[1] == "try"
        return epoch(rate)

    # Plain stores first; after CP_FIRST epochs, streaming ones are tried.
    assert use(1000, CP_FIRST) == (True, "warm", 0, 0)
    # Streaming, three times faster (the settling epoch is not judged): kept.
    assert trial(1, 3000) == (True, "use", CP_USE_EPOCHS, 0)
    # Plain tried again, a third as fast: streaming stays, and the next
    # trial comes twice as late, then four times, up to CP_BACKOFF_MAX.
    for k in range(1, CP_BACKOFF_MAX + 2):
        before = min(k - 1, CP_BACKOFF_MAX)
        assert use(3000, CP_USE_EPOCHS << before) == (False, "warm", 0, before)
        assert trial(9999, 1000) == (True, "use", CP_USE_EPOCHS << min(k, CP_BACKOFF_MAX),
                                     min(k, CP_BACKOFF_MAX))
    backoff = CP_BACKOFF_MAX
    # A trial within 5% either way changes nothing, not even the backoff.
    use(3000, CP_USE_EPOCHS << backoff)
    assert trial(1, 3100) == (True, "use", CP_USE_EPOCHS << backoff, backoff)
    use(3000, CP_USE_EPOCHS << backoff)
    assert trial(1, 2900) == (True, "use", CP_USE_EPOCHS << backoff, backoff)
    # One slow epoch just before a trial does not decide it: the kind in use
    # is judged by its running average (here 2750, not 2000).
    use(3000, (CP_USE_EPOCHS << backoff) - 1)
    assert epoch(2000)[1] == "warm"
    assert trial(1, 2800) == (True, "use", CP_USE_EPOCHS << backoff, backoff)
    # Plain 10% faster now (the processes moved): it takes over, and trials
    # come soon again.
    use(3000, CP_USE_EPOCHS << backoff)
    assert trial(1, 3300) == (False, "use", CP_USE_EPOCHS, 0)
    # Streaming 10% slower than plain: plain stays, the backoff does not grow.
    use(3300, CP_USE_EPOCHS)
    assert trial(1, 3000) == (False, "use", CP_USE_EPOCHS, 0)


def test_copy_choice_does_not_count_the_first_epoch(closer):
    # The first epoch pays the ring's first page faults and whatever came
    # before the first send: counted, it made a kind 30% slower look faster.
    ch = make(closer, capacity=4, message_size=4096)
    choice = fmap._fmap._channel_copy_choice
    for rate in (300, 1000, 1000):
        state = choice(ch, epoch=(rate * 1000, 10 ** 6))
    assert state == (True, "warm", 0, 0)
    choice(ch, epoch=(1, 10 ** 6))
    for _ in range(CP_TRY_EPOCHS):
        state = choice(ch, epoch=(700 * 1000, 10 ** 6))
    assert state == (False, "use", CP_USE_EPOCHS << 1, 1)


def test_copy_choice_ignores_epochs_of_no_time(closer):
    ch = make(closer, capacity=4, message_size=4096)
    choice = fmap._fmap._channel_copy_choice
    state = choice(ch, epoch=(10 ** 6, 10 ** 6))
    assert choice(ch, epoch=(10 ** 6, 0)) == state
    assert choice(ch, epoch=(10 ** 6, 1 << 63)) == state     # a clock seen going back


def test_a_forked_child_times_its_own_copies(closer):
    ch = make(closer, capacity=4, message_size=4096)
    choice = fmap._fmap._channel_copy_choice
    into_trial(ch)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ch.send(bytes(4096))                # joins: the parent's trial is not its own
            os.write(w, repr(choice(ch)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    wait_pid(pid)
    assert got == repr((False, "use", CP_FIRST, 0))
    assert choice(ch)[:2] == (True, "warm")


def test_copy_trial_waits_for_the_ring_to_turn_over(closer):
    # While the ring is full the consumers read what was copied a ring's
    # worth of messages ago: the trial's timing starts after that many.
    ch = make(closer, capacity=64, message_size=4096)
    choice = fmap._fmap._channel_copy_choice
    into_trial(ch)
    for _ in range(64 // 16 - 1):          # the hook's epochs are of 16 messages
        assert choice(ch, epoch=(10 ** 6, 10 ** 6))[1] == "warm"
    assert choice(ch, epoch=(10 ** 6, 10 ** 6))[1] == "try"


# ---- send_many / recv_many -------------------------------------------------------

def test_send_many_recv_many(closer):
    ch = make(closer, capacity=128)
    msgs = [bytes([i]) * (i % 7) for i in range(100)]
    assert ch.send_many(msgs) == 100
    assert ch.send_many(iter([b"g1", bytearray(b"g2")])) == 2      # any iterable
    assert ch.send_many((m for m in [memoryview(b"g3")])) == 1
    assert ch.send_many([]) == 0
    got = []
    while len(got) < 103:
        batch = ch.recv_many(max_count=17, timeout=0)
        assert 1 <= len(batch) <= 17
        assert all(type(b) is bytes for b in batch)
        got += batch
    assert got == msgs + [b"g1", b"g2", b"g3"]
    with raises(TimeoutError, winerror=ERROR_TIMEOUT):
        ch.recv_many(timeout=0)


def test_recv_many_returns_what_is_there(closer):
    ch = make(closer, capacity=64)
    ch.send_many([b"a", b"b", b"c"])
    assert ch.recv_many(timeout=0) == [b"a", b"b", b"c"]
    ch.send(b"d")
    assert ch.recv_many(max_count=1, timeout=0) == [b"d"]


def test_recv_many_waits_for_at_least_one(closer):
    ch = make(closer)
    bg = Background(lambda: ch.recv_many(timeout=WAIT))
    time.sleep(0.05)
    ch.send(b"x")
    assert bg.result() == [b"x"]


@pytest.mark.parametrize("count", [0, -1, -(1 << 70), 1 << 70, 1 << 63])
def test_recv_many_bad_counts(closer, count):
    ch = make(closer)
    ch.send(b"x")
    if count > 0:
        # more than can ever be there: what is there
        assert ch.recv_many(max_count=count, timeout=0) == [b"x"]
    else:
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="max_count"):
            ch.recv_many(max_count=count)
        assert ch.recv(timeout=0) == b"x"


@pytest.mark.parametrize("count", [1.5, "2", None, True])
def test_recv_many_count_types(closer, count):
    ch = make(closer)
    ch.send(b"x")
    with pytest.raises(TypeError, match="max_count must be an int"):
        ch.recv_many(max_count=count, timeout=0)
    assert len(ch) == 1


def test_recv_many_bounds_its_bytes(closer):
    # "no more than about 64 KiB of them past the first"
    ch = make(closer, capacity=64, message_size=65536)
    ch.send_many([bytes(65536)] * 40)
    batch = ch.recv_many(timeout=0)
    assert 1 <= len(batch)
    past_first = sum(map(len, batch[1:]))
    assert past_first <= 2 * 65536, f"{len(batch)} messages of 64 KiB in one batch"


def test_send_many_times_out_with_count(closer):
    ch = make(closer, capacity=4)
    with raises(TimeoutError, winerror=ERROR_TIMEOUT) as info:
        ch.send_many([b"m"] * 10, timeout=0.05)
    assert info.value.sent == 4
    assert ch.recv_many(timeout=0) == [b"m"] * 4


def test_send_many_bigger_than_capacity_with_a_consumer(closer):
    ch = make(closer, capacity=8, message_size=8)
    n = 5000
    bg = Background(lambda: [m for _ in range(n) for m in [ch.recv(timeout=WAIT)]])
    assert ch.send_many([i.to_bytes(8, "little") for i in range(n)], timeout=WAIT) == n
    assert [int.from_bytes(m, "little") for m in bg.result()] == list(range(n))


@pytest.mark.parametrize("bad", [b"x" * 300, "text"])
def test_send_many_stops_at_a_bad_item(closer, bad):
    ch = make(closer, capacity=16, message_size=256)
    with pytest.raises((ValueError, TypeError)) as info:
        ch.send_many([b"a", b"b", bad, b"d", b"e"])
    if isinstance(info.value, ValueError):
        assert info.value.winerror == ERROR_INVALID_PARAMETER
    # the ones before went, the bad one and the rest did not; the error says so
    assert info.value.sent == 2
    assert ch.recv_many(timeout=0) == [b"a", b"b"]
    with raises(TimeoutError):
        ch.recv(timeout=0)
    # the slots given back are usable: the ring goes on
    assert ch.send_many([b"f"] * 16, timeout=0) == 16
    assert ch.recv_many(timeout=0) == [b"f"] * 16


def test_send_many_counts_what_went_before_a_bad_item_in_a_later_batch(closer):
    ch = make(closer, capacity=128, message_size=8)
    items = [b"%d" % i for i in range(100)]
    items[70] = b"too long!"
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="message 70") as info:
        ch.send_many(items)
    assert info.value.sent == 70
    assert ch.recv_many(200, timeout=0) == items[:70]


# ---- reserve: writing in place --------------------------------------------------

def test_reserve_writes_in_place(closer):
    ch = make(closer, message_size=64)
    with ch.reserve(16) as buf:
        assert isinstance(buf, fmap.Message)
        assert len(buf) == 16 and buf.nbytes == 16 and buf.in_hand
        buf[:] = b"0123456789abcdef"
        buf[0] = ord("X")
        buf[1:3] = b"YZ"
        with memoryview(buf) as mv:
            assert not mv.readonly and mv.nbytes == 16
            mv[-1] = ord("!")
        a = buf.asarray("uint8", (4, 4))
        assert a.shape == (4, 4) and a.flags.writeable
        a[1, 0] = ord("#")
        del a
        assert buf[0] == ord("X") and bytes(buf[1:3]) == b"YZ"
        assert buf.tobytes() == b"XYZ3#56789abcde!"
        assert "reserved 16 bytes" in repr(buf) and "in hand" in repr(buf)
        assert len(ch) == 1 or len(ch) == 0        # in flight: a snapshot either way
    assert not buf.in_hand and "done" in repr(buf)
    assert ch.recv(timeout=0) == b"XYZ3#56789abcde!"


def test_reserve_asarray_dtypes(closer):
    ch = make(closer, message_size=64)
    with ch.reserve(24) as buf:
        a = buf.asarray("float64")
        assert a.shape == (3,)
        a[:] = [1.5, 2.5, 3.5]
        b = buf.asarray(np.int32, shape=6)
        assert b.shape == (6,)
        c = buf.asarray("u2", shape=(2, 3))
        assert c.shape == (2, 3)
        d = buf.asarray("f8", shape=())
        assert d.shape == () and d[()] == 1.5
        del a, b, c, d
    assert np.frombuffer(ch.recv(timeout=0), "f8").tolist() == [1.5, 2.5, 3.5]


@pytest.mark.parametrize("dtype, shape, exc", [
    ("f8", (4,), ValueError),          # 32 bytes > 24
    ("u1", (-1,), ValueError),
    ("u1", (2, -3), ValueError),
    ("V0", None, ValueError),
    (object, None, ValueError),
    ("no-such-dtype", None, TypeError),
    ("u1", (1.5,), TypeError),
])
def test_asarray_bad_arguments(closer, dtype, shape, exc):
    ch = make(closer, message_size=64)
    with ch.reserve(24) as buf:
        with raises(exc, winerror=ERROR_INVALID_PARAMETER if exc is ValueError else None):
            buf.asarray(dtype, shape)
    assert ch.recv(timeout=0) is not None           # still sent


def test_asarray_of_a_message_its_dtype_ended(closer):
    # Converting the dtype runs Python code; a message ended there once gave
    # an array over no memory (NumPy allocated one: garbage).
    np = pytest.importorskip("numpy")
    ch = make(closer, message_size=64)
    ch.send(b"x" * 64)
    msg = ch.receive()

    class EndsIt:
        @property
        def dtype(self):
            msg.__exit__(None, None, None)
            return np.dtype("uint8")
    with raises(ValueError, winerror=ERROR_INVALID_HANDLE):
        msg.asarray(EndsIt())
    ch.send(b"y")                                   # the channel still works
    assert ch.recv(timeout=1) == b"y"


def test_reserve_discarded_on_exception(closer):
    ch = make(closer, capacity=2)
    with pytest.raises(KeyError):
        with ch.reserve(8) as buf:
            buf[:] = b"partial!"
            raise KeyError("boom")
    assert not buf.in_hand
    with raises(TimeoutError):
        ch.recv(timeout=0)
    ch.send(b"next")
    assert ch.recv(timeout=0) == b"next"
    # the discarded slot went back: the whole ring is usable again
    assert ch.send_many([b"1", b"2"], timeout=0) == 2


def test_len_does_not_count_a_discarded_message(closer):
    ch = make(closer, capacity=4)
    with pytest.raises(KeyError):
        with ch.reserve(8):
            raise KeyError
    assert len(ch) == 0 and ch.stats()["pending"] == 0
    with raises(TimeoutError):
        ch.recv(timeout=0)
    assert len(ch) == 0


def test_len_does_not_count_a_message_given_back_behind_another(closer):
    # Slot 1 goes back unsent while slot 0 is still being written: the tail
    # cannot pass it yet.  The consumer that takes slot 0 passes it.
    ch = make(closer, capacity=8)
    first = ch.reserve(4)
    with pytest.raises(KeyError):
        with ch.reserve(4):
            raise KeyError
    ch.send(b"two")
    assert len(ch) == 3                  # claimed by producers: 0, 1 and 2
    with first as buf:
        buf[:] = b"one!"
    assert ch.recv(timeout=0) == b"one!"
    assert len(ch) == 1 and ch.stats()["taken"] == 2
    assert ch.recv(timeout=0) == b"two"
    assert len(ch) == 0


def test_reserve_with_a_live_buffer_is_not_sent(closer):
    ch = make(closer, capacity=1, message_size=16)
    with raises(BufferError, match="1 buffer"):
        with ch.reserve(4) as buf:
            buf[:] = b"lost"
            mv = memoryview(buf)
    with raises(TimeoutError):
        ch.recv(timeout=0)
    mv.release()
    ch.send(b"next")
    assert ch.recv(timeout=0) == b"next"


def test_reserve_live_buffer_never_writes_into_a_later_message(closer):
    # A buffer left alive past the with block (BufferError, not sent) must not
    # be able to write into the slot once another message uses it (DESIGN.md:
    # bad input never corrupts another process's data).
    ch = make(closer, capacity=1, message_size=16)
    with pytest.raises(BufferError):
        with ch.reserve(4) as buf:
            mv = memoryview(buf)
    try:
        ch.send(b"AAAA", timeout=0)
    except TimeoutError:
        pass                       # the slot is held while the buffer lives: also fine
    else:
        mv[:] = b"ZZZZ"            # the stale buffer writes...
        assert ch.recv(timeout=0) == b"AAAA"    # ...never into the message sent since
    mv.release()


def test_reserve_live_buffer_never_writes_into_a_later_message_after_an_exception(closer):
    # The block raised with a buffer alive: not sent, and the slot held as
    # when it ends normally (not discarded, which let the stale view write
    # into the next message).  The block's exception is the one raised.
    ch = make(closer, capacity=1, message_size=8)
    with pytest.raises(KeyError):
        with ch.reserve(8) as buf:
            mv = memoryview(buf)
            arr = buf.asarray()
            raise KeyError
    assert not buf.in_hand and "reserved 8 bytes" in repr(buf) and "done" in repr(buf)
    with raises(TimeoutError):
        ch.send(b"AAAAAAAA", timeout=0)     # the only slot is held while they live
    mv[:] = b"ZZZZZZZZ"
    mv.release()
    with raises(TimeoutError):
        ch.send(b"AAAAAAAA", timeout=0)
    arr[:] = ord("Y")
    del arr
    ch.send(b"AAAAAAAA", timeout=0)
    assert ch.recv(timeout=0) == b"AAAAAAAA"


def test_an_open_reserve_holds_back_later_messages(closer, name):
    # A message's place is taken at reserve(): another producer's message,
    # sent while the block is open, comes after it (documented).
    ch = make(closer, name)
    other = closer(fmap.Channel.open(name))
    with ch.reserve(5) as buf:
        other.send(b"later")
        assert len(ch) == 2
        with raises(TimeoutError):
            ch.recv(timeout=0)
        buf[:] = b"first"
    assert ch.recv_many(timeout=0) == [b"first", b"later"]


def test_reserve_argument_errors(closer):
    ch = make(closer, message_size=16)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        ch.reserve(-1)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        ch.reserve(17)
    for huge in (1 << 70, 1 << 63, -(1 << 70)):     # clipped, never an OverflowError
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
            ch.reserve(huge)
    for bad in (1.5, "4", None, True):
        with pytest.raises(TypeError, match="nbytes must be an int"):
            ch.reserve(bad)
    assert len(ch) == 0
    with ch.reserve(np.int32(16)) as buf:
        assert len(buf) == 16


def test_reserve_without_with_is_discarded_when_dropped(closer):
    ch = make(closer, capacity=1)
    buf = ch.reserve(4)
    buf[:] = b"drop"
    del buf
    gc.collect()
    with raises(TimeoutError):
        ch.recv(timeout=0)
    ch.send(b"ok", timeout=0)               # the slot came back
    assert ch.recv(timeout=0) == b"ok"


def test_reserve_without_with_can_still_be_sent(closer):
    ch = make(closer)
    buf = ch.reserve(2)
    buf[:] = b"hi"
    with buf:
        pass
    assert ch.recv(timeout=0) == b"hi"


def test_message_misuse_after_its_block(closer):
    ch = make(closer)
    with ch.reserve(4) as w:
        w[:] = b"abcd"
    ch.send(b"efgh")
    with ch.receive(timeout=0) as r:
        assert r.tobytes() == b"abcd"
    for m in (w, r):
        assert not m.in_hand and len(m) == 4 and "done" in repr(m)
        for call in (m.tobytes, lambda: m[0], lambda: m[1:2], lambda: memoryview(m),
                     lambda: m.asarray(), lambda: m.__enter__(), lambda: bytes(m)):
            with raises(ValueError, winerror=ERROR_INVALID_HANDLE, match="no longer"):
                call()
        with raises(ValueError, winerror=ERROR_INVALID_HANDLE):
            m[0] = 1
        assert m.__exit__(None, None, None) is False      # a second exit does nothing
    assert ch.recv(timeout=0) == b"efgh"                   # committed only once
    with raises(TimeoutError):
        ch.recv(timeout=0)


def test_a_message_cannot_be_pickled_or_copied(closer):
    # A copy would carry the slot's address into memory of its own (or fail
    # obscurely), and write there or give back what it does not hold.
    import copy
    ch = make(closer, message_size=16)
    ch.send(b"in hand")
    for msg in (ch.reserve(4), ch.receive(timeout=0)):
        for how in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot be pickled or copied"):
                how(msg)
        assert msg.in_hand
        with msg:
            pass
    assert ch.recv(timeout=0) == bytes(4)


# ---- receive: reading in place ---------------------------------------------------

def test_receive_reads_in_place(closer):
    ch = make(closer, capacity=1)
    ch.send(b"payload")
    with ch.receive(timeout=0) as buf:
        assert isinstance(buf, fmap.Message)
        assert len(buf) == 7 and buf.tobytes() == b"payload" and bytes(buf) == b"payload"
        assert bytes(buf[1:3]) == b"ay" and buf[0] == ord("p")
        assert "received 7 bytes" in repr(buf) and "in hand" in repr(buf)
        with memoryview(buf) as mv:
            assert mv.readonly
        with pytest.raises(TypeError):
            buf[0] = 1
        with pytest.raises(TypeError):
            buf[0:2] = b"xx"
        with pytest.raises(TypeError, match="read-only"):
            memoryview(buf).cast("B")[0:1] = b"x"
        a = buf.asarray()
        assert not a.flags.writeable and bytes(a) == b"payload"
        with pytest.raises(ValueError):
            a[0] = 1
        del a
        # held while in hand: the channel is full
        with raises(TimeoutError):
            ch.send(b"x", timeout=0)
    ch.send(b"x", timeout=0)                        # given back at the block's end
    assert ch.recv(timeout=0) == b"x"


def test_receive_slot_held_until_the_last_buffer_goes(closer):
    ch = make(closer, capacity=1)
    ch.send(b"keep")
    with ch.receive(timeout=0) as buf:
        mv = memoryview(buf)
        a = buf.asarray()
    assert not buf.in_hand
    assert bytes(mv) == b"keep" and bytes(a) == b"keep"
    with raises(TimeoutError):
        ch.send(b"x", timeout=0)
    mv.release()
    with raises(TimeoutError):
        ch.send(b"x", timeout=0)
    del a
    ch.send(b"x", timeout=0)
    assert ch.recv(timeout=0) == b"x"


def test_receive_consumes_even_on_exception(closer):
    ch = make(closer)
    ch.send_many([b"one", b"two"])
    with pytest.raises(KeyError):
        with ch.receive(timeout=0) as buf:
            assert buf.tobytes() == b"one"
            raise KeyError
    assert ch.recv(timeout=0) == b"two"           # delivered at most once
    with raises(TimeoutError):
        ch.recv(timeout=0)


def test_receive_of_an_array_message(closer):
    ch = make(closer)
    arr = np.arange(12, dtype="<i4").reshape(3, 4)
    ch.send_array(arr)
    with ch.receive(timeout=0) as buf:
        assert len(buf) == arr.nbytes
        got = buf.asarray("<i4", (3, 4))
        assert (got == arr).all()
        del got


def test_receive_dropped_without_with(closer):
    ch = make(closer, capacity=1)
    ch.send(b"x")
    m = ch.receive(timeout=0)
    assert m.tobytes() == b"x"
    del m
    gc.collect()
    ch.send(b"y", timeout=0)
    assert ch.recv(timeout=0) == b"y"


def test_messages_are_left_to_reference_counting(closer):
    # A Message refers only to its mapping, so it can be in no reference
    # cycle, and the collector does not track it (cheaper to make and
    # free).  That holds only while no subclass can add a __dict__.
    ch = make(closer, message_size=16)
    ch.send(b"x")
    with ch.reserve(4) as w, ch.receive(timeout=0) as r:
        assert not gc.is_tracked(w) and not gc.is_tracked(r)
    with pytest.raises(TypeError):
        type("Sub", (fmap.Message,), {})


def test_a_message_kept_by_its_channels_name_is_collected(closer):
    # Message -> its mapping -> the channel's name -> the name's __dict__ ->
    # Message would be a cycle the collector cannot see, Messages being
    # untracked: the slot would never come back.  The mapping keeps the name
    # as a plain str.
    class Name(str):
        pass
    plain = f"fmap-test-name-cycle-{os.getpid()}"
    name = Name(plain)
    ch = fmap.Channel.create(name, capacity=1, message_size=16)
    other = closer(fmap.Channel.open(plain))
    other.send(b"x")
    name.keep = ch.receive(timeout=0)
    ch.detach()
    del ch, name
    gc.collect()
    other.send(b"y", timeout=1)       # the slot came back
    assert other.recv(timeout=0) == b"y"


@pytest.mark.parametrize("how", ["traceback", "received", "reserved", "at exit"])
def test_a_message_in_a_reference_cycle_survives_the_collector(how):
    # The collector clears what a garbage cycle holds before deallocating
    # it; a Message's hold on its channel must survive that, since its
    # dealloc and its last buffer's release give the slot back through it
    # (a segfault, once).  In a child, so that a crash fails this test only.
    from children import run_python
    code = f"""
import gc, fmap
ch = fmap.Channel.create(capacity=1, message_size=16)
ch.spin = 0
how = {how!r}
if how == "traceback":          # a caught exception: frame <-> traceback
    def consume():
        with ch.receive(timeout=1) as m:
            view = memoryview(m)[:4]
        try:
            int("x" + bytes(view).decode())
        except ValueError as exc:
            err = exc
    ch.send(b"abcdefgh")
    consume()
else:                           # a message and a view of it in a cycle
    if how == "reserved":
        m = ch.reserve(8)
        cycle = [m, memoryview(m)]
    else:
        ch.send(b"12345678")
        m = ch.receive(timeout=1)
        cycle = [m, memoryview(m)[:4]]
    cycle.append(cycle)
    del m, cycle
if how == "at exit":
    raise SystemExit             # collected at interpreter exit
gc.collect()
ch.send(b"next", timeout=1)      # the slot went back
print(ch.recv(timeout=1))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.strip() == (b"" if how == "at exit" else b"b'next'")


# ---- arrays -------------------------------------------------------------------

DTYPES = ["u1", "i1", "<u2", ">i2", "<i4", ">i4", "<i8", "<u8", "<f2", "<f4", ">f8", "<c8",
          "<c16", "?", "S3", "<U5", "<M8[ns]", "<m8[s]", "<f16" if np.dtype("g").itemsize > 8
          else "<f8"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_round_trip_dtypes(closer, dtype):
    ch = make(closer, message_size=4096)
    rng = np.random.default_rng(1)
    arr = np.frombuffer(rng.bytes(np.dtype(dtype).itemsize * 12), dtype=dtype).reshape(3, 4)
    if arr.dtype.kind == "b":
        arr = arr.astype(bool)
    ch.send_array(arr)
    got = ch.recv_array(timeout=0)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    assert got.tobytes() == arr.tobytes()
    assert got.flags.c_contiguous and got.flags.writeable


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (2, 3), (2, 0, 3), (3, 1, 2, 1, 2),
                                   (1,) * 32, (2,) * 10])
def test_array_round_trip_shapes(closer, shape):
    ch = make(closer, message_size=8192)
    arr = np.arange(int(np.prod(shape)), dtype="<f8").reshape(shape)
    ch.send_array(arr)
    got = ch.recv_array(timeout=0)
    assert got.shape == shape and got.dtype == arr.dtype
    assert (got == arr).all()


def test_array_data_is_64_byte_aligned(closer):
    ch = make(closer, message_size=4096)
    for ndim in range(1, 12):
        ch.send_array(np.ones((1,) * ndim, "f8"))
        a = ch.recv_array(timeout=0)
        assert a.ctypes.data % 64 == 0, ndim
        del a


def test_send_array_of_non_contiguous_and_fortran(closer):
    ch = make(closer, message_size=4096)
    base = np.arange(60, dtype="<i4").reshape(6, 10)
    for arr in (base[::2, 1::3], base.T, np.asfortranarray(base), base[:, ::-1],
                base[::-1], base[3]):
        ch.send_array(arr)
        got = ch.recv_array(timeout=0)
        assert got.shape == arr.shape and (got == arr).all()
        assert got.flags.c_contiguous
        del got


def test_send_array_takes_array_likes(closer):
    ch = make(closer)
    ch.send_array([[1, 2], [3, 4]])
    got = ch.recv_array(timeout=0)
    assert got.shape == (2, 2) and got.tolist() == [[1, 2], [3, 4]]
    ch.send_array(3.5)
    got = ch.recv_array(timeout=0)
    assert got.shape == () and got[()] == 3.5
    ch.send_array(np.uint16(7))
    assert ch.recv_array(timeout=0).dtype == np.uint16


@pytest.mark.parametrize("bad", [
    np.array([object(), 1], dtype=object),
    np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]),
    np.zeros(2, "i4").view([("x", "i4")]),
    np.zeros((1,) * 33, "u1"),
])
def test_send_array_refuses(closer, bad):
    ch = make(closer, message_size=4096)
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
        ch.send_array(bad)
    assert len(ch) == 0


def test_send_array_dtype_codes_past_the_cache_bound(closer):
    # send_array keeps the code of each dtype it has seen, in a bounded
    # cache: refusals are refused every time, and dtypes past the bound (and
    # equal dtypes that are distinct objects) still travel with their own.
    ch = make(closer, message_size=4096)
    bad = np.dtype([("a", "i4")])
    for _ in range(3):
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER):
            ch.send_array(np.zeros(2, bad))
    for n in range(1, 300):
        for dt in (np.dtype(f"S{n}"), np.dtype(f"<U{n % 40 + 1}")):
            arr = np.array([b"x" * n if dt.kind == "S" else "y" * (n % 40 + 1)], dt)
            ch.send_array(arr)
            got = ch.recv_array(timeout=0)
            assert got.dtype == dt and got.tobytes() == arr.tobytes()
            del got
    assert len(ch) == 0


def test_send_array_message_size_is_the_arrays_data(closer):
    # A channel made for N-byte frames carries N-byte arrays: the description
    # (dtype, shape, up to 32 dimensions) has room of its own in each slot.
    ch = make(closer, message_size=80)
    for shape in [(10,), (1, 1, 1, 1, 10), (1,) * 31 + (10,), (2, 5)]:
        ch.send_array(np.arange(10, dtype="f8").reshape(shape))
        got = ch.recv_array(timeout=0)
        assert got.shape == shape and got.ravel().tolist() == list(range(10))
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="88 bytes.*at most 80"):
        ch.send_array(np.zeros(11, "f8"))
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="dimensions"):
        ch.send_array(np.zeros((1,) * 33, "f8"))
    with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="at most 80"):
        ch.send(bytes(81))                          # the room is for descriptions only
    assert len(ch) == 0


def test_recv_array_of_bytes_and_recv_of_array(closer):
    ch = make(closer)
    ch.send(b"\x01\x02\x03")
    a = ch.recv_array(timeout=0)
    assert a.dtype == np.uint8 and a.tolist() == [1, 2, 3] and a.flags.writeable
    del a
    arr = np.array([1.0, 2.0], "<f4")
    ch.send_array(arr)
    assert ch.recv(timeout=0) == arr.tobytes()          # recv gives the data
    ch.send_array(arr)
    assert ch.recv_many(timeout=0) == [arr.tobytes()]


def test_recv_array_is_writable_and_views_the_slot(closer):
    ch = make(closer, capacity=1)
    ch.send_array(np.zeros(4, "u1"))
    a = ch.recv_array(timeout=0)
    a[:] = 9                           # the consumer's own
    assert a.tolist() == [9] * 4
    assert a.base is not None          # a view, not a copy


def test_recv_array_slot_released_after_every_view(closer):
    ch = make(closer, capacity=1, message_size=1024)
    ch.send_array(np.arange(100, dtype="<i8"))
    a = ch.recv_array(timeout=0)
    views = [a[::2], a.reshape(10, 10)[3], a.view("u1"), memoryview(a)]
    with raises(TimeoutError):
        ch.send(b"x", timeout=0)
    del a
    while views:
        gc.collect()
        with raises(TimeoutError):
            ch.send(b"x", timeout=0)
        v = views.pop(0)
        if isinstance(v, memoryview):
            v.release()
        del v
    gc.collect()
    ch.send(b"x", timeout=0)           # every view gone: the slot came back
    assert ch.recv(timeout=0) == b"x"


def test_recv_array_outlives_the_handle(closer, name):
    ch = fmap.Channel.create(name, 2, message_size=1024)
    ch.send_array(np.arange(50, dtype="<i4"))
    a = ch.recv_array(timeout=0)
    assert channel_maps(name) >= 1
    ch.close()
    with pytest.raises(FileNotFoundError):          # the name went with the handle
        fmap.Channel.open(name)
    assert a.sum() == sum(range(50))                # the memory lives with the array
    a[0] = 1
    del a
    gc.collect()
    assert channel_maps(name) == 0                  # and goes with it


def release_bases(a):
    """Release whatever in an array's chain of bases can be released: what a
    user reaching for a.base.release() would do."""
    base = a.base
    while base is not None:
        if hasattr(base, "release"):
            base.release()
        base = getattr(base, "base", None)


@pytest.mark.parametrize("how", ["recv_array", "receive().asarray", "recv_array of bytes"])
def test_an_arrays_base_cannot_give_its_slot_back(closer, how):
    # np.frombuffer made the array's base a memoryview whose release() gave the
    # slot back under the live array: the next message was written into it.
    ch = make(closer, capacity=1, message_size=64)
    if how == "recv_array of bytes":
        ch.send(bytes(range(8)))
    else:
        ch.send_array(np.arange(8, dtype="u1"))
    if how == "receive().asarray":
        with ch.receive(timeout=0) as msg:
            a = msg.asarray()
    else:
        a = ch.recv_array(timeout=0)
    release_bases(a)
    gc.collect()
    with raises(TimeoutError):
        ch.send(b"\xff" * 8, timeout=0)             # the array still holds the slot
    assert a.tolist() == list(range(8))
    del a
    gc.collect()
    ch.send(b"\xff" * 8, timeout=0)                 # and gives it back when it goes


def test_a_reserved_arrays_base_cannot_let_the_message_go(closer):
    ch = make(closer, capacity=2, message_size=64)
    with raises(BufferError, match="not sent"):
        with ch.reserve(4) as msg:
            a = msg.asarray()
            release_bases(a)
    a[:] = 7                                        # into a withheld slot, harmlessly
    ch.send(b"good", timeout=0)
    assert ch.recv(timeout=0) == b"good"
    del a


# ---- the end of the stream ------------------------------------------------------

def test_the_end_of_the_stream_waits_for_a_reserve_under_way(closer, name):
    # Closed while a message is being written: receivers wait for it (it is
    # sent when its block ends), and only then get EndOfStream.
    tx = fmap.Channel.create(name, 8, message_size=64)
    rx = make(closer, name)
    msg = tx.reserve(4)
    tx2 = closer(fmap.Channel.open(name))
    tx2.close()
    assert rx.ended
    for call in (lambda: rx.recv(timeout=0), lambda: rx.recv_many(timeout=0),
                 lambda: rx.receive(timeout=0), lambda: rx.recv_array(timeout=0)):
        with raises(TimeoutError):
            call()
    with msg as buf:
        buf[:] = b"last"
    tx.detach()
    assert rx.recv(timeout=0) == b"last"
    with pytest.raises(fmap.EndOfStream):
        rx.recv(timeout=0)


@pytest.mark.parametrize("before", [0, 3])
def test_a_send_that_claims_after_the_end_was_seen_fails(closer, name, before):
    # A producer reads `closed` (not yet), another process closes, a
    # consumer finds the end (nothing claimed past what it took), and only
    # then does the producer claim its slot: its send must fail, not go out
    # to a stream every consumer has left.  The hook puts the close and the
    # consumer's look in that window.
    tx = fmap.Channel.create(name, 8, message_size=64)
    rx = make(closer, name)
    for i in range(before):
        tx.send(b"%d" % i)
        assert rx.recv(timeout=0) == b"%d" % i
    assert fmap._fmap._channel_send_racing_close(tx) == (False, True)
    assert rx.ended and len(rx) == 0
    with pytest.raises(fmap.EndOfStream):
        rx.recv(timeout=0)
    with raises(BrokenPipeError, winerror=ERROR_NO_DATA):
        tx.send(b"x", timeout=0)
    # A full ring: the hook never gets as far as a claim.
    full = make(closer, capacity=2)
    full.send_many([b"1", b"2"])
    assert fmap._fmap._channel_send_racing_close(full) is None and not full.ended


def test_close_ends_the_stream(closer, name):
    tx = fmap.Channel.create(name, 8, message_size=64)
    rx = make(closer, name)
    also = closer(fmap.Channel.open(name))
    tx.send_many([b"a", b"b", b"c"])
    tx.send_array(np.arange(3, dtype="u1"))
    tx.close()
    assert tx.closed and rx.ended and also.ended and not rx.closed
    for send in (lambda: also.send(b"x"), lambda: also.send_many([b"x"]),
                 lambda: also.send_many([]),
                 lambda: also.reserve(1), lambda: also.send_array([1]),
                 lambda: also.send(b"x", timeout=0)):
        with raises(BrokenPipeError, winerror=ERROR_NO_DATA, match="closed"):
            send()
    assert rx.recv(timeout=0) == b"a"
    assert rx.recv_many(max_count=1, timeout=0) == [b"b"]
    with rx.receive(timeout=0) as buf:
        assert buf.tobytes() == b"c"
    assert rx.recv_array(timeout=0).tolist() == [0, 1, 2]
    for recv in (rx.recv, rx.recv_many, rx.receive, rx.recv_array, also.recv):
        for timeout in (0, None, 1):
            with raises(fmap.EndOfStream, winerror=ERROR_BROKEN_PIPE) as info:
                recv(timeout=timeout)
            assert isinstance(info.value, EOFError)


def test_recv_many_drains_then_ends(closer):
    ch = make(closer, capacity=16)
    other = closer(pickle.loads(pickle.dumps(ch)))
    ch.send_many([b"1", b"2", b"3"])
    ch.close()
    assert other.recv_many(timeout=0) == [b"1", b"2", b"3"]
    with raises(fmap.EndOfStream):
        other.recv_many(timeout=0)


def test_iteration_until_end_of_stream(closer):
    rx = make(closer, capacity=16)
    tx = pickle.loads(pickle.dumps(rx))
    tx.send_many([b"x", b"y", b"z"])
    with tx:
        pass                                        # `with ch:` closes: end of stream
    assert tx.closed and rx.ended
    assert list(rx) == [b"x", b"y", b"z"]
    assert list(rx) == []


def test_iteration_blocks_until_messages(closer):
    rx = make(closer)
    tx = pickle.loads(pickle.dumps(rx))

    def produce():
        for i in range(20):
            tx.send(bytes([i]))
            time.sleep(0.002)
        tx.close()

    bg = Background(produce)
    assert list(rx) == [bytes([i]) for i in range(20)]
    bg.result()


def test_close_is_idempotent_and_closed_handle_refuses(closer):
    ch = fmap.Channel.create(None, 4, message_size=8)
    ch.close()
    ch.close()
    ch.detach()
    assert ch.closed and "closed" in repr(ch)
    for call in (lambda: ch.send(b"x"), ch.recv, ch.recv_many, lambda: ch.reserve(1),
                 ch.receive, lambda: ch.send_array([1]), ch.recv_array,
                 lambda: ch.send_many([b"x"]), lambda: len(ch), lambda: ch.ended,
                 ch.stats, lambda: pickle.dumps(ch), ch.__enter__, lambda: next(iter(ch))):
        with raises(ValueError, winerror=ERROR_INVALID_HANDLE, match="closed"):
            call()


def test_detach_leaves_the_stream_open(closer, name):
    a = fmap.Channel.create(name, 4, message_size=8)
    b = make(closer, name)
    a.send(b"before")
    a.detach()
    assert a.closed and not b.ended
    b.send(b"after")
    assert b.recv(timeout=0) == b"before" and b.recv(timeout=0) == b"after"
    with raises(TimeoutError):
        b.recv(timeout=0)
    # a with block on a detached-then-reopened handle still ends the stream
    with fmap.Channel.open(name) as c:
        c.send(b"last")
    assert b.ended and b.recv(timeout=0) == b"last"
    with raises(fmap.EndOfStream):
        b.recv(timeout=0)


def test_close_wakes_blocked_receivers_and_senders(closer, name):
    rx = make(closer, name, capacity=1)
    tx = make(closer, name)
    rx.spin = tx.spin = 0
    receivers = [Background(lambda: rx.recv(timeout=WAIT)) for _ in range(3)]
    time.sleep(0.1)
    closing = fmap.Channel.open(name)
    t0 = time.monotonic()
    closing.close()
    for bg in receivers:
        with raises(fmap.EndOfStream):
            bg.result()
    assert time.monotonic() - t0 < 2.0

    # a sender blocked on a full channel gets BrokenPipeError
    full = fmap.Channel.create(None, 1, message_size=8)
    other = closer(pickle.loads(pickle.dumps(full)))
    full.send(b"x")
    sender = Background(lambda: other.send(b"y", timeout=WAIT))
    time.sleep(0.1)
    t0 = time.monotonic()
    full.close()
    with raises(BrokenPipeError, winerror=ERROR_NO_DATA):
        sender.result()
    assert time.monotonic() - t0 < 2.0
    assert other.recv(timeout=0) == b"x"


def test_close_own_handle_while_a_thread_waits(closer):
    ch = fmap.Channel.create(None, 2, message_size=8)
    bg = Background(lambda: ch.recv(timeout=WAIT))
    time.sleep(0.1)
    t0 = time.monotonic()
    ch.close()
    with pytest.raises((fmap.EndOfStream, ValueError)):
        bg.result()
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("call", ["receive", "recv_array", "reserve"])
@pytest.mark.parametrize("end", ["close", "detach"])
def test_a_claim_that_wakes_after_its_handle_closed(call, end):
    # The waiting thread's claim succeeds, but before it has the GIL back
    # the main thread closes the handle: the Message must come from the
    # mapping the call holds, not from the handle (a segfault, once).  In a
    # child, so that a crash fails this test only.
    from children import run_python
    code = f"""
import threading, time, fmap
ch = fmap.Channel.create(capacity=1, message_size=16)
ch.spin = 0
out = []
def wait():
    try:
        out.append(ch.{call}(*((3,) if "{call}" == "reserve" else ()), timeout=10))
    except BaseException as e:
        out.append(e)
if "{call}" == "reserve":
    ch.send(b"full")
t = threading.Thread(target=wait)
t.start()
time.sleep(0.3)             # asleep in the futex by now
if "{call}" == "reserve":
    ch.recv()               # frees the slot; this thread keeps the GIL...
else:
    ch.send(b"abc")         # wakes the waiter; this thread keeps the GIL...
ch.{end}()                  # ...and closes the handle first
t.join(10)
r = out[0]
if "{call}" == "reserve":
    if isinstance(r, BrokenPipeError):
        print("closed")
    else:
        with r:
            r[:] = b"new"
        print("reserved")
else:
    print(bytes(r if "{call}" == "recv_array" else r.tobytes()))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr.decode()
    want = {"receive": b"b'abc'", "recv_array": b"b'abc'",
            "reserve": b"closed" if end == "close" else b"reserved"}[call]
    assert done.stdout.strip() == want


def test_message_reserved_before_close_is_delivered(closer, name):
    tx = make(closer, name)
    rx = make(closer, name)
    buf = tx.reserve(5)
    fmap.Channel.open(name).close()                 # the stream ends meanwhile
    buf[:] = b"final"
    with buf:
        pass
    assert rx.recv(timeout=WAIT) == b"final"
    with raises(fmap.EndOfStream):
        rx.recv(timeout=0)


# ---- len, ended, stats, spin, repr ---------------------------------------------

def test_len_and_stats(closer):
    ch = make(closer, capacity=8)
    st = ch.stats()
    assert st == {"sent": 0, "taken": 0, "pending": 0, "ended": False, "processes": 1,
                  "producers_sleeping": 0, "consumers_sleeping": 0}
    ch.send_many([b"1", b"2", b"3"])
    assert len(ch) == 3
    ch.recv(timeout=0)
    assert len(ch) == 2
    st = ch.stats()
    assert (st["sent"], st["taken"], st["pending"]) == (3, 1, 2)
    ch.recv_many(timeout=0)
    assert len(ch) == 0 and ch.stats()["taken"] == 3


def test_stats_counts_processes_not_handles(closer, name):
    a = make(closer, name)
    b = closer(fmap.Channel.open(name))
    c = closer(pickle.loads(pickle.dumps(a)))
    for h in (a, b, c):
        assert h.stats()["processes"] == 1, h.stats()


def test_participant_records_run_out_with_a_clear_error(closer, name):
    a = make(closer, name, capacity=2, message_size=8)
    handles = []
    try:
        for _ in range(fmap._fmap.CHANNEL_MAX_PROCESSES + 8):
            handles.append(fmap.Channel.open(name))
    except OSError as exc:
        assert isinstance(exc.winerror, int)
        assert "participant" in str(exc) and "registry of names" not in str(exc), str(exc)
    finally:
        for h in handles:
            h.detach()
    assert a.stats()["processes"] == 1


@pytest.mark.parametrize("spin", [None, 1e5])
def test_a_spinning_waiter_goes_to_sleep(closer, spin):
    # The spin is bounded, by default and when set: after it, the waiter
    # sleeps on the futex (a waiter that spun to its deadline would pass
    # every other test).
    ch = make(closer, capacity=1)
    if spin is not None:
        ch.spin = spin
    bg = Background(lambda: ch.recv(timeout=WAIT))
    assert poll(lambda: ch.stats()["consumers_sleeping"] == 1, WAIT)
    ch.send(b"wake")
    assert bg.result() == b"wake"
    ch.send(b"x")
    bg = Background(lambda: ch.send(b"y", timeout=WAIT))
    assert poll(lambda: ch.stats()["producers_sleeping"] == 1, WAIT)
    assert ch.recv(timeout=0) == b"x"
    bg.result()


@pytest.mark.parametrize("spin", [None, 0, 200])
def test_an_idle_wait_uses_almost_no_cpu(closer, spin):
    # It spins for its budget (default or set, in microseconds), then sleeps:
    # half a second of waiting costs a few milliseconds of CPU at most.  A
    # wait that spun on would take a whole slice (50 ms) or more.
    ch = make(closer)
    if spin is not None:
        ch.spin = spin
    for call in (lambda: ch.recv(timeout=0.5), lambda: ch.send_many([b"x"] * 9, timeout=0.5)):
        t0 = time.thread_time()
        with raises(TimeoutError):
            call()
        used = time.thread_time() - t0
        assert used < 0.025, f"{used * 1e3:.1f} ms of CPU"
    assert ch.recv_many(timeout=0) == [b"x"] * 8


@pytest.mark.parametrize("side", ["send", "recv", "recv_many"])
def test_a_large_copy_releases_the_gil(closer, side):
    # A 256 MiB message takes tens of milliseconds to copy.  With a switch
    # interval of seconds, this thread gets the GIL back during the copy
    # only if the copying thread lets it go; otherwise only once it is done.
    import sys
    import threading
    big = np.full(256 << 20, 7, np.uint8)
    ch = make(closer, capacity=1, message_size=big.nbytes)
    if side != "send":
        ch.send(big)
    done = []
    call = {"send": lambda: ch.send(big), "recv": ch.recv,
            "recv_many": lambda: ch.recv_many(1)}[side]
    old = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    try:
        worker = threading.Thread(target=lambda: done.append(call()))
        worker.start()
        time.sleep(0.01)           # the worker takes the GIL and starts copying
        copying = not done
    finally:
        sys.setswitchinterval(old)
        worker.join(WAIT)
    assert copying, "the GIL came back only after the copy"
    assert done
    if side == "recv":
        assert len(done[0]) == big.nbytes and done[0][-1] == 7


def test_stats_counts_sleepers(closer):
    ch = make(closer)
    ch.spin = 0
    bg = Background(lambda: ch.recv(timeout=WAIT))
    assert poll(lambda: ch.stats()["consumers_sleeping"] == 1, WAIT)
    ch.send(b"wake")
    assert bg.result() == b"wake"
    assert ch.stats()["consumers_sleeping"] == 0

    full = make(closer, capacity=1)
    full.spin = 0
    full.send(b"x")
    bg = Background(lambda: full.send(b"y", timeout=WAIT))
    assert poll(lambda: full.stats()["producers_sleeping"] == 1, WAIT)
    assert full.recv(timeout=0) == b"x"
    bg.result()
    assert full.stats()["producers_sleeping"] == 0


def test_spin(closer, name):
    a = make(closer, name)
    b = closer(fmap.Channel.open(name))
    assert a.spin == b.spin == 50.0
    a.spin = 0
    assert a.spin == 0.0 and b.spin == 50.0        # per handle
    a.spin = 12.5
    assert a.spin == 12.5
    b.spin = None
    assert b.spin == 0.0
    for bad in (-1, float("nan"), 1e30):
        with raises(ValueError, winerror=ERROR_INVALID_PARAMETER, match="spin"):
            a.spin = bad
    for bad in ("1", True, [1]):
        with pytest.raises(TypeError):
            a.spin = bad
    assert a.spin == 12.5
    # waits work with any spin
    for spin in (0, 1, 1000):
        a.spin = spin
        bg = Background(lambda: a.recv(timeout=WAIT))
        time.sleep(0.01)
        b.send(b"s")
        assert bg.result() == b"s"


def test_an_idle_wait_burns_no_cpu(closer):
    # It spins for at most `spin` microseconds, then sleeps on the futex.
    ch = make(closer)
    assert ch.spin == 50.0
    t0 = time.process_time()
    with raises(TimeoutError, winerror=ERROR_TIMEOUT):
        ch.recv(timeout=0.5)
    assert time.process_time() - t0 < 0.1


def test_a_slow_pipeline_soon_stops_spinning(closer):
    # Messages 3 ms apart with a spin of 1 ms: every wait outlasts the spin,
    # so the budget halves at each one and the consumer soon goes straight to
    # the futex.  150 messages then cost the consumer about 1 ms of spinning
    # in all, and a wake-up each; a budget that never shrank would spin 1 ms
    # per message, 150 ms.
    n = 150
    ch = make(closer, capacity=8)
    ch.spin = 1000

    def produce():
        for i in range(n):
            time.sleep(0.003)
            ch.send(i.to_bytes(4, "little"))

    producer = Background(produce)
    t0 = time.thread_time()
    got = [int.from_bytes(ch.recv(timeout=WAIT), "little") for _ in range(n)]
    used = time.thread_time() - t0
    producer.result()
    assert got == list(range(n))
    assert used < 0.05, f"{used * 1e3:.1f} ms of CPU for {n} waits"


def _busy_pipeline_sleeps(ch, n):
    """(consumer, producer) voluntary context switches while n messages go
    through ch, the consumer stopping for 20 us every 1024."""
    import resource
    pid = os.fork()
    if pid == 0:
        try:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            msg = bytes(64)
            for _ in range(n):
                ch.send(msg)
            ch.send(int(resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
                        - before).to_bytes(8, "little"))
        finally:
            os._exit(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    for i in range(n):
        ch.recv(timeout=WAIT)
        if i % 1024 == 1023:
            t = time.perf_counter() + 20e-6
            while time.perf_counter() < t:
                pass
    consumer = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before
    producer = int.from_bytes(ch.recv(timeout=WAIT), "little")
    wait_pid(pid)
    return consumer, producer


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="a busy pipeline needs its two processes on two CPUs")
def test_a_busy_pipeline_does_not_sleep(closer):
    # A consumer that stops for a while every 1024 messages (as one checking
    # a batch does) and a producer waiting on it: the spin budget covers the
    # pauses, so neither sleeps (enters the kernel) more than now and then.
    # ~195 pauses: a budget that follows only the last (short) wait sleeps
    # through nearly every one of them, every time.  A host that stops this
    # machine's CPUs for a while can push one run past the bound, so the best
    # of three counts.
    ch = make(closer, capacity=256, message_size=64)
    runs = []
    for _ in range(3):
        runs.append(_busy_pipeline_sleeps(ch, 200_000))
        if max(runs[-1]) < 40:
            break
    assert max(runs[-1]) < 40, runs


def test_repr(closer, name):
    ch = make(closer, name, capacity=5, message_size=100)
    r = repr(ch)
    assert r.startswith("<fmap.Channel") and name in r
    assert "capacity=8" in r and "message_size=100" in r and "pending=0" in r
    assert "created=True" in r and "open" in r and "ended" not in r
    ch.send_many([b"1", b"2"])
    assert "pending=2" in repr(ch)
    other = closer(fmap.Channel.open(name))
    assert "created=False" in repr(other)
    other.close()
    assert "ended" in repr(ch) and "closed" in repr(other)
    u = make(closer)
    assert "unnamed" in repr(u)


# ---- lifetime -----------------------------------------------------------------

def test_name_goes_with_the_last_handle(closer, name):
    a = fmap.Channel.create(name, 4, message_size=8)
    b = fmap.Channel.open(name)
    a.send(b"kept")
    a.detach()
    c = fmap.Channel.open(name)                     # b still holds the name
    assert c.recv(timeout=0) == b"kept"
    b.detach()
    c.detach()
    with raises(FileNotFoundError, winerror=ERROR_FILE_NOT_FOUND):
        fmap.Channel.open(name)
    d = make(closer, name, capacity=2)              # a new object: empty, open
    assert d.created and d.capacity == 2 and len(d) == 0 and not d.ended
    with raises(TimeoutError):
        d.recv(timeout=0)


def test_close_frees_the_name_too(closer, name):
    with fmap.Channel.create(name, 4, message_size=8) as ch:
        ch.send(b"x")
    with raises(FileNotFoundError):
        fmap.Channel.open(name)
    again = make(closer, name)
    assert again.created and not again.ended and len(again) == 0


def test_memory_goes_with_the_last_holder(name):
    ch = fmap.Channel.create(name, 4, message_size=4096)
    ch.send(b"held")
    msg = ch.receive(timeout=0)
    ch.send(b"reserved-later")
    w = ch.reserve(4)
    assert channel_maps(name) == 1
    ch.close()
    assert channel_maps(name) == 1                  # Messages in hand keep it mapped
    assert msg.tobytes() == b"held"
    w[:] = b"abcd"
    with w:
        pass                                        # sent into a channel nobody holds
    with msg:
        pass
    del msg, w
    gc.collect()
    assert channel_maps(name) == 0


def test_unnamed_channel_memory_goes_with_the_handle():
    before = channel_maps("")
    ch = fmap.Channel.create(None, 4, message_size=64)
    assert channel_maps("") == before + 1
    ch.close()
    assert channel_maps("") == before


# ---- pickling ------------------------------------------------------------------

def test_pickle_named(closer, name):
    ch = make(closer, name)
    copy = closer(pickle.loads(pickle.dumps(ch)))
    assert copy.name == name and not copy.created and copy.capacity == ch.capacity
    ch.send(b"via pickle")
    assert copy.recv(timeout=0) == b"via pickle"


def test_pickle_unnamed(closer):
    ch = make(closer, capacity=4, message_size=32)
    copy = closer(pickle.loads(pickle.dumps(ch)))
    assert copy.name is None and copy.capacity == 4 and copy.message_size == 32
    copy.send(b"back")
    assert ch.recv(timeout=0) == b"back"


def test_pickle_of_a_channel_whose_name_was_reused(name):
    ch = fmap.Channel.create(name, 4, message_size=8)
    data = pickle.dumps(ch)
    ch.close()
    with fmap.Channel.create(name, 4, message_size=8) as other:
        assert other.created
        with raises(FileNotFoundError, winerror=ERROR_FILE_NOT_FOUND, match="gone"):
            pickle.loads(data)


# ---- threads ------------------------------------------------------------------

def test_threads_exactly_once(closer):
    ch = make(closer, capacity=16, message_size=16)
    producers, per = 3, 3000
    results = [[] for _ in range(2)]

    def produce(p):
        for i in range(per):
            ch.send(p.to_bytes(4, "little") + i.to_bytes(4, "little"), timeout=WAIT)

    def consume(out):
        while True:
            try:
                for m in ch.recv_many(max_count=7, timeout=WAIT):
                    out.append((int.from_bytes(m[:4], "little"), int.from_bytes(m[4:], "little")))
            except fmap.EndOfStream:
                return

    cons = [Background(lambda out=out: consume(out)) for out in results]
    prods = [Background(lambda p=p: produce(p)) for p in range(producers)]
    for bg in prods:
        bg.result(60)
    closer(pickle.loads(pickle.dumps(ch))).close()
    for bg in cons:
        bg.result(60)
    everything = results[0] + results[1]
    assert len(everything) == producers * per
    assert sorted(everything) == [(p, i) for p in range(producers) for i in range(per)]
    for out in results:                              # each producer's order, per consumer
        for p in range(producers):
            seqs = [i for q, i in out if q == p]
            assert seqs == sorted(seqs)


# ---- fork ---------------------------------------------------------------------

def test_unnamed_channel_across_fork(closer):
    to_child = make(closer, capacity=4, message_size=64)
    to_parent = make(closer, capacity=4, message_size=64)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for i in range(200):
                m = to_child.recv(timeout=WAIT)
                to_parent.send(m + b"!", timeout=WAIT)
            if to_child.stats()["processes"] == 2:
                code = 0
            to_parent.send(b"bye")
        finally:
            os._exit(code)
    for i in range(200):
        to_child.send(str(i).encode(), timeout=WAIT)
        assert to_parent.recv(timeout=WAIT) == str(i).encode() + b"!"
    assert to_parent.recv(timeout=WAIT) == b"bye"
    assert wait_pid(pid, 30) == 0
    assert poll(lambda: to_child.stats()["processes"] == 1)


def test_messages_in_hand_across_fork(closer):
    # A forked child's copies of the parent's Messages never give back or
    # send the parent's slots.
    ch = make(closer, capacity=2, message_size=16)
    ch.send(b"held")
    r = ch.receive(timeout=0)
    w = ch.reserve(4)
    w[:] = b"mine"
    pid = os.fork()
    if pid == 0:
        try:
            del r, w
            gc.collect()
        finally:
            os._exit(0)
    assert wait_pid(pid, 30) == 0
    assert r.tobytes() == b"held" and r.in_hand and w.in_hand
    with raises(TimeoutError):
        ch.recv(timeout=0)                           # the child did not send w
    with raises(TimeoutError):
        ch.send(b"x", timeout=0)                     # nor give back r's slot
    with w:
        pass
    with r:
        pass
    assert ch.recv(timeout=0) == b"mine"


def test_a_forked_child_cannot_use_or_send_the_parents_reservation(closer):
    # fork() inside `with ch.reserve()`: the child leaving the block must not
    # commit the parent's slot (twice committed, the ring jammed for all).
    ch = make(closer, capacity=1, message_size=16)
    with ch.reserve(5) as buf:
        buf[:] = b"hello"
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                try:
                    buf[:] = b"child"
                except ValueError as e:
                    code += "before a fork" in str(e)
                try:
                    buf.__exit__(None, None, None)
                except ValueError:
                    code += 1
            finally:
                os._exit(code)
        assert wait_pid(pid, 30) == 3
        with raises(TimeoutError):
            ch.recv(timeout=0)               # not sent by the child
    assert ch.recv(timeout=0) == b"hello"    # sent once, by the parent
    for i in range(3):                       # and the ring goes on
        ch.send(b"%d" % i, timeout=0)
        assert ch.recv(timeout=0) == b"%d" % i


# ---- arguments that change under a call (helper 44's crash hunt)

CHANGED_UNDER_A_CALL = """
import os, numpy as np, fmap

ch = fmap.Channel.create(None, capacity=64, message_size=4096)

class Hook(float):
    # a timeout whose conversion runs code: what another thread could do
    # while a send waits for a slot
    def __new__(cls, act):
        self = super().__new__(cls, 5.0)
        self.act = act
        return self
    def __float__(self):
        self.act()
        return 5.0

msgs = [b"a", b"b", b"c", b"d"]
try:
    ch.send_many(msgs, timeout=Hook(msgs.clear))
except RuntimeError as e:
    print("send_many RuntimeError", e.sent, flush=True)
msgs = [b"a", b"b", b"c", b"d"]
print("send_many", ch.send_many(msgs, timeout=Hook(lambda: msgs.append(b"e"))), flush=True)
print("got", ch.recv_many(10), flush=True)

arr = np.arange(16, dtype=np.int64).reshape(4, 4)
def flatten():
    arr.shape = (16,)
ch.send_array(arr, timeout=Hook(flatten))
got = ch.recv_array()
print("array", got.shape, bool((got.ravel() == np.arange(16)).all()), flush=True)
del got

m = fmap.Message.__new__(fmap.Message)
for act in (repr, bytes):
    try:
        act(m)
        print("bare", act.__name__, "ok", flush=True)
    except ValueError as e:
        print("bare", act.__name__, e.winerror, flush=True)

ch.send(b"hello")
with ch.receive() as msg:
    a = msg.asarray()
    pid = os.fork()
    if pid == 0:
        try:
            memoryview(a.base)
            print("child buffer", flush=True)
        except BufferError:
            print("child BufferError", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    del a
"""


def test_what_changes_under_a_call_does_not_crash_it():
    # Each of these read freed or out-of-bounds memory (SIGSEGV, or garbage
    # taken for objects): send_many indexed the caller's list by the length
    # it had at the start; send_array took the array's ndim before the wait
    # and its shape after; a Message made by Message.__new__ read its
    # channel's name through None; a forked child's buffer of an inherited
    # message array was over NULL.
    out = run_python(CHANGED_UNDER_A_CALL)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split("\n")[:-1] == [
        "send_many RuntimeError 0", "send_many 4", "got [b'a', b'b', b'c', b'd']",
        "array (4, 4) True",
        "bare repr ok", "bare bytes 6",
        "child BufferError"]


def test_objects_made_by_new_alone_give_clear_errors(closer):
    # __init__ refuses, __new__ cannot: what it makes is closed, not broken.
    for cls in (fmap.Channel, fmap.Mapping, fmap.Event, fmap.Mutex, fmap.Semaphore):
        h = cls.__new__(cls)
        assert "closed" in repr(h)
        with raises(ValueError, winerror=ERROR_INVALID_HANDLE):
            h.__enter__()
        h.close()
    with raises(ValueError, winerror=ERROR_INVALID_HANDLE):
        len(fmap.Channel.__new__(fmap.Channel))
    ch = make(closer)
    ch.send(b"x")
    with ch.receive() as msg:
        lent = type(msg.asarray().base)
    with pytest.raises(BufferError):
        memoryview(lent())
