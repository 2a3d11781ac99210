"""The ``orthoshard`` console script.

Each subcommand imports what it needs only when it runs, so ``orthoshard sidecar`` works in an
environment without torch (the sidecar image) and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def _bench(args: argparse.Namespace) -> int:
    scripts = sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
    if args.name not in scripts:
        print(f"unknown benchmark {args.name!r}; available: {', '.join(scripts)}", file=sys.stderr)
        return 2
    sys.argv = [str(BENCH_DIR / f"{args.name}.py"), *args.rest]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthoshard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark from bench/ (prints ratio tables)")
    bench.add_argument("name", help="benchmark name, e.g. orthogonalize")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
