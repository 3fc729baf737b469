"""A token schedule: which image tokens each decoder layer sees, as data a method declares.

The decoder's layers form contiguous ranges; each range sees a static number of image tokens, and a transition
between two ranges either *prunes* (keeps `keep` of the tokens present, chosen by the method's priorities from
signals tapped on the layers before it) or *re-admits* (every image token dropped earlier comes back, with the
hidden state it had when it was dropped). A vision-side method's schedule has no transition: the decoder starts
with K tokens. FastV and VLA-Pruner have one prune transition at their layer K. Everything static about a
decoder export derives from the schedule: per-layer cache lengths and capacities, the width of `kept_indices`,
FLOPs per layer range, and `tpc inspect`'s "tokens per layer". Kept tokens always keep their original position
ids, whatever the transitions.

Pure data: no torch. `tpc.passes.decoder` is the one decoder rewrite that runs a schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from torch import Tensor

# which query rows of the tapped layer's attention a prune scores with: the last prompt token's, every row's mean,
# or the mean of a token span's rows (`Prune.span`)
LAST_ROW, ALL_ROWS, SPAN_ROWS = "last-row", "all-rows", "span-rows"
ROWS = (LAST_ROW, ALL_ROWS, SPAN_ROWS)
FROZEN = "frozen"  # a re-admitted token's hidden state: the one it had when it was dropped


@dataclass(frozen=True)
class PrefillSignals:
    """What a prune transition of a decoder schedule may read at its layer K (0-based), over the image tokens
    present there (N_p of them, in original order)."""

    scores: Tensor  # (B, N_p) attention to each present image token at layer K-1, head mean, reduced by the rows
    image_embeds: Tensor  # (B, N_p, D) their LLM input embeddings (layer 0's input)
    guide: Tensor | None = None  # (B, N_p) a stateful method's guide from earlier control steps
    hidden: Tensor | None = None  # (B, N_p, D) their hidden states entering layer K
    previous_scores: Tensor | None = None  # (B, N_p) the same reduction at layer K-2 (`Prune.previous`)
    context: Tensor | None = None  # (B, L, D) the whole sequence's hidden states entering layer K (text included)


@dataclass(frozen=True)
class Prune:
    """At decoder layer `layer` (0-based), keep `keep` of the image tokens present.

    The priorities come from `priority` (None: the method's own) over `PrefillSignals` whose `scores` are the
    attention of layer `layer - 1` reduced by `rows` (zeros at layer 0, where nothing was tapped yet; with `rows`
    SPAN_ROWS, the mean of the query rows `span` = (start, stop) of the prompt, in its original positions, a span of
    text tokens), `previous_scores` the same reduction of layer `layer - 2` when `previous` (the change between two
    layers), `hidden` the present image tokens' hidden states entering the layer and `context` the whole sequence's.
    """

    layer: int
    keep: int
    rows: str = LAST_ROW
    priority: Callable[[PrefillSignals, int, dict[str, Any]], Tensor] | None = None
    span: tuple[int, int] | None = None
    previous: bool = False


@dataclass(frozen=True)
class Readmit:
    """At decoder layer `layer`, every image token comes back; one dropped earlier re-enters with its hidden state
    as it was when it was dropped (`state`: FROZEN, the only rule so far)."""

    layer: int
    state: str = FROZEN


Transition = Prune | Readmit


@dataclass(frozen=True)
class TapSpec:
    """What one decoder layer's tap reduces its attention to: which query rows (and the span's, if rows say so)."""

    rows: str
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class LayerRange:
    """Decoder layers start..stop-1 (0-based), each seeing `image_tokens` image tokens."""

    start: int
    stop: int
    image_tokens: int


class RangeDescription(TypedDict):
    """One layer range as `tpc inspect` shows it."""

    layers: list[int]  # [first, last] (0-based, inclusive)
    image_tokens: int


@dataclass(frozen=True)
class TokenSchedule:
    """The image tokens entering the decoder and the transitions, in layer order."""

    image_tokens: int
    transitions: tuple[Transition, ...] = ()

    def __post_init__(self) -> None:
        layers = [t.layer for t in self.transitions]
        if layers != sorted(layers):
            raise ValueError(f"schedule transitions out of layer order: {layers}")
        present = self.image_tokens
        for transition in self.transitions:
            if isinstance(transition, Prune):
                if not 1 <= transition.keep <= present:
                    raise ValueError(
                        f"a prune at layer {transition.layer} keeps {transition.keep} of {present} image tokens"
                    )
                if transition.rows not in ROWS:
                    raise ValueError(f"unknown attention rows {transition.rows!r}; valid: {', '.join(ROWS)}")
                if (transition.rows == SPAN_ROWS) != (transition.span is not None):
                    raise ValueError(f"the prune at layer {transition.layer}: a span goes with rows={SPAN_ROWS}")
                if transition.layer < (2 if transition.previous else 0):
                    raise ValueError(f"the prune at layer {transition.layer} has no two layers before it to compare")
                present = transition.keep
            else:
                present = self.image_tokens

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
        present = self.image_tokens
        for transition in self.transitions:
            present = transition.keep if isinstance(transition, Prune) else self.image_tokens
        return present

    def ranges(self, num_layers: int) -> list[LayerRange]:
        """The layer ranges of a `num_layers`-layer decoder; a transition at or past its depth is an error."""
        if self.transitions and self.transitions[-1].layer >= num_layers:
            raise ValueError(f"a transition at layer {self.transitions[-1].layer} of a {num_layers}-layer decoder")
        ranges, start, present = [], 0, self.image_tokens
        for transition in self.transitions:
            if transition.layer > start:
                ranges.append(LayerRange(start, transition.layer, present))
            start = transition.layer
            present = transition.keep if isinstance(transition, Prune) else self.image_tokens
        ranges.append(LayerRange(start, num_layers, present))
        return ranges

    def tokens_per_layer(self, num_layers: int) -> tuple[int, ...]:
        return tuple(r.image_tokens for r in self.ranges(num_layers) for _ in range(r.start, r.stop))

    def lengths(self, text_tokens: int, num_layers: int) -> tuple[int, ...]:
        """Each layer's prompt length: its KV cache after the prefill."""
        return tuple(text_tokens + n for n in self.tokens_per_layer(num_layers))

    def tapped_layers(self) -> dict[int, TapSpec]:
        """Layer -> the reduction its tap computes, for each prune that reads the layer (or two) before it; one
        reduction per layer (two prunes asking one layer for different rows is an error)."""
        taps: dict[int, TapSpec] = {}
        for prune in self.prunes:
            spec = TapSpec(prune.rows, prune.span)
            for layer in (prune.layer - 1, prune.layer - 2) if prune.previous else (prune.layer - 1,):
                if layer < 0:
                    continue
                if taps.setdefault(layer, spec) != spec:
                    raise ValueError(f"two prunes read layer {layer}'s attention by different rows")
        return taps

    def describe(self, num_layers: int) -> list[RangeDescription]:
        """`tpc inspect`'s tokens per layer range."""
        return [{"layers": [r.start, r.stop - 1], "image_tokens": r.image_tokens} for r in self.ranges(num_layers)]
