"""A token schedule: which image tokens each decoder layer sees, as data a method declares.

The decoder's layers form contiguous ranges; each range sees a static number of image tokens, and a transition
between two ranges either *prunes* (keeps `keep` of the tokens present of some images, chosen by the method's
priorities from signals tapped on the layers before it) or *re-admits* (every image token dropped earlier comes
back, with the hidden state it had when it was dropped, or its representative's update). A vision-side method's
schedule has no transition: the decoder starts with K tokens per image. FastV and VLA-Pruner have one prune
transition at their layer K; CATP prunes each image at layer 0, the example images together at K and the query
image at K+1; LVLM_CSP prunes to representatives at layer 0, re-admits every token, and prunes again. A prompt
of several images splits the image tokens into blocks: an image, or the images one prune chose among (their total
is static, each one's share is not). Everything static about a decoder export derives from the schedule:
per-layer cache lengths and capacities, the width of `kept_indices`, FLOPs per layer range, and `tpc inspect`'s
"tokens per layer". Kept tokens keep their original position ids unless a prune renumbers them (CATP's
`positions=compact`).

Pure data: no torch. `tpc.passes.decoder` is the one decoder rewrite that runs a schedule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

if TYPE_CHECKING:
    from torch import Tensor

# which query rows of the tapped layer's attention a prune scores with: the last prompt token's, every row's mean,
# or the mean of a token span's rows (`Prune.span`)
LAST_ROW, ALL_ROWS, SPAN_ROWS = "last-row", "all-rows", "span-rows"
ROWS = (LAST_ROW, ALL_ROWS, SPAN_ROWS)
FROZEN = "frozen"  # a re-admitted token's hidden state: the one it had when it was dropped
# ... or its embedding plus the update its nearest representative (a token present until the re-admit) received
REPRESENTATIVE = "representative"
READMIT_STATES = (FROZEN, REPRESENTATIVE)


@dataclass(frozen=True)
class PrefillSignals:
    """What a prune transition of a decoder schedule may read at its layer K (0-based), over the image tokens of
    the images it prunes that are present there (N_p of them, in original order)."""

    scores: Tensor  # (B, N_p) attention to each present image token at layer K-1, head mean, reduced by the rows
    image_embeds: Tensor  # (B, N_p, D) their LLM input embeddings (layer 0's input)
    guide: Tensor | None = None  # (B, N_p) a stateful method's guide from earlier control steps
    hidden: Tensor | None = None  # (B, N_p, D) their hidden states entering layer K
    previous_scores: Tensor | None = None  # (B, N_p) the same reduction at layer K-2 (`Prune.previous`)
    context: Tensor | None = None  # (B, L, D) the whole sequence's hidden states entering layer K (text included)
    positions: Tensor | None = None  # (B, L) the prompt position each token of `context` had in the prompt
    previous_context: Tensor | None = None  # (B, L, D) the sequence entering layer K-1 (None at layer 0)
    previous_hidden: Tensor | None = None  # (B, N_p, D) the pruned images' present tokens entering layer K-1


@dataclass(frozen=True)
class PromptImages:
    """Where the image runs sit in the prompt the decoder receives: each image's first position and token count
    (prompt order), and the prompt's length. Text is everything else; image i's text is what follows it up to the
    next image (the query image's: up to the prompt's end)."""

    starts: tuple[int, ...]
    tokens: tuple[int, ...]
    length: int

    def __post_init__(self) -> None:
        ends = [start + count for start, count in zip(self.starts, self.tokens, strict=True)]
        if any(e > s for e, s in zip(ends, self.starts[1:], strict=False)) or (ends and ends[-1] > self.length):
            raise ValueError(f"image runs {list(zip(self.starts, self.tokens, strict=True))} overlap or overrun")

    @property
    def image_tokens(self) -> int:
        return sum(self.tokens)

    def span(self, image: int) -> tuple[int, int]:
        """Image `image`'s positions start..stop-1."""
        return self.starts[image], self.starts[image] + self.tokens[image]

    def text_after(self, image: int) -> tuple[int, int]:
        """The text that follows image `image`: up to the next image or the prompt's end."""
        stop = self.starts[image + 1] if image + 1 < len(self.starts) else self.length
        return self.span(image)[1], stop

    def first_index(self, image: int) -> int:
        """The index of image `image`'s first token among all image tokens (images concatenated in prompt order)."""
        return sum(self.tokens[:image])


