"""The report: medians over valid runs (± half their range, the noise a ratio must exceed to mean
anything), ratios of medians to uWSGI (and to the floor), one summary table, one table per scenario with
every run's values, then one line per run in the order they ran. Markdown, printed and written to
bench/results/latest.md."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from .procs import tail
from .results import Metric, RunResult
from .scenarios import KIND_SYSCALLS, MEMORY, MEMORY_METRICS, Scenario
from .servers import FLOOR, OXWSGI, UWSGI, ServerConfig

# The system calls listed per server in the syscalls scenario: the most frequent of each.
TOP_SYSCALLS = 8
# Files in a run's directory shown under an invalid run.
RUN_LOGS = (
    "failure.txt",
    "wrk.out",
    "wrk-warmup.out",
    "load.json",
    "load.log",
    "client.log",
    "strace.log",
    "server.log",
    "nginx/error.log",
)


@dataclass(frozen=True)
class Plan:
    """What the benchmark runs: the scenarios in order, each with its configurations, and how many rounds
    of how long."""

    scenarios: tuple[Scenario, ...]
    configs: dict[str, tuple[ServerConfig, ...]]
    rounds: int
    duration: int
    warmup: int
    designs: tuple[ServerConfig, ...]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# Shown instead of a ratio of two values that are both noise (Metric.negligible).
BOTH_NEGLIGIBLE = "both ≈0"


def ratio(value: float | None, base: float | None, negligible: float = 0.0) -> str:
    """value ÷ base; ∞ when only the base is 0 (idle-1500: no good request at all), — when unknown or 0 ÷ 0,
    BOTH_NEGLIGIBLE when both are below the metric's noise."""
    if value is None or base is None:
        return "—"
    if negligible and abs(value) < negligible and abs(base) < negligible:
        return BOTH_NEGLIGIBLE
    if base == 0:
        return "—" if value == 0 else "∞"
    return f"{value / base:.2f}"


def per_request(calls: float) -> str:
    """System calls per request: a call the master makes now and then is rare, not absent."""
    if calls == 0:
        return "0"
    return "<0.01" if calls < 0.005 else f"{calls:.2f}"


def number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def with_spread(values: list[float], digits: int, negligible: float = 0.0) -> str:
    """The median, and half the range of the values as a percentage of it (not for a median that is
    noise itself: a percentage of nearly nothing says nothing)."""
    middle = median(values)
    if middle is None:
        return "—"
    text = number(middle, digits)
    if len(values) > 1 and middle and abs(middle) >= negligible:
        text += f" ±{(max(values) - min(values)) / 2 / abs(middle):.0%}"
    return text


@dataclass
class Cell:
    """The runs of one configuration in one scenario."""

    config: ServerConfig
    runs: list[RunResult]

    @property
    def valid(self) -> list[RunResult]:
        return [r for r in self.runs if r.valid]

    def values(self, metric: Metric) -> list[float]:
        return [v for r in self.valid if (v := metric.get(r)) is not None]

    def median(self, metric: Metric) -> float | None:
        return median(self.values(metric))

    def each_run(self, metric: Metric) -> str:
        return ", ".join(number(metric.get(r), metric.digits) if r.valid else "invalid" for r in self.runs)


class Results:
    """All runs, looked up by scenario and configuration."""

    def __init__(self, plan: Plan, runs: list[RunResult]):
        self.plan = plan
        self.runs = runs

    def cell(self, scenario: Scenario, config: ServerConfig) -> Cell:
        return Cell(config, [r for r in self.runs if r.scenario == scenario and r.config == config])

    def configs(self, scenario: Scenario) -> tuple[ServerConfig, ...]:
        return self.plan.configs[scenario.name]

    def memory_scenario(self) -> Scenario | None:
        return next((s for s in self.plan.scenarios if s.memory), None)


# --- the summary ----------------------------------------------------------------------------------------


def summary_cell(cells: dict[ServerConfig, Cell], config: ServerConfig, metric: Metric) -> str:
    return with_spread(cells[config].values(metric), metric.digits, metric.negligible) if config in cells else "—"


