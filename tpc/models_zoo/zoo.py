"""Built-in, architecture-faithful models: real transformers classes built from configs with a fixed seed.

No model hub is reachable, so the zoo's weights are random-initialised, except two small models trained here on
Fashion-MNIST (`tpc testbed train`) that ship as checkpoints, so that accuracy under pruning can be measured
(`tpc eval`); a random-initialised model's accuracy means nothing. Each other entry is saved once with
`save_pretrained` into a cache directory and always loaded back with `from_pretrained`, the same path a
user's own local model directory takes. Tiny entries export in seconds (tests, demo); larger ones have the
real geometry of the models they are named after (benchmarks).

Attention in a freshly initialised ViT is almost uniform, which would make every "most attended" choice a
near-tie. The zoo initialises with a larger `initializer_factor` so attention is peaked, as in a trained
encoder, and the selections are stable under the float rounding of different runtimes.

Importing this module does not import torch or transformers (`tpc zoo` lists the entries without them): each
entry declares the tokens and layers `tpc zoo` shows (tests/test_startup.py checks them against the config it
makes), and the config classes are imported when a config is made.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict, TypeVar, Unpack

if TYPE_CHECKING:
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        PretrainedConfig,
        PreTrainedModel,
        Qwen2_5_VLConfig,
        Qwen3VLConfig,
        SiglipVisionConfig,
    )

    from tpc.models_zoo.openvla import OpenVlaConfig


CHECKPOINTS = Path(__file__).parent / "checkpoints"  # the testbed's trained models, in Hugging Face layout
OPENVLA_MODULE = "tpc.models_zoo.openvla"  # where the OpenVLA config class lives (it imports torch)
VisionConfigName = Literal["CLIPVisionConfig", "SiglipVisionConfig"]  # the config classes of the tiny encoders


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    summary: str
    make_config: Callable[[], PretrainedConfig]
    # what `tpc zoo` lists without making the config (no transformers): patch tokens, prefix (CLS) tokens and
    # encoder layers, as the family's `geometry(make_config())` states them (tests/test_startup.py checks it)
    patches: int
    prefix: int
    layers: int
    seed: int = 0
    # trained weights shipped in tpc/models_zoo/checkpoints/NAME (`tpc testbed train`), instead of a seeded init
    trained: bool = False

    @property
    def checkpoint(self) -> Path | None:
        return CHECKPOINTS / self.name if self.trained else None


def _transformers_config(name: VisionConfigName) -> type[CLIPVisionConfig] | type[SiglipVisionConfig]:
    import transformers

    return getattr(transformers, name)


def _tiny(config_class: VisionConfigName) -> Callable[[], PretrainedConfig]:
    # SiglipVisionConfig has no initializer_factor field: PreTrainedConfig keeps any extra keyword as an attribute
    # (strict(accept_kwargs=True)), which its dataclass signature does not say
    return lambda: _transformers_config(config_class)(  # type: ignore[call-arg]
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
    from transformers import LlamaConfig, LlavaConfig

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
    config = LlavaConfig(
        vision_config=_tiny("CLIPVisionConfig")().to_dict(),
        text_config=text.to_dict(),
        image_token_index=500,  # config.image_token_id (LlavaConfig.attribute_map)
        image_seq_length=256,
    )
    config.seg_token_id = 501  # a LISA-style [SEG] vocabulary entry: exports output its final hidden state (seg_hidden)
    return config


def _llava_bench() -> LlavaConfig:
    """LLaVA-1.5's token geometry (336 px / 14 -> 24x24 = 576 image tokens, CLIP layers 24, feature layer -2)
    at reduced width, so that on 2 CPU cores the decoder prefill dominates time to first token as the 7B decoder
    does on a GPU, and one prefill takes about a second."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

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
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000)


