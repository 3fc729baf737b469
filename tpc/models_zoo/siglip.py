"""SigLIP vision encoders (`SiglipVisionModel`): patches only, no CLS token."""

from __future__ import annotations

from torch import Tensor
from transformers import SiglipVisionModel

from tpc.models_zoo.base import VisionEncoderAdapter


class SiglipAdapter(VisionEncoderAdapter[SiglipVisionModel]):
    family = "siglip"
    model_types = ("siglip_vision_model", "siglip")
    model_class = SiglipVisionModel
    prefix_tokens = 0

    def embed(self, model: SiglipVisionModel, pixel_values: Tensor) -> Tensor:
        return model.embeddings(pixel_values)
