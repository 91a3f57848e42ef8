"""Names are per user (DESIGN.md, "Linux: names over kernel-counted memory"):
another user cannot open our objects, and the registry directory is checked
for owner, mode and symlinks before use.
"""
import json
import os
import shutil
import stat
import tempfile

import pytest

import fmap
from fmap import _fmap
from children import run_python, wait_pid

NOBODY = 65534

as_root = pytest.mark.skipif(os.geteuid() != 0,
                             reason="needs root to switch to a second user (nobody, 65534)")


def _become_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    assert os.geteuid() == NOBODY


def as_nobody(setup, attempt, timeout=30):
    """Fork a child that turns into user nobody at once; then run setup() here
    (what it makes after the fork is not inherited: the child holds none of
    it), hand its result to the child, which returns attempt(result) as a str.

    A child, not `subprocess.run(user=...)`: this interpreter lives under
    /root, which nobody cannot execute."""
    p2c_r, p2c_w = os.pipe()
    c2p_r, c2p_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(p2c_w)
            os.close(c2p_r)
            _become_nobody()
            data = b""
            while chunk := os.read(p2c_r, 65536):
                data += chunk
            out = "ok " + attempt(json.loads(data))
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = f"error {type(exc).__name__}: {exc}"
        finally:
            try:
                os.write(c2p_w, out.encode())
            finally:
                os._exit(code)
    os.close(p2c_r)
    os.close(c2p_w)
    try:
        try:
            params = setup()
            os.write(p2c_w, json.dumps(params).encode())
        finally:
            os.close(p2c_w)
        status = wait_pid(pid, timeout)
        out = b""
        while chunk := os.read(c2p_r, 65536):
            out += chunk
    finally:
        os.close(c2p_r)
    out = out.decode()
    assert status == 0 and out.startswith("ok "), f"status {status}: {out}"
    return out[3:]


def _try_open(params):
    if params.get("dir") is None:
        os.environ.pop("FMAP_RUNTIME_DIR", None)
    else:
        os.environ["FMAP_RUNTIME_DIR"] = params["dir"]
    try:
        fmap.open(params["name"])
    except OSError as exc:
        return f"{type(exc).__name__} {getattr(exc, 'winerror', None)} {exc}"
    return "OPENED"


@pytest.fixture
def shared_base():
    """A directory nobody may traverse (0711), for a root registry inside it:
    so the registry directory's own owner and mode are what stop nobody."""
    base = tempfile.mkdtemp(prefix="fmap-sec-", dir="/dev/shm")
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@as_root
def test_other_user_is_refused_roots_registry_dir(name, shared_base, monkeypatch):
    reg = os.path.join(shared_base, "registry")
    made = []

    def setup():
        monkeypatch.setenv("FMAP_RUNTIME_DIR", reg)
        made.append(fmap.create(name, size=4096))
        assert stat.S_IMODE(os.stat(reg).st_mode) == 0o700
        return {"name": name, "dir": reg}

    try:
        out = as_nobody(setup, _try_open)
    finally:
        for m in made:
            m.close()
    assert out.startswith("PermissionError 5 "), out
    assert "owned by another user" in out, out


@as_root
def test_other_user_is_refused_the_test_runs_registry_dir(name, runtime_dir):
    # The run's registry sits in a 0700 root directory: not even lstat passes.
    made = []

    def setup():
        made.append(fmap.create(name, size=4096))
        # "<dir>/." is the same directory under a path this process has not
        # attached (fmap keeps registries mapped by path): the child meets it
        # as a process of another user would, fresh.
        return {"name": name, "dir": os.path.join(runtime_dir, ".")}

    try:
        out = as_nobody(setup, _try_open)
    finally:
        for m in made:
            m.close()
    assert out.startswith("PermissionError 5 "), out
    assert "runtime directory" in out, out


@as_root
def test_other_user_with_its_default_dir_does_not_see_roots_names(name):
    default = f"/dev/shm/fmap-{NOBODY}"
    existed = os.path.exists(default)
    made = []

    def setup():
        made.append(fmap.create(name, size=4096))
        return {"name": name, "dir": None}

    try:
        out = as_nobody(setup, _try_open)
    finally:
        for m in made:
            m.close()
        if not existed:
            shutil.rmtree(default, ignore_errors=True)
    assert out.startswith("FileNotFoundError 2 "), out


def _reach_roots(params):
    out = [_try_open(params).split(" ")[0]]
    for mode in (os.O_RDONLY, os.O_RDWR):
        try:
            os.close(os.open(f"/proc/{params['pid']}/fd/{params['fd']}", mode))
        except PermissionError:
            out.append("PermissionError")
        else:
            out.append("OPENED")
    return " ".join(out)


