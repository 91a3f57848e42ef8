"""Child processes for the multi-process tests, every wait bounded.

A hung child fails its test instead of hanging the run: each helper here
kills what it started when a timeout passes, and says which child and what it
printed on stderr.
"""
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

TIMEOUT = 30.0   # seconds any one child may take, unless a test says otherwise


def _stderr_of(proc, timeout=2.0):
    """What proc wrote on stderr, read for at most timeout: a grandchild (or
    the child itself, still alive) may hold the pipe open, and read() to EOF
    would then wait for it."""
    if proc.stderr is None:
        return ""
    out = b""
    deadline = time.monotonic() + timeout
    try:
        fd = proc.stderr.fileno()
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
    except (OSError, ValueError):
        pass
    return out.decode(errors="replace")


def run_python(code, timeout=TIMEOUT, **kwargs):
    """Run `python -c code` to the end; CompletedProcess (bytes).  Fails the
    test, child killed, when it takes longer than timeout."""
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True,
                              timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"child did not finish in {timeout} s; stderr:\n"
                    f"{(exc.stderr or b'').decode(errors='replace')}")


# First line of a child that is to get SIGINT: a process started with SIGINT
# ignored (a background job of a shell without job control: how CI may run
# the suite) passes that on, and Python then never raises KeyboardInterrupt.
SIGINT_RAISES = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"


class Child:
    """`python -c code` talking in lines: send() to its stdin, expect() from
    its stdout.  Every read has a timeout; kill() is SIGKILL."""

    def __init__(self, code, **kwargs):
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        self.pid = self.proc.pid
        self._buf = b""

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, prefix="", timeout=TIMEOUT):
        """The child's next line (without the newline); it must start with prefix."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                self.kill()
                pytest.fail(f"child {self.pid}: no line within {timeout} s; "
                            f"stderr:\n{_stderr_of(self.proc)}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.wait(5)
                pytest.fail(f"child {self.pid} exited ({self.proc.returncode}) before "
                            f"printing a line; stderr:\n{_stderr_of(self.proc)}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode()
        assert text.startswith(prefix), f"child {self.pid} said {text!r}, expected {prefix!r}..."
        return text

    def kill(self):
        """SIGKILL and reap (bounded)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout=TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"child {self.pid} did not exit within {timeout} s")

    def finish(self, timeout=TIMEOUT):
        """Close its stdin (the usual "you may go" signal), wait, return (rc, stderr)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        rc = self.wait(timeout)
        return rc, _stderr_of(self.proc)

    def close(self):
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


@pytest.fixture
def children():
    """Start Child processes with children(code); all are killed at teardown."""
    started = []

    def start(code, **kwargs):
        c = Child(code, **kwargs)
        started.append(c)
        return c

    yield start
    for c in started:
        c.close()


def join(proc, timeout=TIMEOUT):
    """Join a multiprocessing.Process; kill it and fail when it overstays."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
        pytest.fail(f"process {proc.pid} did not finish in {timeout} s")
    return proc.exitcode


def join_all(procs, timeout=TIMEOUT):
    """Join multiprocessing.Processes within one deadline; their exit codes.
    Those still alive then are killed and the test fails."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0))
    late = [p.pid for p in procs if p.is_alive()]
    if late:
        reap(procs)
        pytest.fail(f"processes {late} did not finish in {timeout} s")
    return [p.exitcode for p in procs]


def reap(procs):
    """Kill and join whatever is still alive of procs (multiprocessing.Process);
    for finally: blocks, so that a failed test leaves no child behind (the
    interpreter joins live multiprocessing children at exit, without limit)."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
    for p in procs:
        if p.pid is not None:
            p.join(5)


def wait_pid(pid, timeout=TIMEOUT):
    """waitpid() with a timeout for an os.fork() child; its exit status.
    Kills it and fails the test when it overstays."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"forked child {pid} did not exit within {timeout} s")
        time.sleep(0.005)


def asleep_in_futex(pid):
    """True when process pid sleeps (state S) in a futex wait, as far as
    /proc/<pid>/wchan tells (it reads "0" or nothing where the kernel hides
    it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
    except OSError:
        return False
    return state == "S" and (wchan in ("", "0") or "futex" in wchan)


def poll(predicate, timeout=5.0, interval=0.02):
    """Wait until predicate() is true; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class Background:
    """fn() in a thread; result() joins it (bounded) and returns or re-raises."""

    def __init__(self, fn):
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def done(self):
        return not self.thread.is_alive()

    def result(self, timeout=10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"thread still blocked after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value
