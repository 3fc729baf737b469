"""Drive an exported policy in a fixed-rate control loop and count the deadlines it misses.

Why this exists: a robot controller does not call a policy as fast as it can; it asks for an action every
1/rate seconds and needs it before the next tick. Whether a (pruned) export is fast enough is therefore a
question of deadlines, and of the slow steps: a VLA-Pruner policy's first `window` steps of every episode run
the warm-up graph, which keeps every image token and costs about what the unpruned policy does. This script is
the smallest loop that shows it, meant to be copied and pointed at a real camera and tokenizer:

    python examples/fixed_rate_policy.py DIR --hz 2 --steps 20

DIR is a `tpc export` of a policy (e.g. `tpc export zoo:tiny-openvla --method vla-pruner --keep 64 --target onnx
--output DIR`). The episode is synthetic and seeded: a low-frequency scene drifting a few pixels per frame
((size, size, 3) uint8 RGB at the export's resolution) and a prompt of the export's static length (BOS = 1
first, then seeded ids below the action bins). Replace `frames()` with your camera and `prompt()` with
`tokenizer(f"In: What action should the robot take to {instruction}?\\nOut:")` ids (`tpc.json` `policy.prompt`
says how many the export takes).

Each tick starts a step and gives it one period; a step that ends after its deadline is a miss. After a miss
the next step starts at once with a full period of its own (the schedule re-anchors, as ROS's `Rate` does), so
one slow step counts once instead of making every later step late.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tpc.contract.protocols import PolicyProtocol
from tpc.runtimes.policy import Policy


def frames(size: int, seed: int) -> Iterator[np.ndarray]:
    """An endless synthetic camera: a seeded blocky scene that drifts 2 px right and 3 px down per frame."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(size // 16 + 32, size // 16 + 32, 3), dtype=np.uint8)
    scene = np.kron(coarse, np.ones((16, 16, 1), dtype=np.uint8))  # built now, not inside the timed loop

    def camera() -> Iterator[np.ndarray]:
        t = 0
        while True:
            y, x = (3 * t) % (scene.shape[0] - size), (2 * t) % (scene.shape[1] - size)
            noise = rng.integers(0, 24, size=(size, size, 3), dtype=np.uint8)
            yield (scene[y : y + size, x : x + size] // 2 + noise).astype(np.uint8)
            t += 1

    return camera()


def prompt(policy: PolicyProtocol, seed: int) -> np.ndarray:
    """Seeded prompt ids of the export's static length: BOS first, then ids below the action tokens."""
    length = policy.prompt.text_tokens
    highest = max(4, policy.action_vocab_size - policy.n_action_bins)
    ids = np.random.default_rng(seed).integers(3, highest, size=length, dtype=np.int64)
    ids[0] = 1
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a policy export (tpc export ... --target onnx --output DIR)")
    parser.add_argument("--hz", type=float, default=2.0, help="control rate: one action every 1/hz seconds")
    parser.add_argument("--steps", type=int, default=20, help="control steps in the episode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.hz <= 0 or args.steps < 1:
        parser.error("--hz must be positive and --steps at least 1")

    policy = Policy.load(args.directory)
    meta = policy.policy
    camera = frames(meta.image.size, args.seed)
    ids = prompt(meta, args.seed)
    period = 1.0 / args.hz
    print(
        f"{args.directory}: {meta.prompt.image_tokens} image tokens, keeps {meta.kept_image_tokens}, "
        f"graphs {', '.join(policy.components)}; {args.steps} steps at {args.hz:g} Hz ({period * 1e3:.0f} ms budget)"
    )

    policy.step(next(frames(meta.image.size, args.seed + 1)), ids)  # untimed: the runtime's first call is slow
    policy.reset()  # episode start: a stateful policy runs its warm-up graph for the first `window` steps
    latencies, misses = [], 0
    start = tick = time.perf_counter()
    for step in range(args.steps):
        deadline = tick + period
        frame = next(camera)  # on a robot: grab the newest camera frame here
        began = time.perf_counter()
        result = policy.step_result(frame, ids)
        ended = time.perf_counter()
        latency = (ended - began) * 1e3
        latencies.append(latency)
        missed = ended > deadline
        misses += missed
        action = np.array2string(result.action, precision=3, suppress_small=True, max_line_width=200)
        note = f"  MISSED by {(ended - deadline) * 1e3:.0f} ms" if missed else ""
        print(
            f"step {step:3d}  {latency:7.1f} ms  {result.graph:<7} kept {len(result.kept_indices):3d}  {action}{note}"
        )
        # on a robot: send result.action to the controller here
        if missed:
            tick = time.perf_counter()  # re-anchor: the next step starts now, with a full period
        else:
            time.sleep(max(0.0, deadline - time.perf_counter()))
            tick = deadline
    elapsed = time.perf_counter() - start

    ms = np.asarray(latencies)
    print(
        f"summary: {misses}/{args.steps} deadlines missed at {args.hz:g} Hz; latency p50 {np.percentile(ms, 50):.1f} "
        f"ms, p99 {np.percentile(ms, 99):.1f} ms, max {ms.max():.1f} ms; achieved {args.steps / elapsed:.2f} Hz "
        f"(the policy alone could sustain {1e3 / np.percentile(ms, 50):.2f} Hz at p50)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
