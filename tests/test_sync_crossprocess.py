"""Mutex, Semaphore and Event between real processes, spawned and forked.

Children get objects by name, by pickling (multiprocessing passes the
handles) and, for unnamed objects, by fork().  Every join is bounded, every
wait in a child has a timeout, and whatever a failed test leaves alive is
killed in its finally; a child reports failure through its exit code."""
import multiprocessing as mp
import os
import time

import pytest

import fmap
from children import join_all, reap, wait_pid

CONTEXTS = ["fork", "spawn"]
JOIN = 60


def run_all(ctx, target, argss):
    procs = [ctx.Process(target=target, args=args) for args in argss]
    try:
        for p in procs:
            p.start()
        assert join_all(procs, JOIN) == [0] * len(procs)
    finally:
        reap(procs)


# ---- 8 processes x 10,000 increments under one mutex ------------------------

def _increment(mutex_name, mem_name, n):
    m = fmap.Mutex.open(mutex_name)
    mem = fmap.open(mem_name)
    with mem.map() as v:
        a = v.asarray("int64", shape=(1,))
        for _ in range(n):
            with m:
                if m.abandoned:
                    os._exit(3)
                a[0] += 1         # a read-modify-write that races without the mutex
        del a
    m.close()
    mem.close()


@pytest.mark.parametrize("method", CONTEXTS)
def test_mutex_counter_exact_total(name, method):
    ctx = mp.get_context(method)
    m = fmap.Mutex.create(name + ".lock")
    mem = fmap.create(name + ".mem", size=8)
    try:
        run_all(ctx, _increment, [(name + ".lock", name + ".mem", 10_000)] * 8)
        with mem.map() as v:
            assert bytes(v[:8]) == (80_000).to_bytes(8, "little")
    finally:
        m.close()
        mem.close()


# ---- semaphores ----------------------------------------------------------

def _produce(sem, n):
    for _ in range(n):
        sem.release()
    sem.close()


def _consume(sem, n):
    for _ in range(n):
        if not sem.acquire(timeout=30):
            os._exit(4)
    sem.close()


@pytest.mark.parametrize("method", CONTEXTS)
def test_semaphore_producers_consumers(name, method):
    ctx = mp.get_context(method)
    sem = fmap.Semaphore.create(name, 0, 1 << 20)     # handles passed by pickling
    try:
        procs = [ctx.Process(target=_consume, args=(sem, 2000)) for _ in range(3)]
        procs += [ctx.Process(target=_produce, args=(sem, 3000)) for _ in range(2)]
        try:
            for p in procs:
                p.start()
            assert join_all(procs, JOIN) == [0] * 5
        finally:
            reap(procs)
        assert sem.count == 0
    finally:
        sem.close()


def _limited(sem_name, lock_name, mem_name, rounds):
    sem = fmap.Semaphore.open(sem_name)
    lock = fmap.Mutex.open(lock_name)
    mem = fmap.open(mem_name)
    with mem.map() as v:
        a = v.asarray("int64", shape=(2,))    # [inside now, most ever inside]
        for _ in range(rounds):
            if not sem.acquire(timeout=30):
                os._exit(4)
            with lock:
                a[0] += 1
                a[1] = max(a[1], a[0])
            with lock:
                a[0] -= 1
            sem.release()
        del a
    for h in (sem, lock, mem):
        h.close()


def test_semaphore_limits_concurrency(name):
    ctx = mp.get_context("fork")
    sem = fmap.Semaphore.create(name + ".sem", 2, 2)
    lock = fmap.Mutex.create(name + ".lock")
    mem = fmap.create(name + ".mem", size=16)
    try:
        run_all(ctx, _limited, [(name + ".sem", name + ".lock", name + ".mem", 1500)] * 5)
        with mem.map() as v:
            inside, most = v.asarray("int64", shape=(2,)).tolist()
        assert inside == 0 and 1 <= most <= 2
        assert sem.count == 2
    finally:
        for h in (sem, lock, mem):
            h.close()


# ---- events --------------------------------------------------------------

def _pong(ping, pong, mem_name, rounds):
    mem = fmap.open(mem_name)
    with mem.map() as v:
        a = v.asarray("int64", shape=(1,))
        for i in range(rounds):
            if not ping.wait(timeout=30):
                os._exit(4)
            if a[0] != 2 * i + 1:           # strict alternation
                os._exit(5)
            a[0] += 1
            pong.set()
        del a
    mem.close()
    ping.close()
    pong.close()


