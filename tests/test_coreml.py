"""Core ML target on Linux: conversion, static shapes, the select composite, the artifact's interface, precision.

Core ML prediction is macOS-only (device_tests/test_coreml_macos.py compares outputs with eager there). What Linux
can check, it checks here: every model family converts with each method it accepts; no MIL value has a symbolic
shape; where a component selects tokens, a MIL `topk` reaches a `gather`'s indices; the saved package opens in a
process that cannot import torch and declares the expected static interface; and the lowerings whose semantics
matter (select under any topk tie order, first-index argmax, bfloat16 rounding) are evaluated in numpy/torch.

Each model is built once per module and each component converted once; the prefill/decode graphs of the vision
methods are the same graph at the same K, so they are converted for HiPrune only. The two OpenVLA conversions
take about a minute together and are marked slow.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="the Core ML target needs the 'coreml' extra (coremltools)")

import tpc.exporter.coreml as coreml_target
import tpc.exporter.coreml.converters as coreml_converters
from tpc.errors import RuntimeUnavailable, UsageError
from tpc.exporter.coreml import CoreMLTarget, StaticShapeError, check_static_program
from tpc.pipeline import Pruned, PruneRequest, as_arrays, build
from tpc.runtimes.coreml import CoreMLRuntime
from tpc.verification import eager_outputs

KEEP = 16
# (model, method, component): what is converted; True where the component selects tokens with a computed score.
CASES: dict[tuple[str, str, str], bool] = {
    **{(model, "hiprune", "model"): True for model in ("zoo:tiny-clip", "zoo:tiny-siglip")},
    **{(model, "divprune", "model"): True for model in ("zoo:tiny-clip", "zoo:tiny-siglip")},
    # Random's scores are a build-time constant: coremltools folds the selection into constant indices
    **{(model, "random", "model"): False for model in ("zoo:tiny-clip", "zoo:tiny-siglip")},
    ("zoo:tiny-clip", "uniform", "model"): False,  # constant scores, via index_fill
    ("zoo:tiny-clip", "none", "model"): False,  # the baseline: all tokens, constant kept_indices
    ("zoo:tiny-llava", "hiprune", "vision"): True,
    ("zoo:tiny-llava", "hiprune", "prefill"): False,
    ("zoo:tiny-llava", "hiprune", "decode"): False,
    ("zoo:tiny-llava", "divprune", "vision"): True,
    ("zoo:tiny-llava", "random", "vision"): False,
    ("zoo:tiny-llava", "fastv", "prefill"): True,
}
SLOW_CASES: dict[tuple[str, str, str], bool] = {
    # 40 s each on 2 cores; VLA-Pruner's pruned graph holds everything FastV's step graph does, plus the guide
    ("zoo:tiny-openvla", "vla-pruner", "pruned"): True,
}
COREML_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int32", "int32": "int32"}

STANDALONE = textwrap.dedent(
    """
    import json, sys

    class NoTorch:  # coremltools imports torch when it can: make sure it cannot
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "torchao", "transformers", "tpc", "executorch"):
                raise ModuleNotFoundError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, NoTorch())
    import coremltools as ct

    report = {}
    for path in sys.argv[1:]:
        model = ct.models.MLModel(path, skip_model_load=True)
        description = model.get_spec().description
        report[path] = {
            "inputs": {f.name: list(f.type.multiArrayType.shape) for f in description.input},
            "outputs": {f.name: list(f.type.multiArrayType.shape) for f in description.output},
            "metadata": dict(description.metadata.userDefined),
        }
    loaded = [m for m in ("torch", "transformers", "tpc") if m in sys.modules]
    assert not loaded, loaded
    print(json.dumps(report))
    """
)


class Converted:
    """A converted component: its facts, its package, the inputs it was traced with and eager's outputs."""

    def __init__(self, facts: dict[str, Any], path: Path, inputs: dict[str, np.ndarray], expected: dict) -> None:
        self.facts, self.path, self.inputs, self.expected = facts, path, inputs, expected


