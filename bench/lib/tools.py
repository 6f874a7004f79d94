"""The binaries a benchmark run needs, found and checked before anything starts, and snapshotted: oxwsgi
and the Rust examples are copied into the run's temporary directory, so a rebuild during the benchmark
cannot put two builds into one report. Also the environment the report starts with (versions, commit,
machine, kernel limits that the scenarios depend on)."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .procs import BenchError, command_output

REPO = Path(__file__).resolve().parents[2]
SETUP_HINT = "run bench/run.sh, which installs it"
# What each Rust example is built from (besides the library crates): a file here newer than the binary
# means the binary may not match the sources.
EXAMPLE_SOURCES = {
    "uwsgi_load": "bench/uwsgi_load.rs",
    "floor": "bench/floor.rs",
    "design_runtime_per_thread": "bench/designs/runtime_per_thread.rs",
    "design_accept_on_python_thread": "bench/designs/accept_on_python_thread.rs",
}
# What the oxwsgi binary is built from.
OXWSGI_SOURCES = ("src", "proto/src", "Cargo.toml", "Cargo.lock", "build.rs")
# A placeholder example (`fn main() {}`) answers `--help` at once with nothing; a real one prints its usage
# or an error. This long is waited for an answer before the probe is stopped.
PROBE_TIMEOUT_SECONDS = 5


@dataclass(frozen=True)
class Tools:
    """Every binary a run may start. `examples` holds the snapshots of the Rust examples the chosen
    scenarios need, by example name (uwsgi_load, floor, design_...)."""

    oxwsgi: Path
    uwsgi: Path
    nginx: Path
    wrk: Path
    strace: Path | None
    examples: dict[str, Path]

    def require(self, example: str) -> Path:
        if example not in self.examples:
            raise BenchError(f"internal: the example {example} was not looked for")
        return self.examples[example]


def require_executable(path: Path | str | None, what: str, hint: str) -> Path:
    if path is None or not os.access(path, os.X_OK) or not Path(path).is_file():
        raise BenchError(f"{what} not found ({path}); {hint}")
    return Path(path)


def is_placeholder(binary: Path) -> bool:
    """True for a binary that exits at once, successfully and silently, when asked for --help."""
    try:
        done = subprocess.run([str(binary), "--help"], capture_output=True, timeout=PROBE_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and not (done.stdout + done.stderr).strip()


def console_script(name: str) -> Path:
    """Where pip put the console script `name` of a package installed into this interpreter (pyuwsgi's
    `uwsgi`, `gunicorn`, `granian`): next to this interpreter's other scripts, whatever is first on PATH."""
    return Path(sysconfig.get_path("scripts")) / name


def check_flags(binary: Path, flags: tuple[str, ...], why: str) -> None:
    """Stops the benchmark if `binary --help` lacks one of `flags` (an older build); `why` says what the
    comparison would lose."""
    text = command_output([str(binary), "--help"])
    missing = [flag for flag in flags if flag not in text]
    if missing:
        raise BenchError(f"{binary} --help lacks {', '.join(missing)}: {why}")


def find_tools(oxwsgi: Path, examples_dir: Path, examples: list[str], need_strace: bool, workdir: Path) -> Tools:
    """Every binary, checked and snapshotted before anything starts."""
    original = require_executable(oxwsgi, "the oxwsgi binary", "build it with `bash scripts/setup.sh`")
    snapshot = workdir / "oxwsgi"
    shutil.copy2(original, snapshot)
    found = {}
    for name in examples:
        path = require_executable(
            examples_dir / name,
            f"the {name} example",
            f"build it with `cargo build --release --example {name}` (bench/run.sh does)",
        )
        if is_placeholder(path):
            raise BenchError(f"{path} is still a placeholder (it does nothing); build the real {EXAMPLE_SOURCES[name]}")
        found[name] = workdir / name
        shutil.copy2(path, found[name])
    uwsgi = console_script("uwsgi")
    strace = None
    if need_strace:
        strace = require_executable(shutil.which("strace"), "strace", SETUP_HINT)
    return Tools(
        oxwsgi=snapshot,
        uwsgi=require_executable(uwsgi, "uWSGI (pyuwsgi's `uwsgi` script)", SETUP_HINT),
        nginx=require_executable(shutil.which("nginx") or "/usr/sbin/nginx", "nginx", SETUP_HINT),
        wrk=require_executable(shutil.which("wrk"), "wrk", SETUP_HINT),
        strace=strace,
        examples=found,
    )


# --- versions and the machine -----------------------------------------------------------------------------


def newest_mtime(sources: tuple[str, ...]) -> float:
    paths = [REPO / source for source in sources]
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return max((f.stat().st_mtime for f in files), default=0.0)


def timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def build_note(binary: Path, sources: tuple[str, ...]) -> str:
    """When the binary was built, and whether its sources changed since."""
    built_at = binary.stat().st_mtime
    stale = "; sources changed after this build" if newest_mtime(sources) > built_at else ""
    return f"built {timestamp(built_at)}{stale}"


def oxwsgi_version(original: Path) -> str:
    """The commit, and whether the binary can be trusted to be built from it."""
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain", "--", *OXWSGI_SOURCES])
    state = " + uncommitted changes" if dirty else ""
    return f"commit {commit}{state} (binary {build_note(original, OXWSGI_SOURCES)})"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def environment(tools: Tools, original_oxwsgi: Path, examples_dir: Path) -> list[tuple[str, str]]:
    """What the numbers depend on, for the report's header."""
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    env = [
        ("Date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("Machine", f"{os.cpu_count()} cores ({cpu_model()}), Linux {platform.release()}, shared"),
        ("Load average at start", load_average()),
        ("oxwsgi", f"{command_output([str(tools.oxwsgi), '--version'])}, {oxwsgi_version(original_oxwsgi)}"),
        ("uWSGI", f"{command_output([str(tools.uwsgi), '--version'])} (pyuwsgi {metadata.version('pyuwsgi')})"),
    ]
    for name in tools.examples:
        source = EXAMPLE_SOURCES[name]
        env.append((name, f"{examples_dir / name} ({build_note(examples_dir / name, (source, 'proto/src'))})"))
    env += [
        ("nginx", command_output([str(tools.nginx), "-v"]).removeprefix("nginx version: ")),
        ("Python", f"{platform.python_version()}, Flask {metadata.version('flask')}"),
        ("wrk", command_output([str(tools.wrk), "-v"]).splitlines()[0].split(" [")[0]),
    ]
    if tools.strace is not None:
        env.append(("strace", command_output([str(tools.strace), "-V"]).splitlines()[0]))
    env.append(("Limits", f"net.core.somaxconn {somaxconn}, open files {nofile} (servers and load generators)"))
    return env
