"""Which kind of model each family is (`tpc.kinds` says what each kind takes); the adapters state the same as
their `kind` (checked when they are built). Light: `tpc methods` and `tpc zoo` read it without torch."""

from __future__ import annotations

FAMILY_KINDS: dict[str, str] = {
    "clip": "encoder",
    "siglip": "encoder",
    "llava": "vlm",
    "openvla": "vla",
    "qwen2_5_vl": "vlm",
    "qwen3_vl": "vlm",
}
