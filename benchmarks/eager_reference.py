"""Benchmark: tpc's exported, pruned VLM against what users run today, the reference approach in eager PyTorch.

Why this exists: the other VLM benchmarks compare tpc's exports with each other (pruned vs unpruned), which says
what pruning buys inside tpc, not what tpc buys over the way pruning is run today. Today a user of HiPrune runs
the authors' code: transformers' LLaVA in eager PyTorch, the vision tower called with `output_attentions=True`
(every layer's (B, H, N, N) attention map materialised), the selection in Python, every patch projected and the
kept ones masked out, the shrunk prompt (text + K image tokens, positions renumbered 0..L'-1) handed to the
language model's `generate`. This script runs exactly that (`EagerReference`) beside tpc's ONNX export of the
same model, method and budget, on the export's own sample image and prompt (`samples/generation.npz`), checks
that both keep the same patches and produce the same first token, and times the time to first token (TTFT) of
both interleaved in one process (A B, B A, ...): medians, the per-round ratios' quartiles, eager / export.

What the reference does, and so `EagerReference` (Danielement321/HiPrune @6e83a12, LLaVA path:
`CLIPVisionTower.forward`, `LlavaMetaForCausalLM.encode_images`, `prepare_inputs_labels_for_multimodal`):

  tower       `vision_tower(pixels, output_attentions=True, output_hidden_states=True)`: all 24 layers run (the
              features are layer 23's output, the last layer runs anyway), every attention map kept;
  selection   scores = attention received per patch (mean over heads, then over all query rows, CLS column
              dropped) of `attentions[object_layer - 1]` (anchors) and `attentions[vision_feature_layer]`
              (registers); anchors + raster neighbours, registers fill the rest (tpc's pure functions
              `tpc.methods.hiprune.scores` / `select`, equal to the authors' code on the golden vectors);
  projector   on all 576 patches, then `features[index_mask]` (the reference projects first, masks after);
  prompt      text embeddings before the image, the K kept image embeddings, the text after: the prompt shrinks
              from 576 image tokens to K; `position_ids=None`, i.e. positions 0..L'-1 over the shrunk prompt.
              tpc's export of a vision-side method does the same (its prefill sees text + K contiguous positions,
              tpc/kinds/vlm.py), so the first tokens must agree;
  LLM         `generate(inputs_embeds=..., max_new_tokens=1)` (greedy), or one forward (`llm="forward"`: the
              prefill with a KV cache and the last position's logits, what `generate` runs for its first token).

Attention kernels: the reference pins transformers 4.37.2, where CLIP has only the eager kernel and Llama
defaults to SDPA; `text_attention="sdpa"` (the default here) reproduces that, `text_attention="eager"` runs the
whole model with `attn_implementation="eager"`. The reference runs fp16 on CUDA; here everything is float32 on
CPU, the dtype of tpc's export. Threads: by default torch uses every core the process may run on
(`torch.set_num_threads`) and ONNX Runtime its default (one intra-op thread per physical core); `--threads N`
gives both N intra-op threads. On a machine other processes keep busy, use `--threads 1`: with its default wait
policy torch's OpenMP pool then stalls at every parallel op until its second thread is scheduled (measured on a
2-core worker at load ~3: the eager tower 4.2 s with 2 threads, 0.15 s with 1; `OMP_WAIT_POLICY=active` avoids
the stall, but its spinning threads then slow the export's turns), which measures the neighbours, not the
approach; ONNX Runtime's pool suffered far less there (2x, not 25x). Each side's phases are
recorded too: the export's vision / prefill graphs, the reference's tower / select + projector + embeddings / LLM.

Run: `.venv/bin/python benchmarks/eager_reference.py` (exports `zoo:llava-bench` HiPrune keep 64 to
/tmp/eagerref/llava-bench-hiprune-64 first unless that directory exists: a few minutes on 2 cores), prints the
comparison as JSON; `--rounds`, `--warmup`, `--threads`, `--export`, `--llm`, `--text-attention`, `--output FILE`.
Timing etiquette as the other benchmarks: waits while /tmp/tpc-bench/BUSY exists, holds /tmp/tpc-bench/TIMING
while timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from machine import machine
from rich.console import Console
from shared import timing_flag, wait_while_busy
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging as transformers_logging

from tpc.contract.manifest import GENERATION_FILE, SAMPLES_DIR, Manifest
from tpc.contract.names import INPUT_IDS, KEPT_INDICES, LOGITS, PIXEL_VALUES
from tpc.methods import hiprune
from tpc.models_zoo import resolve
from tpc.runtimes import VLM, OnnxRuntime
from tpc.runtimes.base import load_export
from tpc.runtimes.generation import prefill_ids

DEFAULT_MODEL, DEFAULT_METHOD, DEFAULT_KEEP = "zoo:llava-bench", "hiprune", 64
DEFAULT_EXPORT = Path("/tmp/eagerref/llava-bench-hiprune-64")
METHODS = ("hiprune", "none")
LLM_CALLS = ("generate", "forward")
# torch's OpenMP pool reads these; with the default wait policy a loaded machine can stall every parallel op
THREAD_ENVIRONMENT = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class EagerReference:
    """The reference approach for a LLaVA-1.5-style model (a directory, or `zoo:NAME`), in eager PyTorch.

    `method`: "hiprune" (keep `keep` patches) or "none" (transformers' own LLaVA forward, every image token).
    `params`: HiPrune's `object_layer` and `deep_layer` (1-based tower layers) and `alpha`; defaults: the
    reference's (object layer 9 of 24 scaled to the depth, registers scored on `attentions[vision_feature_layer]`,
    alpha 0.1). `llm`: "generate" (`generate(max_new_tokens=1)`) or "forward" (one prefill forward).
    `text_attention`: the language model's attention kernel, "sdpa" (the reference's environment) or "eager".
    """

    def __init__(
        self,
        model_dir: str | Path,
        method: str = DEFAULT_METHOD,
        keep: int | None = DEFAULT_KEEP,
        params: dict[str, Any] | None = None,
        llm: str = "generate",
        text_attention: str = "sdpa",
        threads: int | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method {method!r}: the eager reference runs {', '.join(METHODS)}")
        if llm not in LLM_CALLS:
            raise ValueError(f"llm {llm!r}: one of {', '.join(LLM_CALLS)}")
        self.threads = threads or cores()
        torch.set_num_threads(self.threads)
        transformers_logging.disable_progress_bar()
        self.model_dir = resolve(str(model_dir)).path if str(model_dir).startswith("zoo:") else Path(model_dir)
        self.method, self.llm, self.text_attention = method, llm, text_attention
        self.model = LlavaForConditionalGeneration.from_pretrained(
            self.model_dir,
            attn_implementation={"text_config": text_attention, "vision_config": "eager", "": "eager"},
        ).eval()
        config = self.model.config
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise ValueError("the reference supports one feature layer with the 'default' (patch) strategy")
        vision = config.vision_config
        self.depth = vision.num_hidden_layers
        self.grid = vision.image_size // vision.patch_size
        self.num_patches = self.grid * self.grid
        self.image_token_id = config.image_token_id
        self.eos_token_id = config.text_config.eos_token_id
        self.feature_layer = config.vision_feature_layer
        self.keep = self.num_patches if method == "none" else int(keep or DEFAULT_KEEP)
        given = dict(params or {})
        object_layer = int(given.get("object_layer", hiprune.default_object_layer(self.depth)))
        # the reference's attentions[vision_feature_layer]; a 1-based deep_layer L is attentions[L - 1]
        deep_index = int(given["deep_layer"]) - 1 if "deep_layer" in given else self.feature_layer
        self.object_index, self.deep_index = object_layer - 1, deep_index
        self.alpha = float(given.get("alpha", hiprune.DEFAULT_ALPHA))
        if method == "hiprune":
            hiprune.check_budget(self.keep, self.alpha)
        self.phases_ms: dict[str, float] = {}  # the last call's phases

    @classmethod
    def for_export(cls, export_dir: str | Path, **options: Any) -> EagerReference:
        """The reference for an export's model, method, budget and method parameters (its tpc.json)."""
        manifest = Manifest.read(Path(export_dir))
        keep = None if manifest.method == "none" else manifest.keep
        names = ("object_layer", "deep_layer", "alpha")
        params: dict[str, Any] = {k: v for k, v in manifest.params.items() if k in names}
        return cls(manifest.model["path"], manifest.method, keep, params, **options)

    def describe(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "method": self.method,
            "keep": self.keep,
            "object_attention_index": self.object_index,
            "deep_attention_index": self.deep_index,
            "alpha": self.alpha,
            "llm": self.llm,
            "attention": {"vision": "eager (output_attentions=True)", "text": self.text_attention},
            "dtype": "float32",
            "torch_threads": torch.get_num_threads(),
        }

    def _image_run(self, ids: torch.Tensor) -> int:
        """Where the prompt's one run of image tokens starts (the processor's expanded layout)."""
        where = (ids[0] == self.image_token_id).nonzero().flatten()
        count = self.num_patches
        if where.numel() != count or int(where[-1] - where[0]) != count - 1 or ids.shape[0] != 1:
            raise ValueError(f"the reference takes one prompt with one run of {count} image tokens")
        return int(where[0])

    def _select(self, attentions: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(1, K) kept patch indices, ascending: HiPrune's rule on the materialised maps."""
        score_object = hiprune.scores(attentions[self.object_index])
        score_deep = hiprune.scores(attentions[self.deep_index])
        return hiprune.select(score_object, score_deep, self.keep, self.grid, self.alpha)

    def prompt_embeds(self, pixel_values: np.ndarray, input_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The shrunk prompt's input embeddings (1, L', D) and the kept patch indices (1, K)."""
        pixels, ids = torch.as_tensor(pixel_values, dtype=torch.float32), torch.as_tensor(input_ids)
        start, clock = self._image_run(ids), time.perf_counter()
        model = self.model.model
        if self.method == "none":  # transformers' own path: the tower without attention maps
            tower = model.vision_tower(pixels, output_hidden_states=True)
            kept = torch.arange(self.num_patches)[None]
        else:
            tower = model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        features = tower.hidden_states[self.feature_layer][:, 1:]
        tower_done = time.perf_counter()
        if self.method != "none":
            kept = self._select(tower.attentions)
        projected = model.multi_modal_projector(features)  # every patch, as the reference
        image = projected[:, kept[0]]  # = projected[index_mask]: the mask keeps raster order
        embed = model.get_input_embeddings()
        text_before, text_after = embed(ids[:, :start]), embed(ids[:, start + self.num_patches :])
        embeds = torch.cat([text_before, image, text_after], dim=1)
        done = time.perf_counter()
        self.phases_ms = {"tower": (tower_done - clock) * 1e3, "select_project_embed": (done - tower_done) * 1e3}
        return embeds, kept

    @torch.inference_mode()
    def first_token(self, pixel_values: np.ndarray, input_ids: np.ndarray) -> tuple[int, np.ndarray]:
        """The first greedy token after the prompt and the kept patch indices (K,), ascending."""
        embeds, kept = self.prompt_embeds(pixel_values, input_ids)
        start = time.perf_counter()
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        if self.llm == "generate":
            out = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=self.eos_token_id,
            )
            token = int(out[0, -1])
        else:
            logits = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1).logits
            token = int(logits[0, -1].argmax())
        self.phases_ms["llm"] = (time.perf_counter() - start) * 1e3
        return token, kept[0].numpy()

    @torch.inference_mode()
    def last_logits(self, pixel_values: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
        """(V,) the logits of the shrunk prompt's last position (one forward), for the parity check."""
        embeds, _ = self.prompt_embeds(pixel_values, input_ids)
        return self.model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1].float().numpy()


