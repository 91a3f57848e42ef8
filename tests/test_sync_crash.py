"""Crashes and Ctrl-C: a mutex whose owner is SIGKILLed (or whose owning thread
ends) goes to the next acquirer, abandoned; names of killed holders go away;
a wait blocked without timeout raises KeyboardInterrupt on SIGINT.

Children are tests/children.py's: every read from them is bounded and the
fixture kills them at teardown, so a failed test leaves no child blocked on a
mutex or sleeping with a handle."""
import signal
import textwrap
from contextlib import closing
import threading
import time

import pytest

import fmap
from children import SIGINT_RAISES, asleep_in_futex, children, poll  # noqa: F401 - fixture

CHILD_TIMEOUT = 30


def spawn_owner(children, name, depth=1):
    """A process that opens mutex `name`, acquires it `depth` times, says so
    and waits until killed (or until its stdin closes)."""
    code = textwrap.dedent(f"""
        import sys, fmap
        m = fmap.Mutex.open({name!r})
        for _ in range({depth}):
            m.acquire(timeout={CHILD_TIMEOUT})
        print("owned", m.owned, flush=True)
        sys.stdin.read()
    """)
    c = children(code)
    assert c.expect("owned") == "owned True"
    return c


def kill(child):
    child.kill()
    assert child.proc.returncode == -signal.SIGKILL


def test_sigkill_owner_while_another_waits(name, children):
    m = fmap.Mutex.create(name)
    try:
        p = spawn_owner(children, name, depth=3)
        got = []
        waiter = threading.Thread(target=lambda: got.append((m.acquire(timeout=CHILD_TIMEOUT),
                                                            m.abandoned)), daemon=True)
        waiter.start()
        assert m.acquire(timeout=0) is False     # owned by the child
        kill(p)
        waiter.join(CHILD_TIMEOUT)
        assert not waiter.is_alive()
        assert got == [(True, True)]            # the waiting thread got it, abandoned
        # That thread ended holding it: abandoned again, with depth reset to 1.
        assert m.acquire(timeout=CHILD_TIMEOUT) and m.abandoned
        assert "depth 1" in repr(m)
        m.release()
        assert m.acquire(timeout=0) and not m.abandoned
        m.release()
    finally:
        m.close()


def test_sigkill_owner_waiter_is_another_process(name, children):
    m = fmap.Mutex.create(name)
    try:
        owner = spawn_owner(children, name)
        code = textwrap.dedent(f"""
            import sys, fmap
            m = fmap.Mutex.open({name!r})
            print("waiting", flush=True)
            ok = m.acquire(timeout={CHILD_TIMEOUT})
            sys.exit(0 if ok and m.abandoned else 1)
        """)
        waiter = children(code)
        waiter.expect("waiting")
        kill(owner)
        assert waiter.wait(CHILD_TIMEOUT) == 0
        assert m.acquire(timeout=CHILD_TIMEOUT) and m.abandoned   # the waiter died holding it
        m.release()
    finally:
        m.close()


def test_sigkill_owner_nobody_waiting_then_wait_any(name, children):
    m = fmap.Mutex.create(name)
    e = fmap.Event.create(None)
    try:
        kill(spawn_owner(children, name))
        assert "abandoned" in repr(m)
        # wait_any sees the abandonment too (no release ever signals it).
        assert fmap.wait_any([e, m], timeout=CHILD_TIMEOUT) == 1
        assert m.abandoned and m.owned
        m.release()
        assert "free" in repr(m)
    finally:
        m.close()
        e.close()


