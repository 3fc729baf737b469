"""LLaVA-style VLMs: vision / prefill / decode components, pruned, exported, and run as a generation loop."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from tpc.cli import main
from tpc.errors import UsageError
from tpc.kinds.vlm import seeded_prompt
from tpc.methods import divprune, fastv, hiprune
from tpc.pipeline import PruneRequest, build
from tpc.profiling.report import validate
from tpc.runtimes import VLM
from tpc.verification import generation_inputs, verify

STANDALONE_COMPONENTS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime as ort
    directory = sys.argv[1]
    manifest = json.load(open(f"{directory}/tpc.json"))
    sessions = {}
    for component in manifest["components"]:
        name = component["name"]
        session = ort.InferenceSession(f"{directory}/{component['artifact']}", providers=["CPUExecutionProvider"])
        sessions[name] = session
        inputs = dict(np.load(f"{directory}/samples/{name}/inputs.npz"))
        expected = dict(np.load(f"{directory}/samples/{name}/expected.npz"))
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(names, inputs)))
        assert set(outputs) == set(expected), (name, sorted(outputs), sorted(expected))
        for key, value in expected.items():
            if key == "kept_indices":
                np.testing.assert_array_equal(outputs[key], value)
            else:
                np.testing.assert_allclose(outputs[key], value, rtol=1e-3, atol=1e-4)
    # the step protocol of tpc.json, with numpy only: vision, prefill, then decode steps
    g = manifest["generation"]
    sample = dict(np.load(f"{directory}/samples/generation.npz"))
    ids, start = sample["input_ids"], g["prompt"]["image_start"]
    kept, image_tokens = g["prefill"]["image_tokens"], g["prompt"]["image_tokens"]
    ids = np.concatenate([ids[:, : start + kept], ids[:, start + image_tokens :]], 1)
    embeds = sessions["vision"].run(["image_embeds"], {"pixel_values": sample["pixel_values"]})[0]
    names = [o.name for o in sessions["prefill"].get_outputs()]
    out = dict(zip(names, sessions["prefill"].run(names, {"input_ids": ids, "image_embeds": embeds})))
    tokens = []
    for step in range(sample["tokens"].shape[1]):
        token = out["logits"].argmax(-1)
        tokens.append(token)
        feed = {k.replace("present", "past"): v for k, v in out.items() if k.startswith("present")}
        feed.update(input_ids=token[:, None], step=np.array([step]))
        names = [o.name for o in sessions["decode"].get_outputs()]
        out = dict(zip(names, sessions["decode"].run(names, feed)))
    np.testing.assert_array_equal(np.stack(tokens, 1), sample["tokens"])
    assert "torch" not in sys.modules
    print("reproduced", len(tokens), "tokens")
    """
)


def cli(*args: str) -> int:
    return main(list(args))


def test_cli_export_hiprune_components_verify_and_run_standalone(tmp_path: Path) -> None:
    out = tmp_path / "D"
    assert (
        cli("export", "zoo:tiny-llava", "--method", "hiprune", "--keep", "64", "--target", "onnx", "--output", str(out))
        == 0
    )
    assert cli("verify", str(out)) == 0
    assert cli("verify", str(out), "--inputs", str(out / "samples" / "generation.npz")) == 0
    manifest = json.loads((out / "tpc.json").read_text())
    assert [c["artifact"] for c in manifest["components"]] == ["vision.onnx", "prefill.onnx", "decode.onnx"]
    prefill = {s["name"]: s["shape"] for s in manifest["components"][1]["inputs"]}
    text = manifest["generation"]["prompt"]["text_tokens"]
    assert prefill["input_ids"] == [1, text + 64] and prefill["image_embeds"] == [
        1,
        64,
        64,
    ]  # text + 64 image positions
    vision_outputs = {s["name"]: s["shape"] for s in manifest["components"][0]["outputs"]}
    assert vision_outputs == {"image_embeds": [1, 64, 64], "kept_indices": [1, 64]}
    assert (
        manifest["verification"]["generation"]["passed"] and manifest["verification"]["generation"]["new_tokens"] >= 8
    )
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE_COMPONENTS, str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "reproduced 32 tokens" in result.stdout


