"""Channel crashes: SIGKILL at awkward moments, then nothing leaks and nothing blocks.

The contract (Channel's docstring): a producer killed while writing loses that
message, never delivered in part; a consumer killed while holding a received
message loses that one message; either way the slot is given back and nothing
blocks for more than a few tens of milliseconds (waiters look for dead
claimers every 10 ms).  The bound asserted here is a loose STALL seconds, for
a noisy machine.

Children are os.fork()ed (fmap and numpy already imported, so a replacement
starts in milliseconds) and talk back through a pipe; every wait on them is
bounded and the `forks` fixture kills whatever is left at teardown.  Each test
ends by checking that the dead left nothing behind: the parent alone counts
as a process, and once it lets go the name and the mapping are gone.
"""
import mmap
import os
import random
import select
import signal
import struct
import time
import traceback
import zlib

import numpy as np
import pytest

import fmap
from conftest import raises
from children import Background, asleep_in_futex as asleep, poll

WAIT = 10.0      # the bound on any wait that should end at once
HOLD = 30.0      # how long a child that waits to be killed waits at most
STALL = 2.0      # "a few tens of ms", with room for a loaded machine

_read_ends = set()   # the parent's ends of live children's pipes: children close them


class Forked:
    """fn(out) run in a forked child; out is the write end of a pipe whose
    other end is ours.  The child exits 0 when fn returns, 1 when it raises
    (the traceback goes down the pipe as an "error" line)."""

    def __init__(self, fn):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(r)
                for fd in _read_ends:      # so a sibling's pipe sees EOF when it dies
                    os.close(fd)
                fn(w)
                status = 0
            except BaseException:  # noqa: BLE001 - reported to the parent
                text = traceback.format_exc().replace("\n", " | ")
                try:
                    os.write(w, f"error {text[-3000:]}\n".encode())
                except OSError:
                    pass
            finally:
                os._exit(status)
        os.close(w)
        _read_ends.add(r)
        self.pid, self.fd, self.buf, self.status = pid, r, b"", None

    def read(self, timeout):
        """Bytes from the pipe, waiting up to timeout for some; b"" at EOF
        or when none came."""
        if self.fd < 0 or not select.select([self.fd], [], [], max(timeout, 0))[0]:
            return b""
        data = os.read(self.fd, 65536)
        if not data:
            self._close_pipe()
        return data

    def expect(self, prefix, timeout=WAIT):
        """The child's next line; it must start with prefix."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"child {self.pid}: no line within {timeout} s")
            if self.fd < 0:
                pytest.fail(f"child {self.pid} exited ({self.wait()}) before saying {prefix!r}; "
                            f"it said {self.buf!r}")
            self.buf += self.read(left)
        line, self.buf = self.buf.split(b"\n", 1)
        text = line.decode()
        assert text.startswith(prefix), f"child {self.pid} said {text!r}, expected {prefix!r}"
        return text

    def kill(self):
        """SIGKILL; not reaped (it stays a zombie until wait())."""
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout=WAIT):
        """Its exit status (negative: the signal), killed and failed when it overstays."""
        if self.status is not None:
            return self.status
        deadline = time.monotonic() + timeout
        while True:
            done, st = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(st)
                return self.status
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                self.status = -signal.SIGKILL
                pytest.fail(f"child {self.pid} did not exit within {timeout} s; "
                            f"it said {self.buf + self.read(0)!r}")
            time.sleep(0.002)

    def killed(self):
        """SIGKILL and reap."""
        self.kill()
        assert self.wait() == -signal.SIGKILL, f"child {self.pid} ended before the kill"

    def _close_pipe(self):
        if self.fd >= 0:
            _read_ends.discard(self.fd)
            os.close(self.fd)
            self.fd = -1

    def close(self):
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.status = -signal.SIGKILL
        self._close_pipe()


@pytest.fixture
def forks():
    """forks(fn) starts a Forked child; all are killed and reaped at teardown."""
    started = []

    def start(fn):
        child = Forked(fn)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


def say(out, text):
    os.write(out, text.encode() + b"\n")


def channel_maps(name):
    """Lines of our /proc/self/maps that map channel `name`."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"fmap-channel:{name} " in line)


def assert_nothing_left(ch, name):
    """Every child is gone: the parent alone is attached; closing its handle
    frees the name and unmaps the channel."""
    assert poll(lambda: ch.stats()["processes"] == 1, STALL), ch.stats()
    assert channel_maps(name) == 1
    ch.close()
    with raises(FileNotFoundError, winerror=2):
        fmap.Channel.open(name)
    assert channel_maps(name) == 0


