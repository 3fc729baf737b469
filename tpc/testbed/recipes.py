"""The two testbed recipes, trained on Fashion-MNIST: a CLIP-style classifier and a LLaVA that names the class.

fmnist-vit: `CLIPForImageClassification` (transformers' CLIP tower + a linear head on the mean of the last layer's
patch tokens) on 28x28 grey images cut into 2x2 patches, so one image is 14x14 = 196 tokens + CLS and keeping 98,
49 or 24 of them is a real choice. The head reads the patch tokens, never CLS, so a pruned tower changes what the
head sees exactly as a pruned LLaVA changes what its LLM sees.

fmnist-llava: `LlavaForConditionalGeneration` with fmnist-vit's tower (frozen: its attention is what HiPrune and
the other vision-side methods read), an MLP projector and a 4-layer Llama trained from scratch to answer the chat
template's question ("What is shown in this image?") with the class name, one word of a word-level tokenizer
that ships with it. One step in five is an in-context prompt (an example image with "this is a <class>." before the
query image), the n-shot form CATP prunes.

Training is seeded and runs on one thread: on one machine a run repeats bit for bit; elsewhere the float
reductions may round differently and the accuracy moves by a fraction of a point.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tpc.datasets import LabelledImages, load_dataset, to_pixels

DATASET = "fashion-mnist"
# the word each class is answered with (one token each); the dataset's class names are in its own order
ANSWERS = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5
VISION: dict[str, Any] = {
    "image_size": 28,
    "patch_size": 2,  # 14 x 14 = 196 patch tokens
    "num_channels": 1,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
}
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
WORDS = ("user", "assistant", ":", "what", "is", "shown", "in", "this", "image", "?", "a", "an", "example", ".")
IMAGE_TOKEN = "<image>"
# "{role}: <image> text ... assistant:" - the question and the n-shot examples' text come from tpc's prompt layout
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} "
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
QUESTION = "What is shown in this image?"
SHOT_PERIOD = 5  # every fifth step trains on one-shot prompts
SHOT_IMAGES = 2000  # test images the one-shot accuracy is measured on
SMOKE_TEST_IMAGES = 1000  # a shortened run (--steps) measures on the first test images only


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    steps: int
    batch: int
    learning_rate: float
    seed: int = 0
    warmup: int = 100
    weight_decay: float = 0.05


@dataclass(frozen=True)
class TrainResult:
    """What a run measured: written beside the weights as training.json (and read by `tpc zoo`'s tests)."""

    recipe: dict[str, Any]
    test_accuracy: float  # top-1 on the full test split
    test_images: int
    minutes: float
    final_loss: float
    machine: str
    torch: str
    transformers: str
    extra: dict[str, float]


RECIPES = {
    "fmnist-vit": Recipe(
        "fmnist-vit", "CLIPForImageClassification, 196 patch tokens + CLS, 4 layers d=64", 1000, 128, 2e-3
    ),
    "fmnist-llava": Recipe(
        "fmnist-llava",
        "fmnist-vit's tower (frozen) + projector + 4-layer Llama d=64 answering the class",
        700,
        64,
        2e-3,
    ),
}

Log = Callable[[str], None]


def _schedule(recipe: Recipe) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero at the last step."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / recipe.warmup)
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, recipe.steps) / recipe.steps))

    return factor


def _test_set(steps: int | None) -> LabelledImages:
    test_set = load_dataset(DATASET, "test")
    return test_set if steps is None else test_set.subset(SMOKE_TEST_IMAGES)


def _pixels(data: LabelledImages) -> Tensor:
    return torch.from_numpy(to_pixels(data.images, (28, 28), 1, [PIXEL_MEAN], [PIXEL_STD]))


