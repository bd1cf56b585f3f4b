"""The augmentations beyond the seed's crop and flip: keyed by (seed, epoch, index), the same on any layout."""
from __future__ import annotations

import pytest
import torch

from fgic import augment, data, engine
from fgic.samplers import TrainSampler

ALL = augment.Extra(auto_augment="ta_wide", random_erase=0.5, mixup_alpha=0.2, cutmix_alpha=1.0)


def images(n=40, size=20):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen) for _ in range(n)]


def views(extra, size=20, crop=16, padding=2):
    return augment.Views(7, size, crop, padding, extra)


def item(v, pictures, epoch, index):
    return v.item(pictures.__getitem__, lambda i: i % 5, len(pictures), epoch, index)


def test_the_default_view_is_the_seed_recipes_crop_and_flip():
    pictures = images()
    for index in range(10):
        got = item(views(augment.Extra()), pictures, 3, index)
        got, label, key = got.images, got.labels, got.keys
        want = augment.crop_flip(pictures[index], augment.sample_params(7, 3, index, 20, 16, 2), 16, 2)
        assert torch.equal(got, want) and label == index % 5 and key == augment.drop_key(7, 3, index)


@pytest.mark.parametrize("policy", ["ta_wide", "ra", "augmix"])
def test_policies_follow_the_key_not_the_global_generator(policy):
    pictures, v = images(), views(augment.Extra(auto_augment=policy, random_erase=0.5))
    torch.manual_seed(1)
    first = [item(v, pictures, 0, i).images for i in range(8)]
    state = torch.get_rng_state()
    torch.manual_seed(99)  # another global state, and another order of the keys: the same views
    again = [item(v, pictures, 0, i).images for i in reversed(range(8))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.manual_seed(1)
    [item(v, pictures, 0, i) for i in range(8)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was
    plain = [item(views(augment.Extra()), pictures, 0, i).images for i in range(8)]
    assert sum(not torch.equal(a, b) for a, b in zip(first, plain)) >= 6  # the policy does act
    assert not torch.equal(item(v, pictures, 1, 0).images, first[0])  # another epoch, another draw


def test_mixing_rows_partners_and_switch():
    rows = [augment.mix_params(7, 0, i, 50, 16, ALL) for i in range(400)]
    partners = [p for p, _ in rows]
    assert min(partners) >= 0 and max(partners) < 50 and len(set(partners)) > 40  # from the whole set
    cut = [r for _, r in rows if r[0] == 1]
    assert 150 < len(cut) < 250  # half the samples each
    for r in cut:
        y1, y2, x1, x2 = r[2:].tolist()
        assert 0 <= y1 <= y2 <= 16 and 0 <= x1 <= x2 <= 16
        assert r[1].item() == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 256)
    assert all(0 <= r[1] <= 1 for _, r in rows)
    assert augment.mix_params(7, 0, 3, 50, 16, ALL)[0] == partners[3]
    assert all(r[0] == 0 for _, r in (augment.mix_params(7, 0, i, 50, 16, augment.Extra(mixup_alpha=1.0))
                                      for i in range(20)))


def test_mix_applies_the_rows_exactly():
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    rows = torch.tensor([[0, 0.25, 0, 0, 0, 0], [1, 1 - 6 / 64, 1, 3, 2, 5]], dtype=torch.float64)
    mixed, targets = augment.mix(a, torch.tensor([0, 1]), b, torch.tensor([2, 1]), rows, 4)
    assert torch.allclose(mixed[0], 0.25 * a[0] + 0.75 * b[0])
    box = torch.zeros(8, 8, dtype=torch.bool)
    box[1:3, 2:5] = True
    assert torch.equal(mixed[1][:, box], b[1][:, box]) and torch.equal(mixed[1][:, ~box], a[1][:, ~box])
    assert torch.allclose(targets, torch.tensor([[0.25, 0, 0.75, 0], [0, 1, 0, 0]]))


def test_one_and_three_processes_see_the_same_mixed_batches(tiny_data):
    """The global batch of 1 process equals the 3 ranks' batches interleaved, drop keys, partners and rows included."""
    spec = data.DataSpec(resize=36, crop=32, padding=4, seed=5, batch_size=6, workers=0, cache="off",
                         auto_augment="ta_wide", random_erase=0.5, mixup_alpha=0.2, cutmix_alpha=1.0)
    one = data.build(spec, tiny_data, 1, 0, False)[2]
    ranks = [data.build(spec, tiny_data, 3, r, False)[2] for r in range(3)]
    for loader in (one, *ranks):
        loader.sampler.set_epoch(1)
    cpu = torch.device("cpu")
    drops = [augment.drop_key(5, e, i) for e, i in one.sampler]
    for n, (whole, *parts) in enumerate(zip(one, *ranks, strict=True)):
        assert whole.mix_rows.shape == (6, 6) and whole.params is None
        assert whole.keys.tolist() == drops[6 * n:6 * n + 6]
        for field in ("images", "labels", "keys", "partners", "partner_labels", "mix_rows"):
            got = [getattr(p, field)[j] for j in range(2) for p in parts]
            assert torch.equal(getattr(whole, field), torch.stack(got))
        trains = engine.inputs(one, whole, cpu)
        x, y = trains.images, trains.labels
        assert x.dtype == torch.float32 and y.shape == (6, 3) and torch.allclose(y.sum(1), torch.ones(6))
        assert torch.equal(trains.keys, whole.keys)


def test_the_sampler_keys_reach_the_views(tiny_data):
    ds = data.KeyedImageFolder(tiny_data / "train", True, 36, 32, 4, 5, ALL)
    key = next(iter(TrainSampler(len(ds), 1, 0, 5)))
    a, b = ds[key], ds[key]
    assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))
