"""From a request (model, method, keep, params) to pruned eager components: the step every command shares.

`export`, `verify`, `inspect` and the Python API all build through `build`, so the modules that are exported
are the modules that verification compares against. A vision encoder is one component (`model`); a VLM is
three (`vision`, `prefill`, `decode`, see `tpc.vlm`). Planning dispatches on the model family's kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tpc.errors import UsageError
from tpc.methods import REGISTRY, Method, VisionMethod, get_method
from tpc.models_zoo import Adapter, DecoderGeometry, ModelSource, PromptLayout, resolve
from tpc.passes.prune_vision import INPUT_NAMES, OUTPUT_NAMES, PrunedVisionEncoder, VisionCut

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
SINGLE = "model"  # the component name of a one-graph export


@dataclass(frozen=True)
class PruneRequest:
    """Everything that determines a pruned graph (and so its static shapes)."""

    model: str
    method: str
    keep: int | None
    params: Mapping[str, str] = field(default_factory=dict)
    dtype: str = "fp32"
    batch: int = 1
    prompt_len: int | None = None  # VLMs: text tokens of the static prompt (default: the chat template's)
    max_new_tokens: int | None = None  # VLMs: generated tokens the static KV cache has room for


@dataclass
class Component:
    """One exported graph: its eager module and its I/O names (`forced_indices` teacher-forces `kept_indices`)."""

    name: str
    module: nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


@dataclass
class Pruned:
    """A built request: its plan, the eager components, and how to make seeded inputs for each of them."""

    request: PruneRequest
    plan: Any  # Plan | tpc.vlm.VlmPlan
    components: dict[str, Component]
    # seed -> {component: {input name: tensor}}; a VLM's later components take earlier ones' eager outputs
    make_samples: Callable[[int], dict[str, dict[str, Tensor]]]

    @property
    def source(self) -> ModelSource:
        return self.plan.source

    @property
    def method(self) -> Method:
        return self.plan.method

    @property
    def keep(self) -> int:
        return self.plan.keep

    @property
    def params(self) -> dict[str, Any]:
        return self.plan.params

    @property
    def module(self) -> nn.Module:
        """The eager module (a VLM's components as a ModuleDict)."""
        if SINGLE in self.components:
            return self.components[SINGLE].module
        return nn.ModuleDict({name: c.module for name, c in self.components.items()})

    def samples(self, seed: int = 0) -> dict[str, dict[str, Tensor]]:
        return self.make_samples(seed)


def eager_outputs(component: Component, inputs: dict[str, np.ndarray], forced: np.ndarray | None = None) -> dict:
    """One component run eagerly on numpy inputs by name (`forced`: teacher-forced kept indices)."""
    with torch.no_grad():
        tensors = [torch.from_numpy(inputs[name]) for name in component.input_names]
        extra = {"forced_indices": torch.from_numpy(forced)} if forced is not None else {}
        outputs = component.module(*tensors, **extra)
    return {name: out.numpy() for name, out in zip(component.output_names, outputs, strict=True)}


def as_arrays(samples: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, np.ndarray]]:
    """Per-component tensors -> numpy arrays (what runtimes and sample files take)."""
    return {name: {k: t.numpy() for k, t in inputs.items()} for name, inputs in samples.items()}


def check_layer(name: str, value: int, depth: int) -> None:
    if not 1 <= value <= depth:
        raise UsageError(f"--param {name}={value} is outside the encoder's layers 1..{depth}")


def check_method_layers(method: Method, params: dict[str, Any], depths: Mapping[str, tuple[int, int]]) -> None:
    """Each layer parameter within its stack: depths[stack] = (lowest, highest) valid value."""
    for param in method.params:
        if param.layer_of is not None:
            low, high = depths[param.layer_of]
            if not low <= params[param.name] <= high:
                raise UsageError(
                    f"--param {param.name}={params[param.name]} is outside the {param.layer_of}'s layers {low}..{high}"
                )


MAX_BATCH = 64  # a documented cap: static-batch exports beyond it are better served by several sessions


def check_common(request: PruneRequest) -> None:
    if request.dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{request.dtype}'; valid: {', '.join(DTYPES)}")
    if not 1 <= request.batch <= MAX_BATCH:
        raise UsageError(f"--batch {request.batch} is outside 1..{MAX_BATCH} (the static batch tpc exports)")


