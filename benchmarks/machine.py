"""Where benchmark numbers come from: one description shared by every benchmark's JSON."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import transformers


def machine(**extra: object) -> dict[str, object]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
    )
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024**2, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **extra,
    }
