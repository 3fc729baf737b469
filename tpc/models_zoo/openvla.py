"""OpenVLA-style policies: DINOv2 + SigLIP towers on one image, a fused MLP projector, a Llama decoder, actions.

A checkpoint directory has the layout of the public `openvla/openvla-7b` release: its `config.json` fields
(`timm_model_ids`, `image_sizes`, `text_config`, `norm_stats`, `n_action_bins`, `pad_to_multiple_of`, ...) and its
weight names, which for the towers are timm's (`vision_backbone.featurizer.blocks.3.attn.qkv.weight`,
`...ls1.scale_factor`, `pos_embed`). Loading maps them onto transformers' `Dinov2WithRegistersModel` and
`SiglipVisionModel` (fused qkv split into q/k/v, layer scales, position tables) and hands the converted state dict
to `from_pretrained`; the decoder (`LlamaForCausalLM`) and projector names are the release's unchanged.

What the release computes, and so what this module computes:
- pixel_values (B, 6, H, W): the image normalised twice, DINOv2's statistics in channels 0-2, SigLIP's in 3-5;
- each tower's patch tokens from its second-to-last block, no final norm (`get_intermediate_layers(n={depth-2})`,
  prefix tokens dropped), concatenated per patch; the projector fc1 -> GELU -> fc2 -> GELU -> fc3;
- the LLM sequence is BOS, the image tokens, then the rest of the prompt (no image placeholder ids);
- 7 greedy action tokens, read as bins counted down from `vocab_size - pad_to_multiple_of`.
timm 0.9.x (the release's pin) builds both towers with exact GELU and LayerNorm eps 1e-6; so do we.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypedDict, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    Dinov2WithRegistersConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers import Dinov2WithRegistersModel as Dinov2Model
from transformers.utils import logging

from tpc.errors import UsageError
from tpc.models_zoo.base import VisionGeometry
from tpc.models_zoo.llava import DecoderGeometry, DecoderParts, DecoderStack, PromptLayout, decoder_geometry
from tpc.models_zoo.validate import LoadingInfo, check_loading_info, check_weights, loading


@dataclass(frozen=True)
class TowerSpec:
    """One timm ViT of the fused backbone, in the terms transformers' configs need."""

    family: str  # "dinov2" (CLS + registers, layer scale) or "siglip" (patches only)
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    registers: int = 0

    @property
    def prefix_tokens(self) -> int:
        return 1 + self.registers if self.family == "dinov2" else 0


# The towers the release's `timm_model_ids` name (timm's architecture definitions; pretrained tags stripped).
TIMM_TOWERS: dict[str, TowerSpec] = {
    "vit_large_patch14_reg4_dinov2": TowerSpec("dinov2", 1024, 24, 16, 4096, 14, registers=4),
    "vit_so400m_patch14_siglip_224": TowerSpec("siglip", 1152, 27, 16, 4304, 14),
    "vit_so400m_patch14_siglip_384": TowerSpec("siglip", 1152, 27, 16, 4304, 14),
}
# Per-dataset image statistics of the two towers (timm's data configs), applied by the release's processor.
TOWER_NORMALIZATION = {
    "dinov2": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "siglip": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}
RELEASE_TIMM_IDS = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")
PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
EMPTY_TOKEN_ID = 29871  # Llama-2's "▁": the release appends it after "Out:" when the tokenizer did not
DEFAULT_TEXT_TOKENS = 24  # BOS + the prompt of a typical LIBERO instruction + 29871 (Llama-2 tokenizer)
FEATURE_LAYER_FROM_END = 2  # get_intermediate_layers(n={depth - 2}): the second-to-last block