@as_root
def test_other_user_with_the_registry_mapped_cannot_reach_roots_objects(name, runtime_dir):
    # A child forked from this process already has the run's registry mapped
    # (its directory check is behind it) and reads root's holder records;
    # what stops it is /proc/<pid>/fd, which the kernel opens only to the
    # same user.  The object is made after the fork: the child holds no fd.
    _fmap.registry_counts()             # attach the registry before forking
    made = []

    def setup():
        m = fmap.create(name, size=4096)
        made.append(m)
        with m.map() as v:
            v[:6] = b"secret"
        return {"name": name, "dir": runtime_dir, "pid": os.getpid(), "fd": m.fileno()}

    try:
        out = as_nobody(setup, _reach_roots)
        assert out == "PermissionError PermissionError PermissionError"
        # the failed attempts pruned nothing: root still has its object by name
        with fmap.open(name) as again, again.map() as v:
            assert v[:6] == b"secret"
    finally:
        for m in made:
            m.close()


# ---- the runtime directory ------------------------------------------------------

def _create_under(monkeypatch, path, name):
    monkeypatch.setenv("FMAP_RUNTIME_DIR", str(path))
    return fmap.create(name, size=4096)


def test_runtime_dir_symlink_is_refused(tmp_path, monkeypatch, name):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.chmod(real, 0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(PermissionError, match="symbolic link") as info:
        _create_under(monkeypatch, link, name)
    assert info.value.winerror == 5
    assert str(link) in str(info.value)
    assert os.listdir(real) == [], "nothing may be written through the symlink"


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701, 0o707])
def test_runtime_dir_open_to_others_is_refused(tmp_path, monkeypatch, name, mode):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(PermissionError, match="open to other users"):
        _create_under(monkeypatch, d, name)
    assert os.listdir(d) == []


def test_runtime_dir_regular_file_is_refused(tmp_path, monkeypatch, name):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(PermissionError, match="not a directory"):
        _create_under(monkeypatch, f, name)
    with pytest.raises(PermissionError, match="not a directory"):
        monkeypatch.setenv("FMAP_RUNTIME_DIR", str(f))
        fmap.open(name)


@as_root
def test_runtime_dir_owned_by_another_user_is_refused(tmp_path, monkeypatch, name):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(PermissionError, match="owned by another user"):
        _create_under(monkeypatch, d, name)


def test_runtime_dir_is_created_0700(tmp_path, monkeypatch, name):
    d = tmp_path / "new"
    old = os.umask(0)           # a permissive umask must not widen it
    try:
        m = _create_under(monkeypatch, d, name)
    finally:
        os.umask(old)
    try:
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()
        for entry in os.listdir(d):
            assert stat.S_IMODE(os.lstat(d / entry).st_mode) & 0o077 == 0, entry
        assert m.created
    finally:
        m.close()


def test_registry_file_with_wrong_mode_is_refused(tmp_path, monkeypatch, name):
    d = tmp_path / "reg"
    run = run_python("import fmap; fmap.create('x', size=1).close()",
                     env={**os.environ, "FMAP_RUNTIME_DIR": str(d)})
    assert run.returncode == 0, run.stderr.decode()
    os.chmod(d / "registry.v2", 0o644)
    with pytest.raises(PermissionError, match="registry file"):
        _create_under(monkeypatch, d, name)


@pytest.mark.parametrize("forge", ["index", "chains", "cycles", "keylen"])
def test_a_forged_registry_costs_names_not_the_process(tmp_path, forge):
    # The registry file is the user's own, writable by any of the user's
    # processes: index values and holder links out of range, or chains that
    # loop, end a lookup (the names behind them may be lost); they never
    # send it outside the tables (a forged index crashed the next open) or
    # keep it walking with the lock held.  In a child with a registry of its
    # own, so that a crash fails this test only.
    code = f"""
import mmap, os, struct
import fmap
INDEX_AT, NINDEX, NENTRIES, ENTRY, HOLDER = 4096, 32768, 16384, 64 + 256, 40   # fmap_linux.c
ENTRIES_AT = INDEX_AT + 4 * NINDEX
HOLDERS_AT = ENTRIES_AT + ENTRY * NENTRIES
keep = [fmap.Event.create(f"fmap-test-forged-{{k}}") for k in range(3)]
with open(os.path.join(os.environ["FMAP_RUNTIME_DIR"], "registry.v2"), "r+b") as f:
    mem = mmap.mmap(f.fileno(), 0)
forge = {forge!r}
if forge == "index":
    for s in range(NINDEX):
        struct.pack_into("=I", mem, INDEX_AT + 4 * s, 0x7FFFFFF0)
for e in range(NENTRIES):
    at = ENTRIES_AT + ENTRY * e
    if struct.unpack_from("=I", mem, at)[0] != 1:          # E_LIVE
        continue
    head = struct.unpack_from("=I", mem, at + 48)[0]
    if forge == "chains":
        struct.pack_into("=I", mem, at + 48, 0x7FFFFFF0)
    elif forge == "cycles" and head:
        struct.pack_into("=I", mem, HOLDERS_AT + HOLDER * (head - 1) + 8, head)
    elif forge == "keylen" and e == 0:
        struct.pack_into("=I", mem, at + 60, 0x7FFFFFF0)
if forge == "cycles":                                       # a self-linked holder let go:
    keep.pop(0).close()                                     # the chain head is left on it
fmap._fmap.registry_list()                                  # what python -m fmap list shows
counts = fmap._fmap.registry_counts()
assert counts[1] < 1000, counts                             # holders: not wrapped below 0
outcomes = []
for k in range(4):                                          # the last never existed
    try:
        fmap.Event.open(f"fmap-test-forged-{{k}}").close()
        outcomes.append("opened")
    except FileNotFoundError:
        outcomes.append("lost")
new = fmap.Event.create("fmap-test-forged-new")             # the registry still works
fmap.Event.open("fmap-test-forged-new").close()
print(" ".join(outcomes))
"""
    env = dict(os.environ, FMAP_RUNTIME_DIR=str(tmp_path / "rt"))
    done = run_python(code, env=env)
    assert done.returncode == 0, (done.returncode, done.stderr.decode())
    outcomes = done.stdout.split()
    assert outcomes[3] == b"lost" and len(outcomes) == 4, outcomes
    if forge in ("cycles", "keylen"):                       # the rest of the registry is sound
        assert outcomes[1:3] == [b"opened", b"opened"], outcomes


