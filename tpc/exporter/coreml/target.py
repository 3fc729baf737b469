"""The Core ML target: trace (torch.export and the passes), convert (coremltools), save the `.mlpackage`.

Pipeline. `torch.export.export(module, strict=False)`, `CoreMLTarget.passes` (decompositions with an empty table,
bfloat16 emulation), `coremltools.convert` on the ExportedProgram with tpc's converters registered, the
static-shape check, tpc's I/O names and metadata, save. Not the TorchScript path: `torch.jit.trace` +
coremltools fails under numpy 2.4, and ExportedProgram is what coremltools develops against now.

Precision. An ML program is typed: `compute_precision=FLOAT16` makes coremltools insert fp16 casts around
every float op (weights are stored fp16); `FLOAT32` keeps everything fp32. tpc's `--dtype fp16` means Core
ML's default precision (FP16 compute), `fp32` means FP32 compute. An fp16 module is converted from an fp32
copy with FP16 compute precision, because that is the route coremltools is built for: converting the fp16
ExportedProgram itself trips over converters that mix an fp32 constant into fp16 values (e.g. the bool
attention-mask path of `scaled_dot_product_attention`: "sub ... y has dtype fp16 whereas x has dtype fp32",
measured with coremltools 9.0). The copy is traced behind fp16 inputs (`Fp32Compute`), so an fp16 export's
float inputs and outputs are fp16, as the eager fp16 model's are, and an fp32 export's are fp32. Integer I/O is
int32 (Core ML has no int64); `tpc.runtimes.coreml` casts int64 <-> int32, using each output's eager dtype,
which the model's metadata records.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from tpc.exporter.base import Target, TargetOptions, export_program
from tpc.exporter.coreml.checks import (
    check_static_program,
    feature_facts,
    mil_op_counts,
    neural_engine_report,
    select_chains,
)
from tpc.exporter.coreml.converters import register_converters
from tpc.exporter.coreml.naming import name_features, with_tpc_names
from tpc.exporter.coreml.options import CoreMLOptions
from tpc.exporter.coreml.passes import BF16_PREFIX, Decompose, EmulateBfloat16
from tpc.exporter.graph_pass import GraphPass, run_passes
from tpc.runtimes.coreml import COMPUTE_UNITS, COMPUTE_UNITS_KEY, NAMES_KEY, OUTPUT_DTYPES_KEY, check_compute_units

# iOS17 / macOS14 (2023). iOS16 is the floor: `gather` with `batch_dims` (the token gather), `topk` with `sort`
# and `return_indices`, and fp16 model inputs/outputs are iOS16 opset features. iOS17 because its opset adds
# 16-bit integer types to `topk`/`gather`, and with it coremltools (pass add_int16_cast, FP16 compute) narrows
# the selection's int32 indices to int16/uint16, the 16-bit form the Neural Engine works in (apple/coremltools
# #2365); with iOS16 they stay int32. Not iOS18: nothing here needs it (its fused `scaled_dot_product_attention`
# op is not used when a `scale` is given, which transformers always passes, and its stateful KV cache does not
# fit tpc's explicit cache-in/cache-out components), and it would drop 2023 devices.
DEPLOYMENT_TARGET = "iOS17"
FORMAT = "mlprogram"


def module_precision(module: nn.Module, inputs: dict[str, Tensor]) -> str:
    """'fp16' if the module's parameters or float inputs are half precision (tpc's `--dtype fp16`), else 'fp32'."""
    floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
    floats += [t.dtype for t in inputs.values() if t.is_floating_point()]
    return "fp16" if any(d in (torch.float16, torch.bfloat16) for d in floats) else "fp32"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """coremltools prints progress bars and per-op warnings on stderr; keep them unless the conversion fails."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    captured = io.StringIO()
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield
    except Exception:
        sys.stderr.write(captured.getvalue()[-4000:])
        raise
    finally:
        logger.setLevel(level)


