"""Checks of a user's local model directory, before and while tpc reads it; each problem is one UsageError line.

- tpc never runs a model directory's code: a `config.json` whose `auto_map` names the directory's own Python
  modules is refused (the OpenVLA release's `*_prismatic` modules excepted: tpc loads that layout with its own
  implementation and never imports them), and every transformers call passes `trust_remote_code=False`;
- weights are only ever read from safetensors, never unpickled: a directory with only `pytorch_model.bin`-style
  files is refused with how to convert it, and `from_pretrained` is called with `use_safetensors=True`;
- each safetensors file's header (8-byte length, JSON, dtypes, shapes, data offsets against the file's size) and a
  sharded checkpoint's index (every shard present, every listed tensor in its shard) are checked before any tensor
  is loaded; tensor shapes are compared with the model that `config.json` describes;
- the config fields tpc reads (the geometry of the vision tower and the decoder, LLaVA's nested configs and
  feature layers, OpenVLA's towers) are checked right after transformers parses `config.json`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, cast

from tpc.errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

ModelT = TypeVar("ModelT", bound="PreTrainedModel")

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
WEIGHT_FILES = (SAFETENSORS, INDEX)
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT = (
    "convert it once, in a Python you trust, with "
    "`from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)` and pass NEW_DIR"
)
# the OpenVLA release's own code, named by its auto_map; tpc implements the architecture and never imports these
OPENVLA_MODULES = ("configuration_prismatic", "modeling_prismatic", "processing_prismatic")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
# generous bounds: far above any released model, low enough that a typo cannot make tpc build a model for hours
LIMITS = {
    "image_size": 16384,
    "patch_size": 16384,
    "num_channels": 64,
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
    "num_patches": 1 << 16,
}
NESTED = {
    "llava": ("vision_config", "text_config"),
    "qwen2_5_vl": ("vision_config", "text_config"),
    "qwen3_vl": ("vision_config", "text_config"),
    "clip": ("vision_config",),
    "siglip": ("vision_config",),
}


class LoadingInfo(TypedDict, total=False):
    """The report of `from_pretrained(..., output_loading_info=True)`, the parts tpc reads."""

    missing_keys: Collection[str]
    unexpected_keys: Collection[str]
    mismatched_keys: Collection[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (name, checkpoint's, model's)


# --- the directory ----------------------------------------------------------------------------------------------


def _stat(path: Path) -> os.stat_result | None:
    """os.stat following links; None if absent; one line for a symlink loop or an unreadable path."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UsageError(f"'{path}' is a symlink loop (it links back to itself); fix or remove the link") from None
        if err.errno == errno.ENOTDIR:
            return None
        raise UsageError(f"cannot read '{path}' ({err.strerror}); check its permissions") from None


def _is_file(path: Path) -> bool:
    info = _stat(path)
    if info is None:
        return False
    if not path.is_file():
        raise UsageError(f"'{path}' is not a regular file; it must be the file itself (or a link to one)")
    return True


def read_config_json(path: Path) -> dict[str, Any]:
    """The directory's config.json as a JSON object."""
    config_file = path / CONFIG
    if not _is_file(config_file):
        raise UsageError(f"'{path}' has no config.json; it is not a Hugging Face model directory")
    try:
        data = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"'{config_file}' is not UTF-8 text; save the model again with save_pretrained") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"'{config_file}' is not valid JSON ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise UsageError(f"cannot read '{config_file}' ({err.strerror}); check its permissions") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"'{config_file}' holds a JSON {type(data).__name__}, not an object of config fields; "
            "save the model again with save_pretrained"
        )
    return data


def _code_modules(auto_map: object) -> list[str]:
    """The Python modules an auto_map names ('repo--module.Class' and [slow, fast] tokenizer pairs included)."""
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    names: list[str] = []
    for value in values:
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, str):
                names.append(item.split("--")[-1].rpartition(".")[0] or item)
            elif item is not None:
                names.append(repr(item))
    return names