def _qwen_text(vocab: int, width: int, inner: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """A Qwen decoder's fields with M-RoPE sections for its head size (t, h, w of head_dim / 2 frequencies, in
    Qwen2.5-VL's 2:3:3 proportion)."""
    half = width // heads // 2
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sections},
        "initializer_range": 0.1 if width <= 128 else 0.05,  # peaked attention, as in a trained model
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _qwen_ids(vocab: int) -> dict[str, Any]:
    """Image, video and bracket ids at the top of a zoo Qwen's vocabulary."""
    return {
        "image_token_id": vocab - 1,
        "video_token_id": vocab - 2,
        "vision_start_token_id": vocab - 4,
        "vision_end_token_id": vocab - 3,
    }


QwenConfigT = TypeVar("QwenConfigT", bound="PretrainedConfig")


def _with_image_size(config: QwenConfigT, size: int) -> QwenConfigT:
    """The resolution exports of a zoo Qwen are built for, as tpc's field `vision_config.image_size`."""
    vision: Any = config.vision_config
    vision.image_size = size
    return config


def _tiny_qwen25vl() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL at toy width: 64 px / 4 px patches = 16x16 patches -> 8x8 = 64 merged tokens; a 4-block tower
    whose blocks 1 and 3 (0-based) attend fully and 0, 2 within 32 px windows (2x2 windows); a 4-layer decoder."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "in_channels": 3,
            "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 32,
            "out_hidden_size": 64, "fullatt_block_indexes": [1, 3], "initializer_range": 0.2,
        },
        text_config=_qwen_text(512, 64, 128, 4, 4, 2),
        **_qwen_ids(512),
    )  # fmt: skip
    return _with_image_size(config, 64)


def _tiny_qwen3vl() -> Qwen3VLConfig:
    """Qwen3-VL at toy width: 64 px / 4 px patches -> 8x8 = 64 merged tokens, a 4-block tower with DeepStack
    taps after blocks 1 and 2 (0-based) added after decoder layers 0 and 1 of 4."""
    from transformers import Qwen3VLConfig

    text = _qwen_text(512, 64, 128, 4, 4, 2)
    text["head_dim"] = 16
    text["rope_parameters"]["mrope_section"] = [4, 2, 2]  # Qwen3-VL interleaves t, h, w over head_dim / 2
    config = Qwen3VLConfig(
        vision_config={
            "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "in_channels": 3,
            "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [1, 2], "initializer_range": 0.2,
        },
        text_config=text,
        **_qwen_ids(512),
    )  # fmt: skip
    return _with_image_size(config, 64)


def _qwen25vl_bench() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B's token geometry: 448 px / 14 -> 32x32 patches -> 16x16 = 256 merged tokens, its 32-block
    windowed tower (112 px windows, full attention in blocks 7, 15, 23, 31) and its 36 decoder layers, at reduced
    widths (tower d=128, decoder d=512), so that one prefill takes about a second on 2 CPU cores with the decoder
    dominating, as the 3B decoder does."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 32, "hidden_size": 128, "intermediate_size": 512, "num_heads": 4, "in_channels": 3,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "out_hidden_size": 512, "fullatt_block_indexes": [7, 15, 23, 31], "initializer_range": 0.1,
        },
        text_config=_qwen_text(32000, 512, 1408, 36, 8, 2),
        **_qwen_ids(32000),
    )  # fmt: skip
    return _with_image_size(config, 448)


def _action_stats(dims: int = 7) -> dict[str, Any]:
    """Per-dataset action statistics in the release's `norm_stats` form (the gripper dimension is not normalised)."""
    low = [-0.03, -0.04, -0.03, -0.1, -0.1, -0.2, 0.0][:dims]
    high = [0.03, 0.04, 0.04, 0.1, 0.1, 0.2, 1.0][:dims]
    mid = [(a + b) / 2 for a, b in zip(low, high, strict=True)]
    return {
        "bridge_orig": {
            "action": {
                "mean": mid,
                "std": [(b - a) / 4 for a, b in zip(low, high, strict=True)],
                "min": [2 * a for a in low],
                "max": [2 * b for b in high],
                "q01": low,
                "q99": high,
                "mask": [True] * (dims - 1) + [False],
            },
            "num_transitions": 1000,
            "num_trajectories": 10,
        }
    }