@pytest.mark.parametrize("method", ["hiprune", "fastv", "divprune", "random"])
def test_verify_passes_for_each_method(exported: Callable[..., Path], method: str) -> None:
    report = verify(exported("zoo:tiny-llava", method, 64), samples=2)
    assert report.passed, report.diagnosis
    assert report.kept_rows_agreeing == report.kept_rows > 0
    assert report.generation is not None and report.generation.new_tokens >= 8 and report.generation.passed


def _hf(path: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(str(path), attn_implementation="eager").eval()


def _hf_generate(model: LlavaForConditionalGeneration, pixels: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), max_new_tokens=n, do_sample=False
        )
    return out[:, ids.shape[1] :].numpy()


def test_unpruned_export_equals_transformers_generate(exported: Callable[..., Path]) -> None:
    directory = exported("zoo:tiny-llava", "none", None)
    vlm = VLM.load(directory)
    pruned = build(PruneRequest("zoo:tiny-llava", "none", None))
    model = _hf(pruned.source.path)
    for seed in range(3):
        pixels, ids = generation_inputs(pruned, seed)
        ours = vlm.generate(pixels, ids, max_new_tokens=12)
        np.testing.assert_array_equal(ours, _hf_generate(model, pixels, ids, 12))


def test_hiprune_vision_component_matches_the_reference_on_the_towers_attention() -> None:
    pruned = build(PruneRequest("zoo:tiny-llava", "hiprune", 48))
    model = _hf(pruned.source.path)
    pixels = pruned.samples(seed=5)["vision"]["pixel_values"]
    with torch.no_grad():
        embeds, kept = pruned.components["vision"].module(pixels)
        tower = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        params = pruned.params
        obj = hiprune.scores(tower.attentions[params["object_layer"] - 1])
        deep = hiprune.scores(tower.attentions[params["deep_layer"] - 1])
        want = hiprune.select(obj, deep, 48, (16, 16))
        all_embeds = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    torch.testing.assert_close(kept, want, rtol=0, atol=0)
    torch.testing.assert_close(embeds[0], all_embeds[want[0]], rtol=1e-4, atol=1e-5)


def test_divprune_scores_the_llm_input_embeddings_as_the_reference() -> None:
    """The reference runs DivPrune on the image tokens' LLM input embeddings (the projector's output), not on the
    tower's features; the kept set differs between the two on this model, so the test can tell them apart."""
    pruned = build(PruneRequest("zoo:tiny-llava", "divprune", 24))
    model = _hf(pruned.source.path)
    pixels = pruned.samples(seed=3)["vision"]["pixel_values"]
    with torch.no_grad():
        embeds, kept = pruned.components["vision"].module(pixels)
        all_embeds = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        tower = model.model.vision_tower(pixels, output_hidden_states=True)
        layer = model.config.vision_feature_layer
        features = tower.hidden_states[layer][:, 1:]  # the CLS token dropped ("default" strategy)
    want = divprune.select(all_embeds[None], 24)
    torch.testing.assert_close(kept, want, rtol=0, atol=0)
    assert not torch.equal(divprune.select(features, 24), want)  # the tower's features would keep another set
    torch.testing.assert_close(embeds[0], all_embeds[want[0]], rtol=1e-4, atol=1e-5)


def test_fastv_prefill_matches_a_reference_built_from_transformers() -> None:
    """Kept set from eager attention maps of layer K-1; logits from transformers' own layers K.. run on the kept
    hidden states with their original position ids."""
    pruned = build(PruneRequest("zoo:tiny-llava", "fastv", 40))
    model = _hf(pruned.source.path)
    generation = pruned.plan.generation()
    start, count = generation.prompt.image_start, generation.prompt.image_tokens
    layer = pruned.params["layer"]
    pixels, ids = generation_inputs(pruned, seed=2)
    with torch.no_grad():
        outputs = pruned.components["prefill"].module(*pruned.samples(seed=2)["prefill"].values())
        logits, kept = outputs[0], outputs[-1]
        full = model(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(pixels),
            output_attentions=True,
            output_hidden_states=True,
        )
        want = fastv.select(fastv.scores(full.attentions[layer - 1], start, count), 40)
        sequence = torch.cat([torch.arange(start), want[0] + start, torch.arange(start + count, ids.shape[1])])
        tail = copy.deepcopy(model.model.language_model)
        tail.layers = tail.layers[layer:]
        kept_hidden = full.hidden_states[layer][:, sequence]
        mask = torch.ones(kept_hidden.shape[:2], dtype=torch.long)  # without it, position jumps read as packing
        hidden = tail(
            inputs_embeds=kept_hidden, attention_mask=mask, position_ids=sequence[None], use_cache=False
        ).last_hidden_state
        want_logits = model.lm_head(hidden[:, -1])
    torch.testing.assert_close(kept, want, rtol=0, atol=0)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)