def check_remote_code(config_file: Path, data: Mapping[str, object], model_type: str) -> None:
    """Refuse a config that asks for the model directory's own code (`auto_map`); tpc never runs it."""
    if "auto_map" not in data:
        return
    modules = _code_modules(data["auto_map"])
    if model_type == "openvla" and modules and all(module in OPENVLA_MODULES for module in modules):
        return  # the release's layout: tpc's own OpenVLA implementation loads it
    shown = ", ".join(sorted(set(modules))) or repr(data["auto_map"])
    raise UsageError(
        f"'{config_file}' has an auto_map naming the model's own code ({shown}); tpc never runs a model "
        "directory's code: use a model of a supported family saved by transformers' own classes"
    )


def _weights_present(path: Path) -> list[str]:
    """Which safetensors entry points exist; refuses pickled-only directories and reports missing weights."""
    present = [name for name in WEIGHT_FILES if _is_file(path / name)]
    if present:
        return present
    try:
        entries = sorted(entry.name for entry in path.iterdir())
    except OSError as err:
        raise UsageError(f"cannot list '{path}' ({err.strerror}); check its permissions") from None
    pickled = [name for name in entries if name.endswith(PICKLED_SUFFIXES)]
    if pickled:
        raise UsageError(
            f"'{path}' holds pickled weights ({', '.join(pickled[:3])}); tpc reads weights only from safetensors "
            f"and never unpickles: {CONVERT}"
        )
    raise UsageError(f"'{path}' has a config.json but no weights ({SAFETENSORS} or {INDEX})")


def check_model_dir(path: Path, supported: Collection[str] = ()) -> str:
    """The directory's model_type, after checking its shape: config.json an object, a supported model_type
    (when `supported` is given), the nested configs its family needs, no remote code, safetensors weights."""
    info = _stat(path)
    if info is None:
        raise UsageError(
            f"model directory '{path}' does not exist (pass a local Hugging Face model directory or zoo:NAME)"
        )
    if not path.is_dir():
        raise UsageError(f"'{path}' is a file; pass the model directory that holds config.json and the weights")
    try:
        for entry in path.iterdir():
            _stat(entry)  # a symlink loop anywhere at the top level is reported, not stumbled over later
    except OSError as err:
        raise UsageError(f"cannot list '{path}' ({err.strerror}); check its permissions") from None
    data = read_config_json(path)
    config_file = path / CONFIG
    model_type = data.get("model_type", "")
    if not isinstance(model_type, str):
        raise UsageError(f"'{config_file}': model_type must be a string, got {model_type!r}; fix config.json")
    if supported and model_type not in supported:
        raise UsageError(
            f"'{path}' holds a model of type '{model_type or '(none)'}', which tpc does not support; "
            f"supported model types: {', '.join(sorted(supported))}"
        )
    check_remote_code(config_file, data, model_type)
    for key in NESTED.get(model_type, ()):
        if not isinstance(data.get(key), dict):
            found = "is missing" if key not in data else f"is {type(data[key]).__name__}, not an object"
            raise UsageError(
                f"'{config_file}': '{key}' {found}; a {model_type} config nests its {key.split('_')[0]} model's "
                "config there (save the model again with save_pretrained)"
            )
    if model_type == "openvla" and not isinstance(data.get("text_config"), dict):
        raise UsageError(f"'{config_file}': 'text_config' (the Llama decoder's config) is missing or not an object")
    _weights_present(path)
    return model_type


# --- config.json, as transformers parsed it ---------------------------------------------------------------------