def drain(ch):
    """Every message there now, as bytes."""
    out = []
    while True:
        try:
            out.append(ch.recv(timeout=0.2))
        except TimeoutError:
            return out


# ---- 1. a producer killed inside reserve() -----------------------------------------

@pytest.mark.parametrize("consumer_waiting", [True, False], ids=["waiting", "late"])
def test_producer_killed_inside_reserve(name, forks, consumer_waiting):
    ch = fmap.Channel.create(name, 4, message_size=64)

    def writer(out):
        c = fmap.Channel.open(name)
        with c.reserve(32, timeout=WAIT) as buf:
            buf[:8] = b"PARTIAL!"
            say(out, "writing")
            time.sleep(HOLD)
            buf[8:] = b"x" * 24

    def later(out):
        c = fmap.Channel.open(name)
        for i in range(6):              # more than fit beside the stuck slot
            c.send(b"later-%d" % i, timeout=WAIT)
            say(out, f"sent {i}")
        say(out, "done")

    w = forks(writer)
    w.expect("writing")
    p = forks(later)
    for i in range(3):
        p.expect(f"sent {i}")
    # The ring is full behind the slot being written: nothing passes it yet.
    assert len(ch) == 4
    with raises(TimeoutError):
        ch.recv(timeout=0.2)
    assert ch.stats()["processes"] == 3
    got = []

    def consume():
        while len(got) < 6:
            got.append((ch.recv(timeout=WAIT), time.monotonic()))

    bg = Background(consume) if consumer_waiting else None
    if bg is not None:
        assert poll(lambda: ch.stats()["consumers_sleeping"] == 1, WAIT)
        time.sleep(0.05)                # a few of its 10 ms checks find the writer alive
        assert not got
    w.kill()                            # a zombie until reaped below: dead all the same
    killed = time.monotonic()
    if bg is None:
        bg = Background(consume)
    bg.result()
    for i in range(3, 6):
        p.expect(f"sent {i}")
    p.expect("done")
    assert p.wait() == 0
    assert [m for m, _ in got] == [b"later-%d" % i for i in range(6)]
    assert got[0][1] - killed < STALL, f"the first message came {got[0][1] - killed:.3f} s late"
    assert drain(ch) == []              # the partial message never comes
    assert len(ch) == 0
    assert w.wait() == -signal.SIGKILL
    # The slot went back: a full lap of the ring still works.
    for i in range(8):
        ch.send(b"again-%d" % i, timeout=WAIT)
        assert ch.recv(timeout=WAIT) == b"again-%d" % i
    assert_nothing_left(ch, name)


# ---- 2. a consumer killed holding a message ----------------------------------------

@pytest.mark.parametrize("capacity", [1, 2])
@pytest.mark.parametrize("how", ["receive", "recv_array"])
def test_consumer_killed_holding_a_message(name, forks, how, capacity):
    ch = fmap.Channel.create(name, capacity, message_size=64)
    for i in range(capacity):
        ch.send(b"m%d" % i)

    def holder(out):
        c = fmap.Channel.open(name)
        if how == "receive":
            with c.receive(timeout=WAIT) as buf:
                say(out, "holding " + bytes(buf).decode())
                time.sleep(HOLD)
        else:
            a = c.recv_array(timeout=WAIT)
            say(out, "holding " + a.tobytes().decode())
            time.sleep(HOLD)
            del a

    h = forks(holder)
    assert h.expect("holding") == "holding m0"
    with raises(TimeoutError):
        ch.send(b"no room", timeout=0.2)    # the held slot is still in use
    sender = Background(lambda: ch.send(b"new", timeout=WAIT))
    assert poll(lambda: ch.stats()["producers_sleeping"] == 1, WAIT)
    h.killed()
    killed = time.monotonic()
    sender.result()
    assert time.monotonic() - killed < STALL
    # m0 is lost, not delivered again; the rest come in order.
    assert drain(ch) == [b"m%d" % i for i in range(1, capacity)] + [b"new"]
    assert len(ch) == 0
    for i in range(2 * capacity + 1):   # every slot comes round again
        ch.send(b"again", timeout=WAIT)
        assert ch.recv(timeout=WAIT) == b"again"
    assert_nothing_left(ch, name)