def _tiny_text() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        initializer_range=0.1,
    )


def _save(tmp_path: Path, config: LlavaConfig) -> Path:
    torch.manual_seed(0)
    directory = tmp_path / "my-llava"
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    return directory


def _vision(config_class: type, **extra: object) -> dict:
    base = dict(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    return config_class(**base, num_attention_heads=2, initializer_factor=4.0, **extra).to_dict()


def test_user_llava_with_siglip_tower_and_full_features_exports_and_verifies(tmp_path: Path) -> None:
    config = LlavaConfig(
        vision_config=_vision(SiglipVisionConfig),
        text_config=_tiny_text().to_dict(),
        image_token_id=299,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=64,
    )
    directory = _save(tmp_path, config)
    out = tmp_path / "D"
    assert cli("export", str(directory), "--method", "hiprune", "--keep", "16", "--output", str(out)) == 0
    manifest = json.loads((out / "tpc.json").read_text())
    assert manifest["params"]["deep_layer"] == 3 and manifest["generation"]["prompt"]["image_tokens"] == 64
    assert manifest["verification"]["passed"]


def test_user_llava_with_cls_kept_and_two_feature_layers(tmp_path: Path) -> None:
    """CLIP + 'full' hands CLS to the LLM: it is always kept and counts towards K; features concatenate layers."""
    config = LlavaConfig(
        vision_config=_vision(CLIPVisionConfig),
        text_config=_tiny_text().to_dict(),
        image_token_id=299,
        vision_feature_select_strategy="full",
        vision_feature_layer=[-3, -2],
        image_seq_length=65,
    )
    directory = _save(tmp_path, config)
    out = tmp_path / "D"
    assert cli("export", str(directory), "--method", "hiprune", "--keep", "17", "--output", str(out)) == 0
    kept = np.load(out / "samples" / "vision" / "expected.npz")["kept_indices"]
    assert kept.shape == (1, 17) and kept[0, 0] == 0 and (np.diff(kept[0]) > 0).all()
    base = tmp_path / "none"
    assert cli("export", str(directory), "--method", "none", "--output", str(base), "--max-new-tokens", "10") == 0
    pruned = build(PruneRequest(str(directory), "none", None, max_new_tokens=10))
    pixels, ids = generation_inputs(pruned, seed=1)
    ours = VLM.load(base).generate(pixels, ids)
    np.testing.assert_array_equal(ours, _hf_generate(_hf(directory), pixels, ids, 10))


def _word_level_tokenizer(directory: Path, image_token_id: int, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "USER:", "ASSISTANT:", "What", "is", "shown", "in", "this", "image?"]
    vocab = {word: i for i, word in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), vocab_size) if i != image_token_id})
    vocab["<image>"] = image_token_id
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    tokenizer.save_pretrained(directory)


def test_prompt_layout_comes_from_the_chat_template_when_a_tokenizer_is_present(tmp_path: Path) -> None:
    config = LlavaConfig(
        vision_config=_vision(CLIPVisionConfig), text_config=_tiny_text().to_dict(), image_token_id=299
    )
    directory = _save(tmp_path, config)
    _word_level_tokenizer(directory, 299, 300)
    plan = build(PruneRequest(str(directory), "uniform", 16)).plan
    # "USER: <image> What is shown in this image? ASSISTANT:": 9 tokens, the image token second
    assert plan.prompt.image_start == 1 and plan.prompt.text_len == 8
    ids = seeded_prompt(plan, seed=0)[0]  # seed 0 is the template's prompt, the image expanded
    assert ids[:3].tolist() == [3, 299, 299] and ids[-2:].tolist() == [10, 4] and len(ids) == 8 + 64
    assert build(PruneRequest(str(directory), "uniform", 16, prompt_len=20)).plan.prompt.text_len == 20


