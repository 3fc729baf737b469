"""What a pruning method declares, so that the pipeline, the CLI and the docs can treat methods as data.

A method is a small frozen record: its hyperparameters (typed, with defaults), which encoder layers it needs
attention-received scores from, and a pure function from those signals to (B, N) priorities. The shared
select op (`tpc.ops.select_tokens`) turns priorities into the K kept tokens, so a method never touches shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from tpc.errors import UsageError, unknown_name

F = TypeVar("F", bound=Callable[..., Tensor])


def accepts_unbatched(batched_dims: int, tensor_args: int = 1) -> Callable[[F], F]:
    """Let a functional API, specified on batched tensors, also take one image's tensors (or numpy arrays).

    The first `tensor_args` positional arguments are converted with `torch.as_tensor`; if the first one lacks
    its batch dimension, all of them get one, and the result is returned without it again.
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Tensor:
            tensors = [torch.as_tensor(a) for a in args[:tensor_args]]
            unbatched = tensors[0].dim() == batched_dims - 1
            if not unbatched and tensors[0].dim() != batched_dims:
                raise ValueError(
                    f"expected a {batched_dims}-d batched (or {batched_dims - 1}-d) input, "
                    f"got {tuple(tensors[0].shape)}"
                )
            if unbatched:
                tensors = [t.unsqueeze(0) for t in tensors]
            result = function(*tensors, *args[tensor_args:], **kwargs)
            return result[0] if unbatched else result

        return wrapper  # type: ignore[return-value]

    return decorate


@dataclass(frozen=True)
class Param:
    """One hyperparameter: name, type, default (None = derived from the model), and a one-line meaning."""

    name: str
    type: type
    default: Any
    help: str
    layer_of: str | None = None  # "encoder" / "decoder": a layer number, validated against that stack's depth
    choices: tuple[str, ...] | None = None

    def parse(self, text: str) -> Any:
        if self.choices is not None and text not in self.choices:
            raise UsageError(f"--param {self.name}={text}: expected one of {', '.join(self.choices)} ({self.help})")
        try:
            if self.type is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                return text.lower() in ("1", "true", "yes")
            return self.type(text)
        except ValueError:
            raise UsageError(f"--param {self.name}={text}: expected {self.type.__name__} ({self.help})") from None


@dataclass(frozen=True)
class VisionSignals:
    """What a vision-side method may read. `received[l]`: (B, N) attention received per patch at 1-based layer l."""

    received: Mapping[int, Tensor]
    features: Tensor  # (B, N, D) patch features at the encoder's feature layer
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
    priority: Callable[[VisionSignals, int, dict], Tensor]
    params: tuple[Param, ...] = ()
    tapped_layers: Callable[[dict], tuple[int, ...]] = field(default=lambda params: ())
    # defaults that depend on the model: (encoder depth, feature layer) -> {param: value}
    model_defaults: Callable[[int, int], dict[str, Any]] = field(default=lambda depth, feature_layer: {})
    # raises ValueError when a budget and parameters cannot work together
    check_budget: Callable[[int, dict], None] = field(default=lambda keep, params: None)
    stage: str = "vision"
    prunes: bool = True


@dataclass(frozen=True)
class PrefillSignals:
    """What an LLM-prefill method may read at its prune layer K (0-based decoder layer index)."""

    scores: Tensor  # (B, N_img) attention to each image token at layer K-1, head mean, as the method's tap reduces it
    image_embeds: Tensor  # (B, N_img, D) the LLM input embeddings of the image tokens (layer 0's input)
    guide: Tensor | None = None  # (B, N_img) a stateful method's guide from earlier control steps


LAST_ROW, ALL_ROWS = "last-row", "all-rows"  # the attention reductions a prefill method's score tap computes


@dataclass(frozen=True)
class PrefillMethod(_ResolvesParams):
    """A method that prunes inside the decoder's prefill: layers 0..K-1 see every token, layers K.. the kept ones.

    Kept tokens keep their original position ids, and the KV cache of layers K.. holds only them.
    """

    name: str
    summary: str
    reference: str
    priority: Callable[[PrefillSignals, int, dict], Tensor]
    prune_layer: Callable[[dict], int]  # K
    params: tuple[Param, ...] = ()
    # defaults that depend on the model: decoder depth -> {param: value}
    model_defaults: Callable[[int], dict[str, Any]] = field(default=lambda depth: {})
    # which reduction of layer K-1's attention the scores are: the last query row, or the mean over all rows
    score_rows: Callable[[dict], str] = field(default=lambda params: LAST_ROW)
    # raises ValueError when a budget and parameters cannot work together
    check_budget: Callable[[int, dict], None] = field(default=lambda keep, params: None)
    stage: str = "llm-prefill"
    prunes: bool = True
    # carries state between control steps (a guide from earlier steps' attention): policies only
    stateful: bool = False


Method = VisionMethod | PrefillMethod
