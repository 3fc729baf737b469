"""The step protocols of tpc.json, typed: a VLM's `generation` section and a policy's `policy` section.

What a runtime needs to drive an export's graphs, in any language: the static prompt layout, the prefill and the
KV cache (a VLM), the state carried between control steps, the image normalisation and the action decoding (a
policy). One frozen dataclass per record; `from_dict` reads the JSON object tpc.json holds (validated against
`tpc.contract.manifest.SCHEMA` first), `to_dict` writes it back key for key, in the order tpc.json has always had.
Standard library only: the runtimes import it on devices without PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

# a dataclass field written to tpc.json only when it is set (None: the key is absent)
OPTIONAL_KEY = {"optional_key": True}

# a dataset's action statistics, as the checkpoint's `norm_stats` holds them: mean, std, min, max, q01, q99 (one
# float per action dimension) and mask (un-normalise that dimension or not); open to the fields a release adds
ActionStats = dict[str, list[float] | list[bool]]


def to_json(record: Any) -> Any:
    """A record as plain JSON data: dataclasses as objects in field order (an `OPTIONAL_KEY` field left out when
    None), tuples as lists."""
    if is_dataclass(record) and not isinstance(record, type):
        return {
            spec.name: to_json(getattr(record, spec.name))
            for spec in fields(record)
            if not (spec.metadata.get("optional_key") and getattr(record, spec.name) is None)
        }
    if isinstance(record, (list, tuple)):
        return [to_json(item) for item in record]
    if isinstance(record, dict):
        return {key: to_json(value) for key, value in record.items()}
    return record


class Record:
    """A record of a protocol section: `to_dict` writes it as tpc.json holds it."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = to_json(self)
        return data


@dataclass(frozen=True)
class PromptSpec(Record):
    """The static prompt: `text_tokens` text tokens and one run of `image_tokens` image tokens per image, the first
    at `image_start` (several images: each run's start in `image_starts`), `length` tokens in all."""

    text_tokens: int
    image_start: int
    image_tokens: int
    length: int
    image_starts: tuple[int, ...] | None = field(default=None, metadata=OPTIONAL_KEY, kw_only=True)

    @property
    def starts(self) -> tuple[int, ...]:
        """Every image run's first position."""
        return self.image_starts or (self.image_start,)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptSpec:
        starts = data.get("image_starts")
        return cls(
            data["text_tokens"],
            data["image_start"],
            data["image_tokens"],
            data["length"],
            image_starts=None if starts is None else tuple(starts),
        )


@dataclass(frozen=True)
class PrefillSpec(Record):
    """What the prefill graph takes: `length` positions, of which `image_tokens` image embeddings."""

    length: int
    image_tokens: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrefillSpec:
        return cls(data["length"], data["image_tokens"])


@dataclass(frozen=True)
class CacheSpec(Record):
    """The static KV cache, per decoder layer: its length after the prefill and its capacity; the position of the
    first decode step."""

    lengths_after_prefill: tuple[int, ...]
    capacity: tuple[int, ...]
    next_position: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheSpec:
        return cls(tuple(data["lengths_after_prefill"]), tuple(data["capacity"]), data["next_position"])


@dataclass(frozen=True)
class GenerationProtocol(Record):
    """A VLM export's `generation` section: how vision, prefill and decode make greedy generation."""

    image_token_id: int
    eos_token_ids: tuple[int, ...]
    prompt: PromptSpec
    prefill: PrefillSpec
    max_new_tokens: int
    decoder_layers: int
    cache: CacheSpec
    protocol: str  # the step protocol in words
    seg_token_id: int | None = field(default=None, metadata=OPTIONAL_KEY)  # a LISA-style [SEG] token
    # vision outputs besides image_embeds that the prefill takes (concatenated over images like image_embeds)
    vision_to_prefill: tuple[str, ...] | None = field(default=None, metadata=OPTIONAL_KEY)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationProtocol:
        return cls(
            image_token_id=data["image_token_id"],
            eos_token_ids=tuple(data["eos_token_ids"]),
            prompt=PromptSpec.from_dict(data["prompt"]),
            prefill=PrefillSpec.from_dict(data["prefill"]),
            max_new_tokens=data["max_new_tokens"],
            decoder_layers=data["decoder_layers"],
            cache=CacheSpec.from_dict(data["cache"]),
            protocol=data["protocol"],
            seg_token_id=data.get("seg_token_id"),
            vision_to_prefill=tuple(data["vision_to_prefill"]) if "vision_to_prefill" in data else None,
        )