# ---- 2b. callers that only poll free a dead claimer's slot too ---------------------

def holder(name, how):
    """A child's fn that opens channel `name`, claims a slot ("reserve" or
    "receive"), says "claimed" and holds it until killed."""
    def hold(out):
        c = fmap.Channel.open(name)
        buf = c.reserve(8, timeout=WAIT) if how == "reserve" else c.receive(timeout=WAIT)
        buf.__enter__()
        say(out, "claimed")
        time.sleep(HOLD)
    return hold


def until_no_timeout(call, what):
    """call() again while it raises TimeoutError, for STALL seconds at most;
    what it returns."""
    deadline = time.monotonic() + STALL
    while True:
        try:
            return call()
        except TimeoutError:
            assert time.monotonic() < deadline, what


@pytest.mark.parametrize("timeout", [0, 0.005])
@pytest.mark.parametrize("dead", ["producer", "consumer"])
def test_polling_callers_free_a_dead_claimers_slot(name, forks, dead, timeout):
    # A dead claimer is looked for once a handle's claims have found nothing
    # for 10 ms, across calls: a caller polling with timeouts shorter than
    # that (try-send, try-recv) never waited that long in any one call and
    # never freed the slot, so messages behind it (or room) never came.
    ch = fmap.Channel.create(name, 2, message_size=64)
    if dead == "consumer":
        ch.send(b"held")
        ch.send(b"behind")

    child = forks(holder(name, "reserve" if dead == "producer" else "receive"))
    child.expect("claimed")
    if dead == "producer":
        ch.send(b"behind", timeout=WAIT)
    child.killed()
    what = f"polling never freed the dead {dead}'s slot"
    if dead == "producer":
        assert until_no_timeout(lambda: ch.recv(timeout=timeout), what) == b"behind"
    else:
        until_no_timeout(lambda: ch.send(b"room", timeout=timeout), what)
    if dead == "consumer":
        assert drain(ch) == [b"behind", b"room"]
    assert_nothing_left(ch, name)


@pytest.mark.parametrize("dead", ["producer", "consumer"])
def test_a_blocked_waiter_finds_a_dead_claimer_within_tens_of_ms(name, forks, dead):
    # The documented bound: a blocked waiter looks for a dead claimer every
    # 10 ms, so it goes on a few tens of ms after the kill.  Each kill is
    # bounded by STALL (a loaded machine); the median of five by 100 ms.
    took = []
    for _ in range(5):
        ch = fmap.Channel.create(name, 2, message_size=64)
        ch.spin = 0
        if dead == "consumer":
            ch.send_many([b"held", b"behind"])
        child = forks(holder(name, "reserve" if dead == "producer" else "receive"))
        child.expect("claimed")
        if dead == "producer":
            ch.send(b"behind", timeout=WAIT)
            waiter = Background(lambda: ch.recv(timeout=WAIT))
        else:
            waiter = Background(lambda: ch.send(b"room", timeout=WAIT))
        side = "consumers_sleeping" if dead == "producer" else "producers_sleeping"
        assert poll(lambda: ch.stats()[side] == 1, WAIT)
        child.killed()
        killed = time.monotonic()
        waiter.result(STALL)
        took.append(time.monotonic() - killed)
        assert_nothing_left(ch, name)
    took.sort()
    assert took[2] < 0.1, [f"{t * 1e3:.1f} ms" for t in took]


def test_polling_consumers_reach_the_end_past_a_dead_producers_slot(name, forks):
    ch = fmap.Channel.create(name, 4, message_size=64)

    child = forks(holder(name, "reserve"))
    child.expect("claimed")
    child.killed()

    def closer(out):
        c = fmap.Channel.open(name)
        c.send(b"last")
        c.close()                       # the end of the stream, behind the dead slot
        say(out, "closed")

    ender = forks(closer)
    ender.expect("closed")
    assert ender.wait() == 0
    got = []
    with pytest.raises(fmap.EndOfStream):
        while True:
            got.append(until_no_timeout(lambda: ch.recv(timeout=0.005),
                                        f"no end of the stream; got {got}"))
    assert got == [b"last"]
    assert_nothing_left(ch, name)


