"""fmap.Channel between real processes: multiprocessing (fork and spawn),
pools, and plain subprocesses.

Every message carries (producer, sequence number, crc32 of its payload) and
every one is accounted for: delivered once, intact, each producer's in order
at each consumer.  Also: close() reaching blocked consumers and producers in
other processes, pickled channels in ProcessPoolExecutor and Pool workers,
Ctrl-C in a blocked recv()/send(), timeouts, and the process count of stats().

Every join and every wait in a child is bounded; what a failed test leaves
alive is killed in its finally (or by the children fixture).
"""
import json
import multiprocessing as mp
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

import fmap
from children import SIGINT_RAISES, children, join_all, poll, reap  # noqa: F401 - fixture

ERROR_BROKEN_PIPE = 109
ERROR_NO_DATA = 232
ERROR_TIMEOUT = 1460

T = 30.0          # the bound on any one wait in a child
JOIN = 60.0

# A numbered message: producer, sequence number, crc32 of the payload, and
# how it was sent (which also says what shape recv_array must give it).
HEADER = struct.Struct("<IIII")
SEND, SEND_MANY, RESERVE, ARRAY_U8, ARRAY_I4 = range(5)
EMPTY_EVERY = 97   # an empty message (no header at all) before every 97th numbered one


def start_all(procs):
    for p in procs:
        p.start()


def channel_for(named, name, capacity, message_size):
    return fmap.Channel.create(name if named else None, capacity, message_size=message_size)


# ---- exactly once, in order, intact ---------------------------------------

def _numbered(rng, producer, seq, how, message_size):
    room = message_size - HEADER.size
    r = rng.random()
    if r < 0.1:
        n = room                      # exactly message_size in all
    elif r < 0.15:
        n = 0
    else:
        n = rng.randrange(room)
    if how == ARRAY_I4:
        n -= n % 16                   # whole rows of 4 int32
    payload = rng.randbytes(n)
    return HEADER.pack(producer, seq, zlib.crc32(payload), how) + payload


def _produce(ch, producer, count, message_size, seed, copy=None, start=None):
    rng = random.Random(seed)
    if start is not None:
        start.wait(JOIN)
    if copy is not None:
        fmap._fmap._channel_copy_choice(ch, force=copy)
    seq = 0
    while seq < count:
        how = rng.randrange(5)
        if how == SEND_MANY:
            batch = []
            # Longer than the capacity at times: send_many waits for room mid-batch.
            for _ in range(min(rng.randint(2, 20), count - seq)):
                if seq % EMPTY_EVERY == 0:
                    batch.append(b"")
                batch.append(_numbered(rng, producer, seq, how, message_size))
                seq += 1
            sent = ch.send_many(batch, timeout=T)
            assert sent == len(batch), (sent, len(batch))
            continue
        if seq % EMPTY_EVERY == 0:
            way = seq // EMPTY_EVERY % 3
            if way == 0:
                ch.send(b"", timeout=T)
            elif way == 1:
                with ch.reserve(0, timeout=T):
                    pass
            else:
                ch.send_array(np.empty(0, np.uint8), timeout=T)
        msg = _numbered(rng, producer, seq, how, message_size)
        if how == SEND:
            ch.send(bytearray(msg), timeout=T)
        elif how == RESERVE:
            with ch.reserve(len(msg), timeout=T) as buf:
                buf[:HEADER.size] = msg[:HEADER.size]
                buf[HEADER.size:] = msg[HEADER.size:]
        elif how == ARRAY_U8:
            ch.send_array(np.frombuffer(msg, np.uint8), timeout=T)
        else:
            ch.send_array(np.frombuffer(msg, "<i4").reshape(-1, 4), timeout=T)
        seq += 1
    if copy == "choose":
        # Enough was copied for the choice to have tried the other kind of
        # stores at least once (a trial ends with `left` set past its start).
        nt, phase, left, backoff = fmap._fmap._channel_copy_choice(ch)
        assert nt or phase != "use" or left > 3, (nt, phase, left, backoff)


