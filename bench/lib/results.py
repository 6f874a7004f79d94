"""What one run measured (`RunResult`), and the metrics the report reads from runs (`Metric`): each a
number per valid run, with its direction (is higher better?), so that medians and ratios are computed the
same way for every scenario."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .load import LoadResult
from .proc_stats import KIB_PER_MIB, CpuSeconds, ProcessMemory
from .servers import ServerConfig

if TYPE_CHECKING:
    from .scenarios import Scenario

MICROSECONDS = 1_000_000
MILLISECONDS = 1_000


@dataclass(frozen=True)
class RssGrowth:
    """The worker's resident memory over a window, in KiB: before it, the peak during it, and at its end.
    With several workers, the one that grew most."""

    before_kib: int
    peak_kib: int
    after_kib: int

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.before_kib) / KIB_PER_MIB

    @property
    def retained_mib(self) -> float:
        return (self.after_kib - self.before_kib) / KIB_PER_MIB


@dataclass
class RunResult:
    """One run: one scenario, one server configuration, one round, fresh processes."""

    scenario: Scenario
    config: ServerConfig
    round: int
    load: LoadResult | None = None
    cpu: CpuSeconds | None = None
    # Taken after the measured window of the hello runs.
    memory: list[ProcessMemory] = field(default_factory=list)
    rss: RssGrowth | None = None
    # strace -c: calls by system call name over the counted requests.
    syscalls: dict[str, int] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.load is not None and not self.problems

    def per_request(self, seconds: float, unit: int) -> float | None:
        if self.load is None or self.load.requests == 0:
            return None
        return seconds * unit / self.load.requests

    def memory_mib(self, role: str, pss: bool = False) -> float | None:
        values = [(m.pss_kib if pss else m.rss_kib) for m in self.memory if m.role == role]
        known = [v for v in values if v is not None]
        return max(known) / KIB_PER_MIB if known else None

    @property
    def tree_pss_mib(self) -> float | None:
        values = [m.pss_kib for m in self.memory]
        if not values or any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None) / KIB_PER_MIB

    @property
    def syscalls_per_request(self) -> dict[str, float]:
        if not self.syscalls or self.load is None or not self.load.requests:
            return {}
        return {name: n / self.load.requests for name, n in self.syscalls.items()}


@dataclass(frozen=True)
class Metric:
    """A number read from each valid run. `digits` is how it is printed; `higher_is_better` sets the arrow
    in the report (↑ or ↓); `summary` puts it into the summary table as well as the scenario's own;
    below `negligible`, a value is noise, and two such values have no meaningful ratio."""

    label: str
    get: Callable[[RunResult], float | None]
    digits: int
    higher_is_better: bool
    summary: bool = True
    negligible: float = 0.0

    @property
    def title(self) -> str:
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"


def _load(run: RunResult) -> LoadResult:
    assert run.load is not None
    return run.load


def _idle(run: RunResult, name: str) -> float | None:
    idle = _load(run).idle
    return None if idle is None else float(getattr(idle, name))


def _cpu(run: RunResult) -> CpuSeconds:
    assert run.cpu is not None
    return run.cpu


REQUESTS_PER_SECOND = Metric("req/s", lambda r: _load(r).rps, 0, True)
CPU_US = Metric("CPU µs/req", lambda r: r.per_request(_cpu(r).server, MICROSECONDS), 1, False)
NGINX_US = Metric("nginx CPU µs/req", lambda r: r.per_request(_cpu(r).nginx, MICROSECONDS), 1, False)
LATENCY_P99 = Metric("p99 latency ms", lambda r: _load(r).latency_ms.get("p99"), 1, False, summary=False)
CPU_MS = Metric("CPU ms/req", lambda r: r.per_request(_cpu(r).server, MILLISECONDS), 1, False)
NGINX_MS = Metric("nginx CPU ms/req", lambda r: r.per_request(_cpu(r).nginx, MILLISECONDS), 1, False)
# Below 1 MiB, RSS moves with the allocator's arenas and the pages a request happens to touch: a server
# that holds a 100 MiB body grows by about 100.
RSS_NOISE_MIB = 1.0
RSS_GROWTH = Metric(
    "worker RSS growth MiB", lambda r: r.rss.growth_mib if r.rss else None, 1, False, negligible=RSS_NOISE_MIB
)
RSS_RETAINED = Metric(
    "worker RSS retained MiB", lambda r: r.rss.retained_mib if r.rss else None, 1, False, False, RSS_NOISE_MIB
)
SECONDS_PER_REQUEST = Metric("s/req", lambda r: r.per_request(_load(r).seconds, 1), 2, False)
GOOD_RPS = Metric("good req/s", lambda r: _load(r).good_rps, 0, True)
TIMEOUTS = Metric("timeouts", lambda r: float(_load(r).timeouts), 0, False)
SOCKET_ERRORS = Metric("socket errors", lambda r: float(_load(r).socket_errors), 0, False)
IDLE_OPEN = Metric("idle conns open (avg)", lambda r: _idle(r, "open_avg"), 0, True, summary=False)
IDLE_REPLACED = Metric("idle conns closed by server", lambda r: _idle(r, "replaced"), 0, False, summary=False)
SYSCALLS = Metric("syscalls/req", lambda r: sum(r.syscalls_per_request.values()) or None, 1, False)
WORKER_RSS = Metric("worker VmRSS MiB", lambda r: r.memory_mib("worker"), 1, False)
MASTER_RSS = Metric("master VmRSS MiB", lambda r: r.memory_mib("master"), 1, False)
TREE_PSS = Metric("all processes PSS MiB", lambda r: r.tree_pss_mib, 1, False)