def _fused_towers(width: int, depths: tuple[int, int], heads: int, inner: int) -> list[dict[str, int | str]]:
    """A DINOv2 (4 registers) + SigLIP pair at 224 px / 14 (16x16 patches), both of one width."""
    common = {"hidden_size": width, "num_heads": heads, "intermediate_size": inner, "patch_size": 14}
    return [
        {"family": "dinov2", "num_layers": depths[0], "registers": 4, **common},
        {"family": "siglip", "num_layers": depths[1], **common},
    ]


class _DecoderShape(TypedDict):
    """A zoo policy's Llama decoder, as `LlamaConfig` fields."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    initializer_range: float


def _openvla(towers: list[dict[str, int | str]], pad_id: int, **text: Unpack[_DecoderShape]) -> OpenVlaConfig:
    """A policy config: the towers, a Llama decoder whose vocabulary ends with 64 padding ids after `pad_id`."""
    from transformers import LlamaConfig

    llama = LlamaConfig(vocab_size=pad_id + 64, max_position_embeddings=2048, pad_token_id=pad_id, **text)
    # the family's module imports torch
    config_class: type[OpenVlaConfig] = importlib.import_module(OPENVLA_MODULE).OpenVlaConfig
    return config_class(
        text_config=llama.to_dict(), norm_stats=_action_stats(), pad_token_id=pad_id, tower_specs=towers
    )


def _shipped(name: str) -> Callable[[], PretrainedConfig]:
    """The config.json of a trained checkpoint that ships with tpc."""

    def make() -> PretrainedConfig:
        from transformers import AutoConfig

        config: PretrainedConfig = AutoConfig.from_pretrained(str(CHECKPOINTS / name), local_files_only=True)
        return config

    return make


def _clip_vit_l_336() -> PretrainedConfig:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        projection_dim=768,
        initializer_factor=4.0,
    )


def _tiny_openvla() -> OpenVlaConfig:
    """The release's structure at toy width: two 3-block towers (224 px, 16x16 patches), a 4-layer Llama (prune
    layer 3 as the reference, history layer 3: the last), vocabulary 512 + 64 padding (actions: the last 256 of 512).
    A control step is one graph with its 7 decoder passes unrolled, so depth is what export time scales with."""
    towers = _fused_towers(width=32, depths=(3, 3), heads=2, inner=64)
    return _openvla(
        towers, pad_id=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.1,
    )  # fmt: skip


def _openvla_bench() -> OpenVlaConfig:
    """OpenVLA-7B's token geometry (256 image tokens, a ~280-token prompt, a 32064-id vocabulary) at reduced size:
    towers of the release's depths (24 and 27 blocks) at d=256 and an 8-layer Llama at d=1024 (prune layer 3 as
    the reference; history layer 7, the last), so that one control step takes about a second on 2 CPU cores with
    the decoder dominating, as the 7B decoder does. Depth is kept low because a step is one graph with its 7
    decoder passes unrolled, and export time grows with it."""
    towers = _fused_towers(width=256, depths=(24, 27), heads=4, inner=1024)
    return _openvla(
        towers, pad_id=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, initializer_range=0.05,
    )  # fmt: skip


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            "tiny-clip", "clip", "CLIP ViT, 4 layers, 16x16 patches + CLS, d=64", _tiny("CLIPVisionConfig"), 256, 1, 4
        ),
        ZooEntry(
            "tiny-siglip", "siglip", "SigLIP ViT, 4 layers, 16x16 patches, d=64", _tiny("SiglipVisionConfig"), 256, 0, 4
        ),
        ZooEntry(
            "clip-vit-l-336",
            "clip",
            "CLIP ViT-L/14-336 geometry (LLaVA-1.5's tower): 24 layers, 24x24 patches + CLS, d=1024",
            _clip_vit_l_336,
            576,
            1,
            24,
        ),
        ZooEntry(
            "tiny-llava", "llava", "LLaVA: tiny-clip tower, MLP projector, 4-layer Llama d=64", _tiny_llava, 256, 1, 4
        ),
        ZooEntry(
            "llava-bench",
            "llava",
            "LLaVA-1.5 token geometry (576 image tokens), narrow CLIP tower, 12-layer Llama d=768 (benchmarks)",
            _llava_bench,
            576,
            1,
            24,
        ),
        ZooEntry(
            "tiny-qwen25vl",
            "qwen2_5_vl",
            "Qwen2.5-VL: 4-block windowed tower d=32, 2x2 merger (64 image tokens), 4-layer M-RoPE decoder d=64",
            _tiny_qwen25vl,
            256,
            0,
            4,
        ),
        ZooEntry(
            "tiny-qwen3vl",
            "qwen3_vl",
            "Qwen3-VL: 4-block tower d=32 with DeepStack, 2x2 merger (64 image tokens), 4-layer decoder d=64",
            _tiny_qwen3vl,
            256,
            0,
            4,
        ),
        ZooEntry(
            "qwen25vl-bench",
            "qwen2_5_vl",
            "Qwen2.5-VL-3B token geometry (448 px, 256 image tokens), 32-block tower d=128, 36-layer decoder d=512",
            _qwen25vl_bench,
            1024,
            0,
            32,
        ),
        ZooEntry(
            "tiny-openvla",
            "openvla",
            "OpenVLA policy: DINOv2 + SigLIP towers (3 blocks, d=32), fused projector, 4-layer Llama d=64",
            _tiny_openvla,
            256,
            0,
            3,
        ),
        ZooEntry(
            "openvla-bench",
            "openvla",
            "OpenVLA-7B token geometry (256 image tokens, ~280-token prompt), narrow towers, 8-layer Llama d=1024",
            _openvla_bench,
            256,
            0,
            24,
        ),
        ZooEntry(
            "fmnist-vit",
            "clip",
            "trained on Fashion-MNIST (tpc testbed train), 85.8 % top-1: CLIP classifier, 14x14 patches + CLS",
            _shipped("fmnist-vit"),
            196,
            1,
            4,
            trained=True,
        ),
        ZooEntry(
            "fmnist-llava",
            "llava",
            "trained on Fashion-MNIST, 84.9 % top-1: fmnist-vit's tower, projector, 4-layer Llama naming the class",
            _shipped("fmnist-llava"),
            196,
            1,
            4,
            trained=True,
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("TPC_CACHE_DIR", Path.home() / ".cache" / "tpc"))


def _fingerprint(entry: ZooEntry) -> str:
    config = entry.make_config().to_dict()
    payload = json.dumps({"config": config, "seed": entry.seed}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


class BuildsModels(Protocol):
    """What `materialize` needs of a family adapter: its model class (and a `save` of its own, if it has one)."""

    @property
    def model_class(self) -> type[PreTrainedModel]: ...


def materialize(entry: ZooEntry, adapter: BuildsModels) -> Path:
    """Directory holding the entry's config.json + model.safetensors (saved by `adapter`, the entry's family
    adapter); built once, then reused. A trained entry's is the checkpoint that ships with tpc."""
    if entry.checkpoint is not None:
        return entry.checkpoint
    import torch

    target = cache_root() / "zoo" / f"{entry.name}-{_fingerprint(entry)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(entry.seed)
    model = adapter.model_class(entry.make_config())
    # a family whose checkpoints have their own layout (OpenVLA's release) saves in it; others as transformers does
    save = getattr(adapter, "save", None) or (lambda model, path: model.save_pretrained(path))
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        save(model, staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
