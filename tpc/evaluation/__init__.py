"""`tpc eval`: what a pruning budget costs in accuracy, on real labelled images, eager and exported.

For each budget K: the method's pruned model eager, the same request exported and run in its target's runtime
(its answers must equal eager's on all but 0.1 % of the images, near-ties listed), and two controls at the same
budget, `random` over several seeds (mean and standard deviation) and `uniform`; all against the unpruned model.
The baselines keep K tokens on the vision side whatever the method's stage, so for a decoder method they are the
same number of image tokens reaching the decoder, from its first layer on.

Everything is planned before anything runs (a bad option is one line before a model loads), exports come first,
then one progress bar with an ETA runs every prediction pass in batches of the export's static batch. Eager
predictions are cached per (model, dataset, run) (`tpc.evaluation.cache`), so a sweep computes the unpruned
model and the baselines once.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tpc.datasets import LabelledImages, load_dataset, to_pixels
from tpc.errors import UsageError
from tpc.evaluation import cache
from tpc.evaluation.render import plot, render
from tpc.evaluation.report import (
    MAX_DISAGREEMENT,
    Accuracy,
    DatasetInfo,
    Disagreement,
    EvalReport,
    Exported,
    KeepResult,
    Spread,
)
from tpc.exporter import get_target
from tpc.exporting import export
from tpc.kinds.classify import Batch, Classifier, Predictions, Run, budget, classifier, required_params
from tpc.methods import get_method
from tpc.models_zoo import resolve
from tpc.pipeline import MAX_BATCH, PruneRequest, build, plan
from tpc.progress import Step, silent

BASELINES = ("random", "uniform")
NEAR_TIE = 0.05  # a margin (best minus runner-up score) below this is a near-tie that rounding may flip
EXAMPLE_SEED = 0  # which images an n-shot prompt shows as its examples


@dataclass(frozen=True)
class EvalOptions:
    model: str
    dataset: str
    method: str
    keeps: tuple[int, ...]
    target: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    split: str = "test"
    batch_size: int = 32
    seeds: int = 3  # random baseline seeds
    limit: int | None = None  # the first N images of the split
    resize: bool = False
    dtype: str = "fp32"
    use_cache: bool = True


@dataclass
class _Pass:
    """One prediction pass over the dataset: eager (cached) or an export's."""

    label: str
    request: PruneRequest | None  # None: the unpruned model's own class
    export_dir: Path | None = None
    key: str | None = None
    predictions: Predictions | None = None


def check_options(options: EvalOptions) -> None:
    if options.method == "none":
        raise UsageError("--method none is the unpruned model, which tpc eval always measures; name a pruning method")
    if not options.keeps or any(k < 1 for k in options.keeps) or len(set(options.keeps)) != len(options.keeps):
        raise UsageError(f"--keeps {','.join(map(str, options.keeps))}: give distinct budgets of at least 1 token")
    if not 1 <= options.batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size {options.batch_size} is outside 1..{MAX_BATCH} (the static batch exported)")
    if options.seeds < 2:
        raise UsageError(f"--seeds {options.seeds}: the random baseline needs at least 2 seeds for a spread")
    if options.limit is not None and options.limit < 1:
        raise UsageError(f"--limit {options.limit}: give at least 1 image")
    if options.target is not None:
        get_target(options.target).check_installed()


def _request(options: EvalOptions, method: str, keep: int | None, params: dict[str, str]) -> PruneRequest:
    return PruneRequest(options.model, method, keep, dict(params), options.dtype, options.batch_size)


