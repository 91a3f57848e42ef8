"""SetEvent's semantics: a set() releases the threads waiting at that moment.

On Windows, SetEvent satisfies the waits then pending, in the kernel: a
ResetEvent right after it cannot keep those waiters waiting, an auto-reset
event set twice with two threads waiting releases both, and an auto-reset
event set while a thread waits never shows as signalled.  fmap's waiters run
later than the set() that releases them; these tests hold it to Windows'
outcome all the same, with waiters known to be asleep in the kernel (so that
"waiting at that moment" is a fact, not a race), in threads and in processes,
and with waiters killed before and after their release.
"""
import os
import signal
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fmap
from children import asleep_in_futex, children, poll  # noqa: F401 - fixture

CHILD_TIMEOUT = 30


def thread_asleep(t):
    """True when thread t sleeps in a futex wait (its wait slot or word)."""
    return asleep_in_futex(f"self/task/{t.native_id}")


def in_other_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(10)
    return out[0]


class Owner:
    """A thread that owns mutex m until release() or abandon() (then it ends)."""

    def __init__(self, m):
        self.go = threading.Event()
        self.keep = False
        got = threading.Event()

        def run():
            m.acquire()
            got.set()
            self.go.wait(CHILD_TIMEOUT)
            if not self.keep:
                m.release()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert got.wait(10)

    def release(self):
        self.go.set()       # the owner thread releases at once, this one returns
        self.thread.join(10)

    def abandon(self):
        self.keep = True    # the owner thread ends holding the mutex
        tid = self.thread.native_id
        self.release()
        # join() returns once the thread's Python part is done; the kernel's
        # thread exits a little later, and a mutex's owner is gone from then.
        assert poll(lambda: not os.path.exists(f"/proc/self/task/{tid}"))


class Waiter:
    """A thread blocked in one wait (event.wait or wait_any) until released or
    timed out; `result` is what the wait returned."""

    def __init__(self, wait):
        self.result = "pending"
        self.thread = threading.Thread(target=self._run, args=(wait,), daemon=True)
        self.thread.start()
        assert poll(lambda: thread_asleep(self.thread) or not self.thread.is_alive())
        assert self.thread.is_alive(), f"the wait ended at once: {self.result!r}"

    def _run(self, wait):
        self.result = wait()

    def done(self, timeout=5.0):
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture
def event():
    made = []

    def make(name=None, **kwargs):
        e = fmap.Event.create(name, **kwargs)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


# ---- threads waiting ------------------------------------------------------

def test_an_auto_reset_event_set_twice_releases_two_waiters(event):
    e = event()
    for _ in range(5):
        ws = [Waiter(lambda: e.wait(timeout=CHILD_TIMEOUT)) for _ in range(2)]
        e.set()
        e.set()                        # at once: neither waiter has run yet
        assert all(w.done() for w in ws)
        assert [w.result for w in ws] == [True, True]
        assert not e.is_set()          # both sets went to waiters


def test_an_auto_reset_event_set_while_a_thread_waits_never_shows_set(event):
    e = event()
    w = Waiter(lambda: e.wait(timeout=CHILD_TIMEOUT))
    e.set()
    # SetEvent released the waiter; the event stayed unsignalled throughout.
    assert not e.is_set() and e.wait(0) is False
    assert w.done() and w.result is True


def test_a_reset_right_after_a_set_keeps_no_auto_reset_waiter(event):
    e = event()
    for _ in range(5):
        w = Waiter(lambda: e.wait(timeout=CHILD_TIMEOUT))
        e.set()
        e.reset()
        assert w.done() and w.result is True


def test_a_reset_right_after_a_set_keeps_no_manual_reset_waiter(event):
    e = event(manual_reset=True)
    ws = [Waiter(lambda: e.wait(timeout=CHILD_TIMEOUT)) for _ in range(4)]
    e.set()
    e.reset()
    assert all(w.done() for w in ws) and [w.result for w in ws] == [True] * 4
    # A wait that begins after the reset is not released by the earlier set.
    assert e.wait(0) is False and e.wait(0.05) is False


def test_a_set_and_reset_with_nobody_waiting_release_nobody_later(event):
    for manual in (False, True):
        e = event(manual_reset=manual)
        e.set()
        e.reset()
        assert e.wait(0) is False and e.wait(0.05) is False
        w = Waiter(lambda: e.wait(timeout=0.3))
        assert w.done() and w.result is False