@pytest.mark.parametrize("who", ["ours", "another process's"])
def test_a_dead_claimer_with_our_pid_is_dead(tmp_path, who):
    # A process killed holding a slot, and its pid given to a later process:
    # a live pid on a record is its claimer only if the start time is the
    # claimer's too.  "ours": the later process is the waiter, which must
    # free the slot (it may be the only consumer); "another process's": the
    # pid went to an unrelated process, and the waiter must still free it.
    # In a pid namespace of its own, where ns_last_pid hands the pid out again.
    import shutil
    import subprocess
    import sys
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root for a pid namespace")
    script = tmp_path / "reuse.py"
    script.write_text("""
import os, signal, time, fmap
ch = fmap.Channel.create(None, capacity=2, message_size=64)
r, w = os.pipe()
dead = os.fork()
if dead == 0:
    m = ch.reserve(8); m.__enter__(); os.write(w, b"x"); time.sleep(60); os._exit(0)
os.read(r, 1)
os.kill(dead, signal.SIGKILL); os.waitpid(dead, 0)
ch.send(b"behind the dead one")
time.sleep(0.05)                # a start time of its own (/proc counts in 10 ms ticks)
try:
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(dead - 1))
except OSError:
    print(3)                    # pids cannot be handed out again here
    raise SystemExit
pid = os.fork()
if pid == 0:
    if WHO == "ours":
        code = 3 if os.getpid() != dead else 2
        try:
            if ch.recv(timeout=5) == b"behind the dead one":
                code = 0
        finally:
            os._exit(code)
    time.sleep(30)              # lives on with the dead one's pid
    os._exit(0)
if WHO == "ours":
    _, st = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(st))
else:
    code = 3 if pid != dead else 2
    try:
        if code == 2 and ch.recv(timeout=5) == b"behind the dead one":
            code = 0
    except TimeoutError:
        pass
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print(code)
""".replace("WHO", repr(who)))
    try:
        done = subprocess.run(["unshare", "-p", "-f", "--mount-proc", sys.executable, str(script)],
                              capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the pid namespace run did not finish in 60 s")
    if done.returncode != 0 and b"unshare" in done.stderr:
        pytest.skip(f"no pid namespace here: {done.stderr.decode().strip()}")
    assert done.returncode == 0, done.stderr.decode()
    # 0: the pid came back and the slot was freed; 3: the pid did not come
    # back (the test could not run); 2: no message, the slot held for ever.
    out = done.stdout.decode().strip()
    if out == "3":
        pytest.skip("the pid was not handed out again")
    assert out == "0", f"the process with the dead one's pid: exit {out}"


# ---- 3. a consumer killed asleep in recv() -----------------------------------------

def test_consumer_killed_asleep_in_recv(name, forks):
    ch = fmap.Channel.create(name, 8, message_size=64)

    def victim(out):
        c = fmap.Channel.open(name)
        say(out, "ready")
        say(out, "got " + c.recv(timeout=HOLD).decode())

    def survivor(out):
        c = fmap.Channel.open(name)
        say(out, "ready")
        while True:
            m = c.recv(timeout=WAIT).decode()
            say(out, "got " + m)
            if m == "stop":
                return

    def producer(out):
        c = fmap.Channel.open(name)
        for i in range(5):
            c.send(b"p%d" % i, timeout=WAIT)
            time.sleep(0.01)

    a, b = forks(victim), forks(survivor)
    a.expect("ready")
    b.expect("ready")
    assert poll(lambda: ch.stats()["consumers_sleeping"] == 2 and asleep(a.pid)
                and asleep(b.pid), WAIT), ch.stats()
    time.sleep(0.05)                   # long past the spin (50 us)
    a.killed()
    assert poll(lambda: ch.stats()["processes"] == 2, STALL), ch.stats()
    for i in range(20):
        sent = time.monotonic()
        ch.send(b"m%d" % i, timeout=WAIT)
        assert b.expect("got", STALL) == f"got m{i}"
        assert time.monotonic() - sent < STALL
    p = forks(producer)
    for i in range(5):
        assert b.expect("got", STALL) == f"got p{i}"
    assert p.wait() == 0
    # The dead sleeper is not counted any more: the survivor alone sleeps.
    assert poll(lambda: ch.stats()["consumers_sleeping"] == 1 and asleep(b.pid), STALL), \
        ch.stats()
    ch.send(b"stop")
    assert b.expect("got", STALL) == "got stop"
    assert b.wait() == 0
    assert poll(lambda: ch.stats()["consumers_sleeping"] == 0, STALL), ch.stats()
    assert a.buf + a.read(0) == b""     # the victim never got anything
    assert_nothing_left(ch, name)


# ---- 4. a producer killed asleep in send() -----------------------------------------

def test_producer_killed_asleep_in_send(name, forks):
    ch = fmap.Channel.create(name, 2, message_size=64)
    ch.send(b"a")
    ch.send(b"b")

    def producer(tag):
        def run(out):
            c = fmap.Channel.open(name)
            say(out, "ready")
            c.send(tag, timeout=HOLD)
            say(out, "sent")
        return run

    victim, other = forks(producer(b"victim")), forks(producer(b"other"))
    victim.expect("ready")
    other.expect("ready")
    assert poll(lambda: ch.stats()["producers_sleeping"] == 2 and asleep(victim.pid)
                and asleep(other.pid), WAIT), ch.stats()
    time.sleep(0.05)
    victim.killed()
    assert ch.recv(timeout=WAIT) == b"a"
    freed = time.monotonic()
    other.expect("sent", STALL)        # the one wake-up went to the living
    assert time.monotonic() - freed < STALL
    assert other.wait() == 0
    assert drain(ch) == [b"b", b"other"]       # the victim had claimed nothing
    assert poll(lambda: ch.stats()["producers_sleeping"] == 0, STALL), ch.stats()
    # Backpressure still works both ways.
    ch.send(b"c")
    ch.send(b"d")
    bg = Background(lambda: ch.send(b"e", timeout=WAIT))
    assert poll(lambda: ch.stats()["producers_sleeping"] == 1, WAIT)
    assert ch.recv(timeout=WAIT) == b"c"
    bg.result()
    assert drain(ch) == [b"d", b"e"]
    assert_nothing_left(ch, name)


def test_producer_killed_inside_send_many(name, forks):
    # send_many claims its slots 64 at a time and publishes each batch once
    # it is written.  Killed while writing its second batch (64 strided 1
    # MiB arrays, gathered slowly: about 0.4 s), the producer loses that
    # batch, never any part of it; the first arrives whole and in order,
    # and the dead batch's slots go back to the ring.
    ch = fmap.Channel.create(name, 128, message_size=1 << 20)
    base = np.zeros(2 << 20, np.uint8)
    strided = base[::2]                 # 1 MiB, not contiguous: gathered

    def producer(out):
        c = fmap.Channel.open(name)
        say(out, "ready")
        c.send_many([b"first-%d" % i for i in range(64)] + [strided] * 64, timeout=HOLD)
        say(out, "sent")

    p = forks(producer)
    p.expect("ready")
    assert poll(lambda: ch.stats()["sent"] >= 128, WAIT, interval=0.001), ch.stats()
    p.killed()                          # the second batch claimed, being written
    assert p.buf + p.read(0) == b""     # it never got to the end
    assert [ch.recv(timeout=WAIT) for _ in range(64)] == [b"first-%d" % i for i in range(64)]

    def later(out):
        c = fmap.Channel.open(name)
        for i in range(300):            # more than a lap of the ring past the dead batch
            c.send(b"later-%d" % i, timeout=WAIT)
        say(out, "done")

    q = forks(later)
    start = time.monotonic()
    got = [ch.recv(timeout=WAIT) for _ in range(300)]
    assert got == [b"later-%d" % i for i in range(300)]   # nothing of the dead batch
    assert time.monotonic() - start < STALL
    q.expect("done")
    assert q.wait() == 0
    assert drain(ch) == [] and len(ch) == 0
    assert_nothing_left(ch, name)


# ---- 5. killed between a claim and its names ---------------------------------------
#
# A claim is one swap on a cursor, then a store of the claimer's name into each
# claimed slot.  A process killed between the two leaves slots that still read
# as unclaimed, behind the cursor.  The test hook makes exactly that claim (a
# real kill seldom lands in a window of a few instructions), and the child is
# killed holding it.  Then either another claim on the same side follows (it
# names the dead claim before it moves the cursor on), or none does (the
# cursor itself names the dead claimer, and the blocked side finds it there).

THEN = ["another claim", "none"]


def claim_unnamed(name, producer, n):
    def run(out):
        c = fmap.Channel.open(name)
        pos, got = fmap._fmap._channel_claim_unnamed(c, producer, n)
        say(out, f"claimed {pos} {got}")
        time.sleep(HOLD)
    return run


@pytest.mark.parametrize("then", THEN)
def test_producer_killed_between_claim_and_names(name, forks, then):
    ch = fmap.Channel.create(name, 4, message_size=64)
    d = forks(claim_unnamed(name, True, 2))
    assert d.expect("claimed") == "claimed 0 2"
    if then == "another claim":
        ch.send(b"after", timeout=0)          # position 2, behind the claim
    assert len(ch) == (3 if then == "another claim" else 2)
    got = Background(lambda: ch.recv(timeout=WAIT))
    time.sleep(0.05)                          # its 10 ms checks find the claimer alive
    assert len(ch) == (3 if then == "another claim" else 2)
    d.killed()
    killed = time.monotonic()
    # The dead claim is dropped, never delivered: the tail passes it.
    if then == "none":
        assert poll(lambda: len(ch) == 0, STALL), ch.stats()
        ch.send(b"after", timeout=0)
    assert got.result() == b"after"
    assert time.monotonic() - killed < STALL
    assert drain(ch) == [] and len(ch) == 0
    for i in range(9):                        # every slot comes round again
        ch.send(b"again-%d" % i, timeout=WAIT)
        assert ch.recv(timeout=WAIT) == b"again-%d" % i
    assert_nothing_left(ch, name)


def test_the_end_of_the_stream_waits_for_a_claim_not_yet_named(name, forks):
    # Closed while a producer is between its claim and its names: the slot
    # still reads free, but the head is past it.  Receivers wait for it (its
    # producer may yet write) and get the end of the stream once the
    # producer is found dead, not before.
    ch = fmap.Channel.create(name, 4, message_size=64)
    d = forks(claim_unnamed(name, True, 1))
    assert d.expect("claimed") == "claimed 0 1"
    fmap.Channel.open(name).close()
    with raises(TimeoutError):
        ch.recv(timeout=0)
    got = Background(lambda: ch.recv(timeout=WAIT))
    time.sleep(0.05)                          # its 10 ms checks find the producer alive
    assert not got.done()
    d.killed()
    killed = time.monotonic()
    with pytest.raises(fmap.EndOfStream):
        got.result()
    assert time.monotonic() - killed < STALL
    with pytest.raises(fmap.EndOfStream):
        ch.recv(timeout=0)
    assert_nothing_left(ch, name)


@pytest.mark.parametrize("then", THEN)
def test_consumer_killed_between_claim_and_names(name, forks, then):
    ch = fmap.Channel.create(name, 2, message_size=64)
    ch.send(b"m0")
    ch.send(b"m1")
    d = forks(claim_unnamed(name, False, 1))
    assert d.expect("claimed") == "claimed 0 1"
    if then == "another claim":
        assert ch.recv(timeout=0) == b"m1"    # names m0's taker first
    sender = Background(lambda: ch.send(b"new", timeout=WAIT))
    assert poll(lambda: ch.stats()["producers_sleeping"] == 1, WAIT)
    time.sleep(0.05)                          # m0's slot is held while its taker lives
    assert not sender.done()
    d.killed()
    killed = time.monotonic()
    sender.result()
    assert time.monotonic() - killed < STALL
    # m0 is lost with its taker, not delivered again.
    assert drain(ch) == ([b"new"] if then == "another claim" else [b"m1", b"new"])
    assert len(ch) == 0
    for i in range(5):
        ch.send(b"again", timeout=WAIT)
        assert ch.recv(timeout=WAIT) == b"again"
    assert_nothing_left(ch, name)


def name_partly(name, producer, k):
    def run(out):
        c = fmap.Channel.open(name)
        fmap._fmap._channel_name_partly(c, producer, k)
        say(out, "named")
    return run


def claim_half_named_then_kill(name, forks, producer):
    """X claims slots 0-5 unnamed; Y names 4 of them for it and exits; X is
    killed.  The time of the kill."""
    x = forks(claim_unnamed(name, producer, 6))
    assert x.expect("claimed") == "claimed 0 6"
    y = forks(name_partly(name, producer, 4))
    y.expect("named")
    assert y.wait() == 0
    x.killed()
    return time.monotonic()


def test_producer_killed_while_another_names_its_claim(name, forks):
    # X claims 6 slots and is killed before naming them; Y names 4 of them for
    # it and dies too.  The 2 left unnamed must still be found: a later claim
    # names them (they are the last before the cursor), and they are dropped.
    ch = fmap.Channel.create(name, 8, message_size=64)
    killed = claim_half_named_then_kill(name, forks, True)
    ch.send(b"after", timeout=0)              # names the rest, then position 6
    assert ch.recv(timeout=WAIT) == b"after"
    assert time.monotonic() - killed < STALL
    assert len(ch) == 0
    for i in range(17):                       # every slot comes round again
        ch.send(b"again-%d" % i, timeout=WAIT)
        assert ch.recv(timeout=WAIT) == b"again-%d" % i
    assert_nothing_left(ch, name)


def test_consumer_killed_while_another_names_its_claim(name, forks):
    ch = fmap.Channel.create(name, 8, message_size=64)
    for i in range(8):
        ch.send(b"m%d" % i)
    killed = claim_half_named_then_kill(name, forks, False)
    assert ch.recv(timeout=0) == b"m6"        # names the rest of X's claim first
    for i in range(7):                        # every slot X held comes back
        ch.send(b"n%d" % i, timeout=WAIT)
    assert time.monotonic() - killed < STALL
    assert drain(ch) == [b"m7"] + [b"n%d" % i for i in range(7)]
    assert len(ch) == 0
    assert_nothing_left(ch, name)


# ---- 6. random kills in a stream ---------------------------------------------------

RUN_S = 3.0            # how long the stream runs under kills
RECORD = struct.Struct("<iii")     # what a consumer reports: producer, seq, status
OK, BAD, END = 1, 0, -1
HEADER = struct.Struct("<III")     # a message: producer, seq, payload length; payload; crc32


def make_message(producer, seq, rng):
    body = HEADER.pack(producer, seq, n := rng.randrange(0, 1500)) + os.urandom(n)
    return body + struct.pack("<I", zlib.crc32(body))


def check_message(data):
    """A consumer's record of the message it got."""
    if len(data) >= HEADER.size + 4:
        producer, seq, n = HEADER.unpack_from(data)
        if len(data) == HEADER.size + n + 4 and \
                struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4]):
            return RECORD.pack(producer, seq, OK)
        return RECORD.pack(producer, seq, BAD)
    return RECORD.pack(-1, len(data), BAD)