def check_positions(used: int, limit: int, what: str, fix: str) -> None:
    """A static prompt and its generated tokens must fit the decoder's position embeddings."""
    if limit and used > limit:
        raise UsageError(
            f"{what} need {used} positions, more than the decoder's {limit} (max_position_embeddings); {fix}"
        )


def parse_bytes(text: str) -> int:
    """'8G', '512M', '1.5GiB', '1000000' -> bytes."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in units and cleaned[-1:] else (cleaned, "")
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise UsageError(f"TPC_MEMORY_LIMIT={text!r}: expected a size such as 8G or 512M") from None
    if not value > 0:
        raise UsageError(f"TPC_MEMORY_LIMIT={text!r}: expected a positive size")
    return int(value)


def available_memory() -> int:
    """Bytes tpc may use: `TPC_MEMORY_LIMIT` if set, else what the machine has available right now."""
    import os

    if os.environ.get("TPC_MEMORY_LIMIT"):
        return parse_bytes(os.environ["TPC_MEMORY_LIMIT"])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# Exporting holds the eager model, torch.export's traced copy, the serialized graph and a runtime session: about 4
# copies of the weights at the peak.
WEIGHT_COPIES = 4


def estimated_bytes(the_plan: Any) -> int:
    """Peak memory of building, exporting and verifying a plan, before any weights are loaded: the weights (counted
    on the meta device) times WEIGHT_COPIES, plus the static KV cache and the vision tower's attention maps."""
    from tpc.models_zoo.validate import expected_shapes

    source, request = the_plan.source, the_plan.request
    itemsize = DTYPES[request.dtype].itemsize
    weights = sum(int(np.prod(shape)) for shape in expected_shapes(source.adapter.model_class, source.config).values())
    geometry = source.geometry
    tower = request.batch * geometry.num_heads * geometry.sequence_length**2 * 4 * 3
    cache = 0
    if hasattr(the_plan, "decoder"):
        decoder = the_plan.decoder
        positions = the_plan.prompt.length + getattr(the_plan, "max_new_tokens", 8)
        cache = 2 * decoder.num_layers * decoder.num_kv_heads * decoder.head_dim * positions * request.batch * 4 * 4
    return weights * itemsize * WEIGHT_COPIES + tower + cache


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_memory(the_plan: Any) -> None:
    """Refuse, before allocating anything, an export that would not fit in memory."""
    need, have = estimated_bytes(the_plan), available_memory()
    if need > have:
        raise UsageError(
            f"this export needs about {_size(need)} of memory and {_size(have)} is available; "
            "lower --batch, --max-new-tokens or --prompt-len, or free memory (TPC_MEMORY_LIMIT sets the budget)"
        )


def methods_for(adapter: Adapter) -> list[str]:
    """The methods a model family accepts (each adapter says which)."""
    return sorted(name for name, method in REGISTRY.items() if adapter.accepts(method))


def split_params(given: Mapping[str, str]) -> tuple[dict[str, str], int | None]:
    """Separate the model-level `feature_layer` from the method's parameters."""
    rest = dict(given)
    feature_layer = rest.pop("feature_layer", None)
    if feature_layer is None:
        return rest, None
    try:
        return rest, int(feature_layer)
    except ValueError:
        raise UsageError(f"--param feature_layer={feature_layer}: expected an integer layer (1-based)") from None


def resolve_keep(
    keep: int | None, method: Method, num_tokens: int, lowest: int = 1, what: str = "the encoder has {n} patch tokens"
) -> int:
    if not method.prunes:
        return num_tokens
    if keep is None:
        raise UsageError(f"--keep is required for method '{method.name}' ({lowest}..{num_tokens} tokens)")
    if not lowest <= keep <= num_tokens:
        raise UsageError(f"--keep {keep} is out of range: {what.format(n=num_tokens)} (use {lowest}..{num_tokens})")
    return keep


def check_budget(method: Method, keep: int, params: dict[str, Any]) -> None:
    try:
        method.check_budget(keep, params)
    except ValueError as error:
        raise UsageError(f"--keep {keep} with method {method.name}: {error}") from None


@dataclass(frozen=True)
class DecoderPlan:
    """What a VLM plan and a policy plan share: a validated request on a decoder with a static prompt."""

    request: PruneRequest
    source: ModelSource
    method: Any  # VisionMethod | PrefillMethod for a VLM; PrefillMethod or `none` for a policy
    keep: int  # image tokens the decoder keeps (a policy: from the prune layer on, in pruned steps)
    method_params: dict[str, Any]
    prompt: PromptLayout

    @property
    def adapter(self) -> Any:  # the family's adapter (LlavaAdapter, OpenVlaAdapter)
        return self.source.adapter

    @property
    def decoder(self) -> DecoderGeometry:
        return self.adapter.decoder(self.source.config)


