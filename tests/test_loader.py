import numpy as np
import pytest
import torch

from filterx.io.dataset import Dataset
from filterx.decode.loader import (
    LoaderConfig, dali_shard_range, load_batches, rank_batch_sizes, rank_share, samples_per_rank, worker_positions,
)
from filterx.decode.torch_backend import center_offset

BACKENDS = ("dali", "torchvision", "pil")


def _epoch(tars, **kw):
    batches = list(load_batches(tars, LoaderConfig(**kw)))
    ids = torch.cat([b.ids for b in batches])
    return ids, torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches]), batches


@pytest.fixture(scope="module")
def decoded(dataset_dir):
    ds = Dataset.open(dataset_dir)
    out = {}
    for backend in BACKENDS:
        for res in (32, 48):
            ids, images, labels, batches = _epoch(ds.tar_paths(), resolution=res, backend=backend, batch_size=8, workers=1)
            order = ids.argsort()
            out[backend, res] = (ids[order], images[order], labels[order], batches)
    return ds, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sample_once_with_its_label(decoded, backend):
    ds, out = decoded
    for res in (32, 48):
        ids, images, labels, batches = out[backend, res]
        assert ids.tolist() == list(range(ds.num_samples))
        assert labels.tolist() == ds.labels.tolist()
        assert images.shape == (ds.num_samples, 3, res, res) and images.dtype == torch.float32
        assert [len(b.ids) for b in batches] == [8, 8, 8, ds.num_samples - 24]
        assert torch.isfinite(images).all() and images.std() > 0.3  # normalised photos, not blank


@pytest.mark.parametrize("res", (32, 48))
def test_backends_give_the_same_images(decoded, res):
    _, out = decoded
    dali, tv, pil = (out[b, res][1] for b in BACKENDS)
    # same decoder (libjpeg-turbo), same antialiased resize, same crop rounding: rounding noise only
    d = (dali - tv).abs()
    assert d.mean() < 0.01 and d.max() < 0.1
    # PIL decodes through DCT-domain scaling (Image.draft): a different but close filter
    assert (pil - tv).abs().mean() < 0.06


