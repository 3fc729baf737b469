"""From a request (model, method, keep, params) to a pruned eager module: the step every command shares.

`export`, `verify`, `inspect` and the Python API all build through `build`, so the module that is exported is
the module that verification compares against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tpc.errors import UsageError
from tpc.methods import REGISTRY, VisionMethod, get_method
from tpc.models_zoo import ModelSource, resolve
from tpc.passes.prune_vision import INPUT_NAMES, OUTPUT_NAMES, PrunedVisionEncoder

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


@dataclass
class Pruned:
    """A built request: the eager module, what it was built from, and its I/O signature."""

    request: PruneRequest
    source: ModelSource
    method: VisionMethod
    keep: int
    params: dict[str, Any]
    module: nn.Module
    input_names: tuple[str, ...] = INPUT_NAMES
    output_names: tuple[str, ...] = OUTPUT_NAMES

    def example_inputs(self, seed: int = 0) -> dict[str, Tensor]:
        """Seeded inputs of the export's static shapes (standard-normal pixels, as after CLIP normalisation)."""
        geometry = self.source.geometry
        shape = (self.request.batch, geometry.channels, geometry.image_size, geometry.image_size)
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(shape, generator=generator).to(DTYPES[self.request.dtype])
        return {"pixel_values": pixels}


def _check_layer(name: str, value: int, depth: int) -> None:
    if not 1 <= value <= depth:
        raise UsageError(f"--param {name}={value} is outside the encoder's layers 1..{depth}")


def _vision_method(name: str, family: str) -> VisionMethod:
    method = get_method(name)
    if not isinstance(method, VisionMethod):
        usable = sorted(n for n, m in REGISTRY.items() if isinstance(m, VisionMethod))
        raise UsageError(
            f"method '{name}' prunes at the {method.stage} stage, which {family} vision encoders do not have; "
            f"methods for {family}: {', '.join(usable)}"
        )
    return method


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


@dataclass(frozen=True)
class Plan:
    """A validated request, before any weights are loaded: what `inspect` shows and `build` builds."""

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
    def tapped_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.method.tapped_layers(self.method_params))))

    @property
    def depth(self) -> int:
        """Encoder layers the pruned graph runs."""
        return max((self.feature_layer, *self.tapped_layers))


def plan(request: PruneRequest, source: ModelSource | None = None) -> Plan:
    """Resolve and validate every part of the request; one clear UsageError for the first bad part.

    `source`: the request's model, if the caller resolved it already.
    """
    if request.dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{request.dtype}'; valid: {', '.join(DTYPES)}")
    if request.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {request.batch}")
    source = source or resolve(request.model)
    method = _vision_method(request.method, source.adapter.family)
    geometry = source.geometry
    method_params, feature_layer = split_params(request.params)
    # LLaVA's default: the penultimate layer's output (vision_feature_layer = -2)
    feature_layer = feature_layer if feature_layer is not None else max(1, geometry.num_layers - 1)
    _check_layer("feature_layer", feature_layer, geometry.num_layers)
    params = method.resolve_params(method_params, method.model_defaults(geometry.num_layers, feature_layer))
    for param in method.params:
        if param.is_layer:
            _check_layer(param.name, params[param.name], geometry.num_layers)
    keep = _resolve_keep(request.keep, method, geometry.num_patches)
    try:
        method.check_budget(keep, params)
    except ValueError as error:
        raise UsageError(f"--keep {keep} with method {method.name}: {error}") from None
    return Plan(request, source, method, keep, feature_layer, params)


def build(request: PruneRequest) -> Pruned:
    """Plan, load the model through `from_pretrained`, insert taps and the prune point."""
    the_plan = plan(request)
    source = the_plan.source
    model = source.adapter.load(source.path).to(DTYPES[request.dtype])
    module = PrunedVisionEncoder(model, the_plan).eval()
    return Pruned(request, source, the_plan.method, the_plan.keep, the_plan.params, module)


def _resolve_keep(keep: int | None, method: VisionMethod, num_tokens: int) -> int:
    if not method.prunes:
        return num_tokens
    if keep is None:
        raise UsageError(f"--keep is required for method '{method.name}' (1..{num_tokens} tokens)")
    if not 1 <= keep <= num_tokens:
        raise UsageError(
            f"--keep {keep} is out of range: the encoder has {num_tokens} patch tokens (use 1..{num_tokens})"
        )
    return keep
