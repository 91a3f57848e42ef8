"""`python -m fmap demo`: fmap's point, shown with real processes in seconds.

A producer creates a named 256 MiB mapping and writes NumPy frames into it; a
consumer opens it by name and reads them in place, with no copy.  The producer
is killed with SIGKILL: the consumer keeps working and the name still opens.
When the last holder is killed too, the memory is back (Shmem in
/proc/meminfo) and the name is free.  For contrast, a POSIX segment whose
creator was killed stays in /dev/shm until someone unlinks it.

Then a producer process streams NumPy frames to two consumer processes
through a fmap.Channel (one copy in, none out: each consumer gets an array
over the message in place), and the same frames through a
multiprocessing.Queue, measured in the same run; every frame is checked.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import fmap

SIZE = 256 << 20
FRAME = (2048, 2048)          # float32: 16 MiB per frame
TIMEOUT = 30.0


def _shmem_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _frame(k: int):
    import numpy as np
    return np.full(FRAME, k, dtype=np.float32) + np.arange(FRAME[1], dtype=np.float32)


def _producer(name: str, conn) -> None:
    m = fmap.create(name, size=SIZE, exclusive=True)
    v = m.map()
    frames = v.asarray("float32", shape=(SIZE // (FRAME[0] * FRAME[1] * 4),) + FRAME)
    frames[:] = 0                         # touch all 256 MiB: it shows in Shmem
    frames[0] = _frame(1)
    conn.send(("ready", os.getpid()))
    while True:                           # until killed
        cmd = conn.recv()
        if cmd[0] == "write":
            frames[0] = _frame(cmd[1])
            conn.send(("written", cmd[1]))


def _consumer(name: str, conn) -> None:
    import numpy as np
    m = fmap.open(name)
    v = m.map()
    frames = v.asarray("float32", shape=(SIZE // (FRAME[0] * FRAME[1] * 4),) + FRAME)
    conn.send(("opened", os.getpid(), m.size, frames.ctypes.data == v.address))
    while True:
        cmd = conn.recv()
        if cmd[0] == "check":
            conn.send(("checked", bool(np.array_equal(frames[0], _frame(cmd[1])))))
        elif cmd[0] == "write":           # keeps working after the creator died
            frames[1] = _frame(cmd[1])
            conn.send(("checked", bool(np.array_equal(frames[1], _frame(cmd[1])))))


def _opener(name: str, conn) -> None:
    import numpy as np
    with fmap.open(name, access="r") as m, m.map() as v:
        frames = v.asarray("float32", shape=(2,) + FRAME)
        ok = bool(np.array_equal(frames[1], _frame(7)))   # what the consumer wrote
        del frames
        conn.send(("opened", m.created, ok))


def _posix_creator(path: str, conn) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 64 << 20)
    os.write(fd, b"x" * (64 << 20))
    conn.send(("ready",))
    time.sleep(3600)


class _Child:
    def __init__(self, ctx, target, *args):
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=args + (child_conn,), daemon=True)
        self.proc.start()

    def ask(self, *cmd):
        if cmd:
            self.conn.send(cmd)
        if not self.conn.poll(TIMEOUT):
            raise TimeoutError(f"demo child {self.proc.pid} did not answer")
        return self.conn.recv()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(TIMEOUT)


def _wait_shmem(target: float, tolerance: float) -> float:
    deadline = time.monotonic() + 10
    while True:
        now = _shmem_mib()
        if abs(now - target) <= tolerance or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


STREAM_FRAME = (512, 512)     # float32: 1 MiB per frame
STREAM_CONSUMERS = 2


def _stream_frame():
    import numpy as np
    return np.random.default_rng(1).random(STREAM_FRAME, dtype=np.float32)


def _stream_producer(kind: str, ch, nframes: int, conn) -> None:
    frame = _stream_frame()
    conn.send(("ready",))
    conn.recv()                                   # go
    t = time.perf_counter()
    for k in range(nframes):
        frame[0, 0] = frame[-1, -1] = k           # the frame's number, at both ends
        if kind == "fmap":
            ch.send_array(frame, timeout=TIMEOUT)
        else:
            # Queue pickles in a background thread: it must be given a copy,
            # or the next frame's number lands in this one
            ch.put(frame.copy(), timeout=TIMEOUT)
    if kind == "fmap":
        ch.close()                                # end of stream: consumers drain, then stop
    else:
        for _ in range(STREAM_CONSUMERS):
            ch.put(None)
    conn.send(("sent", time.perf_counter() - t))


def _stream_consumer(kind: str, ch, conn) -> None:
    import numpy as np
    ref = _stream_frame()
    inner = ref[1:-1, 1:-1]
    conn.send(("ready",))
    got, last, good = 0, -1, True
    while True:
        if kind == "fmap":
            try:
                a = ch.recv_array(timeout=TIMEOUT)   # a view of the message: no copy
            except fmap.EndOfStream:
                break
        else:
            a = ch.get(timeout=TIMEOUT)              # unpickled: a copy
            if a is None:
                break
        k = int(a[0, 0])
        # in order per consumer, intact (a sample of rows), the shape and dtype it was sent with
        good &= (k > last and a[-1, -1] == k and a.shape == STREAM_FRAME and
                 a.dtype == np.float32 and np.array_equal(a[1:-1:97, 1:-1], inner[::97]))
        last = k
        got += 1
        del a                                       # its slot goes back to the producer
    conn.send(("done", got, bool(good)))


def _stream(ctx, kind: str, nframes: int):
    """Frames per second from the producer's first send to the last consumer's end."""
    if kind == "fmap":
        ch = fmap.Channel.create(None, 16, message_size=(STREAM_FRAME[0] * STREAM_FRAME[1] * 4) + 64)
    else:
        ch = ctx.Queue(16)
    consumers = [_Child(ctx, _stream_consumer, kind, ch) for _ in range(STREAM_CONSUMERS)]
    producer = _Child(ctx, _stream_producer, kind, ch, nframes)
    for c in consumers + [producer]:
        c.ask()
    t = time.perf_counter()
    producer.conn.send(("go",))
    results = [c.ask() for c in consumers]
    elapsed = time.perf_counter() - t
    producer.ask()
    for c in consumers + [producer]:
        c.proc.join(TIMEOUT)
    if kind == "fmap":
        ch.detach()
    total = sum(r[1] for r in results)
    return total / elapsed, total == nframes and all(r[2] for r in results), [r[1] for r in results]


def run(out=print) -> bool:
    """Run the demonstration; True when every step behaved as promised."""
    ctx = mp.get_context("spawn")
    name = f"fmap-demo-{os.getpid()}"
    ok = True
    t0 = time.monotonic()

    def step(good: bool, text: str) -> None:
        nonlocal ok
        ok &= good
        out(f"  {'ok ' if good else 'FAIL'} {text}")

    out("fmap demo: shared memory that lives exactly as long as someone holds it\n")
    base = _shmem_mib()
    out(f"  Shmem before: {base:8.1f} MiB")

    producer = _Child(ctx, _producer, name)
    _, ppid = producer.ask()
    step(True, f"producer {ppid} created {name!r} ({SIZE >> 20} MiB) and wrote frame 1 with NumPy")
    consumer = _Child(ctx, _consumer, name)
    _, cpid, size, same = consumer.ask()
    step(size == SIZE and same,
         f"consumer {cpid} opened it by name: size {size} bytes, its array is the view itself (no copy)")
    step(consumer.ask("check", 1)[1], "consumer reads frame 1 in place: identical")
    producer.ask("write", 2)
    step(consumer.ask("check", 2)[1], "producer wrote frame 2; the consumer sees it at once, 0 bytes copied")
    alive = _shmem_mib()
    out(f"  Shmem with the object alive: {alive:8.1f} MiB ({alive - base:+.1f})")

    producer.kill()
    step(True, f"SIGKILL producer {ppid}, the creator")
    step(consumer.ask("write", 7)[1], "consumer still reads and writes the memory")
    opener = _Child(ctx, _opener, name)
    _, created, same7 = opener.ask()
    opener.proc.join(TIMEOUT)
    step(not created and same7, f"a new process opens {name!r} by name and sees the consumer's frame")

    consumer.kill()
    step(True, f"SIGKILL consumer {cpid}, the last holder")
    after = _wait_shmem(base, 8)
    step(abs(after - base) <= 8,
         f"Shmem after: {after:8.1f} MiB ({after - base:+.1f}): the {SIZE >> 20} MiB are back")
    try:
        fmap.open(name).close()
        step(False, f"{name!r} should be free")
    except FileNotFoundError:
        step(True, f"the name is free: fmap.open({name!r}) -> FileNotFoundError")

    out("\n  For contrast, POSIX shared memory (what multiprocessing.shared_memory, posix_ipc")
    out("  and C programs use) lives until someone unlinks it:")
    path = f"/dev/shm/fmap-demo-posix-{os.getpid()}"
    before_posix = _shmem_mib()
    posix = _Child(ctx, _posix_creator, path)
    posix.ask()
    posix.kill()
    leaked = _shmem_mib() - before_posix
    out(f"  {'   '} creator of {path} killed with SIGKILL: the file is "
        f"{'still there' if os.path.exists(path) else 'gone'}, holding {leaked:+.1f} MiB of Shmem")
    try:
        os.unlink(path)                   # the demo cleans up what the crash left
    except FileNotFoundError:
        pass
    mib = STREAM_FRAME[0] * STREAM_FRAME[1] * 4 / (1 << 20)
    out(f"\n  Streaming {mib:.0f} MiB NumPy frames from a producer process to "
        f"{STREAM_CONSUMERS} consumer processes:")
    fps, good, split = _stream(ctx, "fmap", 4000)
    step(good, f"fmap.Channel:          {fps:8.0f} frames/s ({fps * mib / 1024:5.1f} GiB/s), "
               f"every frame checked, split {split}")
    qfps, qgood, qsplit = _stream(ctx, "queue", 1000)
    step(qgood, f"multiprocessing.Queue: {qfps:8.0f} frames/s ({qfps * mib / 1024:5.1f} GiB/s), "
                f"every frame checked, split {qsplit}")
    out(f"  fmap.Channel moved frames {fps / qfps:.1f}x as fast as multiprocessing.Queue")
    out(f"\n{'All steps behaved as promised' if ok else 'SOME STEPS FAILED'} "
        f"({time.monotonic() - t0:.1f} s).")
    return ok