@dataclass(frozen=True)
class Prune:
    """At decoder layer `layer` (0-based), keep `keep` of the image tokens present of the images `images` (0-based,
    prompt order; None: every image, one selection over all of them).

    The priorities come from `priority` (None: the method's own) over `PrefillSignals` whose `scores` are the
    attention of layer `layer - 1` reduced by `rows` (None: the prune reads no attention, zeros; zeros at layer 0,
    where nothing was tapped yet; with `rows` SPAN_ROWS, the mean of the query rows `span` = (start, stop) of the
    prompt, in its original positions, a span of text tokens), `previous_scores` the same reduction of layer
    `layer - 2` when `previous` (the change between two layers), `hidden` the present image tokens' hidden states
    entering the layer and `context` the whole sequence's. With `renumber`, the tokens present after this layer's
    transitions take the position ids 0, 1, ... in order (as if the dropped tokens had never been in the prompt);
    otherwise every token keeps its original position id.
    """

    layer: int
    keep: int
    rows: str | None = LAST_ROW
    priority: Callable[[PrefillSignals, int, dict[str, Any]], Tensor] | None = None
    span: tuple[int, int] | None = None
    previous: bool = False
    images: tuple[int, ...] | None = None
    renumber: bool = False


@dataclass(frozen=True)
class Readmit:
    """At decoder layer `layer`, every image token comes back; one dropped earlier re-enters with its hidden state
    as it was when it was dropped (`state` FROZEN), or, dropped at layer 0, with its embedding plus the update its
    nearest representative (by embedding cosine, among the image tokens present until here) received meanwhile
    (`state` REPRESENTATIVE)."""

    layer: int
    state: str = FROZEN


Transition = Prune | Readmit


@dataclass(frozen=True)
class TapSpec:
    """What one decoder layer's tap reduces its attention to: which query rows (and the span's, if rows say so)."""

    rows: str
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class Block:
    """Images whose present image tokens have a static count together (`tokens`) but maybe not each: one image
    before any prune, or the images one prune chose among (its per-image split is data-dependent)."""

    images: tuple[int, ...]
    tokens: int


class Step(NamedTuple):
    """One transition of a schedule, with the blocks right before and right after it."""

    transition: Transition
    before: tuple[Block, ...]
    after: tuple[Block, ...]


@dataclass(frozen=True)
class LayerRange:
    """Decoder layers start..stop-1 (0-based), each seeing `image_tokens` image tokens, split into `blocks`."""

    start: int
    stop: int
    image_tokens: int
    blocks: tuple[Block, ...] = ()


class RangeDescription(TypedDict, total=False):
    """One layer range as `tpc inspect` shows it (`per_image` only for a prompt of several images)."""

    layers: list[int]  # [first, last] (0-based, inclusive)
    image_tokens: int
    per_image: list[dict[str, Any]]  # [{"images": [0], "tokens": 138}, {"images": [0, 1], "tokens": 43}, ...]


