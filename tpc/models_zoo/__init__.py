"""Architecture families (one adapter each) and the built-in zoo; `resolve` turns a MODEL argument into both.

Importing this package does not import torch or transformers, so that `tpc methods` and `tpc zoo` start at
once: `FAMILY_KINDS` and `accepts_method` say which methods each family takes from the methods' light records,
the zoo entries declare what `tpc zoo` lists, and the adapters (`FAMILIES`, and the adapter classes as
attributes of this package) are imported on first use.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpc.errors import UsageError, unknown_name
from tpc.models_zoo.kinds import FAMILY_KINDS, accepts_method
from tpc.models_zoo.zoo import ZOO, ZooEntry, materialize

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from tpc.models_zoo.base import VisionEncoderAdapter, VisionGeometry
    from tpc.models_zoo.llava import LlavaAdapter
    from tpc.models_zoo.openvla import OpenVlaAdapter

    Adapter = VisionEncoderAdapter | LlavaAdapter | OpenVlaAdapter


@functools.cache
def _adapters() -> dict[str, Adapter]:
    """The family adapters (imports transformers and torch): built once, on first use."""
    from tpc.models_zoo.clip import ClipAdapter
    from tpc.models_zoo.llava import LlavaAdapter
    from tpc.models_zoo.openvla import OpenVlaAdapter
    from tpc.models_zoo.siglip import SiglipAdapter

    encoders = {a.family: a for a in (ClipAdapter(), SiglipAdapter())}
    towers = {t: a for a in encoders.values() for t in a.model_types if t.endswith("_vision_model")}
    families: dict[str, Adapter] = {**encoders, "llava": LlavaAdapter(towers), "openvla": OpenVlaAdapter()}
    stated = {name: adapter.kind for name, adapter in families.items()}
    if stated != FAMILY_KINDS:
        raise RuntimeError(f"FAMILY_KINDS {FAMILY_KINDS} disagrees with the adapters {stated}")
    return families


class _OnFirstUse(Mapping[str, Any]):
    """A read-only table of adapters, built on first access (building imports transformers and torch)."""

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self._build = functools.cache(build)

    def __getitem__(self, key: str) -> Any:
        return self._build()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return repr(self._build())


FAMILIES: Mapping[str, Adapter] = _OnFirstUse(_adapters)
ENCODERS: Mapping[str, VisionEncoderAdapter] = _OnFirstUse(
    lambda: {name: a for name, a in _adapters().items() if a.kind == "encoder"}
)
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
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
    if name == "Adapter":
        return __getattr__("VisionEncoderAdapter") | __getattr__("LlavaAdapter") | __getattr__("OpenVlaAdapter")
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
    def path(self) -> Path:
        """The local directory `from_pretrained` loads (a zoo model is built and saved the first time)."""
        return self.user_dir if self.zoo_entry is None else materialize(self.zoo_entry, self.adapter)


def _check_local_dir(path: Path) -> str:
    """Return the directory's model_type, or raise one clear line about what is wrong with it (validate.py)."""
    from tpc.models_zoo.validate import check_model_dir

    return check_model_dir(path, _BY_MODEL_TYPE)


def resolve(ref: str) -> ModelSource:
    """`zoo:NAME` or a local directory -> ModelSource. Reads configs only; weights load later."""
    if ref.startswith(ZOO_PREFIX):
        name = ref[len(ZOO_PREFIX) :]
        if name not in ZOO:
            raise unknown_name("zoo model", name, ZOO, "see `tpc zoo`")
        entry = ZOO[name]
        return ModelSource(ref, adapter_for_family(entry.family), entry.make_config(), zoo_entry=entry)
    from tpc.models_zoo.validate import check_config, check_weights, load_config

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
    "VisionEncoderAdapter",
    "VisionGeometry",
    "ZooEntry",
    "accepts_method",
    "resolve",
]