def stream_producer(name, ident, sent):
    """Sends (alternately by send, reserve and send_array) until the stream
    ends; sent[ident] counts the sends that returned."""
    def run(out):
        c = fmap.Channel.open(name)
        rng = random.Random(ident)
        seq = 0
        try:
            while True:
                m = make_message(ident, seq, rng)
                if seq % 3 == 0:
                    c.send(m, timeout=WAIT)
                elif seq % 3 == 1:
                    with c.reserve(len(m), timeout=WAIT) as buf:
                        half = len(m) // 2      # two writes: a kill may land between
                        buf[:half] = m[:half]
                        buf[half:] = m[half:]
                else:
                    c.send_array(np.frombuffer(m, np.uint8), timeout=WAIT)
                seq += 1
                sent[ident] = seq
        except BrokenPipeError:
            pass
    return run


def stream_consumer(name):
    """Receives (alternately by recv, receive and recv_array) until
    EndOfStream, writing a record of each message down its pipe while it
    still holds it where it can (a pipe write this small is atomic)."""
    def run(out):
        c = fmap.Channel.open(name)
        k = 0
        try:
            while True:
                k += 1
                if k % 3 == 0:
                    os.write(out, check_message(c.recv(timeout=WAIT)))
                elif k % 3 == 1:
                    with c.receive(timeout=WAIT) as buf:
                        os.write(out, check_message(bytes(buf)))
                else:
                    a = c.recv_array(timeout=WAIT)
                    os.write(out, check_message(a.tobytes()))
                    del a
        except fmap.EndOfStream:
            os.write(out, RECORD.pack(-1, -1, END))
    return run


