"""LLaVA-style VLMs (`LlavaForConditionalGeneration`): a CLIP/SigLIP tower, an MLP projector, a Llama-family decoder.

Everything tpc needs is read from the config: the image token id, how many image tokens one image becomes
(the patch grid, plus CLS under `vision_feature_select_strategy="full"`), which tower layer(s) the features come
from (`vision_feature_layer`, an index into the tower's hidden states, possibly a list), and the decoder's
shape. The vision tower reuses the encoder family adapters, so HiPrune taps it exactly as it taps a bare encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration, PretrainedConfig, PreTrainedModel

from tpc.errors import UsageError
from tpc.models_zoo.base import VisionEncoderAdapter, VisionGeometry
from tpc.models_zoo.validate import safe_from_pretrained

# LLaVA-1.5's conversation: BOS + a 34-token system prompt + "USER: " precede the image (the reference
# hard-codes SYS_TOKEN_LEN = 35); "\n{question} ASSISTANT:" follows it. Used when a model has no tokenizer.
DEFAULT_IMAGE_START = 35
DEFAULT_TEXT_AFTER_IMAGE = 12
SHOT_TEXT_TOKENS = 8  # each in-context example's text after its image, when a model has no tokenizer


@dataclass(frozen=True)
class DecoderGeometry:
    """Shapes of a Llama-family decoder, as its config states them."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int = 0  # max_position_embeddings (0: not stated)

    def layer_flops(self, tokens: int, context: int) -> int:
        """2x multiply-adds of one decoder layer for `tokens` new tokens attending to `context` keys on average."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        projections = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size
        return 2 * tokens * projections + 2 * 2 * tokens * context * q

    def head_flops(self, tokens: int) -> int:
        return 2 * tokens * self.hidden_size * self.vocab_size


def decoder_geometry(text: PretrainedConfig) -> DecoderGeometry:
    """A Llama-family text config's shapes."""
    heads = text.num_attention_heads
    return DecoderGeometry(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None) or 0,
    )


class DecoderStack(Protocol):
    """What tpc reads of a Llama-family decoder stack (transformers' `LlamaModel` and the models shaped like it)."""

    @property
    def layers(self) -> nn.ModuleList: ...

    @property
    def embed_tokens(self) -> nn.Module: ...

    @property
    def rotary_emb(self) -> nn.Module: ...

    @property
    def norm(self) -> nn.Module: ...


DecoderModelT = TypeVar("DecoderModelT", bound=PreTrainedModel)