def test_center_offset_rounds_half_up():
    assert [center_offset(s, 64) for s in (64, 65, 73, 74)] == [0, 1, 5, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffled_training_epochs_are_seeded(dataset_dir, backend):
    tars = Dataset.open(dataset_dir).tar_paths()
    kw = dict(resolution=32, backend=backend, batch_size=8, workers=1, train=True, shuffle=True, seed=3)
    a, ia, _, _ = _epoch(tars, **kw)
    b, ib, _, _ = _epoch(tars, **kw)
    assert sorted(a.tolist()) == list(range(len(a)))
    assert a.tolist() != sorted(a.tolist())
    assert torch.equal(a, b) and torch.equal(ia, ib)
    c, _, _, _ = _epoch(tars, **{**kw, "epoch": 1})
    assert c.tolist() != a.tolist()


def test_rank_shares_cover_every_sample_evenly():
    cfg = LoaderConfig(shuffle=True, seed=1)
    shares = [rank_share(27, cfg, r, 4) for r in range(4)]
    assert {len(s) for s in shares} == {7}
    assert set(np.concatenate(shares).tolist()) == set(range(27))


def test_ddp_split_and_id_subset(dataset_dir):
    tars = Dataset.open(dataset_dir).tar_paths()
    seen = []
    for rank in range(2):
        batches = list(load_batches(tars, LoaderConfig(resolution=32, backend="pil", batch_size=4, workers=0),
                                    rank=rank, world_size=2))
        seen.append(torch.cat([b.ids for b in batches]).tolist())
    assert len(seen[0]) == len(seen[1]) == 14
    assert set(seen[0]) | set(seen[1]) == set(range(27))
    subset = np.array([3, 7, 20])
    ids, _, _, _ = _epoch(tars, resolution=32, backend="torchvision", batch_size=4, workers=0)
    got = torch.cat([b.ids for b in load_batches(tars, LoaderConfig(resolution=32, backend="pil", workers=0), ids=subset)])
    assert sorted(got.tolist()) == [3, 7, 20]
    with pytest.raises(ValueError, match="materialise"):
        next(load_batches(tars, LoaderConfig(backend="dali"), ids=subset))
    # "auto" reads a subset through torchvision even where DALI is installed
    got = torch.cat([b.ids for b in load_batches(tars, LoaderConfig(resolution=32, workers=0), ids=subset)])
    assert sorted(got.tolist()) == [3, 7, 20]


def test_missing_index_is_rebuilt_and_bad_input_named(dataset_copy):
    ds = Dataset.open(dataset_copy)
    ds.index_path(0).unlink()
    ids, _, _, _ = _epoch(ds.tar_paths()[:1], resolution=32, backend="dali", batch_size=8, workers=1)
    assert ids.tolist() == [0, 1, 2, 3, 4] and ds.index_path(0).is_file()
    with pytest.raises(ValueError, match="unknown backend 'opencv'"):
        LoaderConfig(backend="opencv")
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        next(load_batches([dataset_copy / "missing.tar"], LoaderConfig()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_tar_fails_with_one_clear_line(dataset_copy, backend):
    ds = Dataset.open(dataset_copy)
    tar = ds.shard_path(2)
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"shard .*000002.tar is truncated"):
        next(load_batches(ds.tar_paths(), LoaderConfig(resolution=32, backend=backend, workers=0)))


# ---------------------------------------------------------------- ranks: counts, batches, seeds


def _loader_order(positions, batch_size, workers):
    """The batches (as position arrays) a rank's DataLoader yields, in order: it takes one
    batch from each worker in turn and drops the workers that are done."""
    per_worker = [worker_positions(positions, batch_size, w, max(1, workers)) for w in range(max(1, workers))]
    out = []
    for k in range(max(map(len, per_worker))):
        out.extend(blocks[k] for blocks in per_worker if k < len(blocks))
    return out


def test_equal_steps_per_rank_for_every_backend_sweep():
    from filterx.train.data import batches_per_epoch

    cfg = LoaderConfig()
    for n in [131, *range(100, 3001, 47)]:
        for world in (1, 2, 3, 4, 8):
            # DALI: shard r holds [lo, hi), never more than a rank reads, padded by at most one
            ranges = [dali_shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(0 <= samples_per_rank(n, world) - (hi - lo) <= 1 for lo, hi in ranges)
            shares = [rank_share(n, cfg, r, world) for r in range(world)]
            for batch in (1, 2, 3, 7, 64):
                sizes = rank_batch_sizes(n, batch, world)
                steps = batches_per_epoch(n, batch, 0, world, "dali")
                assert sum(sizes) == samples_per_rank(n, world) and steps == sum(s >= 2 for s in sizes)
                for workers in (0, 1, 2, 4):
                    for backend in ("dali", "torchvision", "pil"):
                        assert batches_per_epoch(n, batch, workers, world, backend) == steps
                    for share in shares:  # torchvision / pil: what the rank's DataLoader yields
                        assert [len(b) for b in _loader_order(share, batch, workers)] == sizes


@pytest.mark.parametrize("backend,n,world,batch,workers", [
    ("dali", 27, 2, 4, 1), ("dali", 27, 3, 4, 1), ("dali", 20, 3, 3, 1), ("dali", 27, 2, 13, 1),
    ("dali", 10, 3, 3, 2), ("pil", 27, 2, 4, 0), ("pil", 27, 3, 4, 2), ("torchvision", 20, 3, 3, 2),
])
def test_rank_batch_sizes_are_what_the_loaders_yield(dataset_dir, backend, n, world, batch, workers):
    tars = Dataset.open(dataset_dir).tar_paths()
    tars = tars[: -(-n // 5)]  # tars of 5 samples; the last of the 6 holds 2 (27 in all)
    cfg = LoaderConfig(resolution=16, backend=backend, batch_size=batch, workers=workers, shuffle=True, train=True)
    seen = set()
    for rank in range(world):
        batches = list(load_batches(tars, cfg, rank=rank, world_size=world))
        assert [len(b.ids) for b in batches] == rank_batch_sizes(n, batch, world), rank
        ids = torch.cat([b.ids for b in batches]).tolist()
        if backend == "dali":  # its real samples are DALI's shard, which the fallback re-reads
            lo, hi = dali_shard_range(n, rank, world)
            assert set(ids) == set(range(lo, hi))
        seen |= set(ids)
    assert seen == set(range(n))


def test_global_batch_is_the_same_images_for_any_world_size_and_workers():
    cfg = LoaderConfig(shuffle=True, seed=4, epoch=2)
    for n in (24, 60, 131):
        for b in (1, 2, 5):
            for world in (2, 3):
                one = rank_share(n, cfg, 0, 1)
                for w1, w in ((0, 0), (0, 2), (3, 1), (2, 4)):
                    single = [set(x.tolist()) for x in _loader_order(one, b * world, w1)]
                    ranks = [_loader_order(rank_share(n, cfg, r, world), b, w) for r in range(world)]
                    steps = [set().union(*(rb[t].tolist() for rb in ranks)) for t in range(len(ranks[0]))]
                    assert len(steps) == len(single) and steps[:-1] == single[:-1]
                    # the last step too, unless the ranks pad by wrapping (world does not divide n)
                    assert (steps[-1] == single[-1]) == (n % world == 0)


def test_global_batch_is_the_same_images_when_loaded(dataset_dir):
    tars = Dataset.open(dataset_dir).tar_paths()
    ids = np.arange(24)  # 24: every world size here divides it, so no rank pads
    kw = dict(resolution=16, backend="pil", shuffle=True, seed=1, train=True)

    def steps(world, batch, workers):
        cfg = LoaderConfig(batch_size=batch, workers=workers, **kw)
        ranks = [list(load_batches(tars, cfg, rank=r, world_size=world, ids=ids)) for r in range(world)]
        return [set(torch.cat([rb[t].ids for rb in ranks]).tolist()) for t in range(len(ranks[0]))], ranks

    single, (one,) = steps(1, 6, 0)
    assert len(single) == 4 and set().union(*single) == set(range(24))
    assert steps(1, 6, 2)[0] == single and steps(2, 3, 2)[0] == single and steps(3, 2, 0)[0] == single
    # one stream per batch: the augmentation does not depend on the worker count either
    (again,) = steps(1, 6, 2)[1]
    assert all(torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images) for a, b in zip(one, again))


@pytest.mark.parametrize("backend", ("pil", "torchvision"))
def test_ranks_draw_their_own_crops_and_flips(dataset_dir, backend, monkeypatch):
    from filterx.decode import loader, torch_backend

    tars = Dataset.open(dataset_dir).tar_paths()
    refs = loader.sample_refs(tars)
    positions = np.arange(len(refs))  # the same samples in the same order on both ranks
    cfg = LoaderConfig(resolution=16, backend=backend, batch_size=8, train=True, seed=3)
    boxes: list = []
    real_box = torch_backend._random_crop_box
    monkeypatch.setattr(torch_backend, "_random_crop_box", lambda *a: boxes.append(real_box(*a)) or boxes[-1])

    def draws(rank):
        boxes.clear()
        stream = torch_backend._SampleStream(tars, refs, positions, cfg, backend, False, rank)
        images = {sid: img for sid, img, _, err in stream if not err}
        return list(boxes), images

    boxes0, images0 = draws(0)
    boxes1, images1 = draws(1)
    assert draws(0)[0] == boxes0  # seeded: a rank draws the same again
    assert len(boxes0) == len(boxes1) == len(images0) == 27
    assert sum(a != b for a, b in zip(boxes0, boxes1)) >= 20
    assert sum(not torch.equal(images0[i], images1[i]) for i in images0) >= 20


def test_dali_ranks_have_their_own_seeds(dataset_dir):
    pytest.importorskip("nvidia.dali")
    from filterx.decode.dali_backend import _dali_pipeline

    tars = Dataset.open(dataset_dir).tar_paths()
    cfg = LoaderConfig(resolution=16, backend="dali", batch_size=4, workers=1, train=True, seed=3)
    seeds = [_dali_pipeline(tars, cfg, r, 3).seed for r in range(3)]
    assert len(set(seeds)) == 3 and _dali_pipeline(tars, cfg, 1, 3).seed == seeds[1]
    assert _dali_pipeline(tars, LoaderConfig(**{**cfg.__dict__, "epoch": 1}), 1, 3).seed != seeds[1]
