"""Start-up time of the listing commands: `tpc --help`, `tpc methods`, `tpc zoo`, as a user runs them.

Each command runs as a whole new process (interpreter start, imports, rendering, exit) `--runs` times after one
untimed warm-up run (file cache); the wall time of each run is taken around the process from spawn to reap, and
its peak resident memory from the kernel's rusage of that child (`os.wait4`). Reported: median, min and max wall
time and the largest peak RSS over the runs; `python -c pass` is timed the same way as the interpreter's own floor.
The budget (issue 13) is a median of at most 0.5 s for each command.

By default the installed `tpc` console script next to this interpreter is run. `--source DIR` runs the CLI of
another checkout instead (`DIR` first on PYTHONPATH, through `python -c "from tpc.cli import main; ..."`), e.g.
a `git archive` of an older commit to measure "before".

Writes results/cli_startup.json (with the machine, as every benchmark here) unless `--no-write`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
COMMANDS = (["--help"], ["methods"], ["zoo"])
BUDGET_S = 0.5
LAUNCHER = "import sys; from tpc.cli import main; sys.exit(main())"


def run_once(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one process running `argv` to completion; its exit code must be 0."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {process.returncode}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def measure(argv: list[str], runs: int, env: dict[str, str], cwd: Path | None = None) -> dict[str, float]:
    run_once(argv, env, cwd)  # warm-up: file cache, .pyc files
    samples = [run_once(argv, env, cwd) for _ in range(runs)]
    walls = [wall for wall, _ in samples]
    return {
        "median_s": round(statistics.median(walls), 4),
        "min_s": round(min(walls), 4),
        "max_s": round(max(walls), 4),
        "peak_rss_mib": round(max(rss for _, rss in samples), 1),
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command (median reported)")
    parser.add_argument("--source", type=Path, default=None, help="run the CLI of this source tree instead")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results/cli_startup.json")
    args = parser.parse_args()

    env, cwd = {**os.environ, "COLUMNS": "120"}, None
    if args.source is not None:  # run from inside it: `python -c` puts the working directory first on sys.path
        cwd = args.source.resolve()
        env["PYTHONPATH"] = str(args.source.resolve())
        prefix, launcher = [sys.executable, "-c", LAUNCHER], f"python -c '{LAUNCHER}' (PYTHONPATH={args.source})"
    else:
        script = Path(sys.executable).parent / "tpc"
        prefix, launcher = [str(script)], str(script)

    results = {"python -c pass": measure([sys.executable, "-c", "pass"], args.runs, env)}
    for command in COMMANDS:
        results["tpc " + " ".join(command)] = measure(prefix + command, args.runs, env, cwd)

    print(f"{'command':<16} {'median s':>9} {'min s':>7} {'max s':>7} {'peak RSS MiB':>13}")
    for name, row in results.items():
        print(
            f"{name:<16} {row['median_s']:>9.3f} {row['min_s']:>7.3f} {row['max_s']:>7.3f} {row['peak_rss_mib']:>13.1f}"
        )
    within = all(row["median_s"] <= BUDGET_S for name, row in results.items() if name.startswith("tpc"))
    print(f"budget {BUDGET_S} s median per command: {'met' if within else 'NOT met'}")

    if not args.no_write:
        from machine import machine  # imports torch and transformers: after the timed runs, not during them

        RESULTS.mkdir(exist_ok=True)
        report = {
            "machine": machine(load_average=list(os.getloadavg())),
            "launcher": launcher,
            "budget_median_s": BUDGET_S,
            "within_budget": within,
            "commands": results,
        }
        (RESULTS / "cli_startup.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS / 'cli_startup.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
