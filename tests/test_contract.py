"""The contract every command keeps (README, "The contract"): exit codes, one line, nothing lost.

Each data-loss row hashes the trees it could damage before and after the command: a refused command must leave
them byte for byte as they were. Signals, races and kills run the real console entry (`python -m tpc`) in a
separate process, as a user or a CI job would.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpc.cli import main
from tpc.models_zoo import resolve

EXPORT = ["--method", "uniform", "--keep", "8", "--no-verify"]


def tree_hash(*roots: Path) -> str:
    """Names, kinds and contents of everything under `roots` (symlinks by target, not followed)."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted([root, *root.rglob("*")]) if root.exists() else []:
            digest.update(str(path.relative_to(root.parent)).encode())
            if path.is_symlink():
                digest.update(b"->" + os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def one_line(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's model directory (a copy of tiny-clip's, saved by save_pretrained)."""
    target = tmp_path_factory.mktemp("models") / "my-clip"
    shutil.copytree(resolve("zoo:tiny-clip").path, target)
    return target


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory, inside a fake home, with a file of the user's in each."""
    home = tmp_path / "home"
    work = home / "code" / "project"
    work.mkdir(parents=True)
    (home / "notes.txt").write_text("home file")
    (work / "main.py").write_text("print('mine')")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        (".", "is the working directory"),
        ("..", "contains the working directory"),
        ("~", "is the home directory"),
        ("/", "is the filesystem root"),
        ("MODEL", "is the model directory"),
        ("MODEL/..", "contains the model directory"),
        ("MODEL/export", "is inside the model directory"),
        ("CACHE/zoo", "is inside tpc's model cache"),
    ],
)
def test_force_never_replaces_protected_directories(
    workdir: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], output: str, fragment: str
) -> None:
    cache = Path(os.environ["TPC_CACHE_DIR"])
    output = output.replace("MODEL", str(model_dir)).replace("CACHE", str(cache))
    model = "zoo:tiny-clip" if output.startswith(str(cache)) else str(model_dir)
    watched = [workdir.parents[1], model_dir.parent]
    before = tree_hash(*watched)
    code, err = run(capsys, ["export", model, "--output", output, "--force", *EXPORT])
    assert code == 2 and fragment in err and one_line(err), err
    assert tree_hash(*watched) == before


def test_empty_output_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hash(workdir.parents[1])
    code, err = run(capsys, ["export", "zoo:tiny-clip", "--output", "", "--force", *EXPORT])
    assert code == 2 and one_line(err) and "working directory" in err
    assert tree_hash(workdir.parents[1]) == before


def test_existing_output_and_file_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    before = tree_hash(tmp_path)
    code, err = run(capsys, ["export", "zoo:tiny-clip", "--output", str(tmp_path / "out"), *EXPORT])
    assert code == 2 and "already exists; pass --force" in err and one_line(err)
    code, err = run(capsys, ["export", "zoo:tiny-clip", "--output", str(tmp_path / "file"), "--force", *EXPORT])
    assert code == 2 and "is a file, not a directory" in err and one_line(err)
    code, err = run(capsys, ["export", "zoo:tiny-clip", "--output", str(tmp_path / "file" / "out"), *EXPORT])
    assert code == 2 and f"'{tmp_path / 'file'}' is a file, not a directory" in err and one_line(err)
    assert tree_hash(tmp_path) == before


def test_force_replaces_a_symlink_not_its_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.txt").write_text("keep")
    (tmp_path / "link").symlink_to(target)
    assert main(["export", "zoo:tiny-clip", "--output", str(tmp_path / "link"), "--force", *EXPORT]) == 0
    assert (target / "data.txt").read_text() == "keep" and sorted(p.name for p in target.iterdir()) == ["data.txt"]
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / "tpc.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "precious"]


