"""The consumer-side checks of benchmarks/channel.py: its figures are only
worth something if a wrong message cannot pass them."""
import importlib.util
import os
import sys

import pytest
from hypothesis import given, settings, strategies as st

np = pytest.importorskip("numpy")

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "channel.py")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, os.path.dirname(_PATH))     # for its `import _common`
    try:
        spec = importlib.util.spec_from_file_location("bench_channel", _PATH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod               # dataclasses look it up there
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(_PATH))
    yield mod
    sys.modules.pop("bench_channel", None)


@pytest.fixture(scope="module")
def small(bench):
    pay = bench.Payload(bench.SECTIONS["a"])
    return pay, pay.prebuilt(3 * bench.BLOCK)


def flip(msg: bytes, at: int) -> bytes:
    b = bytearray(msg)
    b[at] ^= 0x40
    return bytes(b)


@pytest.mark.parametrize("start, count", [(0, 1), (0, 1024), (5, 1000), (1024, 1087),
                                          (7, 2048), (3, 3)])
def test_block_passes_the_right_messages(bench, small, start, count):
    pay, msgs = small
    pay.lost = 0
    assert pay.block(msgs[start:start + count], start) == start + count
    assert pay.lost == 0


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_block_catches_any_wrong_byte(bench, small, data):
    # Every byte of every 64 B message is checked, not only every 64th body.
    pay, msgs = small
    count = data.draw(st.integers(1, 2 * bench.BLOCK), label="count")
    start = data.draw(st.integers(0, len(msgs) - count), label="start")
    i = data.draw(st.integers(0, count - 1), label="which")
    at = data.draw(st.integers(0, pay.L - 1), label="byte")
    part = list(msgs[start:start + count])
    part[i] = flip(part[i], at)
    with pytest.raises(bench.Corrupt):
        pay.block(part, start)


def test_block_counts_gaps_and_refuses_repeats_and_reordering(bench, small):
    pay, msgs = small
    pay.lost = 0
    gap = msgs[:100] + msgs[103:500]
    assert pay.block(gap, 0) == 500 and pay.lost == 3
    with pytest.raises(bench.Corrupt, match="repeated or reordered"):
        pay.block(msgs[:10] + msgs[9:20], 0)
    swapped = list(msgs[:20])
    swapped[4], swapped[5] = swapped[5], swapped[4]
    with pytest.raises(bench.Corrupt):
        pay.block(swapped, 0)
    with pytest.raises(bench.Corrupt):
        pay.block(msgs[:10] + [msgs[10][:63]], 0)


def test_one_checks_head_tail_and_every_64th_body(bench):
    pay = bench.Payload(bench.SECTIONS["b"])
    m0, m1, m64 = pay.build(0), pay.build(1), pay.build(64)
    assert pay.one(m0, 0) == 1 and pay.one(m64, 64) == 65
    with pytest.raises(bench.Corrupt, match="torn"):
        pay.one(flip(m1, 3), 1)
    with pytest.raises(bench.Corrupt, match="torn"):
        pay.one(flip(m1, pay.L - 2), 1)
    for at in (8, 2000, pay.L - 9):
        with pytest.raises(bench.Corrupt, match="body"):
            pay.one(flip(m64, at), 64)
        with pytest.raises(bench.Corrupt, match="body"):
            pay.one(flip(m0, at), 0)
    with pytest.raises(bench.Corrupt, match="bytes"):
        pay.one(m1[:-1], 1)
    # a body one message over (a stale slot) is another template's
    with pytest.raises(bench.Corrupt, match="body"):
        pay.body(pay.build(1), 0)


def test_array_bodies_are_compared(bench):
    pay = bench.Payload(bench.SECTIONS["c"])
    pool = pay.pool(pay.P)
    arrays = list(pay.stamped(pool, 65))
    a64 = arrays[64]
    assert pay.array_ok(a64)
    pay.body(a64, 64)
    a64.view(np.uint8)[1 << 19] ^= 1
    with pytest.raises(bench.Corrupt, match="body"):
        pay.body(a64, 64)


def test_the_round_trip_server_echoes_lead_in_only_before_request_0(bench):
    pay = bench.Payload(bench.SECTIONS["d"])
    lead, msgs = pay.build(bench.LEAD_SEQ), pay.prebuilt(3)

    def serve(incoming):
        it, out = iter(incoming), []
        bench._echo(lambda: next(it), out.append, pay, 3)
        return out
    assert serve([lead, lead] + msgs) == [lead, lead] + msgs
    assert serve(msgs) == msgs
    with pytest.raises(bench.Corrupt):                  # lead-in after a counted request
        serve([msgs[0], lead] + msgs[1:])
    # a lead-in request with its head or tail damaged (bodies are the
    # client's to check, in the echo)
    for at in (0, 63):
        with pytest.raises(bench.Corrupt):
            serve([flip(lead, at)] + msgs)


