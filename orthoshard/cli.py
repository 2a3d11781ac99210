"""orthoshard: Muon, NorMuon and SOAP for FSDP training, with live optimizer health.

The ``orthoshard`` console script. Each subcommand imports what it needs only when it runs, so
``orthoshard sidecar`` works in an environment without torch (the sidecar image) and ``--help``
is instant.
"""

from __future__ import annotations

import argparse
import re
import runpy
import sqlite3
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def _benchmarks() -> list[str]:
    """The benchmark scripts in bench/ (the source checkout's)."""
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def _bench(args: argparse.Namespace) -> int:
    scripts = _benchmarks()
    if not scripts:  # a wheel (pip install . without -e) carries no bench/
        print(f"orthoshard bench: no benchmarks in {BENCH_DIR}: they run from a clone of the "
              f"repository (scripts/setup.sh installs it editable, pip install -e .)",
              file=sys.stderr)
        return 2
    if args.name is None:
        print(f"orthoshard bench: name a benchmark, one of: {', '.join(scripts)} (then its "
              f"arguments; orthoshard bench NAME --help lists them)", file=sys.stderr)
        return 2
    if args.name not in scripts:
        print(f"unknown benchmark {args.name!r}; available: {', '.join(scripts)}", file=sys.stderr)
        return 2
    sys.argv = [str(BENCH_DIR / f"{args.name}.py"), *args.rest]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


#: the sidecar's Settings fields, as its command line names them
_SIDECAR_OPTIONS = {"series_ttl_s": "--series-ttl", "rotation_hold_s": "--rotation-hold",
                    "history_max_rows": "--history-max-rows", "max_body_bytes": "--max-body-bytes",
                    "max_writes": "--max-writes", "db_path": "--db", "port": "--port",
                    "host": "--host", "uds": "--uds"}


def _as_options(message: str) -> str:
    """A Settings error in the command line's words (``rotation_hold_s`` -> ``--rotation-hold``)."""
    return re.sub(r"(?<![\w-])(" + "|".join(_SIDECAR_OPTIONS) + r")\b",
                  lambda m: _SIDECAR_OPTIONS[m.group(1)], message)


def _sidecar(args: argparse.Namespace) -> int:
    """Run the health sidecar (torch-free: imports only ``service``)."""
    from service.records import DatabaseInUse, StoreBusy
    from service.server import ListenError, run
    from service.settings import Settings, read_token_file

    try:
        token = read_token_file(args.token_file)
    except ValueError as exc:  # names the file, in the user's own words
        print(f"orthoshard sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        settings = Settings(
            token=token,
            db_path=args.db,
            host=args.host,
            port=args.port,
            uds=args.uds,
            series_ttl_s=args.series_ttl,
            rotation_hold_s=args.rotation_hold,
            history_max_rows=args.history_max_rows,
            max_body_bytes=args.max_body_bytes,
            max_writes=args.max_writes,
        )
    except ValueError as exc:
        print(f"orthoshard sidecar: {_as_options(str(exc))}", file=sys.stderr)
        return 2
    try:
        return run(settings, log_level=args.log_level)
    except ListenError as exc:  # raised binding a socket, before the store is opened
        print(f"orthoshard sidecar: {exc}", file=sys.stderr)
        return 2
    except DatabaseInUse as exc:
        print(f"orthoshard sidecar: cannot open {args.db}: {exc}: stop that sidecar, or pass "
              f"another --db", file=sys.stderr)
        return 2
    except StoreBusy as exc:  # another process kept the write lock through the store's wait
        print(f"orthoshard sidecar: cannot open {args.db}: {exc}. Another process holds it "
              f"locked (another sidecar, a backup, an open sqlite3 shell): stop that process "
              f"or pass another --db", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:  # raised opening the store, before any request is served
        print(f"orthoshard sidecar: cannot use {args.db} as the history database ({exc}): its "
              f"directory must exist, the sidecar must be able to write both the directory and "
              f"the file, and an existing file must be one this sidecar wrote", file=sys.stderr)
        return 2


def _add_sidecar(sub: argparse._SubParsersAction) -> None:
    # service.settings imports only the standard library, so --help stays instant.
    from service import settings as defaults

    sidecar = sub.add_parser(
        "sidecar", help="run the health sidecar (HTTP API, /metrics, SQLite history)"
    )
    sidecar.add_argument("--host", default="127.0.0.1", help="TCP bind address (default loopback)")
    sidecar.add_argument("--port", type=int, default=9400, help="TCP port (default 9400)")
    sidecar.add_argument("--uds", default=None, help="also listen on this Unix socket path")
    sidecar.add_argument("--token-file", required=True, help="file holding the bearer token")
    sidecar.add_argument("--db", required=True, help="SQLite file for history and last state")
    sidecar.add_argument(
        "--series-ttl", type=float, default=defaults.DEFAULT_SERIES_TTL_S,
        help="seconds after which a silent param/rank leaves /metrics (default %(default)s)",
    )  # fmt: skip
    sidecar.add_argument(
        "--rotation-hold", type=float, default=defaults.DEFAULT_ROTATION_HOLD_S,
        help="seconds each basis-rotation series holds its largest value, so a one-step spike "
        "survives until the next scrape; keep it >= the scrape interval (default %(default)s)",
    )  # fmt: skip
    sidecar.add_argument(
        "--history-max-rows", type=int, default=defaults.DEFAULT_HISTORY_MAX_ROWS,
        help="history rows kept; older rows are pruned (default %(default)s)",
    )  # fmt: skip
    sidecar.add_argument(
        "--max-body-bytes", type=int, default=defaults.DEFAULT_MAX_BODY_BYTES,
        help="larger snapshots are refused with 413 (default %(default)s)",
    )  # fmt: skip
    sidecar.add_argument(
        "--max-writes", type=int, default=defaults.DEFAULT_MAX_WRITES,
        help="snapshots in flight at once; beyond, 503 with Retry-After (default %(default)s)",
    )  # fmt: skip
    sidecar.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sidecar.set_defaults(func=_sidecar)


def _demo(args: argparse.Namespace) -> int:
    from orthoshard import demo

    return demo.run(args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from orthoshard import demo

    parser = sub.add_parser("demo", help="train a small GPT on 2 CPU ranks with live health")
    demo.add_arguments(parser)
    parser.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthoshard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark from bench/ (prints ratio tables)")
    # optional for argparse, so that a missing one is told what there is (argparse said
    # "required: name, rest", though nothing needs to follow the name)
    bench.add_argument("name", nargs="?", help=f"one of: {', '.join(_benchmarks())}")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=_bench)
    _add_sidecar(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
