"""The machine a profile ran on, as a report records it: a latency means nothing without its device."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from tpc.profiling.report import Machine


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def _gpu() -> str | None:
    """The first NVIDIA GPU's name, if nvidia-smi is there and answers quickly."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = done.stdout.strip().splitlines()
    return names[0].strip() if done.returncode == 0 and names else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def this_machine(runtime_versions: dict[str, str]) -> Machine:
    versions = {name: v for name in ("tpc", "numpy") if (v := _version(name)) is not None}
    return Machine(
        platform=platform.platform(),
        cpu=_cpu_model(),
        cores=os.cpu_count() or 1,
        memory_gib=_memory_gib(),
        gpu=_gpu(),
        python=platform.python_version(),
        versions={**versions, **runtime_versions},
    )