def zombie(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("wait", ["acquire", "wait_any"])
def test_an_owner_asked_after_often_is_found_dead_unreaped(name, children, wait):
    # A live owner asked after again and again (tries; a wait_any whose later
    # object is signalled every time) is taken to be alive on kill()'s word
    # for a while after /proc last said so: /proc alone tells that a killed
    # process's main thread, still a zombie, is dead.  Its death must still
    # be found, within that while, with nobody reaping it.
    m = fmap.Mutex.create(name)
    s = fmap.Semaphore.create(None, 0, 1)
    try:
        owner = spawn_owner(children, name)

        def attempt():
            if wait == "acquire":
                return m.acquire(timeout=0)
            s.release()
            i = fmap.wait_any([m, s], timeout=CHILD_TIMEOUT)
            assert i == 0 or s.count == 0
            return i == 0

        for _ in range(200):
            assert not attempt()
        owner.proc.send_signal(signal.SIGKILL)
        assert poll(lambda: zombie(owner.pid))
        t0 = time.monotonic()
        while not attempt():
            assert time.monotonic() - t0 < 2.0, "a dead owner still taken to be alive"
        assert m.abandoned and m.owned
        m.release()
    finally:
        s.close()
        m.close()


@pytest.mark.parametrize("wait", ["acquire", "wait_any"])
def test_an_owner_killed_during_a_signal_storm_is_noticed(name, children, wait):
    # Nothing wakes a mutex's waiters when its owner dies: they ask.  An
    # interval timer whose signals come more often than the waiter's poll
    # (a profiler's, an app's SIGALRM) ends every sleep with EINTR; a first
    # version asked only after a full poll, so the waiter never noticed and
    # got the mutex only at its deadline (or never, without one).  The waiter
    # is a child, so the timer disturbs nothing else.
    m = fmap.Mutex.create(name)
    try:
        owner = spawn_owner(children, name)
        code = textwrap.dedent(f"""
            import signal, time, fmap
            m = fmap.Mutex.open({name!r})
            signal.signal(signal.SIGALRM, lambda *a: None)
            signal.setitimer(signal.ITIMER_REAL, 0.003, 0.003)
            print("waiting", flush=True)
            t0 = time.monotonic()
            got = (m.acquire(timeout=8) if {wait!r} == "acquire"
                   else fmap.wait_any([m], timeout=8) == 0)
            took = time.monotonic() - t0
            signal.setitimer(signal.ITIMER_REAL, 0)
            print("got", got, m.abandoned, took, flush=True)
        """)
        waiter = children(code)
        waiter.expect("waiting")
        time.sleep(0.3)                   # asleep in the wait, the timer running
        kill(owner)
        got = waiter.expect("got", timeout=CHILD_TIMEOUT).split()
        assert got[1:3] == ["True", "True"], got
        assert float(got[3]) < 4, f"noticed only after {got[3]} s"
    finally:
        m.close()


def test_thread_exits_holding_the_mutex(name):
    m = fmap.Mutex.create(name)
    try:
        t = threading.Thread(target=lambda: m.acquire() and m.acquire(), daemon=True)
        t.start()
        t.join(CHILD_TIMEOUT)
        assert not t.is_alive()
        # join() returns before the OS thread is gone; the mutex reads as
        # abandoned once it is.  Wait for that (bounded), so that the `with`
        # below cannot block for good.
        assert poll(lambda: "abandoned" in repr(m), timeout=CHILD_TIMEOUT), repr(m)
        with m:
            assert m.abandoned
        with m:
            assert not m.abandoned
    finally:
        m.close()


def test_killed_holders_take_the_names(name, children):
    code = textwrap.dedent(f"""
        import sys, fmap
        objs = [fmap.Mutex.create({name!r} + "m", owned=True),
                fmap.Semaphore.create({name!r} + "s", 1, 2),
                fmap.Event.create({name!r} + "e")]
        print("made", flush=True)
        sys.stdin.read()
    """)
    p = children(code)
    p.expect("made")
    with closing(fmap.Semaphore.open(name + "s")) as s:
        assert s.maximum == 2
    kill(p)
    for cls, suffix in ((fmap.Mutex, "m"), (fmap.Semaphore, "s"), (fmap.Event, "e")):
        with pytest.raises(FileNotFoundError):
            cls.open(name + suffix)


def test_killed_waiter_leaves_the_semaphore_working(name, children):
    s = fmap.Semaphore.create(name, 0, 1)
    try:
        code = textwrap.dedent(f"""
            import fmap
            s = fmap.Semaphore.open({name!r})
            print("waiting", flush=True)
            s.acquire(timeout={CHILD_TIMEOUT})
        """)
        p = children(code)
        p.expect("waiting")
        # Killed while blocked in the wait (it reaches it within a few ms).
        assert poll(lambda: asleep_in_futex(p.pid), timeout=CHILD_TIMEOUT)
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
def test_ctrl_c_interrupts_a_blocked_wait(name, kind, children):
    m = fmap.Mutex.create(name, owned=True)    # held here, so the child's waits block
    try:
        code = SIGINT_RAISES + textwrap.dedent(f"""
            import sys, time, fmap
            NAME = {name!r}
            try:
                print("waiting", flush=True)
                {WAITS[kind]}
            except KeyboardInterrupt:
                print("interrupted", time.monotonic(), flush=True)
                sys.exit(0)
            sys.exit(1)
        """)
        p = children(code)     # its wait has no timeout: the fixture kills it if need be
        p.expect("waiting")
        assert poll(lambda: asleep_in_futex(p.pid), timeout=CHILD_TIMEOUT)
        sent = time.monotonic()
        p.proc.send_signal(signal.SIGINT)
        word, when = p.expect("interrupted", timeout=5).split()
        assert float(when) - sent < 2.0
        assert p.wait(5) == 0
    finally:
        m.release()
        m.close()
