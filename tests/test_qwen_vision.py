"""Qwen2.5-VL / Qwen3-VL vision towers as static batched graphs: the processor's patches, transformers' merged
tokens and DeepStack features, HiPrune-Qwen's scores from explicit attention maps, torch.export and ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from tpc.exporter.onnx import check_static_graph, write_onnx
from tpc.methods import hiprune
from tpc.passes.qwen_vision import QwenVisionGrid, QwenVisionTower, patchify

PATCH, MERGE, TEMPORAL = 4, 2, 2
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 128,
}
VISION = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": PATCH}
# 56x56: 14x14 patches, 7x7 merged tokens, windows of 2x2 merged tokens -> 16 windows, the edge ones partial;
# 64x48: 16x12 patches, 8x6 merged, 12 full windows (the plain-reshape grouping)
PARTIAL_WINDOWS, FULL_WINDOWS = (56, 56), (64, 48)


@pytest.fixture(scope="module")
def qwen25() -> nn.Module:
    vision = {**VISION, "window_size": 16, "out_hidden_size": 24, "fullatt_block_indexes": [1, 3]}
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(vision_config=vision, text_config=TEXT))
    return model.float().eval().model.visual


@pytest.fixture(scope="module")
def qwen3() -> nn.Module:
    vision = {**VISION, "out_hidden_size": 24, "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]}
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(vision_config=vision, text_config=TEXT))
    return model.float().eval().model.visual


def _pixels(size: tuple[int, int], batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _reference(visual: nn.Module, pixels: Tensor, grid: QwenVisionGrid, row: int) -> object:
    """transformers' own tower on one image of the batch, packed as the processor packs it."""
    flat = patchify(pixels[row : row + 1], PATCH, TEMPORAL, MERGE)[0]
    with torch.no_grad():
        return visual(flat, grid_thw=torch.tensor([[1, *grid.grid]]))


# --- 1. patches ----------------------------------------------------------------------------------------------


def test_patchify_equals_the_image_processor() -> None:
    processor = Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = processor(images=list(images), do_resize=False, return_tensors="pt")
    mean, std = (torch.tensor(v)[:, None, None] for v in (processor.image_mean, processor.image_std))
    normalised = (images.float() / 255 - mean) / std
    ours = patchify(normalised, PATCH, TEMPORAL, MERGE)
    assert ours.shape == (2, 10 * 14, 3 * TEMPORAL * PATCH * PATCH)
    assert expected.image_grid_thw.tolist() == [[1, 10, 14]] * 2
    torch.testing.assert_close(ours.reshape(-1, ours.shape[-1]), expected.pixel_values, rtol=0, atol=1e-6)


def test_grid_refuses_an_image_size_off_the_merge_grid(qwen25: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"multiple of patch_size·spatial_merge_size = 4·2 = 8"):
        QwenVisionGrid.from_config(qwen25.config, (56, 60))
    grid = QwenVisionGrid.from_config(qwen25.config, PARTIAL_WINDOWS)
    with pytest.raises(ValueError, match="scoring"):
        QwenVisionTower(qwen25, grid, scoring="eager")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        QwenVisionTower(qwen25, grid, tapped_blocks=(0,))


def test_grid_constants(qwen25: nn.Module, qwen3: nn.Module) -> None:
    grid = QwenVisionGrid.from_config(qwen25.config, PARTIAL_WINDOWS)
    assert (grid.grid, grid.merged_grid, grid.num_patches, grid.num_merged) == ((14, 14), (7, 7), 196, 49)
    assert [grid.windowed(b) for b in range(4)] == [True, False, True, False]  # fullatt_block_indexes [1, 3]
    assert grid.bounds[1] == (0, 196) and len(grid.bounds[0]) == 16 + 1
    assert grid.window_index is not None and grid.reverse_indices is not None
    assert torch.equal(grid.window_index[grid.reverse_indices], torch.arange(49))
    grid3 = QwenVisionGrid.from_config(qwen3.config, PARTIAL_WINDOWS)
    assert grid3.window_index is None and grid3.reverse_indices is None
    assert grid3.bounds == ((0, 196),) * 4 and grid3.deepstack_blocks == (0, 1)
    assert grid3.interp_indices is not None and grid3.interp_indices.shape == (196, 4)


