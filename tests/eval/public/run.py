"""``make eval-public``: every public source's precision, recall and F1 (see ``harness``).

    .venv/bin/python -m tests.eval.public.run [--data DIR] [--only NAME ...] [--limit N]
"""

from __future__ import annotations

import argparse
import sys

from tests.eval.public.harness import DataMissing, data_root, render, run_source, sources


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="data root (default: $GAPWATCH_PUBLIC_DATA or .eval-data/)")
    ap.add_argument("--only", action="append", help="source or family name (repeatable)")
    ap.add_argument("--limit", type=int, help="first N cases per source")
    ap.add_argument("--examples", type=int, default=3, help="confusion examples to print")
    args = ap.parse_args(argv)
    root = data_root(args.data)
    missing = 0
    for mod in sources():
        name = mod.__name__.rsplit(".", 1)[-1].removeprefix("src_")
        if args.only and name not in args.only and mod.FAMILY not in args.only:
            continue
        try:
            rep = run_source(mod, root, args.limit)
        except DataMissing as exc:
            missing += 1
            print(f"== {mod.FAMILY} / {name}: data missing under {root}: {exc}\n   get it: {mod.HOW_TO_GET}")
            continue
        print(render(rep, args.examples))
        print()
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
