"""Create-or-open is atomic per name (DESIGN.md, "Linux: names over
kernel-counted memory"; contract 2): of many processes racing to create one
name, exactly one creates it and all share its memory."""
import multiprocessing

import numpy as np
import pytest

import fmap
from children import join_all, reap

NPROCS = 16
TIMEOUT = 60


def _racer(me, names, barrier, done, q):
    held = []
    try:
        for name in names:
            barrier.wait(TIMEOUT)       # all 16 call create at the same instant
            try:
                # odd racers ask for exclusive creation; sizes differ on purpose:
                # the creator's size wins for everyone
                m = fmap.create(name, size=4096 * (me + 1), exclusive=bool(me % 2))
            except FileExistsError:
                q.put((name, me, "exists", None))
                m = fmap.open(name)
            else:
                q.put((name, me, m.created, m.size))
            v = m.map()
            v.asarray("uint32")[me] = me + 1      # my own slot
            held.append((m, v))
        q.put(("mapped", me, None, None))
        done.wait(TIMEOUT)                        # hold the objects until the parent looked
    except BaseException as exc:  # noqa: BLE001 - handed to the parent
        q.put(("error", me, repr(exc), None))
    for m, v in held:
        v.close()
        m.close()


@pytest.mark.parametrize("ctx,rounds", [("fork", 10), ("spawn", 2)])
def test_sixteen_processes_race_to_create_one_name(ctx, rounds, name):
    c = multiprocessing.get_context(ctx)
    names = [f"{name}-{r}" for r in range(rounds)]
    barrier = c.Barrier(NPROCS)
    done = c.Event()
    q = c.Queue()
    procs = [c.Process(target=_racer, args=(me, names, barrier, done, q)) for me in range(NPROCS)]
    for p in procs:
        p.start()
    try:
        results = {n: {} for n in names}
        mapped = 0
        while mapped < NPROCS:
            what, me, created, size = q.get(timeout=TIMEOUT)
            assert what != "error", f"racer {me}: {created}"
            if what == "mapped":
                mapped += 1
            else:
                results[what][me] = (created, size)
        for n in names:
            got = results[n]
            assert sorted(got) == list(range(NPROCS))
            creators = [me for me, (created, _) in got.items() if created is True]
            assert len(creators) == 1, f"{n}: created by {creators}"
            size = 4096 * (creators[0] + 1)
            for me, (created, sz) in got.items():
                if me == creators[0]:
                    continue
                # an exclusive loser got FileExistsError, any other loser the existing object
                assert created == ("exists" if me % 2 else False), (me, created)
                if created is False:
                    assert sz == size
            with fmap.open(n, access="r") as m, m.map() as v:
                assert m.size == size
                slots = v.asarray("uint32")[:NPROCS].copy()
            assert (slots == np.arange(1, NPROCS + 1)).all(), f"{n}: {slots}"
        done.set()
        assert join_all(procs, TIMEOUT) == [0] * NPROCS
    finally:
        done.set()
        reap(procs)
    for n in names:
        with pytest.raises(FileNotFoundError):
            fmap.open(n)