def test_wait_any_is_released_by_the_first_set(event):
    a, b = event(), event()
    w = Waiter(lambda: fmap.wait_any([a, b], timeout=CHILD_TIMEOUT))
    b.set()
    a.set()                            # after b: b released the wait, a stays set
    assert w.done() and w.result == 1
    assert a.is_set() and not b.is_set()


def test_wait_any_keeps_a_release_that_a_reset_followed(event):
    a, m = event(), event(manual_reset=True)
    for ev in (a, m):
        w = Waiter(lambda: fmap.wait_any([a, m], timeout=CHILD_TIMEOUT))
        ev.set()
        ev.reset()
        assert w.done() and w.result == [a, m].index(ev)


@pytest.mark.parametrize("kind", ["semaphore", "manual event", "mutex"])
def test_wait_any_takes_what_was_signalled_before_the_set(event, kind):
    # The object signalled first satisfied the wait, on Windows at that very
    # moment: a set() of an auto-reset event right after it finds the wait
    # over, and stays signalled.
    if kind == "semaphore":
        first = fmap.Semaphore.create(None, 0, 1)
        signal_first = first.release
    elif kind == "mutex":
        first = in_other_thread(lambda: fmap.Mutex.create(None, owned=True))
        signal_first = None
    else:
        first = event(manual_reset=True)
        signal_first = first.set
    a = event()
    try:
        for _ in range(3):
            if kind == "mutex":
                owner = Owner(first)
                signal_first = owner.release
            w = Waiter(lambda: fmap.wait_any([first, a], timeout=CHILD_TIMEOUT))
            signal_first()
            a.set()
            assert w.done() and w.result == 0
            assert a.is_set() and a.wait(0)
            if kind == "semaphore":
                assert first.count == 0
            elif kind == "mutex":
                in_other_thread(lambda: first.release() if first.owned else None)
            else:
                first.reset()
    finally:
        if kind != "manual event":
            first.close()


def child_acts_while_we_hold_the_gil(children, name, act, before=None, hold=0.05):
    """Run `act` (code using e, a named auto-reset event `name`, and s, a
    semaphore `name`.s) in a child process while this process holds the GIL:
    no system call, no thread switch.  A thread of ours that a wait released
    meanwhile cannot get back into Python.  `before` runs first, with the
    GIL held as well; `hold` seconds pass between it and the child's act."""
    flag = fmap.create(name + ".flag", size=1)
    code = textwrap.dedent(f"""
        import time, fmap
        e = fmap.Event.open({name!r})
        s = fmap.Semaphore.open({name + ".s"!r})
        flag = fmap.open({name + ".flag"!r})
        with flag.map() as v:
            print("ready", flush=True)
            while v[0] != 1:
                time.sleep(0.001)
            {act}
            v[0] = 2
    """)
    c = children(code)
    c.expect("ready")
    old_interval = sys.getswitchinterval()
    try:
        with flag.map() as v:
            sys.setswitchinterval(CHILD_TIMEOUT)
            if before:
                before()
            t0 = time.monotonic()
            while time.monotonic() - t0 < hold:
                pass
            v[0] = 1
            while v[0] != 2 and time.monotonic() - t0 < CHILD_TIMEOUT:
                pass
            sys.setswitchinterval(old_interval)
            assert v[0] == 2
    finally:
        sys.setswitchinterval(old_interval)
        flag.close()


@pytest.fixture
def event_and_semaphore(name, event):
    s = fmap.Semaphore.create(name + ".s", 0, 1)
    yield event(name), s
    s.close()


def test_wait_any_leaves_its_other_slots_at_once(name, children, event_and_semaphore):
    # A wait satisfied by one object gives up its slots on the others when
    # it ends, before its thread has the GIL back: a set() and reset() from
    # another process meanwhile release nobody, as on Windows.
    a, s = event_and_semaphore
    w = Waiter(lambda: fmap.wait_any([s, a], timeout=CHILD_TIMEOUT))
    child_acts_while_we_hold_the_gil(children, name, "e.set(); e.reset()", before=s.release)
    assert w.done() and w.result == 0
    assert not a.is_set() and a.wait(0) is False


def test_wait_any_orders_what_comes_between_its_slices(name, children, event_and_semaphore):
    # The waiting thread is between two slices (its slice ended while we
    # hold the GIL): an event set and then a semaphore released meanwhile;
    # the set came first and satisfied the wait, the unit stays.
    a, s = event_and_semaphore
    w = Waiter(lambda: fmap.wait_any([s, a], timeout=CHILD_TIMEOUT))
    child_acts_while_we_hold_the_gil(children, name, "e.set(); time.sleep(0.01); s.release()",
                                     hold=0.1)
    assert w.done() and w.result == 1
    assert s.count == 1 and not a.is_set()


