"""A model read as an image classifier, three ways: unpruned eager, pruned eager, pruned exported (`tpc eval`).

Two readings exist, one per kind that has one:
- an encoder with a classification head (`CLIPForImageClassification`: a linear layer on the mean of the last
  layer's patch tokens). Pruned, the head sees the mean of the kept tokens, as a VLM's decoder sees only the kept
  ones; the head runs in numpy on the features the eager module or the exported graph returns, so the two differ
  only by the graph.
- a VLM whose `config.id2label` names each class by a word of its vocabulary: the prediction is the first greedy
  token after the chat template's question (the prefill's logits). An n-shot prompt (`--param shots=N`) shows N
  examples; where "This is a <word>." tokenizes to as many tokens as the template's "This is an example.", the
  examples say their class, in the same static layout.

A prediction is a class index, or -1 when the model answered none of the classes, with the margin between its
two best scores, so that an exported model disagreeing with eager can be told apart as a near-tie.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpc.contract.names import PIXEL_VALUES
from tpc.errors import UsageError
from tpc.kinds.base import Pruned, eager_outputs
from tpc.kinds.encoder import EncoderPlan
from tpc.kinds.vlm import VlmPlan, eager_loop, seeded_prompt
from tpc.models_zoo import LlavaAdapter, ModelSource
from tpc.models_zoo.base import VisionEncoderAdapter
from tpc.models_zoo.llava import SHOT_ANSWER
from tpc.models_zoo.validate import safe_from_pretrained
from tpc.runtimes.encoder import Encoder
from tpc.runtimes.generation import VLM

KEPT_FEATURES = "kept_features"
CLASSIFIER_HEADS = ("CLIPForImageClassification",)  # the heads whose pooling tpc reproduces on kept tokens


@dataclass(frozen=True)
class Predictions:
    labels: np.ndarray  # (N,) int64: a class index, -1 when the model's best answer is none of the classes
    margins: np.ndarray  # (N,) float32: best score minus the second best, over everything the model can answer

    @classmethod
    def of(cls, scores: np.ndarray, columns: np.ndarray) -> Predictions:
        """`scores` (N, V): the model's scores; `columns` (C,): the column of each class among them."""
        scores = np.asarray(scores, dtype=np.float32)
        lookup = np.full(scores.shape[1], -1, dtype=np.int64)
        lookup[columns] = np.arange(len(columns))
        top_two = np.partition(scores, -2, axis=1)[:, -2:] if scores.shape[1] > 1 else np.repeat(scores, 2, 1)
        return cls(lookup[scores.argmax(axis=1)], (top_two[:, 1] - top_two[:, 0]).astype(np.float32))

    @classmethod
    def concat(cls, parts: list[Predictions]) -> Predictions:
        return cls(np.concatenate([p.labels for p in parts]), np.concatenate([p.margins for p in parts]))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Batch:
    """Query images (B, C, H, W) as the processor normalises them, and an n-shot prompt's examples: their images
    (B, shots, C, H, W) and class indices (B, shots)."""

    pixels: np.ndarray
    example_pixels: np.ndarray | None = None
    example_labels: np.ndarray | None = None


Run = Callable[[Batch], Predictions]


@dataclass(frozen=True)
class Preprocessing:
    """What the model's processor does to a uint8 image: x / 255, then (x - mean) / std per channel."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, directory: Path, size: int, channels: int) -> Preprocessing:
        """From the model directory's preprocessor_config.json; without one, mean = std = 0.5 per channel."""
        mean, std = [0.5] * channels, [0.5] * channels
        path = directory / "preprocessor_config.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise UsageError(f"'{path}' is not readable JSON ({err}); fix or remove it") from None
            if data.get("do_normalize", True):
                mean, std = list(data.get("image_mean", mean)), list(data.get("image_std", std))
            else:
                mean, std = [0.0] * channels, [1.0] * channels
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        if len(mean) != channels or len(std) != channels or not all(s > 0 for s in std):
            raise UsageError(
                f"'{path}': image_mean {mean} / image_std {std} do not fit the model's {channels} channel(s); fix it"
            )
        return cls(size, channels, tuple(float(m) for m in mean), tuple(float(s) for s in std))


class Classifier(ABC):
    """A model read as a classifier: its classes, its preprocessing, and the three ways to run it."""

    classes: tuple[str, ...]
    preprocessing: Preprocessing
    shots: int = 0  # in-context examples before each query (a VLM's n-shot prompt)

    @abstractmethod
    def unpruned(self) -> Run:
        """The model's own transformers class, eager: what retention is measured against."""

    @abstractmethod
    def eager(self, pruned: Pruned) -> Run:
        """The pruned eager components (the modules an export is traced from)."""

    @abstractmethod
    def exported(self, directory: Path) -> Run:
        """An export of the same request, in its target's runtime (numpy in, numpy out)."""