def _tpc(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tpc", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_staging(directory: Path, name: str, process: subprocess.Popen[str]) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        staging = [p for p in directory.iterdir() if p.name.startswith(f".{name}.tpc-stage-")]
        if staging:
            return staging[0]
        time.sleep(0.05)
    raise AssertionError(f"no staging directory appeared: {process.communicate()}")


def test_two_concurrent_exports_exactly_one_wins(tmp_path: Path) -> None:
    args = ["export", "zoo:tiny-clip", "--output", "out", *EXPORT]
    first, second = _tpc(*args, cwd=tmp_path), _tpc(*args, cwd=tmp_path)
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "was created by someone else while this export ran" in loser.splitlines()[-1]
    assert loser.count("error:") == 1 and "Traceback" not in loser
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "samples", "tpc.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    winner = next(err for code, err in results if code == 0)
    assert_no_library_noise(winner)


NOISE = ("Warning", "warn(", "torchvision", "cpuinfo", "Loading weights", "%|", "W1", "I1", "Traceback")


def assert_no_library_noise(stderr: str) -> None:
    """What the real console entry prints is tpc's own: library warnings, logs and bars went to tpc.log."""
    noisy = [line for line in stderr.splitlines() if any(mark in line for mark in NOISE)]
    assert not noisy, noisy


def test_directory_created_during_an_export_is_kept(tmp_path: Path) -> None:
    process = _tpc("export", "zoo:tiny-clip", "--output", "out", *EXPORT, cwd=tmp_path)
    _wait_for_staging(tmp_path, "out", process)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "theirs.txt").write_text("created meanwhile")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2 and "was created by someone else" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sigterm_cleans_up_and_exits_130(tmp_path: Path) -> None:
    process = _tpc("export", "zoo:tiny-clip", "--output", "out", *EXPORT, cwd=tmp_path)
    _wait_for_staging(tmp_path, "out", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "aborted" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_startup_exits_130(tmp_path: Path) -> None:
    process = _tpc("export", "zoo:tiny-clip", "--output", "out", *EXPORT, cwd=tmp_path)
    time.sleep(1.0)  # tpc is importing its modules (before ~0.05 s the interpreter itself is starting)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip() == "aborted"


def test_sigkill_leftovers_are_removed_by_the_next_export(tmp_path: Path) -> None:
    process = _tpc("export", "zoo:tiny-clip", "--output", "out", *EXPORT, cwd=tmp_path)
    staging = _wait_for_staging(tmp_path, "out", process)
    process.kill()
    process.wait()
    assert staging.is_dir()
    assert main(["export", "zoo:tiny-clip", "--output", str(tmp_path / "out"), *EXPORT]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_old_output_retired_by_a_killed_force_export_is_put_back(tmp_path: Path, capsys) -> None:
    """A --force export killed between retiring the old output and committing the new one: the next run restores
    the old output before checking whether it exists."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    retired = tmp_path / f".out.tpc-old-{int(dead.stdout)}-abcd"
    retired.mkdir()
    (retired / "tpc.json").write_text("{}")
    code, err = run(capsys, ["export", "zoo:tiny-clip", "--output", str(tmp_path / "out"), *EXPORT])
    assert code == 2 and "already exists" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "tpc.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--batch", "65"], "--batch 65 is outside 1..64"),
        (["--batch", "0"], "--batch 0 is outside 1..64"),
        (["--samples", "0"], "--samples 0 is outside 1..64"),
        (["--samples", "1000"], "--samples 1000 is outside 1..64"),
    ],
)
def test_bounded_export_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], args, fragment) -> None:
    code, err = run(capsys, ["export", "zoo:tiny-clip", "--output", str(tmp_path / "o"), *EXPORT, *args])
    assert code == 2 and fragment in err and one_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-new-tokens", "100000"], "need 100"),
        (["--prompt-len", "5000"], "more than the decoder's"),
    ],
)
def test_prompt_and_cache_fit_the_decoder_positions(tmp_path: Path, capsys, args, fragment) -> None:
    code, err = run(capsys, ["export", "zoo:tiny-llava", "--method", "fastv", "--keep", "8", "--output", "o", *args])
    assert code == 2 and fragment in err and "max_position_embeddings" in err and one_line(err)


def test_memory_estimate_refuses_before_allocating(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TPC_MEMORY_LIMIT", "1M")
    code, err = run(capsys, ["export", "zoo:tiny-clip", "--output", str(tmp_path / "o"), *EXPORT])
    assert code == 2 and "this export needs about" in err and "1.0 MiB is available" in err and one_line(err)
    monkeypatch.setenv("TPC_MEMORY_LIMIT", "lots")
    code, err = run(capsys, ["export", "zoo:tiny-clip", "--output", str(tmp_path / "o"), *EXPORT])
    assert code == 2 and "TPC_MEMORY_LIMIT='lots'" in err


def test_unexpected_failures_are_one_line_exit_2_and_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").symlink_to(bad / "config.json")  # a symlink loop
    code, err = run(capsys, ["export", str(bad), "--output", str(tmp_path / "o"), *EXPORT])
    assert code == 2 and one_line(err), err
    code, err = run(capsys, ["--debug", "export", str(bad), "--output", str(tmp_path / "o"), *EXPORT])
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")


def test_profile_bounds_and_baseline_of_another_model(exported, tmp_path: Path, capsys) -> None:
    clip, siglip = exported("zoo:tiny-clip", "uniform", 8), exported("zoo:tiny-siglip", "uniform", 8)
    code, err = run(capsys, ["profile", str(clip), "--runs", "0"])
    assert code == 2 and "--runs must be 'auto' or in 1..100000" in err
    code, err = run(capsys, ["profile", str(clip), "--baseline", str(siglip), "--runs", "1", "--warmup", "0"])
    assert code == 2 and "has another model" in err and one_line(err)
    batch2 = exported("zoo:tiny-clip", "none", None, batch=2)
    code, err = run(capsys, ["profile", str(clip), "--baseline", str(batch2), "--runs", "1", "--warmup", "0"])
    assert code == 2 and "has another batch" in err


def test_json_report_path_is_checked_before_any_work(exported, tmp_path: Path, capsys) -> None:
    clip = exported("zoo:tiny-clip", "uniform", 8)
    before = tree_hash(clip)
    for command in ("profile", "verify", "inspect"):
        for path, fragment in (
            (tmp_path / "missing" / "r.json", "does not exist"),
            (tmp_path, "is a directory"),
            (clip / "tpc.json", "is inside the export"),
        ):
            code, err = run(capsys, [command, str(clip), "--json", str(path)])
            assert code == 2 and fragment in err and one_line(err), (command, err)
    assert tree_hash(clip) == before


def test_help_shows_real_metavars_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    assert "tpc export [OPTIONS] MODEL" in text and "NAME=VALUE" in text and "--output DIR" in text
    assert "{" not in text and "<list[str]>" not in text and "<str>" not in text
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--debug" in text and "1 the export drifts from eager" in text and "130 interrupted" in text


def test_usage_errors_point_at_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, ["nosuch"])
    assert code == 2 and one_line(err) and "No such command 'nosuch'" in err and "tpc --help" in err
