"""What the standalone benchmarks (http_socket.py, tls.py) share on their command line — the measured
windows (rounds, duration, warm-up, --quick) and the oxwsgi binary — and what every benchmark (bench.py
too) does at its end: publish the report, with the exit status that says whether every run was valid."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lib.tools import REPO

DEFAULT_OXWSGI = REPO / "target" / "release" / "oxwsgi"
# 10 s keeps /proc's 10 ms ticks (one clock tick) far below 1% of the CPU time; three rounds give a median
# that survives one run spoiled by a neighbour's burst; 3 s of warm-up fill the caches, let the CPU clock
# settle and run what belongs outside the window (Flask's first-request paths, oxwsgi's TLS session cache).
DEFAULT_ROUNDS = 3
DEFAULT_DURATION_SECONDS = 10
WARMUP_SECONDS = 3
# --quick, for the standalone benchmarks: three rounds still (a median needs them), of short windows
# (bench.py's --quick is a one-round smoke test of its own).
QUICK_ROUNDS = 3
QUICK_DURATION_SECONDS = 3
QUICK_WARMUP_SECONDS = 1


def add_arguments(parser: argparse.ArgumentParser, of_all: str, quick_also: str = "") -> None:
    """--rounds (of all `of_all`), --duration, --quick (which also does `quick_also`) and --oxwsgi."""
    parser.add_argument("--rounds", type=int, help=f"rounds of all {of_all} (default {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--duration", type=int, help=f"seconds per measured window (default {DEFAULT_DURATION_SECONDS})"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} rounds of {QUICK_DURATION_SECONDS} s{quick_also}")
    parser.add_argument(
        "--oxwsgi",
        type=Path,
        default=Path(os.environ.get("OXWSGI_BIN") or DEFAULT_OXWSGI),
        help="the oxwsgi binary (default: $OXWSGI_BIN or target/release/oxwsgi)",
    )


def resolve(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    quick_rounds: int = QUICK_ROUNDS,
    quick_duration: int = QUICK_DURATION_SECONDS,
) -> None:
    """Fills in the windows --quick (`quick_rounds` of `quick_duration` s) or the defaults give; an explicit
    --rounds or --duration wins."""
    if args.rounds is None:
        args.rounds = quick_rounds if args.quick else DEFAULT_ROUNDS
    if args.duration is None:
        args.duration = quick_duration if args.quick else DEFAULT_DURATION_SECONDS
    args.warmup = QUICK_WARMUP_SECONDS if args.quick else WARMUP_SECONDS
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration must be at least 1")


def publish(report: str, path: Path, invalid: str | None) -> int:
    """Prints and writes the report; the exit status is 1 (saying so) when `invalid` names what was."""
    print("\n" + report)
    path.write_text(report)
    print(f"written to {path.relative_to(REPO)}")
    if invalid:
        print(f"!!! some {invalid} were INVALID (see above): exit status 1", file=sys.stderr)
        return 1
    return 0