def quartiles(values: list[float]) -> list[float]:
    """[q1, median, q3] (statistics' exclusive method)."""
    if len(values) < 2:
        return [values[0]] * 3 if values else []
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return [q1, q2, q3]


def summary(times_ms: list[float]) -> dict[str, Any]:
    q1, median, q3 = quartiles(times_ms)
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "rounds_ms": times_ms}


def export_kept(vlm: VLM, pixel_values: np.ndarray) -> np.ndarray:
    """The export's kept patch indices (K,): its vision graph in ONNX Runtime."""
    return np.asarray(vlm.components["vision"]({PIXEL_VALUES: pixel_values})[KEPT_INDICES])[0]


def export_last_logits(vlm: VLM, pixel_values: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
    """(V,) the export's prefill logits (its last position), as `generate` computes them."""
    ids = prefill_ids(vlm.generation, input_ids)
    out = vlm.components["prefill"]({INPUT_IDS: ids, **vlm.encode_images(pixel_values)})
    return np.asarray(out[LOGITS]).reshape(-1)


Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class TimedRuns(dict[str, Run]):
    """The export's components (name -> run), each call's milliseconds kept in `last_ms` (the phases of a TTFT)."""

    def __init__(self, runs: dict[str, Run]) -> None:
        super().__init__({name: self._timed(name, run) for name, run in runs.items()})
        self.last_ms: dict[str, float] = {}

    def _timed(self, name: str, run: Run) -> Run:
        def call(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.perf_counter()
            out = run(inputs)
            self.last_ms[name] = (time.perf_counter() - start) * 1e3
            return out

        return call


def load_vlm(export_dir: Path, threads: int | None = None) -> tuple[VLM, TimedRuns]:
    """The export in its runtime, as `VLM.load` opens it (ONNX Runtime's default threads), or with `threads`
    intra-op threads per ONNX Runtime session (the same CPU sessions, one option more); and its timed runs."""
    if threads is None:
        manifest, runs = load_export(export_dir, "generation")
    else:
        manifest = Manifest.read(export_dir)
        if manifest.target != "onnx":
            raise ValueError(f"{export_dir} is a {manifest.target} export; --threads sets ONNX Runtime's threads")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        runs = {}
        for spec in manifest.components:
            path = str(export_dir / spec.artifact)
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            runs[spec.name] = OnnxRuntime(session, {}).run
    timed = TimedRuns(runs)
    return VLM(timed, manifest), timed


def compare(
    export_dir: Path,
    rounds: int,
    warmup: int,
    llm: str = "generate",
    text_attention: str = "sdpa",
    threads: int | None = None,
) -> dict[str, Any]:
    """Load the export (ONNX Runtime, `VLM.load`) and the eager reference of the same model, method and budget;
    check the kept set and the first token on the export's generation sample; time both TTFTs interleaved (A B,
    B A alternating), `warmup` untimed rounds first. TTFT: numpy pixels + prompt in, first token out —
    `VLM.generate(max_new_tokens=1)` for the export, `EagerReference.first_token` for the reference.
    `threads`: torch's and ONNX Runtime's intra-op threads alike (default: torch every core, ONNX Runtime its
    default)."""
    export_dir = Path(export_dir)
    manifest = Manifest.read(export_dir)
    with np.load(export_dir / SAMPLES_DIR / GENERATION_FILE) as sample:
        pixels, ids, tokens = sample[PIXEL_VALUES], sample[INPUT_IDS], sample["tokens"]
    vlm, export_runs = load_vlm(export_dir, threads)
    reference = EagerReference.for_export(export_dir, llm=llm, text_attention=text_attention, threads=threads)

    eager_token, eager_kept = reference.first_token(pixels, ids)
    export_token = int(vlm.generate(pixels, ids, max_new_tokens=1, stop_at_eos=False)[0, 0])
    checks: dict[str, Any] = {"eager_kept_indices": eager_kept.tolist()}
    if manifest.method != "none":
        kept = export_kept(vlm, pixels)
        checks["kept_equal"] = bool(np.array_equal(kept, eager_kept))
        shipped_dir = export_dir / SAMPLES_DIR / "vision"
        if (shipped_dir / "expected.npz").exists():  # the kept set tpc's eager components recorded at export time
            with np.load(shipped_dir / "expected.npz") as shipped, np.load(shipped_dir / "inputs.npz") as given:
                recorded, shipped_pixels = shipped[KEPT_INDICES][0], given[PIXEL_VALUES]
            if not np.array_equal(shipped_pixels, pixels):
                eager_kept_shipped = reference.first_token(shipped_pixels, ids)[1]
            else:
                eager_kept_shipped = eager_kept
            checks["kept_equal_to_shipped_sample"] = bool(np.array_equal(eager_kept_shipped, recorded))
        if not checks["kept_equal"]:
            checks["kept_only_eager"] = sorted(set(eager_kept.tolist()) - set(kept.tolist()))
            checks["kept_only_export"] = sorted(set(kept.tolist()) - set(eager_kept.tolist()))
    eager_logits, ort_logits = reference.last_logits(pixels, ids), export_last_logits(vlm, pixels, ids)
    checks["first_token"] = {
        "eager": eager_token,
        "export": export_token,
        "export_sample_tokens_0": int(tokens[0, 0]),
        "equal": eager_token == export_token,
    }
    checks["last_logits_max_abs_diff"] = float(np.abs(eager_logits - ort_logits).max())

    def run_export() -> float:
        export_runs.last_ms.clear()
        start = time.perf_counter()
        vlm.generate(pixels, ids, max_new_tokens=1, stop_at_eos=False)
        return (time.perf_counter() - start) * 1e3

    def run_eager() -> float:
        start = time.perf_counter()
        reference.first_token(pixels, ids)
        return (time.perf_counter() - start) * 1e3

    times: dict[str, list[float]] = {"export": [], "eager": []}
    phases: dict[str, dict[str, list[float]]] = {"export": {}, "eager": {}}
    load_start = os.getloadavg()[0]
    for index in range(warmup + rounds):
        order = [("export", run_export), ("eager", run_eager)]
        for name, run in order if index % 2 == 0 else order[::-1]:
            elapsed = run()
            if index >= warmup:
                times[name].append(elapsed)
                parts = reference.phases_ms if name == "eager" else export_runs.last_ms
                for phase, ms in {**parts, "other": elapsed - sum(parts.values())}.items():
                    phases[name].setdefault(phase, []).append(ms)
    ratios = [e / x for e, x in zip(times["eager"], times["export"], strict=True)]
    export_ms, eager_ms = statistics.median(times["export"]), statistics.median(times["eager"])
    return {
        "what": (
            "time to first token (numpy image + prompt in, first greedy token out), tpc's ONNX export "
            "(VLM.generate, max_new_tokens=1) vs the reference approach in eager PyTorch on the same image, prompt "
            "and kept set; interleaved A B / B A in one process; medians"
        ),
        "export": str(export_dir),
        "model": manifest.model["ref"],
        "method": manifest.method,
        "keep": manifest.keep,
        "params": manifest.params,
        "rounds": rounds,
        "warmup": warmup,
        "export_ttft": summary(times["export"]),
        "eager_ttft": summary(times["eager"]),
        "phases_median_ms": {
            side: {phase: statistics.median(ms) for phase, ms in parts.items()} for side, parts in phases.items()
        },
        "ratio_eager_over_export": eager_ms / export_ms,
        "ratio_per_round_quartiles": quartiles(ratios),
        "checks": {k: v for k, v in checks.items() if k != "eager_kept_indices"},
        "kept_indices": checks["eager_kept_indices"],
        "reference": reference.describe(),
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "onnxruntime_intra_op": threads or "default (one per physical core)",
            "cores_available": cores(),
            "environment": {name: os.environ.get(name) for name in THREAD_ENVIRONMENT},
        },
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "machine": machine(onnxruntime=onnxruntime.__version__),
    }


def ensure_export(directory: Path, model: str, method: str, keep: int, console: Console) -> None:
    """Export `model` with `method` at `keep` to ONNX (verified) unless `directory` exists."""
    if directory.exists():
        console.print(f"reusing {directory}")
        return
    command = [sys.executable, "-m", "tpc", "export", model, "--method", method, "--target", "onnx"]
    command += [*([] if method == "none" else ["--keep", str(keep)]), "--output", str(directory)]
    console.print(" ".join(command))
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    parser.add_argument("--export", type=Path, default=None, help=f"export directory (default {DEFAULT_EXPORT})")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--llm", choices=LLM_CALLS, default="generate")
    parser.add_argument("--text-attention", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads of both (default: torch all cores, ORT its own)"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    console = Console(stderr=True, soft_wrap=True)
    default = (args.model, args.method, args.keep) == (DEFAULT_MODEL, DEFAULT_METHOD, DEFAULT_KEEP)
    name = f"{args.model.removeprefix('zoo:')}-{args.method}" + ("" if args.method == "none" else f"-{args.keep}")
    export_dir = args.export or (DEFAULT_EXPORT if default else DEFAULT_EXPORT.parent / name)
    ensure_export(export_dir, args.model, args.method, args.keep, console)
    waited = wait_while_busy(console)
    with timing_flag():
        report = compare(export_dir, args.rounds, args.warmup, args.llm, args.text_attention, args.threads)
    report["waited_for_busy_s"] = round(waited, 1)
    text = json.dumps(report, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
