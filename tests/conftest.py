"""Shared fixtures: tiny real datasets built with filterx's own shard stage.

The ImageFolder fixture holds small crops of real photos plus the inputs a real pool
contains: a corrupt JPEG, a truncated JPEG, a zero-byte file, a text file named .jpg, a
PNG, a CMYK and a grayscale JPEG, unicode and spaces in names, and an empty class folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for tiny problems: on 16-32 px images and small solves,
    OpenMP's per-op synchronisation costs more than a second thread gains, and on a loaded
    2-core machine it slowed them 10-30x (measured). Module scope: a module's fixtures and
    tests must run with the same thread count, or float reductions differ between a reference
    run and the run compared with it (the bit-identical resume tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PHOTOS = ("astronaut", "coffee", "chelsea")
GOOD_PER_CLASS = 8


def _photo_jpegs(root: Path, rng: np.random.Generator) -> None:
    from PIL import Image

    from filterx.io.sampledata import _photo, _photo_crop

    for c, name in enumerate(PHOTOS):
        d = root / f"class {c} é"
        d.mkdir(parents=True)
        photo = _photo(name)
        for i in range(GOOD_PER_CLASS):
            arr = _photo_crop(photo, rng, int(rng.integers(48, 72)))
            Image.fromarray(arr).save(d / f"img_{i:02d}.jpg", quality=90)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """An ImageFolder tree: 3 classes x 8 good photos, plus every kind of bad/odd input.

    Good, readable images: 24 JPEG + 1 PNG + 1 CMYK JPEG + 1 grayscale JPEG = 27.
    Bad: corrupt bytes, truncated JPEG, zero bytes, text named .jpg = 4.
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    _photo_jpegs(root, rng)
    odd = root / "class 0 é"
    base = np.asarray(Image.open(odd / "img_00.jpg"))
    Image.fromarray(base).save(odd / "as png.png")
    Image.fromarray(base).convert("CMYK").save(odd / "cmyk.jpg", quality=90)
    Image.fromarray(base).convert("L").save(root / "class 1 é" / "gray.jpg", quality=90)
    good = (odd / "img_01.jpg").read_bytes()
    (root / "class 1 é" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class 2 é" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)))
    (root / "class 2 é" / "zero.jpg").write_bytes(b"")
    (root / "class 2 é" / "notes.jpg").write_text("this is not an image")
    (root / "empty class").mkdir()
    return root


GOOD_IMAGES = 3 * GOOD_PER_CLASS + 3
BAD_IMAGES = 4


@pytest.fixture(scope="session")
def dataset_dir(image_folder, tmp_path_factory) -> Path:
    """The image_folder sharded into tars of 5 samples (read-only: copy before changing it)."""
    from filterx.stages.shard import ShardConfig, shard

    out = tmp_path_factory.mktemp("ds") / "source"
    shard(ShardConfig(image_folder, out, shard_size=5, workers=1, quiet=True))
    return out


@pytest.fixture()
def dataset_copy(dataset_dir, tmp_path) -> Path:
    """A private copy of dataset_dir that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(dataset_dir, dst)
    return dst


@pytest.fixture(scope="session")
def sample_dirs(tmp_path_factory):
    """Tiny built-in sample data (pool + target) sharded: (source dir, target dir, relevant names)."""
    from filterx.io.sampledata import make_sample_data
    from filterx.stages.shard import ShardConfig, shard

    root = tmp_path_factory.mktemp("sample")
    data = make_sample_data(root / "data", per_class=12, target_per_class=10, photos=3, textures=3,
                            size_range=(40, 48))
    shard(ShardConfig(data.source, root / "source", shard_size=40, workers=1, quiet=True))
    shard(ShardConfig(data.target, root / "target", shard_size=20, workers=1, quiet=True))
    return root / "source", root / "target", data.relevant_classes


@pytest.fixture(scope="session")
def encoder_file(sample_dirs, tmp_path_factory) -> Path:
    """A ResNet-18 trained briefly on the tiny target (32 px): enough for the plumbing."""
    from filterx.train.encoder import EncoderConfig, train_encoder

    out = tmp_path_factory.mktemp("enc") / "encoder.pt"
    train_encoder(EncoderConfig(sample_dirs[1], out, resolution=32, epochs=2, batch_size=16, backend="pil",
                                device="cpu", workers=0, quiet=True))
    return out