def _check_classes(names: Mapping[Any, Any] | None, ref: str) -> tuple[str, ...]:
    """config.id2label as class names in label order; a config without real labels cannot be scored."""
    labels = {int(k): str(v) for k, v in (names or {}).items()}
    if not labels or sorted(labels) != list(range(len(labels))) or all(v == f"LABEL_{k}" for k, v in labels.items()):
        raise UsageError(
            f"'{ref}' names no classes (config.json id2label is {'empty' if not labels else 'the default LABEL_i'}); "
            "tpc eval needs id2label, one entry per class of the dataset"
        )
    return tuple(labels[i] for i in range(len(labels)))


class HeadClassifier(Classifier):
    """`CLIPForImageClassification`: logits = W mean(kept patch tokens of the last layer) + b."""

    def __init__(self, plan: EncoderPlan) -> None:
        source = plan.source
        architectures = getattr(source.config, "architectures", None) or []
        if not set(architectures) & set(CLASSIFIER_HEADS):
            raise UsageError(
                f"'{source.ref}' is a vision encoder without a classification head (config.json architectures "
                f"{architectures or 'not stated'}); tpc eval reads {', '.join(CLASSIFIER_HEADS)} checkpoints and VLMs "
                "that answer with a class name"
            )
        if plan.feature_layer != source.geometry.num_layers:
            raise UsageError(
                f"the classification head reads the last encoder layer ({source.geometry.num_layers}); "
                f"drop --param feature_layer={plan.feature_layer}"
            )
        self.plan = plan
        self.classes = _check_classes(source.config.id2label, source.ref)
        geometry = source.geometry
        self.preprocessing = Preprocessing.of(source.path, geometry.image_size, geometry.channels)
        from transformers import CLIPForImageClassification

        self.model = safe_from_pretrained(CLIPForImageClassification, source.path, attn_implementation="sdpa").eval()
        head = self.model.classifier
        self.weight = head.weight.detach().float().numpy().T.copy()  # (D, C)
        self.bias = head.bias.detach().float().numpy().copy()
        self.columns = np.arange(len(self.classes))

    def _head(self, kept_features: np.ndarray) -> Predictions:
        pooled = kept_features.astype(np.float32).mean(axis=1)
        return Predictions.of(pooled @ self.weight + self.bias, self.columns)

    def unpruned(self) -> Run:
        def run(batch: Batch) -> Predictions:
            with torch.no_grad():
                logits = self.model(pixel_values=torch.from_numpy(batch.pixels)).logits
            return Predictions.of(logits.float().numpy(), self.columns)

        return run

    def eager(self, pruned: Pruned) -> Run:
        component = next(iter(pruned.components.values()))
        return lambda batch: self._head(eager_outputs(component, {PIXEL_VALUES: batch.pixels})[KEPT_FEATURES])

    def exported(self, directory: Path) -> Run:
        encoder = Encoder.load(directory)
        return lambda batch: self._head(encoder.run(batch.pixels)[KEPT_FEATURES])