def load_config(path: Path, family: str | None = None) -> PretrainedConfig:
    """AutoConfig.from_pretrained, local only and without remote code. When transformers rejects the file, the
    fields tpc reads are checked on the raw JSON first (naming the field), else its error becomes the line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except UsageError:
        raise
    except Exception as err:  # transformers raises ValueError, TypeError, strict-dataclass errors, ZeroDivisionError
        if family is not None:
            check_config(_Raw(read_config_json(path)), family, path)
        raise UsageError(f"'{path / CONFIG}' is not a valid config: {_one_line(err)}") from err


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Raw:
    """config.json as parsed, read like a config object; an absent field reads None and is not checked (its
    default is transformers' business)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def states(self, name: str) -> bool:
        """Whether the file has the field (possibly as null)."""
        return name in self._data

    def __getattr__(self, name: str) -> Any:
        value = self._data.get(name)
        return _Raw(value) if isinstance(value, dict) else value


class _Fields:
    """Typed reads of one (possibly nested) config, with errors naming the file and the field."""

    def __init__(self, config: object, where: str, config_file: str) -> None:
        self.config, self.where, self.file = config, where, config_file
        self.lenient = isinstance(config, _Raw)

    def fail(self, name: str, problem: str) -> UsageError:
        return UsageError(f"'{self.file}': {self.where}{name} {problem}; fix config.json")

    def int(self, name: str, minimum: int = 1, optional: bool = False) -> int | None:
        value = getattr(self.config, name, None)
        if value is None and (optional or self.lenient):
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.fail(
                name, f"is missing (it must be {kind})" if value is None else f"must be {kind}, got {value!r}"
            )
        if name in LIMITS and value > LIMITS[name]:
            raise self.fail(name, f"= {value} is implausibly large (tpc's limit: {LIMITS[name]})")
        return value


def _check_vision(config: object, where: str, config_file: str) -> None:
    """A ViT-style encoder's geometry (what `VisionEncoderAdapter.geometry` reads)."""
    fields = _Fields(config, where, config_file)
    image, patch = fields.int("image_size"), fields.int("patch_size")
    fields.int("num_channels")
    fields.int("num_hidden_layers")
    fields.int("intermediate_size")
    hidden, heads = fields.int("hidden_size"), fields.int("num_attention_heads")
    if image is not None and patch is not None:
        if image % patch:
            raise fields.fail("image_size", f"{image} is not divisible by patch_size {patch}")
        if (image // patch) ** 2 > LIMITS["num_patches"]:
            limit = LIMITS["num_patches"]
            raise fields.fail("image_size", f"{image} / patch_size {patch} gives more than {limit} patches")
    if hidden is not None and heads is not None and hidden % heads:
        raise fields.fail("hidden_size", f"{hidden} is not divisible by num_attention_heads {heads}")


def _check_decoder(config: object, where: str, config_file: str) -> None:
    """A Llama-family decoder's geometry (what `decoder_geometry` reads)."""
    fields = _Fields(config, where, config_file)
    for name in ("vocab_size", "num_hidden_layers", "intermediate_size"):
        fields.int(name)
    fields.int("max_position_embeddings", optional=True)
    hidden, heads = fields.int("hidden_size"), fields.int("num_attention_heads")
    kv_heads = fields.int("num_key_value_heads", optional=True) or heads
    head_dim = fields.int("head_dim", optional=True)
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise fields.fail("num_attention_heads", f"{heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim is None and hidden is not None and heads is not None and hidden % heads:
        raise fields.fail("hidden_size", f"{hidden} is not divisible by num_attention_heads {heads}")


def _check_llava(config: PretrainedConfig | _Raw, config_file: str) -> None:
    fields = _Fields(config, "", config_file)
    vision, text = config.vision_config, config.text_config
    if vision is not None:
        _check_vision(vision, "vision_config.", config_file)
    if text is not None:
        _check_decoder(text, "text_config.", config_file)
    image_id = fields.int("image_token_id", minimum=0)
    vocab = getattr(text, "vocab_size", None)
    if image_id is not None and isinstance(vocab, int) and image_id >= vocab:
        raise fields.fail("image_token_id", f"{image_id} is outside text_config.vocab_size {vocab}")
    given = config.vision_feature_layer
    if given is None and fields.lenient:
        return
    indices = given if isinstance(given, list | tuple) else [given]
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise fields.fail("vision_feature_layer", f"must be an integer or a list of integers, got {given!r}")
    depth = getattr(vision, "num_hidden_layers", None)
    if isinstance(depth, int) and not all(1 <= (i if i >= 0 else depth + 1 + i) <= depth for i in indices):
        raise fields.fail(
            "vision_feature_layer",
            f"{given} selects outside the tower's layers 1..{depth} (the embeddings, index 0, are not supported)",
        )
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full") and not (strategy is None and fields.lenient):
        raise fields.fail("vision_feature_select_strategy", f"{strategy!r} is not one of 'default', 'full'")


def _check_qwen_vl(config: PretrainedConfig | _Raw, config_file: str) -> None:
    """A Qwen2.5-VL / Qwen3-VL config: the tower and merger geometry, the decoder, an image token in its vocabulary
    (a video-only config has none: tpc exports image prompts)."""
    fields = _Fields(config, "", config_file)
    vision, text = config.vision_config, config.text_config
    if vision is not None:
        tower = _Fields(vision, "vision_config.", config_file)
        for name in ("depth", "intermediate_size", "in_channels", "temporal_patch_size", "out_hidden_size"):
            tower.int(name)
        hidden, heads = tower.int("hidden_size"), tower.int("num_heads")
        patch, merge = tower.int("patch_size"), tower.int("spatial_merge_size")
        if hidden is not None and heads is not None and hidden % heads:
            raise tower.fail("hidden_size", f"{hidden} is not divisible by num_heads {heads}")
        window = tower.int("window_size", optional=True) if config.model_type == "qwen2_5_vl" else None
        if window is not None and patch is not None and merge is not None and window % (patch * merge):
            raise tower.fail("window_size", f"{window} px is not a multiple of patch_size x spatial_merge_size")
    if text is not None:
        _check_decoder(text, "text_config.", config_file)
    stated = not isinstance(config, _Raw) or config.states("image_token_id")  # raw JSON: absent means the default
    if getattr(config, "image_token_id", None) is None and stated:
        raise fields.fail("image_token_id", "is missing (a video-only model? tpc exports image prompts)")
    image_id = fields.int("image_token_id", minimum=0)
    vocab = getattr(text, "vocab_size", None)
    if image_id is not None and isinstance(vocab, int) and image_id >= vocab:
        raise fields.fail("image_token_id", f"{image_id} is outside text_config.vocab_size {vocab}")


TOWER_FIELDS = ("family", "hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size", "registers")


def _check_openvla(config: PretrainedConfig | _Raw, config_file: str) -> None:
    fields = _Fields(config, "", config_file)
    if config.text_config is not None:
        _check_decoder(config.text_config, "text_config.", config_file)
    vocab = getattr(config.text_config, "vocab_size", None)
    bins, pad = fields.int("n_action_bins"), fields.int("pad_to_multiple_of", minimum=0)
    if isinstance(vocab, int) and bins is not None and pad is not None and bins + pad > vocab:
        raise fields.fail("n_action_bins", f"{bins} + pad_to_multiple_of {pad} exceed text_config.vocab_size {vocab}")
    sizes = config.image_sizes
    if sizes is None and fields.lenient:
        sizes = [224, 224]  # the config class's default
    if not isinstance(sizes, list | tuple) or len(sizes) != 2:
        raise fields.fail("image_sizes", f"must list the two towers' image sizes, got {sizes!r}")
    specs = config.tower_specs
    if specs is None:
        return  # the towers the release's timm ids name (tower_specs() checks them)
    if not isinstance(specs, list | tuple) or len(specs) != 2 or not all(isinstance(s, dict) for s in specs):
        raise fields.fail("tower_specs", f"must be a list of two objects (DINOv2 then SigLIP), got {specs!r}")
    for index, (spec, size) in enumerate(zip(specs, sizes, strict=True)):
        where = f"tower_specs[{index}]."
        unknown = sorted(set(spec) - set(TOWER_FIELDS))
        if unknown:
            raise _Fields(spec, where, config_file).fail(
                unknown[0], f"is not a tower field ({', '.join(TOWER_FIELDS)})"
            )
        tower = _Fields(SimpleNamespace(**spec), where, config_file)
        if spec.get("family") not in ("dinov2", "siglip"):
            raise tower.fail("family", f"must be 'dinov2' or 'siglip', got {spec.get('family')!r}")
        tower.int("registers", minimum=0, optional=True)
        image = _Fields(SimpleNamespace(image_size=size), f"image_sizes[{index}] as ", config_file).int("image_size")
        patch = tower.int("patch_size")
        hidden, heads = tower.int("hidden_size"), tower.int("num_heads")
        tower.int("num_layers", minimum=2)  # features come from the second-to-last block
        tower.int("intermediate_size")
        # a tower's fields are read strictly (not lenient, not optional): each is an int here, or an error above
        assert image is not None and patch is not None and hidden is not None and heads is not None
        if image % patch:
            raise tower.fail("patch_size", f"{patch} does not divide the image size {size}")
        if hidden % heads:
            raise tower.fail("hidden_size", f"{hidden} is not divisible by num_heads {heads}")


def check_config(config: PretrainedConfig | _Raw, family: str, path: Path) -> None:
    """Validate the config fields tpc reads for `family` (clip, siglip, llava, openvla): types, positivity,
    divisibility, bounds, LLaVA's feature layers, OpenVLA's towers. One line naming config.json and the field."""
    config_file = str(path / CONFIG)
    if family == "llava":
        _check_llava(config, config_file)
    elif family in ("qwen2_5_vl", "qwen3_vl"):
        _check_qwen_vl(config, config_file)
    elif family == "openvla":
        _check_openvla(config, config_file)
    else:
        nested = getattr(config, "vision_config", None)
        _check_vision(nested or config, "vision_config." if nested is not None else "", config_file)


# --- safetensors ------------------------------------------------------------------------------------------------


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors file's tensors, name -> (dtype, shape), after checking the header against the file's size:
    the 8-byte length, the JSON, each entry's dtype, shape and data offsets, and that the data exactly fills the
    file (what safetensors itself requires), so a truncated, empty or random file is one line, never a crash."""
    if not _is_file(file):
        raise UsageError(f"weight file '{file}' is missing")
    size = file.stat().st_size
    fix = "the file is damaged: copy or save the model again"
    try:
        with file.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise UsageError(f"'{file}' is {'empty' if size == 0 else 'truncated'} ({size} bytes); {fix}")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise UsageError(
                    f"'{file}' is not a safetensors file or is truncated (header of {length} bytes in a file of "
                    f"{size}); {fix}"
                )
            raw = handle.read(length)
    except OSError as err:
        raise UsageError(f"cannot read '{file}' ({err.strerror}); check its permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"'{file}' is not a safetensors file (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise UsageError(f"'{file}' is not a safetensors file (its header is not a JSON object); {fix}")
    data_size = size - 8 - length
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = f"'{file}': tensor '{name}' has a malformed header entry"
        if not isinstance(entry, dict):
            raise UsageError(f"{bad}; {fix}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise UsageError(f"{bad} (shape {shape!r}); {fix}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise UsageError(f"{bad} (data_offsets {offsets!r}); {fix}")
        if not isinstance(dtype, str):
            raise UsageError(f"{bad} (dtype {dtype!r}); {fix}")
        begin, end = offsets
        if end > data_size:
            raise UsageError(
                f"'{file}' is truncated: tensor '{name}' ends at byte {8 + length + end}, the file has {size}; {fix}"
            )
        bits = DTYPE_BITS.get(dtype)
        if bits is not None and end - begin != math.ceil(math.prod(shape) * bits / 8):
            raise UsageError(
                f"'{file}': tensor '{name}' of shape {shape} and dtype {dtype} does not match its {end - begin} bytes "
                f"of data; {fix}"
            )
        tensors[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise UsageError(f"'{file}': tensor '{name}' does not start where the previous one ends; {fix}")
        position = end
    if position != data_size:
        raise UsageError(f"'{file}' has {data_size - position} bytes after its last tensor; {fix}")
    return tensors


def _index_shards(path: Path) -> dict[str, list[str]]:
    """model.safetensors.index.json -> {shard file name: tensors it should hold}."""
    index = path / INDEX
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"'{index}' is not valid JSON; save the model again with save_pretrained") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UsageError(f"'{index}' has no 'weight_map' object (tensor name -> shard file); save the model again")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise UsageError(f"'{index}' maps tensor '{name}' to {shard!r}, not a file name inside the directory")
        shards.setdefault(shard, []).append(name)
    return shards


def check_weights(
    path: Path, expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check every safetensors file the directory offers (model.safetensors, and the index's shards) without
    loading a tensor; with `expected` (name -> shape of the model config.json describes), tensors of those names
    must have those shapes. Returns name -> (dtype, shape) over all files."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    where: dict[str, Path] = {}
    if _is_file(path / INDEX):
        shards = _index_shards(path)
        missing = [shard for shard in sorted(shards) if not _is_file(path / shard)]
        if missing:
            raise UsageError(
                f"'{path}' is missing {len(missing)} of the {len(shards)} weight shards its {INDEX} lists "
                f"({', '.join(missing[:3])}); copy the complete checkpoint"
            )
        for shard, names in sorted(shards.items()):
            header = read_header(path / shard)
            absent = [name for name in names if name not in header]
            if absent:
                raise UsageError(
                    f"'{path / shard}' does not hold tensor '{absent[0]}' that {INDEX} places there; "
                    "copy the complete checkpoint"
                )
            tensors.update(header)
            where.update(dict.fromkeys(header, path / shard))
    if _is_file(path / SAFETENSORS):
        header = read_header(path / SAFETENSORS)
        tensors.update(header)
        where.update(dict.fromkeys(header, path / SAFETENSORS))
    if not where:
        raise UsageError(f"'{path}' has a config.json but no weights ({SAFETENSORS} or {INDEX})")
    for name, shape in (expected or {}).items():
        if name in tensors and tensors[name][1] != tuple(shape):
            raise UsageError(
                f"'{where[name]}': tensor '{name}' has shape {list(tensors[name][1])}, but the model in config.json "
                f"needs {list(shape)}; the weights do not belong to this config.json"
            )
    return tensors


def expected_shapes(model_class: type[PreTrainedModel], config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of `model_class(config)`, built on the meta device (no memory, no initialisation).
    A full CLIP/SigLIP config stands for its vision tower, as `from_pretrained` reads it."""
    import torch

    config_class = getattr(model_class, "config_class", None)
    if config_class is not None and not isinstance(config, config_class):
        # a full CLIP/SigLIP checkpoint's config, for its vision tower: the nested config from_pretrained takes
        nested = getattr(config, getattr(config_class, "base_config_key", "") or "vision_config", None)
        config = nested if isinstance(nested, config_class) else config
    with torch.device("meta"):
        model = model_class(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


# --- loading ----------------------------------------------------------------------------------------------------


@contextmanager
def loading(path: Path) -> Iterator[None]:
    """Around a transformers load of `path`: its chatter off, and anything it raises one UsageError line naming
    the directory and the problem (the cause stays chained for TPC_DEBUG)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # "Loading weights" bars would cut through tpc's step lines
    try:
        yield
    except UsageError:
        raise
    except MemoryError:
        raise UsageError(
            f"not enough memory to load the weights in '{path}'; free memory or use a smaller model"
        ) from None
    except Exception as err:  # safetensors, torch and transformers raise many kinds for a bad checkpoint
        raise UsageError(f"cannot load the model in '{path}': {type(err).__name__}: {_one_line(err)}") from err
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def check_loading_info(info: LoadingInfo, path: Path) -> None:
    """`from_pretrained(..., output_loading_info=True, ignore_mismatched_sizes=True)`'s report: refuse tensors of
    the wrong shape and tensors the checkpoint lacks (transformers would initialise them at random)."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: item[0])
    if mismatched:
        name, found, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise UsageError(
            f"'{path}': tensor '{name}' has shape {list(found)}, but the model in config.json needs "
            f"{list(wanted)}{more}; the weights do not belong to this config.json"
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise UsageError(
            f"'{path}' lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}); the checkpoint is "
            "incomplete or of another architecture"
        )


def safe_from_pretrained(model_class: type[ModelT], path: Path, **kwargs: Any) -> ModelT:
    """`model_class.from_pretrained(path)` the only way tpc loads a directory: safetensors only, no remote code,
    nothing downloaded, header shapes checked first, and any failure or incomplete load one UsageError line.
    `kwargs` go to `from_pretrained` as they are."""
    with loading(path):
        assert model_class.config_class is not None  # every transformers model class names its config class
        config = model_class.config_class.from_pretrained(str(path), local_files_only=True)
        check_weights(path, expected_shapes(model_class, config))
        # with output_loading_info, from_pretrained returns (model, report); transformers annotates only the model
        model, info = cast(
            "tuple[ModelT, LoadingInfo]",
            model_class.from_pretrained(
                str(path),
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                ignore_mismatched_sizes=True,  # reported below, by name, instead of transformers' table
                output_loading_info=True,
                **kwargs,
            ),
        )
    check_loading_info(info, path)
    return model
