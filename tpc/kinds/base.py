"""What every model kind shares: the request, the built components, the checks each planner runs, and the
protocol a kind implements (`Kind`).

A kind (an encoder, a VLM, a policy) is one module under `tpc.kinds` with one `KIND` object: it plans a request
into a typed plan, builds the eager components, makes seeded samples, writes its manifest section and extra
samples, verifies its loop (a VLM's greedy generation, a policy's episode), describes itself for `tpc inspect` and
names its profile headline. Export, verify, inspect, profile and the CLI iterate over components and call the
kind; nothing else branches on which kind a model is (`tpc.kinds.KINDS` is the registry).
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from tpc.contract.cost import StageCost
from tpc.contract.manifest import Manifest, TensorSpec
from tpc.contract.names import (
    DECODE_STEP,
    EMBED,
    LM_HEAD,
    PREFILL_AFTER,
    PREFILL_BEFORE,
    SELECT,
    SINGLE,
    TAPS,
    TOWER,
    Session,
)
from tpc.contract.report import ShippedCheck, Tolerance, VerifyReport
from tpc.errors import UsageError
from tpc.exporter.base import ExportPart
from tpc.kinds.registry import KINDS, accepts_method, record_of
from tpc.methods import REGISTRY, Method
from tpc.models_zoo import Adapter, ModelSource, PromptLayout
from tpc.models_zoo.base import VisionGeometry
from tpc.models_zoo.llava import DecoderGeometry
from tpc.models_zoo.validate import expected_shapes
from tpc.passes.decoder import DecoderLayout
from tpc.passes.policy_stages import StagePart
from tpc.progress import Step

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


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
    plan: Any  # the kind's plan (EncoderPlan, VlmPlan, VlaPlan): each kind reads its own fields
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


def estimated_bytes(the_plan: KindPlan) -> int:
    """Peak memory of building, exporting and verifying a plan, before any weights are loaded: the weights (counted
    on the meta device) times WEIGHT_COPIES, plus the static KV cache and the vision tower's attention maps."""
    source, request = the_plan.source, the_plan.request
    itemsize = DTYPES[request.dtype].itemsize
    weights = sum(int(np.prod(shape)) for shape in expected_shapes(source.adapter.model_class, source.config).values())
    geometry = source.geometry
    tower = request.batch * geometry.num_heads * geometry.sequence_length**2 * 4 * 3
    return weights * itemsize * WEIGHT_COPIES + tower + the_plan.cache_bytes()


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_memory(the_plan: KindPlan) -> None:
    """Refuse, before allocating anything, an export that would not fit in memory."""
    need, have = estimated_bytes(the_plan), available_memory()
    if need > have:
        raise UsageError(
            f"this export needs about {_size(need)} of memory and {_size(have)} is available; "
            "lower --batch, --max-new-tokens or --prompt-len, or free memory (TPC_MEMORY_LIMIT sets the budget)"
        )


def methods_for(adapter: Adapter) -> list[str]:
    """The methods a model family accepts (its kind says which)."""
    return sorted(name for name, method in REGISTRY.items() if accepts_method(adapter.kind, method))


def check_accepts(adapter: Adapter, method: Method, why: str) -> None:
    """One line when the family's kind does not take the method: `why` says what the family lacks."""
    if not accepts_method(adapter.kind, method):
        raise UsageError(
            f"method '{method.name}' {why.format(family=adapter.family, stage=method.stage)}; "
            f"methods for {adapter.family}: {', '.join(methods_for(adapter))}"
        )


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

    def cache_bytes(self, new_tokens: int = 8) -> int:
        """The static KV cache of the prompt and `new_tokens` decoded ones, with headroom for copies."""
        decoder, batch = self.decoder, self.request.batch
        positions = self.prompt.length + new_tokens
        return 2 * decoder.num_layers * decoder.num_kv_heads * decoder.head_dim * positions * batch * 4 * 4


# --- the cost model (tpc.contract.cost) --------------------------------------------------------------------------


@dataclass(frozen=True)
class CostScale:
    """What scales a stage's cost from one sample's FLOPs: the export's batch, and its dtype's bytes per value."""

    batch: int = 1
    itemsize: int = 4

    @classmethod
    def of(cls, request: PruneRequest) -> CostScale:
        return cls(request.batch, DTYPES[request.dtype].itemsize)

    def cost(self, component: str, stage: str, flops: int, weights: int, values: int, floor: int = 0) -> StageCost:
        """A stage of one sample's `flops` (`floor`: of which no pruning removes) reading `weights` parameters once
        per call and moving `values` activations (or cache entries) per sample."""
        return StageCost(
            component, stage, flops * self.batch, (weights + values * self.batch) * self.itemsize, floor * self.batch
        )


def merged(costs: list[StageCost]) -> list[StageCost]:
    """One entry per (component, stage), summed, in first-seen order (a policy step runs its LM head per token)."""
    totals: dict[tuple[str, str], StageCost] = {}
    for c in costs:
        key = (c.component, c.stage)
        seen = totals.get(key)
        totals[key] = (
            c
            if seen is None
            else StageCost(
                c.component, c.stage, seen.flops + c.flops, seen.bytes + c.bytes, seen.floor_flops + c.floor_flops
            )
        )
    return list(totals.values())