class OpenVlaConfig(PretrainedConfig):
    """The release's `OpenVLAConfig` fields. `tower_specs` (tpc's addition) describes towers of sizes timm does
    not name (tiny test checkpoints); the release's own loader ignores it."""

    model_type = "openvla"

    def __init__(
        self,
        vision_backbone_id: str = "dinosiglip-vit-so-224px",
        llm_backbone_id: str = "llama2-7b-pure",
        arch_specifier: str = "no-align+fused-gelu-mlp",
        use_fused_vision_backbone: bool = True,
        image_resize_strategy: str = "resize-naive",
        text_config: dict[str, Any] | PretrainedConfig | None = None,
        llm_max_length: int = 2048,
        pad_token_id: int = 32000,
        pad_to_multiple_of: int = 64,
        output_projector_states: bool = False,
        norm_stats: dict[str, Any] | None = None,
        n_action_bins: int = 256,
        timm_model_ids: list[str] | None = None,
        timm_override_act_layers: list[str | None] | None = None,
        image_sizes: list[int] | None = None,
        tower_specs: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vision_backbone_id, self.llm_backbone_id = vision_backbone_id, llm_backbone_id
        self.arch_specifier, self.use_fused_vision_backbone = arch_specifier, use_fused_vision_backbone
        self.image_resize_strategy, self.llm_max_length = image_resize_strategy, llm_max_length
        self.pad_to_multiple_of, self.output_projector_states = pad_to_multiple_of, output_projector_states
        self.norm_stats, self.n_action_bins = norm_stats or {}, n_action_bins
        self.timm_model_ids = timm_model_ids or list(RELEASE_TIMM_IDS)
        self.timm_override_act_layers = timm_override_act_layers or [None, None]
        self.image_sizes = image_sizes or [224, 224]
        self.tower_specs = tower_specs
        text = text_config.to_dict() if isinstance(text_config, PretrainedConfig) else dict(text_config or {})
        text.pop("model_type", None)
        self.text_config = LlamaConfig(**text)
        # PreTrainedConfig takes any keyword (strict(accept_kwargs=True)); its dataclass signature lists its fields only
        super().__init__(pad_token_id=pad_token_id, **kwargs)  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["text_config"] = self.text_config.to_dict()
        return data


AutoConfig.register(OpenVlaConfig.model_type, OpenVlaConfig)


def tower_specs(config: OpenVlaConfig) -> list[TowerSpec]:
    """The two towers (DINOv2 first, then SigLIP), from `tower_specs` or the timm ids the release names."""
    if not config.use_fused_vision_backbone or len(config.timm_model_ids) != 2:
        raise UsageError(
            f"OpenVLA checkpoint with vision backbone '{config.vision_backbone_id}': only the fused two-tower "
            "backbones (dinosiglip-*) are supported"
        )
    if config.tower_specs is not None:
        specs = [TowerSpec(**spec) for spec in config.tower_specs]
    else:
        names = [timm_id.split(".")[0] for timm_id in config.timm_model_ids]
        unknown = [name for name in names if name not in TIMM_TOWERS]
        if unknown:
            raise UsageError(f"vision tower '{unknown[0]}' is not supported; supported: {', '.join(TIMM_TOWERS)}")
        specs = [TIMM_TOWERS[name] for name in names]
    if [spec.family for spec in specs] != ["dinov2", "siglip"]:
        raise UsageError(f"expected a DINOv2 tower then a SigLIP tower, got {[spec.family for spec in specs]}")
    return specs


class _ViTFields(TypedDict):
    """The fields both towers' transformers configs take alike (timm's ViT settings)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    layer_norm_eps: float
    hidden_act: str


def _tower_config(spec: TowerSpec, image_size: int) -> Dinov2WithRegistersConfig | SiglipVisionConfig:
    common: _ViTFields = {
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "patch_size": spec.patch_size,
        "image_size": image_size,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
    }
    if spec.family == "dinov2":
        mlp_ratio, rest = divmod(spec.intermediate_size, spec.hidden_size)
        if rest:
            raise UsageError(f"DINOv2 tower: intermediate_size {spec.intermediate_size} is not a multiple of its width")
        return Dinov2WithRegistersConfig(**common, mlp_ratio=mlp_ratio, num_register_tokens=spec.registers)
    return SiglipVisionConfig(**common, intermediate_size=spec.intermediate_size, vision_use_head=False)


class FusedVisionBackbone(nn.Module):
    """DINOv2 (channels 0-2) and SigLIP (channels 3-5) patch features from each tower's second-to-last block."""

    def __init__(self, config: OpenVlaConfig) -> None:
        super().__init__()
        self.specs = tower_specs(config)
        dino, siglip = (_tower_config(s, size) for s, size in zip(self.specs, config.image_sizes, strict=True))
        assert isinstance(dino, Dinov2WithRegistersConfig) and isinstance(siglip, SiglipVisionConfig)  # tower_specs
        dino._attn_implementation = siglip._attn_implementation = "sdpa"
        self.featurizer = Dinov2Model(dino)
        self.fused_featurizer = SiglipVisionModel(siglip)

    @property
    def embed_dim(self) -> int:
        return sum(spec.hidden_size for spec in self.specs)

    def tower_layers(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        return self.featurizer.encoder.layer, self.fused_featurizer.encoder.layers

    def forward(self, pixel_values: Tensor) -> Tensor:
        dino_pixels, siglip_pixels = torch.split(pixel_values, [3, 3], dim=1)
        dino_layers, siglip_layers = self.tower_layers()
        hidden = self.featurizer.embeddings(dino_pixels)
        for layer in dino_layers[: len(dino_layers) - 1]:
            hidden = layer(hidden)
        fused = self.fused_featurizer.embeddings(siglip_pixels)
        for layer in siglip_layers[: len(siglip_layers) - 1]:
            fused = layer(fused, None)
        return torch.cat([hidden[:, self.specs[0].prefix_tokens :], fused], dim=2)


class FusedProjector(nn.Module):
    """The release's `no-align+fused-gelu-mlp` projector: fc1 (4x the vision width) -> GELU -> fc2 -> GELU -> fc3."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()

    def forward(self, features: Tensor) -> Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(features)))))


class OpenVlaForActionPrediction(PreTrainedModel):
    """The policy as transformers modules, with the release's module names at the top level."""

    config: OpenVlaConfig
    config_class = OpenVlaConfig
    base_model_prefix = "openvla"
    _supports_sdpa = True

    def __init__(self, config: OpenVlaConfig) -> None:
        super().__init__(config)
        self.vision_backbone = FusedVisionBackbone(config)
        self.projector = FusedProjector(self.vision_backbone.embed_dim, config.text_config.hidden_size)
        text = config.text_config
        text._attn_implementation = "sdpa"
        self.language_model = LlamaForCausalLM(text)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.text_config.initializer_range
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        """(B, 6, H, W) -> (B, patches, D_llm): the LLM input embeddings of the image tokens."""
        return self.projector(self.vision_backbone(pixel_values))

    def multimodal_embeddings(self, pixel_values: Tensor, input_ids: Tensor) -> Tensor:
        """BOS, the image tokens, the rest of the prompt (the release inserts the image after BOS)."""
        text = self.language_model.get_input_embeddings()(input_ids)
        return torch.cat([text[:, :1], self.image_embeddings(pixel_values), text[:, 1:]], dim=1)

    @torch.no_grad()
    def generate_action_tokens(self, pixel_values: Tensor, input_ids: Tensor, action_dim: int) -> Tensor:
        """The release's `predict_action` up to the token ids: transformers' greedy `generate`, `action_dim` tokens."""
        embeds = self.multimodal_embeddings(pixel_values, input_ids)
        # transformers' GenerativePreTrainedModel protocol (generate's self type) does not match its own models
        tokens = self.language_model.generate(  # type: ignore[misc]
            inputs_embeds=embeds, max_new_tokens=action_dim, min_new_tokens=action_dim, do_sample=False
        )
        assert isinstance(tokens, Tensor)  # return_dict_in_generate is off: the token ids
        return tokens

    @classmethod
    def from_release(cls, path: Path) -> OpenVlaForActionPrediction:
        """Load a directory in the release layout through `from_pretrained` (weights converted to module names)."""
        config = OpenVlaConfig.from_pretrained(str(path))
        state = release_to_modules(read_release_weights(path), config)
        # DINOv2's mask token (masked-image training only) is not in the release
        state[DINO + "embeddings.mask_token"] = torch.zeros(1, tower_specs(config)[0].hidden_size)
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the load report; incomplete checkpoints are an error below
        logging.disable_progress_bar()
        try:
            # with output_loading_info, from_pretrained returns (model, report); transformers annotates only the model
            model, info = cast(
                "tuple[OpenVlaForActionPrediction, LoadingInfo]",
                cls.from_pretrained(
                    None, config=config, state_dict=state, output_loading_info=True, ignore_mismatched_sizes=True
                ),
            )
        finally:
            logging.set_verbosity(verbosity)
            logging.enable_progress_bar()
        check_loading_info({"mismatched_keys": info["mismatched_keys"]}, path)
        missing = info["missing_keys"]
        if missing or info["unexpected_keys"]:
            raise UsageError(
                f"'{path}' does not hold a complete OpenVLA checkpoint: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(info['unexpected_keys'])[:3]}"
            )
        return model.eval()

    def save_release(self, path: Path) -> None:
        """Write config.json + model.safetensors in the release layout (what `from_release` reads)."""
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config["architectures"] = ["OpenVLAForActionPrediction"]
        config["auto_map"] = {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        }
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = modules_to_release(self.state_dict(), self.config)
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path / "model.safetensors"))


