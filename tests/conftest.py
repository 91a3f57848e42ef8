"""Shared test setup: a private registry per test run, unique names per test.

FMAP_RUNTIME_DIR is set before fmap is imported anywhere, and child processes
inherit it, so tests never see (or leave) names in the user's real registry.
"""
import faulthandler
import multiprocessing
import os
import shutil
import sys
import tempfile
import uuid

_base = tempfile.mkdtemp(prefix="fmap-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
os.environ["FMAP_RUNTIME_DIR"] = os.path.join(_base, "registry")

import pytest  # noqa: E402

import fmap  # noqa: E402

# Children (subprocess, multiprocessing spawn) import the fmap this run imported,
# even when it comes from PYTHONPATH (a work tree) rather than the installed one.
_src = os.path.dirname(os.path.dirname(os.path.abspath(fmap.__file__)))
if _src not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_src, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture
def name():
    """A name no other test uses."""
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def runtime_dir():
    return os.environ["FMAP_RUNTIME_DIR"]


def pytest_sessionfinish(session, exitstatus):
    # A multiprocessing child left alive by a failed test would make the
    # interpreter's exit wait for it (multiprocessing joins its children at
    # exit, without a timeout): kill them first.
    for p in multiprocessing.active_children():
        p.kill()
        p.join(5)
    shutil.rmtree(_base, ignore_errors=True)


# Hangs (timeouts in pyproject.toml).  pytest-timeout fails a test that
# overstays by raising in the main thread (SIGALRM), and the test's teardown
# still kills its children; every wait in the tests has a shorter timeout of
# its own, with a better message.  SIGALRM cannot get through everything
# (a call blocked in C that restarts itself on EINTR, code that swallows the
# exception), so pytest's faulthandler_timeout, a watchdog thread that needs
# neither the main thread nor the GIL, dumps every stack and ends the run a
# minute later.  Neither covers the interpreter's exit, which joins
# non-daemon threads and multiprocessing children without a limit: the same
# watchdog covers that.
EXIT_GRACE = 60


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    faulthandler.dump_traceback_later(EXIT_GRACE, exit=True, file=sys.__stderr__)


def shmem_kib():
    """Shmem from /proc/meminfo, in KiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise RuntimeError("no Shmem line in /proc/meminfo")


__all__ = ["fmap", "raises", "shmem_kib"]


@pytest.fixture
def closer():
    """Register fmap objects (or anything with close()) to close after the test,
    newest first, so views go before the mappings they came from."""
    objs = []

    def add(obj):
        objs.append(obj)
        return obj

    yield add
    for obj in reversed(objs):
        obj.close()


class raises:
    """pytest.raises that also checks fmap's error contract: every OSError and
    ValueError carries an int `winerror` (DESIGN.md, Errors); `winerror=` pins it.

        with raises(ValueError, winerror=1132, match="offset"): ...
    """

    def __init__(self, cls, winerror=None, match=None):
        self._cm = pytest.raises(cls, match=match)
        self.winerror = winerror

    def __enter__(self):
        self.info = self._cm.__enter__()
        return self.info

    def __exit__(self, *exc_info):
        suppressed = self._cm.__exit__(*exc_info)
        if not suppressed:
            return False
        exc = self.info.value
        if isinstance(exc, (OSError, ValueError)):
            code = getattr(exc, "winerror", None)
            assert isinstance(code, int), f"{exc!r} has no int winerror"
        if isinstance(exc, OSError):
            # and the errno a POSIX caller would check (TimeoutError and
            # BrokenPipeError from a channel had None)
            assert isinstance(exc.errno, int) and exc.errno > 0, f"{exc!r} has no errno"
        if self.winerror is not None:
            assert exc.winerror == self.winerror, f"{exc!r}: winerror {exc.winerror}"
        return suppressed