class Fp32Compute(nn.Module):
    """An fp16 module's fp32 copy behind fp16 inputs: the traced program takes fp16 (so the Core ML model does,
    like the eager fp16 model) and casts them to fp32 first; under FP16 compute coremltools' cast optimization
    then folds fp16 -> fp32 -> fp16 away, so the program starts in fp16 with no cast at all."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: Tensor) -> Any:
        return self.module(*(t.float() if t.dtype == torch.float16 else t for t in inputs))


def trace(
    module: nn.Module, inputs: dict[str, Tensor], passes: Sequence[GraphPass[Any]] | None = None
) -> tuple[ExportedProgram, str]:
    """The program coremltools converts, rewritten by `passes` (default: `CoreMLTarget.passes`), and the
    precision ('fp16'/'fp32') it is to run in.

    `export_program` traces row-major copies of the inputs: an expanded sample (stride 0) would reach coremltools
    as a placeholder with a non-contiguous dim order, which it refuses. An fp16 module is traced as an fp32 copy
    behind fp16 inputs (see the module docstring and `Fp32Compute`); the caller's module stays untouched.
    """
    precision = module_precision(module, inputs)
    tensors = inputs
    if precision == "fp16":  # fp16 inputs stay fp16 (bfloat16 ones become fp16: Core ML has no bfloat16)
        module = Fp32Compute(copy.deepcopy(module).float())
        tensors = {k: t.half() if t.dtype == torch.bfloat16 else t for k, t in tensors.items()}
    program = export_program(module, tensors)
    with torch.inference_mode(False), torch.no_grad():
        program = run_passes(CoreMLTarget().passes() if passes is None else passes, program, CoreMLTarget.name)
    return program, precision


def _fp16_eligible(op: Any) -> bool:
    """FP16 compute for every op but the bfloat16 rounding, which needs fp32 arithmetic."""
    return not op.name.startswith(BF16_PREFIX)


def convert(program: ExportedProgram, precision: str, compute_units: str = "all") -> Any:
    """coremltools.convert to an ML program (not yet saved), after registering tpc's converters; the returned
    MLModel's `_mil_program` is the program that `check_static_program` and the facts walk."""
    import coremltools as ct

    register_converters()
    compute_precision: Any = ct.precision.FLOAT32
    if precision == "fp16":
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=_fp16_eligible)
    with _quiet():
        return ct.convert(
            program,
            convert_to=FORMAT,
            minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
            compute_precision=compute_precision,
            compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[check_compute_units(compute_units)]),
            skip_model_load=True,  # loading compiles the model: macOS only
        )


class CoreMLTarget(Target):
    name = "coreml"
    suffix = ".mlpackage"
    extra = "coreml"
    requires = ("coremltools",)
    runtime = "coreml"
    Options: ClassVar[type[TargetOptions]] = CoreMLOptions
    options: CoreMLOptions

    def passes(self) -> list[GraphPass[Any]]:
        """The rewrites of the traced program before coremltools converts it, in order (`trace` runs them):
        decompositions first, which turn `.to(dtype)` into the `_to_copy` that the bfloat16 emulation rewrites."""
        return [Decompose(), EmulateBfloat16()]

    def export(
        self, module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...], path: Path
    ) -> dict[str, Any]:
        """Write `path` (an `.mlpackage` directory) and return its facts for the manifest."""
        import coremltools as ct

        if Path(path).suffix != self.suffix:  # coremltools would append one and write elsewhere
            raise ValueError(f"a Core ML package path must end in {self.suffix}, got '{path}'")
        program, precision = trace(module, inputs, self.passes())
        mlmodel = convert(program, precision, self.options.compute_units)
        mil = mlmodel._mil_program
        check_static_program(mil)
        spec = mlmodel.get_spec()
        names = name_features(spec, list(inputs), list(output_names))
        eager_dtypes = (  # an fp16 module's own output dtypes (LLaMA's logits are fp32) need one forward
            _eager_output_dtypes(module, inputs, output_names)
            if precision == "fp16"
            else _output_dtypes(program, output_names)
        )
        metadata = spec.description.metadata.userDefined
        metadata[NAMES_KEY] = json.dumps(names)
        metadata[OUTPUT_DTYPES_KEY] = json.dumps(eager_dtypes)
        metadata[COMPUTE_UNITS_KEY] = self.options.compute_units
        spec.description.metadata.shortDescription = "exported by tpc (token-pruning compiler)"
        final = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
        with _quiet():
            final.save(str(path))
        tpc_name = dict(names)
        return {
            "format": FORMAT,
            "minimum_deployment_target": DEPLOYMENT_TARGET,
            "compute_precision": "FLOAT16" if precision == "fp16" else "FLOAT32",
            "compute_units": self.options.compute_units,
            "mil_ops": mil_op_counts(mil),
            "inputs": with_tpc_names(feature_facts(spec.description.input), tpc_name),
            "outputs": with_tpc_names(feature_facts(spec.description.output), tpc_name),
            "select": select_chains(mil),
            "neural_engine": neural_engine_report(mil),
            "versions": {"coremltools": ct.__version__},
        }


def _numpy_dtype(dtype: torch.dtype) -> str:
    return str(torch.empty((), dtype=dtype).numpy().dtype)


def _output_dtypes(program: Any, output_names: tuple[str, ...]) -> dict[str, str]:
    """Each output's dtype in the traced program: what a runtime hands back (int64 indices and token ids, which
    Core ML returns as int32), exact for an fp32 export."""
    outputs = next(node for node in program.graph.nodes if node.op == "output").args[0]
    return {name: _numpy_dtype(node.meta["val"].dtype) for name, node in zip(output_names, outputs, strict=True)}


def _eager_output_dtypes(module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...]) -> dict[str, str]:
    """An fp16 module's output dtypes, from running it once (its program was traced from an fp32 copy)."""
    with torch.inference_mode(False), torch.no_grad():
        outputs = module(*inputs.values())
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return {name: _numpy_dtype(out.dtype) for name, out in zip(output_names, outputs, strict=True)}
