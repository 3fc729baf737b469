"""Core ML on macOS: the exported `.mlpackage`, run by Core ML itself, computes what eager PyTorch computes.

Linux converts and inspects (tests/test_coreml.py); only macOS can run a Core ML model. Run on a Mac with
`python -m pytest -q device_tests/test_coreml_macos.py` (coremltools installed: `pip install 'tpc[coreml]'`).

What is checked, for tiny-clip and tiny-llava with HiPrune, on every compute-unit option:
  * kept_indices equal eager's exactly, other outputs within tpc's tolerances (fp32 1e-4/1e-3; fp16 as
    tpc.verification.TOLERANCES) -- for fp16, Core ML's FP16 compute against the eager fp16 model;
  * the kept indices equal the ONNX export's on the same input (the two lowerings of the select op agree);
  * the whole tiny-llava (vision, prefill, decode) matches eager, and, once the target is registered in tpc's CLI
    (`TARGETS`), `tpc.exporting.export` + `tpc.verification.verify` pass end to end;
  * `MLComputePlan` (macOS 14.4+) reports where each op runs; printed beside tpc's Neural Engine estimate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "darwin",
    reason="Core ML prediction runs only on macOS (coremltools cannot load a model on other systems)",
)
pytest.importorskip("coremltools", reason="needs the 'coreml' extra: pip install 'tpc[coreml]'")

from tpc.exporter.coreml import CoreMLTarget  # noqa: E402
from tpc.pipeline import Pruned, PruneRequest, as_arrays, build  # noqa: E402
from tpc.runtimes.coreml import COMPUTE_UNITS, CoreMLRuntime  # noqa: E402
from tpc.verification import TOLERANCES, Diff, eager_outputs  # noqa: E402

KEEP = 16
INDEX = "kept_indices"
# the component that selects tokens (Qwen: the windowed tower's taps and the merged-token select; Qwen3: DeepStack)
SELECTING = {
    "zoo:tiny-clip": "model",
    "zoo:tiny-llava": "vision",
    "zoo:tiny-qwen25vl": "vision",
    "zoo:tiny-qwen3vl": "vision",
}


class Exported:
    def __init__(self, pruned: Pruned, directory: Path, facts: dict[str, dict[str, Any]]) -> None:
        self.pruned, self.directory, self.facts = pruned, directory, facts

    def path(self, component: str) -> Path:
        return self.directory / f"{component}.mlpackage"

    def sample(self, component: str, seed: int = 0) -> dict[str, np.ndarray]:
        return as_arrays(self.pruned.samples(seed))[component]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """exported(model, dtype, components) -> Exported: converted once per module with the lower-level target API."""
    cache: dict[tuple, Exported] = {}

    def get(model: str, dtype: str = "fp32", components: tuple[str, ...] | None = None) -> Exported:
        key = (model, dtype, components)
        if key not in cache:
            pruned = build(PruneRequest(model, "hiprune", KEEP, {}, dtype, 1))
            directory = tmp_path_factory.mktemp("coreml")
            samples = pruned.samples(seed=0)
            facts = {}
            for name in components or (SELECTING[model],):
                part = pruned.components[name]
                path = directory / f"{name}.mlpackage"
                facts[name] = CoreMLTarget().export(part.module, samples[name], part.output_names, path)
            cache[key] = Exported(pruned, directory, facts)
        return cache[key]

    return get


def assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray], dtype: str) -> None:
    assert set(got) == set(want)
    if INDEX in want:
        assert got[INDEX].dtype == want[INDEX].dtype == np.int64
        np.testing.assert_array_equal(got[INDEX], want[INDEX])
    for name, value in want.items():
        if name == INDEX:
            continue
        assert got[name].shape == value.shape, name
        diff = Diff.of(got[name], value, TOLERANCES[dtype])
        assert diff.passed, f"{name}: max abs {diff.max_abs:.3g}, max rel {diff.max_rel:.3g} ({dtype})"


@pytest.mark.parametrize("units", list(COMPUTE_UNITS))
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("model", list(SELECTING))
def test_selecting_component_matches_eager(exported: Any, model: str, dtype: str, units: str) -> None:
    export = exported(model, dtype)
    component = SELECTING[model]
    session = CoreMLRuntime.load(export.path(component), compute_units=units)
    for seed in (0, 1):
        inputs = export.sample(component, seed)
        assert_matches(session.run(inputs), eager_outputs(export.pruned.components[component], inputs), dtype)


@pytest.mark.parametrize("model", list(SELECTING))
def test_kept_indices_equal_onnx_export(exported: Any, tmp_path: Path, model: str) -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason="the ONNX comparison needs the 'onnx' extra")
    from tpc.exporter.onnx import OnnxTarget
    from tpc.runtimes.onnxruntime import OnnxRuntime

    export = exported(model)
    component = SELECTING[model]
    part = export.pruned.components[component]
    OnnxTarget().export(part.module, export.pruned.samples(0)[component], part.output_names, tmp_path / "m.onnx")
    onnx = OnnxRuntime.load(tmp_path / "m.onnx")
    coreml = CoreMLRuntime.load(export.path(component))
    for seed in (0, 1, 2):
        inputs = export.sample(component, seed)
        np.testing.assert_array_equal(coreml.run(inputs)[INDEX], onnx.run(inputs)[INDEX])


@pytest.mark.parametrize("model", ["zoo:tiny-llava", "zoo:tiny-qwen25vl", "zoo:tiny-qwen3vl"])
def test_vlm_components_match_eager(exported: Any, model: str) -> None:
    export = exported(model, "fp32", ("vision", "prefill", "decode"))
    for name, part in export.pruned.components.items():
        inputs = export.sample(name)
        assert_matches(CoreMLRuntime.load(export.path(name)).run(inputs), eager_outputs(part, inputs), "fp32")


def test_export_and_verify_end_to_end(tmp_path: Path) -> None:
    from tpc.exporter import TARGETS

    if "coreml" not in TARGETS:
        pytest.skip("the coreml target is not registered in tpc.exporter.TARGETS in this version")
    from tpc.exporting import export
    from tpc.verification import verify

    request = PruneRequest("zoo:tiny-llava", "hiprune", KEEP, {}, "fp32", 1)
    result = export(request, "coreml", tmp_path / "out", run_verify=False)
    report = verify(result.directory, samples=2)
    assert report.passed, report.diagnosis


def test_compute_plan_beside_neural_engine_estimate(exported: Any) -> None:
    """Where Core ML actually places each op (macOS 14.4+), printed next to tpc's static estimate; the estimate
    is documented as conservative, so this reports disagreements instead of failing on them."""
    import coremltools as ct

    try:
        from coremltools.models.compute_plan import MLComputePlan
    except ImportError:
        pytest.skip("this coremltools has no MLComputePlan")
    export = exported("zoo:tiny-llava", "fp16")
    model = ct.models.MLModel(str(export.path("vision")), compute_units=ct.ComputeUnit.ALL)
    try:
        plan = MLComputePlan.load_from_path(model.get_compiled_model_path(), ct.ComputeUnit.ALL)
    except Exception as error:  # older macOS: no compute plan API
        pytest.skip(f"MLComputePlan unavailable: {error}")
    placement: dict[str, dict[str, int]] = {}
    for op in plan.model_structure.program.functions["main"].block.operations:
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        device = type(usage.preferred_compute_device).__name__ if usage is not None else "unknown"
        counts = placement.setdefault(op.operator_name, {})
        counts[device] = counts.get(device, 0) + 1
    estimate = export.facts["vision"]["neural_engine"]
    on_ane_anyway = {op: placement.get(op) for op in estimate if "MLNeuralEngineComputeDevice" in placement.get(op, {})}
    print(json.dumps({"placement": placement, "estimated_off_ane": list(estimate), "on_ane_anyway": on_ane_anyway}))
    assert placement
