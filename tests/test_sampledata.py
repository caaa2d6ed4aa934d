"""sampledata: the pool digits' style, classes and count; the digit split shared by all calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from filterx.io.sampledata import make_sample_data


def _mean_rgb(folder) -> np.ndarray:
    return np.mean([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).mean((0, 1))
                    for p in sorted(folder.glob("*.jpg"))], axis=0)


def test_pool_digits_in_the_targets_style_with_chosen_classes_and_count(tmp_path):
    cam = make_sample_data(tmp_path / "cam", per_class=4, target_per_class=0, photos=1, textures=1,
                           digit_style="camera", pool_digits=(0, 1, 2), digits_per_class=6, seed=1)
    paper = make_sample_data(tmp_path / "paper", per_class=4, target_per_class=3, photos=1, textures=1,
                             pool_digits=(0, 1, 2), digits_per_class=6, seed=1)
    names = sorted(p.name for p in cam.source.iterdir())
    assert names == ["digit_0", "digit_1", "digit_2", "photo_astronaut", "texture_stripes"]
    assert [len(list((cam.source / n).glob("*.jpg"))) for n in names] == [6, 6, 6, 4, 4]
    assert cam.relevant_classes == ("digit_0", "digit_1", "digit_2") == cam.domain_classes
    assert json.loads((tmp_path / "cam" / "sample_data.json").read_text())["relevant_classes"] == \
        ["digit_0", "digit_1", "digit_2"]
    assert not (tmp_path / "cam" / "target").exists()  # target_per_class=0 writes no target
    # camera style: tinted paper (0.55-0.9), darker than the pool's light paper (0.75-1.0)
    assert _mean_rgb(cam.source / "digit_0").mean() < _mean_rgb(paper.source / "digit_0").mean() - 15
    assert abs(_mean_rgb(cam.source / "digit_0").mean() - _mean_rgb(paper.target / "digit_0").mean()) < 25


def test_default_pool_is_the_demos_and_bad_values_are_refused(tmp_path):
    sd = make_sample_data(tmp_path / "d", per_class=1, target_per_class=1, photos=0, textures=0)
    assert sd.relevant_classes == tuple(f"digit_{d}" for d in range(5))
    assert sd.domain_classes == tuple(f"digit_{d}" for d in range(10))
    with pytest.raises(ValueError, match="unknown digit_style 'ink'; valid: paper, camera"):
        make_sample_data(tmp_path / "x", digit_style="ink")
    with pytest.raises(ValueError, match=r"pool_digits must lie in 0-9, got \[12\]"):
        make_sample_data(tmp_path / "y", pool_digits=(1, 12))