# The word a process's main thread owns a lock with (rlock_linux.c: the thread
# id, and 16 bits each of its start time and its stack's start, fields 22 and
# 28 of /proc/<tid>/stat), for the children below.
OWNER_WORD = """
def owner_word():
    def fold16(x):
        x ^= x >> 32
        x ^= x >> 16
        return x & 0xFFFF or 1
    fields = open("/proc/self/stat").read().rpartition(")")[2].split()
    marks = fold16(int(fields[19])) << 16 | fold16(int(fields[25]))
    return marks << 32 | os.getpid()
"""

# A process that writes the word its main thread would own the registry lock
# with, then becomes /bin/sleep: the same id and start time, a new stack.
EXEC_HOLDER = """
import mmap, os, struct, sys
""" + OWNER_WORD + """
f = open(os.path.join(os.environ["FMAP_RUNTIME_DIR"], "registry.v2"), "r+b")
mem = mmap.mmap(f.fileno(), 0)
struct.pack_into("=Q", mem, 40, owner_word())
os.write(int(sys.argv[1]), b"x")
os.execv("/bin/sleep", ["sleep", "30"])
"""


@pytest.mark.parametrize("forge", ["dead-owner", "self", "exec"])
def test_a_forged_registry_lock_word_costs_one_repair(tmp_path, forge):
    # The registry's lock word names its owning thread.  A word forged to name
    # a thread that is gone, or the very thread that locks next (no thread
    # takes the lock twice), is taken over and the registry repaired.  Under
    # the robust pthread mutex it was before, the first blocked every create
    # and open of the user for good (10 s each, then TimeoutError), and the
    # second made them fail with EDEADLK.  The third names a process that then
    # execs, as if a thread exec'd while another held the lock: gone as well
    # (a first version of the lock let the new program keep it).  In a child
    # with a registry of its own.
    code = f"""
import mmap, os, struct, subprocess, sys, time
import fmap
{OWNER_WORD}
LOCK_AT, REPAIRS_AT = 40, 76                                # reg_header, fmap_linux.c
keep = fmap.Event.create("fmap-test-lock-forged")
with open(os.path.join(os.environ["FMAP_RUNTIME_DIR"], "registry.v2"), "r+b") as f:
    mem = mmap.mmap(f.fileno(), 0)
repairs = struct.unpack_from("=I", mem, REPAIRS_AT)[0]
holder = None
if {forge!r} == "dead-owner":
    p = subprocess.Popen(["true"])
    p.wait()
    struct.pack_into("=Q", mem, LOCK_AT, 0xABCD << 32 | p.pid)
elif {forge!r} == "exec":
    r, w = os.pipe()
    holder = subprocess.Popen([sys.executable, "-c", {EXEC_HOLDER!r}, str(w)], pass_fds=[w])
    os.close(w)
    assert os.read(r, 1) == b"x"
    while open(f"/proc/{{holder.pid}}/comm").read().strip() != "sleep":
        time.sleep(0.01)
else:
    struct.pack_into("=Q", mem, LOCK_AT, owner_word())     # our own main thread's, exactly
t0 = time.monotonic()
fmap.Event.create("fmap-test-lock-new").close()
fmap.Event.open("fmap-test-lock-forged").close()
print(time.monotonic() - t0 < 3, struct.unpack_from("=I", mem, REPAIRS_AT)[0] - repairs,
      struct.unpack_from("=Q", mem, LOCK_AT)[0])
if holder is not None:
    holder.kill()
    holder.wait()
"""
    env = dict(os.environ, FMAP_RUNTIME_DIR=str(tmp_path / "rt"))
    done = run_python(code, env=env, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr.decode())
    assert done.stdout.split() == [b"True", b"1", b"0"]
