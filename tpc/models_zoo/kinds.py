"""Which methods each kind of model takes, from the methods' light records: the adapters ask this, and listing
(`tpc methods`) asks it without importing an adapter (and with it transformers and torch)."""

from __future__ import annotations

from tpc.methods import Method, PrefillMethod, VisionMethod

# family -> kind of model; the adapters state the same as their `family` / `kind` (checked when they are built)
FAMILY_KINDS: dict[str, str] = {"clip": "encoder", "siglip": "encoder", "llava": "vlm", "openvla": "vla"}


def accepts_method(kind: str, method: Method) -> bool:
    """Whether a model of this kind ("encoder", "vlm", "vla") is pruned by `method`, from the method's light
    record (its stage and flags). Each adapter's `accepts` asks this."""
    if kind == "encoder":  # vision-side methods: an encoder has no decoder to prune in
        return isinstance(method, VisionMethod)
    if kind == "vlm":  # vision-side methods, and prefill methods that need no state from earlier control steps
        return isinstance(method, VisionMethod) or (isinstance(method, PrefillMethod) and not method.stateful)
    if kind == "vla":  # prefill methods (VLA-Pruner, FastV) and the unpruned baseline: the towers are not pruned
        return isinstance(method, PrefillMethod) or not method.prunes
    raise ValueError(f"unknown model kind {kind!r}")
