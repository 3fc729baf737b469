"""The Core ML target (torch.export -> coremltools ML program, static shapes -> `.mlpackage`), one module per concern:

  target      `trace`, `convert`, `CoreMLTarget` (and its passes, in order)
  options     `CoreMLOptions`: `--compute-units all|cpu_and_gpu|cpu_only|cpu_and_ne`
  passes      the rewrites of the traced program before conversion (`decompose`, `emulate_bfloat16`)
  converters  the torch -> MIL lowerings coremltools lacks or gets wrong, tpc's select op among them
  checks      static shapes and the facts: MIL op counts, select chains, the Neural Engine estimate
  naming      tpc's I/O names as Core ML feature names, written into the converted spec

Names are loaded on first use, so `tpc.exporter.coreml.options` does not import torch; coremltools (seconds, an
optional extra) is imported only by the functions that convert. Imported after coremltools, the package
registers its converters at once (`converters.register_converters`).
"""

from __future__ import annotations

import importlib
import sys

from tpc.lazy import lazy_attributes

_EXPORTS = {
    "CoreMLTarget": "target",
    "DEPLOYMENT_TARGET": "target",
    "FORMAT": "target",
    "Fp32Compute": "target",
    "convert": "target",
    "module_precision": "target",
    "trace": "target",
    "CoreMLOptions": "options",
    "BF16_PREFIX": "passes",
    "Decompose": "passes",
    "EmulateBfloat16": "passes",
    "INT16_MAX": "converters",
    "SCATTER_OPS": "converters",
    "SELECT_OP": "converters",
    "TRACED_DTYPE_OPS": "converters",
    "register_converters": "converters",
    "ANE_DTYPE_RULES": "checks",
    "ANE_OP_RULES": "checks",
    "DATA_DEPENDENT_OPS": "checks",
    "GATHER_OPS": "checks",
    "SRC_GATHER": "checks",
    "SRC_INTEGER": "checks",
    "SRC_TYPED_EXECUTION": "checks",
    "SRC_UNSTATED": "checks",
    "AneRule": "checks",
    "StaticShapeError": "checks",
    "check_static_program": "checks",
    "dtype_name": "checks",
    "mil_op_counts": "checks",
    "neural_engine_report": "checks",
    "operations": "checks",
    "select_chains": "checks",
    "coreml_name": "naming",
    "io_names": "naming",
    "name_features": "naming",
}


__getattr__ = lazy_attributes(__name__, _EXPORTS)


if "coremltools" in sys.modules:  # imported after coremltools: the converters are available to the caller at once
    importlib.import_module(f"{__name__}.converters").register_converters()

__all__ = sorted(_EXPORTS)