def test_the_round_trip_client_times_only_after_its_lead_in(bench, monkeypatch):
    pay = bench.Payload(bench.SECTIONS["d"])
    lead, msgs = pay.build(bench.LEAD_SEQ), pay.prebuilt(5)
    monkeypatch.setattr(bench, "LEAD_S", 0.02)
    sent = []

    def echo_with(bad):
        def recv():
            m = sent[-1]
            return flip(m, 20) if bad(len(sent), m) else m
        return recv
    t0 = bench.time.perf_counter_ns()
    took = bench._ask(sent.append, echo_with(lambda k, m: False), msgs, lead)
    total = bench.time.perf_counter_ns() - t0
    k = sent.index(msgs[0])
    assert k > 0 and set(sent[:k]) == {lead} and sent[k:] == msgs
    assert 0 < took < total - 0.02e9 / 2                # the lead-in is not in it
    for bad in (lambda k, m: m == lead and k == 3,      # a wrong echo, in the lead-in
                lambda k, m: m == msgs[2]):             # and in the timed part
        sent.clear()
        with pytest.raises(bench.Corrupt):
            bench._ask(sent.append, echo_with(bad), msgs, lead)


def test_the_interleaved_round_trip_takes_turns_and_checks_every_echo(bench, monkeypatch):
    # fmap and the Pipe take turns in blocks, 0 1 1 0 and again, the lead-in
    # in whole cycles of 4 blocks; only the timed blocks count, and every
    # echo is compared with its request.
    assert [bench._pair_turn(b) for b in range(8)] == [0, 1, 1, 0, 0, 1, 1, 0]
    K = bench.PAIR_BLOCK
    pay = bench.Payload(bench.SECTIONS["d"])
    lead, msgs = pay.build(bench.LEAD_SEQ), pay.prebuilt(4 * K)
    monkeypatch.setattr(bench, "LEAD_S", 0.01)
    sent = [[], []]                                   # per transport
    order = []                                        # the transport of each request

    def end(t, bad=lambda m: False):
        def send(m):
            sent[t].append(m)
            order.append(t)

        def recv():
            m = sent[t][-1]
            return flip(m, 30) if bad(m) else m
        return send, recv
    f_ns, p_ns, won, pairs = bench._ask_interleaved((end(0), end(1)), msgs, lead)
    assert pairs == 2 and 0 <= won <= 2 and f_ns > 0 and p_ns > 0
    k = sum(1 for t in (0, 1) for m in sent[t] if m == lead)
    assert k % (4 * K) == 0 and k > 0                 # the lead-in: whole cycles
    timed = order[k:]
    assert timed == [t for b in range(4) for t in [bench._pair_turn(b)] * K]
    assert [m for m in sent[0] if m != lead] == msgs[:K] + msgs[3 * K:]
    assert [m for m in sent[1] if m != lead] == msgs[K:3 * K]
    for t, bad in ((1, lambda m: m == msgs[2 * K + 5]), (0, lambda m: m == lead)):
        sent[0].clear(), sent[1].clear()
        ends = [end(0), end(1)]
        ends[t] = end(t, bad)
        with pytest.raises(bench.Corrupt):
            bench._ask_interleaved(ends, msgs, lead)
    with pytest.raises(ValueError, match="whole pairs"):
        bench._ask_interleaved((end(0), end(1)), msgs[:K], lead)


def test_the_interleaved_server_follows_the_turns_and_checks_every_request(bench):
    K = bench.PAIR_BLOCK
    pay = bench.Payload(bench.SECTIONS["d"])
    lead, msgs = pay.build(bench.LEAD_SEQ), pay.prebuilt(2 * K)

    def serve(blocks):
        """blocks: the requests of each block, in turn; what each transport
        sent back."""
        inbox = [[m for b, blk in enumerate(blocks) if bench._pair_turn(b) == t for m in blk]
                 for t in (0, 1)]
        out = [[], []]

        def ends(t):
            it = iter(inbox[t])
            return lambda: next(it), out[t].append
        bench._echo_interleaved((ends(0), ends(1)), pay, 2 * K)
        return out
    leads = [[lead] * K] * 4
    out = serve(leads + [msgs[:K], msgs[K:]])
    assert out[0] == [lead] * 2 * K + msgs[:K] and out[1] == [lead] * 2 * K + msgs[K:]
    with pytest.raises(bench.Corrupt):                # a request on the wrong transport
        serve([msgs[K:], msgs[:K]])
    with pytest.raises(bench.Corrupt):                # a lead-in after request 0
        serve([msgs[:K], [lead] + msgs[K:2 * K - 1]])
    with pytest.raises(bench.Corrupt):                # a torn request
        serve([msgs[:K], [flip(msgs[K], 63)] + msgs[K + 1:]])