def test_generate_rejects_a_prompt_of_another_layout(exported: Callable[..., Path]) -> None:
    vlm = VLM.load(exported("zoo:tiny-llava", "none", None))
    pruned = build(PruneRequest("zoo:tiny-llava", "none", None))
    pixels, ids = generation_inputs(pruned, 0)
    with pytest.raises(UsageError, match="re-export with --prompt-len"):
        vlm.generate(pixels, ids[:, 1:])
    shifted = np.roll(ids, 1, axis=1)
    with pytest.raises(UsageError, match="exactly one run of 256 image tokens"):
        vlm.generate(pixels, shifted)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "fastv", "--keep", "64", "--param", "layer=4"], "outside the decoder's layers 1..3"),
        (["--method", "hiprune", "--keep", "300"], "one image is 256 image tokens in the prompt (use 1..256)"),
        (["--method", "hiprune", "--keep", "64", "--param", "feature_layer=2"], "--param feature_layer does not apply"),
        (["--method", "none", "--prompt-len", "1"], "--prompt-len 1 is too short"),
        (["--method", "none", "--max-new-tokens", "7"], "--max-new-tokens must be at least 8"),
    ],
)
def test_bad_vlm_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list, message: str):
    code = cli("export", "zoo:tiny-llava", "--output", str(tmp_path / "o"), *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_prompt_len_changes_the_static_prefill_length(exported: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "D"
    assert cli("export", "zoo:tiny-llava", "--method", "fastv", "--keep", "32", "--prompt-len", "20",
               "--max-new-tokens", "8", "--output", str(out)) == 0  # fmt: skip
    generation = json.loads((out / "tpc.json").read_text())["generation"]
    assert generation["prompt"] == {"text_tokens": 20, "image_start": 19, "image_tokens": 256, "length": 276}
    assert generation["cache"]["capacity"] == [283, 283, 59, 59]  # FastV: layers 2.. cache only the kept tokens


def test_inspect_and_profile_a_vlm(exported: Callable[..., Path], tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    assert cli("inspect", "zoo:llava-bench", "--method", "hiprune", "--keep", "64", "--json", str(plan_file)) == 0
    plan = json.loads(plan_file.read_text())
    assert plan["tokens"] == {"before": 576, "after": 64} and plan["ideal_speedup"]["first_token"] > 2
    report_file = tmp_path / "profile.json"
    directory = exported("zoo:tiny-llava", "hiprune", 64)
    baseline = exported("zoo:tiny-llava", "none", None)
    assert cli("profile", str(directory), "--runs", "3", "--warmup", "1", "--baseline", str(baseline),
               "--json", str(report_file), "--plot", str(tmp_path / "profile.png")) == 0  # fmt: skip
    assert (tmp_path / "profile.png").stat().st_size > 0
    report = json.loads(report_file.read_text())
    validate(report)
    assert set(report["export"]["components"]) == {"vision", "prefill", "decode"}
    assert report["comparison"]["ratios"][0]["ratio"] > 0 and report["export"]["generation"]["runs"] == 3


@pytest.mark.parametrize(("method", "batch", "dtype"), [("fastv", 2, "fp32"), ("hiprune", 1, "fp16")])
def test_batched_and_fp16_vlm_exports_verify(tmp_path: Path, method: str, batch: int, dtype: str) -> None:
    from tpc.exporting import export

    request = PruneRequest("zoo:tiny-llava", method, 64, dtype=dtype, batch=batch, max_new_tokens=8)
    result = export(request, "onnx", tmp_path / "D", samples=2)
    assert result.report is not None and result.report.passed, result.report
    assert result.report.generation.rows == 2 * batch == result.report.generation.rows_equal
    prefill = result.manifest.component("prefill")
    assert {s.name: s.dtype for s in prefill.inputs}["image_embeds"] == ("float16" if dtype == "fp16" else "float32")
    assert {s.name: s.shape[0] for s in prefill.inputs}["input_ids"] == batch
