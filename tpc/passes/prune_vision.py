"""Model pass: a vision encoder cut at its feature layer, with score taps and one static prune point.

The pruned encoder runs layers 1..L (L = the feature layer, or the deepest tapped layer if deeper), reads the
taps, lets the method turn them into priorities, and keeps K patch tokens with the shared select op. Layers
after L never run: their output is not what a VLM consumes (LLaVA takes layer -2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from tpc.methods import VisionSignals
from tpc.ops import gather_tokens, select_tokens
from tpc.passes.attention_tap import insert_received_attention_taps

if TYPE_CHECKING:
    from tpc.pipeline import Plan

INPUT_NAMES = ("pixel_values",)
OUTPUT_NAMES = ("kept_features", "kept_indices")


class PrunedVisionEncoder(nn.Module):
    """pixel_values (B, C, H, W) -> kept_features (B, K, D), kept_indices (B, K) int64 ascending."""

    def __init__(self, model: PreTrainedModel, plan: Plan) -> None:
        super().__init__()
        self.model = model
        self.adapter = plan.source.adapter
        self.method = plan.method
        self.keep = plan.keep
        self.params = plan.method_params
        self.geometry = plan.source.geometry
        self.feature_layer = plan.feature_layer
        self.depth = plan.depth
        layers = self.adapter.layers(model)
        self.taps = insert_received_attention_taps(
            {n: self.adapter.attention(layers[n - 1]) for n in plan.tapped_layers}
        )

    def forward(self, pixel_values: Tensor, forced_indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`forced_indices` replaces the selection (teacher forcing, to separate a selection flip from drift)."""
        prefix = self.geometry.prefix_tokens
        hidden = self.adapter.embed(self.model, pixel_values)
        features = hidden[:, prefix:]
        for number, layer in enumerate(self.adapter.layers(self.model)[: self.depth], start=1):
            hidden = self.adapter.run_layer(layer, hidden)
            if number == self.feature_layer:
                features = hidden[:, prefix:]
        if forced_indices is not None:
            return gather_tokens(features, forced_indices), forced_indices
        if not self.method.prunes:
            all_tokens = torch.arange(features.shape[1], device=features.device).expand(features.shape[:2])
            return features, all_tokens
        received = {layer: tap.value[:, prefix:] for layer, tap in self.taps.items()}
        signals = VisionSignals(received=received, features=features, grid=self.geometry.grid)
        priority = self.method.priority(signals, self.keep, self.params)
        kept_indices, kept_features = select_tokens(priority, features, self.keep)
        return kept_features, kept_indices
