"""Greedy generation over a VLM export's components, with numpy arrays only.

The loop is the deployment protocol written in tpc.json (`generation.protocol`): vision once, prefill once,
then one decode call per new token feeding the cache back. It takes the components as callables
(name -> outputs), so the same loop drives an exported artifact in its runtime and the eager PyTorch
components that verification compares it with.

`generate` takes numpy arrays or torch tensors (`tpc.runtimes.inputs`): pixel values of any float dtype, converted
to the vision graph's; integer prompt ids of the export's static layout, each inside the vocabulary (or the image
token id). Loaded from an export (`VLM.load`), the shapes, dtypes and the vocabulary come from its tpc.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tpc.contract.names import IMAGE_EMBEDS, INPUT_IDS, LOGITS, SEG_HIDDEN, STEP_INPUT
from tpc.contract.protocols import GenerationProtocol
from tpc.errors import UsageError
from tpc.runtimes.base import RunComponent, load_export
from tpc.runtimes.inputs import Shape, check_floats, check_ids, resolve_strict

if TYPE_CHECKING:
    from tpc.contract.manifest import ComponentSpec, Manifest


def _runs(images: int, count: int) -> str:
    return f"{count} image tokens" if images == 1 else f"{images} x {count} image tokens"


def _positions(starts: tuple[int, ...], count: int) -> str:
    """Where the image runs sit: "35..290" or "35..290, 299..554, ..."."""
    return ", ".join(f"{start}..{start + count - 1}" for start in starts)


def prefill_ids(generation: GenerationProtocol, input_ids: np.ndarray) -> np.ndarray:
    """The prompt as the prefill graph takes it: each image's run shortened to the image embeddings it receives.

    Raises UsageError unless the prompt has the export's static layout.
    """
    prompt = generation.prompt
    starts, count, image_id = prompt.starts, prompt.image_tokens, generation.image_token_id
    if input_ids.ndim != 2 or input_ids.shape[1] != prompt.length:
        raise UsageError(
            f"input_ids has shape {list(input_ids.shape)}; this export takes (batch, {prompt.length}): "
            f"{prompt.text_tokens} text tokens and {_runs(len(starts), count)} (re-export with --prompt-len to change "
            "it)"
        )
    is_image = input_ids == image_id
    in_place = all(is_image[:, start : start + count].all() for start in starts)
    if not in_place or is_image.sum(axis=1).max() != count * len(starts):
        how_many = "one run" if len(starts) == 1 else f"{len(starts)} runs"
        raise UsageError(
            f"input_ids must hold exactly {how_many} of {count} image tokens (id {image_id}) at positions "
            f"{_positions(starts, count)}, as the export's static prompt layout says"
        )
    kept = generation.prefill.image_tokens // len(starts)
    pieces, position = [], 0
    for start in starts:
        pieces.append(input_ids[:, position : start + kept])
        position = start + count
    return np.concatenate([*pieces, input_ids[:, position:]], axis=1)


def vocab_size(components: Sequence[ComponentSpec]) -> tuple[int | None, str]:
    """The decoder's vocabulary size and where it came from: the last axis of the prefill graph's `logits` output
    (one score per token of the vocabulary)."""
    for component in components:
        for output in component.outputs if component.name == "prefill" else ():
            if output.name == "logits":
                return int(output.shape[-1]), "the width of the prefill graph's logits"
    return None, ""


class GenerationLoop:
    """`components`: vision, prefill, decode (name -> callable). `pixel_spec`: the vision graph's `pixel_values`
    (shape, dtype) and `vocab`: the vocabulary size, both from the export's manifest (`VLM.load`); without them
    (eager components) any batch and image size pass and the dtype is kept. `strict`: NaN/inf pixels raise
    instead of warning."""

    def __init__(
        self,
        components: Mapping[str, RunComponent],
        generation: GenerationProtocol,
        pixel_spec: tuple[Sequence[int], str] | None = None,
        vocab: tuple[int | None, str] = (None, ""),
        strict: bool = False,
    ) -> None:
        self.components = components
        self.generation = generation
        self.pixel_spec = pixel_spec
        self.vocab = vocab
        self.strict = strict

    @property
    def images(self) -> int:
        return len(self.generation.prompt.starts)

    def check_inputs(
        self, pixel_values: Any, input_ids: Any, strict: bool | None = None, stacklevel: int = 3
    ) -> tuple[np.ndarray, ...]:
        """(pixel_values, input_ids) as the graphs take them, or one UsageError line naming the expected layout
        (`stacklevel`: where a non-finite-pixel warning points, counted from `check_floats`)."""
        prompt, image_id = self.generation.prompt, self.generation.image_token_id
        starts, count = prompt.starts, prompt.image_tokens
        shape: Shape
        shape, dtype = self.pixel_spec if self.pixel_spec else ((None, None, None, None), None)
        what = "batch, channels, height, width: the processor's normalised image"
        if self.images > 1:  # one image per run, in prompt order
            shape = [shape[0], self.images, *shape[1:]]
            what = f"batch, {self.images} images (the examples', then the query's), channels, height, width"
        pixels = check_floats(
            pixel_values, "pixel_values", shape, dtype, what, resolve_strict(strict, self.strict), stacklevel
        )
        layout = (
            f"batch, {prompt.length} = {prompt.text_tokens} text + {_runs(len(starts), count)} (id {image_id}) at "
            f"positions {_positions(starts, count)}; re-export with --prompt-len to change the text length"
        )
        size, source = self.vocab
        ids = check_ids(input_ids, "input_ids", (pixels.shape[0], prompt.length), layout, size, source, (image_id,))
        return pixels, ids

    def encode_images(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """The vision graph once per image (the same static graph as for one image; examples could be cached),
        its outputs concatenated along the token axis in prompt order: what the prefill takes from it."""
        per_image = pixel_values[:, None] if self.images == 1 else pixel_values
        outputs = [self.components["vision"]({"pixel_values": per_image[:, i]}) for i in range(self.images)]
        names = (IMAGE_EMBEDS, *(self.generation.vision_to_prefill or ()))
        return {name: np.concatenate([out[name] for out in outputs], axis=1) for name in names}

    def generate(
        self,
        pixel_values: Any,
        input_ids: Any,
        max_new_tokens: int | None = None,
        stop_at_eos: bool = True,
        strict: bool | None = None,
    ) -> np.ndarray:
        """Greedy tokens (B, n) after the prompt; n <= max_new_tokens, fewer if every row ended with EOS.

        `pixel_values`: (B, C, H, W) (a prompt of several images: (B, images, C, H, W), in prompt order), any float
        dtype, numpy or torch. `input_ids`: the prompt as transformers' processor makes it (each image expanded to
        its image tokens), of the export's static length. Rows that ended are padded with their EOS, as `generate`
        pads them. `strict`: NaN/inf pixels raise instead of warning (default: the loop's `strict`).
        """
        return self._generate(pixel_values, input_ids, max_new_tokens, stop_at_eos, strict)[0]

    def generate_with_hidden(
        self,
        pixel_values: Any,
        input_ids: Any,
        max_new_tokens: int | None = None,
        stop_at_eos: bool = True,
        strict: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`generate`'s tokens (B, n) and, when the export outputs `seg_hidden`, the decoder's final hidden state of
        every token it was fed (B, n, D): [:, 0] the prompt's last token, [:, t] generated token t (t < n; the last
        one is never fed). Where a token is the [SEG] token, that is what a SAM-style mask decoder consumes."""
        return self._generate(pixel_values, input_ids, max_new_tokens, stop_at_eos, strict)

    def first_logits(self, pixel_values: Any, input_ids: Any, strict: bool | None = None) -> np.ndarray:
        """The prefill's logits (B, vocabulary) for the token after the prompt (greedy's first token is their
        argmax): how `tpc eval` reads a VLM's one-word answer, with the margin to the runner-up."""
        return self._prefill(pixel_values, input_ids, strict, stacklevel=4)[LOGITS]

    def _prefill(
        self, pixel_values: Any, input_ids: Any, strict: bool | None, stacklevel: int
    ) -> dict[str, np.ndarray]:
        """Vision then prefill on checked inputs: the prefill's outputs, and the ids it took (`input_ids`).
        `stacklevel` makes a warning point at the caller of generate / generate_with_hidden / first_logits."""
        pixel_values, input_ids = self.check_inputs(pixel_values, input_ids, strict, stacklevel=stacklevel)
        ids = prefill_ids(self.generation, input_ids)
        return {**self.components["prefill"]({INPUT_IDS: ids, **self.encode_images(pixel_values)}), INPUT_IDS: ids}

    def _generate(
        self, pixel_values: Any, input_ids: Any, max_new_tokens: int | None, stop_at_eos: bool, strict: bool | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        limit = self.generation.max_new_tokens
        steps = limit if max_new_tokens is None else max_new_tokens
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= limit:
            raise UsageError(
                f"max_new_tokens {steps!r} is not an integer in 1..{limit}, the cache size this export was built for"
            )
        eos = np.asarray(self.generation.eos_token_ids if stop_at_eos else [], dtype=np.int64)
        out = self._prefill(pixel_values, input_ids, strict, stacklevel=5)
        ids = out[INPUT_IDS]
        tokens: list[np.ndarray] = []
        hidden: list[np.ndarray] = []
        finished = np.zeros(ids.shape[0], dtype=bool)
        for step in range(steps):
            if SEG_HIDDEN in out:
                hidden.append(out[SEG_HIDDEN])
            token = out[LOGITS].argmax(axis=-1).astype(np.int64)
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
            inputs = {INPUT_IDS: token[:, None], STEP_INPUT: np.array([step], dtype=np.int64), **past}
            out = self.components["decode"](inputs)
        return np.stack(tokens, axis=1), np.stack(hidden, axis=1) if hidden else None


class VLM(GenerationLoop):
    """An exported VLM, loaded in the runtime of its target: `VLM.load(DIR).generate(pixel_values, input_ids)`."""

    def __init__(self, components: Mapping[str, RunComponent], manifest: Manifest, strict: bool = False) -> None:
        generation = manifest.generation
        assert generation is not None, "a VLM export's manifest has its generation section (load_export checks it)"
        vision = next(c for c in manifest.components if c.name == "vision")
        pixels = next(s for s in vision.inputs if s.name == "pixel_values")
        vocab = vocab_size(manifest.components)
        super().__init__(components, generation, (pixels.shape, pixels.dtype), vocab, strict)
        self.manifest = manifest

    @classmethod
    def load(cls, directory: str | Path, strict: bool = False) -> VLM:
        """Open the export's vision, prefill and decode graphs in its target's runtime. `strict`: NaN/inf pixel
        values raise a UsageError instead of a `NonFiniteInputWarning`."""
        manifest, runs = load_export(directory, "generation")
        return cls(runs, manifest, strict)
