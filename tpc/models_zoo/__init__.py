"""Architecture families (one adapter each) and the built-in zoo; `resolve` turns a MODEL argument into both."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from tpc.errors import UsageError, unknown_name
from tpc.models_zoo.base import VisionEncoderAdapter, VisionGeometry
from tpc.models_zoo.clip import ClipAdapter
from tpc.models_zoo.llava import DecoderGeometry, LlavaAdapter, PromptLayout
from tpc.models_zoo.openvla import OpenVlaAdapter
from tpc.models_zoo.siglip import SiglipAdapter
from tpc.models_zoo.zoo import ZOO, ZooEntry, materialize

Adapter = VisionEncoderAdapter | LlavaAdapter | OpenVlaAdapter
ENCODERS: dict[str, VisionEncoderAdapter] = {a.family: a for a in (ClipAdapter(), SiglipAdapter())}
_TOWERS = {t: a for a in ENCODERS.values() for t in a.model_types if t.endswith("_vision_model")}
FAMILIES: dict[str, Adapter] = {**ENCODERS, "llava": LlavaAdapter(_TOWERS), "openvla": OpenVlaAdapter()}
_BY_MODEL_TYPE = {t: a for a in FAMILIES.values() for t in a.model_types}
ZOO_PREFIX = "zoo:"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def adapter_for_family(family: str) -> Adapter:
    return FAMILIES[family]


@dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL argument: what the user wrote, its family, its config, where its weights are."""

    ref: str
    adapter: Adapter
    config: PretrainedConfig
    user_dir: Path | None = None  # a user's local model directory
    zoo_entry: ZooEntry | None = None  # or a built-in model, saved on first use

    @property
    def geometry(self) -> VisionGeometry:
        return self.adapter.geometry(self.config)

    @property
    def path(self) -> Path:
        """The local directory `from_pretrained` loads (a zoo model is built and saved the first time)."""
        return self.user_dir if self.zoo_entry is None else materialize(self.zoo_entry)


def _supported() -> str:
    return ", ".join(sorted(_BY_MODEL_TYPE))


def _check_local_dir(path: Path) -> str:
    """Return the directory's model_type, or raise one clear line about what is missing."""
    if not path.exists():
        raise UsageError(
            f"model directory '{path}' does not exist (pass a local Hugging Face model directory or zoo:NAME)"
        )
    if not path.is_dir():
        raise UsageError(f"'{path}' is a file; pass the model directory that holds config.json and the weights")
    config_file = path / "config.json"
    if not config_file.exists():
        raise UsageError(f"'{path}' has no config.json; it is not a Hugging Face model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except json.JSONDecodeError as err:
        raise UsageError(f"'{config_file}' is not valid JSON ({err.msg} at line {err.lineno})") from None
    if model_type not in _BY_MODEL_TYPE:
        raise UsageError(
            f"'{path}' holds a model of type '{model_type or '(none)'}', which tpc does not support; "
            f"supported model types: {_supported()}"
        )
    if not any((path / name).exists() for name in _WEIGHT_FILES):
        raise UsageError(f"'{path}' has a config.json but no weights ({' or '.join(_WEIGHT_FILES[::2])})")
    return model_type


def resolve(ref: str) -> ModelSource:
    """`zoo:NAME` or a local directory -> ModelSource. Reads configs only; weights load later."""
    if ref.startswith(ZOO_PREFIX):
        name = ref[len(ZOO_PREFIX) :]
        if name not in ZOO:
            raise unknown_name("zoo model", name, ZOO, "see `tpc zoo`")
        entry = ZOO[name]
        return ModelSource(ref, adapter_for_family(entry.family), entry.make_config(), zoo_entry=entry)
    path = Path(ref).expanduser().resolve()
    model_type = _check_local_dir(path)
    config = AutoConfig.from_pretrained(str(path))
    return ModelSource(ref, _BY_MODEL_TYPE[model_type], config, user_dir=path)


__all__ = [
    "FAMILIES",
    "ZOO",
    "Adapter",
    "DecoderGeometry",
    "LlavaAdapter",
    "ModelSource",
    "OpenVlaAdapter",
    "PromptLayout",
    "VisionEncoderAdapter",
    "VisionGeometry",
    "ZooEntry",
    "resolve",
]