class Tally:
    """What one consumer received: (producer, seq) in arrival order, empty
    messages, and anything wrong with a message."""

    def __init__(self):
        self.got = []
        self.empties = 0
        self.errors = []

    def check(self, data, array=None):
        """data: the message's bytes (any buffer); array: what recv_array gave."""
        if len(data) == 0:
            self.empties += 1
            if array is not None and (array.dtype != np.uint8 or array.shape != (0,)):
                self.errors.append(f"empty message as {array.dtype} {array.shape}")
            return
        if len(data) < HEADER.size:
            self.errors.append(f"a message of {len(data)} bytes")
            return
        producer, seq, crc, how = HEADER.unpack_from(data)
        if zlib.crc32(data[HEADER.size:]) != crc:
            self.errors.append(f"crc of ({producer}, {seq}) sent by {how}, {len(data)} bytes")
        if array is not None:
            want = ((np.dtype("<i4"), (len(data) // 16, 4)) if how == ARRAY_I4
                    else (np.dtype(np.uint8), (len(data),)))
            if (array.dtype, array.shape) != want:
                self.errors.append(f"({producer}, {seq}) came as {array.dtype} {array.shape}, "
                                   f"not {want}")
        self.got.append((producer, seq))


def _consume(ch, out_path, seed, start=None):
    rng = random.Random(seed)
    if start is not None:
        start.wait(JOIN)
    tally = Tally()
    end = None
    try:
        while True:
            way = rng.randrange(4)
            if way == 0:
                tally.check(ch.recv(timeout=T))
            elif way == 1:
                for m in ch.recv_many(rng.randint(1, 24), timeout=T):
                    tally.check(m)
            elif way == 2:
                with ch.receive(timeout=T) as buf:
                    with memoryview(buf) as mv:       # read in place
                        tally.check(mv)
            else:
                a = ch.recv_array(timeout=T)
                tally.check(a.tobytes(), a)
                del a
    except fmap.EndOfStream as exc:
        end = exc.winerror
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        tally.errors.append(repr(exc))
    with open(out_path, "wb") as f:
        pickle.dump((tally.got, tally.empties, tally.errors, end), f)


PIPELINES = [
    # producers, consumers, start method, named
    (1, 1, "fork", False),
    (1, 1, "spawn", True),
    (2, 2, "fork", True),
    (2, 2, "spawn", False),
    (4, 1, "fork", False),
    (4, 1, "spawn", True),
]


@pytest.mark.parametrize("producers, consumers, method, named", PIPELINES)
def test_every_message_once_in_order_intact(tmp_path, name, producers, consumers, method, named):
    check_pipeline(tmp_path, name, producers, consumers, method, named, 6000, 600)


@pytest.mark.parametrize("copy", ["streaming", "choose"])
@pytest.mark.parametrize("producers, consumers", [(1, 1), (2, 2)])
def test_every_message_intact_whatever_stores_copy_it_in(tmp_path, producers, consumers, copy):
    """Messages of 1 KiB and more are copied in with plain or streaming
    stores (see fmap_chan_copy_in); streaming ones must be complete before
    the message is published.  "choose" switches between the two as it
    times them, mid-stream."""
    check_pipeline(tmp_path, None, producers, consumers, "fork", False, 8000, 6000, copy)


@pytest.mark.parametrize("producers, consumers", [(1, 1), (2, 2), (4, 1)])
def test_every_message_once_in_order_intact_in_a_ring_of_64(tmp_path, producers, consumers):
    # From 64 slots a spinning producer of a full ring waits for 16 free
    # (GATE_SLOTS in channel_linux.c); the other pipelines use 8.
    check_pipeline(tmp_path, None, producers, consumers, "fork", False, 12000, 600,
                   capacity=64)


def check_pipeline(tmp_path, name, producers, consumers, method, named, total, message_size,
                   copy=None, capacity=8):
    ctx = mp.get_context(method)
    per = total // producers
    ch = channel_for(named, name, capacity, message_size)
    outs = [tmp_path / f"consumer{i}" for i in range(consumers)]
    # All start together: spawned one by one, a late consumer could find
    # the stream over, and the check that every one took part would fail.
    start = ctx.Barrier(producers + consumers)
    cons = [ctx.Process(target=_consume, args=(ch, str(out), 100 + i, start))
            for i, out in enumerate(outs)]
    prods = [ctx.Process(target=_produce, args=(ch, p, per, message_size, p, copy, start))
             for p in range(producers)]
    try:
        start_all(cons + prods)
        assert join_all(prods, JOIN) == [0] * producers
        ch.close()                    # the consumers drain, then end
        assert join_all(cons, JOIN) == [0] * consumers
    finally:
        reap(cons + prods)
        ch.close()
    results = [pickle.loads(out.read_bytes()) for out in outs]
    everything = Counter()
    for got, empties, errors, end in results:
        assert errors == []
        assert end == ERROR_BROKEN_PIPE
        everything.update(got)
        for p in range(producers):
            seqs = [s for q, s in got if q == p]
            assert all(a < b for a, b in zip(seqs, seqs[1:])), f"producer {p} out of order"
    dups = [m for m, n in everything.items() if n > 1]
    assert dups == []
    want = {(p, s) for p in range(producers) for s in range(per)}
    assert set(everything) == want, (f"lost {sorted(want - set(everything))[:10]}, "
                                     f"strange {sorted(set(everything) - want)[:10]}")
    empties = sum(r[1] for r in results)
    assert empties == producers * len(range(0, per, EMPTY_EVERY))
    if consumers > 1:                 # a sanity check that both really took part
        assert all(len(r[0]) > 0 for r in results)


# ---- a wake is passed on ---------------------------------------------------------

@pytest.mark.parametrize("between", ["nothing", "a discarded slot", "a withheld slot"])
def test_a_wake_for_a_message_is_passed_on(between):
    # Each publish wakes one sleeper.  Published out of order (p+1, then p),
    # the wake for p+1 goes to a consumer that finds p still being written
    # and sleeps again; the one woken for p must pass a wake on for p+1, or
    # the other consumer sleeps with a message there until its 10 ms dead
    # check.  Also when a slot given back unsent lies between the two (the
    # tail skips it: the wake is for what lies past it).  A liveness check,
    # not a timing one: passed on, the wake takes a fraction of a
    # millisecond; lost, 0-10 ms, 5 on average.
    ch = fmap.Channel.create(None, 8, message_size=16)
    r, w = os.pipe()
    kids = []
    try:
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    ch.spin = 0
                    while True:
                        try:
                            ch.recv(timeout=T)
                        except fmap.EndOfStream:
                            code = 0
                            break
                        os.write(w, struct.pack("d", time.monotonic()))
                        time.sleep(0.1)     # busy with it: this one takes no more
                finally:
                    os._exit(code)
            kids.append(pid)
        late = []
        for _ in range(9):
            assert poll(lambda: ch.stats()["consumers_sleeping"] == 2, T)
            first = ch.reserve(8)
            gap = ch.reserve(8) if between != "nothing" else None
            second = ch.reserve(8)
            if between == "a discarded slot":
                with pytest.raises(KeyError):
                    with gap:
                        raise KeyError
            elif between == "a withheld slot":
                with pytest.raises(BufferError):
                    with gap:
                        view = memoryview(gap)
                view.release()
            with second:
                pass
            time.sleep(0.002)               # its wake is taken: p is not there yet
            assert poll(lambda: ch.stats()["consumers_sleeping"] == 2, T)
            with first:
                pass
            committed = time.monotonic()
            got = [struct.unpack("d", os.read(r, 8))[0] for _ in range(2)]
            late.append(max(got) - committed)
            time.sleep(0.12)                # both idle again
        ch.close()
        assert [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids] == [0, 0]
        kids = []
        late.sort()
        assert late[len(late) // 2] < 0.002, [f"{x * 1e3:.2f} ms" for x in late]
    finally:
        for p in kids:
            os.kill(p, signal.SIGKILL)
            os.waitpid(p, 0)
        os.close(r)
        os.close(w)


# ---- sleepers are woken ------------------------------------------------------

# (who sleeps, what wakes it): the sleeper's call, in a child with spin 0, and
# the parent's action once it sleeps.
WAKES = {
    "send": ("consumer", lambda ch: ch.send(b"m")),
    "send_many": ("consumer", lambda ch: ch.send_many([b"m", b"n"])),
    "reserve": ("consumer", lambda ch: ch.reserve(1).__exit__(None, None, None)),
    "send_array": ("consumer", lambda ch: ch.send_array(np.zeros(2))),
    "close, a consumer": ("consumer", lambda ch: ch.close()),
    "recv": ("producer", lambda ch: ch.recv()),
    "recv_many": ("producer", lambda ch: ch.recv_many()),
    "receive": ("producer", lambda ch: ch.receive().__exit__(None, None, None)),
    "close, a producer": ("producer", lambda ch: ch.close()),
}


@pytest.mark.parametrize("how", sorted(WAKES))
def test_a_sleeper_is_woken_at_once(how):
    # Every publish, give-back and close wakes a sleeper.  One that is not
    # woken still wakes at its next look for a dead claimer or its next
    # slice, so the contract survives a lost wake in all but latency: a
    # liveness check, not a timing one.  Woken, a sleeper is back in a
    # fraction of a millisecond; not woken, 5 ms or more on average.
    who, act = WAKES[how]
    late = []
    for _ in range(7):
        ch = fmap.Channel.create(None, 2, message_size=64)
        if who == "producer":
            ch.send_many([b"a", b"b"])          # full: the child's send sleeps
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ch.spin = 0
                try:
                    if who == "producer":
                        ch.send(b"c", timeout=T)
                    else:
                        ch.recv(timeout=T)
                except (fmap.EndOfStream, BrokenPipeError):
                    pass
                os.write(w, struct.pack("d", time.monotonic()))
                code = 0
            finally:
                os._exit(code)
        try:
            sleeping = "producers_sleeping" if who == "producer" else "consumers_sleeping"
            assert poll(lambda: ch.stats()[sleeping] == 1, T)
            # A sleeper also wakes every 10 ms to look for dead claimers;
            # the poll above runs in step with that, so act at a random
            # point of the period, or a lost wake could look like a prompt one.
            time.sleep(random.uniform(0.001, 0.009))
            acted = time.monotonic()
            act(ch)
            woke = struct.unpack("d", os.read(r, 8))[0]
            late.append(woke - acted)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            pid = 0
        finally:
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(r)
            os.close(w)
            ch.close()
    late.sort()
    assert late[len(late) // 2] < 0.002, [f"{x * 1e3:.2f} ms" for x in late]


# ---- close() across processes ---------------------------------------------

def _drain(ch, out_path):
    got, end = [], None
    try:
        while True:
            got.append(ch.recv(timeout=T))
    except fmap.EndOfStream as exc:
        end = ("EndOfStream", exc.winerror, ch.ended)
        try:
            ch.recv(timeout=T)        # and the end stays
            end += ("again received",)
        except fmap.EndOfStream:
            pass
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        end = (repr(exc),)
    with open(out_path, "wb") as f:
        pickle.dump((got, end), f)


@pytest.mark.parametrize("method, named", [("fork", False), ("spawn", True)])
def test_close_ends_blocked_consumers(tmp_path, name, method, named):
    ctx = mp.get_context(method)
    ch = channel_for(named, name, 8, 64)
    outs = [tmp_path / f"consumer{i}" for i in range(3)]
    procs = [ctx.Process(target=_drain, args=(ch, str(out))) for out in outs]
    try:
        start_all(procs)
        # All three asleep on the empty channel before anything is sent.
        assert poll(lambda: ch.stats()["consumers_sleeping"] == 3, timeout=T), ch.stats()
        sent = [b"m%d" % i for i in range(20)]
        for m in sent:                # more than the capacity: waits for the consumers
            ch.send(m, timeout=T)
        ch.close()
        assert join_all(procs, 20) == [0] * 3
    finally:
        reap(procs)
        ch.close()
    results = [pickle.loads(out.read_bytes()) for out in outs]
    for got, end in results:
        assert end == ("EndOfStream", ERROR_BROKEN_PIPE, True)
        assert got == sorted(got, key=sent.index)     # one producer: its order
    received = [m for got, _ in results for m in got]
    assert sorted(received) == sorted(sent)


def _blocked_send(ch):
    try:
        ch.send(b"late")
    except BrokenPipeError as exc:
        os._exit(0 if exc.winerror == ERROR_NO_DATA and ch.ended else 2)
    except BaseException:  # noqa: BLE001 - reported by the exit code
        os._exit(3)
    os._exit(1)                       # sent on a closed channel


@pytest.mark.parametrize("method, named", [("fork", True), ("spawn", False)])
def test_close_breaks_senders_blocked_in_other_processes(name, method, named):
    ctx = mp.get_context(method)
    ch = channel_for(named, name, 4, 64)
    reader = pickle.loads(pickle.dumps(ch))     # a second handle, to drain after close()
    try:
        for i in range(4):
            ch.send(b"before %d" % i, timeout=0)
        procs = [ctx.Process(target=_blocked_send, args=(ch,)) for _ in range(2)]
        try:
            start_all(procs)
            assert poll(lambda: ch.stats()["producers_sleeping"] == 2, timeout=T), ch.stats()
            ch.close()
            assert join_all(procs, 20) == [0, 0]
        finally:
            reap(procs)
        # What was sent before is still there, the blocked senders' messages are not.
        assert [reader.recv(timeout=T) for _ in range(4)] == [b"before %d" % i for i in range(4)]
        with pytest.raises(fmap.EndOfStream):
            reader.recv(timeout=T)
        assert reader.stats()["producers_sleeping"] == 0
    finally:
        ch.close()
        reader.close()


# ---- pickled channels in pools ----------------------------------------------

RESULT = struct.Struct("<IIi")   # task, part, worker pid


def _pool_task(ch, task, parts):
    for part in range(parts):
        ch.send(RESULT.pack(task, part, os.getpid()), timeout=T)
    ch.detach()                       # close() would end the stream for everyone
    return os.getpid()


def collect(ch, tasks, parts):
    got = [RESULT.unpack(ch.recv(timeout=T)) for _ in range(tasks * parts)]
    assert sorted((t, p) for t, p, _ in got) == [(t, p) for t in range(tasks)
                                                 for p in range(parts)]
    with pytest.raises(TimeoutError):
        ch.recv(timeout=0)            # nothing more
    return {t: pid for t, _, pid in got}


@pytest.mark.parametrize("named", [True, False])
def test_process_pool_executor_workers_send_back(name, named):
    ch = channel_for(named, name, 8, 64)
    tasks, parts = 24, 3              # 72 messages through 8 slots: the parent drains as they go
    ex = ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"))
    ok = False
    try:
        futures = [ex.submit(_pool_task, ch, t, parts) for t in range(tasks)]
        senders = collect(ch, tasks, parts)
        assert [f.result(timeout=T) for f in futures] == [senders[t] for t in range(tasks)]
        assert os.getpid() not in senders.values()
        ok = True
        # Each task's handle went with it (detach()), the workers still live.
        assert poll(lambda: processes(ch) == 1), ch.stats()
    finally:
        if not ok:
            for p in list(getattr(ex, "_processes", {}).values()):
                p.kill()
        ex.shutdown(wait=ok, cancel_futures=True)
        ch.close()


_pool_channel = None


def _pool_init(ch):
    global _pool_channel
    _pool_channel = ch


def _pool_send(task, parts):
    # The worker's one handle, from the initializer: kept open between tasks.
    for part in range(parts):
        _pool_channel.send(RESULT.pack(task, part, os.getpid()), timeout=T)
    return os.getpid()


@pytest.mark.parametrize("named", [True, False])
def test_multiprocessing_pool_workers_send_back(name, named):
    ch = channel_for(named, name, 8, 64)
    tasks, parts = 16, 3
    try:
        with mp.get_context("spawn").Pool(2, _pool_init, (ch,)) as pool:   # terminate() at exit
            res = pool.starmap_async(_pool_send, [(t, parts) for t in range(tasks)])
            senders = collect(ch, tasks, parts)
            assert res.get(timeout=T) == [senders[t] for t in range(tasks)]
            assert poll(lambda: processes(ch) == 3), ch.stats()   # both initialized
        assert poll(lambda: processes(ch) == 1), ch.stats()    # the workers are gone
    finally:
        ch.close()


# ---- Ctrl-C -------------------------------------------------------------------

# Blocked without a timeout; after the interrupt it receives one message and
# sends one, to show the channel still works.
CTRL_C_CHILD = SIGINT_RAISES + """
import sys, time, fmap
ch = fmap.Channel.open({name!r})
try:
    print("waiting", flush=True)
    {call}
except KeyboardInterrupt:
    print("interrupted", time.monotonic(), flush=True)
else:
    print("returned", flush=True)
    sys.exit(1)
sys.stdin.readline()              # the parent has looked at the channel
print("got", ch.recv(timeout=30).decode(), flush=True)
ch.send(b"after", timeout=30)
ch.detach()
"""


@pytest.mark.parametrize("blocked_in", ["recv", "send"])
def test_ctrl_c_interrupts_a_blocked_wait(name, children, blocked_in):
    ch = fmap.Channel.create(name, 2, message_size=64)
    try:
        if blocked_in == "send":
            ch.send(b"a")
            ch.send(b"b")             # full
            call, sleeping = 'ch.send(b"never")', "producers_sleeping"
        else:
            call, sleeping = "ch.recv()", "consumers_sleeping"
        p = children(CTRL_C_CHILD.format(name=name, call=call))
        p.expect("waiting")
        assert poll(lambda: ch.stats()[sleeping] == 1, timeout=T), ch.stats()
        sent = time.monotonic()
        p.proc.send_signal(signal.SIGINT)
        _, when = p.expect("interrupted", timeout=10).split()
        assert float(when) - sent < 1.0
        assert poll(lambda: ch.stats()[sleeping] == 0), ch.stats()
        if blocked_in == "send":
            assert len(ch) == 2       # the interrupted send sent nothing
            assert [ch.recv(timeout=0), ch.recv(timeout=0)] == [b"a", b"b"]
        with pytest.raises(TimeoutError):
            ch.recv(timeout=0)
        ch.send(b"hello", timeout=T)
        p.send("go")
        assert p.expect("got") == "got hello"
        assert ch.recv(timeout=T) == b"after"
        assert p.wait(T) == 0
        st = ch.stats()
        assert st["pending"] == 0 and st["sent"] == st["taken"], st
    finally:
        ch.close()


# ---- timeouts -----------------------------------------------------------------

TIMEOUT_CHILD = """
import json, time, numpy as np, fmap
empty = fmap.Channel.open({empty!r})
full = fmap.Channel.open({full!r})

def timed(fn):
    t0 = time.monotonic()
    try:
        fn()
    except TimeoutError as exc:
        return ["TimeoutError", exc.winerror, time.monotonic() - t0, getattr(exc, "sent", None)]
    except BaseException as exc:
        return [repr(exc), None, time.monotonic() - t0, None]
    return ["returned", None, time.monotonic() - t0, None]

def reserve():
    with full.reserve(8, timeout=0.2):
        pass

def receive():
    with empty.receive(timeout=0.2):
        pass

out = {{
    "recv": timed(lambda: empty.recv(timeout=0.2)),
    "recv_many": timed(lambda: empty.recv_many(4, timeout=0.2)),
    "receive": timed(receive),
    "recv_array": timed(lambda: empty.recv_array(timeout=0.2)),
    "send": timed(lambda: full.send(b"x", timeout=0.2)),
    "send_many": timed(lambda: full.send_many([b"x", b"y"], timeout=0.2)),
    "reserve": timed(reserve),
    "send_array": timed(lambda: full.send_array(np.zeros(3), timeout=0.2)),
}}
print(json.dumps(out), flush=True)
# Now one that the parent satisfies from its process before the timeout.
print("waiting", flush=True)
t0 = time.monotonic()
m = empty.recv(timeout=20)
print("got", m.decode(), time.monotonic() - t0, flush=True)
"""


def test_timeouts_in_another_process(name, children):
    empty = fmap.Channel.create(name + ".e", 4, message_size=64)
    full = fmap.Channel.create(name + ".f", 1, message_size=64)
    try:
        full.send(b"occupied")
        p = children(TIMEOUT_CHILD.format(empty=name + ".e", full=name + ".f"))
        out = json.loads(p.expect("{", timeout=T))
        assert sorted(out) == ["receive", "recv", "recv_array", "recv_many",
                               "reserve", "send", "send_array", "send_many"]
        for op, (what, winerror, elapsed, sent) in out.items():
            assert (what, winerror) == ("TimeoutError", ERROR_TIMEOUT), op
            assert 0.19 <= elapsed < 5, (op, elapsed)
        assert out["send_many"][3] == 0
        p.expect("waiting")
        assert poll(lambda: empty.stats()["consumers_sleeping"] == 1, timeout=T)
        empty.send(b"in-time")
        word, text, elapsed = p.expect("got", timeout=T).split()
        assert text == "in-time" and float(elapsed) < 20
        assert p.wait(T) == 0
        # Nothing was taken or left behind by the waits that timed out.
        assert full.recv(timeout=0) == b"occupied" and len(empty) == 0
        for ch in (empty, full):
            st = ch.stats()
            assert st["consumers_sleeping"] == st["producers_sleeping"] == 0, st
    finally:
        empty.close()
        full.close()


# ---- stats()["processes"] ------------------------------------------------------

HOLDER_CHILD = """
import sys, fmap
ch = fmap.Channel.open({name!r})
print("open", flush=True)
for line in sys.stdin:
    if line.strip() == "detach":
        ch.detach()
        print("detached", flush=True)
"""


def processes(ch):
    return ch.stats()["processes"]


def test_process_count_follows_subprocesses(name, children):
    ch = fmap.Channel.create(name, 4, message_size=64)
    try:
        assert processes(ch) == 1
        kids = [children(HOLDER_CHILD.format(name=name)) for _ in range(3)]
        for k in kids:
            k.expect("open")
        assert processes(ch) == 4
        exits, detaches, killed = kids
        assert exits.finish(T)[0] == 0
        assert poll(lambda: processes(ch) == 3), ch.stats()
        detaches.send("detach")       # alive, but no longer holding it
        detaches.expect("detached")
        assert poll(lambda: processes(ch) == 2), ch.stats()
        os.kill(killed.pid, signal.SIGKILL)
        # Not reaped yet: a zombie holds nothing.
        assert poll(lambda: processes(ch) == 1), ch.stats()
        killed.kill()
        ch.send(b"still works", timeout=0)
        assert ch.recv(timeout=0) == b"still works"
    finally:
        ch.close()


def _hold_and_send(ch):
    ch.send(b"from %d" % os.getpid(), timeout=T)   # a forked child joins when it first claims
    time.sleep(T)                                  # until killed (bounded even so)


@pytest.mark.parametrize("method, named", [("fork", False), ("spawn", True), ("spawn", False)])
def test_process_count_drops_when_children_are_killed(name, method, named):
    ctx = mp.get_context(method)
    ch = channel_for(named, name, 4, 64)
    procs = [ctx.Process(target=_hold_and_send, args=(ch,)) for _ in range(2)]
    try:
        start_all(procs)
        got = sorted(ch.recv(timeout=T) for _ in procs)
        assert got == sorted(b"from %d" % p.pid for p in procs)
        assert poll(lambda: processes(ch) == 3), ch.stats()
        procs[0].kill()
        assert poll(lambda: processes(ch) == 2), ch.stats()
        procs[1].kill()
        assert poll(lambda: processes(ch) == 1), ch.stats()
        assert join_all(procs, T) == [-signal.SIGKILL] * 2
        # The dead processes' records are taken again by new ones.
        again = ctx.Process(target=_hold_and_send, args=(ch,))
        procs.append(again)
        again.start()
        assert ch.recv(timeout=T) == b"from %d" % again.pid
        assert poll(lambda: processes(ch) == 2), ch.stats()
        again.kill()
        assert poll(lambda: processes(ch) == 1), ch.stats()
    finally:
        reap(procs)
        ch.close()


# ---- a child that exits holding a channel ----------------------------------------

QUIET_EXIT = """
import multiprocessing as mp, sys, fmap

def work(ch):
    # concurrent.futures' import changes the order of the child's teardown:
    # the Process object, which holds ch, then outlives fmap's module dict.
    from concurrent.futures import ProcessPoolExecutor  # noqa: F401
    ch.send(b"done", timeout=30)

if __name__ == "__main__":
    ch = fmap.Channel.create(None if sys.argv[1] == "unnamed" else sys.argv[1], 4,
                             message_size=16)
    p = mp.get_context("spawn").Process(target=work, args=(ch,))
    p.start()
    p.join(30)
    assert ch.recv(timeout=0) == b"done" and p.exitcode == 0, p.exitcode
    ch.close()
"""


@pytest.mark.parametrize("named", [True, False])
def test_child_exiting_with_an_open_channel_is_quiet(tmp_path, name, named):
    # The handle still open at the child's exit is closed by its finalizer,
    # which must not fail on the module's cleared globals (it printed "Error in
    # sys.excepthook" on the child's stderr).
    script = tmp_path / "quiet.py"
    script.write_text(QUIET_EXIT)
    proc = subprocess.run([sys.executable, str(script), name if named else "unnamed"],
                          capture_output=True, timeout=T)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode(errors="replace")
