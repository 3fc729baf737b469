"""Attention taps give exactly the eager-attention reductions, without `output_attentions`."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel, SiglipVisionModel

from tpc.methods import hiprune
from tpc.passes.attention_tap import ReceivedAttention, RowAttention
from tpc.pipeline import PruneRequest, build


@pytest.mark.parametrize(
    ("model", "model_class", "prefix"),
    [
        ("zoo:tiny-clip", CLIPVisionModel, 1),
        ("zoo:tiny-siglip", SiglipVisionModel, 0),
    ],
)
def test_tapped_scores_equal_eager_attention_scores(model: str, model_class: type, prefix: int) -> None:
    pruned = build(PruneRequest(model, "hiprune", 32, {"object_layer": "1", "deep_layer": "3"}))
    pixels = pruned.samples(seed=3)["model"]["pixel_values"]
    eager = model_class.from_pretrained(str(pruned.source.path), attn_implementation="eager").eval()
    with torch.no_grad():
        kept_features, kept_indices = pruned.module(pixels)
        reference = eager(pixels, output_attentions=True, output_hidden_states=True)
    for layer in (1, 3):
        expected = hiprune.scores(reference.attentions[layer - 1], prefix_tokens=prefix)
        torch.testing.assert_close(pruned.module.taps[layer].value[:, prefix:], expected, rtol=1e-5, atol=1e-7)
    # and the whole selection equals HiPrune on the eager maps
    expected_kept = hiprune.select(
        hiprune.scores(reference.attentions[0], prefix), hiprune.scores(reference.attentions[2], prefix), 32, (16, 16)
    )
    assert torch.equal(kept_indices, expected_kept)
    features = reference.hidden_states[3][:, prefix:]
    torch.testing.assert_close(kept_features, features[0][kept_indices[0]][None], rtol=1e-4, atol=1e-4)


def test_only_tapped_layers_leave_sdpa() -> None:
    pruned = build(PruneRequest("zoo:tiny-clip", "hiprune", 16))
    layers = pruned.module.model.encoder.layers
    tapped = [i + 1 for i, layer in enumerate(layers) if getattr(layer.self_attn, "tpc_tap", None) is not None]
    assert tapped == [pruned.params["object_layer"], pruned.params["deep_layer"]]
    assert pruned.module.model.config._attn_implementation == "tpc_tap"  # dispatcher: taps, else SDPA


def test_blockwise_reduction_equals_single_block() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 50, 8) for _ in range(3))
    whole, blocked = ReceivedAttention(), ReceivedAttention(block_elements=2 * 4 * 50 * 7)  # 7 rows per block
    assert blocked.rows_per_block(2, 4, 50, 50) == 7
    out_whole, _ = whole(None, q, k, v, None, 8**-0.5)
    out_blocked, _ = blocked(None, q, k, v, None, 8**-0.5)
    torch.testing.assert_close(out_blocked, out_whole)
    torch.testing.assert_close(blocked.value, whole.value)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1)
    torch.testing.assert_close(whole.value, probs.mean(1).mean(1))
    torch.testing.assert_close(out_whole, (probs @ v).transpose(1, 2))


def test_last_row_tap_honours_a_boolean_mask_like_an_additive_one() -> None:
    """A static cache's decode step passes a boolean mask (True: may attend); the tap's row must put zero
    probability on the empty slots, as SDPA does, and equal the row over the filled slots alone."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 12, 8), torch.randn(1, 4, 12, 8)
    k[:, :, 9:], v[:, :, 9:] = 0, 0  # three empty cache slots
    visible = (torch.arange(12) < 9).view(1, 1, 1, 12)
    boolean, additive, filled = (RowAttention(every_call=True) for _ in range(3))
    out_bool, _ = boolean(None, q, k, v, visible, 8**-0.5)
    out_add, _ = additive(None, q, k, v, torch.zeros(1, 1, 1, 12).masked_fill(~visible, float("-inf")), 8**-0.5)
    filled(None, q, k[:, :, :9], v[:, :, :9], None, 8**-0.5)
    torch.testing.assert_close(boolean.value, additive.value)
    assert torch.all(boolean.value[:, 9:] == 0)
    torch.testing.assert_close(boolean.value[:, :9], filled.value)
    torch.testing.assert_close(out_bool, out_add)


def test_received_attention_sums_query_rows_as_a_gemv() -> None:
    """ONNX Runtime's ReduceSum over the middle axes of (B, H, T, T) is slow (100 ms at CLIP ViT-L/14-336, against
    4 ms for a GEMV): the tap sums the rows as a product with ones and only sums heads over (B, H, 1, T)."""
    tap = ReceivedAttention()

    class Tapped(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out, _ = tap(self, q, k, v, None, 8**-0.5)
            return out, tap.latest()

    q, k, v = (torch.randn(1, 4, 20, 8) for _ in range(3))
    program = torch.export.export(Tapped(), (q, k, v))
    sums = [node for node in program.graph.nodes if node.target == torch.ops.aten.sum.dim_IntList]
    assert sums and all(node.args[0].meta["val"].shape[-2] == 1 for node in sums)  # never over the query rows
    probs = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1)
    torch.testing.assert_close(program.module()(q, k, v)[1], probs.mean(1).mean(1))