@dataclass(frozen=True)
class Normalization(Record):
    """One vision tower's pixel normalisation: (x / 255 - mean) / std per RGB channel."""

    tower: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalization:
        return cls(data["tower"], tuple(data["mean"]), tuple(data["std"]))


@dataclass(frozen=True)
class ImageSpec(Record):
    """The camera image a step takes: `size` x `size` RGB, normalised once per tower (stacked channels)."""

    size: int
    normalization: tuple[Normalization, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageSpec:
        return cls(data["size"], tuple(Normalization.from_dict(item) for item in data["normalization"]))


@dataclass(frozen=True)
class PolicyPromptSpec(PromptSpec):
    """A policy's prompt: the layout, the instruction template and the release's trailing empty token."""

    template: str
    empty_token_id: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyPromptSpec:
        return cls(
            data["text_tokens"],
            data["image_start"],
            data["image_tokens"],
            data["length"],
            data["template"],
            data["empty_token_id"],
        )


@dataclass(frozen=True)
class DecoderLengths(Record):
    """The sequence length each decoder layer sees: under the method's schedule, and with every image token."""

    pruned: tuple[int, ...]
    full: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecoderLengths:
        return cls(tuple(data["pruned"]), tuple(data["full"]))


@dataclass(frozen=True)
class HistorySpec(Record):
    """The action-importance history a stateful policy carries: a `dtype` tensor of `shape` (window, image
    tokens), `initial` at reset, fed as graph input `input` and replaced by graph output `output` each step."""

    shape: tuple[int, ...]
    dtype: str
    initial: str
    input: str
    output: str
    order: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistorySpec:
        return cls(tuple(data["shape"]), data["dtype"], data["initial"], data["input"], data["output"], data["order"])


@dataclass(frozen=True)
class HistoryLength(Record):
    """How many history rows are real: `initial` at reset, at most `max` (the window), updated as `update` says."""

    initial: int
    max: int
    update: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistoryLength:
        return cls(data["initial"], data["max"], data["update"])


@dataclass(frozen=True)
class PolicyState(Record):
    """The state a stateful policy carries between control steps (VLA-Pruner's)."""

    history: HistorySpec
    history_len: HistoryLength

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyState:
        return cls(HistorySpec.from_dict(data["history"]), HistoryLength.from_dict(data["history_len"]))


@dataclass(frozen=True)
class PolicyProtocol(Record):
    """A policy export's `policy` section: the graphs and when each runs, the state, the prompt, the image
    preprocessing and the action decoding."""

    action_dim: int
    n_action_bins: int
    action_vocab_size: int  # bins are counted down from here (the vocabulary without its padding)
    unnorm_key: str | None
    action_stats: ActionStats | None
    image: ImageSpec
    prompt: PolicyPromptSpec
    kept_image_tokens: int
    decoder_lengths: DecoderLengths
    state: PolicyState | None  # None: stateless (tpc.json `{}`)
    graphs: dict[str, str]  # graph name -> when it runs
    protocol: str  # the step protocol in words
    # a staged export (ExecuTorch): how each graph's prefill and decode methods make one step
    stages: str | None = field(default=None, metadata=OPTIONAL_KEY)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyProtocol:
        stats = data["action_stats"]
        return cls(
            action_dim=data["action_dim"],
            n_action_bins=data["n_action_bins"],
            action_vocab_size=data["action_vocab_size"],
            unnorm_key=data["unnorm_key"],
            action_stats=None if stats is None else {key: list(values) for key, values in stats.items()},
            image=ImageSpec.from_dict(data["image"]),
            prompt=PolicyPromptSpec.from_dict(data["prompt"]),
            kept_image_tokens=data["kept_image_tokens"],
            decoder_lengths=DecoderLengths.from_dict(data["decoder_lengths"]),
            state=PolicyState.from_dict(data["state"]) if data["state"] else None,
            graphs=dict(data["graphs"]),
            protocol=data["protocol"],
            stages=data.get("stages"),
        )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.state is None:
            data["state"] = {}
        return data