# --- the release's weight names <-> transformers module names -------------------------------------------------

DINO, SIGLIP = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
SIGLIP_MODULE = SIGLIP  # transformers 5 flattens SiglipVisionModel (no `vision_model.` level)
UNUSED_RELEASE_PREFIXES = (SIGLIP + "attn_pool.",)  # SigLIP's MAP head: features come from an earlier block
# (release name, module name) per block; `{q}` marks the fused qkv projection split three ways
DINO_BLOCK = (
    ("norm1", "norm1"),
    ("attn.qkv", "attention.{q}_proj"),
    ("attn.proj", "attention.o_proj"),
    ("ls1.scale_factor", "layer_scale1.lambda1"),
    ("norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
    ("ls2.scale_factor", "layer_scale2.lambda1"),
)
SIGLIP_BLOCK = (
    ("norm1", "layer_norm1"),
    ("attn.qkv", "self_attn.{q}_proj"),
    ("attn.proj", "self_attn.out_proj"),
    ("norm2", "layer_norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)


def _renames(config: OpenVlaConfig) -> list[tuple[str, str]]:
    """(release name, module name) pairs of every tower tensor that is a plain rename (qkv listed with `{q}`)."""
    dino, siglip = tower_specs(config)
    pairs = [
        (DINO + "cls_token", DINO + "embeddings.cls_token"),
        (DINO + "reg_token", DINO + "embeddings.register_tokens"),
        (DINO + "patch_embed.proj", DINO + "embeddings.patch_embeddings.projection"),
        (DINO + "norm", DINO + "layernorm"),
        (SIGLIP + "patch_embed.proj", SIGLIP_MODULE + "embeddings.patch_embedding"),
        (SIGLIP + "norm", SIGLIP_MODULE + "post_layernorm"),
    ]
    for spec, release, module, block in (
        (dino, DINO, DINO + "encoder.layer.", DINO_BLOCK),
        (siglip, SIGLIP, SIGLIP_MODULE + "encoder.layers.", SIGLIP_BLOCK),
    ):
        for index in range(spec.num_layers):
            pairs += [(f"{release}blocks.{index}.{a}", f"{module}{index}.{b}") for a, b in block]
    return pairs


def _with_suffixes(pairs: list[tuple[str, str]], names: set[str]) -> list[tuple[str, str]]:
    """Expand module-level pairs to tensors (`.weight`/`.bias`) present in `names` (release side)."""
    out = []
    for release, module in pairs:
        if release in names:
            out.append((release, module))
        out += [(f"{release}.{s}", f"{module}.{s}") for s in ("weight", "bias") if f"{release}.{s}" in names]
    return out


def release_to_modules(state: dict[str, Tensor], config: OpenVlaConfig) -> dict[str, Tensor]:
    """The release's tensors under this module's names. Unknown names are an error, not silently dropped."""
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED_RELEASE_PREFIXES)}
    out = {k: v for k, v in state.items() if not k.startswith(("vision_backbone.",))}
    used = set(out)
    for release, module in _with_suffixes(_renames(config), set(state)):
        used.add(release)
        if "{q}" in module:
            for part, chunk in zip("qkv", state[release].chunk(3, dim=0), strict=True):
                out[module.replace("{q}", part)] = chunk
        else:
            out[module] = state[release]
    # timm adds the DINOv2 table to the patches only (no_embed_class) and SigLIP has no CLS: transformers'
    # DINOv2 table has a CLS row (zero reproduces timm) and SigLIP's is an embedding table
    dino_pos, siglip_pos = state[DINO + "pos_embed"], state[SIGLIP + "pos_embed"]
    out[DINO + "embeddings.position_embeddings"] = torch.cat([torch.zeros_like(dino_pos[:, :1]), dino_pos], dim=1)
    out[SIGLIP_MODULE + "embeddings.position_embedding.weight"] = siglip_pos[0]
    used |= {DINO + "pos_embed", SIGLIP + "pos_embed"}
    unknown = sorted(set(state) - used)
    if unknown:
        raise UsageError(f"OpenVLA checkpoint has weights this loader does not know: {', '.join(unknown[:3])}")
    return out


def modules_to_release(state: dict[str, Tensor], config: OpenVlaConfig) -> dict[str, Tensor]:
    """Inverse of `release_to_modules` (the zoo writes its models in the release layout)."""
    out = {k: v for k, v in state.items() if not k.startswith("vision_backbone.")}
    module_names = set(state)
    for release, module in _renames(config):
        for suffix in ("", ".weight", ".bias"):
            first = module.replace("{q}", "q") + suffix
            if first not in module_names:
                continue
            if "{q}" in module:
                out[release + suffix] = torch.cat([state[module.replace("{q}", p) + suffix] for p in "qkv"], dim=0)
            else:
                out[release + suffix] = state[module + suffix]
    out[DINO + "pos_embed"] = state[DINO + "embeddings.position_embeddings"][:, 1:]
    out[SIGLIP + "pos_embed"] = state[SIGLIP_MODULE + "embeddings.position_embedding.weight"][None]
    return out


def read_release_weights(path: Path) -> dict[str, Tensor]:
    """model.safetensors, or the shards its index lists (the 7B release is sharded)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    single = path / "model.safetensors"
    if not single.exists():
        raise UsageError(f"'{path}' has no model.safetensors or model.safetensors.index.json (OpenVLA release layout)")
    return load_file(str(single))


# --- the family adapter ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyGeometry:
    """What one control step is made of: the image tokens, the towers, the action head."""

    image_size: int
    grid: tuple[int, int]
    towers: tuple[TowerSpec, ...]
    action_dim: int
    n_action_bins: int
    action_vocab_size: int  # bins are counted down from here (the vocabulary without its padding)

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def tower_flops(self) -> int:
        """2x multiply-adds of both towers up to their feature block."""
        total = 0
        for spec in self.towers:
            tokens, d, i = spec.prefix_tokens + self.image_tokens, spec.hidden_size, spec.intermediate_size
            per_layer = 2 * tokens * (4 * d * d + 2 * d * i) + 2 * 2 * tokens * tokens * d
            total += per_layer * (spec.num_layers - 1)
        return total


class OpenVlaAdapter(DecoderParts[OpenVlaForActionPrediction]):
    """The OpenVLA family: a policy, one control step = towers, projector, prefill and the action decode."""

    family: ClassVar[str] = "openvla"
    kind: ClassVar[str] = "vla"
    model_types: ClassVar[tuple[str, ...]] = ("openvla",)
    model_class: ClassVar[type[PreTrainedModel]] = OpenVlaForActionPrediction

    def load(self, path: Path) -> OpenVlaForActionPrediction:
        """The release layout through tpc's own implementation (the directory's code is never run), from
        safetensors only; headers and shapes are checked first, and any failure is one UsageError line."""
        with loading(path):
            config = OpenVlaConfig.from_pretrained(str(path), local_files_only=True)
            with torch.device("meta"):
                release = modules_to_release(OpenVlaForActionPrediction(config).state_dict(), config)
            check_weights(path, {name: tuple(tensor.shape) for name, tensor in release.items()})
            return OpenVlaForActionPrediction.from_release(path)

    def save(self, model: OpenVlaForActionPrediction, path: Path) -> None:
        model.save_release(path)

    def policy(self, config: OpenVlaConfig, unnorm_key: str | None = None) -> PolicyGeometry:
        specs = tower_specs(config)
        sizes = set(config.image_sizes)
        patches = {size // spec.patch_size for spec, size in zip(specs, config.image_sizes, strict=True)}
        if len(sizes) != 1 or len(patches) != 1:
            raise UsageError(f"the two towers must see the same image and grid, got sizes {config.image_sizes}")
        side = patches.pop()
        return PolicyGeometry(
            image_size=sizes.pop(),
            grid=(side, side),
            towers=tuple(specs),
            action_dim=len(action_stats(config, unnorm_key)["q01"]),
            n_action_bins=config.n_action_bins,
            action_vocab_size=config.text_config.vocab_size - config.pad_to_multiple_of,
        )

    def geometry(self, config: PretrainedConfig) -> VisionGeometry:
        """The image the policy takes (6 channels: both towers' normalisations) and its patch grid. The layer
        fields describe the DINOv2 tower; `policy()` has both towers. `config`: an OpenVLA source's (every family's
        adapter takes the config its source holds)."""
        assert isinstance(config, OpenVlaConfig)  # resolve() and the zoo make an openvla source's config one
        policy, dino = self.policy(config), tower_specs(config)[0]
        return VisionGeometry(
            image_size=policy.image_size,
            patch_size=dino.patch_size,
            channels=6,
            prefix_tokens=0,
            num_layers=dino.num_layers,
            hidden_size=dino.hidden_size,
            num_heads=dino.num_heads,
            intermediate_size=dino.intermediate_size,
        )

    def decoder(self, config: OpenVlaConfig) -> DecoderGeometry:
        return decoder_geometry(config.text_config)

    def default_layout(self, config: OpenVlaConfig, prompt_len: int | None) -> PromptLayout:
        """BOS at 0, the image tokens at 1.., then the instruction prompt (`prompt_len` text tokens, BOS included)."""
        text = DEFAULT_TEXT_TOKENS if prompt_len is None else prompt_len
        if text < 2:
            raise UsageError(f"--prompt-len {text} is too short: BOS and at least one prompt token")
        return PromptLayout(text, (1,), self.policy(config).image_tokens)

    # where the parts are in a loaded model
    def language_model(self, model: OpenVlaForActionPrediction) -> DecoderStack:
        return model.language_model.model

    def lm_head(self, model: OpenVlaForActionPrediction) -> nn.Module:
        return model.language_model.lm_head


def action_stats(config: OpenVlaConfig, unnorm_key: str | None = None) -> dict[str, Any]:
    """The release's `get_action_stats`: one dataset's action statistics (the only one, if no key is given)."""
    stats = config.norm_stats
    if not stats:
        raise UsageError("the OpenVLA config has no norm_stats: actions cannot be un-normalised")
    if unnorm_key is None:
        if len(stats) != 1:
            raise UsageError(f"the policy was trained on several datasets; choose one of: {', '.join(stats)}")
        unnorm_key = next(iter(stats))
    if unnorm_key not in stats:
        raise UsageError(f"unknown dataset '{unnorm_key}' to un-normalise actions; choose one of: {', '.join(stats)}")
    return stats[unnorm_key]["action"]
