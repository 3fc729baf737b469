"""Model pass: the one static-cache rewrite of a Llama-family decoder, for VLMs and policies alike.

Which image tokens each layer sees is the method's token schedule (`tpc.methods.schedule`): the prefill runs the
layers in order and applies each transition where it falls — a *prune* scores the image tokens present from the
taps on the layer before it and keeps K of them (the shared select op), a *re-admit* brings every image token
back, one dropped earlier with the hidden state it had when it was dropped (or its representative's update). Text
tokens are never dropped and every token stays in prompt order (a prune over several images, whose text sits
between them, re-orders nothing: it selects the survivors' places with the same select op), with its original
position id unless a prune renumbers; so each layer's KV cache holds exactly the tokens it saw and its length is
static (`DecoderLayout`).

The cache is explicit tensors of static size: layer i's cache holds `capacity[i]` positions (its prefill length
plus the decode steps). The prefill returns what it recorded (`RecordingCache`); `padded_cache` appends zero slots;
a static decode step s writes slot len_i + s (a `where` against a one-hot position, an elementwise op every runtime
has) and attends to slots 0..len_i+s. A policy's control step instead unrolls its few decode steps on the growing
recorded cache inside one graph (`decode_growing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from tpc.methods.base import PrefillMethod
from tpc.methods.lvlm_csp import representative_update
from tpc.methods.schedule import (
    ALL_ROWS,
    REPRESENTATIVE,
    SPAN_ROWS,
    Block,
    PrefillSignals,
    PromptImages,
    Prune,
    Readmit,
    TapSpec,
    TokenSchedule,
    Transition,
)
from tpc.models_zoo.llava import DecoderParts
from tpc.ops import gather_tokens, in_spans, select_indices
from tpc.passes.attention_tap import ReceivedAttention, RowAttention, SpanAttention, Tap, attach_tap


@dataclass(frozen=True)
class DecoderLayout:
    """The static prompt and cache of a decoder export, per layer, all derived from the token schedule."""

    image_starts: tuple[int, ...]  # where each image's tokens sit in the prompt the prefill receives
    text_tokens: int  # prompt tokens that are not image tokens (BOS included)
    schedule: TokenSchedule  # schedule.image_tokens: image tokens the prefill receives (schedule.per_image: each's)
    num_layers: int
    decode_steps: int  # decode calls the cache has room for
    # M-RoPE (Qwen-VL): rotary positions one image occupies (max of its merged grid's sides); None: one per token
    image_position_span: int | None = None

    @property
    def image_start(self) -> int:
        """The first image's first position."""
        return self.image_starts[0]

    @property
    def image_tokens(self) -> int:
        return self.schedule.image_tokens

    @property
    def prompt(self) -> PromptImages:
        return PromptImages(self.image_starts, self.schedule.per_image, self.prefill_tokens)

    @property
    def prefill_tokens(self) -> int:
        """The prompt length the prefill receives."""
        return self.text_tokens + self.schedule.image_tokens

    @property
    def kept_lengths(self) -> tuple[int, ...]:
        """Cache entries each layer holds after the prefill."""
        return self.schedule.lengths(self.text_tokens, self.num_layers)

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(length + self.decode_steps for length in self.kept_lengths)

    @property
    def next_position(self) -> int:
        """Position id of the first decoded token: the prefill's full length when every token keeps its original
        position, the length after the renumbering layer when a prune renumbers them; with M-RoPE one past the
        unpruned prompt's last position (transformers: the prompt length + `rope_deltas`), pruned or not."""
        if self.image_position_span is not None:
            return self.text_tokens + len(self.image_starts) * self.image_position_span
        renumbered = self.schedule.renumbered_tokens()
        return self.prefill_tokens if renumbered is None else self.text_tokens + renumbered

    def span_at(self, span: tuple[int, int], layer: int) -> tuple[int, int]:
        """A span of text tokens (start, stop in the prompt the prefill receives) where it sits at `layer`: it moves
        with the image tokens dropped before it (which must have a static count there)."""
        start, stop = span
        prompt = self.prompt
        inside = [i for i in range(len(prompt.starts)) if start < prompt.span(i)[1] and stop > prompt.span(i)[0]]
        if not 0 <= start < stop <= self.prefill_tokens or inside:
            raise ValueError(f"the span {span} is not a span of text tokens of the {self.prefill_tokens}-token prompt")
        shift = 0
        for block in self.schedule.blocks_at(layer, self.num_layers):
            before = [prompt.span(i)[1] <= start for i in block.images]
            if any(before) and not all(before):
                raise ValueError(f"the span {span} sits between images pruned together: its place is data-dependent")
            if all(before):
                shift += block.tokens - sum(prompt.tokens[i] for i in block.images)
        return start + shift, stop + shift

    def image_token_flops(self, decoder: Any) -> int:
        """2x multiply-adds the prefill spends on image tokens: each layer's image tokens through its projections and
        MLP, and their attention to the layer's prompt (causal: half of it on average)."""
        layers = zip(self.schedule.tokens_per_layer(self.num_layers), self.kept_lengths, strict=True)
        return sum(decoder.layer_flops(images, (length + 1) // 2) for images, length in layers)


class RecordingCache:
    """The cache protocol transformers' attention calls (`update`): records each layer's keys and values; a later
    call on the same layer appends to them (the growing cache of an unrolled decode)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[Tensor, Tensor]] = {}

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        if layer_idx in self.entries:
            past_key, past_value = self.entries[layer_idx]
            key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        self.entries[layer_idx] = (key, value)
        return key, value


def padded_cache(cache: RecordingCache, free_slots: int) -> list[Tensor]:
    """Each layer's prefill keys and values followed by `free_slots` zero slots for the decode steps: the static
    cache (`present.*`, in `cache_names` order) that decode fills one slot per call."""
    present = []
    for index in sorted(cache.entries):
        for tensor in cache.entries[index]:
            pad = tensor.new_zeros((*tensor.shape[:2], free_slots, tensor.shape[3]))
            present.append(torch.cat([tensor, pad], dim=2))
    return present


class _StaticCache:
    """Static cache: writes the new key/value at each layer's slot and returns the whole buffer."""

    def __init__(self, past: tuple[Tensor, ...], slots: list[Tensor]) -> None:
        self.past = past
        self.slots = slots
        self.present: dict[int, tuple[Tensor, Tensor]] = {}

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        past_key, past_value = self.past[2 * layer_idx], self.past[2 * layer_idx + 1]
        positions = torch.arange(past_key.shape[2], device=key.device)
        here = (positions == self.slots[layer_idx]).view(1, 1, -1, 1)
        self.present[layer_idx] = (torch.where(here, key, past_key), torch.where(here, value, past_value))
        return self.present[layer_idx]


def _score_tap(spec: TapSpec, layout: DecoderLayout, layer: int) -> Tap:
    """The tap computing `spec`'s reduction at `layer` (a span is placed where its tokens sit at that layer)."""
    if spec.rows == ALL_ROWS:
        return ReceivedAttention(causal=True)
    if spec.rows == SPAN_ROWS:
        assert spec.span is not None  # the schedule checks a span goes with these rows
        return SpanAttention(*layout.span_at(spec.span, layer))
    return RowAttention()


@dataclass(frozen=True)
class _Run:
    """The present image tokens of some images, as the decoder knows them statically: how many there are, and
    (when they form one run of the sequence at a static place: one image, nothing data-dependent before it) where
    that run starts."""

    present: int
    images: tuple[int, ...]
    offset: int | None


@dataclass(frozen=True)
class _PrunePlan(_Run):
    """One prune, and where its kept tokens start in `kept_indices`."""

    prune: Prune
    kept_offset: int


def _transition_runs(schedule: TokenSchedule, prompt: PromptImages) -> dict[int, _Run]:
    """Transition index -> its run: a prune's images, a re-admit's (every image)."""
    plans: dict[int, _Run] = {}
    run = 0
    for index, (transition, blocks, _) in enumerate(schedule.steps):
        group, present = schedule.group(transition), schedule.present_before(index)
        offset = _static_offset(group, blocks, prompt)
        if isinstance(transition, Prune):
            plans[index] = _PrunePlan(present, group, offset, transition, run)
            run += transition.keep
        else:
            plans[index] = _Run(present, group, offset)
    return plans


def _static_offset(group: tuple[int, ...], blocks: tuple[Block, ...], prompt: PromptImages) -> int | None:
    """Where one image's present tokens start in the sequence, if no block with a data-dependent split straddles
    it (None otherwise, or for several images: the tokens are found by their prompt positions)."""
    if len(group) != 1:
        return None
    image = group[0]
    others = [b for b in blocks if image not in b.images]
    if any(min(b.images) < image < max(b.images) for b in others):
        return None
    dropped = sum(sum(prompt.tokens[i] for i in b.images) - b.tokens for b in others if max(b.images) < image)
    return prompt.starts[image] - dropped


@dataclass(frozen=True)
class _Located:
    """Where a run's present image tokens sit in the sequence: a static slice (`offset`), or the indices `where`
    (B, present), ascending, of the tokens `member` (B, L) marks."""

    run: _Run
    where: Tensor | None = None
    member: Tensor | None = None

    def pick(self, x: Tensor) -> Tensor:
        """Those tokens of a sequence-shaped tensor (B, L[, D])."""
        offset = self.run.offset
        if offset is not None:
            return x[:, offset : offset + self.run.present]
        assert self.where is not None  # found by their positions
        return _gather(x, self.where)


@dataclass(frozen=True)
class _Sequence:
    """The tokens present at a layer: their hidden states, prompt positions (ascending) and position ids."""

    hidden: Tensor  # (B, L, D)
    positions: Tensor  # (B, L) int64: where each token sat in the prompt
    # (B, L) int64: its rotary position (its prompt position unless a prune renumbered); M-RoPE: (B, L, 3)
    position_ids: Tensor

    def take(self, indices: Tensor) -> _Sequence:
        """The tokens at `indices` (B, L') of the sequence, ascending."""
        return _Sequence(
            _gather(self.hidden, indices), _gather(self.positions, indices), _gather(self.position_ids, indices)
        )

    def splice(self, offset: int, count: int, local: Tensor) -> _Sequence:
        """The run offset..offset+count-1 cut to its tokens at `local` (B, K) (ascending), the rest unchanged."""

        def cut(x: Tensor) -> Tensor:
            kept = _gather(x[:, offset : offset + count], local)
            return torch.cat([x[:, :offset], kept, x[:, offset + count :]], dim=1)

        return _Sequence(cut(self.hidden), cut(self.positions), cut(self.position_ids))


def _gather(x: Tensor, indices: Tensor) -> Tensor:
    """x (B, L) or (B, L, D) at token indices (B, K)."""
    return gather_tokens(x, indices) if x.dim() == 3 else x.gather(1, indices)


class ScheduledDecoder(nn.Module):
    """A family's decoder run by a token schedule: `prefill`, `decode_static` and `decode_growing`.

    `method`: the method whose priorities the schedule's prunes use (None when the schedule has no prune).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        adapter: DecoderParts,
        layout: DecoderLayout,
        method: PrefillMethod | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.layout = layout
        self.method, self.params = method, params or {}
        self.num_layers = layout.num_layers
        layers = adapter.decoder_layers(model)
        self.taps: dict[int, Tap] = {}
        for layer, spec in layout.schedule.tapped_layers().items():
            self.taps[layer] = attach_tap(layers[layer].self_attn, _score_tap(spec, layout, layer))
        self.transitions: dict[int, list[Transition]] = {}
        for transition in layout.schedule.transitions:
            self.transitions.setdefault(transition.layer, []).append(transition)
        self.runs = _transition_runs(layout.schedule, layout.prompt)

    def run_layer(
        self, index: int, hidden: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor | None, cache: object
    ) -> Tensor:
        layer = self.adapter.decoder_layers(self.model)[index]
        output = layer(hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=cache, use_cache=True)
        return output[0] if isinstance(output, tuple) else output

    def final_hidden(self, hidden: Tensor) -> Tensor:
        """(B, D) the final-norm hidden state of the last position: what the LM head reads, and what a
        LISA-style mask decoder reads at a [SEG] token (`hidden_states[-1]`)."""
        return self.adapter.final_norm(self.model, hidden[:, -1])

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits of the last position only (all generation needs), in float32."""
        return self.adapter.lm_head(self.model)(self.final_hidden(hidden)).float()

    def prefill(
        self,
        hidden: Tensor,
        image_embeds: Tensor,
        forced_indices: Tensor | None = None,
        guide: Tensor | None = None,
        position_ids: Tensor | None = None,
        deepstack: Tensor | None = None,
        key_valid: Tensor | None = None,
    ) -> tuple[Tensor, RecordingCache, Tensor | None]:
        """Every layer over the prompt `hidden` (B, L, D), whose image tokens `image_embeds` (B, N, D: every image's,
        in prompt order) sit at the layout's image runs, applying the schedule: (last hidden states, the recorded
        cache, kept_indices or None).

        `kept_indices` (B, sum of the prunes' K): each prune's kept tokens as indices among all image tokens,
        ascending, in schedule order; `forced_indices` of that shape replaces every selection (teacher forcing).
        `guide` (B, N): a per-image-token signal from outside the decoder (a policy's history; a tower's attention).
        `position_ids` (B, L, 3): M-RoPE positions of the prompt (default: its positions 0..L-1). `deepstack`
        (B, N, levels, D): features added to the image tokens present after each of the first `levels` layers.
        `key_valid` (B, L) 1/0: prompt tokens no query may attend to (0), in a schedule without transitions.
        """
        batch, length = hidden.shape[:2]
        every = torch.arange(length, device=hidden.device).expand(batch, length)
        rotary_ids = every if position_ids is None else position_ids
        sequence, complete = _Sequence(hidden, every, rotary_ids), True  # complete: every prompt token is present
        # each prompt token's latest hidden state, for a re-admit
        bank: Tensor | None = hidden if self.layout.schedule.readmits else None
        rotary = self.adapter.rotary(self.model, hidden, rotary_ids)
        entering: Tensor | None = None  # the sequence entering the previous layer
        cache, kept_runs, number = RecordingCache(), [], 0
        mask = None  # None: causal attention over every present token
        if key_valid is not None:
            assert not self.layout.schedule.transitions, "a key mask is built for one prompt length"
            causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
            mask = torch.logical_and(causal[None, None], key_valid.bool()[:, None, None, :])
        for index in range(self.num_layers):
            transitions = self.transitions.get(index, [])
            for transition in transitions:
                run, number = self.runs[number], number + 1
                if bank is not None:  # the present tokens' states, for a later re-admit
                    grid = sequence.positions[..., None].expand(-1, -1, bank.shape[-1])
                    bank = sequence.hidden if complete else bank.scatter(1, grid, sequence.hidden.to(bank.dtype))
                if isinstance(run, _PrunePlan):
                    forced = (
                        None
                        if forced_indices is None
                        else forced_indices[:, run.kept_offset : run.kept_offset + run.prune.keep]
                    )
                    sequence, kept = self._prune(run, sequence, image_embeds, guide, entering, forced)
                    kept_runs.append(kept)
                    complete = False
                else:  # re-admit: every token, a dropped one with its state when dropped (or its representative's)
                    assert bank is not None and isinstance(transition, Readmit)  # a bank whenever it re-admits
                    if transition.state == REPRESENTATIVE:
                        bank = self._representative_bank(bank, sequence, image_embeds, run)
                    sequence, complete = _Sequence(bank.to(hidden.dtype), every, every), True
            if any(isinstance(t, Prune) and t.renumber for t in transitions):
                renumbered = torch.arange(sequence.hidden.shape[1], device=hidden.device).expand(batch, -1)
                sequence = _Sequence(sequence.hidden, sequence.positions, renumbered)
            if transitions:
                rotary = self.adapter.rotary(self.model, sequence.hidden, sequence.position_ids)
            entering = sequence.hidden
            hidden_out = self.run_layer(index, sequence.hidden, rotary, mask, cache)
            if deepstack is not None and index < deepstack.shape[2]:
                hidden_out = self._add_deepstack(hidden_out, sequence.positions, deepstack[:, :, index], index)
            sequence = _Sequence(hidden_out, sequence.positions, sequence.position_ids)
        kept_indices = torch.cat(kept_runs, dim=1) if len(kept_runs) > 1 else (kept_runs[0] if kept_runs else None)
        return sequence.hidden, cache, kept_indices

    def _add_deepstack(self, hidden: Tensor, positions: Tensor, features: Tensor, layer: int) -> Tensor:
        """Qwen3-VL's DeepStack after `layer`: each image token present adds its own feature (features (B, N, D),
        indexed like `image_embeds`); a token pruned before never receives it. One image, whose present tokens are
        one run at its prompt start (the plan refuses other layouts)."""
        start = self.layout.image_start
        present = self.layout.schedule.tokens_per_layer(self.num_layers)[layer]
        run = slice(start, start + present)
        added = hidden[:, run] + gather_tokens(features, positions[:, run] - start).to(hidden.dtype)
        return torch.cat([hidden[:, :start], added, hidden[:, run.stop :]], dim=1)

    def _image_index(self, positions: Tensor, images: tuple[int, ...], inverse: bool = False) -> Tensor:
        """Prompt positions of the images' tokens -> their indices among all image tokens (`inverse`: back)."""
        prompt = self.layout.prompt
        result = torch.zeros_like(positions)
        for image in images:
            start, stop = prompt.span(image)
            first = prompt.first_index(image)
            shift = first - start if not inverse else start - first
            if len(images) == 1:
                return positions + shift
            low, high = (start, stop) if not inverse else (first, first + prompt.tokens[image])
            result = result + in_spans(positions, ((low, high),)).long() * (positions + shift)
        return result

    def _prune(
        self,
        plan: _PrunePlan,
        sequence: _Sequence,
        image_embeds: Tensor,
        guide: Tensor | None,
        entering: Tensor | None,
        forced: Tensor | None,
    ) -> tuple[_Sequence, Tensor]:
        """One prune: (the sequence after it, its kept tokens as image-token indices, ascending)."""
        prune = plan.prune
        length = sequence.positions.shape[1]
        found = self._locate(sequence, plan)
        positions = found.pick(sequence.positions)
        indices = self._image_index(positions, plan.images)
        if forced is not None:
            kept = forced
            # where each kept token sits among the images' present tokens (both ascending)
            kept_positions = self._image_index(forced, plan.images, inverse=True)
            # (summed as integers: Core ML would sum booleans as floats and refuse them as gather indices)
            local = (positions[:, None, :] < kept_positions[:, :, None]).to(torch.int32).sum(dim=-1).long()
        else:
            local = select_indices(
                self._priority(plan, found, sequence, indices, image_embeds, guide, entering), prune.keep
            )
            kept = indices.gather(1, local)
        if plan.offset is not None:
            return sequence.splice(plan.offset, plan.present, local), kept
        assert found.where is not None and found.member is not None
        chosen = found.where.gather(1, local)
        chosen_mask = (chosen[:, :, None] == torch.arange(length, device=chosen.device)).any(dim=1)
        stays = torch.logical_or(torch.logical_not(found.member), chosen_mask)
        return sequence.take(select_indices(stays.float(), length - plan.present + prune.keep)), kept

    def _locate(self, sequence: _Sequence, run: _Run) -> _Located:
        """Where the run's images' present tokens sit in the sequence."""
        if run.offset is not None:
            return _Located(run)
        # exactly `present` tokens of the sequence lie in the images' prompt spans
        member = in_spans(sequence.positions, tuple(self.layout.prompt.span(image) for image in run.images))
        return _Located(run, select_indices(member.float(), run.present), member)

    def _representative_bank(self, bank: Tensor, sequence: _Sequence, image_embeds: Tensor, run: _Run) -> Tensor:
        """Every prompt token's state for a REPRESENTATIVE re-admit: text and present image tokens (the
        representatives) as they are, every other image token its embedding plus its nearest representative's
        update since layer 0 (`tpc.methods.lvlm_csp.representative_update`)."""
        found = self._locate(sequence, run)
        representatives = self._image_index(found.pick(sequence.positions), run.images)
        states = representative_update(image_embeds, representatives, found.pick(sequence.hidden))
        every = torch.arange(image_embeds.shape[1], device=image_embeds.device).expand(image_embeds.shape[0], -1)
        positions = self._image_index(every, run.images, inverse=True)
        return bank.scatter(1, positions[..., None].expand(-1, -1, bank.shape[-1]), states.to(bank.dtype))

    def _priority(
        self,
        plan: _PrunePlan,
        found: _Located,
        sequence: _Sequence,
        indices: Tensor,
        image_embeds: Tensor,
        guide: Tensor | None,
        entering: Tensor | None,
    ) -> Tensor:
        """The prune's priorities over its images' present tokens (B, N_p)."""
        prune, layer = plan.prune, plan.prune.layer
        if prune.rows is not None and layer > 0:
            scores = found.pick(self.taps[layer - 1].latest())
        else:  # nothing tapped (layer 0, or a prune that reads no attention)
            scores = sequence.hidden.new_zeros(indices.shape, dtype=torch.float32)
        previous = found.pick(self.taps[layer - 2].latest()) if prune.previous else None
        signals = PrefillSignals(
            scores=scores,
            image_embeds=gather_tokens(image_embeds, indices),
            guide=None if guide is None else guide.gather(1, indices),
            hidden=found.pick(sequence.hidden),
            previous_scores=previous,
            context=sequence.hidden,
            positions=sequence.positions,
            previous_context=entering,
            previous_hidden=None if entering is None else found.pick(entering),
        )
        method_priority = self.method.priority if self.method is not None else None
        priority = prune.priority or method_priority
        if priority is None:
            raise ValueError(f"the prune at layer {layer} has no priority function and the decoder no method")
        return priority(signals, prune.keep, self.params)

    def decode_static(
        self, input_ids: Tensor, step: Tensor, past: tuple[Tensor, ...], key_valid: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """One greedy step on the static cache: (hidden states of the new token, present.* in cache_names order).
        `key_valid` (B, capacity) 1/0: cache slots never attended to (0), the prefill's key mask."""
        hidden = self.adapter.embed_text(self.model, input_ids)
        positions = (step + self.layout.next_position).view(1, 1).expand(hidden.shape[0], 1)
        rotary = self.adapter.rotary(self.model, hidden, positions)
        slots = [step + length for length in self.layout.kept_lengths]
        cache = _StaticCache(past, slots)
        masks: dict[int, Tensor] = {}
        for index, capacity in enumerate(self.layout.capacities):
            if capacity not in masks:  # attend to the filled slots, the new one included
                visible = (torch.arange(capacity, device=hidden.device) <= slots[index]).view(1, 1, 1, capacity)
                valid = None if key_valid is None else key_valid.bool()[:, None, None, :capacity]
                masks[capacity] = visible if valid is None else torch.logical_and(visible, valid)
            hidden = self.run_layer(index, hidden, rotary, masks[capacity], cache)
        return hidden, [tensor for index in range(self.num_layers) for tensor in cache.present[index]]

    def decode_growing(self, token: Tensor, step: int, cache: RecordingCache) -> Tensor:
        """Decode step `step` (1-based) of an unrolled loop on the recorded cache, which grows by one position."""
        hidden = self.adapter.embed_text(self.model, token[:, None])
        position = torch.full((hidden.shape[0], 1), self.layout.next_position + step - 1, device=hidden.device)
        rotary = self.adapter.rotary(self.model, hidden, position)
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, rotary, None, cache)
        return hidden
