"""Model kinds: an encoder, a VLM, a policy. Each is one module behind one protocol (`tpc.kinds.base.Kind`).

`tpc.kinds.registry` holds one light record per kind (its name, its module, the methods it takes), so listing
(`tpc methods`) and planning ask which methods a kind takes without importing torch. The kind's module is imported
when it is used (`tpc.kinds.base.kind_named`). A model family states its kind's name (`Adapter.kind`); an export
directory is of the kind whose manifest section it has (`tpc.kinds.base.kind_of`).
"""

from tpc.kinds.registry import KINDS, KindRecord, accepts_method, record_of

__all__ = ["KINDS", "KindRecord", "accepts_method", "record_of"]
