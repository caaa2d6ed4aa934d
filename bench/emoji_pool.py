"""A pool of real images with a known relevant part: emoji of four artists, a target by a fifth.

The ``emoji-datasource`` packages (npm) ship each vendor's artwork for every Unicode emoji as a
64x64 RGBA PNG, with one ``emoji.json`` that gives each emoji its Unicode category ("Animals &
Nature") and subcategory ("animal-mammal"). From them:

- the **pool**: the base emoji (no skin-tone variants) drawn by four vendors (Apple, Google,
  Twitter, Facebook; ``emoji-datasource-*`` ``POOL_VERSION``), about 7,600 images, one class
  folder per category and subcategory (``animals-nature.animal-mammal``);
- the **target**: one category (default "Animals & Nature") drawn by a fifth artist, EmojiOne
  (``emoji-datasource-emojione`` ``TARGET_VERSION``, matched to the pool's emoji.json by code
  point), labelled by subcategory: about a hundred images;
- the **relevant part**: the pool images of the target's category, i.e. the target's object
  categories drawn by other artists (8.4 % of the pool for "Animals & Nature").

Images go to the ImageFolder trees as the packages ship them (RGBA PNG): ``filterx shard``
re-encodes them as a user's run would. The packages are fetched with ``npm pack`` (the only
network use: about 360 MB of tarballs, of which the 64 px images and emoji.json are kept, about
110 MB) into ``bench.images.default_data_dir() / "emoji"``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from bench.suite import slug

POOL_VENDORS = ("apple", "google", "twitter", "facebook")
POOL_VERSION = "16.0.0"
TARGET_VENDOR = "emojione"
TARGET_VERSION = "4.0.4"
TARGET_CATEGORY = "Animals & Nature"
IMAGE_SIZE = 64  # the packages' 64 px images (the smallest size that keeps the drawings' detail)


def _package(vendor: str) -> tuple[str, str]:
    return f"emoji-datasource-{vendor}", TARGET_VERSION if vendor == TARGET_VENDOR else POOL_VERSION


def fetch(cache: Path, vendors=POOL_VENDORS + (TARGET_VENDOR,)) -> dict[str, Path]:
    """vendor -> the unpacked package (``emoji.json``, ``img/<vendor>/64/*.png``) under
    ``cache``; each is fetched by ``npm pack`` once and unpacked into place atomically."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for vendor in vendors:
        name, version = _package(vendor)
        dest = cache / f"{name}-{version}"
        if not (dest / "emoji.json").is_file():
            if shutil.which("npm") is None:
                raise FileNotFoundError(f"{dest} is missing and npm is not installed to fetch {name}@{version}; "
                                        f"unpack that package there (emoji.json, img/{vendor}/64/)")
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                done = subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", tmp],
                                      capture_output=True, text=True)
                if done.returncode:  # npm's own last line says why (no network, unknown version, ...)
                    why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                    raise RuntimeError(f"npm pack {name}@{version} failed: {why}")
                (tgz,) = Path(tmp).glob("*.tgz")
                _unpack(tgz, Path(tmp) / "unpacked", vendor)
                if dest.exists():
                    shutil.rmtree(dest)
                (Path(tmp) / "unpacked").rename(dest)
        out[vendor] = dest
    return out


def _unpack(tgz: Path, dest: Path, vendor: str) -> None:
    """The package's emoji.json and 64 px images only (its sprite sheets are most of its size)."""
    images = f"package/img/{vendor}/{IMAGE_SIZE}/"
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            if member.isfile() and (member.name == "package/emoji.json" or member.name.startswith(images)):
                member.name = member.name[len("package/"):]
                tar.extract(member, dest, filter="data")


def _images(package: Path, vendor: str, entries: list[dict]):
    """(entry, png path) for each base emoji of ``entries`` whose image ``vendor`` ships."""
    for e in entries:
        path = package / "img" / vendor / str(IMAGE_SIZE) / e["image"]
        if e.get(f"has_img_{vendor}") and path.is_file():
            yield e, path


def make_pool(packages: dict[str, Path], out: Path, vendors=POOL_VENDORS) -> Path:
    """The ``vendors``' base emoji as an ImageFolder tree ``out`` (class folder
    ``<category slug>.<subcategory>``, file ``<vendor>-<image>``); returns ``out``."""
    bad = [v for v in vendors if v not in POOL_VENDORS]
    if bad or not vendors:
        raise ValueError(f"unknown pool vendors {bad or '(none)'}; valid: {', '.join(POOL_VENDORS)}")
    entries = json.loads((packages[POOL_VENDORS[0]] / "emoji.json").read_text())
    for vendor in vendors:
        for e, path in _images(packages[vendor], vendor, entries):
            folder = out / f"{slug(e['category'])}.{e['subcategory']}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / f"{vendor}-{e['image']}")
    return out


def make_target(packages: dict[str, Path], out: Path, category: str = TARGET_CATEGORY) -> Path:
    """EmojiOne's drawings of ``category`` as an ImageFolder tree ``out``, one folder per
    subcategory of the pool's emoji.json (matched by code point, with or without the emoji
    variation selector); returns ``out``."""
    def key(code: str | None) -> str | None:
        return None if code is None else code.upper().replace("-FE0F", "")

    pool_entries = json.loads((packages[POOL_VENDORS[0]] / "emoji.json").read_text())
    known = sorted({e["category"] for e in pool_entries})
    if category not in known:
        raise ValueError(f"unknown emoji category {category!r}; valid: {', '.join(known)}")
    subcategory = {key(e["unified"]): e["subcategory"] for e in pool_entries if e["category"] == category}
    target_entries = json.loads((packages[TARGET_VENDOR] / "emoji.json").read_text())
    written = 0
    for e, path in _images(packages[TARGET_VENDOR], TARGET_VENDOR, target_entries):
        sub = subcategory.get(key(e["unified"])) or subcategory.get(key(e.get("non_qualified")))
        if sub is None:
            continue
        (out / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / sub / e["image"])
        written += 1
    if not written:
        raise ValueError(f"{TARGET_VENDOR} draws no emoji of category {category!r}")
    return out


def relevant_mask(labels: np.ndarray, class_names: list[str], category: str = TARGET_CATEGORY) -> np.ndarray:
    """(N,) bool: the pool images whose class folder is in ``category``."""
    prefix = slug(category) + "."
    hit = np.array([name.startswith(prefix) for name in class_names] + [False])  # label -1: not relevant
    return hit[np.asarray(labels, dtype=np.int64)]
