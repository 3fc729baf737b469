"""Eager predictions cached per (model, dataset, run), so that a sweep over keeps, targets or methods computes the
unpruned model and the baselines once.

A key is a hash of the model directory's content (config.json and its weight files: their bytes when small, their
size and modification time when large), the dataset's fingerprint (its images, labels, classes, split), the
preprocessing, and the run (method, keep, parameters, dtype). Entries are `.npz` files under
`$TPC_CACHE_DIR/eval/`, written atomically; `tpc eval --no-cache` ignores and rewrites them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tpc.kinds.classify import Predictions
from tpc.models_zoo.zoo import cache_root

HASHED_BYTES = 256 * 2**20  # weight files up to this size are hashed by content; larger ones by size and mtime


def model_fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in (".safetensors", ".json") and path.is_file():
            stat = path.stat()
            digest.update(path.name.encode())
            if stat.st_size <= HASHED_BYTES:
                digest.update(path.read_bytes())
            else:
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def run_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _path(key: str) -> Path:
    return cache_root() / "eval" / f"{key}.npz"


def load(key: str, images: int) -> Predictions | None:
    """The cached predictions, or None when absent, unreadable or of another length."""
    try:
        with np.load(_path(key), allow_pickle=False) as data:
            found = Predictions(data["labels"], data["margins"])
    except (OSError, KeyError, ValueError):
        return None
    return found if len(found) == images else None


def store(key: str, predictions: Predictions) -> None:
    """Write atomically (a reader never sees half a file); a cache that cannot be written is skipped."""
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".", suffix=".npz", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            np.savez(file, labels=predictions.labels, margins=predictions.margins)
        os.replace(temporary, path)
    except OSError:
        return
