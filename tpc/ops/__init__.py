"""tpc's custom ops (registered with torch.library on import)."""

from tpc.ops.select import decompositions, gather_tokens, in_spans, ranking_key, select_indices, select_tokens

__all__ = ["decompositions", "gather_tokens", "in_spans", "ranking_key", "select_indices", "select_tokens"]