class DecoderParts(Generic[DecoderModelT]):
    """Where a Llama-family decoder's parts are in a `DecoderModelT`, given where the family keeps the decoder
    (`language_model`)."""

    def language_model(self, model: DecoderModelT) -> DecoderStack:
        raise NotImplementedError

    def lm_head(self, model: DecoderModelT) -> nn.Module:
        raise NotImplementedError

    def decoder_layers(self, model: DecoderModelT) -> nn.ModuleList:
        return self.language_model(model).layers

    def embed_text(self, model: DecoderModelT, input_ids: Tensor) -> Tensor:
        return self.language_model(model).embed_tokens(input_ids)

    def rotary(self, model: DecoderModelT, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.language_model(model).rotary_emb(hidden, position_ids)

    def final_norm(self, model: DecoderModelT, hidden: Tensor) -> Tensor:
        return self.language_model(model).norm(hidden)


@dataclass(frozen=True)
class PromptLayout:
    """A static prompt: `text_len` text tokens and one run of `image_tokens` tokens per image, image i's run at
    `image_starts[i]` (positions in the prompt as transformers' processor expands it). Several images: an n-shot
    in-context prompt, image_1 text_1 ... image_n text_n query-image query-text, after a system prefix."""

    text_len: int
    image_starts: tuple[int, ...]
    image_tokens: int  # per image
    template: tuple[int, ...] | None = None  # the chat template's ids (each image as one token), when they fit

    @property
    def image_start(self) -> int:
        """The first image's first position."""
        return self.image_starts[0]

    @property
    def images(self) -> int:
        return len(self.image_starts)

    @property
    def length(self) -> int:
        """Tokens of the unpruned prompt, as transformers' processor expands it."""
        return self.text_len + self.all_image_tokens

    @property
    def all_image_tokens(self) -> int:
        """Every image's tokens together."""
        return self.images * self.image_tokens

    def starts_with(self, per_image: int) -> tuple[int, ...]:
        """Where the image runs start when each image is `per_image` tokens (a vision-side method's K)."""
        return tuple(start - i * (self.image_tokens - per_image) for i, start in enumerate(self.image_starts))


class LlavaAdapter(DecoderParts[LlavaForConditionalGeneration]):
    """One VLM family. Not a VisionEncoderAdapter: it owns one (the tower's) and adds the decoder side."""

    family: ClassVar[str] = "llava"
    kind: ClassVar[str] = "vlm"
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    model_class: ClassVar[type[PreTrainedModel]] = LlavaForConditionalGeneration

    refused_methods: ClassVar[dict[str, str]] = {}  # methods of the VLM kind this family cannot take, and why

    def __init__(self, towers: dict[str, VisionEncoderAdapter]) -> None:
        self.towers = towers  # vision model_type -> encoder adapter

    def tower(self, config: PretrainedConfig) -> VisionEncoderAdapter:
        model_type = config.vision_config.model_type
        if model_type not in self.towers:
            raise UsageError(
                f"LLaVA vision tower of type '{model_type}' is not supported; supported: {', '.join(self.towers)}"
            )
        return self.towers[model_type]

    def load(self, path: Path) -> PreTrainedModel:
        """`from_pretrained` as for an encoder: safetensors only, no remote code, failures one UsageError line."""
        return safe_from_pretrained(self.model_class, path, attn_implementation="sdpa").eval()

    def geometry(self, config: PretrainedConfig) -> VisionGeometry:
        return self.tower(config).geometry(config.vision_config)

    def decoder(self, config: PretrainedConfig) -> DecoderGeometry:
        return decoder_geometry(config.text_config)

    def feature_layers(self, config: PretrainedConfig) -> tuple[int, ...]:
        """`vision_feature_layer` (indices into hidden_states, 0 = embeddings) as 1-based layer numbers."""
        depth = self.geometry(config).num_layers
        given = config.vision_feature_layer
        indices = given if isinstance(given, list | tuple) else [given]
        layers = tuple(index if index >= 0 else depth + 1 + index for index in indices)
        if not all(1 <= layer <= depth for layer in layers):
            raise UsageError(
                f"vision_feature_layer {given} selects outside the tower's layers 1..{depth} "
                "(the embeddings, index 0, are not supported)"
            )
        return layers

    def vision_defaults(self, method: Any, config: PretrainedConfig) -> dict[str, Any]:
        """A vision-side method's model-derived defaults, from the tower's depth and the feature layer(s) — the raw
        `vision_feature_layer` too: HiPrune pairs hidden_states[p] with attentions[p] (layer p + 1)."""
        depth = self.geometry(config).num_layers
        return method.model_defaults(depth, max(self.feature_layers(config)), config.vision_feature_layer)

    def keeps_prefix(self, config: PretrainedConfig) -> bool:
        """Whether the LLM sees the tower's prefix (CLS) tokens: strategy 'full' keeps them, 'default' drops them."""
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise UsageError(f"vision_feature_select_strategy '{strategy}' is not one of 'default', 'full'")
        return strategy == "full"

    def image_tokens(self, config: PretrainedConfig) -> int:
        geometry = self.geometry(config)
        return geometry.num_patches + (geometry.prefix_tokens if self.keeps_prefix(config) else 0)

    def image_token_id(self, config: PretrainedConfig) -> int:
        return int(config.image_token_id)

    def seg_token_id(self, config: PretrainedConfig) -> int | None:
        """A LISA-style reasoning-segmentation model's [SEG] token (`seg_token_id`, or LISA's `seg_token_idx`):
        the decoder's final hidden state at it prompts a SAM-style mask decoder. None: not a segmentation model."""
        value = getattr(config, "seg_token_id", None)
        value = getattr(config, "seg_token_idx", None) if value is None else value
        if value is None:
            return None
        vocab = config.text_config.vocab_size
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise UsageError(f"config seg_token_id {value!r} is not a token id of the {vocab}-token vocabulary")
        return value

    def image_brackets(self, config: PretrainedConfig) -> tuple[int, int] | None:
        """Tokens that open and close an image's run in the prompt: none in LLaVA."""
        return None

    def reserved_token_ids(self, config: PretrainedConfig) -> tuple[int, ...]:
        """Ids besides the image and [SEG] tokens that a seeded prompt's text never holds: none in LLaVA."""
        return ()

    def eos_token_ids(self, config: PretrainedConfig) -> list[int]:
        eos = getattr(config.text_config, "eos_token_id", None)
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    # where the parts are in a loaded model
    def vision_tower(self, model: LlavaForConditionalGeneration) -> PreTrainedModel:
        return model.model.vision_tower

    def projector(self, model: LlavaForConditionalGeneration) -> nn.Module:
        return model.model.multi_modal_projector

    def language_model(self, model: LlavaForConditionalGeneration) -> DecoderStack:
        return model.model.language_model

    def lm_head(self, model: LlavaForConditionalGeneration) -> nn.Module:
        return model.lm_head

    def default_layout(
        self, config: PretrainedConfig, path: Path | None, prompt_len: int | None, shots: int = 0
    ) -> PromptLayout:
        """The prompt: LLaVA-1.5's layout, or the model's chat template when it has a tokenizer; with `shots`, that
        many example images (each followed by its text) before the query image."""
        image_id, images, count = self.image_token_id(config), shots + 1, self.image_tokens(config)
        template = chat_template_ids(path, image_id, images) if path is not None else None
        if template is not None and prompt_len in (None, len(template) - images):
            at = [i for i, token in enumerate(template) if token == image_id]
            starts = tuple(index + i * (count - 1) for i, index in enumerate(at))
            return PromptLayout(len(template) - images, starts, count, tuple(template))
        if shots == 0:
            text_len = DEFAULT_IMAGE_START + DEFAULT_TEXT_AFTER_IMAGE
            image_start = DEFAULT_IMAGE_START if template is None else template.index(image_id)
            if prompt_len is not None:
                if prompt_len < 2:
                    raise UsageError(f"--prompt-len {prompt_len} is too short: at least 2 text tokens around the image")
                text_len, image_start = prompt_len, min(image_start, prompt_len - 1)
            return PromptLayout(text_len, (image_start,), count)
        shot_text = shots * SHOT_TEXT_TOKENS
        text_len = DEFAULT_IMAGE_START + shot_text + DEFAULT_TEXT_AFTER_IMAGE if prompt_len is None else prompt_len
        prefix = min(DEFAULT_IMAGE_START, text_len - shot_text - 1)
        if prefix < 1:
            raise UsageError(
                f"--prompt-len {prompt_len} is too short for {shots} shots: at least {shot_text + 2} text tokens "
                f"(a prefix, {SHOT_TEXT_TOKENS} per example, the query's text)"
            )
        starts = tuple(prefix + i * (count + SHOT_TEXT_TOKENS) for i in range(images))
        return PromptLayout(text_len, starts, count)


DEFAULT_QUESTION = "What is shown in this image?"
SHOT_ANSWER = "This is an example."  # each in-context example's text in a chat template


def chat_template_ids(path: Path, image_token_id: int, images: int = 1) -> list[int] | None:
    """Token ids of the model's chat template for `images` images (image as one token): `images - 1` examples, each
    an image and a short text, then the query image and a default question."""
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError):
        return None
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    parts = [{"type": "image"}, {"type": "text", "text": SHOT_ANSWER}] * (images - 1)
    parts += [{"type": "image"}, {"type": "text", "text": DEFAULT_QUESTION}]
    messages: list[dict[str, str | list[dict[str, str]]]] = [{"role": "user", "content": parts}]
    # transformers annotates a message's content as str only; a multimodal message's content is a list of parts
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[arg-type]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if ids.count(image_token_id) == images else None