def evaluate(options: EvalOptions, console: Console | None = None, step: Step = silent) -> EvalReport:
    """Measure the method at each budget against the unpruned model and the baselines; see the module docstring."""
    started = time.perf_counter()
    check_options(options)
    source = resolve(options.model)
    method = get_method(options.method)
    params = {**required_params(source), **options.params}
    own = {p.name for p in method.params}
    shared = {k: v for k, v in params.items() if k not in own}  # the prompt's, the feature layer: every pass's
    unpruned_plan = plan(_request(options, "none", None, shared), source)
    method_plans = {keep: plan(_request(options, options.method, keep, params), source) for keep in options.keeps}
    tokens = budget(method_plans[options.keeps[0]])[0]
    baseline = {keep: budget(method_plans[keep])[1] for keep in options.keeps}
    for keep in options.keeps:  # the baselines' budgets are checked before anything runs too
        for seed in range(options.seeds):
            plan(_request(options, "random", baseline[keep], {**shared, "seed": str(seed)}), source)
        plan(_request(options, "uniform", baseline[keep], shared), source)

    with step(f"load the {options.split} split of {options.dataset}"):
        data = load_dataset(options.dataset, options.split).subset(options.limit)
    with step(f"load {options.model}"):
        reader = classifier(unpruned_plan)
    _check_labels(data, reader, options.dataset)
    prep = reader.preprocessing
    pixels = to_pixels(
        data.images, (prep.size, prep.size), prep.channels, prep.mean, prep.std, options.resize, options.dataset
    )
    examples = _examples(len(data), reader.shots)
    base_key = {
        "model": cache.model_fingerprint(source.path),
        "dataset": data.fingerprint(),
        "preprocessing": [prep.mean, prep.std, options.resize],
        "shots": reader.shots,
        "examples": EXAMPLE_SEED,
    }

    passes = {"unpruned": _Pass("unpruned", None, key=cache.run_key({**base_key, "run": "unpruned"}))}
    for keep in options.keeps:
        runs = {options.method: params, **{f"random-{s}": {**shared, "seed": str(s)} for s in range(options.seeds)}}
        runs["uniform"] = shared
        for label, run_params in runs.items():
            name = label.split("-")[0] if label.startswith("random-") else label
            tokens_kept = keep if label == options.method else baseline[keep]
            request = _request(options, name, tokens_kept, run_params)
            key = cache.run_key({**base_key, "run": [name, tokens_kept, sorted(run_params.items()), options.dtype]})
            passes[f"{label}@{keep}"] = _Pass(f"eager {label} keep {keep}", request, key=key)
    cached = 0
    for entry in passes.values():
        if options.use_cache and entry.key is not None:
            entry.predictions = cache.load(entry.key, len(data))
            cached += entry.predictions is not None

    workdir = Path(tempfile.mkdtemp(prefix="tpc-eval-"))  # not in tpc's cache, where no export may be written
    try:
        if options.target is not None:
            for keep in options.keeps:
                request = _request(options, options.method, keep, params)
                directory = workdir / f"{options.method}-{keep}"
                with step(f"export {options.method} keep {keep} to {options.target} (and verify it)"):
                    export(request, options.target, directory, samples=2)
                label = f"{options.target} {options.method} keep {keep}"
                passes[f"exported@{keep}"] = _Pass(label, request, export_dir=directory)
        _predict_all(passes, reader, pixels, examples, data, options, console)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    for entry in passes.values():
        if entry.key is not None and entry.predictions is not None:
            cache.store(entry.key, entry.predictions)
    return _report(options, data, tokens, baseline, passes, started, cached)


def _check_labels(data: LabelledImages, reader: Classifier, ref: str) -> None:
    classes = len(reader.classes)
    if int(data.labels.max()) >= classes:
        raise UsageError(
            f"'{ref}' has labels up to {int(data.labels.max())}, but the model knows {classes} classes "
            f"({', '.join(reader.classes[:4])}{', ...' if classes > 4 else ''}); labels are the model's class indices"
        )


def _examples(images: int, shots: int) -> np.ndarray | None:
    """(images, shots) example indices for an n-shot prompt: seeded, never the query itself."""
    if not shots:
        return None
    if images < 2:
        raise UsageError("an n-shot prompt needs at least 2 images in the dataset (examples besides the query)")
    rng = np.random.default_rng(EXAMPLE_SEED)
    drawn = rng.integers(1, images, size=(images, shots))
    return np.asarray((np.arange(images)[:, None] + drawn) % images, dtype=np.int64)


def _batches(images: int, size: int) -> Iterator[np.ndarray]:
    """Index batches of exactly `size` (the export's static batch): the last one padded with its last image."""
    for start in range(0, images, size):
        index = np.arange(start, min(start + size, images))
        yield np.concatenate([index, np.full(size - len(index), index[-1])])