def vit_weights(hidden: int, intermediate: int) -> int:
    """Parameters of one pre-LN ViT layer's projections and MLP (what `VisionGeometry.layer_flops` multiplies)."""
    return 4 * hidden * hidden + 2 * hidden * intermediate


def tower_costs(
    component: str, geometry: VisionGeometry, depth: int, tapped: int, kept: int | None, scale: CostScale
) -> list[StageCost]:
    """A ViT tower run to layer `depth` on every patch (never pruned: its floor is all of it), its `tapped` taps
    (each reads the tapped layer's Q and K rows) and, when it hands on `kept` tokens, the select copying them."""
    seq, d = geometry.sequence_length, geometry.hidden_size
    flops = depth * geometry.layer_flops(seq)
    costs = [
        scale.cost(component, TOWER, flops, depth * vit_weights(d, geometry.intermediate_size), 2 * seq * d, flops)
    ]
    if tapped:
        costs.append(scale.cost(component, TAPS, 0, 0, tapped * 2 * seq * d))
    if kept is not None:
        costs.append(scale.cost(component, SELECT, 0, 0, 2 * kept * d))
    return costs


def schedule_costs(
    component: str, layout: DecoderLayout, decoder: DecoderGeometry, scale: CostScale
) -> list[StageCost]:
    """What a decoder's token schedule adds to its prefill: the taps its prunes read (each the tapped layer's Q and
    K rows) and the selects (each copies the kept tokens' hidden states)."""
    schedule, lengths, d = layout.schedule, layout.kept_lengths, decoder.hidden_size
    q = decoder.num_heads * decoder.head_dim + decoder.num_kv_heads * decoder.head_dim
    costs = []
    if schedule.tapped_layers():
        costs.append(scale.cost(component, TAPS, 0, 0, sum(lengths[layer] * q for layer in schedule.tapped_layers())))
    if schedule.prunes:
        costs.append(scale.cost(component, SELECT, 0, 0, sum(2 * p.keep * d for p in schedule.prunes)))
    return costs


def prune_layer(layout: DecoderLayout) -> int:
    """The decoder layer where the image tokens first change (a vision-side method, or none: before layer 0)."""
    transitions = layout.schedule.transitions
    return transitions[0].layer if transitions else 0