@pytest.fixture(scope="module")
def built() -> Any:
    cache: dict[tuple[str, str, str], Pruned] = {}

    def get(model: str, method: str, dtype: str = "fp32") -> Pruned:
        key = (model, method, dtype)
        if key not in cache:
            cache[key] = build(PruneRequest(model, method, None if method == "none" else KEEP, {}, dtype, 1))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def converted(built: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[tuple, Converted] = {}

    def get(model: str, method: str, component: str, dtype: str = "fp32", units: str = "all") -> Converted:
        key = (model, method, component, dtype, units)
        if key not in cache:
            pruned = built(model, method, dtype)
            part = pruned.components[component]
            tensors = pruned.samples(seed=0)[component]
            path = tmp_path_factory.mktemp("coreml") / f"{component}.mlpackage"
            facts = CoreMLTarget(units).export(part.module, tensors, part.output_names, path)
            inputs = as_arrays({component: tensors})[component]
            cache[key] = Converted(facts, path, inputs, eager_outputs(part, inputs))
        return cache[key]

    return get


def check_conversion(result: Converted, output_names: tuple[str, ...], selects: bool) -> None:
    facts = result.facts
    json.dumps(facts)  # manifest-ready
    assert facts["format"] == "mlprogram" and facts["minimum_deployment_target"] == "iOS17"
    assert facts["compute_precision"] == "FLOAT32" and facts["compute_units"] == "all"
    assert facts["versions"]["coremltools"]
    assert (result.path / "Manifest.json").is_file()
    # the interface: tpc's names in tpc's order, static shapes, int64 -> int32
    assert list(facts["inputs"]) == list(result.inputs)
    assert list(facts["outputs"]) == list(output_names)
    for name, array in result.inputs.items():
        assert facts["inputs"][name]["shape"] == list(array.shape)
        assert facts["inputs"][name]["dtype"] == COREML_DTYPES[str(array.dtype)]
    for name, array in result.expected.items():
        assert facts["outputs"][name]["shape"] == list(array.shape)
        assert facts["outputs"][name]["dtype"] == COREML_DTYPES[str(array.dtype)]
    # the selection: Core ML's own topk feeding the token gather (through the ascending topk)
    chains = facts["select"]
    if selects:
        assert any(
            c.startswith("topk(") and "topk(" in c[5:] and c.split(" -> ")[-1].startswith("gather") for c in chains
        )
        assert facts["mil_ops"]["topk"] >= 2
    else:
        assert not any("select_tokens" in c for c in chains)
    # Neural Engine facts: FP32 compute keeps every float op off the NE; each entry says why and where from
    ane = facts["neural_engine"]
    assert ane and all(ane[op]["count"] <= facts["mil_ops"][op] for op in ane)
    assert all(entry["reason"] and entry["source"] for entry in ane.values())
    if "gather" in facts["mil_ops"]:
        assert "gather" in ane


@pytest.mark.parametrize(("model", "method", "component"), list(CASES))
def test_converts_static_with_select(converted: Any, built: Any, model: str, method: str, component: str) -> None:
    result = converted(model, method, component)
    check_conversion(result, built(model, method).components[component].output_names, CASES[model, method, component])


@pytest.mark.slow
@pytest.mark.parametrize(("model", "method", "component"), list(SLOW_CASES))
def test_converts_policy(converted: Any, built: Any, model: str, method: str, component: str) -> None:
    result = converted(model, method, component)
    check_conversion(result, built(model, method).components[component].output_names, True)


def test_separate_process_reads_the_interface(converted: Any) -> None:
    """The package stands alone: coremltools opens it in a process where torch cannot even be imported, and its
    description has the static shapes and (sanitized) names of the facts, plus the metadata the runtime needs."""
    results = [converted("zoo:tiny-clip", "hiprune", "model"), converted("zoo:tiny-llava", "hiprune", "decode")]
    paths = [str(r.path) for r in results]
    done = subprocess.run([sys.executable, "-c", STANDALONE, *paths], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for path, result in zip(paths, results, strict=True):
        seen = report[path]
        for kind in ("inputs", "outputs"):
            want = {fact.get("coreml_name", name): fact["shape"] for name, fact in result.facts[kind].items()}
            assert seen[kind] == want
        names = json.loads(seen["metadata"]["tpc.io_names"])
        assert sorted(names.values()) == sorted([*result.facts["inputs"], *result.facts["outputs"]])
        assert seen["metadata"]["tpc.compute_units"] == "all"
    decode = report[paths[1]]
    assert "past_0_key" in decode["inputs"] and "present_3_value" in decode["outputs"]
    assert json.loads(decode["metadata"]["tpc.output_dtypes"])["logits"] == "float32"
    assert json.loads(report[paths[0]]["metadata"]["tpc.output_dtypes"])["kept_indices"] == "int64"


def test_fp16_converts_with_fp16_compute(converted: Any) -> None:
    """`--dtype fp16`: the fp16 module is converted from an fp32 copy with FP16 compute (Core ML's default); the
    interface is fp16/int32 like the eager fp16 model's, and the float ops leave the Neural Engine table (only
    selection and integer/bool ops remain)."""
    result = converted("zoo:tiny-clip", "hiprune", "model", dtype="fp16")
    facts = result.facts
    assert facts["compute_precision"] == "FLOAT16"
    assert facts["inputs"]["pixel_values"] == {"shape": [1, 3, 64, 64], "dtype": "float16"}
    assert facts["outputs"] == {
        "kept_features": {"shape": [1, 16, 64], "dtype": "float16"},
        "kept_indices": {"shape": [1, 16], "dtype": "int32"},
    }
    assert facts["mil_ops"]["cast"] <= 2  # no fp32 <-> fp16 casts at the inputs: only int16 narrowing
    assert any(c.startswith("topk(") and c.split(" -> ")[-1].startswith("gather") for c in facts["select"])
    ane = facts["neural_engine"]
    assert {"topk", "gather"} <= set(ane)
    assert not {"linear", "conv", "matmul", "softmax", "layer_norm"} & set(ane)
    fp32 = converted("zoo:tiny-clip", "hiprune", "model").facts["neural_engine"]
    assert {"linear", "conv", "matmul", "softmax"} <= set(fp32)


def test_compute_units_option(converted: Any) -> None:
    result = converted("zoo:tiny-clip", "random", "model", units="cpu_and_ne")
    assert result.facts["compute_units"] == "cpu_and_ne"
    with pytest.raises(UsageError) as error:
        CoreMLTarget("gpu")
    message = str(error.value)
    assert "\n" not in message and "'gpu'" in message
    assert all(v in message for v in ("all", "cpu_and_gpu", "cpu_only", "cpu_and_ne"))


class SelectOnly(torch.nn.Module):
    def forward(self, scores: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.tpc.select_tokens(scores, tokens, 5)


def test_select_op_lowers_to_topk_topk_gather(tmp_path: Path) -> None:
    """The opaque `tpc::select_tokens` node becomes: NaN -> -inf key; topk for the K-th best key; a tie-free
    integer priority and its topk (the K best, equal keys by lower index); the ascending topk; the gather."""
    scores, tokens = torch.randn(2, 12), torch.randn(2, 12, 3)
    program, precision = coreml_target.trace(SelectOnly(), {"scores": scores, "tokens": tokens})
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "tpc.select_tokens.default" in targets and precision == "fp32"
    facts = CoreMLTarget().export(
        SelectOnly(), {"scores": scores, "tokens": tokens}, ("idx", "kept"), tmp_path / "s.mlpackage"
    )
    assert facts["mil_ops"]["topk"] == 3 and facts["mil_ops"]["gather"] == 1
    assert facts["mil_ops"]["not_equal"] == 1  # NaN -> -inf
    (chain,) = facts["select"]
    ops = [step.split("(")[0] for step in chain.split(" -> ")]
    assert ops[0] == "topk" and ops[-1] == "gather" and ops[-3:-1] == ["topk", "select"]
    assert "topk(select_tokens_best) -> topk(select_tokens_ascending)" in chain
    assert facts["outputs"] == {
        "idx": {"shape": [2, 5], "dtype": "int32"},
        "kept": {"shape": [2, 5, 3], "dtype": "float32"},
    }


def test_registration_is_idempotent_and_survives_reload() -> None:
    coreml_converters.register_converters()
    coreml_converters.register_converters()
    registry = coreml_converters._registry()
    sdpa = registry.get_func("scaled_dot_product_attention")
    assert not getattr(sdpa._tpc_original, "_tpc_converter", False)  # wraps coremltools' own, once
    module = importlib.reload(coreml_converters)  # coremltools is imported: the reload registers again
    assert module._registered
    reloaded = registry.get_func("scaled_dot_product_attention")
    assert reloaded._tpc_original is sdpa._tpc_original
    assert registry.get_func("tpc::select_tokens") is module._select_tokens


def test_non_static_program_is_refused() -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol

    @mb.program(input_specs=[mb.TensorSpec(shape=(get_new_symbol(), 4))])
    def program(x: Any) -> Any:
        return mb.relu(x=x)

    with pytest.raises(StaticShapeError, match="non-static shape"):
        check_static_program(program)


class Bf16Round(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).float() * 3.0


def test_bfloat16_rounding_is_emulated_exactly() -> None:
    """Core ML has no bfloat16: the cast becomes Veltkamp rounding in float32, bit-equal to torch's round-to-nearest-
    even cast (exact ties included), and stays float32 under FP16 compute."""
    generator = np.random.default_rng(0)
    bits = generator.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    ties = (bits[:5000] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exactly halfway between two bfloat16s
    values = np.concatenate([bits, ties]).view(np.float32)
    values = values[np.isfinite(values) & (np.abs(values) > 1e-30) & (np.abs(values) < 1e30)]
    x = torch.from_numpy(values.copy()).reshape(1, -1)
    program, _ = coreml_target.trace(Bf16Round(), {"x": x})
    dtypes = {getattr(node.meta.get("val"), "dtype", None) for node in program.graph.nodes}
    assert torch.bfloat16 not in dtypes
    torch.testing.assert_close(program.module()(x), Bf16Round()(x), rtol=0, atol=0)
    fp16 = coreml_target.convert(program, "fp16")._mil_program
    operations = coreml_target.operations(fp16.functions["main"])
    rounding = [op for op in operations if op.name.startswith("tpc_bf16") and op.op_type != "const"]
    assert {op.op_type for op in rounding} >= {"mul", "sub"}
    assert all(coreml_target.dtype_name(out) in ("fp32", "bool") for op in rounding for out in op.outputs)


def test_io_names_are_sanitized_and_collisions_refused() -> None:
    assert coreml_target.coreml_name("past.0.key") == "past_0_key"
    assert coreml_target.coreml_name("0abc") == "_0abc"
    with pytest.raises(ValueError, match="collide"):
        coreml_target.io_names(["a.b", "a_b"])


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_runtime_refuses_off_macos(converted: Any) -> None:
    path = converted("zoo:tiny-clip", "hiprune", "model").path
    with pytest.raises(RuntimeUnavailable) as error:
        CoreMLRuntime.load(path)
    assert "macOS" in str(error.value) and "--allow-skip" in str(error.value)
    assert isinstance(error.value, UsageError)
    with pytest.raises(ValueError, match="teacher forcing"):
        CoreMLRuntime.load(path, forced=("kept_indices",))
    assert CoreMLRuntime.versions()["coremltools"]


class FakeModel:
    """Stands in for coremltools' MLModel (which cannot load off macOS): records the feed, answers by the spec."""

    def __init__(self, spec: Any) -> None:
        self.outputs = {f.name: f.type.multiArrayType for f in spec.description.output}
        self.feed: dict[str, np.ndarray] = {}

    def predict(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feed = feed
        dtypes = {65568: np.float32, 131104: np.int32}
        return {name: np.ones(list(t.shape), dtype=dtypes[t.dataType]) for name, t in self.outputs.items()}


def test_runtime_maps_names_and_dtypes(converted: Any) -> None:
    """What `run` does around Core ML's predict: tpc names <-> sanitized names, int64 <-> int32."""
    import coremltools as ct

    result = converted("zoo:tiny-llava", "hiprune", "decode")
    spec = ct.utils.load_spec(str(result.path))
    model = FakeModel(spec)
    outputs = CoreMLRuntime(model, spec).run(result.inputs)
    assert set(model.feed) == {fact.get("coreml_name", name) for name, fact in result.facts["inputs"].items()}
    assert model.feed["input_ids"].dtype == np.int32 and model.feed["past_0_key"].dtype == np.float32
    assert list(outputs) == list(result.expected)
    assert all(outputs[name].dtype == want.dtype for name, want in result.expected.items())

    clip = converted("zoo:tiny-clip", "hiprune", "model")
    spec = ct.utils.load_spec(str(clip.path))
    outputs = CoreMLRuntime(FakeModel(spec), spec).run(clip.inputs)
    assert outputs["kept_indices"].dtype == np.int64 and outputs["kept_features"].dtype == np.float32


class ArgExtremes(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x.argmax(dim=-1), torch.argmin(x, dim=0, keepdim=True), x.argmax()


MIL_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int32": np.int32, "int16": np.int16, "uint16": np.uint16}


def topk(x: np.ndarray, k: int, axis: int, ascending: bool, ties: str, rng: np.random.Generator) -> tuple:
    """MIL topk with an adversarial tie order: 'reverse' (higher index first) or 'random'."""
    assert axis in (-1, x.ndim - 1)
    tiebreak = np.broadcast_to(-np.arange(x.shape[-1]), x.shape) if ties == "reverse" else rng.random(x.shape)
    key = x.astype(np.float64) if ascending else -x.astype(np.float64)
    order = np.lexsort((tiebreak, key), axis=-1)[..., :k]
    return np.take_along_axis(x, order, axis=-1), order.astype(np.int32)


def evaluate(program: Any, feeds: dict[str, np.ndarray], ties: str = "reverse", seed: int = 0) -> list[np.ndarray]:
    """numpy semantics of the MIL ops tpc's lowerings use, for checking them where Core ML cannot run. topk
    resolves ties adversarially; reduce_argmax refuses to see a tie at all."""
    env = dict(feeds)
    rng = np.random.default_rng(seed)

    def value(var: Any) -> Any:
        return var.val if var.val is not None else env[var.name]

    for op in coreml_target.operations(program.functions["main"]):
        if op.op_type == "const":
            continue
        a = {name: value(var) for name, var in op.inputs.items()}
        kind = op.op_type
        if kind in ("reduce_max", "reduce_min"):
            reduce = np.max if kind == "reduce_max" else np.min
            out = reduce(a["x"], axis=tuple(a["axes"]), keepdims=bool(a["keep_dims"]))
        elif kind in ("equal", "not_equal", "greater", "greater_equal", "add"):
            ufunc = {"equal": np.equal, "not_equal": np.not_equal, "greater": np.greater}.get(kind)
            ufunc = ufunc or {"greater_equal": np.greater_equal, "add": np.add}[kind]
            out = ufunc(a["x"], a["y"])
        elif kind == "select":
            out = np.where(a["cond"], a["a"], a["b"])
        elif kind == "reshape":
            out = a["x"].reshape(a["shape"])
        elif kind == "cast":
            out = a["x"].astype(MIL_DTYPES[str(a["dtype"])])
        elif kind == "slice_by_index":
            out = a["x"][tuple(slice(b, e) for b, e in zip(a["begin"], a["end"], strict=True))]
        elif kind == "gather":
            assert int(a["batch_dims"]) == 1 and int(a["axis"]) == 1
            out = np.stack([a["x"][b][a["indices"][b]] for b in range(a["x"].shape[0])])
        elif kind == "topk":
            values, indices = topk(a["x"], int(a["k"]), int(a["axis"]), bool(a["ascending"]), ties, rng)
            out = (values, indices) if len(op.outputs) == 2 else (values,)
        elif kind == "reduce_argmax":
            x, axis = a["x"], int(a["axis"])
            best = np.max(x, axis=axis, keepdims=True)
            assert ((x == best).sum(axis=axis) == 1).all(), f"{op.name}: a tie reaches reduce_argmax"
            out = np.argmax(x, axis=axis)
            out = np.expand_dims(out, axis) if a["keep_dims"] else out
        else:
            raise AssertionError(f"no numpy semantics for MIL op {kind}")
        for var, result in zip(op.outputs, out if isinstance(out, tuple) else (out,), strict=True):
            env[var.name] = result
    return [env[var.name] for var in program.functions["main"].outputs]


class SelectK(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, scores: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.tpc.select_tokens(scores, tokens, self.k)


@pytest.mark.parametrize(
    ("ties", "precision", "ks"), [("reverse", "fp32", (1, 7, 40)), ("random", "fp32", (20,)), ("reverse", "fp16", (7,))]
)
def test_select_lowering_is_exact_whatever_topk_does_with_ties(ties: str, precision: str, ks: tuple) -> None:
    """Core ML's topk leaves the order of equal values unspecified; the lowering must not depend on it. With
    scores full of exact ties (and +inf, NaN, -inf), a topk that breaks ties the wrong way round still gives
    eager's kept indices and tokens for every K (FP16 compute: the same indices, the tokens rounded to fp16)."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(6, 40)).astype(np.float32)
    scores[1, ::7] = np.inf
    scores[2, ::5] = np.nan  # NaN below every number
    scores[3, ::3] = -np.inf  # -inf without NaN in the row: an ordinary value
    scores[4] = 1.0  # all equal: the lowest indices
    tokens = rng.standard_normal((6, 40, 3)).astype(np.float32)
    for k in ks:
        module = SelectK(k)
        feeds = {"scores": torch.from_numpy(scores), "tokens": torch.from_numpy(tokens)}
        program, _ = coreml_target.trace(module, feeds)
        mil = coreml_target.convert(program, precision)._mil_program
        got_indices, got_tokens = evaluate(mil, {"scores": scores, "tokens": tokens}, ties=ties, seed=k)
        want_indices, want_tokens = module(*feeds.values())
        np.testing.assert_array_equal(got_indices, want_indices.numpy(), err_msg=f"k={k}")
        want = want_tokens.numpy().astype(got_tokens.dtype)
        assert got_tokens.dtype == (np.float16 if precision == "fp16" else np.float32)
        np.testing.assert_array_equal(got_tokens, want, err_msg=f"k={k}")


def test_argmax_takes_the_first_of_equal_extremes() -> None:
    """torch's argmax/argmin pick the first index on ties (DivPrune relies on it); MIL's reduce_argmax does not
    promise which. The lowering leaves reduce_argmax no tie to resolve, and agrees with torch on tie-heavy input."""
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    program, _ = coreml_target.trace(ArgExtremes(), {"x": x})
    mil = coreml_target.convert(program, "fp32")._mil_program
    got = evaluate(mil, {"x": x.numpy()})
    for value, want in zip(got, ArgExtremes()(x), strict=True):
        np.testing.assert_array_equal(np.asarray(value).reshape(want.shape), want.numpy())


class PassThrough(torch.nn.Module):
    def forward(self, x: torch.Tensor, kept_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2.0, kept_indices


def test_output_that_returns_an_input_gets_its_own_value(tmp_path: Path) -> None:
    """A teacher-forced graph returns its `kept_indices` input unchanged: Core ML gets an `identity` and the
    output name `kept_indices_out`, the metadata maps both back to `kept_indices`, and the program stays valid."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    inputs = {"x": torch.randn(2, 3), "kept_indices": torch.arange(4).reshape(1, 4)}
    path = tmp_path / "p.mlpackage"
    facts = CoreMLTarget().export(PassThrough(), inputs, ("y", "kept_indices"), path)
    assert facts["inputs"]["kept_indices"] == {"shape": [1, 4], "dtype": "int32"}
    assert facts["outputs"]["kept_indices"] == {"shape": [1, 4], "dtype": "int32", "coreml_name": "kept_indices_out"}
    spec = ct.utils.load_spec(str(path))
    program = load_milproto(spec, spec.specificationVersion, str(path / "Data" / "com.apple.CoreML" / "weights"))
    assert "identity" in {op.op_type for op in program.functions["main"].operations}
    model = FakeModel(spec)
    outputs = CoreMLRuntime(model, spec).run({"x": np.ones((2, 3), np.float32), "kept_indices": np.zeros((1, 4))})
    assert set(model.feed) == {"x", "kept_indices"} and model.feed["kept_indices"].dtype == np.int32
    assert outputs["kept_indices"].dtype == np.int64 and set(outputs) == {"y", "kept_indices"}


def test_cli_export_of_tiny_llava_then_verify_says_macos_only(tmp_path: Path, capsys) -> None:
    """The issue's command: three packages with static shapes and topk -> gather, a manifest, and a verify that
    says plainly it cannot run Core ML here (exit 2), or accepts that with --allow-skip (exit 0)."""
    from tpc.cli import main

    out = tmp_path / "cm"
    args = ["export", "zoo:tiny-llava", "--method", "hiprune", "--keep", "64", "--target", "coreml"]
    assert main([*args, "--output", str(out), "--compute-units", "cpu_and_ne"]) == 0
    manifest = json.loads((out / "tpc.json").read_text())
    assert [c["artifact"] for c in manifest["components"]] == ["vision.mlpackage", "prefill.mlpackage",
                                                               "decode.mlpackage"]  # fmt: skip
    vision = manifest["components"][0]
    assert vision["graph"]["compute_units"] == "cpu_and_ne" and vision["graph"]["select"]
    assert all("topk" in chain and "gather" in chain for chain in vision["graph"]["select"])
    assert (out / vision["teacher_forced"]).is_dir()
    for component in manifest["components"]:
        shapes = {name: spec["shape"] for name, spec in component["graph"]["inputs"].items()}
        assert shapes == {spec["name"]: spec["shape"] for spec in component["inputs"]}
    if sys.platform == "darwin":
        assert manifest["verification"]["passed"] is True
        return
    assert manifest["verification"] == {"passed": None, "skipped": manifest["verification"]["skipped"]}
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1]  # the step lines of the checks that ran, then the one error line
    assert last.startswith("error: ") and "macOS" in last and "--allow-skip" in last and err.count("error:") == 1
    assert main(["verify", str(out), "--allow-skip"]) == 0
    assert "SKIPPED" in capsys.readouterr().out
    script = (
        "import sys, coremltools as ct\n"
        "m = ct.models.MLModel(sys.argv[1], skip_model_load=True)\n"
        "print(sorted(i.name for i in m.get_spec().description.input))\n"
        "assert not any(n.split('.')[0] == 'tpc' for n in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(out / "vision.mlpackage")], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "['pixel_values']" in result.stdout
