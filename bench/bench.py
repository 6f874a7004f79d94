"""oxwsgi against uWSGI, side by side, in every traffic shape a deployment meets: small requests through
nginx and straight to the socket, several processes and threads, a Flask app, slow apps, large responses
from memory and from files, 100 MiB uploads and streams, idle connections, and the system calls and memory
behind them; with a floor (a server with no Python at all) where it shows how low the cost can go.

For every scenario and every server configuration, one *run* starts fresh processes, checks one response,
warms up, and measures one window, reading the CPU time of the server's whole process tree (master and
workers) from /proc before and after it. Configurations alternate in rounds (A B C, A B C, ...) so that
the machine's noise falls on all of them alike; the report gives medians over valid runs and ratios to
uWSGI. A run with wrong answers, socket errors (except where they are the result, idle-1500), or a server
process that died or was replaced is invalid: it is reported loudly, left out of the medians, and the
script exits with status 1 at the end. bench/README.md explains the method and how to read the output.
The machinery lives in bench/lib/ (its __init__ lists the modules).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

from lib import windows
from lib.procs import run_entry_point
from lib.report import Plan, describe, invalid_details, render
from lib.results import RunResult
from lib.scenarios import (
    KIND_DIRECT,
    KIND_IDLE,
    KIND_SYSCALLS,
    MEMORY,
    SCENARIO_NAMES,
    SCENARIOS,
    Settings,
    create_shapes_file,
    measure,
)
from lib.servers import DESIGNS, FLOOR, OXWSGI_REQUIRED_FLAGS, server_env
from lib.tools import REPO, Tools, check_flags, environment, find_tools, load_average

RESULTS = REPO / "bench" / "results" / "latest.md"
DEFAULT_EXAMPLES = REPO / "target" / "release" / "examples"

# --quick: a smoke test of every scenario (one round of short windows), not a measurement to quote.
QUICK_ROUNDS = 1
QUICK_DURATION_SECONDS = 4
# idle-1500 holds 1500 connections on each side (the load generator's, the server's) besides the real
# ones; both inherit this process's open-files limit, which is raised to this (within the hard limit).
OPEN_FILES_WANTED = 8192
OPEN_FILES_NEEDED = 2048


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, help=f"rounds of all configurations (default {windows.DEFAULT_ROUNDS})"
    )
    parser.add_argument(
        "--duration", type=int, help=f"seconds per measured window (default {windows.DEFAULT_DURATION_SECONDS})"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIO_NAMES),
        help=f"comma-separated, in this order by default: {','.join(SCENARIO_NAMES)},{MEMORY} "
        f"({MEMORY} is read in the hello runs)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_ROUNDS} round of {QUICK_DURATION_SECONDS} s "
        "(--rounds and --duration still win)",
    )
    parser.add_argument(
        "--oxwsgi",
        type=Path,
        default=Path(os.environ.get("OXWSGI_BIN") or windows.DEFAULT_OXWSGI),
        help="the oxwsgi binary (default: $OXWSGI_BIN or target/release/oxwsgi)",
    )
    parser.add_argument(
        "--examples-dir",
        type=Path,
        default=DEFAULT_EXAMPLES,
        help="where uwsgi_load, floor and the design prototypes are (default: target/release/examples)",
    )
    parser.add_argument(
        "--designs",
        action="store_true",
        help="also run design-a (design_runtime_per_thread) and design-b (design_accept_on_python_thread) "
        "in hello, hello-direct and syscalls",
    )
    args = parser.parse_args(argv)
    windows.resolve(parser, args, QUICK_ROUNDS, QUICK_DURATION_SECONDS)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*SCENARIO_NAMES, MEMORY)]
    if unknown or not names:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join((*SCENARIO_NAMES, MEMORY))}")
    # Memory is read in the hello runs: asking for it runs hello. Scenarios keep their canonical order.
    if MEMORY in names:
        names.append("hello")
    args.scenarios = tuple(s for s in SCENARIOS if s.name in names)
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    designs = DESIGNS if args.designs and any(s.designs for s in args.scenarios) else ()
    configs = {s.name: s.configs + (designs if s.designs else ()) for s in args.scenarios}
    return Plan(args.scenarios, configs, args.rounds, args.duration, args.warmup, designs)


def examples_needed(plan: Plan) -> list[str]:
    """The Rust examples the chosen scenarios start."""
    needed = []
    if any(s.kind in (KIND_DIRECT, KIND_IDLE, KIND_SYSCALLS) for s in plan.scenarios):
        needed.append("uwsgi_load")
    configs = {c for cs in plan.configs.values() for c in cs}
    if FLOOR in configs:
        needed.append("floor")
    needed += [d.binary for d in plan.designs if d in configs]
    return needed


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if max(soft, wanted) < OPEN_FILES_NEEDED:
        print(f"!!! open files limited to {max(soft, wanted)}: idle-1500 will run out of descriptors")


def run_rounds(tools: Tools, settings: Settings, plan: Plan, workdir: Path) -> list[RunResult]:
    """A B C, A B C: every round runs every scenario under each of its configurations, in the same order."""
    results = []
    for round_no in range(1, plan.rounds + 1):
        for i, scenario in enumerate(plan.scenarios):
            for j, config in enumerate(plan.configs[scenario.name]):
                run_dir = workdir / f"run-{round_no}-{i}-{j}"
                result = measure(tools, settings, scenario, config, round_no, run_dir)
                print(describe(result), flush=True)
                if not result.valid:
                    print(invalid_details(run_dir), flush=True)
                results.append(result)
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_entry_point("bench", lambda workdir: run(args, workdir))


def run(args: argparse.Namespace, workdir: Path) -> int:
    raise_open_files_limit()
    plan = make_plan(args)
    need_strace = any(s.kind == KIND_SYSCALLS for s in plan.scenarios)
    tools = find_tools(args.oxwsgi, args.examples_dir, examples_needed(plan), need_strace, workdir)
    # The comparison is only fair if this oxwsgi takes every option uWSGI is given.
    check_flags(tools.oxwsgi, OXWSGI_REQUIRED_FLAGS, "the two servers would not get the same options")
    shapes_file = workdir / "file-8mib.bin"
    create_shapes_file(shapes_file)
    settings = Settings(args.duration, args.warmup, server_env(shapes_file))
    env = environment(tools, args.oxwsgi, args.examples_dir)
    print("\n".join(f"{key}: {value}" for key, value in env), flush=True)
    results = run_rounds(tools, settings, plan, workdir)
    env.insert(3, ("Load average at end", load_average()))
    report = render(env, plan, results)
    return windows.publish(report, RESULTS, "runs" if any(not r.valid for r in results) else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