@pytest.mark.parametrize("method", CONTEXTS)
def test_event_ping_pong(name, method):
    ctx = mp.get_context(method)
    ping = fmap.Event.create(name + ".ping")
    pong = fmap.Event.create(name + ".pong")
    mem = fmap.create(name + ".mem", size=8)
    rounds = 2000
    p = ctx.Process(target=_pong, args=(ping, pong, name + ".mem", rounds))
    try:
        p.start()
        with mem.map() as v:          # bytes, not an array: a failed assert must not
            for i in range(rounds):   # turn into a BufferError when the view closes
                v[:8] = (2 * i + 1).to_bytes(8, "little")
                ping.set()
                assert pong.wait(timeout=30), f"round {i}: no answer; partner {p.exitcode}"
                assert int.from_bytes(v[:8], "little") == 2 * i + 2
        assert join_all([p], JOIN) == [0]
    finally:
        reap([p])
        for h in (ping, pong, mem):
            h.close()


def _broadcast_waiter(go_name, done):
    go = fmap.Event.open(go_name)
    ok = go.wait(timeout=30)
    go.close()
    done.release()
    os._exit(0 if ok else 4)


def test_manual_event_releases_every_process(name):
    ctx = mp.get_context("fork")
    go = fmap.Event.create(name, manual_reset=True)
    done = fmap.Semaphore.create(None, 0, 100)        # unnamed: inherited by fork
    procs = [ctx.Process(target=_broadcast_waiter, args=(name, done)) for _ in range(6)]
    try:
        for p in procs:
            p.start()
        go.set()
        assert join_all(procs, JOIN) == [0] * 6
        assert done.count == 6 and go.is_set()
    finally:
        reap(procs)
        go.close()
        done.close()


def _auto_waiter(ev, done, lock, mem_name):
    # Until the parent says it is done, not until a quiet spell: a parent
    # descheduled for a while on a loaded machine must not end the waiters.
    mem = fmap.open(mem_name)
    with mem.map() as v:
        a = v.asarray("int64", shape=(1,))
        while not done.is_set():
            if ev.wait(timeout=0.1):
                with lock:
                    a[0] += 1
        del a
    mem.close()


def test_auto_event_releases_one_process_per_set(name):
    ctx = mp.get_context("fork")
    ev = fmap.Event.create(None)
    done = fmap.Event.create(None, manual_reset=True)
    lock = fmap.Mutex.create(None)
    mem = fmap.create(name, size=8)
    sets = 200
    procs = [ctx.Process(target=_auto_waiter, args=(ev, done, lock, name)) for _ in range(4)]
    try:
        for p in procs:
            p.start()
        for i in range(sets):
            ev.set()
            # The set is consumed by exactly one wait; wait for it before the next set.
            deadline = time.monotonic() + JOIN
            while ev.is_set():
                assert time.monotonic() < deadline, f"set {i} was never taken"
                os.sched_yield()
        done.set()
        assert join_all(procs, JOIN) == [0] * 4
        with mem.map() as v:
            assert int.from_bytes(v[:8], "little") == sets
    finally:
        reap(procs)
        for h in (ev, done, lock, mem):
            h.close()


# ---- fork, pickling, wait_any ------------------------------------------

def test_unnamed_objects_follow_fork():
    ev = fmap.Event.create(None)
    back = fmap.Event.create(None, manual_reset=True)
    m = fmap.Mutex.create(None, owned=True)
    pid = os.fork()
    if pid == 0:
        # Whatever happens, this copy of pytest must not return into the run.
        ok = False
        try:
            ok = ev.wait(timeout=30)
            # The parent owns the mutex; a forked child does not.
            ok = ok and not m.owned and m.acquire(timeout=30)
            if ok:
                m.release()
            back.set()
        except BaseException:  # noqa: BLE001 - reported by the exit code
            ok = False
        finally:
            os._exit(0 if ok else 1)
    try:
        try:
            ev.set()
            m.release()
            answered = back.wait(timeout=30)
        finally:
            status = wait_pid(pid)        # bounded: kills the child if it overstays
    finally:
        for h in (ev, back, m):
            h.close()
    assert answered and status == 0


def _wait_any_child(objs, report):
    i = fmap.wait_any(objs, timeout=30)
    report.release(10 + (i if i is not None else 50))
    os._exit(0)


@pytest.mark.parametrize("method", CONTEXTS)
def test_wait_any_across_processes(name, method):
    ctx = mp.get_context(method)
    objs = [fmap.Event.create(name + ".e"), fmap.Semaphore.create(None, 0, 1)]
    report = fmap.Semaphore.create(name + ".r", 0, 100)
    p = ctx.Process(target=_wait_any_child, args=(objs, report))
    try:
        p.start()
        objs[1].release()
        assert join_all([p], JOIN) == [0]
        assert report.count == 11 and objs[1].count == 0
    finally:
        reap([p])
        for h in objs + [report]:
            h.close()
