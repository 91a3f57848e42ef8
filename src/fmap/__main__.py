"""Command line: `python -m fmap demo` (the demonstration), `python -m fmap list`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="show fmap's point with real processes (under a minute)")
    sub.add_parser("list", help="list this user's live names (dead holders pruned)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo
        return 0 if demo.run() else 1
    from . import _fmap, names
    from ._fmap import runtime_dir
    rows = _fmap.registry_list()
    print(f"registry {runtime_dir()}: {len(rows)} live name(s)")
    for key, kind, size, holders in sorted(rows):
        print(f"  {kind:9} {size:>14} bytes  {holders:3} holder(s)  {names.display(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
