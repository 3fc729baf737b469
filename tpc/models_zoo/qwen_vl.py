"""Qwen2.5-VL and Qwen3-VL (`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`): a
Qwen ViT whose 2x2 patch merger hands one token per 2x2 patches to a Qwen decoder with M-RoPE.

What differs from LLaVA, all read from the config: the tower takes flattened patches and a `grid_thw` (tpc
fixes the image size, so the grid, the window index and every position are constants of the export: the issue
of transformers 5.x's data-dependent `get_rope_index` is solved by computing it here, once); Qwen2.5-VL's tower
attends within windows except in its `fullatt_block_indexes` blocks; the decoder's rotary positions are
three-dimensional (t, h, w) for image tokens and equal on all three axes for text, so an image of a g_h x g_w
merged grid occupies max(g_h, g_w) positions whatever its token count; Qwen3-VL adds DeepStack: merged features
of a few tower blocks added to the image tokens' hidden states after the first decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from tpc.errors import UsageError
from tpc.models_zoo.base import VisionGeometry
from tpc.models_zoo.llava import (
    DecoderGeometry,
    DecoderParts,
    DecoderStack,
    PromptLayout,
    chat_template_ids,
    decoder_geometry,
)
from tpc.models_zoo.validate import safe_from_pretrained

# Qwen2.5-VL's chat template around one image, as its tokenizer counts it: "<|im_start|>system\nYou are a helpful
# assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>" precedes the image pads (15 tokens), "<|vision_end|>What
# is shown in this image?<|im_end|>\n<|im_start|>assistant\n" follows them (13). Used when a model has no tokenizer.
DEFAULT_IMAGE_START = 15
DEFAULT_TEXT_AFTER_IMAGE = 13
# the resolution an export is built for when neither --param image_size nor the config (`vision_config.image_size`)
# says: 448 px, Qwen2.5-VL-3B's benchmark geometry (32 x 32 patches of 14 px -> 16 x 16 = 256 merged tokens)
DEFAULT_IMAGE_SIZE = 448
# HiPrune-Qwen's object block: 16 of the reference's 32 (scaled to the tower's depth); its deep block is the last
REFERENCE_OBJECT_BLOCK, REFERENCE_BLOCKS = 16, 32


@dataclass(frozen=True)
class QwenGrid:
    """One image's static geometry: the patch grid, the merged grid the decoder sees, and where its tokens sit in
    M-RoPE (t, h, w) relative to the image's first position."""

    image_size: int
    patch_size: int
    merge: int

    @property
    def patches(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def merged(self) -> tuple[int, int]:
        height, width = self.patches
        return height // self.merge, width // self.merge

    @property
    def tokens(self) -> int:
        height, width = self.merged
        return height * width

    @property
    def position_span(self) -> int:
        """Rotary positions the image occupies: the text after it starts max(g_h, g_w) past its start."""
        return max(self.merged)

    def positions(self) -> Tensor:
        """(tokens, 3) int64 (t, h, w) of each merged token in raster order, relative to the image's start, as
        transformers' `get_vision_position_ids` lays out a still image (t = 0)."""
        height, width = self.merged
        rows = torch.arange(height).repeat_interleave(width)
        cols = torch.arange(width).repeat(height)
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)


