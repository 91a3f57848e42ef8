#!/usr/bin/env python3
"""Channels: fmap.Channel against its peers, between two processes, one run.

    python benchmarks/channel.py [--quick] [--rounds N] [--scale X] [--json PATH]
                                         [--only abcd] [--impls WORDS] [--capacity N]
                                 [--big-capacity N]

a. 64 B, b. 4 KiB and c. 1 MiB messages (1 MiB ones as NumPy float32 arrays of
   262144 items) streamed from a producer process to a consumer process, both
   started with multiprocessing's spawn method: fmap.Channel one at a time
   (send/recv; send_array/recv_array for arrays, recv_array being in place),
   batched (send_many/recv_many) and in place (reserve/receive), against
   multiprocessing.Queue (put/get), multiprocessing.Pipe (send_bytes/
   recv_bytes), faster-fifo (put/get and put_many/get_many) and iceoryx2
   publish/subscribe (the publisher writes into a loaned sample, the
   subscriber reads the received sample in place, busy-polling).
d. a 64 B request/response round trip between two processes: two fmap
   Channels, spinning (the default spin) and sleeping (spin=0), against
   multiprocessing.Pipe and two iceoryx2 services (busy-polling).  The
   sleeping fmap case and the Pipe run again pinned, both processes to one
   CPU and then to two: a sleeping round trip costs mostly what waking a
   process costs where the kernel places it (about 6-17 µs on the waker's
   CPU, 40-50 µs on an idle other one, on this VM).  Unpinned, either pair
   starts a round on one CPU (the parent's go wakes both ends there) and the
   kernel moves one end away within tens of ms (now and then about 0.1 s),
   whatever the transport; a round that follows a busy-polling row starts
   apart.  Timed from the go, a row moved with the row before it; so every
   round trip round starts with 0.2 s untimed (see Timing).  What one wake-up
   costs drifts by tens of percent within a second, and those rows time fmap
   and the Pipe in rounds of their own, half a second apart: a last row
   times both in one client and one server, taking turns in blocks of 100
   round trips (0 1 1 0 and again), so that both see the same placement; it
   shows fmap's median, and beside it the Pipe's, the rounds and the pairs
   of adjacent blocks fmap won.

Every message is verified by its consumer.  Message s (s counts from 0 in
every round) carries s as a little-endian u64 in its first 8 bytes and
s ^ 0x9E3779B97F4A7C15 in its last 8; its body, between them, is one of 7 (3
for 1 MiB) pseudo-random templates picked by s, so a stale or mixed-up body
differs from the expected one.  The consumer checks the length (and, for
arrays, the dtype and shape) and the first and last 8 bytes of every message,
and compares the body of every 64th one (s % 64 == 0) with its template, byte
for byte.  64 B copies are checked in blocks of up to 1024 with NumPy, every
byte of every message: the block, joined, is compared with the bytes it must
be; everything else message by message, in place where the receive path is
in place.  A gap in the sequence counts as lost messages
(the row then says LOSSY, with the count); a repeated or reordered message,
a torn one (head and tail disagree) or a wrong body is an error.  In the
round trip the server checks each request's length, head and tail (a lost,
repeated or torn request is an error) and the client compares each echo
with its request byte for byte.  The producer does the
same for every peer: 64 B messages are built before the round (not timed);
larger ones are taken from a pool of prebuilt buffers whose first and last 8
bytes are overwritten with the sequence number before sending; the in-place
paths (fmap reserve, iceoryx2 loan) write each message into the slot or
sample with one struct pack.

Timing: each case has its own producer and consumer processes, started once
for the whole section; in a, b and c the parent times a round from telling
both to go until both report done, n messages later; in d the client times
its n round trips itself, after 0.2 s of untimed lead-in requests that the
server echoes uncounted, so that every row is timed in the placement it
usually keeps, not in the one the go or the row before left it in.  Two
untimed warm-up rounds set each case's n so that a round (its timed part)
lasts about 0.25 s (0.08 s with --quick; times --scale).  A row is the
median over --rounds timed rounds (7; 3 with --quick) of the time per
message, shown as messages/s and GB/s (payload bytes, 10**9); the cases of a
section run interleaved, round by round, as benchmarks/_common.py does.
Ratios are time per message against the section's first fmap row (lower is
faster).  The figures need both processes on a CPU at once and move with the
machine's load.

Sizes, as measurements on this machine advise: fmap capacity 256 for 64 B
and 4 KiB, 4 for 1 MiB (--capacity and --big-capacity change them).  1 MiB
messages run fastest when the ring and the producer's buffers fit the share
of L3 a process gets: at capacity 8, fmap's array row measured 36-37 k msg/s
against 39-40 k at 4, iceoryx2 27 k at both, faster-fifo 9-10 k against
11-12 k.  The peers get the same bound where they have one (Queue maxsize,
faster-fifo max_size_bytes, iceoryx2 subscriber buffer), the Pipe has the
system's pipe buffer.  Batches are 64 messages (4 for 1 MiB).  Targets (issue
4) are printed beside the figures: 64 B >= 3 M msg/s one at a time and >= 10
M batched, 4 KiB >= 1.5 M msg/s, 1 MiB arrays >= 35 k msg/s, the round trip
under 2 µs spinning and no slower than the Pipe sleeping; beside the last,
how many of the interleaved rounds fmap won against the Pipe's round of the
same time (a sleeping round trip moves by tens of percent from round to
round).  Peers that are not installed are reported as such.

Notes on fairness:
* multiprocessing.Queue.put pickles in a background thread, so its producer
  hands it an immutable copy of a pool buffer (bytes(buf), arr.copy()); no
  other peer needs one.
* faster-fifo runs without pickling (dumps=bytes, loads=bytes: it takes and
  gives only bytes, so buffers and arrays are copied into bytes on put).
* iceoryx2 is made lossless: no safe overflow, the publisher's backpressure
  strategy RetryUntilDelivered, a subscriber buffer of the section's capacity;
  losses would still be counted and shown.  Its files go under a private
  root directory and a prefix of this run's, removed at the end, also on
  failure (those of a run killed with SIGKILL by the next run).
* The spinning cases (fmap's default spin, iceoryx2's polling) keep a CPU
  busy while they wait, as they would in use.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

MAGIC = 0x9E3779B97F4A7C15
BODY_EVERY = 64             # every 64th message has its body compared with its template
BLOCK = 1024                # 64 B copies are checked this many at a time
START_TIMEOUT = 120.0       # a spawned worker must be ready within this
ROUND_TIMEOUT = 120.0       # a round (warm-up or timed) must end within this
WARMUPS = 2                 # untimed rounds: the first from warm_n, the second from its rate
LEAD_S = 0.2                # a round trip's round starts with this long untimed (see _ask)
LEAD_SEQ = (1 << 64) - 1    # the sequence number of a lead-in request
POLL_DEADLINE = 60.0        # a busy-polling iceoryx2 loop gives up after this
SHM_DIR = "/dev/shm"
IOX_DEFAULT_ROOT = "/tmp/iceoryx2"


def _mod(name: str):
    """Peers are imported where they are used: a spawned worker loads only its own."""
    return importlib.import_module(name)


# ------------------------------------------------------------------- sections

@dataclass(frozen=True)
class Section:
    key: str
    title: str
    size: int
    array: bool = False
    capacity: int = 256
    batch: int = 64
    warm_n: int = 20000
    pingpong: bool = False


SECTIONS: Dict[str, Section] = {
    "a": Section("a", "64 B", 64, warm_n=20000),
    "b": Section("b", "4 KiB", 4096, warm_n=10000),
    "c": Section("c", "1 MiB float32", 1 << 20, array=True, capacity=4, batch=4, warm_n=400),
    "d": Section("d", "64 B round trip", 64, capacity=2, batch=1, warm_n=3000, pingpong=True),
}
ARRAY_SHAPE = ((1 << 20) // 4,)


# ---------------------------------------------------------------- verification

class Corrupt(Exception):
    """A message arrived wrong: repeated, reordered, torn or with a bad body."""


class Payload:
    """The messages of a section, built the same way in every process, and
    their checks (see the module docstring)."""

    def __init__(self, sec: Section):
        self.L = L = sec.size
        self.array = sec.array
        self.P = 3 if sec.array else 7
        rnd = random.Random(0xF3A9 + L)
        self.bodies = [rnd.randbytes(L - 16) for _ in range(self.P)]
        # bytearrays: compared with any buffer by memcmp
        self.body_refs = [bytearray(b) for b in self.bodies]
        self.expected_blocks: Dict[int, tuple] = {}
        self.H = struct.Struct("<Q")
        self.HT = struct.Struct(f"<Q{L - 16}xQ")    # first and last 8 bytes
        self.FULL = struct.Struct(f"<Q{L - 16}sQ")  # a whole message, in one pack
        self.lost = 0
        # imported now, not in the first timed round; without NumPy, 64 B
        # copies are checked one by one
        self.np = C.optional_import("numpy")[0] if L == 64 or sec.array else None

    # ---- producer side
    def build(self, s: int) -> bytes:
        return self.FULL.pack(s, self.bodies[s % self.P], s ^ MAGIC)

    def prebuilt(self, n: int) -> List[bytes]:
        pack, bodies, P = self.FULL.pack, self.bodies, self.P
        return [pack(s, bodies[s % P], s ^ MAGIC) for s in range(n)]

    def pool(self, k: int):
        """k buffers (k a multiple of P: buffer j keeps body j % P), to be
        stamped with a sequence number before each send."""
        assert k % self.P == 0
        if self.array:
            np = _mod("numpy")
            return [np.frombuffer(bytearray(self.build(j)), np.float32) for j in range(k)]
        return [bytearray(self.build(j)) for j in range(k)]

    def stamped(self, pool, n: int):
        """The pool's buffers in turn, stamped as messages 0..n-1."""
        pk, K, L8 = self.H.pack_into, len(pool), self.L - 8
        for s in range(n):
            b = pool[s % K]
            pk(b, 0, s)
            pk(b, L8, s ^ MAGIC)
            yield b

    def stamped_batches(self, pool, n: int, B: int):
        """Batches of B consecutive stamped pool buffers (len(pool) % B == 0)."""
        pk, K, L8 = self.H.pack_into, len(pool), self.L - 8
        for s0 in range(0, n, B):
            j = s0 % K
            k = min(B, n - s0)
            for i in range(k):
                pk(pool[j + i], 0, s0 + i)
                pk(pool[j + i], L8, (s0 + i) ^ MAGIC)
            yield pool[j:j + k]

    # ---- consumer side
    def body(self, buf, s: int) -> None:
        if self.body_refs[s % self.P] != memoryview(buf).cast("B")[8:self.L - 8]:
            raise Corrupt(f"message {s}: its body is not its template")

    def one(self, buf, s: int) -> int:
        """The full check of one message when s is expected; the next expected
        sequence number.  A gap is counted as lost; anything else raises."""
        nb = memoryview(buf).nbytes
        if nb != self.L:
            raise Corrupt(f"message {s}: {nb} bytes, expected {self.L}")
        h, t = self.HT.unpack_from(buf)
        if t != h ^ MAGIC:
            raise Corrupt(f"message {s}: first 8 bytes say {h}, last 8 say {t ^ MAGIC} "
                          "(torn or mixed up)")
        if h < s:
            raise Corrupt(f"expected message {s}, got {h} (repeated or reordered)")
        if h - s > 1 << 40:
            raise Corrupt(f"expected message {s}, got garbage ({h})")
        self.lost += h - s
        if h % BODY_EVERY == 0:
            self.body(buf, h)
        return h + 1

    def block(self, msgs, s: int) -> int:
        """Check a list of 64 B copies at once, every byte of every message
        (vectorized); the next expected s."""
        L = self.L
        for i in range(0, len(msgs), BLOCK):
            part = msgs[i:i + BLOCK] if len(msgs) > BLOCK else msgs
            k = len(part)
            joined = b"".join(part)
            if self.np is not None and len(joined) == k * L and self.expected(s, k) == joined:
                s += k
                continue
            for m in part:              # classify: lost, or wrong
                s = self.one(m, s)
                self.body(m, s - 1)
        return s

    def expected(self, s: int, k: int) -> bytearray:
        """The bytes of messages s .. s+k-1 (k <= BLOCK), joined."""
        np, L = self.np, self.L
        phase = s % self.P
        if phase not in self.expected_blocks:
            raw = bytearray(b"".join(self.build(phase + i) for i in range(BLOCK)))
            self.expected_blocks[phase] = (raw, np.frombuffer(raw, "<u8").reshape(BLOCK, L // 8),
                                           np.arange(BLOCK, dtype="<u8"))
        raw, words, index = self.expected_blocks[phase]
        seq = index[:k] + np.uint64(s)
        words[:k, 0] = seq
        words[:k, -1] = seq ^ np.uint64(MAGIC)
        return raw if k == BLOCK else raw[:k * L]

    def array_ok(self, a) -> bool:
        return a.dtype.char == "f" and a.shape == ARRAY_SHAPE and a.flags.c_contiguous


def _drain_copies(get, pay: Payload, n: int, conv=None) -> None:
    """Receive and check n messages, one per get() call (copies: bytes, or
    arrays through conv)."""
    L, HT, M = pay.L, pay.HT.unpack_from, MAGIC
    one, body = pay.one, pay.body
    s = 0
    if pay.array:
        while s < n:
            a = conv(get()) if conv is not None else get()
            if pay.array_ok(a):
                h, t = HT(a)
                if h == s and t == s ^ M:
                    if not s % BODY_EVERY:
                        body(a, s)
                    s += 1
                    continue
                s = one(a, s)
            else:
                raise Corrupt(f"message {s}: not a float32 array of shape {ARRAY_SHAPE}")
    elif L == 64:
        buf: list = []
        app = buf.append
        while s < n:
            for _ in range(min(BLOCK, n - s)):
                app(get())
            s = pay.block(buf, s)
            buf.clear()
    else:
        while s < n:
            m = get()
            if len(m) == L:
                h, t = HT(m)
                if h == s and t == s ^ M:
                    if not s % BODY_EVERY:
                        body(m, s)
                    s += 1
                    continue
            s = one(m, s)


def _drain_lists(get_many, pay: Payload, n: int, conv=None) -> None:
    """Receive and check n messages that come in lists (recv_many, get_many)."""
    L, HT, M = pay.L, pay.HT.unpack_from, MAGIC
    one, body = pay.one, pay.body
    s = 0
    if L == 64 and not pay.array:
        buf: list = []
        while s < n:
            buf += get_many()
            if len(buf) >= BLOCK or s + len(buf) >= n:
                s = pay.block(buf, s)
                buf.clear()
        return
    while s < n:
        for m in get_many():
            if conv is not None:
                m = conv(m)
                if not pay.array_ok(m):
                    raise Corrupt(f"message {s}: not a float32 array of shape {ARRAY_SHAPE}")
            elif len(m) != L:
                s = one(m, s)
                continue
            h, t = HT(m)
            if h == s and t == s ^ M:
                if not s % BODY_EVERY:
                    body(m, s)
                s += 1
            else:
                s = one(m, s)


# ------------------------------------------------------------- implementations
#
# An implementation is opened by the parent (open: the objects its producer
# and consumer processes are given, and how to close them), then each worker
# makes its end from them: an object with prepare(n) (untimed), run(n) and
# close() -> number of unexpected messages left over.

class Impl:
    name = ""
    module: Optional[str] = None     # the peer's import name, for availability

    def open(self, sec: Section, run):
        raise NotImplementedError

    def producer(self, ends, sec: Section):
        return self.Producer(ends, sec)

    def consumer(self, ends, sec: Section):
        return self.Consumer(ends, sec)


class End:
    """Defaults for a worker's end; producers build what they send in
    prepare(), untimed."""

    def __init__(self, sec: Section):
        self.sec = sec
        self.pay = Payload(sec)
        self.msgs = self.bl = self.pool = None
        self.lead = self.pay.build(LEAD_SEQ) if sec.pingpong else None

    def prepare(self, n: int) -> None:
        pass

    def close(self) -> int:
        return 0

    # producer helpers
    def prepare_source(self, n: int, batch: int = 0) -> None:
        """64 B messages are prebuilt (the cheapest to send); larger ones come
        from a pool of buffers stamped as they go."""
        if self.sec.size == 64:
            if self.msgs is None or len(self.msgs) != n:
                self.msgs = self.bl = None
                self.msgs = self.pay.prebuilt(n)
            if batch:
                self.bl = [self.msgs[i:i + batch] for i in range(0, n, batch)]
        elif self.pool is None:
            P = self.pay.P
            self.pool = self.pay.pool(P * batch // math.gcd(P, batch) if batch else P)

    def messages(self, n: int):
        return self.msgs if self.sec.size == 64 else self.pay.stamped(self.pool, n)

    def message_batches(self, n: int, batch: int):
        if self.sec.size == 64:
            return self.bl
        return self.pay.stamped_batches(self.pool, n, batch)


def _fmap_open(sec: Section, run):
    fmap = _mod("fmap")
    ch = fmap.Channel.create(None, sec.capacity, message_size=sec.size)
    return ch, ch, ch.close


class FmapOne(Impl):
    name = "fmap send/recv"

    def open(self, sec, run):
        return _fmap_open(sec, run)

    class Producer(End):
        def __init__(self, ch, sec):
            super().__init__(sec)
            self.ch = ch

        def prepare(self, n):
            self.prepare_source(n)

        def run(self, n):
            send = self.ch.send_array if self.pay.array else self.ch.send
            for m in self.messages(n):
                send(m)

        def close(self):
            self.ch.detach()
            return 0

    class Consumer(End):
        def __init__(self, ch, sec):
            super().__init__(sec)
            self.ch = ch

        def run(self, n):
            if self.pay.array:
                _drain_recv_array(self.ch, self.pay, n)
            else:
                _drain_copies(self.ch.recv, self.pay, n)

        def close(self):
            left = len(self.ch)
            self.ch.detach()
            return left


def _drain_recv_array(ch, pay: Payload, n: int) -> None:
    """recv_array: the array views the slot; dropping it gives the slot back."""
    recv, HT, one, body, ok = ch.recv_array, pay.HT.unpack_from, pay.one, pay.body, pay.array_ok
    s = 0
    while s < n:
        a = recv()
        if not ok(a):
            raise Corrupt(f"message {s}: not a float32 array of shape {ARRAY_SHAPE}")
        h, t = HT(a)
        if h == s and t == s ^ MAGIC:
            if not s % BODY_EVERY:
                body(a, s)
            s += 1
        else:
            s = one(a, s)
        del a


class FmapMany(Impl):
    name = "fmap send_many/recv_many"

    def open(self, sec, run):
        return _fmap_open(sec, run)

    class Producer(FmapOne.Producer):
        def prepare(self, n):
            self.prepare_source(n, self.sec.batch)

        def run(self, n):
            send_many = self.ch.send_many
            for batch in self.message_batches(n, self.sec.batch):
                send_many(batch)

    class Consumer(FmapOne.Consumer):
        def run(self, n):
            recv_many, B = self.ch.recv_many, self.sec.batch
            conv = None
            if self.pay.array:
                np = _mod("numpy")
                f32 = np.float32

                def conv(b):
                    return np.frombuffer(b, f32)
            _drain_lists(lambda: recv_many(B), self.pay, n, conv)


class FmapInPlace(Impl):
    name = "fmap reserve/receive"

    def open(self, sec, run):
        return _fmap_open(sec, run)

    class Producer(FmapOne.Producer):
        def prepare(self, n):
            pass

        def run(self, n):
            # The message is written straight into its slot, in one pack.
            reserve, L = self.ch.reserve, self.pay.L
            pk, bodies, P = self.pay.FULL.pack_into, self.pay.bodies, self.pay.P
            for s in range(n):
                with reserve(L) as buf:
                    pk(buf, 0, s, bodies[s % P], s ^ MAGIC)

    class Consumer(FmapOne.Consumer):
        def run(self, n):
            receive, L, HT = self.ch.receive, self.pay.L, self.pay.HT.unpack_from
            one, body, ok = self.pay.one, self.pay.body, self.pay.array_ok
            s = 0
            if self.pay.array:
                f32 = _mod("numpy").float32
                while s < n:
                    with receive() as buf:
                        a = buf.asarray(f32, ARRAY_SHAPE)
                        if not ok(a):
                            raise Corrupt(f"message {s}: bad array view")
                        h, t = HT(a)
                        if h == s and t == s ^ MAGIC:
                            if not s % BODY_EVERY:
                                body(a, s)
                            s += 1
                        else:
                            s = one(a, s)
                        del a
                return
            while s < n:
                with receive() as buf:
                    if len(buf) == L:
                        h, t = HT(buf)
                        if h == s and t == s ^ MAGIC:
                            if not s % BODY_EVERY:
                                body(buf, s)
                            s += 1
                            continue
                    s = one(buf, s)


class MpQueue(Impl):
    name = "mp.Queue put/get"

    def open(self, sec, run):
        q = run.ctx.Queue(maxsize=sec.capacity)

        def close():
            q.close()
            q.join_thread()
        return q, q, close

    class Producer(End):
        def __init__(self, q, sec):
            super().__init__(sec)
            self.q = q

        def prepare(self, n):
            self.prepare_source(n)

        def run(self, n):
            put = self.q.put
            if self.sec.size == 64:         # immutable bytes: put as they are
                for m in self.msgs:
                    put(m)
                return
            # put() pickles later, in the feeder thread: hand it a copy
            snap = (lambda a: a.copy()) if self.pay.array else bytes
            for m in self.messages(n):
                put(snap(m))

        def close(self):
            self.q.close()
            self.q.join_thread()
            return 0

    class Consumer(End):
        def __init__(self, q, sec):
            super().__init__(sec)
            self.q = q

        def run(self, n):
            _drain_copies(self.q.get, self.pay, n)

        def close(self):
            left = 0
            try:
                while True:
                    self.q.get(timeout=0.05)
                    left += 1
            except Exception:
                pass
            return left


class MpPipe(Impl):
    name = "mp.Pipe send_bytes/recv_bytes"

    def open(self, sec, run):
        if sec.pingpong:
            a, b = run.ctx.Pipe(duplex=True)
        else:
            b, a = run.ctx.Pipe(duplex=False)   # (reader, writer)
        return a, b, lambda: (a.close(), b.close())

    class Producer(End):
        def __init__(self, conn, sec):
            super().__init__(sec)
            self.conn = conn

        def prepare(self, n):
            self.prepare_source(n)

        def run(self, n):
            send = self.conn.send_bytes
            if self.sec.pingpong:
                return _ask(send, self.conn.recv_bytes, self.msgs, self.lead)
            for m in self.messages(n):
                send(m)

        def close(self):
            self.conn.close()
            return 0

    class Consumer(End):
        def __init__(self, conn, sec):
            super().__init__(sec)
            self.conn = conn

        def run(self, n):
            recv = self.conn.recv_bytes
            if self.sec.pingpong:
                _echo(recv, self.conn.send_bytes, self.pay, n)
                return
            conv = None
            if self.pay.array:
                np = _mod("numpy")
                f32 = np.float32

                def conv(b):
                    return np.frombuffer(b, f32)
            _drain_copies(recv, self.pay, n, conv)

        def close(self):
            left = 0
            while self.conn.poll(0.05):
                self.conn.recv_bytes()
                left += 1
            self.conn.close()
            return left


def _ask(send, recv, msgs, lead: bytes) -> int:
    """The round trip's client: LEAD_S of lead-in requests (untimed), then
    each of msgs; every echo compared with its request.  Returns the ns the
    msgs took.

    The lead-in keeps the start of a round out of the figure: the parent's
    go wakes both ends onto one CPU, where a sleeping round trip costs a
    seventh (fmap) to a third (Pipe) of what it costs once the kernel has
    moved one end away (within tens of ms, now and then about 0.1 s,
    whatever the transport), and a round that follows a busy-polling row
    starts apart.  Timed from the start, a row's figure depended on the row
    before it (see the module docstring); after the lead-in every row is
    timed in the placement it usually keeps."""
    clock = time.perf_counter_ns
    end = clock() + int(LEAD_S * 1e9)
    while clock() < end:
        send(lead)
        if recv() != lead:
            raise Corrupt("lead-in: the echo differs from the request")
    t0 = clock()
    for s, m in enumerate(msgs):
        send(m)
        if recv() != m:
            raise Corrupt(f"round trip {s}: the echo differs from the request")
    return clock() - t0


def _is_lead(h: int, t: int, s: int) -> bool:
    """Whether a request of head h and tail t, where request s is due, is a
    lead-in one: only before request 0."""
    return s == 0 and h == LEAD_SEQ and t == LEAD_SEQ ^ MAGIC


def _echo_block(recv, send, pay: Payload, s: int, k: int) -> int:
    """Echo k requests, request s due first: each checked, then sent back.
    Lead-in requests (LEAD_SEQ) are echoed uncounted, only before request
    0.  Returns the request due next."""
    HT = pay.HT.unpack_from
    for _ in range(k):
        m = recv()
        if len(m) == 64:
            h, t = HT(m)
            if h == s and t == s ^ MAGIC:
                s += 1
                send(m)
                continue
            if _is_lead(h, t, s):
                send(m)
                continue
        raise Corrupt(f"request {s}: " + ("lost" if pay.one(m, s) > s + 1 else "wrong"))
    return s


def _echo(recv, send, pay: Payload, n: int) -> None:
    """The round trip's server: n requests after the lead-in.  Each block
    asks for no more than are still due (lead-ins do not count), so it
    never waits for one the client will not send."""
    s = 0
    while s < n:
        s = _echo_block(recv, send, pay, s, n - s)


class FasterFifo(Impl):
    name = "faster-fifo put/get"
    module = "faster_fifo"
    many = False

    def open(self, sec, run):
        ff = _mod("faster_fifo")
        # room for `capacity` messages and their length words
        q = ff.Queue(max_size_bytes=sec.capacity * (sec.size + 64), loads=bytes, dumps=bytes)
        return q, q, q.close

    class Producer(End):
        def __init__(self, q, sec, many):
            super().__init__(sec)
            self.q, self.many = q, many

        def prepare(self, n):
            self.prepare_source(n, self.sec.batch if self.many else 0)

        def run(self, n):
            if self.many:
                put_many = self.q.put_many
                for batch in self.message_batches(n, self.sec.batch):
                    put_many(batch, timeout=POLL_DEADLINE)
                return
            put = self.q.put
            for m in self.messages(n):
                put(m, timeout=POLL_DEADLINE)

    class Consumer(End):
        def __init__(self, q, sec, many):
            super().__init__(sec)
            self.q, self.many = q, many

        def run(self, n):
            conv = None
            if self.pay.array:
                np = _mod("numpy")
                f32 = np.float32

                def conv(b):
                    return np.frombuffer(b, f32)
            if self.many:
                get_many, B = self.q.get_many, self.sec.batch
                _drain_lists(lambda: get_many(timeout=POLL_DEADLINE, max_messages_to_get=B),
                             self.pay, n, conv)
            else:
                get = self.q.get
                _drain_copies(lambda: get(timeout=POLL_DEADLINE), self.pay, n, conv)

        def close(self):
            left = 0
            try:
                while True:
                    self.q.get(timeout=0.05)
                    left += 1
            except Exception:
                pass
            return left

    def producer(self, ends, sec):
        return self.Producer(ends, sec, self.many)

    def consumer(self, ends, sec):
        return self.Consumer(ends, sec, self.many)


class FasterFifoMany(FasterFifo):
    name = "faster-fifo put_many/get_many"
    many = True


# ---- iceoryx2

class Iox:
    """This run's iceoryx2 files: a private root directory (instead of
    /tmp/iceoryx2) and a prefix of this run's on every file it makes there
    and in /dev/shm; sweep() removes them (iceoryx2 leaves some behind even
    after a clean shutdown)."""

    def __init__(self):
        self.prefix = f"iox2_fmb{os.getpid()}_"
        self.root = None

    def params(self):
        if self.root is None:
            self.root = tempfile.mkdtemp(prefix=f"fmb{os.getpid()}_iox2_")
        return self.prefix, self.root + "/"

    def sweep(self) -> None:
        # /tmp/iceoryx2 too, in case a version ignores root_path
        places = [SHM_DIR] + [d for d, _, _ in os.walk(IOX_DEFAULT_ROOT)]
        for d in places:
            try:
                names = [e for e in os.listdir(d) if e.startswith(self.prefix)]
            except OSError:
                continue
            for e in names:
                try:
                    os.unlink(os.path.join(d, e))
                except OSError:
                    pass
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    @staticmethod
    def sweep_dead_runs() -> None:
        """What runs killed with SIGKILL left (their pid is gone)."""
        def dead(pid: str) -> bool:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except OSError:
                pass
            return False
        tmp = tempfile.gettempdir()
        for d, pattern in ((SHM_DIR, r"iox2_fmb(\d+)_"), (tmp, r"fmb(\d+)_iox2_")):
            try:
                entries = os.listdir(d)
            except OSError:
                continue
            for e in entries:
                m = re.match(pattern, e)
                if m and dead(m.group(1)):
                    path = os.path.join(d, e)
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        try:
                            os.unlink(path)
                        except OSError:
                            pass


def _iox_node(params):
    iox = _mod("iceoryx2")
    prefix, root = params
    cfg = iox.config.default()
    cfg.global_cfg.prefix = iox.FileName.new(prefix)
    cfg.global_cfg.root_path = iox.Path.new(root)
    return iox, iox.NodeBuilder.new().config(cfg).create(iox.ServiceType.Ipc)


def _iox_service(iox, node, name: str, sec: Section, create: bool):
    import ctypes
    b = (node.service_builder(iox.ServiceName.new(name))
         .publish_subscribe(iox.Slice[ctypes.c_uint8])
         .enable_safe_overflow(False)               # lossless: the publisher waits
         .subscriber_max_buffer_size(sec.capacity)
         .subscriber_max_borrowed_samples(1)
         .history_size(0)
         .max_publishers(1)
         .max_subscribers(1))
    return b.open_or_create() if create else b.open()


class IoxEnd(End):
    """An iceoryx2 node with one publisher and/or one subscriber."""

    def __init__(self, ends, sec, pub_on=None, sub_on=None):
        super().__init__(sec)
        import ctypes
        self.ctypes = ctypes
        params, names = ends
        self.iox, self.node = _iox_node(params)
        self.services = []
        self.pub = self.sub = None
        if sub_on is not None:
            svc = _iox_service(self.iox, self.node, names[sub_on], sec, False)
            self.services.append(svc)
            self.sub = svc.subscriber_builder().buffer_size(sec.capacity).create()
        if pub_on is not None:
            svc = _iox_service(self.iox, self.node, names[pub_on], sec, False)
            self.services.append(svc)
            self.pub = (svc.publisher_builder().initial_max_slice_len(sec.size)
                        .backpressure_strategy(self.iox.BackpressureStrategy.RetryUntilDelivered)
                        .max_loaned_samples(1).create())
        self.T = ctypes.c_ubyte * sec.size

    def prepare(self, n):
        if self.pub is not None:
            self.pub.update_connections()      # the subscriber exists by now
        if self.sec.pingpong:
            self.prepare_source(n)

    def poll(self):
        """The next sample, busy-polling (bounded)."""
        recv = self.sub.receive
        smp = recv()
        if smp is not None:
            return smp
        deadline = time.monotonic() + POLL_DEADLINE
        k = 0
        while True:
            smp = recv()
            if smp is not None:
                return smp
            k += 1
            if not k & 0xFFFF and time.monotonic() > deadline:
                raise TimeoutError(f"no iceoryx2 sample within {POLL_DEADLINE} s")

    def view(self, smp):
        n = smp.header.number_of_elements
        if n != self.pay.L:
            raise Corrupt(f"a sample of {n} bytes, expected {self.pay.L}")
        return self.T.from_address(smp.payload_ptr)

    def close(self):
        left = 0
        if self.sub is not None:
            while True:
                smp = self.sub.receive()
                if smp is None:
                    break
                smp.delete()
                left += 1
            self.sub.delete()
        if self.pub is not None:
            self.pub.delete()
        self.services = []
        self.node = None
        return left


class Iceoryx2(Impl):
    name = "iceoryx2 loan/receive"
    module = "iceoryx2"

    def open(self, sec, run):
        names = [C.unique_names("iox", 1)[0]]
        iox, node = _iox_node(run.iox.params())
        svc = _iox_service(iox, node, names[0], sec, True)
        ends = (run.iox.params(), names)

        def close():
            nonlocal svc, node
            svc = node = None
            gc.collect()
        return ends, ends, close

    class Producer(IoxEnd):
        def __init__(self, ends, sec):
            super().__init__(ends, sec, pub_on=0)

        def run(self, n):
            # written in place into the loaned sample, in one pack
            loan, T, L = self.pub.loan_slice_uninit, self.T, self.pay.L
            pk, bodies, P = self.pay.FULL.pack_into, self.pay.bodies, self.pay.P
            for s in range(n):
                smp = loan(L)
                pk(T.from_address(smp.payload_ptr), 0, s, bodies[s % P], s ^ MAGIC)
                smp.assume_init().send()

    class Consumer(IoxEnd):
        def __init__(self, ends, sec):
            super().__init__(ends, sec, sub_on=0)

        def run(self, n):
            poll, view, HT = self.poll, self.view, self.pay.HT.unpack_from
            one, body = self.pay.one, self.pay.body
            np = _mod("numpy") if self.pay.array else None
            s = 0
            while s < n:
                smp = poll()
                v = view(smp)
                if np is not None:      # the array a consumer would use, in place
                    v = np.frombuffer(v, np.float32)
                h, t = HT(v)
                if h == s and t == s ^ MAGIC:
                    if not s % BODY_EVERY:
                        body(v, s)
                    s += 1
                else:
                    s = one(v, s)
                del v
                smp.delete()


# ---- round trip

class FmapPingPong(Impl):
    def __init__(self, spin: Optional[float], label: str):
        self.spin = spin
        self.name = label

    def open(self, sec, run):
        fmap = _mod("fmap")
        req = fmap.Channel.create(None, sec.capacity, message_size=sec.size)
        rsp = fmap.Channel.create(None, sec.capacity, message_size=sec.size)
        return (req, rsp, self.spin), (req, rsp, self.spin), lambda: (req.close(), rsp.close())

    class Client(End):
        def __init__(self, ends, sec):
            super().__init__(sec)
            self.req, self.rsp, spin = ends
            if spin is not None:
                self.req.spin = self.rsp.spin = spin

        def prepare(self, n):
            self.prepare_source(n)

        def run(self, n):
            return _ask(self.req.send, self.rsp.recv, self.msgs, self.lead)

        def close(self):
            left = len(self.rsp)
            self.req.detach()
            self.rsp.detach()
            return left

    class Server(Client):
        def prepare(self, n):
            pass

        def run(self, n):
            _echo(self.req.recv, self.rsp.send, self.pay, n)

        def close(self):
            left = len(self.req)
            self.req.detach()
            self.rsp.detach()
            return left

    def producer(self, ends, sec):
        return self.Client(ends, sec)

    def consumer(self, ends, sec):
        return self.Server(ends, sec)


# ---- the sleeping round trip, fmap and the Pipe in one pair of processes
#
# A sleeping round trip costs mostly two wake-ups of an idle CPU, and what
# one costs on this VM drifts by tens of percent within a second as the host
# moves its CPUs about.  The rows above time fmap's and the Pipe's rounds
# apart, each in its own processes, about half a second from each other:
# 7 such pairs cannot tell a gap of a few µs from that drift.  Here one
# client and one server take turns between the two transports in blocks
# of PAIR_BLOCK round trips (about 5 ms), so both see the same placement,
# and each pair of adjacent blocks is one paired sample.

PAIR_BLOCK = 100


def _pair_turn(b: int) -> int:
    """The transport of block b: 0 fmap, 1 the Pipe, in the order 0 1 1 0
    and again, so that neither always goes first in a pair."""
    return (b ^ (b >> 1)) & 1


def _ask_interleaved(ends, msgs, lead: bytes):
    """The interleaved round trip's client: lead-in blocks for LEAD_S
    (untimed), then msgs in blocks on the two transports in turn
    (ends[t] = (send, recv)); every echo compared with its request.
    Returns (ns on fmap, ns on the Pipe, pairs fmap won, pairs)."""
    clock, K = time.perf_counter_ns, PAIR_BLOCK
    n = len(msgs)
    if n % (2 * K):
        raise ValueError(f"{n} round trips are not whole pairs of {K}-blocks")
    b, end = 0, clock() + int(LEAD_S * 1e9)
    while b % 4 or clock() < end:
        send, recv = ends[_pair_turn(b)]
        for _ in range(K):
            send(lead)
            if recv() != lead:
                raise Corrupt("lead-in: the echo differs from the request")
        b += 1
    took, won = [0, 0], 0
    for s in range(0, n, 2 * K):
        d = [0, 0]
        for half in (0, 1):
            t = _pair_turn(b)
            send, recv = ends[t]
            first = s + half * K
            part = msgs[first:first + K]
            t0 = clock()
            for i, m in enumerate(part):
                send(m)
                if recv() != m:
                    raise Corrupt(f"round trip {first + i}: the echo differs from the request")
            d[t] = clock() - t0
            b += 1
        took[0] += d[0]
        took[1] += d[1]
        won += d[0] <= d[1]
    return took[0], took[1], won, n // (2 * K)


def _echo_interleaved(ends, pay: Payload, n: int) -> None:
    """The interleaved round trip's server: blocks of PAIR_BLOCK requests
    from the two transports in the client's turn (ends[t] = (recv, send)),
    each request checked and sent back; lead-in ones (LEAD_SEQ) uncounted,
    only before request 0."""
    s = b = 0
    while s < n:
        recv, send = ends[_pair_turn(b)]
        s = _echo_block(recv, send, pay, s, PAIR_BLOCK)
        b += 1


class Interleaved(Impl):
    """fmap sleeping (spin=0) and the Pipe, taking turns in one client and
    one server (see PAIR_BLOCK).  Its row shows fmap's median; the Pipe's,
    and the pairs fmap won, go in the row's extra."""
    name = "fmap Channel x2, spin=0 (sleeping), interleaved with mp.Pipe"
    unit = 2 * PAIR_BLOCK               # a round is whole pairs of blocks

    def open(self, sec, run):
        fmap = _mod("fmap")
        req = fmap.Channel.create(None, sec.capacity, message_size=sec.size)
        rsp = fmap.Channel.create(None, sec.capacity, message_size=sec.size)
        a, b = run.ctx.Pipe(duplex=True)
        return (req, rsp, a), (req, rsp, b), lambda: (req.close(), rsp.close())

    @staticmethod
    def spawned(ends_p, ends_c) -> None:
        """The workers hold the Pipe now: the parent's copies would keep it
        open past a worker's death."""
        ends_p[2].close()
        ends_c[2].close()

    class Client(End):
        def __init__(self, ends, sec):
            super().__init__(sec)
            self.req, self.rsp, self.conn = ends
            self.req.spin = self.rsp.spin = 0

        def prepare(self, n):
            self.prepare_source(n)

        def run(self, n):
            return _ask_interleaved(((self.req.send, self.rsp.recv),
                                     (self.conn.send_bytes, self.conn.recv_bytes)),
                                    self.msgs, self.lead)

        def left(self, inbound) -> int:
            left = len(inbound)
            while self.conn.poll(0.05):
                self.conn.recv_bytes()
                left += 1
            self.conn.close()
            self.req.detach()
            self.rsp.detach()
            return left

        def close(self):
            return self.left(self.rsp)

    class Server(Client):
        def prepare(self, n):
            pass

        def run(self, n):
            _echo_interleaved(((self.req.recv, self.rsp.send),
                               (self.conn.recv_bytes, self.conn.send_bytes)), self.pay, n)

        def close(self):
            return self.left(self.req)

    def producer(self, ends, sec):
        return self.Client(ends, sec)

    def consumer(self, ends, sec):
        return self.Server(ends, sec)


class IoxPingPong(Iceoryx2):
    name = "iceoryx2 x2, busy-polling"

    def open(self, sec, run):
        names = C.unique_names("ioxrt", 2)
        iox, node = _iox_node(run.iox.params())
        svcs = [_iox_service(iox, node, nm, sec, True) for nm in names]
        ends = (run.iox.params(), names)

        def close():
            nonlocal svcs, node
            svcs = node = None
            gc.collect()
        return ends, ends, close

    class Producer(IoxEnd):
        def __init__(self, ends, sec):
            super().__init__(ends, sec, pub_on=0, sub_on=1)

        def run(self, n):
            """_ask, inline (closures around loan and poll would cost it)."""
            loan, poll, L = self.pub.loan_slice_uninit, self.poll, self.pay.L
            mm, string_at = self.ctypes.memmove, self.ctypes.string_at
            clock, lead = time.perf_counter_ns, self.lead
            end = clock() + int(LEAD_S * 1e9)
            while clock() < end:
                smp = loan(L)
                mm(smp.payload_ptr, lead, L)
                smp.assume_init().send()
                r = poll()
                if r.header.number_of_elements != L or string_at(r.payload_ptr, L) != lead:
                    raise Corrupt("lead-in: the echo differs from the request")
                r.delete()
            t0 = clock()
            for s, m in enumerate(self.msgs):
                smp = loan(L)
                mm(smp.payload_ptr, m, L)
                smp.assume_init().send()
                r = poll()
                if r.header.number_of_elements != L or string_at(r.payload_ptr, L) != m:
                    raise Corrupt(f"round trip {s}: the echo differs from the request")
                r.delete()
            return clock() - t0

    class Consumer(IoxEnd):
        def __init__(self, ends, sec):
            super().__init__(ends, sec, pub_on=1, sub_on=0)

        def run(self, n):
            loan, poll, view, mm = self.pub.loan_slice_uninit, self.poll, self.view, \
                self.ctypes.memmove
            HT, L = self.pay.HT.unpack_from, self.pay.L
            s = 0
            while s < n:
                r = poll()
                v = view(r)
                h, t = HT(v)
                if h == s and t == s ^ MAGIC:
                    s += 1
                elif not _is_lead(h, t, s):
                    raise Corrupt(f"request {s}: " + ("lost" if self.pay.one(v, s) > s + 1
                                                      else "wrong"))
                del v
                smp = loan(L)
                mm(smp.payload_ptr, r.payload_ptr, L)
                r.delete()
                smp.assume_init().send()


class Pinned(Impl):
    """Another case with its processes pinned, "one CPU" (both on the first
    CPU this run may use) or "two CPUs" (the consumer on the first, the
    producer on the second): where the kernel wakes a sleeper decides a
    sleeping round trip more than the transport does."""

    def __init__(self, inner: Impl, placement: str):
        self.inner, self.placement = inner, placement
        self.name = f"{inner.name}, {placement}"
        self.module = inner.module

    def cpus(self):
        """{role: CPU}, or None when this machine cannot do it."""
        mine = sorted(os.sched_getaffinity(0))
        if self.placement == "one CPU":
            return {"consumer": mine[0], "producer": mine[0]}
        if len(mine) < 2:
            return None
        return {"consumer": mine[0], "producer": mine[1]}

    def open(self, sec, run):
        return self.inner.open(sec, run)

    def producer(self, ends, sec):
        return self.inner.producer(ends, sec)

    def consumer(self, ends, sec):
        return self.inner.consumer(ends, sec)


def _impls() -> Dict[str, Impl]:
    out = {}
    sleeping = FmapPingPong(0, "fmap Channel x2, spin=0 (sleeping)")
    for impl in (FmapOne(), FmapMany(), FmapInPlace(), MpQueue(), MpPipe(), FasterFifo(),
                 FasterFifoMany(), Iceoryx2(),
                 FmapPingPong(None, "fmap Channel x2, spin (default)"), sleeping,
                 IoxPingPong(),
                 Pinned(sleeping, "one CPU"), Pinned(MpPipe(), "one CPU"),
                 Pinned(sleeping, "two CPUs"), Pinned(MpPipe(), "two CPUs"), Interleaved()):
        out[impl.name] = impl
    return out


IMPLS = _impls()
PINGPONG_ORDER = ["fmap Channel x2, spin (default)", "fmap Channel x2, spin=0 (sleeping)",
                  "mp.Pipe send_bytes/recv_bytes", "iceoryx2 x2, busy-polling",
                  "fmap Channel x2, spin=0 (sleeping), one CPU",
                  "mp.Pipe send_bytes/recv_bytes, one CPU",
                  "fmap Channel x2, spin=0 (sleeping), two CPUs",
                  "mp.Pipe send_bytes/recv_bytes, two CPUs", Interleaved.name]
STREAM_ORDER = ["fmap send/recv", "fmap send_many/recv_many", "fmap reserve/receive",
                "mp.Queue put/get", "mp.Pipe send_bytes/recv_bytes", "faster-fifo put/get",
                "faster-fifo put_many/get_many", "iceoryx2 loan/receive"]


def _display(impl_name: str, sec: Section) -> str:
    if sec.array and impl_name == "fmap send/recv":
        return "fmap send_array/recv_array"
    return impl_name


# --------------------------------------------------------------------- workers

def _die_with(parent: int) -> None:
    """A worker blocked in a transport call would outlive a parent killed
    with SIGKILL: have the kernel kill it too."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent:                         # it died before prctl
        os._exit(1)


class _ParentGone(Exception):
    pass


def _worker(role: str, impl_name: str, sec: Section, ends, ctrl, parent: int) -> None:
    """A spawned producer or consumer: makes its end, then obeys the parent
    (prepare n / go n / stop) until stopped or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops us
    _die_with(parent)
    if isinstance(IMPLS[impl_name], Pinned):
        os.sched_setaffinity(0, {IMPLS[impl_name].cpus()[role]})

    def tell(*msg):
        try:
            ctrl.send(msg)
        except OSError:
            raise _ParentGone from None

    def order():
        try:
            return ctrl.recv()
        except (EOFError, OSError):
            raise _ParentGone from None
    try:
        impl = IMPLS[impl_name]
        end = impl.producer(ends, sec) if role == "producer" else impl.consumer(ends, sec)
        del ends
        tell("ready", None)
        while True:
            cmd, arg = order()
            if cmd == "prepare":
                end.prepare(arg)
                gc.collect()
                tell("ready", None)
            elif cmd == "go":
                gc.disable()
                try:
                    took = end.run(arg)
                finally:
                    gc.enable()
                tell("done", (end.pay.lost, took))
                end.pay.lost = 0
            elif cmd == "stop":
                tell("stopped", end.close())
                return
    except _ParentGone:
        os._exit(1)
    except BaseException as e:       # noqa: BLE001 - reported to the parent
        last = traceback.extract_tb(e.__traceback__)[-1]
        try:
            ctrl.send(("error", f"{role}: {type(e).__name__}: {e} (line {last.lineno})"))
        except Exception:
            pass
        os._exit(1)                  # no exit handlers: a Queue's feeder may be stuck


class WorkerFailed(RuntimeError):
    pass


class Pair:
    """One case's producer and consumer processes."""

    def __init__(self, run, impl: Impl, sec: Section):
        self.impl, self.sec = impl, sec
        self.procs: Dict[str, multiprocessing.Process] = {}
        self.conns = {}
        self.close_transport = None
        self.dead = False
        ends_p, ends_c, self.close_transport = impl.open(sec, run)
        for role, ends in (("consumer", ends_c), ("producer", ends_p)):
            here, there = run.ctx.Pipe()
            p = run.ctx.Process(target=_worker,
                                args=(role, impl.name, sec, ends, there, os.getpid()),
                                name=f"{role} {impl.name}", daemon=True)
            p.start()
            there.close()
            self.procs[role], self.conns[role] = p, here
        if isinstance(getattr(impl, "inner", impl), MpPipe):   # the children hold it now
            self.close_transport()
            self.close_transport = None
        elif isinstance(impl, Interleaved):
            impl.spawned(ends_p, ends_c)

    def gather(self, what: str, deadline: float) -> Dict[str, object]:
        """Both workers' answers `what`; the first error, death or the
        deadline raises (so a consumer's error is not hidden behind the
        producer it left blocked)."""
        pending, out = ["consumer", "producer"], {}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"{' and '.join(pending)} did not answer {what!r} in time "
                                   "(hung?)")
            ready = mp_wait([self.conns[r] for r in pending]
                            + [self.procs[r].sentinel for r in pending], min(left, 1.0))
            for role in list(pending):
                conn, proc = self.conns[role], self.procs[role]
                msg, gone = None, False
                try:
                    if conn in ready or conn.poll(0):
                        msg = conn.recv()
                except (EOFError, OSError):
                    gone = True
                if msg is not None:
                    tag, val = msg
                    if tag == "error":
                        raise WorkerFailed(val)
                    if tag != what:
                        raise WorkerFailed(f"{role} said {tag!r}, expected {what!r}")
                    out[role] = val
                    pending.remove(role)
                elif gone or proc.sentinel in ready:
                    proc.join(1)
                    raise WorkerFailed(f"{role} died (exit code {proc.exitcode})")
        return out

    def send(self, role: str, msg) -> None:
        try:
            self.conns[role].send(msg)
        except (OSError, EOFError):
            raise WorkerFailed(f"{role} is gone (exit code {self.procs[role].exitcode})") from None

    def wait_ready(self) -> None:
        self.gather("ready", time.monotonic() + START_TIMEOUT)

    def prepare(self, n: int) -> None:
        deadline = time.monotonic() + ROUND_TIMEOUT
        for role in ("consumer", "producer"):
            self.send(role, ("prepare", n))
        self.gather("ready", deadline)

    def go(self, n: int):
        """One round: the consumer's lost-message count, and the ns the
        producer timed itself (a round trip's client; None for streams)."""
        deadline = time.monotonic() + ROUND_TIMEOUT
        self.send("consumer", ("go", n))
        self.send("producer", ("go", n))
        done = self.gather("done", deadline)
        return done["consumer"][0], done["producer"][1]

    def stop(self) -> int:
        """Stop both; messages left over (there should be none)."""
        left = 0
        if not self.dead:
            deadline = time.monotonic() + 30
            try:
                for role in ("producer", "consumer"):
                    self.send(role, ("stop", None))
                left = sum(self.gather("stopped", deadline).values())
            except WorkerFailed:
                pass
        self.kill(grace=5.0)
        return left

    def kill(self, grace: float = 0.0) -> None:
        self.dead = True
        for p in self.procs.values():
            p.join(grace)
            if p.is_alive():
                p.kill()
                p.join(10)
        for c in self.conns.values():
            c.close()
        self.conns = {}
        if self.close_transport is not None:
            try:
                self.close_transport()
            except Exception:
                pass
            self.close_transport = None


# ---------------------------------------------------------------------- runner

class Run:
    def __init__(self, args):
        self.args = args
        self.ctx = multiprocessing.get_context("spawn")
        self.iox = Iox()
        self.rounds = C.rounds_for(args)
        self.round_s = (0.08 if args.quick else 0.25) * args.scale
        self.pairs: List[Pair] = []

    def cleanup(self) -> None:
        for pr in self.pairs:
            pr.kill()
        self.pairs = []
        gc.collect()
        self.iox.sweep()


def run_section(run: Run, sec: Section) -> List[C.Row]:
    """Start every case's processes, then rounds, interleaved as in run_cases:
    WARMUPS untimed ones, each setting the case's n from its rate (the first
    one's is rough: first touches, lazy set-ups), then --rounds timed ones."""
    bench = f"{sec.key}. {sec.title}"
    order = PINGPONG_ORDER if sec.pingpong else STREAM_ORDER
    rows, pairs = [], []
    lost: Dict[int, int] = {}
    took: Dict[int, Optional[int]] = {}
    if run.args.impls:
        words = [w.strip() for w in run.args.impls.split(",") if w.strip()]
        order = [name for name in order if any(w in name for w in words)]
    for name in order:
        impl = IMPLS[name]
        row = C.Row(bench, _display(name, sec), rounds=run.rounds)
        rows.append(row)
        pairs.append(None)
        status = C.OK
        for m in (impl.module, "fmap" if name.startswith("fmap") else None,
                  "numpy" if sec.array else None):
            if m is not None and status == C.OK:
                status = C.optional_import(m)[1]
        if status == C.OK and isinstance(impl, Pinned) and impl.cpus() is None:
            status = "needs 2 CPUs"
        if status != C.OK:
            row.status = status
            continue
        try:
            pr = Pair(run, impl, sec)
        except Exception as e:     # noqa: BLE001
            row.status = f"error: {type(e).__name__}: {e}"
            continue
        run.pairs.append(pr)
        pairs[-1] = pr
    for i, pr in enumerate(pairs):
        if pr is None:
            continue
        try:
            pr.wait_ready()
        except Exception as e:     # noqa: BLE001
            rows[i].status = f"error: {type(e).__name__}: {e}"
            pr.kill()
            run.pairs.remove(pr)
            pairs[i] = None

    units = {i: getattr(IMPLS[name], "unit", 1) for i, name in enumerate(order)}

    def whole(i: int, count: int) -> int:       # whole units (an interleaved row's pairs)
        return -(-count // units[i]) * units[i]
    n = {i: whole(i, max(1, int(sec.warm_n * min(1.0, run.args.scale))))
         for i in range(len(rows))}
    samples: Dict[int, List[float]] = {i: [] for i in range(len(rows))}
    paired: Dict[int, List[tuple]] = {i: [] for i in range(len(rows))}
    live = [i for i, pr in enumerate(pairs) if pr is not None]
    max_n = 3_000_000 if sec.size == 64 else 2_000_000
    for r in range(run.rounds + WARMUPS):
        if not live:
            break
        k = r % len(live)
        for i in live[k:] + live[:k]:
            pr = pairs[i]

            def setup(count, pr=pr):
                pr.prepare(count)

            def body(_, count, pr=pr, i=i):
                gone, took[i] = pr.go(count)
                lost[i] = lost.get(i, 0) + gone

            def cleanup(_, failed, pr=pr):
                if failed:
                    pr.kill()
            try:
                t = C.time_round(body, n[i], setup=setup, cleanup=cleanup)
                if sec.pingpong and isinstance(took[i], tuple):
                    # interleaved: fmap's time and the Pipe's, n / 2 round trips each
                    f_ns, p_ns, won, npairs = took[i]
                    t = f_ns / (n[i] / 2) / 1000.0
                    if r >= WARMUPS:
                        paired[i].append((p_ns / (n[i] / 2) / 1000.0, won, npairs,
                                          f_ns <= p_ns))
                elif sec.pingpong:      # the client's own time, after its lead-in
                    t = took[i] / n[i] / 1000.0
            except KeyboardInterrupt:
                raise
            except BaseException as e:   # noqa: BLE001 - report, do not crash the run
                rows[i].status = f"error: {type(e).__name__}: {e}"
                print(f"  [{bench} / {rows[i].impl}] {rows[i].status}", file=sys.stderr)
                continue
            if r < WARMUPS:
                n[i] = max(100, min(max_n, int(run.round_s * 1e6 / t)))
                if sec.batch > 1:
                    n[i] = -(-n[i] // sec.batch) * sec.batch
                n[i] = whole(i, n[i])
            else:
                samples[i].append(t)
        live = [i for i in live if rows[i].status == C.OK]
    for i in live:
        s = samples[i]
        row = rows[i]
        row.ops_per_round = n[i]
        row.samples_us = [round(x, 4) for x in s]
        row.median_us = statistics.median(s)
        row.min_us, row.max_us = min(s), max(s)
        if paired[i]:
            pipe = [p[0] for p in paired[i]]
            row.extra = {"pipe_samples_us": [round(x, 4) for x in pipe],
                         "pipe_median_us": statistics.median(pipe),
                         "rounds_won": sum(p[3] for p in paired[i]),
                         "pairs_won": sum(p[1] for p in paired[i]),
                         "pairs": sum(p[2] for p in paired[i]),
                         "pair_block": PAIR_BLOCK}
        if lost.get(i):
            row.note = f"LOSSY: lost {lost[i]} messages"
        print(f"  {bench:<20} {row.impl:<36} {row.median_us:9.3f} µs/msg  n={n[i]}",
              file=sys.stderr)
    for i, pr in enumerate(pairs):
        if pr is None:
            continue
        left = pr.stop()
        if left and rows[i].status == C.OK:
            rows[i].note = (rows[i].note + "; " if rows[i].note else "") + \
                f"{left} unexpected messages left over"
        run.pairs.remove(pr)
    run.iox.sweep()
    return rows


# ---------------------------------------------------------------------- output

def _target(row: C.Row, sec: Section, rows: List[C.Row]):
    """The issue's target for this row, and whether it was met; None if none applies."""
    if row.median_us is None:
        return None
    rate = 1e6 / row.median_us
    if sec.pingpong:
        if row.impl.startswith("fmap") and "spin=0" not in row.impl:
            return "< 2 µs", row.median_us < 2.0
        if row.extra.get("pairs"):
            x = row.extra
            return (f"<= mp.Pipe in the same rounds ({x['pipe_median_us']:.1f} µs; faster in "
                    f"{x['rounds_won']} of {len(row.samples_us)} rounds, {x['pairs_won']} of "
                    f"{x['pairs']} paired blocks)",
                    row.median_us <= x["pipe_median_us"])
        if "spin=0" in row.impl:
            where = row.impl.split("(sleeping)")[1]       # the same placement
            pipe = next((r for r in rows if r.impl == "mp.Pipe send_bytes/recv_bytes" + where
                         and r.median_us is not None), None)
            if pipe is None:
                return "<= mp.Pipe (no figure)", None
            # Rounds run interleaved, so round i of each is a pair taken at
            # one time; a sleeping round trip swings by 30-50% from round to
            # round with where the host runs the two CPUs, so the pairs say
            # how much of a gap between medians is noise.
            pairs = list(zip(row.samples_us, pipe.samples_us))
            won = sum(a <= b for a, b in pairs)
            return (f"<= mp.Pipe ({pipe.median_us:.1f} µs; faster in {won} of {len(pairs)} "
                    "paired rounds)", row.median_us <= pipe.median_us)
        return None
    want = {("a", "fmap send/recv"): 3e6, ("a", "fmap send_many/recv_many"): 10e6,
            ("b", "fmap send/recv"): 1.5e6,
            ("c", "fmap send_array/recv_array"): 35e3}.get((sec.key, row.impl))
    if want is None:
        return None
    return f">= {_rate(want)} msg/s", rate >= want


def _rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{v:.0f}"


def format_section(sec: Section, rows: List[C.Row]) -> str:
    base_name = rows[0].impl
    base = rows[0].median_us
    if sec.pingpong:
        head = ["round trip", "impl", "µs", f"ratio vs {base_name}", "target"]
    else:
        head = ["messages", "impl", "msg/s", "GB/s", f"ratio vs {base_name}", "target"]
    body, notes = [], []
    for r in rows:
        if r.median_us is None:
            cells = [sec.title, r.impl, C.status_cell(r, notes)] + ["-"] * (len(head) - 3)
            body.append(cells)
            continue
        ratio = f"{r.median_us / base:.2f}x" if base else "-"
        tg = _target(r, sec, rows)
        tcell = "" if tg is None else f"{tg[0]}: " + {True: "met", False: "MISSED",
                                                      None: "?"}[tg[1]]
        if r.note:
            notes.append(f"{r.impl}: {r.note}")
            mark = "LOSSY " if r.note.startswith("LOSSY") else ""
            tcell = (tcell + " " if tcell else "") + f"{mark}[{len(notes)}]"
        if sec.pingpong:
            body.append([sec.title, r.impl, f"{r.median_us:.2f}", ratio, tcell])
        else:
            rate = 1e6 / r.median_us
            body.append([sec.title, r.impl, _rate(rate), f"{rate * sec.size / 1e9:.2f}",
                         ratio, tcell])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    right = {2, 3} if sec.pingpong else {2, 3, 4}

    def line(cells):
        return "| " + " | ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                                 for i, c in enumerate(cells)) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    out = [line(head), sep] + [line(c) for c in body]
    if notes:
        out.append("")
        out.extend(f"[{i + 1}] {n}" for i, n in enumerate(notes))
    return "\n".join(out)


TITLES = {
    "a": "a. 64 B messages, producer -> consumer process",
    "b": "b. 4 KiB messages, producer -> consumer process",
    "c": "c. 1 MiB messages (float32 arrays), producer -> consumer process",
    "d": "d. 64 B request/response round trip between two processes",
}


def main(argv=None) -> int:
    p = C.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--only", default="abcd",
                   help="which sections to run, e.g. 'ad' (default: abcd)")
    p.add_argument("--impls", default=None,
                   help="run only the rows whose name contains one of these comma-separated "
                        "words, e.g. 'fmap,iceoryx2' (default: all)")
    p.add_argument("--capacity", type=int, default=None,
                   help="channel capacity (and the peers' bound) for a and b (default 256)")
    p.add_argument("--big-capacity", type=int, default=None,
                   help="the same for c, the 1 MiB messages (default 4)")
    args = p.parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    run = Run(args)
    Iox.sweep_dead_runs()
    t0 = time.monotonic()
    fm = C.optional_import("fmap")[1]
    print(f"channel: rounds={run.rounds} quick={args.quick} fmap: {fm}", file=sys.stderr)
    results: Dict[str, List[C.Row]] = {}
    used: Dict[str, Section] = {}
    try:
        for key in args.only:
            if key in SECTIONS:
                sec = SECTIONS[key]
                if key in "ab" and args.capacity:
                    sec = dataclasses.replace(sec, capacity=args.capacity)
                if key == "c" and args.big_capacity:
                    sec = dataclasses.replace(sec, capacity=args.big_capacity)
                used[key] = sec
                results[key] = run_section(run, sec)
    finally:
        run.cleanup()
    elapsed = time.monotonic() - t0

    out = []
    for key, rows in results.items():
        out.append(f"### {TITLES[key]}")
        out.append("")
        out.append(format_section(used[key], rows))
        out.append("")
    env = C.environment()
    caps = ", ".join(f"{k} {sec.capacity}" for k, sec in used.items())
    out.append(f"Python {env['python']}, {env['machine']}, {env['cpus']} CPUs; capacity: {caps}; "
               f"median of {run.rounds} rounds; ratio = time per message / the first row's "
               f"(lower is faster); every message verified; run took {elapsed:.1f} s")
    print("\n".join(out))
    if args.json:
        all_rows = [r for rows in results.values() for r in rows]
        C.write_json(args.json, all_rows, meta={"benchmark": "channel", "rounds": run.rounds,
                                                "quick": args.quick, "elapsed_s": elapsed,
                                                "round_s": run.round_s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
