"""Where the FLOPs of one unpruned call go, stage by stage: the bench models against the real models they imitate.

Why this exists: a bench model (zoo `llava-bench`, `qwen25vl-bench`, `openvla-bench`) keeps its real model's token
geometry at reduced width, so that its exports time in seconds on 2 CPU cores. Whether its measured speedups say
anything about the real model depends on how its time splits between what pruning shrinks (the decoder on the image
tokens) and what it does not (the tower, the text tokens, the LM head): this script sets the two splits side by side,
from the plans alone (tpc.pipeline.plan + the kinds' stage costs, tpc.json's `cost`), no weights loaded.

The headline is what `tpc profile` times as one call: a VLM's time to first token (vision + prefill), a policy's
control step (towers, prefill and the unrolled decode of its action tokens). For each model: its GFLOPs, each
stage's share, the floor share (the FLOPs no pruning of visual tokens removes: an upper bound of the speedup is
1 / floor share) and each stage's share of the bytes moved (weights read, activations and K/V cache).

Real models are built from their published configs (config only): LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B),
Qwen2.5-VL-3B (at 448 px, the bench's 256 image tokens), OpenVLA-7B (DINOv2 ViT-L/14 + SigLIP SO400M/14 +
Llama-2-7B). Writes results/stage_shares.json; prints the table. Seconds, CPU only.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, PretrainedConfig, Qwen2_5_VLConfig

from tpc.contract.cost import StageCost
from tpc.contract.names import STAGES
from tpc.kinds import KINDS
from tpc.models_zoo import ModelSource, adapter_for_family, resolve
from tpc.pipeline import PruneRequest, kind_for, plan

RESULTS = Path(__file__).resolve().parent / "results"


def llava_15_7b() -> PretrainedConfig:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (feature layer -2, CLS dropped: 576 tokens) + Vicuna-7B."""
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000)


def qwen25_vl_3b() -> PretrainedConfig:
    """Qwen/Qwen2.5-VL-3B-Instruct: a 32-block windowed tower d=1280 (full attention in blocks 7, 15, 23, 31), a
    2x2 merger to d=2048, a 36-layer decoder d=2048 with 16 query and 2 KV heads; at 448 px (256 image tokens)."""
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "out_hidden_size": 2048, "fullatt_block_indexes": [7, 15, 23, 31],
        },
        text_config={
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "bos_token_id": 151643, "eos_token_id": 151645,
        },
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )  # fmt: skip
    vision: Any = config.vision_config
    vision.image_size = 448  # tpc's field: the resolution an export is built for
    return config


def openvla_7b() -> PretrainedConfig:
    """openvla/openvla-7b: DINOv2 ViT-L/14 (4 registers) + SigLIP SO400M/14 at 224 px (256 image tokens), the fused
    MLP projector, Llama-2-7B with 64 padding ids (actions: the last 256 ids of its 32000)."""
    towers = [
        {"family": "dinov2", "num_layers": 24, "registers": 4, "hidden_size": 1024, "num_heads": 16,
         "intermediate_size": 4096, "patch_size": 14},
        {"family": "siglip", "num_layers": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
         "patch_size": 14},
    ]  # fmt: skip
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=2048, pad_token_id=32000,
    )  # fmt: skip
    config_class = importlib.import_module("tpc.models_zoo.openvla").OpenVlaConfig
    stats = resolve("zoo:openvla-bench").config.norm_stats  # the zoo's statistics: planning never reads them
    return config_class(text_config=text.to_dict(), norm_stats=stats, pad_token_id=32000, tower_specs=towers)


@dataclass(frozen=True)
class Pair:
    bench: str  # zoo name
    real: str  # what it imitates
    family: str
    make_real: Callable[[], PretrainedConfig]


PAIRS = (
    Pair("llava-bench", "LLaVA-1.5-7B", "llava", llava_15_7b),
    Pair("qwen25vl-bench", "Qwen2.5-VL-3B (448 px)", "qwen2_5_vl", qwen25_vl_3b),
    Pair("openvla-bench", "OpenVLA-7B", "openvla", openvla_7b),
)


def headline_costs(source: ModelSource) -> tuple[str, list[StageCost]]:
    """The unpruned headline's stage costs (batch 1, fp32) and the kind's name."""
    the_plan = plan(PruneRequest(source.ref, "none", None), source)
    kind = kind_for(source)
    costs = kind.stage_costs(the_plan)
    record = KINDS[source.adapter.kind]
    headline = record.headline(list(dict.fromkeys(c.component for c in costs)))
    return record.name, [c for c in costs if c.component in headline]


def shares(name: str, imitates: str, kind: str, costs: list[StageCost]) -> dict:
    flops = sum(c.flops for c in costs)
    moved = sum(c.bytes for c in costs)
    by_stage = {s: sum(c.flops for c in costs if c.stage == s) for s in STAGES}
    bytes_by_stage = {s: sum(c.bytes for c in costs if c.stage == s) for s in STAGES}
    return {
        "model": name,
        "imitates": imitates,
        "kind": kind,
        "headline": sorted({c.component for c in costs}),
        "gflops": flops / 1e9,
        "flops_share": {s: v / flops for s, v in by_stage.items() if v},
        "floor_share": sum(c.floor_flops for c in costs) / flops,
        "bytes_gib": moved / 2**30,
        "bytes_share": {s: v / moved for s, v in bytes_by_stage.items() if v},
    }


def table(rows: list[dict]) -> Table:
    stages = [s for s in STAGES if any(s in r["flops_share"] for r in rows)]
    out = Table(title="FLOPs share per stage of one unpruned call (headline), and the floor no pruning removes")
    for column in ("model", "GFLOPs", *stages, "floor"):
        out.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        cells = [f"{100 * r['flops_share'].get(s, 0):.2f} %" for s in stages]
        out.add_row(r["model"], f"{r['gflops']:.1f}", *cells, f"{100 * r['floor_share']:.1f} %")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for pair in PAIRS:
        bench = resolve(f"zoo:{pair.bench}")
        kind, costs = headline_costs(bench)
        rows.append(shares(pair.bench, pair.real, kind, costs))
        real = ModelSource(pair.real, adapter_for_family(pair.family), pair.make_real())
        kind, costs = headline_costs(real)
        rows.append(shares(pair.real, pair.real, kind, costs))
    args.output.mkdir(parents=True, exist_ok=True)
    result = {
        "what": "FLOPs (and bytes) share of each stage of one unpruned headline call, batch 1, fp32, from the plans",
        "models": rows,
    }
    (args.output / "stage_shares.json").write_text(json.dumps(result, indent=2) + "\n")
    Console(width=160).print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
