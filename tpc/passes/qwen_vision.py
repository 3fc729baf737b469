"""Model pass: Qwen2.5-VL's and Qwen3-VL's vision towers as batched, static-shape graphs, with HiPrune taps.

transformers runs these towers on a packed (T, C·t·P·P) sequence described by `grid_thw`: rotary position ids,
Qwen2.5's window permutation and window boundaries, and Qwen3's position-embedding resampling are all computed
from `grid_thw` with `.tolist()`, loops and `repeat_interleave`, and attention runs one `cu_seqlens` chunk after
another. None of that traces to a static graph. Here the image size is fixed per export, so `QwenVisionGrid`
computes those constants once, outside the graph, with transformers' own helpers for grid_thw = (1, gh, gw), and
`QwenVisionTower` runs the tower's own submodules on a (B, T, D) batch:

* every block's attention is one SDPA over equal groups: a full-attention block is one group of T, a windowed
  block's windows are gathered into n groups of the largest window's length L (edge windows padded and their pad
  keys masked out; when every window is full the gather is a plain reshape), so a windowed block costs n·L², not
  T² as a block-diagonal mask over the whole sequence would;
* the merged tokens come out in raster order (transformers' `pooler_output`, after Qwen2.5's `reverse_indices`),
  DeepStack levels (Qwen3) likewise;
* a tapped block also outputs HiPrune-Qwen's attention received per merged token (`hiprune.qwen_reduce` of the
  block's attention map) from the same rotated q and k, row block by row block, without `output_attentions`; when
  the scored softmax is the block's own attention, the block's output comes from the same probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
    get_vision_window_index,
)

from tpc.passes.attention_tap import DEFAULT_BLOCK_ELEMENTS, ones_row

Scoring = Literal["global", "windowed"]
SCORINGS: tuple[Scoring, ...] = ("global", "windowed")


# --- pixels -> the processor's patches -------------------------------------------------------------------


def patchify(pixel_values: Tensor, patch: int, temporal: int, merge: int) -> Tensor:
    """(B, C, H, W) normalised pixels -> (B, T, C·temporal·P·P) patches, exactly `Qwen2VLImageProcessor`'s layout.

    The processor repeats a still image to `temporal` frames, orders patches by merged unit (row, column) and
    then inside the unit (row, column), and flattens each patch as (C, temporal, P, P). Static reshapes and
    permutes of at most 6 dimensions (XNNPACK's limit: a delegate given more fails to initialise on the device);
    the frame repeat is an `expand`.
    """
    batch, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch, width // patch
    pixels = patch * patch
    patches = pixel_values.reshape(batch, channels, grid_h, patch, grid_w, patch).permute(0, 2, 4, 1, 3, 5)
    units = patches.reshape(batch, grid_h // merge, merge, grid_w // merge, merge, channels * pixels)
    ordered = units.permute(0, 1, 3, 2, 4, 5).reshape(batch, grid_h * grid_w, channels, 1, pixels)
    frames = ordered.expand(-1, -1, -1, temporal, -1)  # (B, T, C, temporal, P·P)
    return frames.reshape(batch, grid_h * grid_w, channels * temporal * pixels)


# --- the constants of one image size -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QwenVisionGrid:
    """Everything about one image size that transformers derives from `grid_thw` at run time, computed once.

    The token sequence is in the tower's own order: merged-unit order (the 2x2 patches of a merged token are
    consecutive) and, for Qwen2.5, window order (`window_index` permutes merged units into windows). `bounds[b]`
    are block b's attention groups (0-based block b) as cumulative boundaries: Qwen2.5's `cu_window_seqlens` for a
    windowed block, (0, T) for a full-attention block.
    """

    image_size: tuple[int, int]
    patch: int
    temporal: int
    merge: int
    grid: tuple[int, int]  # patches (gh, gw)
    merged_grid: tuple[int, int]  # merged tokens (gh/m, gw/m)
    position_ids: Tensor  # (T, 2) long, (row, column) of each patch, in sequence order
    window_index: Tensor | None  # (N,) long, raster merged unit of each sequence unit (Qwen2.5); None (Qwen3)
    reverse_indices: Tensor | None  # (N,) long, argsort(window_index): sequence unit of each raster unit
    bounds: tuple[tuple[int, ...], ...]  # per block: attention groups as cumulative boundaries
    deepstack_blocks: tuple[int, ...]  # 0-based blocks whose output a DeepStack merger reads, in block order
    interp_indices: Tensor | None  # (T, 4) long into Qwen3's pos_embed table; None (Qwen2.5)
    interp_weights: Tensor | None  # (T, 4) float32 bilinear weights

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_merged(self) -> int:
        return self.merged_grid[0] * self.merged_grid[1]

    @property
    def unit(self) -> int:
        """Patches per merged token."""
        return self.merge * self.merge

    @property
    def depth(self) -> int:
        return len(self.bounds)

    def windowed(self, block: int) -> bool:
        """Whether 0-based `block` attends within windows (several groups) rather than over the whole image."""
        return len(self.bounds[block]) > 2

    @classmethod
    def from_config(cls, config: Any, image_size: tuple[int, int]) -> QwenVisionGrid:
        """From a Qwen2.5-VL or Qwen3-VL vision config (`model.config.vision_config`) and an (H, W) image size.

        The size must be a multiple of patch·merge on both sides (the processor resizes to such a size; the
        tower's merge needs whole units). Qwen2.5's windows need not divide the merged grid: transformers packs
        partial windows at the right and bottom edges, and so do these groups.
        """
        patch, temporal, merge = int(config.patch_size), int(config.temporal_patch_size), int(config.spatial_merge_size)
        height, width = image_size
        factor = patch * merge
        if height <= 0 or width <= 0 or height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of patch_size·spatial_merge_size = {patch}·{merge}"
                f" = {factor} on both sides (resize it to one, as Qwen2VLImageProcessor's smart_resize does)"
            )
        grid_h, grid_w = height // patch, width // patch
        grid_thw = torch.tensor([[1, grid_h, grid_w]])
        position_ids = get_vision_position_ids(grid_thw, merge)
        whole = tuple(int(v) for v in get_vision_cu_seqlens(grid_thw))
        depth = int(config.depth)
        window_index = reverse_indices = interp_indices = interp_weights = None
        deepstack: tuple[int, ...] = ()
        if hasattr(config, "fullatt_block_indexes"):  # Qwen2.5-VL: windowed blocks, except the listed ones
            window_index, bounds = _windows(config, grid_thw, patch, merge)
            reverse_indices = torch.argsort(window_index)
            position_ids = position_ids.view(-1, merge * merge, 2)[window_index].reshape(-1, 2)
            full = {int(b) for b in config.fullatt_block_indexes}
            per_block = tuple(whole if b in full else bounds for b in range(depth))
        else:  # Qwen3-VL: full attention everywhere, learned positions resampled to the grid, DeepStack
            per_block = (whole,) * depth
            deepstack = tuple(sorted(int(b) for b in config.deepstack_visual_indexes))
            interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
                grid_thw,
                num_grid_per_side=int(config.num_position_embeddings**0.5),
                mode="bilinear",
                align_corners=True,
                spatial_merge_size=merge,
            )
        return cls(
            image_size=(height, width),
            patch=patch,
            temporal=temporal,
            merge=merge,
            grid=(grid_h, grid_w),
            merged_grid=(grid_h // merge, grid_w // merge),
            position_ids=position_ids,
            window_index=window_index,
            reverse_indices=reverse_indices,
            bounds=per_block,
            deepstack_blocks=deepstack,
            interp_indices=interp_indices,
            interp_weights=interp_weights,
        )


def _windows(config: Any, grid_thw: Tensor, patch: int, merge: int) -> tuple[Tensor, tuple[int, ...]]:
    """Qwen2.5's window permutation of merged units and its window boundaries (in patches), transformers' own."""
    if int(config.window_size) // merge // patch < 1:
        raise ValueError(
            f"window_size {config.window_size} is smaller than one merged token ({patch}·{merge} pixels): "
            "transformers' window partition divides by zero"
        )
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=int(config.window_size), patch_size=patch
    )
    return window_index, tuple(int(v) for v in cu_window_seqlens)


# --- equal attention groups --------------------------------------------------------------------------------


class AttentionGroups(nn.Module):
    """One block's attention groups as `count` equal groups of `length` tokens, and SDPA inside them.

    With unequal groups (Qwen2.5's edge windows), `gather` (count·length,) picks each group's tokens from the
    sequence, padding with the group's first token, `key_valid` (count, length) marks the real keys and `scatter`
    (T,) finds each sequence token in the padded layout; when every group is full they are None and the grouping
    is a plain reshape. `group_of` (T,) is each token's group (the windowed tap's mask). Buffers, so they follow
    the tower to a device and export as constants.
    """

    gather: Tensor | None
    key_valid: Tensor | None
    scatter: Tensor | None
    group_of: Tensor

    def __init__(self, bounds: tuple[int, ...]) -> None:
        super().__init__()
        starts = torch.tensor(bounds[:-1])
        lengths = torch.tensor(bounds[1:]) - starts
        self.count, self.length = len(lengths), int(lengths.max())
        self.register_buffer("group_of", torch.repeat_interleave(torch.arange(self.count), lengths), persistent=False)
        gather = key_valid = scatter = None
        if bool((lengths != self.length).any()):
            slots = torch.arange(self.length)
            key_valid = slots[None, :] < lengths[:, None]
            gather = torch.where(key_valid, starts[:, None] + slots, starts[:, None]).reshape(-1)
            scatter = ((torch.arange(self.count) * self.length)[:, None] + slots)[key_valid]
        self.register_buffer("gather", gather, persistent=False)
        self.register_buffer("key_valid", key_valid, persistent=False)
        self.register_buffer("scatter", scatter, persistent=False)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """(B, T, H, d) rotated q, k and v -> (B, T, H·d): SDPA inside each group, one batched call."""
        batch, _, heads, dim = query.shape
        count, length = self.count, self.length
        if self.gather is not None:
            query, key, value = query[:, self.gather], key[:, self.gather], value[:, self.gather]

        def groups(x: Tensor) -> Tensor:  # (B, count·length, H, d) -> (B·count, H, length, d)
            # contiguous: SDPA's eager output then has the layout a runtime's decomposed SDPA has, so the merge of
            # the heads below exports as a copy + view rather than a view only valid for the eager kernel's strides
            return x.reshape(batch * count, length, heads, dim).transpose(1, 2).contiguous()

        mask = None
        if self.key_valid is not None:  # pad keys never attended; pad query rows are computed and dropped
            mask = self.key_valid[None, :, None, None, :].expand(batch, -1, -1, -1, -1)
            mask = mask.reshape(batch * count, 1, 1, length)
        out = F.scaled_dot_product_attention(groups(query), groups(key), groups(value), attn_mask=mask, scale=scale)
        out = out.transpose(1, 2).reshape(batch, count * length, heads * dim)
        return out if self.scatter is None else out[:, self.scatter]


# --- the HiPrune-Qwen tap ----------------------------------------------------------------------------------


def received_attention(
    query: Tensor, key: Tensor, scale: float, group_of: Tensor | None, block_elements: int = DEFAULT_BLOCK_ELEMENTS
) -> Tensor:
    """(B, H, T, d) rotated q and k -> (B, T): softmax(q kᵀ·scale) summed over query rows, mean over heads.

    `group_of` (T,) restricts each row's softmax to its own group (the reference's eager branch, windowed);
    None scores every key (its flash-attention branch). Row blocks keep at most `block_elements` probabilities.
    """
    return scored_attention(query, key, None, scale, group_of, block_elements)[1]


def scored_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor | None,
    scale: float,
    group_of: Tensor | None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[Tensor | None, Tensor]:
    """`received_attention`, and with `value` (B, H, T, d) the attention output (B, H, T, d) from the same
    probabilities: a tapped block whose scored softmax is its own attention (a full-attention block, or windowed
    scoring) then computes the softmax once, not once for the scores and once more in SDPA."""
    batch, heads, tokens, _ = query.shape
    rows = max(1, min(tokens, block_elements // max(1, batch * heads * tokens)))
    key_t = key.transpose(-1, -2)
    received = query.new_zeros((batch, tokens), dtype=torch.float32)
    outputs = []
    for start in range(0, tokens, rows):
        logits = torch.matmul(query[:, :, start : start + rows], key_t) * scale
        if group_of is not None:
            same = group_of[start : start + rows, None] == group_of[None, :]
            logits = logits.masked_fill(~same, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        # the rows summed as a GEMV (`ones_row`), then the heads
        received = received + torch.matmul(ones_row(probs), probs).sum(dim=(1, 2))
        if value is not None:
            outputs.append(torch.matmul(probs.to(value.dtype), value))
    return (torch.cat(outputs, dim=2) if value is not None else None), received / heads


def merged_received(received: Tensor, unit: int, reverse_indices: Tensor | None) -> Tensor:
    """(B, T) received per patch in sequence order -> (B, N) per merged token in raster order (mean of its unit)."""
    merged = received.reshape(received.shape[0], -1, unit).mean(dim=-1)
    return merged if reverse_indices is None else merged[:, reverse_indices]


# --- the tower ---------------------------------------------------------------------------------------------


class QwenVisionOutput(NamedTuple):
    """What `QwenVisionTower` returns (a NamedTuple: torch.export flattens it).

    `embeds` (B, N, D_out) and each `deepstack` level (B, N, D_out) are merged tokens in raster order;
    `received` maps each tapped block (1-based) to its (B, N) HiPrune-Qwen scores, raster order.
    """

    embeds: Tensor
    deepstack: tuple[Tensor, ...]
    received: dict[int, Tensor]


class QwenVisionTower(nn.Module):
    """pixel_values (B, C, H, W), normalised -> `QwenVisionOutput`, running `visual`'s own submodules.

    `visual` is `model.model.visual` of `Qwen2_5_VLForConditionalGeneration` or `Qwen3VLForConditionalGeneration`;
    `grid` fixes the image size. `tapped_blocks` (1-based) also output HiPrune-Qwen's scores; `scoring="global"`
    (default, the reference's flash-attention branch, the benchmarked one) takes each row's softmax over all
    patches, also in a windowed block, `"windowed"` (its eager branch) within the row's window (the same thing in
    a full-attention block, so everywhere in Qwen3). The block output always is the block's own attention: where the
    scored softmax is that attention (a full-attention block, or windowed scoring) the output is computed from the
    same probabilities, one softmax for both; global scores of a windowed block are a softmax of their own. Every
    block runs (the merged tokens are the last block's),
    so there is no depth cut. The grid's constants are buffers: a dtype cast of the tower casts Qwen3's
    interpolation weights too (transformers keeps them float32; a half-precision tower differs by rounding).
    """

    def __init__(
        self,
        visual: nn.Module,
        grid: QwenVisionGrid,
        tapped_blocks: tuple[int, ...] = (),
        scoring: Scoring = "global",
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ) -> None:
        super().__init__()
        depth = len(cast(nn.ModuleList, visual.blocks))
        if depth != grid.depth:
            raise ValueError(f"the tower has {depth} blocks, the grid was built for {grid.depth}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
        outside = [b for b in tapped_blocks if not 1 <= b <= grid.depth]
        if outside:
            raise ValueError(f"tapped blocks {outside} are outside 1..{grid.depth}")
        self.visual: Any = visual  # transformers' tower; its submodules are read by name
        self.grid = grid
        self.tapped_blocks = tuple(sorted(set(tapped_blocks)))
        self.scoring = scoring
        self.block_elements = block_elements
        shared = {bounds: AttentionGroups(bounds) for bounds in dict.fromkeys(grid.bounds)}
        self.groups = nn.ModuleList(shared[bounds] for bounds in grid.bounds)  # per block, shared by equal bounds
        self.register_buffer("position_ids", grid.position_ids.clone(), persistent=False)
        self.reverse_indices: Tensor | None
        self.interp_indices: Tensor | None
        self.interp_weights: Tensor | None
        self.window_index: Tensor | None
        for name in ("window_index", "reverse_indices", "interp_indices", "interp_weights"):
            constant = getattr(grid, name)
            self.register_buffer(name, None if constant is None else constant.clone(), persistent=False)

    def embed(self, pixel_values: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, T, D) patch embeddings (+ Qwen3's resampled learned positions), sequence order.

        The patch Conv3d's kernel equals its stride, so it is a matmul with its weight flattened as the
        processor flattens a patch, (C, t, P, P).
        """
        grid, proj = self.grid, self.visual.patch_embed.proj
        patches = patchify(pixel_values, grid.patch, grid.temporal, grid.merge).to(proj.weight.dtype)
        hidden = F.linear(patches, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)
        if self.interp_indices is not None and self.interp_weights is not None:  # Qwen3
            positions = (self.visual.pos_embed(self.interp_indices) * self.interp_weights[:, :, None]).sum(1)
            hidden = hidden + positions.to(hidden.dtype)
        if self.window_index is not None:  # Qwen2.5: merged units into window order
            hidden = hidden.reshape(hidden.shape[0], grid.num_merged, grid.unit, -1)
            hidden = hidden[:, self.window_index].reshape(hidden.shape[0], grid.num_patches, -1)
        return hidden

    def attention(
        self, attn: Any, hidden: Tensor, rotary: tuple[Tensor, Tensor], groups: AttentionGroups, tapped: bool
    ) -> tuple[Tensor, Tensor | None]:
        """One block's attention on (B, T, D) -> its output (B, T, D) and, when `tapped`, its (B, N) HiPrune-Qwen
        scores in raster merged order (from the block's own softmax when the scored softmax is the block's)."""
        batch, tokens, _ = hidden.shape
        query, key, value = attn.qkv(hidden).reshape(batch, tokens, 3, attn.num_heads, -1).unbind(2)
        query, key = apply_rotary_pos_emb_vision(query, key, *rotary)
        if not tapped:
            return attn.proj(groups(query, key, value, attn.scaling)), None
        windowed = self.scoring == "windowed" and groups.count > 1
        group_of = groups.group_of if windowed else None
        shared = groups.count == 1 or windowed  # the scored softmax is the block's own attention
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        heads_out, received = scored_attention(q, k, v if shared else None, attn.scaling, group_of, self.block_elements)
        if heads_out is None:
            out = groups(query, key, value, attn.scaling)
        else:
            out = heads_out.transpose(1, 2).reshape(batch, tokens, -1)
        return attn.proj(out), merged_received(received, self.grid.unit, self.reverse_indices)

    def merge(self, merger: nn.Module, hidden: Tensor) -> Tensor:
        """(B, T, D) -> (B, N, D_out) merged tokens in raster order (a merger flattens rows of `unit` patches)."""
        merged = merger(hidden).reshape(hidden.shape[0], self.grid.num_merged, -1)
        return merged if self.reverse_indices is None else merged[:, self.reverse_indices]

    def forward(self, pixel_values: Tensor) -> QwenVisionOutput:
        visual, grid = self.visual, self.grid
        hidden = self.embed(pixel_values)
        rotary = visual.rotary_pos_emb(hidden, self.position_ids)
        merger_of = {block: n for n, block in enumerate(getattr(visual.config, "deepstack_visual_indexes", ()))}
        deepstack, received = [], {}
        for index, block in enumerate(visual.blocks):
            groups = cast(AttentionGroups, self.groups[index])
            tapped = index + 1 in self.tapped_blocks
            out, scores = self.attention(block.attn, block.norm1(hidden), rotary, groups, tapped)
            hidden = hidden + out
            hidden = hidden + block.mlp(block.norm2(hidden))
            if scores is not None:
                received[index + 1] = scores
            if index in grid.deepstack_blocks:
                deepstack.append(self.merge(visual.deepstack_merger_list[merger_of[index]], hidden))
        return QwenVisionOutput(self.merge(visual.merger, hidden), tuple(deepstack), received)
