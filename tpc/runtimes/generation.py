"""Greedy generation over a VLM export's components, with numpy arrays only.

The loop is the deployment protocol written in tpc.json (`generation.protocol`): vision once, prefill once,
then one decode call per new token feeding the cache back. It takes the components as callables
(name -> outputs), so the same loop drives an exported artifact in its runtime and the eager PyTorch
components that verification compares it with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tpc.errors import UsageError

RunComponent = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def prefill_ids(generation: dict[str, Any], input_ids: np.ndarray) -> np.ndarray:
    """The prompt as the prefill graph takes it: the image run shortened to the image embeddings it receives.

    Raises UsageError unless the prompt has the export's static layout.
    """
    prompt = generation["prompt"]
    start, count, image_id = prompt["image_start"], prompt["image_tokens"], generation["image_token_id"]
    if input_ids.ndim != 2 or input_ids.shape[1] != prompt["length"]:
        raise UsageError(
            f"input_ids has shape {list(input_ids.shape)}; this export takes (batch, {prompt['length']}): "
            f"{prompt['text_tokens']} text tokens and {count} image tokens (re-export with --prompt-len to change it)"
        )
    is_image = input_ids == image_id
    if not is_image[:, start : start + count].all() or is_image.sum(axis=1).max() != count:
        raise UsageError(
            f"input_ids must hold exactly one run of {count} image tokens (id {image_id}) at positions "
            f"{start}..{start + count - 1}, as the export's static prompt layout says"
        )
    kept = generation["prefill"]["image_tokens"]
    return np.concatenate([input_ids[:, : start + kept], input_ids[:, start + count :]], axis=1)


class GenerationLoop:
    def __init__(self, components: Mapping[str, RunComponent], generation: dict[str, Any]) -> None:
        self.components = components
        self.generation = generation

    def generate(
        self,
        pixel_values: np.ndarray,
        input_ids: np.ndarray,
        max_new_tokens: int | None = None,
        stop_at_eos: bool = True,
    ) -> np.ndarray:
        """Greedy tokens (B, n) after the prompt; n <= max_new_tokens, fewer if every row ended with EOS.

        `input_ids`: the prompt as transformers' processor makes it (the image expanded to its image tokens),
        of the export's static length. Rows that ended are padded with their EOS, as `generate` pads them.
        """
        limit = self.generation["max_new_tokens"]
        steps = limit if max_new_tokens is None else max_new_tokens
        if not 1 <= steps <= limit:
            raise UsageError(f"max_new_tokens {steps} is outside 1..{limit}, the cache size this export was built for")
        eos = np.asarray(self.generation["eos_token_ids"] if stop_at_eos else [], dtype=np.int64)
        image_embeds = self.components["vision"]({"pixel_values": pixel_values})["image_embeds"]
        ids = prefill_ids(self.generation, np.asarray(input_ids, dtype=np.int64))
        out = self.components["prefill"]({"input_ids": ids, "image_embeds": image_embeds})
        tokens: list[np.ndarray] = []
        finished = np.zeros(ids.shape[0], dtype=bool)
        for step in range(steps):
            token = out["logits"].argmax(axis=-1).astype(np.int64)
            if tokens and eos.size:
                token = np.where(finished, tokens[-1], token)
            tokens.append(token)
            finished |= np.isin(token, eos)
            if finished.all() or step == steps - 1:
                break
            past = {
                name.replace("present.", "past.", 1): value
                for name, value in out.items()
                if name.startswith("present.")
            }
            inputs = {"input_ids": token[:, None], "step": np.array([step], dtype=np.int64), **past}
            out = self.components["decode"](inputs)
        return np.stack(tokens, axis=1)


class VLM(GenerationLoop):
    """An exported VLM, loaded in the runtime of its target: `VLM.load(DIR).generate(pixel_values, input_ids)`."""

    def __init__(self, components: Mapping[str, RunComponent], manifest: Any) -> None:
        super().__init__(components, manifest.generation)
        self.manifest = manifest

    @classmethod
    def load(cls, directory: str | Path) -> VLM:
        from tpc.runtimes.base import load_components

        manifest, runs = load_components(directory, "generation", "a VLM")
        return cls(runs, manifest)
