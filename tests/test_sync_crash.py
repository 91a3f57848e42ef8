"""Crashes and Ctrl-C: a mutex whose owner is SIGKILLed (or whose owning thread
ends) goes to the next acquirer, abandoned; names of killed holders go away;
a wait blocked without timeout raises KeyboardInterrupt on SIGINT."""
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import closing
import threading
import time

import pytest

import fmap

CHILD_TIMEOUT = 30


def spawn_owner(name, depth=1):
    """A process that opens mutex `name`, acquires it `depth` times, says so
    and sleeps until killed."""
    code = textwrap.dedent(f"""
        import sys, time, fmap
        m = fmap.Mutex.open({name!r})
        for _ in range({depth}):
            m.acquire()
        print("owned", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "owned"
    return p


def kill(p):
    p.send_signal(signal.SIGKILL)
    p.wait(CHILD_TIMEOUT)


def test_sigkill_owner_while_another_waits(name):
    m = fmap.Mutex.create(name)
    try:
        p = spawn_owner(name, depth=3)
        got = []
        waiter = threading.Thread(target=lambda: got.append((m.acquire(timeout=CHILD_TIMEOUT),
                                                            m.abandoned)))
        waiter.start()
        assert m.acquire(timeout=0) is False     # owned by the child
        kill(p)
        waiter.join(CHILD_TIMEOUT)
        assert got == [(True, True)]            # the waiting thread got it, abandoned
        # That thread ended holding it: abandoned again, with depth reset to 1.
        assert m.acquire(timeout=CHILD_TIMEOUT) and m.abandoned
        assert "depth 1" in repr(m)
        m.release()
        assert m.acquire(timeout=0) and not m.abandoned
        m.release()
    finally:
        m.close()


def test_sigkill_owner_waiter_is_another_process(name):
    m = fmap.Mutex.create(name)
    try:
        owner = spawn_owner(name)
        code = textwrap.dedent(f"""
            import sys, fmap
            m = fmap.Mutex.open({name!r})
            print("waiting", flush=True)
            ok = m.acquire(timeout={CHILD_TIMEOUT})
            sys.exit(0 if ok and m.abandoned else 1)
        """)
        waiter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True)
        assert waiter.stdout.readline().strip() == "waiting"
        kill(owner)
        assert waiter.wait(CHILD_TIMEOUT) == 0
        assert m.acquire(timeout=CHILD_TIMEOUT) and m.abandoned   # the waiter died holding it
        m.release()
    finally:
        m.close()


def test_sigkill_owner_nobody_waiting_then_wait_any(name):
    m = fmap.Mutex.create(name)
    e = fmap.Event.create(None)
    try:
        kill(spawn_owner(name))
        assert "abandoned" in repr(m)
        # wait_any sees the abandonment too (no release ever signals it).
        assert fmap.wait_any([e, m], timeout=CHILD_TIMEOUT) == 1
        assert m.abandoned and m.owned
        m.release()
        assert "free" in repr(m)
    finally:
        m.close()
        e.close()


def test_thread_exits_holding_the_mutex(name):
    m = fmap.Mutex.create(name)
    try:
        t = threading.Thread(target=lambda: m.acquire() and m.acquire())
        t.start()
        t.join(CHILD_TIMEOUT)
        with m:                       # blocks until the kernel marks it abandoned
            assert m.abandoned
        with m:
            assert not m.abandoned
    finally:
        m.close()


def test_killed_holders_take_the_names(name):
    code = textwrap.dedent(f"""
        import time, fmap
        objs = [fmap.Mutex.create({name!r} + "m", owned=True),
                fmap.Semaphore.create({name!r} + "s", 1, 2),
                fmap.Event.create({name!r} + "e")]
        print("made", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "made"
    with closing(fmap.Semaphore.open(name + "s")) as s:
        assert s.maximum == 2
    kill(p)
    for cls, suffix in ((fmap.Mutex, "m"), (fmap.Semaphore, "s"), (fmap.Event, "e")):
        with pytest.raises(FileNotFoundError):
            cls.open(name + suffix)


def test_killed_waiter_leaves_the_semaphore_working(name):
    s = fmap.Semaphore.create(name, 0, 1)
    try:
        code = textwrap.dedent(f"""
            import fmap
            s = fmap.Semaphore.open({name!r})
            print("waiting", flush=True)
            s.acquire()
        """)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "waiting"
        time.sleep(0.2)
        kill(p)
        assert s.release() == 0 and s.count == 1      # nothing was taken by the dead
        assert s.acquire(timeout=0) and s.acquire(timeout=0.01) is False
    finally:
        s.close()


# ---- Ctrl-C ---------------------------------------------------------------

WAITS = {
    "event": "w = fmap.Event.create(None); w.wait()",
    "semaphore": "w = fmap.Semaphore.create(None, 0, 1); w.acquire(spin=100)",
    "mutex": "w = fmap.Mutex.open(NAME); w.acquire()",
    "wait_any": "w = fmap.wait_any([fmap.Event.create(None), fmap.Mutex.open(NAME)])",
}


@pytest.mark.parametrize("kind", sorted(WAITS))
def test_ctrl_c_interrupts_a_blocked_wait(name, kind):
    m = fmap.Mutex.create(name, owned=True)    # held here, so the child's waits block
    try:
        code = textwrap.dedent(f"""
            import sys, time, fmap
            NAME = {name!r}
            print("waiting", flush=True)
            try:
                {WAITS[kind]}
            except KeyboardInterrupt:
                print("interrupted", time.monotonic(), flush=True)
                sys.exit(0)
            sys.exit(1)
        """)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "waiting"
            time.sleep(0.3)                    # let it block
            sent = time.monotonic()
            p.send_signal(signal.SIGINT)
            assert p.wait(5) == 0
            word, when = p.stdout.readline().split()
            assert word == "interrupted" and float(when) - sent < 2.0
        finally:
            if p.poll() is None:
                kill(p)
    finally:
        m.release()
        m.close()