def _batches(count: int, batch: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of `steps` batches, epoch after epoch of seeded permutations (a partial last batch is skipped)."""
    done = 0
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch + 1, batch):
            if done == steps:
                return
            yield order[start : start + batch]
            done += 1


def vit_config() -> Any:
    from transformers import CLIPConfig

    # num_labels, id2label: PreTrainedConfig's own fields, which CLIPConfig's signature does not list
    labels: dict[str, Any] = {"id2label": dict(enumerate(ANSWERS)), "label2id": {n: i for i, n in enumerate(ANSWERS)}}
    return CLIPConfig(vision_config=VISION, **labels)


def _write_preprocessor(directory: Path) -> None:
    """The processor a user would load: no resize or crop, x/255 then (x - 0.5)/0.5 on the one grey channel."""
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": False,
        "do_center_crop": False,
        "do_convert_rgb": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [PIXEL_MEAN],
        "image_std": [PIXEL_STD],
        "size": {"height": VISION["image_size"], "width": VISION["image_size"]},
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _optimizer(params: list[nn.Parameter], recipe: Recipe) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe))


def _step(loss: Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return float(loss.item())


def train_vit(recipe: Recipe, output: Path, log: Log, steps: int | None = None) -> dict[str, float]:
    from transformers import CLIPForImageClassification

    train_set, test_set = load_dataset(DATASET, "train"), _test_set(steps)
    pixels, labels = _pixels(train_set), torch.tensor(train_set.labels)  # a copy: the dataset's arrays are read-only
    model = CLIPForImageClassification(vit_config())
    params = list(model.parameters())
    optimizer, scheduler = _optimizer(params, recipe)
    generator = torch.Generator().manual_seed(recipe.seed)
    loss = math.nan
    total = steps or recipe.steps
    model.train()
    for step, index in enumerate(_batches(len(labels), recipe.batch, total, generator), start=1):
        out = model(pixel_values=pixels[index], labels=labels[index])
        loss = _step(out.loss, params, optimizer, scheduler)
        if step % 100 == 0 or step == total:
            log(f"step {step}/{total} loss {loss:.4f}")
    model.eval()
    accuracy = _classifier_accuracy(model, test_set)
    model.save_pretrained(output)
    _write_preprocessor(output)
    return {"final_loss": loss, "test_accuracy": accuracy, "test_images": len(test_set)}


def _classifier_accuracy(model: Any, data: LabelledImages) -> float:
    pixels = _pixels(data)
    with torch.no_grad():
        predicted = torch.cat(
            [model(pixel_values=pixels[i : i + 500]).logits.argmax(-1) for i in range(0, len(data), 500)]
        )
    return float((predicted.numpy() == data.labels).mean())


# --- the LLaVA recipe ---------------------------------------------------------------------------------------------


def build_tokenizer() -> Any:
    """A word-level tokenizer (lower-cased, split at spaces and punctuation) holding the template's words and the
    ten answers, with the chat template tpc's prompt layout renders."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL, *WORDS, *ANSWERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def llava_config(tokenizer: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = 32  # the tokenizer's 29 entries, rounded up
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION).to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2,
        id2label=dict(enumerate(ANSWERS)),
        label2id={name: i for i, name in enumerate(ANSWERS)},
    )


def prompt_ids(tokenizer: Any, examples: int) -> list[int]:
    """The chat template's prompt with `examples` in-context images before the query (each image one token)."""
    parts = [{"type": "image"}, {"type": "text", "text": "This is an example."}] * examples
    parts += [{"type": "image"}, {"type": "text", "text": QUESTION}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
    )
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def expand_images(ids: list[int], image_id: int, count: int) -> list[int]:
    """Each image token as the processor expands it: `count` image tokens."""
    return [t for token in ids for t in ([token] * count if token == image_id else [token])]


def labelled_examples(ids: list[int], tokenizer: Any, labels: np.ndarray) -> np.ndarray:
    """(B, len) prompts whose in-context examples say what they are: "this is an example ." becomes "this is a
    <class> ." (the same number of tokens, so the static layout does not move). `labels`: (B, examples)."""
    an, example, a = (tokenizer.convert_tokens_to_ids(w) for w in ("an", "example", "a"))
    answer_ids = np.array([tokenizer.convert_tokens_to_ids(w) for w in ANSWERS])
    rows = np.tile(np.array(ids, dtype=np.int64), (len(labels), 1))
    where = [i for i in range(len(ids) - 1) if ids[i] == an and ids[i + 1] == example]
    for shot, position in enumerate(where):
        rows[:, position] = a
        rows[:, position + 1] = answer_ids[labels[:, shot]]
    return rows