class QwenVlAdapter(DecoderParts[PreTrainedModel]):
    """The Qwen2.5-VL family; `Qwen3VlAdapter` adds DeepStack. Image tokens are the merger's outputs."""

    family: ClassVar[str] = "qwen2_5_vl"
    kind: ClassVar[str] = "vlm"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    model_class_name: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    windowed: ClassVar[bool] = True  # window attention outside fullatt_block_indexes
    # methods this family does not take yet, and why (a multi-image prompt, renumbered 3-D positions)
    refused_methods: ClassVar[dict[str, str]] = {
        "catp": "needs an n-shot multi-image prompt; Qwen exports take one image",
        "lvlm-csp": "re-admits tokens with states from before its first prune, not built for M-RoPE decoders",
    }

    @property
    def model_class(self) -> type[PreTrainedModel]:
        """The transformers class, imported when first used (building the family table for another family's
        command then does not import the Qwen modeling code)."""
        return getattr(transformers, self.model_class_name)

    def load(self, path: Path) -> PreTrainedModel:
        """`from_pretrained` as for every family: safetensors only, no remote code, SDPA attention."""
        return safe_from_pretrained(self.model_class, path, attn_implementation="sdpa").eval()

    @staticmethod
    def image_size(config: PretrainedConfig) -> int:
        return int(getattr(config.vision_config, "image_size", None) or DEFAULT_IMAGE_SIZE)

    def grid(self, config: PretrainedConfig) -> QwenGrid:
        vision = config.vision_config
        return QwenGrid(self.image_size(config), vision.patch_size, vision.spatial_merge_size)

    def size_unit(self, config: PretrainedConfig) -> int:
        """What an image side must be a multiple of: a window (Qwen2.5-VL's `window_size`, in pixels, a multiple of
        patch x merge), or patch x merge."""
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        return int(vision.window_size) if self.windowed else unit

    def check_image_size(self, config: PretrainedConfig, size: int) -> None:
        unit = self.size_unit(config)
        what = "window_size (patch x merge x window)" if self.windowed else "patch_size x spatial_merge_size"
        if size < unit or size % unit:
            raise UsageError(
                f"--param image_size={size} is not a positive multiple of {unit} px, this {self.family} tower's "
                f"{what}; use e.g. {max(unit, round(size / unit) * unit)}"
            )

    def geometry(self, config: PretrainedConfig) -> VisionGeometry:
        vision = config.vision_config
        return VisionGeometry(
            image_size=self.image_size(config),
            patch_size=vision.patch_size,
            channels=vision.in_channels,
            prefix_tokens=0,
            num_layers=vision.depth,
            hidden_size=vision.hidden_size,
            num_heads=vision.num_heads,
            intermediate_size=vision.intermediate_size,
        )

    def decoder(self, config: PretrainedConfig) -> DecoderGeometry:
        return decoder_geometry(config.text_config)

    def image_tokens(self, config: PretrainedConfig) -> int:
        return self.grid(config).tokens

    def image_token_id(self, config: PretrainedConfig) -> int:
        value = getattr(config, "image_token_id", None)
        if value is None:
            raise UsageError(
                f"this {self.family} config has no image_token_id (a video-only model?); tpc exports image prompts"
            )
        return int(value)

    def image_brackets(self, config: PretrainedConfig) -> tuple[int, int]:
        """The ids that open and close an image's run in a Qwen prompt (<|vision_start|>, <|vision_end|>)."""
        return int(config.vision_start_token_id), int(config.vision_end_token_id)

    def reserved_token_ids(self, config: PretrainedConfig) -> tuple[int, ...]:
        """Ids besides the image token that a seeded prompt's text never holds: the video and bracket tokens."""
        ids = (getattr(config, "video_token_id", None), *self.image_brackets(config))
        return tuple(int(i) for i in ids if i is not None)

    def tower_flops(self, config: PretrainedConfig) -> int:
        """2x multiply-adds of the tower on one image: every block's projections and MLP on every patch, attention
        over the whole image in full-attention blocks and within a window elsewhere."""
        vision, patches = config.vision_config, self.geometry(config).num_patches
        d, inner = vision.hidden_size, vision.intermediate_size
        mlp_matrices = 3 if self.windowed else 2  # Qwen2.5-VL's gated MLP, Qwen3-VL's two-layer one
        dense = 2 * patches * (4 * d * d + mlp_matrices * d * inner)
        window = (vision.window_size // vision.patch_size) ** 2 if self.windowed else patches
        full = set(getattr(vision, "fullatt_block_indexes", None) or range(vision.depth))
        attention = sum(
            2 * 2 * patches * (patches if b in full else min(window, patches)) * d for b in range(vision.depth)
        )
        return vision.depth * dense + attention

    def merger_flops(self, config: PretrainedConfig) -> int:
        """2x multiply-adds of the merger (and DeepStack's mergers) on every merged token."""
        vision = config.vision_config
        wide = vision.hidden_size * vision.spatial_merge_size**2
        per_merger = 2 * self.grid(config).tokens * (wide * wide + wide * vision.out_hidden_size)
        return per_merger * (1 + self.deepstack_levels(config))

    def seg_token_id(self, config: PretrainedConfig) -> int | None:
        return None

    def eos_token_ids(self, config: PretrainedConfig) -> list[int]:
        eos = getattr(config.text_config, "eos_token_id", None) or getattr(config, "eos_token_id", None)
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def deepstack_levels(self, config: PretrainedConfig) -> int:
        """Decoder layers after which merged features of earlier tower blocks are added (Qwen3-VL's DeepStack)."""
        return 0

    def vision_defaults(self, method: Any, config: PretrainedConfig) -> dict[str, Any]:
        """A vision-side method's model-derived defaults: HiPrune-Qwen's object block 16 of 32 scaled to the tower,
        its deep block the last (the merger reads the last block's output)."""
        depth = config.vision_config.depth
        defaults: dict[str, Any] = method.model_defaults(depth, depth)
        if "object_layer" in defaults:
            defaults["object_layer"] = max(1, round(depth * REFERENCE_OBJECT_BLOCK / REFERENCE_BLOCKS))
        return defaults

    # where the parts are in a loaded model
    def vision_tower(self, model: PreTrainedModel) -> nn.Module:
        return model.model.visual

    def language_model(self, model: PreTrainedModel) -> DecoderStack:
        return model.model.language_model

    def lm_head(self, model: PreTrainedModel) -> nn.Module:
        return model.lm_head

    def rotary(self, model: PreTrainedModel, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """M-RoPE: `position_ids` (B, L, 3) per axis, or (B, L) for tokens whose three axes agree (text, decode)."""
        axes = position_ids.permute(2, 0, 1) if position_ids.dim() == 3 else position_ids
        return self.language_model(model).rotary_emb(hidden, axes)

    def default_layout(
        self, config: PretrainedConfig, path: Path | None, prompt_len: int | None, shots: int = 0
    ) -> PromptLayout:
        """The model's chat template around one image when it has a tokenizer, else Qwen's (15 tokens before the
        image, 13 after); `--prompt-len` keeps the image at 15 (or fewer, for a short prompt). One image per prompt."""
        count, image_id = self.image_tokens(config), self.image_token_id(config)
        if shots:
            raise UsageError(f"--param shots={shots}: a {self.family} export takes one image per prompt")
        template = chat_template_ids(path, image_id) if path is not None else None
        if template is not None and prompt_len in (None, len(template) - 1):
            return PromptLayout(len(template) - 1, (template.index(image_id),), count, tuple(template))
        if prompt_len is None:
            return PromptLayout(DEFAULT_IMAGE_START + DEFAULT_TEXT_AFTER_IMAGE, (DEFAULT_IMAGE_START,), count)
        if prompt_len < 2:
            raise UsageError(f"--prompt-len {prompt_len} is too short: at least 2 text tokens around the image")
        return PromptLayout(prompt_len, (min(DEFAULT_IMAGE_START, prompt_len - 1),), count)


class Qwen3VlAdapter(QwenVlAdapter):
    """Qwen3-VL: full attention in every tower block, learned position embeddings, DeepStack."""

    family: ClassVar[str] = "qwen3_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    model_class_name: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    windowed: ClassVar[bool] = False

    def deepstack_levels(self, config: PretrainedConfig) -> int:
        return len(config.vision_config.deepstack_visual_indexes)