@dataclass(frozen=True)
class Plan:
    """A validated encoder request, before any weights are loaded: what `inspect` shows and `build` builds."""

    request: PruneRequest
    source: ModelSource
    method: VisionMethod
    keep: int
    feature_layer: int
    method_params: dict[str, Any]

    @property
    def params(self) -> dict[str, Any]:
        return {"feature_layer": self.feature_layer, **self.method_params}

    @property
    def cut(self) -> VisionCut:
        source = self.source
        return VisionCut(
            source.adapter, source.geometry, self.method, self.keep, self.method_params, (self.feature_layer,)
        )

    @property
    def tapped_layers(self) -> tuple[int, ...]:
        return self.cut.tapped_layers

    @property
    def depth(self) -> int:
        """Encoder layers the pruned graph runs."""
        return self.cut.depth


# the kinds with a decoder, by the module that plans and builds them (`plan(request, source)`, `build(plan)`);
# a registry by name, imported when used: those modules build on this one
DECODER_KINDS = {"vlm": "tpc.vlm", "vla": "tpc.vla"}


def _decoder_kind(kind: str) -> Any:
    return importlib.import_module(DECODER_KINDS[kind])


def plan(request: PruneRequest, source: ModelSource | None = None) -> Any:
    """Resolve and validate every part of the request; one clear UsageError for the first bad part.

    `source`: the request's model, if the caller resolved it already. Returns a Plan or a tpc.vlm.VlmPlan.
    """
    check_common(request)
    source = source or resolve(request.model)
    if source.adapter.kind in DECODER_KINDS:
        return _decoder_kind(source.adapter.kind).plan(request, source)
    return _plan_encoder(request, source)


def _plan_encoder(request: PruneRequest, source: ModelSource) -> Plan:
    if request.prompt_len is not None or request.max_new_tokens is not None:
        raise UsageError("--prompt-len and --max-new-tokens apply to VLM models; vision encoders take no prompt")
    method = get_method(request.method)
    if not source.adapter.accepts(method):
        raise UsageError(
            f"method '{method.name}' prunes at the {method.stage} stage, which {source.adapter.family} vision "
            f"encoders do not have; methods for {source.adapter.family}: {', '.join(methods_for(source.adapter))}"
        )
    geometry = source.geometry
    method_params, feature_layer = split_params(request.params)
    # LLaVA's default: the penultimate layer's output (vision_feature_layer = -2)
    feature_layer = feature_layer if feature_layer is not None else max(1, geometry.num_layers - 1)
    check_layer("feature_layer", feature_layer, geometry.num_layers)
    params = method.resolve_params(method_params, method.model_defaults(geometry.num_layers, feature_layer))
    check_method_layers(method, params, {"encoder": (1, geometry.num_layers)})
    keep = resolve_keep(request.keep, method, geometry.num_patches)
    check_budget(method, keep, params)
    return Plan(request, source, method, keep, feature_layer, params)


def build(request: PruneRequest) -> Pruned:
    """Plan, load the model through `from_pretrained`, insert taps and prune points."""
    the_plan = plan(request)
    check_memory(the_plan)
    if not isinstance(the_plan, Plan):
        return _decoder_kind(the_plan.source.adapter.kind).build(the_plan)
    source = the_plan.source
    model = source.adapter.load(source.path).to(DTYPES[request.dtype])
    module = PrunedVisionEncoder(model, the_plan.cut).eval()
    component = Component(SINGLE, module, INPUT_NAMES, OUTPUT_NAMES)

    def samples(seed: int) -> dict[str, dict[str, Tensor]]:
        return {SINGLE: {"pixel_values": seeded_pixels(source, request, seed)}}

    return Pruned(request, the_plan, {SINGLE: component}, samples)


def seeded_pixels(source: ModelSource, request: PruneRequest, seed: int) -> Tensor:
    """Standard-normal pixels (as after CLIP normalisation) of the export's static shape."""
    geometry = source.geometry
    shape = (request.batch, geometry.channels, geometry.image_size, geometry.image_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DTYPES[request.dtype])