def signalled_object(kind, event):
    """(an object of kind, signalled; whether it still is)."""
    if kind == "semaphore":
        s = fmap.Semaphore.create(None, 1, 1)
        return s, lambda: s.count == 1
    e = event(manual_reset=kind == "manual event")
    e.set()
    return e, e.is_set


@pytest.mark.parametrize("timeout", [0, CHILD_TIMEOUT, None])
@pytest.mark.parametrize("kind", ["semaphore", "auto event", "manual event"])
def test_wait_any_takes_an_abandoned_mutex_before_a_later_object(event, kind, timeout):
    # WaitForMultipleObjects returns the lowest index signalled, and a mutex
    # is signalled (abandoned) from its owner's death on.  Nothing in a
    # mutex's word says so: a wait_any with a timeout once took the later
    # object, every time, and never reported the abandonment while that one
    # kept being signalled.
    m = fmap.Mutex.create(None)
    later, still_signalled = signalled_object(kind, event)
    try:
        Owner(m).abandon()
        assert fmap.wait_any([m, later], timeout=timeout) == 0
        assert m.owned and m.abandoned
        assert still_signalled()
        m.release()
    finally:
        m.close()
        if kind == "semaphore":
            later.close()


def test_wait_any_asleep_takes_a_mutex_abandoned_before_the_set(event):
    # The owner dies while the wait sleeps (nothing wakes it: a death is
    # asked after), then an auto-reset event at a later index is set.  On
    # Windows the mutex was signalled first; the set's release is passed on.
    m = fmap.Mutex.create(None)
    a = event()
    try:
        for _ in range(3):
            owner = Owner(m)
            w = Waiter(lambda: fmap.wait_any([m, a], timeout=CHILD_TIMEOUT))
            owner.abandon()
            a.set()
            assert w.done() and w.result == 0
            assert a.is_set() and a.wait(0)
            assert in_other_thread(lambda: m.owned) is False
            m.acquire(timeout=0)            # ours now: the waiter thread is gone too
            m.release()
    finally:
        m.close()


def test_two_wait_any_waiters_and_two_sets(event):
    a, b = event(), event()
    ws = [Waiter(lambda: fmap.wait_any([a, b], timeout=CHILD_TIMEOUT)) for _ in range(2)]
    a.set()
    a.set()
    assert all(w.done() for w in ws) and [w.result for w in ws] == [0, 0]
    assert not a.is_set() and not b.is_set()


def test_an_interrupted_wait_passes_its_release_on(event):
    # A signal handler that sets the event releases this very thread's wait,
    # then ends it with an exception: the release must reach the next waiter,
    # not vanish with the interrupted wait.
    e = event()
    other = Waiter(lambda: e.wait(timeout=CHILD_TIMEOUT))

    class Stop(Exception):
        pass

    def handler(signum, frame):
        e.set()
        e.set()                        # one for `other`, one for the main thread
        raise Stop

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Stop):
            e.wait(timeout=CHILD_TIMEOUT)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert other.done() and other.result is True
    # The main thread's release was passed on; nobody else waits, so it
    # signalled the event.
    assert e.is_set() and e.wait(0) is True and not e.is_set()


def test_more_waiters_than_wait_slots(event):
    # 128 slots per event; the rest wait on the event's word.  Every set
    # releases one, and the slots are all free again at the end.
    e = event()
    results = []
    threads = [threading.Thread(target=lambda: results.append(e.wait(timeout=CHILD_TIMEOUT)),
                                daemon=True) for _ in range(140)]
    for t in threads:
        t.start()
    assert poll(lambda: all(thread_asleep(t) for t in threads), timeout=CHILD_TIMEOUT)
    # The 12 without a slot look for one at each slice, without burning CPU.
    cpu0, t0 = time.process_time(), time.monotonic()
    time.sleep(0.5)
    cpu = (time.process_time() - cpu0) / (time.monotonic() - t0)
    assert cpu < 0.3, f"{cpu:.0%} of a CPU while 140 waiters sleep"
    for i in range(140):
        e.set()
        # one at a time: a waiter on the word is released by the signal, which
        # a second set() before it runs would not add to
        assert poll(lambda: len(results) > i and not e.is_set(), timeout=CHILD_TIMEOUT), \
            f"set {i} released nobody"
    assert all(t.join(5) or not t.is_alive() for t in threads)
    assert results == [True] * 140
    ws = [Waiter(lambda: e.wait(timeout=CHILD_TIMEOUT)) for _ in range(2)]
    e.set()
    e.set()
    assert all(w.done() for w in ws) and [w.result for w in ws] == [True, True]