class AnswerClassifier(Classifier):
    """A VLM answering the chat template's question with a class's word: the prefill's logits over the vocabulary,
    each class's column its word's token id."""

    def __init__(self, plan: VlmPlan) -> None:
        source = plan.source
        if plan.prompt.template is None:
            raise UsageError(
                f"'{source.ref}' has no tokenizer with a chat template; tpc eval asks a VLM the template's question "
                "and reads the answer (save the tokenizer beside config.json)"
            )
        self.plan = plan
        self.classes = _check_classes(source.config.id2label, source.ref)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
        columns = []
        for name in self.classes:
            ids = self.tokenizer(name, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise UsageError(
                    f"class '{name}' is {len(ids)} tokens of '{source.ref}''s tokenizer; tpc eval reads the first "
                    "answer token, so each id2label name must be one token"
                )
            columns.append(ids[0])
        self.columns = np.array(columns, dtype=np.int64)
        geometry = source.geometry
        self.preprocessing = Preprocessing.of(source.path, geometry.image_size, geometry.channels)
        self.shots = plan.prompt.images - 1
        self.prompt = seeded_prompt(plan, 0)[0]  # the chat template's prompt, each image expanded
        self.labelled = self._labelled_examples()
        self.model: Any = None

    def _labelled_examples(self) -> tuple[list[int], np.ndarray] | None:
        """Where each example's "This is an example." sits and the ids that say its class instead, when "This is a
        <class>." has the same token count (else the examples stay unlabelled)."""
        if not self.shots:
            return None
        plain = self.tokenizer(SHOT_ANSWER, add_special_tokens=False)["input_ids"]
        named = [self.tokenizer(f"This is a {c}.", add_special_tokens=False)["input_ids"] for c in self.classes]
        if any(len(ids) != len(plain) for ids in named):
            return None
        row, width = self.prompt.tolist(), len(plain)
        starts = [i for i in range(len(row) - width + 1) if row[i : i + width] == plain][: self.shots]
        return (starts, np.array(named, dtype=np.int64)) if len(starts) == self.shots else None

    def _ids(self, batch: Batch) -> np.ndarray:
        rows = np.tile(self.prompt, (len(batch.pixels), 1))
        if self.labelled is not None and batch.example_labels is not None:
            starts, named = self.labelled
            width = named.shape[1]
            for shot, start in enumerate(starts):
                rows[:, start : start + width] = named[batch.example_labels[:, shot]]
        return rows

    def _images(self, batch: Batch) -> np.ndarray:
        """(B, C, H, W), or (B, shots + 1, C, H, W) with the examples first, as the generation loop takes them."""
        if not self.shots:
            return batch.pixels
        assert batch.example_pixels is not None, "an n-shot prompt's batch carries its examples"
        return np.concatenate([batch.example_pixels, batch.pixels[:, None]], axis=1)

    def unpruned(self) -> Run:
        self.model = self.model or self.plan.adapter.load(self.plan.source.path)

        def run(batch: Batch) -> Predictions:
            images = self._images(batch)
            pixels = torch.from_numpy(images.reshape(-1, *images.shape[-3:]))
            with torch.no_grad():
                logits = self.model(input_ids=torch.from_numpy(self._ids(batch)), pixel_values=pixels).logits
            return Predictions.of(logits[:, -1].float().numpy(), self.columns)

        return run

    def eager(self, pruned: Pruned) -> Run:
        loop = eager_loop(pruned)
        return lambda batch: Predictions.of(loop.first_logits(self._images(batch), self._ids(batch)), self.columns)

    def exported(self, directory: Path) -> Run:
        vlm = VLM.load(directory)
        return lambda batch: Predictions.of(vlm.first_logits(self._images(batch), self._ids(batch)), self.columns)


def required_params(source: ModelSource) -> dict[str, str]:
    """--param values every request of an evaluation carries: a classification head reads the last encoder layer,
    so a classifier's tokens are pruned there (not at LLaVA's penultimate feature layer, the encoder default).
    A random-initialised zoo model, or one of a family no reading applies to, is one UsageError line, before
    anything is planned."""
    entry = source.zoo_entry
    if entry is not None and not entry.trained:
        raise UsageError(
            f"'{source.ref}' is random-initialised: its accuracy would mean nothing whatever it keeps; tpc eval takes "
            "a trained model: zoo:fmnist-vit, zoo:fmnist-llava or your own checkpoint"
        )
    if isinstance(source.adapter, VisionEncoderAdapter):
        return {"feature_layer": str(source.geometry.num_layers)}
    if isinstance(source.adapter, LlavaAdapter):
        return {}
    raise _unreadable(source.ref)


def _unreadable(ref: str) -> UsageError:
    return UsageError(
        f"'{ref}' cannot be read as an image classifier; tpc eval takes a {' or '.join(CLASSIFIER_HEADS)} checkpoint "
        "or a LLaVA-style VLM that answers with a class name"
    )


def budget(plan: Any) -> tuple[int, int]:
    """(the tokens the plan's keep is counted among, the vision-side budget per image that hands the decoder as many
    image tokens): a decoder method's keep on an n-shot prompt spans every image; otherwise it is one image's."""
    if isinstance(plan, VlmPlan) and plan.prunes_in_prefill and plan.prompt.images > 1:
        return plan.prompt.all_image_tokens, max(1, plan.keep // plan.prompt.images)
    if isinstance(plan, VlmPlan):
        return plan.prompt.image_tokens, int(plan.keep)
    return plan.source.geometry.num_patches, int(plan.keep)


def classifier(plan: Any) -> Classifier:
    """The reading of the plan's model (one UsageError line when it has none: a policy, a bare encoder)."""
    if isinstance(plan, EncoderPlan):
        return HeadClassifier(plan)
    if isinstance(plan, VlmPlan) and plan.qwen is None:
        return AnswerClassifier(plan)
    raise _unreadable(plan.request.model)