def train_llava(recipe: Recipe, output: Path, log: Log, encoder: Path, steps: int | None = None) -> dict[str, float]:
    from transformers import CLIPForImageClassification, LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    config = llava_config(tokenizer)
    model = LlavaForConditionalGeneration(config)
    classifier = CLIPForImageClassification.from_pretrained(str(encoder), local_files_only=True)
    model.model.vision_tower.load_state_dict(classifier.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(params, recipe)

    train_set, test_set = load_dataset(DATASET, "train"), _test_set(steps)
    pixels, labels = _pixels(train_set), torch.tensor(train_set.labels)  # a copy: the dataset's arrays are read-only
    image_id, count = config.image_token_index, config.image_seq_length
    answer_ids = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in ANSWERS])
    prompts = {shots: expand_images(prompt_ids(tokenizer, shots), image_id, count) for shots in (0, 1)}
    generator = torch.Generator().manual_seed(recipe.seed)
    total, loss = steps or recipe.steps, math.nan
    model.train()
    model.model.vision_tower.eval()
    for step, index in enumerate(_batches(len(labels), recipe.batch, total, generator), start=1):
        shots = 1 if step % SHOT_PERIOD == 0 else 0
        images = pixels[index]
        context = np.zeros((len(index), 0), dtype=np.int64)
        if shots:
            examples = torch.randint(0, len(labels), (len(index),), generator=generator)
            images = torch.stack([pixels[examples], images], dim=1).flatten(0, 1)
            context = labels[examples].numpy()[:, None]
        ids = torch.from_numpy(labelled_examples(prompts[shots], tokenizer, context))
        answer = answer_ids[labels[index]]
        eos = torch.full_like(answer, tokenizer.eos_token_id)
        input_ids = torch.cat([ids, answer[:, None], eos[:, None]], dim=1)
        targets = torch.full_like(input_ids, -100)
        targets[:, -2:] = input_ids[:, -2:]
        out = model(input_ids=input_ids, pixel_values=images, labels=targets)
        loss = _step(out.loss, params, optimizer, scheduler)
        if step % 50 == 0 or step == total:
            log(f"step {step}/{total} loss {loss:.4f}")
    model.eval()
    accuracy = vlm_accuracy(model, tokenizer, test_set, examples=0)
    shot_accuracy = vlm_accuracy(model, tokenizer, test_set.subset(SHOT_IMAGES), examples=1, context=train_set)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    _write_preprocessor(output)
    return {
        "final_loss": loss,
        "test_accuracy": accuracy,
        "test_images": len(test_set),
        "one_shot_accuracy": shot_accuracy,
        "one_shot_images": min(SHOT_IMAGES, len(test_set)),
    }


def vlm_accuracy(
    model: Any, tokenizer: Any, data: LabelledImages, examples: int, context: LabelledImages | None = None
) -> float:
    """Top-1 of the first generated token against the class's answer word (the n-shot examples drawn, seeded,
    from `context`)."""
    config = model.config
    ids = expand_images(prompt_ids(tokenizer, examples), config.image_token_index, config.image_seq_length)
    answer_ids = np.array([tokenizer.convert_tokens_to_ids(w) for w in ANSWERS])
    pixels = _pixels(data)
    rng = np.random.default_rng(0)
    correct = 0
    for start in range(0, len(data), 250):
        images = pixels[start : start + 250]
        shot_labels = np.zeros((len(images), 0), dtype=np.int64)
        if examples:
            assert context is not None
            drawn = rng.integers(0, len(context), size=(len(images), examples))
            shot_labels = context.labels[drawn]
            shot_pixels = _pixels(context)[torch.from_numpy(drawn)]
            images = torch.cat([shot_pixels, images[:, None]], dim=1).flatten(0, 1)
        rows = torch.from_numpy(labelled_examples(ids, tokenizer, shot_labels))
        with torch.no_grad():
            logits = model(input_ids=rows, pixel_values=images).logits[:, -1]
        predicted = logits.argmax(-1).numpy()
        correct += int((predicted == answer_ids[data.labels[start : start + 250]]).sum())
    return correct / len(data)


# --- the command ----------------------------------------------------------------------------------------------------


def train(name: str, output: Path, log: Log, encoder: Path | None = None, steps: int | None = None) -> TrainResult:
    """Train recipe `name` into `output` (a new directory the caller stages) and write training.json there.

    `steps` shortens the run (a smoke test); the shipped checkpoints use the recipe's own."""
    import transformers

    recipe = RECIPES[name]
    torch.set_num_threads(1)  # deterministic, and 4x faster than two contended threads on a shared 2-core machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    if name == "fmnist-llava":
        assert encoder is not None, "the LLaVA recipe starts from a trained fmnist-vit"
        measured = train_llava(recipe, output, log, encoder, steps)
    else:
        measured = train_vit(recipe, output, log, steps)
    minutes = (time.perf_counter() - start) / 60
    result = TrainResult(
        recipe={**asdict(recipe), **({"steps": steps} if steps else {})},
        test_accuracy=measured.pop("test_accuracy"),
        test_images=int(measured.pop("test_images")),
        minutes=round(minutes, 2),
        final_loss=measured.pop("final_loss"),
        machine=f"{platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} cores",
        torch=torch.__version__,
        transformers=transformers.__version__,
        extra=measured,
    )
    (output / "training.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    log(f"test accuracy {result.test_accuracy:.4f} on {result.test_images} images, {minutes:.1f} min")
    return result
