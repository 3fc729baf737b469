"""The ExecuTorch runtime, and what reads a device's recordings of it:

  runtime  `ExecuTorchRuntime`: run one method of a `.pte` (`executorch.runtime`), its header check, its log
  etdump   an ETDump recorded on a device (`executor_runner --etdump_path`) as a per-operator latency table

numpy, `tpc.contract`, `tpc.errors` and the runtimes' base only, never torch at import (nor the exporter).
"""

from __future__ import annotations

from tpc.runtimes.executorch.etdump import EtdumpReport, OperatorTime, etdump_report, instruction_names, read_etdump
from tpc.runtimes.executorch.runtime import PTE, ExecuTorchRuntime, captured_stderr, check_pte

__all__ = [
    "PTE",
    "EtdumpReport",
    "ExecuTorchRuntime",
    "OperatorTime",
    "captured_stderr",
    "check_pte",
    "etdump_report",
    "instruction_names",
    "read_etdump",
]
