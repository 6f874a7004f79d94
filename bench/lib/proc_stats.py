"""What /proc says about a process tree and the machine: CPU time (utime + stime of every process of a
server's tree, master and workers), resident memory (VmRSS, the peak VmHWM, PSS), and the machine's busy
and stolen time, which tell how quiet the machine was around a measurement. Reads only, except
`reset_peak_rss`, which asks the kernel to restart a process's VmHWM."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
KIB_PER_MIB = 1024


def read_proc_stat(pid: str | int) -> tuple[int, int] | None:
    """(ppid, utime + stime in clock ticks) of one process, or None if it is gone.

    /proc/PID/stat: `pid (comm) state ppid ... utime stime ...`, utime and stime being fields 14 and 15;
    comm may contain spaces and parentheses, so the fields are counted from the last ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rpartition(")")[2].split()
    # fields[0] is field 3 (state), so field N is fields[N - 3].
    return int(fields[1]), int(fields[11]) + int(fields[12])


def tree_cpu_ticks(root: int) -> dict[int, int]:
    """utime + stime (clock ticks, all threads) of `root` and each of its descendants, by pid; the
    root comes first."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := read_proc_stat(p)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop(0)
        if pid in stats:
            tree[pid] = stats[pid][1]
            todo.extend(sorted(children.get(pid, [])))
    return tree


def tree_pids(root: int) -> list[int]:
    """`root` and its descendants, root first."""
    return list(tree_cpu_ticks(root))


def thread_ids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def machine_ticks() -> tuple[int, int]:
    """(busy, steal) clock ticks of all cores since boot, from the first line of /proc/stat:
    `cpu user nice system idle iowait irq softirq steal guest guest_nice` (guest is inside user)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal, steal


def load_cpu_seconds() -> float:
    """utime + stime of the load generators: this script's reaped children (wrk, uwsgi_load, once waited
    for) and this script itself (the sequential HTTP client runs in it; otherwise it only waits)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime


@dataclass
class CpuSeconds:
    """CPU time spent during a measured window, split by who spent it. Only `server` (and `nginx`, its
    other side) is the measurement; the rest tells how busy the machine was around it."""

    server: float = 0.0
    nginx: float = 0.0
    load: float = 0.0
    # Every non-idle second of the machine (all cores), and the part the hypervisor gave to other guests.
    machine: float = 0.0
    steal: float = 0.0

    @property
    def others(self) -> float:
        """Processes that are not part of the benchmark (another build, a test suite)."""
        return max(0.0, self.machine - self.server - self.nginx - self.load)


@dataclass(frozen=True)
class CpuSample:
    """Every CPU counter the benchmark reads, at one moment."""

    server: dict[int, int]
    nginx: dict[int, int]
    machine: tuple[int, int]
    load: float

    @classmethod
    def take(cls, server_pid: int, nginx_pid: int | None) -> CpuSample:
        nginx = tree_cpu_ticks(nginx_pid) if nginx_pid is not None else {}
        return cls(tree_cpu_ticks(server_pid), nginx, machine_ticks(), load_cpu_seconds())

    def until(self, later: CpuSample) -> CpuSeconds:
        def seconds(ticks: int) -> float:
            return ticks / CLOCK_TICKS_PER_SECOND

        return CpuSeconds(
            server=seconds(sum(later.server.values()) - sum(self.server.values())),
            nginx=seconds(sum(later.nginx.values()) - sum(self.nginx.values())),
            load=later.load - self.load,
            machine=seconds(later.machine[0] - self.machine[0]),
            steal=seconds(later.machine[1] - self.machine[1]),
        )


# --- memory -------------------------------------------------------------------------------------------


def status_kib(pid: int, key: str) -> int | None:
    """A `kB` line of /proc/PID/status (VmRSS: resident now; VmHWM: the peak of VmRSS), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def pss_kib(pid: int) -> int | None:
    """Proportional set size: resident pages, each shared page divided among the processes sharing it.
    uWSGI's workers are forked from a master that loaded the app and share its pages, so their VmRSS
    counts those pages once per process; the PSS of a tree counts them once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Restarts VmHWM at the current VmRSS (writing 5 to clear_refs, Linux 4.0+); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class ProcessMemory:
    """One process of a server's tree: its role, resident memory and PSS, in KiB."""

    pid: int
    role: str
    rss_kib: int
    pss_kib: int | None


def tree_memory(root: int) -> list[ProcessMemory]:
    """VmRSS and PSS of every process of the tree. With more than one process the root is the master and
    the others its workers; a lone process (the floor, a prototype without a master) is the worker."""
    pids = tree_pids(root)
    memory = []
    for pid in pids:
        rss = status_kib(pid, "VmRSS")
        if rss is None:
            continue
        role = "master" if pid == root and len(pids) > 1 else "worker"
        memory.append(ProcessMemory(pid, role, rss, pss_kib(pid)))
    return memory


def worker_pids(root: int) -> list[int]:
    """The processes that serve requests: the root's descendants, or the root alone if it has none."""
    pids = tree_pids(root)
    return pids[1:] or pids
