"""The README's promises: its examples run, its test command is what CI runs."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", _readme(), re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    sh = _blocks("sh")[0].strip().splitlines()
    assert len(sh) == 2
    assert "fmap demo" in sh[0] and "pytest" in sh[1]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert sh[1] in ci


@pytest.mark.parametrize("code", _blocks("python"), ids=lambda c: c.splitlines()[-1][:40])
def test_api_tour_example_runs(code, tmp_path):
    # Each example in a fresh interpreter, as a reader would paste it.
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_demo_runs_and_keeps_its_promises():
    r = subprocess.run([sys.executable, "-m", "fmap", "demo"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All steps behaved as promised" in r.stdout
    assert "FAIL" not in r.stdout
    assert "ok  fmap.Channel:" in r.stdout and "ok  multiprocessing.Queue:" in r.stdout


def test_cli_list_shows_live_names(name):
    import fmap
    with fmap.create(name, size=4096):
        r = subprocess.run([sys.executable, "-m", "fmap", "list"], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert name in r.stdout