def prefill_costs(component: str, layout: DecoderLayout, decoder: DecoderGeometry, scale: CostScale) -> list[StageCost]:
    """A prefill: the text tokens' embedding, its schedule's taps and selects, the layers before and after the
    prune point, each at its own length (causal: on average half of it as context) writing its K/V cache, and the
    LM head on the last position. The floor: the same layers on the text tokens alone."""
    lengths, text, d = layout.kept_lengths, layout.text_tokens, decoder.hidden_size
    weights, kv = decoder.layer_flops(1, 0) // 2, 2 * decoder.num_kv_heads * decoder.head_dim
    split = prune_layer(layout)
    costs = [scale.cost(component, EMBED, 0, 0, 2 * text * d), *schedule_costs(component, layout, decoder, scale)]
    for stage, layers in ((PREFILL_BEFORE, lengths[:split]), (PREFILL_AFTER, lengths[split:])):
        if layers:
            flops = sum(decoder.layer_flops(n, (n + 1) // 2) for n in layers)
            floor = len(layers) * decoder.layer_flops(text, (text + 1) // 2)
            values = sum(n * kv for n in layers) + (layers[0] + layers[-1]) * d
            costs.append(scale.cost(component, stage, flops, len(layers) * weights, values, floor))
    head = decoder.head_flops(1)
    costs.append(scale.cost(component, LM_HEAD, head, head // 2, d + decoder.vocab_size, head))
    return costs


def decode_costs(
    component: str, layout: DecoderLayout, decoder: DecoderGeometry, steps: int, scale: CostScale, static: bool
) -> list[StageCost]:
    """`steps` decode steps after the prefill, step s attending to each layer's prompt + s keys, each step's LM
    head; a `static` cache (a VLM's decode graph) is read in full, a growing one (a policy's unrolled steps) up to
    the step. The floor: the same steps over the text tokens' cache alone."""
    lengths, text, d = layout.kept_lengths, layout.text_tokens, decoder.hidden_size
    weights, kv = decoder.layer_flops(1, 0) // 2, 2 * decoder.num_kv_heads * decoder.head_dim
    head = decoder.head_flops(1)
    costs = []
    for step in range(1, steps + 1):
        read = layout.capacities if static else tuple(n + step - 1 for n in lengths)
        flops = sum(decoder.layer_flops(1, n + step) for n in lengths)
        floor = len(lengths) * decoder.layer_flops(1, text + step)
        costs += [
            scale.cost(component, EMBED, 0, 0, 2 * d),
            scale.cost(component, DECODE_STEP, flops, len(lengths) * weights, sum(read) * kv + len(read) * kv, floor),
            scale.cost(component, LM_HEAD, head, head // 2, d + decoder.vocab_size, head),
        ]
    return merged(costs)


def seeded_pixels(source: ModelSource, request: PruneRequest, seed: int) -> Tensor:
    """Standard-normal pixels (as after CLIP normalisation) of the export's static shape."""
    geometry = source.geometry
    shape = (request.batch, geometry.channels, geometry.image_size, geometry.image_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DTYPES[request.dtype])


class KindPlan(Protocol):
    """What every kind's plan has (EncoderPlan, VlmPlan, VlaPlan add their own layout)."""

    @property
    def request(self) -> PruneRequest: ...

    @property
    def source(self) -> ModelSource: ...

    @property
    def method(self) -> Method: ...

    @property
    def keep(self) -> int: ...

    @property
    def params(self) -> dict[str, Any]: ...

    @property
    def kept_widths(self) -> tuple[int, ...]: ...

    def cache_bytes(self) -> int: ...


PlanT = TypeVar("PlanT", bound=KindPlan)

# Sessions by component: the exported graph, and its teacher-forced twin when the component selects tokens
Sessions = dict[str, tuple[Session, Session | None]]


class Kind(ABC, Generic[PlanT]):
    """One kind of model: everything the flows ask of it (see the module docstring). The hooks a kind without a
    loop or stages does not need (an encoder's samples, a VLM's stages) default to nothing."""

    @abstractmethod
    def plan(self, request: PruneRequest, source: ModelSource) -> PlanT:
        """Validate a request into the kind's typed plan, before any weights load (one UsageError line each)."""

    @abstractmethod
    def build(self, plan: PlanT) -> Pruned:
        """Load the weights and build the eager components with their seeded samples."""

    @abstractmethod
    def tokens_before(self, plan: PlanT) -> int:
        """The visual tokens a method chooses among (tpc.json's `tokens.before`)."""

    @abstractmethod
    def entry_specs(self, manifest: Manifest) -> dict[str, TensorSpec]:
        """What a user's `verify --inputs` file holds."""

    @abstractmethod
    def entry_samples(self, pruned: Pruned, entry: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """Each component's inputs for a user's entry inputs."""

    @abstractmethod
    def describe(self, request: PruneRequest, source: ModelSource) -> dict[str, Any]:
        """`tpc inspect`'s plan as plain data."""

    @abstractmethod
    def render(self, plan: dict[str, Any]) -> list[str]:
        """That plan as the lines `tpc inspect` prints."""

    @abstractmethod
    def stage_costs(self, plan: PlanT) -> list[StageCost]:
        """FLOPs and bytes of one call of each component, per stage (tpc.json's `cost`, recorded at export for
        `tpc profile`, which may run without torch); the FLOPs sum to what `describe` reports."""

    def manifest_sections(self, plan: PlanT) -> dict[str, Any]:
        """The kind's own tpc.json sections by name (`generation` for a VLM, `policy` for a policy)."""
        return {}

    def write_samples(self, directory: Path, pruned: Pruned) -> None:
        """Samples beyond each component's inputs/expected: a VLM's generation, a policy's episode."""
        return None

    def sample_files(self, manifest: Manifest) -> list[str]:
        """Those samples' paths, relative to the export directory."""
        return []

    def check_samples(
        self, pruned: Pruned, manifest: Manifest, samples: dict[str, dict[str, np.ndarray]], tolerance: Tolerance
    ) -> list[ShippedCheck]:
        """Those samples are what eager PyTorch produces on their stored inputs."""
        return []

    def request_options(self, manifest: Manifest) -> dict[str, Any]:
        """The request fields the manifest records for this kind (prompt_len, max_new_tokens)."""
        return {}

    def verify_runs(
        self,
        pruned: Pruned,
        manifest: Manifest,
        sessions: Sessions,
        seeds: list[int],
        tolerance: Tolerance,
        report: VerifyReport,
        step: Step,
    ) -> None:
        """The kind's end-to-end check on the exported sessions (generation, episode replay); for a kind without
        a loop, the per-sample comparison of each component is the whole check."""
        return None

    def stages(self, parts: dict[str, ExportPart]) -> dict[str, dict[str, StagePart]]:
        """Components a target that lowers per stage (ExecuTorch) writes as several programs, by stage."""
        return {}

    def forced_first_stage(self, part: ExportPart, kept_indices: Tensor) -> StagePart:
        """A staged component's selecting stage, teacher-forced with `kept_indices`."""
        raise ValueError("this kind has no staged components")

    def record_stages(self, manifest: Manifest) -> None:
        """Say in the kind's manifest section how the staged programs make one component."""
        return None


def kind_named(name: str) -> Kind[Any]:
    """The kind registered as `name` (`tpc.kinds.KINDS`), its module imported on first use."""
    kind: Kind[Any] = importlib.import_module(KINDS[name].module).KIND
    return kind


def kind_of(manifest: Manifest) -> Kind[Any]:
    """The kind of an export: the one whose manifest section it has."""
    return kind_named(record_of(manifest).name)
