"""Architecture families (one adapter each) and the built-in zoo; `resolve` turns a MODEL argument into both.

Importing this package does not import torch or transformers, so that `tpc methods` and `tpc zoo` start at
once: `FAMILY_KINDS` says which kind each family is (`tpc.kinds` which methods that kind takes),
the zoo entries declare what `tpc zoo` lists, and the adapters (`FAMILIES`, and the adapter classes as
attributes of this package) are imported on first use.
"""

from __future__ import annotations

import functools
import importlib
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tpc.errors import UsageError, unknown_name
from tpc.models_zoo.kinds import FAMILY_KINDS
from tpc.models_zoo.validate import check_config, check_model_dir, check_weights, load_config
from tpc.models_zoo.zoo import ZOO, ZooEntry, materialize

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from tpc.models_zoo.base import VisionEncoderAdapter, VisionGeometry
    from tpc.models_zoo.llava import DecoderGeometry, LlavaAdapter, PromptLayout
    from tpc.models_zoo.openvla import OpenVlaAdapter
    from tpc.models_zoo.qwen_vl import QwenGrid, QwenVlAdapter

    Adapter = VisionEncoderAdapter | LlavaAdapter | OpenVlaAdapter | QwenVlAdapter


# the family adapters by name, as "module:class", imported on first use (the registry a new family adds a line to)
ADAPTER_CLASSES = {
    "clip": "tpc.models_zoo.clip:ClipAdapter",
    "siglip": "tpc.models_zoo.siglip:SiglipAdapter",
    "llava": "tpc.models_zoo.llava:LlavaAdapter",
    "openvla": "tpc.models_zoo.openvla:OpenVlaAdapter",
    "qwen2_5_vl": "tpc.models_zoo.qwen_vl:QwenVlAdapter",
    "qwen3_vl": "tpc.models_zoo.qwen_vl:Qwen3VlAdapter",
}
ENCODER_FAMILIES = ("clip", "siglip")  # the vision towers a VLM family may name
VLM_FAMILIES = ("llava",)  # families built on those towers (their adapters take them)


def _adapter_class(target: str) -> Any:
    """The class a "module:class" target names (an adapter class; each takes its own arguments)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _built() -> tuple[dict[str, VisionEncoderAdapter], dict[str, Adapter]]:
    """The encoder families' adapters and all families' (imports transformers and torch): built once, on first
    use. A VLM family takes the encoder families' adapters by tower model type."""
    classes = {name: _adapter_class(target) for name, target in ADAPTER_CLASSES.items()}
    encoders: dict[str, VisionEncoderAdapter] = {name: classes[name]() for name in ENCODER_FAMILIES}
    towers = {t: a for a in encoders.values() for t in a.model_types if t.endswith("_vision_model")}
    families: dict[str, Adapter] = {
        **encoders,
        **{name: cls(towers) for name, cls in classes.items() if name in VLM_FAMILIES},
        **{name: cls() for name, cls in classes.items() if name not in ENCODER_FAMILIES + VLM_FAMILIES},
    }
    stated = {name: adapter.kind for name, adapter in families.items()}
    if stated != FAMILY_KINDS:
        raise RuntimeError(f"FAMILY_KINDS {FAMILY_KINDS} disagrees with the adapters {stated}")
    return encoders, families


def _adapters() -> dict[str, Adapter]:
    """The family adapters by family name (built on first use)."""
    return _built()[1]


_V = TypeVar("_V")


class _OnFirstUse(Mapping[str, _V], Generic[_V]):
    """A read-only table of adapters, built on first access (building imports transformers and torch)."""

    def __init__(self, build: Callable[[], dict[str, _V]]) -> None:
        self._build = functools.cache(build)

    def __getitem__(self, key: str) -> _V:
        return self._build()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return repr(self._build())


FAMILIES: Mapping[str, Adapter] = _OnFirstUse(_adapters)
ENCODERS: Mapping[str, VisionEncoderAdapter] = _OnFirstUse(lambda: _built()[0])
_BY_MODEL_TYPE: Mapping[str, Adapter] = _OnFirstUse(lambda: {t: a for a in _adapters().values() for t in a.model_types})
ZOO_PREFIX = "zoo:"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # never pickles (pytorch_model.bin)
# names this package hands out from its (heavy) submodules on first use
_LAZY_NAMES = {
    "VisionEncoderAdapter": "base",
    "VisionGeometry": "base",
    "DecoderGeometry": "llava",
    "LlavaAdapter": "llava",
    "PromptLayout": "llava",
    "OpenVlaAdapter": "openvla",
    "QwenVlAdapter": "qwen_vl",
    "QwenGrid": "qwen_vl",
}


def __getattr__(name: str) -> type | UnionType:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
    if name == "Adapter":
        families = ("VisionEncoderAdapter", "LlavaAdapter", "OpenVlaAdapter", "QwenVlAdapter")
        return functools.reduce(operator.or_, (__getattr__(name) for name in families))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    def files_dir(self) -> Path | None:
        """Where the model's own files lie beside its weights (tokenizer, chat template, processor): a user's
        directory or a trained zoo checkpoint; None for a zoo model built from its config."""
        if self.user_dir is not None:
            return self.user_dir
        return self.zoo_entry.checkpoint if self.zoo_entry is not None else None

    @property
    def path(self) -> Path:
        """The local directory `from_pretrained` loads (a zoo model is built and saved the first time)."""
        if self.zoo_entry is not None:
            return materialize(self.zoo_entry, self.adapter)
        assert self.user_dir is not None  # resolve() gives a source one or the other
        return self.user_dir


def _check_local_dir(path: Path) -> str:
    """Return the directory's model_type, or raise one clear line about what is wrong with it (validate.py)."""
    return check_model_dir(path, _BY_MODEL_TYPE)


def resolve(ref: str) -> ModelSource:
    """`zoo:NAME` or a local directory -> ModelSource. Reads configs only; weights load later."""
    if ref.startswith(ZOO_PREFIX):
        name = ref[len(ZOO_PREFIX) :]
        if name not in ZOO:
            raise unknown_name("zoo model", name, ZOO, "see `tpc zoo`")
        entry = ZOO[name]
        return ModelSource(ref, adapter_for_family(entry.family), entry.make_config(), zoo_entry=entry)
    try:
        path = Path(ref).expanduser().resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop: RuntimeError before Python 3.13, OSError after
        raise UsageError(f"model directory '{ref}' cannot be resolved ({err}); fix the symlinks on its path") from None
    model_type = _check_local_dir(path)
    adapter = _BY_MODEL_TYPE[model_type]
    config = load_config(path, adapter.family)
    check_config(config, adapter.family, path)
    check_weights(path)  # headers only: truncated, empty or random files and missing shards fail here
    return ModelSource(ref, adapter, config, user_dir=path)


__all__ = [
    "FAMILIES",
    "FAMILY_KINDS",
    "ZOO",
    "Adapter",
    "DecoderGeometry",
    "LlavaAdapter",
    "ModelSource",
    "OpenVlaAdapter",
    "PromptLayout",
    "QwenGrid",
    "QwenVlAdapter",
    "VisionEncoderAdapter",
    "VisionGeometry",
    "ZooEntry",
    "resolve",
]
