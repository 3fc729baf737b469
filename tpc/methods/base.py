"""What a pruning method declares, so that the pipeline, the CLI and the docs can treat methods as data.

A method is a small frozen record: its hyperparameters (typed, with defaults and a validated domain), which
layers it needs attention-received scores from, and a pure function from those signals to (B, N) priorities.
The shared select op (`tpc.ops.select_tokens`) turns priorities into the K kept tokens, so a method never
touches shapes.

This module imports neither torch nor transformers: the records are listed (`tpc methods`) and validated
(planning) without them. A record names its torch priority function with `Deferred`, imported on first call.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec

from tpc.errors import UsageError, unknown_name
from tpc.methods.schedule import PrefillSignals, PromptImages, TokenSchedule, Transition

if TYPE_CHECKING:
    from torch import Tensor

P = ParamSpec("P")


def accepts_unbatched(batched_dims: int, tensor_args: int = 1) -> Callable[[Callable[P, Tensor]], Callable[P, Tensor]]:
    """Let a functional API, specified on batched tensors, also take one image's tensors (or numpy arrays).

    The first `tensor_args` positional arguments are converted with `torch.as_tensor`; if the first one lacks
    its batch dimension, all of them get one, and the result is returned without it again.
    """

    def decorate(function: Callable[P, Tensor]) -> Callable[P, Tensor]:
        call: Callable[..., Tensor] = function  # called with the converted tensors in place of the first arguments

        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Tensor:
            import torch

            tensors = [torch.as_tensor(a) for a in args[:tensor_args]]
            unbatched = tensors[0].dim() == batched_dims - 1
            if not unbatched and tensors[0].dim() != batched_dims:
                raise ValueError(
                    f"expected a {batched_dims}-d batched (or {batched_dims - 1}-d) input, "
                    f"got {tuple(tensors[0].shape)}"
                )
            if unbatched:
                tensors = [t.unsqueeze(0) for t in tensors]
            result = call(*tensors, *args[tensor_args:], **kwargs)
            return result[0] if unbatched else result

        return wrapper

    return decorate


@dataclass(frozen=True)
class Deferred:
    """A function named as "module:attribute", imported on its first call, so that a method's record (and
    listing it) does not import torch. `resolve()` returns the function itself."""

    target: str

    def resolve(self) -> Callable[..., Any]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


def _number(value: float) -> str:
    return "inf" if value == math.inf else f"{value:g}"


@dataclass(frozen=True)
class Param:
    """One hyperparameter: name, type, default (None = derived from the model), a one-line meaning, its domain.

    Domain: `choices` for a string; `low`/`high` bounds for a number (inclusive unless `low_open`/`high_open`),
    a float must also be finite; `layer_of` for a layer number, checked against that stack's depth once the
    model is known. `parse` checks every value a user gives (CLI `--param`, `tpc.export(params=...)`), so
    every entry point rejects the same value with the same line, and NaN/inf never reach `tpc.json`.
    """

    name: str
    type: type
    default: Any
    help: str
    layer_of: str | None = None  # "encoder" / "decoder": a layer number, validated against that stack's depth
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ...: low itself is outside the domain
    high_open: bool = False

    def __post_init__(self) -> None:
        if self.default is not None and self.violation(self.default) is not None:
            raise ValueError(f"default {self.default!r} of parameter {self.name} is outside its domain {self.domain}")

    @property
    def domain(self) -> str:
        """The valid values, as `tpc methods` and the error lines show them: "(0, 1]", ">= 0", "a|b", ..."""
        if self.choices is not None:
            return "|".join(self.choices)
        if self.layer_of is not None:
            return f"{self.layer_of} layer"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{left}{_number(self.low)}, {_number(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return "finite" if self.type is float else self.type.__name__

    def violation(self, value: Any) -> str | None:
        """Why a parsed value is outside the domain (None: inside). Layer numbers are checked by the planner."""
        if self.choices is not None:
            return None if value in self.choices else f"expected one of {', '.join(self.choices)}"
        if self.type not in (int, float):
            return None
        bounded = self.low is not None or self.high is not None
        where = f" {'in ' if self.low is not None and self.high is not None else ''}{self.domain}" if bounded else ""
        if not math.isfinite(value):
            return f"expected a finite number{where}"
        below = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        above = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        return f"expected a value{where}" if below or above else None

    def parse(self, text: object) -> Any:
        """A user's value (a string from the CLI; the Python API's values are passed as `str(value)`) -> typed,
        inside the domain, or one UsageError line naming the parameter, the value, the domain and the meaning."""
        text = str(text).strip()
        if self.choices is not None and text not in self.choices:
            raise UsageError(f"--param {self.name}={text}: expected one of {', '.join(self.choices)} ({self.help})")
        try:
            if self.type is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                value = text.lower() in ("1", "true", "yes")
            else:
                value = self.type(text)
        except ValueError:
            raise UsageError(f"--param {self.name}={text}: expected {self.type.__name__} ({self.help})") from None
        problem = self.violation(value)
        if problem is not None:
            raise UsageError(f"--param {self.name}={text}: {problem} ({self.help})")
        return value


@dataclass(frozen=True)
class VisionSignals:
    """What a vision-side method may read. `received[l]`: (B, N) attention received per patch at 1-based layer l."""

    received: Mapping[int, Tensor]
    features: Tensor  # (B, N, D) patch features at the feature layer; a VLM: their LLM input embeddings (projected)
    grid: tuple[int, int]


class _ResolvesParams:
    name: str
    params: tuple[Param, ...]

    def resolve_params(self, given: Mapping[str, str], derived: Mapping[str, Any]) -> dict[str, Any]:
        """User strings parsed by type, over model-derived defaults, over the method's own defaults."""
        known = {p.name: p for p in self.params}
        unknown = set(given) - set(known)
        if unknown:
            raise unknown_name(f"parameter for method {self.name}", sorted(unknown)[0], known or ["(none)"])
        values = {p.name: p.default for p in self.params}
        values.update({k: v for k, v in derived.items() if k in known})
        values.update({k: known[k].parse(v) for k, v in given.items()})
        return values


