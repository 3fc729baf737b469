"""The names of the export contract: what a graph's inputs and outputs, its components and its cache are called.

Every layer agrees on these through this one module (the leaf of tpc's layering, see docs/architecture.md): the
passes that build graphs, the targets that write them, the runtimes that run them on a device without PyTorch,
and verification, which compares them by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

MANIFEST_FILE = "tpc.json"  # what makes a directory an export (tpc.contract.manifest reads and writes it)

# what every selecting graph outputs (and teacher forcing feeds back as an input): the kept image tokens of each
# prune transition of the method's schedule, each run ascending, concatenated in schedule order
KEPT_INDICES = "kept_indices"

PIXEL_VALUES, INPUT_IDS, IMAGE_EMBEDS, LOGITS = "pixel_values", "input_ids", "image_embeds", "logits"
STEP_INPUT = "step"  # a static decode call's step index (0, 1, ...): where it writes the cache
# a VLM with a LISA-style [SEG] token: the decoder's final hidden state of the token fed (prefill: the prompt's last;
# decode: the token given), what a SAM-style mask decoder consumes at a [SEG] token
SEG_HIDDEN = "seg_hidden"
# a vision graph's CLS-row attention to each patch, handed to a prefill whose method samples by it (LVLM_CSP)
CLS_ATTENTION = "cls_attention"
# an M-RoPE (Qwen-VL) vision graph's (t, h, w) position of each image token handed on, relative to the image's first
# position, and Qwen3-VL's DeepStack features of those tokens (B, K, levels, D): both handed to the prefill
IMAGE_POSITIONS, DEEPSTACK_EMBEDS = "image_positions", "deepstack_embeds"
# HiPrune-Qwen's exact count (`qwen_duplicates=reference`): which of the K slots handed on the reference keeps (B, K)
# int64 1/0, and the key mask it becomes in the cache (B, capacity), fed back to decode like the cache itself
IMAGE_VALID, PRESENT_VALID, PAST_VALID = "image_valid", "present.valid", "past.valid"

# components: an encoder export's one graph; a VLM's three; a policy's step graph(s)
SINGLE = "model"
VISION, PREFILL, DECODE = "vision", "prefill", "decode"
WARMUP, PRUNED, STEP = "warmup", "pruned", "step"

# a policy step's outputs and state (VLA-Pruner's action-attention history)
ACTION_OUTPUT, IMPORTANCE_OUTPUT, HISTORY_INPUT, HISTORY_OUTPUT = (
    "action_tokens",
    "action_importance",
    "history",
    "history_next",
)
# a staged policy step (prefill and decode methods): the greedy token each stage returns, the action-attention row
TOKEN, ACTION_ATTENTION = "token", "action_attention"


def cache_names(prefix: str, num_layers: int) -> tuple[str, ...]:
    """`present.0.key`, `present.0.value`, ... (Optimum's naming), or with prefix `past`."""
    return tuple(f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value"))


def stage_method(component: str, stage: str) -> str:
    """The method (and sample directory) name of one stage of a component: `pruned_prefill`, `step_decode`."""
    return f"{component}_{stage}"


class Session(Protocol):
    """Something that runs one component: a runtime's loaded graph, or a staged step driving two of them."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# tpc's stages, the unit `tpc profile` reports time and `cost` (tpc.json) reports FLOPs and bytes in: a runtime's
# per-operator profile is grouped into them, and a stage's measured FLOP rate in the unpruned export is what the
# calibrated ideal speedup divides the pruned export's FLOPs by. `prefill_before` / `prefill_after`: the decoder
# layers before / after the prune point (a vision-side method prunes before layer 0: all its layers are `after`)
TOWER, TAPS, SELECT, PROJECTOR, EMBED = "tower", "taps", "select", "projector", "embed"
PREFILL_BEFORE, PREFILL_AFTER, LM_HEAD, DECODE_STEP, OTHER = (
    "prefill_before",
    "prefill_after",
    "lm_head",
    "decode",
    "other",
)
STAGES = (TOWER, TAPS, SELECT, PROJECTOR, EMBED, PREFILL_BEFORE, PREFILL_AFTER, LM_HEAD, DECODE_STEP, OTHER)