def test_random_kills_in_a_stream(name, forks):
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    why = f"(seed {seed})"
    ch = fmap.Channel.create(name, 8, message_size=2048)
    watch = fmap.Channel.open(name)     # the parent's own hold, past close()
    shared = mmap.mmap(-1, 8 * 1024)    # MAP_SHARED: the producers' counts
    sent = np.frombuffer(shared, dtype=np.int64)
    producers = {}                      # ident -> Forked
    consumers = {}                      # ident -> (Forked, bytearray of records)
    killed_producers, killed_consumers = set(), set()
    records = {}                        # consumer ident -> list of (producer, seq, status)

    def start_producer():
        ident = len(producers)
        producers[ident] = forks(stream_producer(name, ident, sent))

    def start_consumer():
        ident = len(consumers)
        consumers[ident] = (forks(stream_consumer(name)), bytearray())
        records[ident] = []

    def take(ident, data):
        child, buf = consumers[ident]
        buf += data
        whole = len(buf) - len(buf) % RECORD.size
        records[ident].extend(RECORD.iter_unpack(bytes(buf[:whole])))
        del buf[:whole]

    def pump(timeout):
        """Read what the consumers wrote; True if anything came."""
        live = {c.fd: i for i, (c, _) in consumers.items() if c.fd >= 0}
        if not live:
            time.sleep(timeout)
            return False
        ready = select.select(list(live), [], [], timeout)[0]
        for fd in ready:
            ident = live[fd]
            child = consumers[ident][0]
            data = child.read(0)
            take(ident, data)
            if not data and ident not in killed_consumers and \
                    not any(r[2] == END for r in records[ident]):
                pytest.fail(f"consumer {ident} ended early ({child.wait()}) {child.buf!r} {why}")
        return bool(ready)

    for _ in range(2):
        start_producer()
        start_consumer()
    last_progress = start = time.monotonic()
    next_kill = start + rng.uniform(0.02, 0.15)
    kills = 0
    while (now := time.monotonic()) < start + RUN_S:
        if pump(max(min(next_kill, start + RUN_S) - now, 0)):
            last_progress = time.monotonic()
        assert time.monotonic() - last_progress < STALL, f"the stream stalled {why}"
        if time.monotonic() < next_kill:
            continue
        kills += 1
        if kills % 2:
            ident = rng.choice([i for i in producers if i not in killed_producers])
            producers[ident].killed()
            killed_producers.add(ident)
            start_producer()
        else:
            ident = rng.choice([i for i in consumers if i not in killed_consumers])
            child = consumers[ident][0]
            child.killed()
            killed_consumers.add(ident)
            deadline = time.monotonic() + WAIT
            while child.fd >= 0:        # what it wrote before it died, to EOF
                assert time.monotonic() < deadline, f"no EOF from a dead consumer {why}"
                take(ident, child.read(WAIT))
            start_consumer()
        next_kill = time.monotonic() + rng.uniform(0.02, 0.15)
    for ident, child in producers.items():
        if ident not in killed_producers:
            assert child.status is None, f"producer {ident} ended early: {child.buf!r} {why}"
    ch.close()                          # producers still sending: they stop, consumers drain
    deadline = time.monotonic() + WAIT
    while any(c.fd >= 0 for c, _ in consumers.values()):
        assert time.monotonic() < deadline, f"consumers did not drain and end {why}"
        pump(0.1)
    for ident, child in producers.items():
        if ident not in killed_producers:
            assert child.wait() == 0, f"producer {ident}: {child.buf + child.read(0)!r} {why}"
    for ident, (child, buf) in consumers.items():
        if ident not in killed_consumers:
            assert child.wait() == 0, f"consumer {ident}: {child.buf!r} {why}"
            assert records[ident][-1] == (-1, -1, END), why
            assert not buf

    got = {}                            # (producer, seq) -> how many times
    for ident, recs in records.items():
        last = {}
        for producer, seq, status in recs:
            if status == END:
                continue
            assert status == OK, f"consumer {ident} got a damaged message {producer, seq} {why}"
            assert seq > last.get(producer, -1), \
                f"consumer {ident}: producer {producer}'s {seq} after {last[producer]} {why}"
            last[producer] = seq
            got[producer, seq] = got.get((producer, seq), 0) + 1
    assert all(n == 1 for n in got.values()), \
        f"delivered twice: {[k for k, n in got.items() if n > 1]} {why}"
    missing = []
    for ident in producers:
        reported = int(sent[ident])
        mine = {seq for p, seq in got if p == ident}
        missing += [(ident, s) for s in range(reported) if s not in mine]
        # Past the count: at most the one a killed producer was sending.
        extra = {s for s in mine if s >= reported}
        assert extra <= ({reported} if ident in killed_producers else set()), \
            f"producer {ident} reported {reported} sent, yet {sorted(extra)} came {why}"
    assert len(missing) <= len(killed_consumers), \
        f"lost {missing}, with {len(killed_consumers)} consumers killed {why}"
    assert len(killed_producers) >= 3 and len(killed_consumers) >= 3, why
    assert len(got) >= 1000, f"only {len(got)} messages went through {why}"
    assert watch.ended and len(watch) == 0
    del sent
    shared.close()
    assert_nothing_left(watch, name)
