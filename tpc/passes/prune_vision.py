"""Model pass: a vision tower cut at its feature layer(s), with score taps and one static prune point.

The pruned tower runs layers 1..L (L = the deepest feature or tapped layer), reads the taps, lets the method
turn them into priorities, and keeps K tokens with the shared select op. Layers after L never run: their output
is not what a VLM consumes (LLaVA takes layer -2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from tpc.contract.names import KEPT_INDICES
from tpc.methods import VisionMethod, VisionSignals
from tpc.models_zoo import VisionEncoderAdapter, VisionGeometry
from tpc.ops import gather_tokens, select_tokens
from tpc.passes.attention_tap import ReceivedAttention, RowAttention, attach_tap, insert_taps

INPUT_NAMES = ("pixel_values",)
OUTPUT_NAMES = ("kept_features", KEPT_INDICES)


@dataclass(frozen=True)
class VisionCut:
    """Where and how a tower is pruned.

    `keep` counts the tokens handed on. With `keep_prefix` (LLaVA's "full" feature strategy) the prefix (CLS)
    tokens are handed on too: they are always kept and count towards `keep`, so the method picks
    `keep - prefix` patches.
    """

    adapter: VisionEncoderAdapter
    geometry: VisionGeometry
    method: VisionMethod
    keep: int
    method_params: dict[str, Any]
    feature_layers: tuple[int, ...]
    keep_prefix: bool = False
    cls_layer: int | None = None  # output this layer's CLS-row attention to each image token (`cls_attention`)

    @property
    def kept_prefix(self) -> int:
        return self.geometry.prefix_tokens if self.keep_prefix else 0

    @property
    def patch_budget(self) -> int:
        return self.keep - self.kept_prefix

    @property
    def tapped_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.method.tapped_layers(self.method_params))))

    @property
    def tap_reduction(self) -> str:
        return "attention received: mean over heads and all query rows, per key"

    @property
    def depth(self) -> int:
        """Tower layers the pruned graph runs."""
        return max((*self.feature_layers, *self.tapped_layers, *((self.cls_layer,) if self.cls_layer else ())))


class PrunedVisionEncoder(nn.Module):
    """pixel_values (B, C, H, W) -> kept_features (B, K, D), kept_indices (B, K) int64 ascending.

    `signal_embedding`: what a method that reads features (DivPrune) measures them in. A VLM passes its projector:
    the references score the LLM input embeddings of the image tokens, not the tower's features. The tokens
    handed on stay the tower's (the VLM projects the kept ones), so only the signal changes.
    """

    def __init__(self, model: PreTrainedModel, cut: VisionCut, signal_embedding: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.cut = cut
        self.signal_embedding = signal_embedding
        layers = cut.adapter.layers(model)
        attentions = {n: cut.adapter.attention(layers[n - 1]) for n in cut.tapped_layers}
        self.taps = insert_taps(attentions, ReceivedAttention)
        self.cls_tap: RowAttention | None = None
        if cut.cls_layer is not None:
            assert cut.cls_layer not in self.taps, "one tap per layer"
            self.cls_tap = attach_tap(cut.adapter.attention(layers[cut.cls_layer - 1]), RowAttention(row=0))

    def cls_attention(self) -> Tensor:
        """(B, N) the CLS row's attention at `cut.cls_layer` to each token handed on, head mean (the last call's)."""
        assert self.cls_tap is not None, "the cut has no CLS layer"
        prefix = self.cut.geometry.prefix_tokens
        return self.cls_tap.latest()[:, prefix - self.cut.kept_prefix :]

    def forward(self, pixel_values: Tensor, forced_indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`forced_indices` replaces the selection (teacher forcing, to separate a selection flip from drift)."""
        cut, prefix = self.cut, self.cut.geometry.prefix_tokens
        hidden = cut.adapter.embed(self.model, pixel_values)
        collected = {}
        for number, layer in enumerate(cut.adapter.layers(self.model)[: cut.depth], start=1):
            hidden = cut.adapter.run_layer(layer, hidden)
            if number in cut.feature_layers:
                collected[number] = hidden
        tokens = torch.cat([collected[n] for n in cut.feature_layers], dim=-1)[:, prefix - cut.kept_prefix :]
        if forced_indices is not None:
            return gather_tokens(tokens, forced_indices), forced_indices
        if not cut.method.prunes:
            all_tokens = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[:2])
            return tokens, all_tokens
        received = {layer: tap.latest()[:, prefix:] for layer, tap in self.taps.items()}
        patches = tokens[:, cut.kept_prefix :]
        features = patches if self.signal_embedding is None else self.signal_embedding(patches)
        signals = VisionSignals(received=received, features=features, grid=cut.geometry.grid)
        priority = cut.method.priority(signals, cut.patch_budget, cut.method_params)
        if cut.kept_prefix:  # +inf ranks first and ties go to the lower index: the prefix is always kept
            always = priority.new_full((priority.shape[0], cut.kept_prefix), float("inf"))
            priority = torch.cat([always, priority], dim=1)
        kept_indices, kept_features = select_tokens(priority, tokens, cut.keep)
        return kept_features, kept_indices
