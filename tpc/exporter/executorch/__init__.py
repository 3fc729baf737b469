"""The ExecuTorch target, one module per concern:

  target      `ExecuTorchTarget`: every component a method of one `.pte`, its passes
  lowering    edge lowering + XNNPACK partitioning (the `xnnpack_partition` pass, `lower`)
  delegation  the delegation report: islands, FLOPs share, why ops stayed on portable kernels
  bundle      `--bundle`: what executor_runner and the benchmark apps need (BundledProgram, raw inputs, README)

Its runtime, and the ETDump reader for profiles recorded on a device, are `tpc.runtimes.executorch`.
"""

from __future__ import annotations

from tpc.exporter.executorch.bundle import write_bundle
from tpc.exporter.executorch.delegation import DelegationReport, delegation_report
from tpc.exporter.executorch.lowering import BACKEND, XnnpackPartition, lower, partitioner
from tpc.exporter.executorch.target import PROGRAM_FILE, SINGLE_METHOD, ExecuTorchTarget, method_name

__all__ = [
    "BACKEND",
    "PROGRAM_FILE",
    "SINGLE_METHOD",
    "DelegationReport",
    "ExecuTorchTarget",
    "XnnpackPartition",
    "delegation_report",
    "lower",
    "method_name",
    "partitioner",
    "write_bundle",
]
