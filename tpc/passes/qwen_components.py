"""Model pass: a Qwen-VL vision graph that selects K of the merged image tokens, for the VLM's prefill.

The tower (`tpc.passes.qwen_vision`) runs every block on the fixed grid and the merger on every merged token (the
merger is token-wise, and DivPrune measures its outputs: the LLM input embeddings); the method's priorities over
the merged tokens in raster order pick K with the shared select op. What the prefill needs besides the kept
embeddings comes out of the same graph: each kept token's original M-RoPE (t, h, w) place (the references gather
the position ids with the kept mask) and, for Qwen3-VL, its DeepStack features gathered with the same indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tpc.contract.names import (
    DEEPSTACK_EMBEDS,
    IMAGE_EMBEDS,
    IMAGE_POSITIONS,
    IMAGE_VALID,
    KEPT_INDICES,
    PIXEL_VALUES,
)
from tpc.methods import VisionMethod, VisionSignals, hiprune
from tpc.models_zoo import QwenGrid
from tpc.ops import gather_tokens, select_indices
from tpc.passes.qwen_vision import SCORINGS, QwenVisionGrid, QwenVisionTower, Scoring

GLOBAL: Scoring = "global"  # HiPrune-Qwen's default scoring: the reference's flash-attention branch

__all__ = ["GLOBAL", "SCORINGS", "QwenCut", "QwenVisionComponent"]


@dataclass(frozen=True)
class QwenCut:
    """How a Qwen tower is pruned: `keep` of the grid's merged tokens by `method`, its taps scored `scoring`."""

    method: VisionMethod
    keep: int
    method_params: dict[str, Any]
    grid: QwenGrid
    blocks: int  # the tower's depth: every block runs (the merger reads the last one's output)
    scoring: Scoring = GLOBAL
    deepstack: bool = False  # the vision graph hands on DeepStack features (Qwen3-VL)
    # HiPrune's `qwen_duplicates=reference`: also output which of the K slots the reference keeps (`image_valid`)
    exact_count: bool = False

    @property
    def tapped_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.method.tapped_layers(self.method_params))))

    @property
    def depth(self) -> int:
        return self.blocks

    @property
    def tap_reduction(self) -> str:
        where = "over every patch" if self.scoring == GLOBAL else "within the block's windows"
        return f"attention received {where}: mean over heads, sum over query rows, mean over each merged token"


class QwenVisionComponent(nn.Module):
    """pixel_values (B, C, H, W) -> image_embeds (B, K, D_text), kept_indices (B, K) ascending, image_positions
    (B, K, 3) [, deepstack_embeds (B, K, levels, D_text)] [, image_valid (B, K): `qwen_duplicates=reference`]."""

    input_names = (PIXEL_VALUES,)
    grid_positions: Tensor

    def __init__(self, visual: nn.Module, cut: QwenCut) -> None:
        super().__init__()
        self.cut = cut
        grid = QwenVisionGrid.from_config(visual.config, (cut.grid.image_size, cut.grid.image_size))
        self.tower = QwenVisionTower(visual, grid, cut.tapped_layers, cut.scoring)
        deepstack = (DEEPSTACK_EMBEDS,) if cut.deepstack else ()
        valid = (IMAGE_VALID,) if cut.exact_count else ()
        self.output_names = (IMAGE_EMBEDS, KEPT_INDICES, IMAGE_POSITIONS, *deepstack, *valid)
        self.register_buffer("grid_positions", cut.grid.positions(), persistent=False)

    def forward(self, pixel_values: Tensor, forced_indices: Tensor | None = None) -> tuple[Tensor, ...]:
        """`forced_indices` replaces the selection (teacher forcing, to separate a selection flip from drift)."""
        cut = self.cut
        out = self.tower(pixel_values)
        embeds = out.embeds
        batch, tokens = embeds.shape[:2]
        if forced_indices is not None:
            kept = forced_indices
        elif not cut.method.prunes:
            kept = torch.arange(tokens, device=embeds.device).expand(batch, tokens)
        else:
            signals = VisionSignals(received=out.received, features=embeds, grid=cut.grid.merged)
            kept = select_indices(cut.method.priority(signals, cut.keep, cut.method_params), cut.keep)
        positions = gather_tokens(self.grid_positions.expand(batch, -1, -1), kept)
        outputs: tuple[Tensor, ...] = (gather_tokens(embeds, kept), kept, positions)
        if cut.deepstack:
            outputs += (torch.stack([gather_tokens(level, kept) for level in out.deepstack], dim=2),)
        if cut.exact_count:
            outputs += (self.reference_slots(out.received, kept),)
        return outputs

    def reference_slots(self, received: dict[int, Tensor], kept: Tensor) -> Tensor:
        """(B, K) int64: 1 where the slot holds a token the HiPrune-Qwen reference keeps, 0 where the static fill
        added one in place of a duplicate (`hiprune.qwen_reference_kept`)."""
        cut, params = self.cut, self.cut.method_params
        kept_by_reference = hiprune.qwen_reference_kept(
            received[params["object_layer"]], received[params["deep_layer"]], cut.keep, cut.grid.merged, params["alpha"]
        )
        return kept_by_reference.gather(1, kept).to(torch.int64)
