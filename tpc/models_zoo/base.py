"""What tpc needs to know about an architecture family, in one small adapter class per family.

An adapter answers "where is it": the vision tower's embedding step, its layers, each layer's attention
module, the patch grid and the prefix (CLS) tokens, all read from the model's config, never hard-coded
(the reference's 24 and 575 become the grid of whatever encoder is loaded).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, Protocol, TypeVar

from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from tpc.models_zoo.validate import safe_from_pretrained


class _EncoderStack(Protocol):
    @property
    def layers(self) -> nn.ModuleList: ...


class VisionTransformer(Protocol):
    """What the shared adapter code reads of a ViT-style model (`CLIPVisionModel`, `SiglipVisionModel`): the
    encoder's layer list."""

    @property
    def encoder(self) -> _EncoderStack: ...


EncoderModelT = TypeVar("EncoderModelT", bound=VisionTransformer)


@dataclass(frozen=True)
class VisionGeometry:
    """Shapes of a ViT-style encoder, as its config states them."""

    image_size: int
    patch_size: int
    channels: int
    prefix_tokens: int
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        height, width = self.grid
        return height * width

    @property
    def sequence_length(self) -> int:
        return self.prefix_tokens + self.num_patches

    def layer_flops(self, tokens: int) -> int:
        """Multiply-adds x2 of one pre-LN transformer layer on `tokens` tokens (projections, attention, MLP)."""
        d, i = self.hidden_size, self.intermediate_size
        return 2 * tokens * (4 * d * d + 2 * d * i) + 2 * 2 * tokens * tokens * d


class VisionEncoderAdapter(ABC, Generic[EncoderModelT]):
    """One ViT-style encoder family (CLIP, SigLIP, ...), of the transformers model class `EncoderModelT`."""

    family: ClassVar[str]
    kind: ClassVar[str] = "encoder"
    model_types: ClassVar[tuple[str, ...]]  # config.json `model_type` values this family loads
    model_class: ClassVar[type[PreTrainedModel]]
    prefix_tokens: ClassVar[int]

    def load(self, path: Path) -> PreTrainedModel:
        """The real `from_pretrained` path, from a local directory, fused attention everywhere; safetensors only,
        no remote code, a bad or mismatched checkpoint one UsageError line (tpc.models_zoo.validate)."""
        return safe_from_pretrained(self.model_class, path, attn_implementation="sdpa").eval()

    def vision_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """The vision part of a config (a full CLIP/SigLIP checkpoint nests it)."""
        return getattr(config, "vision_config", None) or config

    def geometry(self, config: PretrainedConfig) -> VisionGeometry:
        vision = self.vision_config(config)
        return VisionGeometry(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            channels=vision.num_channels,
            prefix_tokens=self.prefix_tokens,
            num_layers=vision.num_hidden_layers,
            hidden_size=vision.hidden_size,
            num_heads=vision.num_attention_heads,
            intermediate_size=vision.intermediate_size,
        )

    @abstractmethod
    def embed(self, model: EncoderModelT, pixel_values: Tensor) -> Tensor:
        """pixel values -> the token sequence entering layer 1 (prefix tokens first)."""

    def layers(self, model: EncoderModelT) -> nn.ModuleList:
        return model.encoder.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule("self_attn")

    def run_layer(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return layer(hidden, None)