# --- 2. merged tokens and DeepStack features equal transformers' ----------------------------------------


@pytest.mark.parametrize("size", [PARTIAL_WINDOWS, FULL_WINDOWS])
def test_qwen25_tower_equals_transformers(qwen25: nn.Module, size: tuple[int, int]) -> None:
    grid = QwenVisionGrid.from_config(qwen25.config, size)
    tower = QwenVisionTower(qwen25, grid).eval()
    pixels = _pixels(size)
    with torch.no_grad():
        out = tower(pixels)
    assert out.embeds.shape == (2, grid.num_merged, 24) and out.deepstack == () and out.received == {}
    for row in range(2):
        reference = _reference(qwen25, pixels, grid, row)
        torch.testing.assert_close(out.embeds[row], reference.pooler_output, rtol=1e-5, atol=1e-5)


def test_qwen3_tower_equals_transformers(qwen3: nn.Module) -> None:
    grid = QwenVisionGrid.from_config(qwen3.config, (56, 64))  # 14x16 patches, pos_embed resampled from 8x8
    tower = QwenVisionTower(qwen3, grid).eval()
    pixels = _pixels((56, 64))
    with torch.no_grad():
        out = tower(pixels)
    assert out.embeds.shape == (2, 56, 24) and len(out.deepstack) == 2
    for row in range(2):
        reference = _reference(qwen3, pixels, grid, row)
        torch.testing.assert_close(out.embeds[row], reference.pooler_output, rtol=1e-5, atol=1e-5)
        for ours, theirs in zip(out.deepstack, reference.deepstack_features, strict=True):
            torch.testing.assert_close(ours[row], theirs, rtol=1e-5, atol=1e-5)


# --- 3. the tap equals hiprune.qwen_reduce of explicit attention maps -----------------------------------


def _attention_maps(visual: nn.Module, pixels: Tensor, grid: QwenVisionGrid, row: int) -> dict[int, Tensor]:
    """Each block's (H, T, T) softmax(q kᵀ·scale) over all patches, q and k rotated as transformers does, taken
    from the block's own inputs (a hook on transformers' forward)."""
    seen: dict[int, tuple[Tensor, tuple[Tensor, Tensor]]] = {}
    hooks = [
        block.attn.register_forward_hook(
            lambda _m, args, kwargs, _out, n=n: seen.__setitem__(n, (args[0], kwargs["position_embeddings"])),
            with_kwargs=True,
        )
        for n, block in enumerate(visual.blocks, start=1)
    ]
    try:
        _reference(visual, pixels, grid, row)
    finally:
        for hook in hooks:
            hook.remove()
    maps = {}
    for n, (hidden, (cos, sin)) in seen.items():
        attn = visual.blocks[n - 1].attn
        q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        maps[n] = torch.softmax(torch.einsum("thd,shd->hts", q, k) * attn.scaling, dim=-1)
    return maps


def _windowed(attention: Tensor, bounds: tuple[int, ...]) -> Tensor:
    """The same logits' softmax within each window: block-diagonal renormalisation of the full map."""
    group = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(np.diff(bounds)))
    masked = attention * (group[:, None] == group[None, :])
    return masked / masked.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("scoring", ["global", "windowed"])
def test_qwen25_taps_equal_qwen_reduce_of_the_attention_maps(qwen25: nn.Module, scoring: str) -> None:
    grid = QwenVisionGrid.from_config(qwen25.config, PARTIAL_WINDOWS)
    # 7 query rows per block: the scores are summed over several row blocks
    tower = QwenVisionTower(qwen25, grid, tapped_blocks=(1, 2), scoring=scoring, block_elements=2 * 2 * 196 * 7)
    pixels = _pixels(PARTIAL_WINDOWS)
    with torch.no_grad():
        out, untapped = tower.eval()(pixels), QwenVisionTower(qwen25, grid).eval()(pixels)
    # a tapped block whose scored softmax is its own computes its output from it: the same up to rounding
    torch.testing.assert_close(out.embeds, untapped.embeds, rtol=1e-5, atol=1e-6)
    assert grid.reverse_indices is not None
    for row in range(2):
        with torch.no_grad():
            maps = _attention_maps(qwen25, pixels, grid, row)
        for block in (1, 2):  # block 1 windowed, block 2 full attention
            attention = maps[block] if scoring == "global" else _windowed(maps[block], grid.bounds[block - 1])
            expected = hiprune.qwen_reduce(attention, grid.reverse_indices)
            torch.testing.assert_close(out.received[block][row], expected, rtol=1e-5, atol=1e-5)


