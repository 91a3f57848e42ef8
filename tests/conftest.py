"""Shared test setup: a private registry per test run, unique names per test.

FMAP_RUNTIME_DIR is set before fmap is imported anywhere, and child processes
inherit it, so tests never see (or leave) names in the user's real registry.
"""
import os
import shutil
import tempfile
import uuid

_base = tempfile.mkdtemp(prefix="fmap-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
os.environ["FMAP_RUNTIME_DIR"] = os.path.join(_base, "registry")

import pytest  # noqa: E402

import fmap  # noqa: E402


@pytest.fixture
def name():
    """A name no other test uses."""
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def runtime_dir():
    return os.environ["FMAP_RUNTIME_DIR"]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_base, ignore_errors=True)


def shmem_kib():
    """Shmem from /proc/meminfo, in KiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise RuntimeError("no Shmem line in /proc/meminfo")


__all__ = ["fmap", "shmem_kib"]
