"""The kinds' registry: one light record per kind (its name, its module, the methods it takes, its tpc.json section,
its profile headline), read without importing torch (`tpc methods`, planning, `tpc profile`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tpc.methods.base import Method, PrefillMethod, VisionMethod

if TYPE_CHECKING:
    from tpc.contract.manifest import Manifest


@dataclass(frozen=True)
class KindRecord:
    name: str
    module: str  # the module whose `KIND` implements the protocol, imported when used
    accepts: Callable[[Method], bool]  # the methods a model of this kind is pruned by
    section: str | None  # the tpc.json section an export of this kind has (None: neither generation nor policy)
    # the components whose summed time is `tpc profile`'s headline, from an export's component names
    headline: Callable[[list[str]], tuple[str, ...]]
    headline_label: str  # what that time is, as `tpc profile` names it
    control_loop: bool = False  # its graphs run at a control rate: `tpc profile --rate` counts deadline misses


KINDS: dict[str, KindRecord] = {
    record.name: record
    for record in (
        # vision-side methods: an encoder has no decoder to prune in
        KindRecord("encoder", "tpc.kinds.encoder", lambda m: isinstance(m, VisionMethod), None, tuple, "model call"),
        # vision-side methods, and decoder schedules that need no state from earlier control steps
        KindRecord(
            "vlm",
            "tpc.kinds.vlm",
            lambda m: isinstance(m, VisionMethod) or (isinstance(m, PrefillMethod) and not m.stateful),
            "generation",
            lambda names: ("vision", "prefill"),
            "time to first token (vision + prefill)",
        ),
        # decoder schedules (VLA-Pruner, FastV, LVLM_CSP; not CATP, which needs example images) and the unpruned
        # baseline: the towers are not pruned
        KindRecord(
            "vla",
            "tpc.kinds.policy",
            lambda m: (isinstance(m, PrefillMethod) and m.shots[0] == 0) or not m.prunes,  # one camera image
            "policy",
            # the steady-state control step: a stateful policy's pruned graph (its warm-up steps are `window`)
            lambda names: ("pruned",) if "pruned" in names else tuple(names),
            "control step",
            control_loop=True,
        ),
    )
}


def accepts_method(kind: str, method: Method) -> bool:
    """Whether a model of this kind is pruned by `method`, from the method's light record."""
    return KINDS[kind].accepts(method)


def record_of(manifest: Manifest) -> KindRecord:
    """The kind of an export, light: the one whose manifest section it has."""
    sectioned = [r for r in KINDS.values() if r.section is not None and getattr(manifest, r.section) is not None]
    return sectioned[0] if sectioned else next(r for r in KINDS.values() if r.section is None)