def test_windowed_scoring_differs_from_global_only_in_windowed_blocks(qwen25: nn.Module) -> None:
    grid = QwenVisionGrid.from_config(qwen25.config, PARTIAL_WINDOWS)
    pixels = _pixels(PARTIAL_WINDOWS)
    with torch.no_grad():
        scored = {s: QwenVisionTower(qwen25, grid, (1, 2), scoring=s).eval()(pixels) for s in ("global", "windowed")}
    assert not torch.allclose(scored["global"].received[1], scored["windowed"].received[1], atol=1e-3)
    torch.testing.assert_close(scored["global"].received[2], scored["windowed"].received[2])
    # a windowed softmax sums to one per row inside a window: each merged token's score averages its window's
    torch.testing.assert_close(scored["windowed"].received[1].sum(-1), torch.full((2,), 196 / 4))


def test_qwen3_tap_equals_qwen_reduce(qwen3: nn.Module) -> None:
    grid = QwenVisionGrid.from_config(qwen3.config, PARTIAL_WINDOWS)
    pixels = _pixels(PARTIAL_WINDOWS, batch=1)
    with torch.no_grad():
        out = QwenVisionTower(qwen3, grid, tapped_blocks=(3,)).eval()(pixels)
        maps = _attention_maps(qwen3, pixels, grid, 0)
    expected = hiprune.qwen_reduce(maps[3], torch.arange(grid.num_merged))  # sequence order is raster order
    torch.testing.assert_close(out.received[3][0], expected, rtol=1e-5, atol=1e-5)


# --- 4. static export -----------------------------------------------------------------------------------


def test_torch_export_equals_eager(qwen3: nn.Module, qwen25: nn.Module) -> None:
    for visual, scoring in ((qwen25, "windowed"), (qwen3, "global")):
        grid = QwenVisionGrid.from_config(visual.config, PARTIAL_WINDOWS)
        tower = QwenVisionTower(visual, grid, tapped_blocks=(1, 3), scoring=scoring).eval()
        pixels = _pixels(PARTIAL_WINDOWS)
        with torch.no_grad():
            program = torch.export.export(tower, (pixels,), strict=False)
            exported, eager = program.module()(pixels), tower(pixels)
        torch.testing.assert_close(exported.embeds, eager.embeds)
        torch.testing.assert_close(exported.deepstack, eager.deepstack)
        assert exported.received.keys() == {1, 3}
        torch.testing.assert_close(exported.received, eager.received)


def test_onnx_export_runs_in_onnxruntime(qwen25: nn.Module, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    grid = QwenVisionGrid.from_config(qwen25.config, PARTIAL_WINDOWS)  # padded windows: gathers and a key mask
    tower = QwenVisionTower(qwen25, grid, tapped_blocks=(1, 2), block_elements=2 * 2 * 196 * 50).eval()
    pixels = _pixels(PARTIAL_WINDOWS)
    with torch.no_grad():
        program = torch.export.export(tower, (pixels,), strict=False)
        eager = tower(pixels)
    names = ("embeds", "received_1", "received_2")
    model = write_onnx(program, {"pixel_values": pixels}, names, tmp_path / "tower.onnx")  # torch.onnx, dynamo
    check_static_graph(model)  # every shape static, no data-dependent op
    session = ort.InferenceSession(str(tmp_path / "tower.onnx"), providers=["CPUExecutionProvider"])
    outputs = dict(zip(names, session.run(None, {"pixel_values": pixels.numpy()}), strict=True))
    np.testing.assert_allclose(outputs["embeds"], eager.embeds.numpy(), rtol=1e-5, atol=1e-5)
    for block in (1, 2):
        np.testing.assert_allclose(outputs[f"received_{block}"], eager.received[block].numpy(), rtol=1e-5, atol=1e-5)