@dataclass(frozen=True)
class TokenSchedule:
    """The image tokens entering the decoder (`image_tokens`; `images`: each image's count in prompt order, empty
    for one image) and the transitions, in layer order."""

    image_tokens: int
    transitions: tuple[Transition, ...] = ()
    images: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.images and sum(self.images) != self.image_tokens:
            raise ValueError(f"images {list(self.images)} do not sum to {self.image_tokens} image tokens")
        layers = [t.layer for t in self.transitions]
        if layers != sorted(layers):
            raise ValueError(f"schedule transitions out of layer order: {layers}")
        for index, step in enumerate(self.steps):
            if isinstance(step.transition, Prune):
                self._check_prune(index, step.transition, step.before)
            else:
                self._check_readmit(step.transition, self.transitions[:index])

    def _check_readmit(self, readmit: Readmit, earlier: tuple[Transition, ...]) -> None:
        if any(isinstance(t, Prune) and t.renumber for t in self.transitions):
            raise ValueError("a schedule that renumbers positions cannot re-admit tokens")
        if readmit.state not in READMIT_STATES:
            raise ValueError(f"unknown re-admit state {readmit.state!r}; valid: {', '.join(READMIT_STATES)}")
        if readmit.state == REPRESENTATIVE and any(t.layer > 0 for t in earlier):
            raise ValueError(
                f"the re-admit at layer {readmit.layer} copies representatives' updates since layer 0: every token "
                "before it must have been dropped at layer 0"
            )

    def _check_prune(self, index: int, prune: Prune, blocks: tuple[Block, ...]) -> None:
        where, earlier = f"the prune at layer {prune.layer}", self.transitions[:index]
        group = self.group(prune)
        if any(i >= len(self.per_image) or i < 0 for i in group):
            raise ValueError(f"{where} names images {list(group)} of a {len(self.per_image)}-image prompt")
        partial = [b for b in blocks if set(b.images) & set(group) and not set(b.images) <= set(group)]
        if partial:
            raise ValueError(f"{where} prunes part of images {list(partial[0].images)}, whose split is data-dependent")
        present = self.present_before(index)
        if not 1 <= prune.keep <= present:
            raise ValueError(f"{where} keeps {prune.keep} of {present} image tokens")
        if prune.rows is not None and prune.rows not in ROWS:
            raise ValueError(f"unknown attention rows {prune.rows!r}; valid: {', '.join(ROWS)}")
        if (prune.rows == SPAN_ROWS) != (prune.span is not None):
            raise ValueError(f"{where}: a span goes with rows={SPAN_ROWS}")
        if prune.layer < (2 if prune.previous else 0):
            raise ValueError(f"{where} has no two layers before it to compare")
        if prune.rows is not None and any(t.layer == prune.layer for t in earlier):
            # the tap saw the sequence entering the layer before; an earlier transition here changed it
            raise ValueError(f"{where} reads attention, so it must be the first transition at its layer")
        if prune.previous and any(t.layer == prune.layer - 1 for t in earlier):
            raise ValueError(
                f"{where} compares layers {prune.layer - 2} and {prune.layer - 1}, between which the tokens change"
            )

    @property
    def per_image(self) -> tuple[int, ...]:
        """Each image's token count entering the decoder (one image: all of them)."""
        return self.images or (self.image_tokens,)

    def group(self, transition: Transition) -> tuple[int, ...]:
        """The images a prune chooses among (a re-admit: every image)."""
        images = transition.images if isinstance(transition, Prune) else None
        return images if images is not None else tuple(range(len(self.per_image)))

    def initial_blocks(self) -> tuple[Block, ...]:
        return tuple(Block((i,), n) for i, n in enumerate(self.per_image))

    @functools.cached_property
    def steps(self) -> tuple[Step, ...]:
        """Each transition with the blocks before and after it (a prune merges the blocks of its images into one)."""
        steps, blocks = [], self.initial_blocks()
        for transition in self.transitions:
            before = blocks
            if isinstance(transition, Prune):
                group = set(self.group(transition))
                rest = [b for b in blocks if not set(b.images) & group]
                merged = Block(tuple(sorted(group)), transition.keep)
                blocks = tuple(sorted([*rest, merged], key=lambda b: b.images[0]))
            else:
                blocks = self.initial_blocks()
            steps.append(Step(transition, before, blocks))
        return tuple(steps)

    def present_before(self, index: int) -> int:
        """Image tokens of transition `index`'s images present right before it (their blocks' static total)."""
        step = self.steps[index]
        group = set(self.group(step.transition))
        return sum(b.tokens for b in step.before if set(b.images) <= group)

    @property
    def prunes(self) -> tuple[Prune, ...]:
        return tuple(t for t in self.transitions if isinstance(t, Prune))

    @property
    def readmits(self) -> bool:
        return any(isinstance(t, Readmit) for t in self.transitions)

    @property
    def kept_widths(self) -> tuple[int, ...]:
        """The runs of `kept_indices`: each prune's kept count, in schedule order."""
        return tuple(p.keep for p in self.prunes)

    @property
    def final_tokens(self) -> int:
        """Image tokens the last layers see."""
        return sum(b.tokens for b in self.steps[-1].after) if self.steps else self.image_tokens

    def ranges(self, num_layers: int) -> list[LayerRange]:
        """The layer ranges of a `num_layers`-layer decoder; a transition at or past its depth is an error."""
        if self.transitions and self.transitions[-1].layer >= num_layers:
            raise ValueError(
                f"a transition at layer {self.transitions[-1].layer} is past the last layer ({num_layers - 1}) of the "
                f"{num_layers}-layer decoder"
            )
        ranges, start, blocks = [], 0, self.initial_blocks()
        for transition, _, after in self.steps:
            if transition.layer > start:
                ranges.append(LayerRange(start, transition.layer, sum(b.tokens for b in blocks), blocks))
            start, blocks = transition.layer, after
        ranges.append(LayerRange(start, num_layers, sum(b.tokens for b in blocks), blocks))
        return ranges

    def blocks_at(self, layer: int, num_layers: int) -> tuple[Block, ...]:
        """The blocks the layer sees."""
        return next(r.blocks for r in self.ranges(num_layers) if r.start <= layer < r.stop)

    def tokens_per_layer(self, num_layers: int) -> tuple[int, ...]:
        return tuple(r.image_tokens for r in self.ranges(num_layers) for _ in range(r.start, r.stop))

    def lengths(self, text_tokens: int, num_layers: int) -> tuple[int, ...]:
        """Each layer's prompt length: its KV cache after the prefill."""
        return tuple(text_tokens + n for n in self.tokens_per_layer(num_layers))

    def renumbered_tokens(self) -> int | None:
        """Image tokens present after the last layer whose prunes renumber positions (None: none renumbers)."""
        layers = [p.layer for p in self.prunes if p.renumber]
        if not layers:
            return None
        last = [step.after for step in self.steps if step.transition.layer == max(layers)][-1]
        return sum(b.tokens for b in last)

    def tapped_layers(self) -> dict[int, TapSpec]:
        """Layer -> the reduction its tap computes, for each prune that reads the layer (or two) before it; one
        reduction per layer (two prunes asking one layer for different rows is an error)."""
        taps: dict[int, TapSpec] = {}
        for prune in self.prunes:
            if prune.rows is None:
                continue
            spec = TapSpec(prune.rows, prune.span)
            for layer in (prune.layer - 1, prune.layer - 2) if prune.previous else (prune.layer - 1,):
                if layer < 0:
                    continue
                if taps.setdefault(layer, spec) != spec:
                    raise ValueError(f"two prunes read layer {layer}'s attention by different rows")
        return taps

    def describe(self, num_layers: int) -> list[RangeDescription]:
        """`tpc inspect`'s tokens per layer range (and per image, or per group of images pruned together)."""
        described = []
        for r in self.ranges(num_layers):
            item: RangeDescription = {"layers": [r.start, r.stop - 1], "image_tokens": r.image_tokens}
            if len(self.per_image) > 1:
                item["per_image"] = [{"images": list(b.images), "tokens": b.tokens} for b in r.blocks]
            described.append(item)
        return described
