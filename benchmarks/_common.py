"""Small helpers shared by the benchmarks in this folder.

Timing model: a benchmark body performs ``n`` operations; it is run ``rounds``
times (after one untimed warm-up round) and the reported figure is the median
over rounds of the per-operation time.  ``run_cases`` interleaves the
implementations of one benchmark (each round runs every implementation once,
in a rotated order) so that slow phases of the machine hit all of them.  Each round can have an untimed
``setup(n)`` that builds its inputs (for example precomputed unique names) and
an untimed ``cleanup(state, failed)`` that always runs, even when the body
raised, so that nothing the round created is left behind.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Sequence

perf_counter_ns = time.perf_counter_ns

# Status strings used in result rows.
OK = "ok"
NOT_INSTALLED = "not installed"
NOT_IMPORTABLE = "not importable"


# --------------------------------------------------------------------------- args

def make_parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every benchmark accepts."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds and operations (a smoke run, < ~30 s)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds per row (default 7, 3 with --quick)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every per-round operation count by this")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results as JSON to PATH")
    return p


def rounds_for(args: argparse.Namespace) -> int:
    if args.rounds is not None:
        return max(1, args.rounds)
    return 3 if args.quick else 7


def ops_for(args: argparse.Namespace, full: int, quick: int) -> int:
    """Operations per round: ``full`` normally, ``quick`` with --quick."""
    n = quick if args.quick else full
    return max(1, int(n * args.scale))


# ------------------------------------------------------------------------ imports

def optional_import(modname: str):
    """Import ``modname``; return (module or None, status string).

    A module that is simply absent is "not installed"; one that is present but
    fails to import (an unbuilt extension, a broken dependency) is
    "not importable: <reason>".
    """
    try:
        return importlib.import_module(modname), OK
    except ModuleNotFoundError as e:
        if e.name and modname.split(".")[0] == e.name.split(".")[0]:
            return None, NOT_INSTALLED
        return None, f"{NOT_IMPORTABLE}: {type(e).__name__}: {e}"
    except Exception as e:  # ImportError from a missing .so, etc.
        return None, f"{NOT_IMPORTABLE}: {type(e).__name__}: {e}"


def version_of(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


# ------------------------------------------------------------------------- names

_counter = itertools.count()


def unique_names(tag: str, n: int) -> List[str]:
    """``n`` names unique to this process and call, valid for every peer
    (letters, digits and underscores only; short enough for NAME_MAX)."""
    base = f"fmb{os.getpid()}_{tag}_{next(_counter)}_{time.monotonic_ns() % 10**9}"
    return [f"{base}_{i}" for i in range(n)]


# ------------------------------------------------------------------------ timing

@dataclass
class Row:
    benchmark: str
    impl: str
    status: str = OK
    median_us: Optional[float] = None
    min_us: Optional[float] = None
    max_us: Optional[float] = None
    rounds: int = 0
    ops_per_round: int = 0
    samples_us: List[float] = field(default_factory=list)
    note: str = ""
    extra: dict = field(default_factory=dict)   # a benchmark's own figures for the row


def time_round(body: Callable[[Any, int], None], n: int, *,
               setup: Optional[Callable[[int], Any]] = None,
               cleanup: Optional[Callable[[Any, bool], None]] = None) -> float:
    """One round: ``setup(n)`` (untimed) builds ``state``, ``body(state, n)``
    runs ``n`` operations with the garbage collector off, ``cleanup(state,
    failed)`` (untimed) always runs, also when the body raised.
    Returns microseconds per operation."""
    state = setup(n) if setup is not None else None
    failed = True
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = perf_counter_ns()
        body(state, n)
        t1 = perf_counter_ns()
        failed = False
    finally:
        if gc_was_enabled:
            gc.enable()
        if cleanup is not None:
            cleanup(state, failed)
    return (t1 - t0) / n / 1000.0


def measure(body: Callable[[Any, int], None], n: int, rounds: int, *,
            setup=None, cleanup=None, warmup: bool = True) -> List[float]:
    """``rounds`` timed rounds (after one untimed warm-up round) of one body;
    the per-operation time of each round in microseconds."""
    if warmup:
        time_round(body, n, setup=setup, cleanup=cleanup)
    return [time_round(body, n, setup=setup, cleanup=cleanup) for _ in range(rounds)]


@dataclass
class Case:
    """One implementation of one benchmark.  ``status`` other than OK (for
    example "not installed") makes a row that says so and runs nothing."""
    impl: str
    body: Optional[Callable[[Any, int], None]] = None
    status: str = OK
    setup: Optional[Callable[[int], Any]] = None
    cleanup: Optional[Callable[[Any, bool], None]] = None
    note: str = ""


def _finish(row: Row, samples: List[float]) -> Row:
    row.samples_us = [round(s, 4) for s in samples]
    row.median_us = statistics.median(samples)
    row.min_us = min(samples)
    row.max_us = max(samples)
    return row


def run_cases(benchmark: str, cases: Sequence[Case], n: int, rounds: int, *,
              warmup: bool = True, verbose: bool = True) -> List[Row]:
    """Measure several implementations side by side, interleaved: every round
    runs each available case once, in an order rotated from round to round,
    so that slow phases of the machine hit all of them alike.  A case that
    raises is reported as an error row and dropped; nothing propagates except
    KeyboardInterrupt."""
    rows = [Row(benchmark, c.impl, status=c.status, rounds=rounds, ops_per_round=n,
                note=c.note) for c in cases]
    samples: List[List[float]] = [[] for _ in cases]
    live = [i for i, c in enumerate(cases) if c.status == OK and c.body is not None]
    for r in range(rounds + (1 if warmup else 0)):
        if not live:
            break
        k = r % len(live)
        for i in live[k:] + live[:k]:
            c = cases[i]
            try:
                t = time_round(c.body, n, setup=c.setup, cleanup=c.cleanup)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 - report, do not crash the run
                rows[i].status = f"error: {type(e).__name__}: {e}"
                if verbose:
                    print(f"  [{benchmark} / {c.impl}] {rows[i].status}", file=sys.stderr)
                continue
            if not (warmup and r == 0):
                samples[i].append(t)
        live = [i for i in live if rows[i].status == OK]
    for i in live:
        _finish(rows[i], samples[i])
        if verbose:
            print(f"  {benchmark:<30} {rows[i].impl:<32} {rows[i].median_us:9.2f} µs",
                  file=sys.stderr)
    return rows


def error_row(benchmark: str, impl: str, exc: BaseException) -> Row:
    return Row(benchmark, impl, status=f"error: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------ output

def _fmt_us(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.1f}"
    return f"{v:.2f}"


def status_cell(row: Row, notes: List[str]) -> str:
    """The table cell of a row that has no figure: its status, cut at the
    first ": ", with a footnote number for the rest (kept in notes, once)."""
    short, _, detail = row.status.partition(": ")
    if detail:
        note = f"{row.impl}: {row.status}"
        if note not in notes:
            notes.append(note)
        short += f" [{notes.index(note) + 1}]"
    return short


def format_table(rows: Sequence[Row], baseline, *, title: str = "") -> str:
    """A Markdown table ``benchmark | impl | median µs | ratio vs <baseline>``.

    ``baseline`` is an impl name or a list of them: the first one that has a
    figure is used.  The ratio is impl / baseline within the same benchmark
    (lower is faster; the baseline itself is 1.00x).  Unavailable or failed
    rows show a short status in place of the figures, with the full reason
    in a footnote under the table.
    """
    candidates = [baseline] if isinstance(baseline, str) else list(baseline)
    measured = {r.impl for r in rows if r.median_us is not None}
    chosen = next((b for b in candidates if b in measured), candidates[0])
    base = {r.benchmark: r.median_us for r in rows
            if r.impl == chosen and r.median_us is not None}
    head = ["benchmark", "impl", "median µs", f"ratio vs {chosen}"]
    body: List[List[str]] = []
    notes: List[str] = []
    for r in rows:
        if r.median_us is None:
            body.append([r.benchmark, r.impl, status_cell(r, notes), "-"])
            continue
        b = base.get(r.benchmark)
        ratio = f"{r.median_us / b:.2f}x" if b else "-"
        body.append([r.benchmark, r.impl, _fmt_us(r.median_us), ratio])
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
              for i, h in enumerate(head)]
    right = {2, 3}

    def line(cells: Iterable[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    lines = []
    if title:
        lines.append(f"### {title}")
        lines.append("")
    lines.append(line(head))
    lines.append(sep)
    lines.extend(line(c) for c in body)
    if chosen != candidates[0]:
        notes.append(f"baseline {candidates[0]} has no figure; ratios are against {chosen}")
        lines.append("")
        lines.append(f"note: {notes[-1]}")
        notes.pop()
    if notes:
        lines.append("")
        lines.extend(f"[{i + 1}] {n}" for i, n in enumerate(notes))
    return "\n".join(lines)


def environment() -> dict:
    env = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for dist in ("pyfmap", "numpy", "posix_ipc", "SharedArray", "faster-fifo", "iceoryx2"):
        v = version_of(dist)
        if v:
            env[dist] = v
    return env


def write_json(path: str, rows: Sequence[Row], *, meta: Optional[dict] = None) -> None:
    doc = {"environment": environment(), "meta": meta or {},
           "results": [asdict(r) for r in rows]}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