def summary_rows(results: Results, scenario: Scenario, name: str, metrics: tuple[Metric, ...]) -> list[str]:
    """The scenario's summary metrics: each server's median, oxwsgi ÷ uWSGI, then the floor and the
    prototypes (— where they do not run); after a CPU row, each server's CPU ÷ the floor's."""
    cells = {c: results.cell(scenario, c) for c in results.configs(scenario)}
    rows = []
    for metric in (m for m in metrics if m.summary):
        base, ours = cells[UWSGI].median(metric), cells[OXWSGI].median(metric)
        row = [name, metric.title, summary_cell(cells, UWSGI, metric), summary_cell(cells, OXWSGI, metric)]
        row += [ratio(ours, base, metric.negligible), summary_cell(cells, FLOOR, metric)]
        rows.append(row + [summary_cell(cells, d, metric) for d in results.plan.designs])
        if FLOOR in cells and metric.label.startswith("CPU"):
            # Where each server stands against the least a server can spend.
            floor = cells[FLOOR].median(metric)
            by_floor = {c: ratio(cells[c].median(metric), floor) if c in cells else "—" for c in cells}
            row = [name, f"{metric.label} ÷ floor ↓", by_floor[UWSGI], by_floor[OXWSGI], "—", "1.00"]
            rows.append(row + [by_floor.get(d, "—") for d in results.plan.designs])
    return ["| " + " | ".join(row) + " |" for row in rows]


def summary_table(results: Results) -> list[str]:
    """Every scenario's summary metrics, then memory (read in the hello runs)."""
    columns = ["Scenario", "Metric", "uWSGI", "oxwsgi", "oxwsgi ÷ uWSGI", "floor"]
    columns += [d.name for d in results.plan.designs]
    lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "--:|" * (len(columns) - 2)]
    for scenario in results.plan.scenarios:
        lines += summary_rows(results, scenario, scenario.name, scenario.metrics)
    memory = results.memory_scenario()
    if memory is not None:
        lines += summary_rows(results, memory, MEMORY, MEMORY_METRICS)
    return lines


# --- one table per scenario -----------------------------------------------------------------------------


def detail_table(results: Results, scenario: Scenario, metrics: tuple[Metric, ...]) -> list[str]:
    """Per metric and configuration: the median, the ratios, how many runs were valid, every run's value."""
    configs = results.configs(scenario)
    cells = [results.cell(scenario, c) for c in configs]
    by_config = {cell.config: cell for cell in cells}
    floor = by_config.get(FLOOR)
    lines = [
        "| Metric | Server | median | ÷ uWSGI | " + ("÷ floor | " if floor else "") + "valid runs | each run |",
        "|---|---|--:|--:|" + ("--:|" if floor else "") + "--:|---|",
    ]
    for metric in metrics:
        base = by_config[UWSGI].median(metric)
        for cell in cells:
            value = cell.median(metric)
            by_floor = f"{ratio(value, floor.median(metric), metric.negligible)} | " if floor else ""
            lines.append(
                f"| {metric.title} | {cell.config.name} "
                f"| {with_spread(cell.values(metric), metric.digits, metric.negligible)} "
                f"| {ratio(value, base, metric.negligible)} | {by_floor}{len(cell.valid)}/{len(cell.runs)} "
                f"| {cell.each_run(metric)} |"
            )
    return lines


def syscall_table(results: Results, scenario: Scenario) -> list[str]:
    """The most frequent system calls of each server, per request (medians over the valid runs)."""
    configs = results.configs(scenario)
    per_config: dict[ServerConfig, dict[str, float]] = {}
    for config in configs:
        valid = results.cell(scenario, config).valid
        names = {name for r in valid for name in r.syscalls_per_request}
        per_config[config] = {
            name: statistics.median([r.syscalls_per_request.get(name, 0.0) for r in valid]) for name in names
        }
    shown: list[str] = []
    for counts in per_config.values():
        for name in sorted(counts, key=lambda n: -counts[n])[:TOP_SYSCALLS]:
            if name not in shown and counts[name] > 0:
                shown.append(name)
    shown.sort(key=lambda n: -max(counts.get(n, 0.0) for counts in per_config.values()))
    lines = [
        f"Per request, the {TOP_SYSCALLS} most frequent system calls of each server (medians over valid runs):",
        "",
        "| System call | " + " | ".join(c.name for c in configs) + " |",
        "|---|" + "--:|" * len(configs),
    ]
    for name in shown:
        lines.append(f"| {name} | " + " | ".join(per_request(per_config[c].get(name, 0.0)) for c in configs) + " |")
    return lines


def scenario_section(results: Results, scenario: Scenario) -> list[str]:
    lines = [f"### {scenario.name}: {scenario.title}", "", *detail_table(results, scenario, scenario.metrics), ""]
    if scenario.kind == KIND_SYSCALLS:
        lines += [*syscall_table(results, scenario), ""]
    return lines


