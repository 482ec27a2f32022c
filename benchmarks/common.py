"""What the benchmark scripts share: the machine header, derived specs, running the CLI, reading results.

Every benchmark prints `machine_header()` first (cores, GPU or not, library versions, date, load
average), so a pasted table always says where it was measured. The CLI runs as a real
subprocess (`python -m fer_tune.cli ...`), exactly as a user runs it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SEARCH_SPACES = REPO / "search_spaces"
FER2013 = REPO.parent / "shared" / "data" / "fer2013-4k"
LIBRARIES = ("torch", "timm", "ray", "optuna", "albumentations", "numpy")


# --- where it ran --------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_description() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none (CPU only)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + (" + uncommitted changes" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "n/a"


def machine_header(title: str, command: Optional[Sequence[str]] = None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {title}", "",
             f"- command: `{' '.join(command if command is not None else ['python', *sys.argv])}`",
             f"- date: {now}; fer-tune {git_revision()}",
             f"- machine: {usable_cores()} usable cores ({os.cpu_count()} online), {cpu_model()}; "
             f"GPU: {gpu_description()}",
             f"- python {platform.python_version()}; " + ", ".join(f"{p} {version(p)}" for p in LIBRARIES),
             f"- load average at start: {load_average()} (a busy machine makes timings meaningless)",
             ""]
    return "\n".join(lines)


# --- specs ---------------------------------------------------------------------------------------

def write_spec(base: Path, overrides: Iterable[str], path: Path, drop_space: bool = False) -> Path:
    """`base` with `--set`-style overrides applied, validated, written as a complete YAML to `path`.

    Both arms of a comparison then read the very same file. `drop_space` removes the search
    space (a fixed config).
    """
    from fer_tune.specfile import load_spec

    spec = load_spec(base, list(overrides))
    if drop_space:
        spec = spec.with_values({})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.to_yaml())
    return path


# --- the CLI as a subprocess -----------------------------------------------------------------------

class CommandFailed(RuntimeError):
    pass


def run_cli(args: Sequence[str], log: Path, env: Optional[dict] = None) -> float:
    """Run `python -m fer_tune.cli ARGS` to completion; return its wall time in seconds.

    Output goes to `log`; a non-zero exit raises CommandFailed with the log's last lines.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fer_tune.cli", *map(str, args)]
    started = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        rc = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}).returncode
    wall = time.perf_counter() - started
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise CommandFailed(f"exit {rc}: {' '.join(command)}\n--- last lines of {log} ---\n{tail}")
    return wall


def read_metrics(experiment: Path) -> dict:
    """An experiment's held-out test results: DIR/report/metrics.json."""
    return json.loads((Path(experiment) / "report" / "metrics.json").read_text())


def epochs_spent(metrics: dict) -> int:
    """Epochs an experiment trained: all trials' (a search) or the one run's (`train`)."""
    return int(metrics.get("epochs_spent", metrics.get("epochs_run", 0)) or 0)


# --- small formatting helpers ----------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return v if isinstance(v, str) else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    if value != value:  # nan
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "NOT met"


def smoke_note(smoke: bool) -> str:
    return ("SMOKE RUN: tiny models and data, a wiring check only; these numbers are not results.\n"
            if smoke else "")