# ---- a model of Windows, under random sequences -------------------------

OPS = st.lists(st.sampled_from(["set", "reset", "wait", "wait_any"]), min_size=1, max_size=10)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(manual=st.booleans(), ops=OPS)
def test_events_follow_windows_under_random_sequences(event, manual, ops):
    """After each operation, with every waiter asleep in the kernel: is_set()
    and the number of waits released are what Windows gives."""
    e = event(manual_reset=manual)
    other = event()                       # never set: a second object for wait_any
    signalled, blocked, released = False, 0, 0
    waiters = []
    for op in ops:
        if op == "set":
            e.set()
            if manual:
                signalled, released, blocked = True, released + blocked, 0
            elif blocked:
                blocked, released = blocked - 1, released + 1
            else:
                signalled = True
        elif op == "reset":
            e.reset()
            signalled = False
        else:
            if op == "wait":
                def wait():
                    return e.wait(timeout=CHILD_TIMEOUT)
            else:
                def wait():
                    return fmap.wait_any([other, e], timeout=CHILD_TIMEOUT) == 1
            if signalled:
                assert wait() is True     # a signalled event: through at once
                signalled = manual
                continue
            waiters.append(Waiter(wait))
            blocked += 1
        assert e.is_set() == signalled, (op, ops)
        assert poll(lambda: sum(w.result is True for w in waiters) == released,
                    timeout=CHILD_TIMEOUT), (ops, [w.result for w in waiters])
    time.sleep(0.02)                      # nobody else comes through late
    assert sum(w.result is True for w in waiters) == released, ops
    while any(w.result == "pending" for w in waiters):
        e.set()
        time.sleep(0.001)
    assert all(w.done() and w.result is True for w in waiters)


# ---- processes ------------------------------------------------------------

def spawn_waiter(children, name, how="wait"):
    """A process blocked on event `name`: prints `released` when its wait
    returns True; we return once it sleeps in the kernel."""
    call = {"wait": f"e.wait(timeout={CHILD_TIMEOUT})",
            "wait_any": f"fmap.wait_any([fmap.Event.create(None), e], timeout={CHILD_TIMEOUT}) == 1"}
    code = textwrap.dedent(f"""
        import fmap
        e = fmap.Event.open({name!r})
        print("waiting", flush=True)
        print("released" if {call[how]} else "timed out", flush=True)
    """)
    c = children(code)
    c.expect("waiting")
    assert poll(lambda: asleep_in_futex(c.pid), timeout=CHILD_TIMEOUT)
    return c


@pytest.mark.parametrize("how", ["wait", "wait_any"])
def test_processes_released_by_back_to_back_sets(name, children, event, how):
    e = event(name)
    ps = [spawn_waiter(children, name, how=how) for _ in range(3)]
    e.set()
    e.set()
    e.reset()
    e.set()
    for p in ps:
        assert p.expect("released", timeout=10) == "released"
        assert p.wait(10) == 0
    assert not e.is_set()


def test_manual_reset_processes_released_by_a_set_and_reset(name, children, event):
    e = event(name, manual_reset=True)
    ps = [spawn_waiter(children, name) for _ in range(3)]
    e.set()
    e.reset()
    for p in ps:
        assert p.expect("released", timeout=10) == "released"


def test_a_waiter_killed_while_waiting_takes_no_set(name, children, event):
    e = event(name)
    dead = spawn_waiter(children, name)
    dead.kill()
    live = spawn_waiter(children, name)
    e.set()                                    # to the live waiter, not the dead
    assert live.expect("released", timeout=10) == "released"
    assert not e.is_set()
    e.set()                                    # nobody waits: signalled
    assert e.is_set() and e.wait(0) is True


def test_a_release_left_by_a_killed_waiter_is_passed_on(name, children, event):
    e = event(name)
    victim = spawn_waiter(children, name)
    os.kill(victim.pid, signal.SIGSTOP)        # asleep: set() wakes it, it cannot run
    e.set()
    assert not e.is_set()                      # released to the stopped waiter
    victim.kill()
    # The next try finds the release of a waiter that is gone, and takes it:
    # a loop of tries, not only a long wait (which looks each slice).
    assert poll(lambda: e.wait(0), timeout=2.0) is True
    assert not e.is_set() and e.wait(0) is False
