"""From a request (model, method, keep, params) to pruned eager components: the step every command shares.

`export`, `verify`, `inspect` and the Python API all build through `build`, so the modules that are exported are
the modules that verification compares against. Planning resolves the model, and its family's kind
(`tpc.kinds`) plans and builds it: an encoder is one component (`model`), a VLM three (`vision`, `prefill`,
`decode`), a policy one or two step graphs.
"""

from __future__ import annotations

from typing import Any

from tpc.kinds.base import (
    DTYPES,
    MAX_BATCH,
    Component,
    DecoderPlan,
    Kind,
    Pruned,
    PruneRequest,
    as_arrays,
    check_common,
    check_memory,
    check_positions,
    eager_outputs,
    estimated_bytes,
    kind_named,
    seeded_pixels,
)
from tpc.kinds.encoder import EncoderPlan, Plan
from tpc.models_zoo import ModelSource, resolve


def kind_for(source: ModelSource) -> Kind:
    """The kind of a resolved model (its family states it)."""
    return kind_named(source.adapter.kind)


def plan(request: PruneRequest, source: ModelSource | None = None) -> Any:
    """Resolve and validate every part of the request; one clear UsageError for the first bad part.

    `source`: the request's model, if the caller resolved it already. Returns the kind's plan.
    """
    check_common(request)
    source = source or resolve(request.model)
    return kind_for(source).plan(request, source)


def build(request: PruneRequest) -> Pruned:
    """Plan, check the memory it needs, then load the model through `from_pretrained` and build its components."""
    the_plan = plan(request)
    check_memory(the_plan)
    return kind_for(the_plan.source).build(the_plan)


__all__ = [
    "DTYPES",
    "MAX_BATCH",
    "Component",
    "DecoderPlan",
    "EncoderPlan",
    "Plan",
    "PruneRequest",
    "Pruned",
    "as_arrays",
    "build",
    "check_positions",
    "eager_outputs",
    "estimated_bytes",
    "kind_for",
    "plan",
    "seeded_pixels",
]
