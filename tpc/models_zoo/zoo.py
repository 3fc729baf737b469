"""Built-in, architecture-faithful models: real transformers classes built from configs with a fixed seed.

No model hub is reachable, so the zoo's weights are random-initialised. Each entry is saved once with
`save_pretrained` into a cache directory and always loaded back with `from_pretrained`, the same path a
user's own local model directory takes. Tiny entries export in seconds (tests, demo); larger ones have the
real geometry of the models they are named after (benchmarks).

Attention in a freshly initialised ViT is almost uniform, which would make every "most attended" choice a
near-tie. The zoo initialises with a larger `initializer_factor` so attention is peaked, as in a trained
encoder, and the selections are stable under the float rounding of different runtimes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, PretrainedConfig, SiglipVisionConfig


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    summary: str
    make_config: Callable[[], PretrainedConfig]
    seed: int = 0


def _tiny(config_class: type[PretrainedConfig]) -> Callable[[], PretrainedConfig]:
    return lambda: config_class(
        image_size=64,
        patch_size=4,  # 16 x 16 = 256 patches
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        initializer_factor=4.0,
    )


def _tiny_llava() -> LlavaConfig:
    """tiny-clip's tower + a 4-layer Llama (GQA: 4 query heads, 2 KV heads); 256 image tokens, exports in seconds."""
    text = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.1,  # peaked attention and logits, as in a trained model (see the module docstring)
    )
    return LlavaConfig(
        vision_config=_tiny(CLIPVisionConfig)().to_dict(),
        text_config=text.to_dict(),
        image_token_id=500,
        image_seq_length=256,
    )


def _llava_bench() -> LlavaConfig:
    """LLaVA-1.5's token geometry (336 px / 14 -> 24x24 = 576 image tokens, CLIP layers 24, feature layer -2)
    at reduced width, so that on 2 CPU cores the decoder prefill dominates time to first token as the 7B decoder
    does on a GPU, and one prefill takes about a second."""
    vision = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=24,
        num_attention_heads=4,
        initializer_factor=4.0,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=4096,
        initializer_range=0.05,
    )
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=32000)


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry("tiny-clip", "clip", "CLIP ViT, 4 layers, 16x16 patches + CLS, d=64", _tiny(CLIPVisionConfig)),
        ZooEntry("tiny-siglip", "siglip", "SigLIP ViT, 4 layers, 16x16 patches, d=64", _tiny(SiglipVisionConfig)),
        ZooEntry(
            "clip-vit-l-336",
            "clip",
            "CLIP ViT-L/14-336 geometry (LLaVA-1.5's tower): 24 layers, 24x24 patches + CLS, d=1024",
            lambda: CLIPVisionConfig(
                image_size=336,
                patch_size=14,
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                projection_dim=768,
                initializer_factor=4.0,
            ),
        ),
        ZooEntry("tiny-llava", "llava", "LLaVA: tiny-clip tower, MLP projector, 4-layer Llama d=64", _tiny_llava),
        ZooEntry(
            "llava-bench",
            "llava",
            "LLaVA-1.5 token geometry (576 image tokens), narrow CLIP tower, 12-layer Llama d=768 (benchmarks)",
            _llava_bench,
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("TPC_CACHE_DIR", Path.home() / ".cache" / "tpc"))


def _fingerprint(entry: ZooEntry) -> str:
    config = entry.make_config().to_dict()
    payload = json.dumps({"config": config, "seed": entry.seed}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def materialize(entry: ZooEntry) -> Path:
    """Directory holding the entry's config.json + model.safetensors; built once, then reused."""
    from tpc.models_zoo import adapter_for_family

    target = cache_root() / "zoo" / f"{entry.name}-{_fingerprint(entry)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    adapter = adapter_for_family(entry.family)
    torch.manual_seed(entry.seed)
    model = adapter.model_class(entry.make_config())
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
