"""The type stubs (src/fmap/_fmap.pyi, shipped with py.typed) tell the truth.

mypy's stubtest compares them with the compiled module (every name, every
signature; what may differ, and why, is in stubtest_allowlist.txt); mypy
checks fmap's own Python modules against them; and a user's program, run
here too, gets from mypy --strict the types it should (assert_type).
"""
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

if sys.version_info < (3, 10):
    pytest.skip("the test extras install mypy on Python 3.10 and later", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src", "fmap")


def mypy(tmp_path, *args):
    """python -m <args> in tmp_path (so that `fmap` is the installed package,
    as a user gets it), with a cache of its own; (returncode, output)."""
    r = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_the_stubs_match_the_compiled_module(tmp_path):
    rc, out = mypy(tmp_path, "mypy.stubtest", "fmap", "--mypy-config-file", os.devnull,
                   "--allowlist", os.path.join(HERE, "stubtest_allowlist.txt"))
    assert rc == 0, out


def test_fmaps_python_modules_agree_with_the_stubs(tmp_path):
    rc, out = mypy(tmp_path, "mypy", "--cache-dir", str(tmp_path / "cache"),
                   "--config-file", os.devnull, SRC)
    assert rc == 0, out


USER = '''
from typing import Any, Iterator, List, Optional
from typing_extensions import assert_type

import numpy as np
import numpy.typing as npt

import fmap

NAME = {name!r}


def first(ch: fmap.Channel) -> bytes:
    with ch.receive() as msg:       # its __exit__ never swallows an exception
        return msg.tobytes()


def head(h: fmap.Handle) -> fmap.Handle:
    with h as same:
        return same

m = fmap.create(NAME, size=4096)
assert_type(m, fmap.Mapping)
with m.map() as v:
    assert_type(v, fmap.View)
    assert_type(v.asarray("float32", shape=(1024,)), npt.NDArray[Any])
    assert_type(v.address, int)
    with memoryview(v) as mv:
        mv[0] = 1
    v[1] = 2
    v[2:4] = b"ab"
    assert_type(v[0], int)
    assert_type(v[0:4], bytes)
    assert v[0:4] == b"\\x01\\x02ab"
    assert_type(len(v), int)
    other = fmap.Mapping.open(NAME)
    assert_type(other.name, Optional[str])
    other.close()

with fmap.Channel.create(None, 8, message_size=64) as ch:
    assert_type(ch, fmap.Channel)
    ch.send(b"x", timeout=1.0)
    assert_type(ch.recv(), bytes)
    assert_type(ch.send_many([b"a", bytearray(b"b")]), int)
    assert_type(ch.recv_many(4, timeout=0), List[bytes])
    with ch.reserve(8) as buf:
        assert_type(buf, fmap.Message)
        buf[:1] = b"y"
        buf[1] = 0x7A
    with ch.receive() as msg:
        assert_type(msg[0], int)
        assert_type(msg[0:2], memoryview)
        assert bytes(msg[0:2]) == b"yz"
    ch.send(memoryview(b"m"))
    assert first(ch) == b"m"
    ch.spin = None
    assert_type(ch.spin, float)
    stats = ch.stats()
    assert_type(stats["pending"], int)
    assert_type(stats["ended"], bool)
    assert stats["pending"] == 0 and stats["ended"] is False
    ch.send_array(np.arange(3.0))
    assert_type(ch.recv_array(), npt.NDArray[Any])
    assert_type(iter(ch), Iterator[bytes])

with fmap.Mutex.create() as mu:
    assert_type(mu, fmap.Mutex)
    assert_type(mu.owned, bool)
    assert head(mu) is mu
sem = fmap.Semaphore.create(None, 1, 2)
ev = fmap.Event.create(manual_reset=True)
assert_type(sem.acquire(0), bool)
assert_type(fmap.wait_any([sem, ev], 0), Optional[int])
try:
    fmap.Channel.open(NAME)
except fmap.WrongTypeError as e:
    assert_type(e.winerror, int)
    m.close()
    print("ok")
'''


def test_a_users_program_gets_the_types_it_should(tmp_path):
    (tmp_path / "user.py").write_text(textwrap.dedent(USER.format(name=f"fmap-typing-{uuid.uuid4().hex}")))
    rc, out = mypy(tmp_path, "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                   "--config-file", os.devnull, "user.py")
    assert rc == 0, out
    r = subprocess.run([sys.executable, "user.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.stdout == "ok\n", r.stdout + r.stderr