def memory_section(results: Results, scenario: Scenario) -> list[str]:
    return [
        f"### {MEMORY}: after the measured run of {scenario.name}",
        "",
        "VmRSS of the worker and of the master, and the PSS of all the server's processes (shared pages "
        "divided among the processes sharing them) — see bench/README.md.",
        "",
        *detail_table(results, scenario, MEMORY_METRICS),
        "",
    ]


# --- the run lines --------------------------------------------------------------------------------------


def describe(result: RunResult) -> str:
    """One line per run: its metrics, then where the machine's cores went during the measured window."""
    head = f"round {result.round} {result.scenario.name:<12} {result.config.name:<8}"
    if result.load is None:
        return f"{head} no measurement\n!!! INVALID RUN: " + "; ".join(result.problems)
    metrics = result.scenario.metrics + (MEMORY_METRICS if result.scenario.memory else ())
    parts = [f"{m.label} {number(v, m.digits)}" for m in metrics if (v := m.get(result)) is not None]
    line = f"{head} " + " · ".join(parts)
    errors = {kind: n for kind, n in result.load.errors.items() if n}
    if errors:
        line += " (" + ", ".join(f"{kind} {n:,}" for kind, n in errors.items()) + ")"
    if result.syscalls:
        top = sorted(result.syscalls_per_request.items(), key=lambda kv: -kv[1])[:TOP_SYSCALLS]
        line += " (" + ", ".join(f"{name} {per_request(n)}" for name, n in top) + ")"
    if result.cpu is not None and result.load.seconds:
        cores = {
            "server": result.cpu.server,
            "nginx": result.cpu.nginx,
            "load": result.cpu.load,
            "others": result.cpu.others,
            "steal": result.cpu.steal,
        }
        line += "  cores: " + " ".join(f"{who} {seconds / result.load.seconds:.2f}" for who, seconds in cores.items())
    if result.problems:
        line += "\n!!! INVALID RUN: " + "; ".join(result.problems)
    return line


def invalid_details(run_dir: Path) -> str:
    """The load generator's output and the server's log tail, printed under an invalid run."""
    return "\n".join(f"--- {name} ---\n{tail(run_dir / name)}" for name in RUN_LOGS if (run_dir / name).exists())


# --- the whole report -----------------------------------------------------------------------------------


def method(plan: Plan) -> str:
    return (
        f"{plan.rounds} round(s); in each, every scenario runs every one of its server configurations in turn, "
        f"each run on fresh processes: start, one checked request, {plan.warmup} s of warm-up (none before "
        f"upload and stream, whose memory is read from their first request), then the measured window "
        f"({plan.duration} s of load, or the fixed number of requests of upload, stream and syscalls). "
        "uWSGI and oxwsgi get the same app and options (`--master --processes P --threads T "
        "--disable-logging`, socket mode 666, listen backlog 1024). CPU/req = utime + stime of the server's "
        "whole process tree over the window ÷ requests completed; nginx's beside it. Medians over valid "
        "runs, ± half their range; ratios are of medians (↑: higher is better, ↓: lower is better). "
        "bench/README.md explains each scenario and how to read them."
    )


def render(env: list[tuple[str, str]], plan: Plan, runs: list[RunResult]) -> str:
    results = Results(plan, runs)
    lines = ["## oxwsgi and uWSGI: every traffic shape", ""]
    lines += [f"- {key}: {value}" for key, value in env]
    lines += [f"- Method: {method(plan)}", ""]
    lines += ["### Summary", "", *summary_table(results), ""]
    for scenario in plan.scenarios:
        lines += scenario_section(results, scenario)
    memory = results.memory_scenario()
    if memory is not None:
        lines += memory_section(results, memory)
    lines += every_run_section(
        runs,
        "the server, nginx, the load generator, other processes and the hypervisor's steal",
    )
    return "\n".join(lines)


def every_run_section(runs: list, who: str) -> list[str]:
    """Every run in order with the cores `who` used in its window, then which runs were invalid."""
    lines = [
        "### Every run, in order",
        "",
        f"Its metrics, then the cores used during its measured window by {who}:",
        "",
        "```",
        *(describe(r) for r in runs),
        "```",
        "",
    ]
    invalid = [r for r in runs if not r.valid]
    if invalid:
        lines.append(f"**{len(invalid)} INVALID RUN(S)**, left out of the medians:")
        lines += [f"- round {r.round}, {r.scenario.name}, {r.config.name}: {'; '.join(r.problems)}" for r in invalid]
    else:
        lines.append(f"All {len(runs)} runs were valid.")
    lines.append("")
    return lines
