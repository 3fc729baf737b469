"""CLIP vision encoders (`CLIPVisionModel`): one CLS token before the patches, a pre-layernorm."""

from __future__ import annotations

from torch import Tensor
from transformers import CLIPVisionModel

from tpc.models_zoo.base import VisionEncoderAdapter


class ClipAdapter(VisionEncoderAdapter[CLIPVisionModel]):
    family = "clip"
    model_types = ("clip_vision_model", "clip")
    model_class = CLIPVisionModel
    prefix_tokens = 1

    def embed(self, model: CLIPVisionModel, pixel_values: Tensor) -> Tensor:
        return model.pre_layrnorm(model.embeddings(pixel_values))