@dataclass(frozen=True)
class VisionMethod(_ResolvesParams):
    """A method that prunes on the vision side: encoder signals -> priorities -> keep K patch tokens."""

    name: str
    summary: str
    reference: str
    priority: Callable[[VisionSignals, int, dict[str, Any]], Tensor]
    params: tuple[Param, ...] = ()
    tapped_layers: Callable[[dict[str, Any]], tuple[int, ...]] = field(default=lambda params: ())
    # defaults that depend on the model: (encoder depth, 1-based feature layer, and for a VLM its config's
    # `vision_feature_layer`, the hidden_states index (int or list) the layer came from) -> {param: value}
    model_defaults: Callable[..., dict[str, Any]] = field(default=lambda depth, feature_layer, feature_index=None: {})
    # raises ValueError when a budget and parameters cannot work together
    check_budget: Callable[[int, dict[str, Any]], None] = field(default=lambda keep, params: None)
    stage: str = "vision"
    prunes: bool = True
    stateful: bool = False  # a vision-side method never carries state between calls
    shots: tuple[int, int] = (0, 0)  # in-context example images of a VLM prompt: (fewest, default)


@dataclass(frozen=True)
class PrefillMethod(_ResolvesParams):
    """A method that prunes inside the decoder: its token schedule says at which layers, and how many tokens stay.

    Kept tokens keep their original position ids, and each layer's KV cache holds only the tokens it saw.
    """

    name: str
    summary: str
    reference: str
    priority: Callable[[PrefillSignals, int, dict[str, Any]], Tensor]
    # (params, keep, where the image runs sit in the prompt the decoder receives) -> the schedule's transitions
    transitions: Callable[[dict[str, Any], int, PromptImages], tuple[Transition, ...]]
    params: tuple[Param, ...] = ()
    # defaults that depend on the model: decoder depth -> {param: value}
    model_defaults: Callable[[int], dict[str, Any]] = field(default=lambda depth: {})
    # raises ValueError when a budget and parameters cannot work together
    check_budget: Callable[[int, dict[str, Any]], None] = field(default=lambda keep, params: None)
    stage: str = "llm-prefill"
    prunes: bool = True
    # carries state between control steps (a guide from earlier steps' attention): policies only
    stateful: bool = False
    shots: tuple[int, int] = (0, 0)  # in-context example images of a VLM prompt: (fewest, default)
    # params -> the name of a vision-graph output the prefill takes as its guide (LVLM_CSP's CLS attention), or None
    vision_guide: Callable[[dict[str, Any]], str | None] = field(default=lambda params: None)

    def schedule(self, params: dict[str, Any], keep: int, prompt: PromptImages) -> TokenSchedule:
        per_image = prompt.tokens if len(prompt.tokens) > 1 else ()
        return TokenSchedule(prompt.image_tokens, self.transitions(params, keep, prompt), per_image)


Method = VisionMethod | PrefillMethod
