"""The testbed: small models trained here, on real labelled images, so that accuracy under pruning means something.

No pretrained vision weights reach the project's machines, and a random-initialised model's accuracy is chance
whatever it keeps. `tpc testbed train NAME --output DIR` trains one of the recipes (`tpc.testbed.recipes`) on
Fashion-MNIST (seeded, one thread, deterministic on one machine) and writes a Hugging Face directory that loads
through `from_pretrained` like any user's checkpoint, with `training.log` and `training.json` beside the weights.
The trained directories ship in `tpc/models_zoo/checkpoints/` as `zoo:fmnist-vit` and `zoo:fmnist-llava`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console

from tpc.errors import UsageError, unknown_name
from tpc.models_zoo.zoo import CHECKPOINTS
from tpc.outputs import check_output, commit, recover, staging_dir
from tpc.testbed.recipes import RECIPES, Recipe, TrainResult, train


def train_command(
    name: str, output: Path, encoder: Path | None, steps: int | None, force: bool, console: Console
) -> TrainResult:
    """`tpc testbed train`: check everything first, train into a staging directory, commit it in one step."""
    if name not in RECIPES:
        raise unknown_name("testbed recipe", name, RECIPES, "see `tpc testbed train --help`")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: give at least 1 step")
    if encoder is not None and name != "fmnist-llava":
        raise UsageError("--encoder applies to fmnist-llava (it starts from a trained fmnist-vit)")
    encoder = encoder or CHECKPOINTS / "fmnist-vit"
    if name == "fmnist-llava" and not (encoder / "model.safetensors").is_file():
        raise UsageError(f"--encoder '{encoder}' holds no trained fmnist-vit (model.safetensors); train it first")
    output = output.absolute()
    recover(output)
    check_output(output, force, [("the encoder", encoder)] if name == "fmnist-llava" else [])
    staging = staging_dir(output)
    started = time.perf_counter()
    try:
        with (staging / "training.log").open("w") as log_file:

            def log(line: str) -> None:
                stamped = f"[{time.perf_counter() - started:7.1f}s] {line}"
                log_file.write(stamped + "\n")
                log_file.flush()
                console.print(stamped, markup=False, highlight=False)

            recipe = RECIPES[name]
            log(
                f"tpc testbed train {name}: {recipe.summary}; {steps or recipe.steps} steps of {recipe.batch} images, "
                f"AdamW lr {recipe.learning_rate} (warm-up {recipe.warmup}, cosine), seed {recipe.seed}"
            )
            result = train(name, staging, log, encoder, steps)
        commit(staging, output, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


__all__ = ["RECIPES", "Recipe", "TrainResult", "train", "train_command"]