def _predict_all(
    passes: dict[str, _Pass],
    reader: Classifier,
    pixels: np.ndarray,
    examples: np.ndarray | None,
    data: LabelledImages,
    options: EvalOptions,
    console: Console | None,
) -> None:
    todo = [entry for entry in passes.values() if entry.predictions is None]
    per_pass = -(-len(data) // options.batch_size)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    display = Progress(*columns, console=console or Console(quiet=True), transient=False)
    with display:
        overall = display.add_task("batches", total=per_pass * len(todo))
        for entry in todo:
            display.update(overall, description=entry.label)
            run = _runner(entry, reader)
            parts = []
            for index in _batches(len(data), options.batch_size):
                batch = Batch(pixels[index])
                if examples is not None:
                    chosen = examples[index]
                    batch = Batch(pixels[index], pixels[chosen], data.labels[chosen])
                found = run(batch)
                real = len(set(index.tolist()))
                parts.append(Predictions(found.labels[:real], found.margins[:real]))
                display.advance(overall)
            entry.predictions = Predictions.concat(parts)


def _runner(entry: _Pass, reader: Classifier) -> Run:
    if entry.request is None:
        return reader.unpruned()
    if entry.export_dir is not None:
        return reader.exported(entry.export_dir)
    return reader.eager(build(entry.request))


def _accuracy(predictions: Predictions, labels: np.ndarray, reference: float | None) -> Accuracy:
    correct = int((predictions.labels == labels).sum())
    accuracy = correct / len(labels)
    retention = None if reference is None else (accuracy / reference if reference else 0.0)
    return Accuracy(accuracy, correct, len(labels), retention)


def compare_exported(target: str, eager: Predictions, found: Predictions, labels: np.ndarray, ref: float) -> Exported:
    """The export's answers against eager's: every image that differs, with both margins (`ref`: the unpruned
    accuracy, for retention); within tolerance when at most MAX_DISAGREEMENT of the images differ."""
    differ = np.flatnonzero(eager.labels != found.labels)
    listed = [
        Disagreement(
            int(i),
            int(labels[i]),
            int(eager.labels[i]),
            int(found.labels[i]),
            float(eager.margins[i]),
            float(found.margins[i]),
            bool(min(eager.margins[i], found.margins[i]) < NEAR_TIE),
        )
        for i in differ
    ]
    agreement = 1 - len(differ) / len(labels)
    return Exported(
        target, _accuracy(found, labels, ref), agreement, listed, len(differ) <= MAX_DISAGREEMENT * len(labels)
    )


def _report(
    options: EvalOptions,
    data: LabelledImages,
    tokens: int,
    baseline: dict[int, int],
    passes: dict[str, _Pass],
    started: float,
    cached: int,
) -> EvalReport:
    labels = data.labels

    def predictions(name: str) -> Predictions:
        found = passes[name].predictions
        assert found is not None, "every pass ran or was read from the cache"
        return found

    unpruned = _accuracy(predictions("unpruned"), labels, None)
    reference = unpruned.accuracy
    keeps = []
    for keep in options.keeps:
        eager = predictions(f"{options.method}@{keep}")
        seeds = list(range(options.seeds))
        accuracies = [_accuracy(predictions(f"random-{s}@{keep}"), labels, reference).accuracy for s in seeds]
        mean = statistics.fmean(accuracies)
        spread = Spread(mean, statistics.stdev(accuracies), seeds, accuracies, mean / reference if reference else 0.0)
        exported = None
        if options.target is not None:
            exported = compare_exported(options.target, eager, predictions(f"exported@{keep}"), labels, reference)
        keeps.append(
            KeepResult(
                keep,
                keep / tokens,
                baseline[keep],
                _accuracy(eager, labels, reference),
                spread,
                _accuracy(predictions(f"uniform@{keep}"), labels, reference),
                exported,
            )
        )
    info = DatasetInfo(data.name, data.split, len(data), list(data.classes), data.fingerprint(), options.resize)
    return EvalReport(
        model=options.model,
        dataset=info,
        method=options.method,
        params=dict(options.params),
        tokens=tokens,
        unpruned=unpruned,
        keeps=keeps,
        target=options.target,
        batch_size=options.batch_size,
        seconds=round(time.perf_counter() - started, 1),
        cached_runs=cached,
        computed_runs=len(passes) - cached,
    )


__all__ = ["EvalOptions", "EvalReport", "compare_exported", "evaluate", "plot", "render"]
