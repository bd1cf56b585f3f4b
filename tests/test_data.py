import json
import shutil

import pytest
import torch
import torch.nn.functional as tf
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder

from fgic import augment, data, images
from fgic.demo import make_tiny
from fgic.errors import FgicError
from fgic.samplers import ORDER, ShardSampler, TrainSampler, order_of
from tests.helpers import run_fgic, tiny_args


def global_batches(n, batch, world, seed, epoch):
    """The set of sample indices in each global step, gathered over all ranks."""
    per = batch // world
    steps = None
    for rank in range(world):
        s = TrainSampler(n, world, rank, seed)
        s.set_epoch(epoch)
        keys = list(s)
        assert all(e == epoch for e, _ in keys)
        chunks = [keys[i:i + per] for i in range(0, len(keys) - per + 1, per)]  # DataLoader drop_last=True
        steps = steps or [set() for _ in chunks]
        assert len(chunks) == len(steps)
        for step, chunk in zip(steps, chunks):
            step.update(i for _, i in chunk)
    return steps


@pytest.mark.parametrize("n", [24, 101, 97])
def test_global_batches_do_not_depend_on_the_world_size(n):
    for epoch in (0, 1):
        one = global_batches(n, 6, 1, 7, epoch)
        assert len(one) == n // 6
        assert global_batches(n, 6, 2, 7, epoch) == one
        assert global_batches(n, 6, 3, 7, epoch) == one
    assert global_batches(n, 6, 1, 7, 0) != global_batches(n, 6, 1, 7, 1)  # set_epoch reshuffles


def orders(seed, epochs, order, n=50, world=1, rank=0, skip=0):
    s = TrainSampler(n, world, rank, seed, order)
    out = []
    for epoch in epochs:
        s.set_epoch(epoch, skip)
        out.append([i for _, i in s])
    return out


def test_seeds_one_apart_train_on_orders_of_their_own():
    """DistributedSampler's seed + epoch gave seed 2021 seed 2020's orders one epoch later: a seed sweep's runs were
    not independent."""
    assert orders(2021, range(0, 5), "seed+epoch") == orders(2020, range(1, 6), "seed+epoch")  # the old flaw
    new = [o for seed in range(2018, 2023) for o in orders(seed, range(6), "keyed")]
    assert len({tuple(o) for o in new}) == len(new) == 30


@pytest.mark.parametrize("world,rank,skip", [(1, 0, 0), (3, 2, 0), (2, 1, 5)])
def test_a_run_from_before_the_keyed_order_resumes_in_its_own_order(world, rank, skip):
    """DistributedSampler's own permutation, position for position, for checkpoints that name no order."""
    assert order_of({}) == "seed+epoch" and order_of({"sample_order": "keyed"}) == "keyed" == ORDER
    theirs = DistributedSampler(range(50), num_replicas=world, rank=rank, shuffle=True, seed=2020, drop_last=True)
    for epoch in (0, 7):
        theirs.set_epoch(epoch)
        assert orders(2020, [epoch], "seed+epoch", 50, world, rank, skip) == [list(theirs)[skip:]]


@pytest.mark.parametrize("n,world", [(101, 1), (101, 2), (101, 3), (2, 3), (0, 2)])
def test_shards_cover_every_sample_exactly_once(n, world):
    seen = [i for r in range(world) for i in ShardSampler(n, world, r)]
    assert sorted(seen) == list(range(n))
    assert sum(len(ShardSampler(n, world, r)) for r in range(world)) == n


def test_sample_params_are_a_pure_function_of_the_key():
    a = augment.sample_params(2020, 3, 17, 512, 448, 8)
    assert a == augment.sample_params(2020, 3, 17, 512, 448, 8)
    draws = {augment.sample_params(2020, e, i, 512, 448, 8) for e in range(4) for i in range(50)}
    assert len(draws) > 150
    assert all(0 <= p.top <= 512 + 16 - 448 and 0 <= p.left <= 80 for p in draws)
    assert {p.flip for p in draws} == {True, False}
    assert min(p.top for p in draws) <= 10 and max(p.top for p in draws) >= 70  # spans the range


def test_crop_flip_equals_padding_then_cropping():
    img = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    padded = tf.pad(img, (4, 4, 4, 4))
    for p in [augment.CropFlip(0, 0, False), augment.CropFlip(8, 3, True), augment.CropFlip(5, 8, False)]:
        want = padded[:, p.top:p.top + 16, p.left:p.left + 16]
        want = want.flip(-1) if p.flip else want
        assert torch.equal(augment.crop_flip(img, p, 16, 4), want)


def test_normalize_matches_torchvision():
    from torchvision.transforms import v2
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    for norm in (augment.IMAGENET, augment.Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))):
        ref = v2.Normalize(norm.mean, norm.std)(x.float() / 255)
        torch.testing.assert_close(augment.normalize(x, norm), ref, rtol=1e-5, atol=1e-5)


def test_dataset_items_follow_their_keys(tmp_path):
    root = make_tiny(tmp_path / "d", (3, 3), (2, 2))
    train = data.KeyedImageFolder(root / "train", True, 36, 32, 4, seed=1)
    item = train[(0, 4)]
    x, y, key = item.images, item.labels, item.keys
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y == 1 and key == augment.drop_key(1, 0, 4)
    assert item.partners is item.partner_labels is item.mix_rows is item.params is None
    assert torch.equal(x, train[(0, 4)].images)
    assert any(not torch.equal(x, train[(e, 4)].images) for e in range(1, 6))  # a new epoch, a new crop/flip
    test = data.KeyedImageFolder(root / "test", False, 36, 32, 4, seed=1)
    assert test[0].images.shape == (3, 32, 32) and torch.equal(test[0].images, test[0].images) and test[0].keys is None


def test_layout_checks_name_the_folder(tmp_path):
    root = make_tiny(tmp_path / "d", (2, 2), (1, 1))
    (root / "train" / ".DS_Store").write_text("x")
    (root / "train" / "class_00" / "Thumbs.db").write_text("x")
    assert data.check_layout(root) == ["class_00", "class_01"]

    (root / "test" / "class_02").mkdir()
    with pytest.raises(FgicError, match="class_02: no images"):
        data.check_layout(root)
    (root / "test" / "class_02" / "a.png").write_bytes(b"")
    with pytest.raises(FgicError, match="different classes"):
        data.check_layout(root)
    with pytest.raises(FgicError, match="test: missing"):
        data.check_layout(_only_train(tmp_path))
    (tmp_path / "f" / "train").mkdir(parents=True)
    with pytest.raises(FgicError, match="no class folders"):
        data.check_layout(tmp_path / "f")


def _only_train(tmp_path):
    return make_tiny(tmp_path / "g", (1,), ())  # no test counts: no test/ folder


def test_registry_names_point_at_the_data_root(tmp_path):
    with pytest.raises(FgicError, match=r"-d cub: no dataset at .*cub; prepare it with "
                                        r"`python -m fgic.prepare cub /path/to/CUB_200_2011`"):
        data.resolve("cub", str(tmp_path))
    (tmp_path / "cub").mkdir()
    assert data.resolve("cub", str(tmp_path)) == ("cub", tmp_path / "cub")
    with pytest.raises(FgicError, match="-d /nowhere: no such folder"):
        data.resolve("/nowhere", str(tmp_path))
    assert data.resolve(str(tmp_path / "cub"), "unused")[0] == "cub"


@pytest.mark.parametrize("batch,world", [(64, 3), (2, 3), (5, 2)])
def test_batch_must_split_evenly(batch, world):
    with pytest.raises(FgicError, match=f"-b/--batch-size {batch} does not split evenly over {world}"):
        data.check_batch(batch, world)
    assert data.check_batch(6, 3) == 2


@pytest.mark.parametrize("kind,local,env,usable,expected", [
    ("single", 1, {}, 16, 8), ("torchrun", 4, {}, 16, 4), ("torchrun", 4, {}, 2, 0),  # sharing the launcher's CPUs
    ("srun", 4, {"SLURM_CPUS_PER_TASK": "6"}, 64, 6),  # Slurm does not bind: the mask shows the node
    ("srun", 4, {"SLURM_CPUS_PER_TASK": "6"}, 6, 6),  # bound to its own 6, not a quarter of them
    ("srun", 4, {"SLURM_CPUS_PER_TASK": "8"}, 1, 1),  # the job's value, which srun 22.05 did not pass on: 1 CPU
    ("srun", 4, {}, 16, 4),
])
def test_default_loader_workers_follow_each_process_s_cpus(monkeypatch, kind, local, env, usable, expected):
    monkeypatch.setattr(data, "usable_cpus", lambda: usable)
    assert data.default_workers(local, kind, env) == expected


def _with_hidden_folders(root):
    """A Jupyter checkpoint folder holding an image under each split and inside a class folder, an empty hidden
    folder (the crash: ImageFolder found no files for that "class") and a macOS `._` copy: no class, no sample."""
    (root / "train" / ".cache").mkdir()
    for split in data.SPLITS:
        hidden = root / split / ".ipynb_checkpoints"
        hidden.mkdir()
        (hidden / "000-checkpoint.jpg").write_bytes((root / split / "class_00" / "000.jpg").read_bytes())
    inner = root / "train" / "class_01" / ".ipynb_checkpoints"
    inner.mkdir()
    (inner / "000.jpg").write_bytes((root / "train" / "class_01" / "000.jpg").read_bytes())
    (root / "train" / "class_00" / "._000.jpg").write_bytes(b"\0\5\26\7")
    return root


def _real_samples(folder):
    return [(str(p), int(p.parent.name[-2:])) for p in sorted(folder.glob("class_*/*.jpg")) if p.name[0] != "."]


def test_hidden_folders_are_neither_classes_nor_samples(tmp_path):
    root = _with_hidden_folders(make_tiny(tmp_path / "d", (3, 2), (1, 2)))
    assert data.check_layout(root) == ["class_00", "class_01"]
    spec = data.DataSpec(resize=36, crop=32, padding=4, seed=1, batch_size=2, workers=0, cache="on",
                         cache_dir=str(tmp_path / "cache"))
    sets = data.build(spec, root, 1, 0, False)[:2]
    for split, ds in zip(data.SPLITS, sets):  # served from the cache (--cache on), with the same classes
        assert type(ds).__name__ == "CachedImageFolder" and ds.classes == ["class_00", "class_01"]
        assert ds.samples == _real_samples(root / split)
        assert ds.array.shape[0] == len(ds.samples)
        assert images.split_classes(root / split) == ["class_00", "class_01"]
    folder = data.KeyedImageFolder(root / "train", True, 36, 32, 4, seed=1)
    assert folder.class_to_idx == {"class_00": 0, "class_01": 1} and folder.samples == _real_samples(root / "train")


def test_samples_are_image_folder_s_on_a_plain_dataset(tmp_path):
    root = make_tiny(tmp_path / "d", (3, 2), (1, 2))  # the same order and paths: existing caches stay valid
    nested = root / "train" / "class_01" / "nested"
    nested.mkdir()
    (nested / "a.jpg").write_bytes((root / "train" / "class_01" / "000.jpg").read_bytes())
    for split in data.SPLITS:
        ours = data.KeyedImageFolder(root / split, False, 36, 32, 4, seed=1)
        theirs = ImageFolder(str(root / split))
        assert ours.samples == theirs.samples and ours.classes == theirs.classes


@pytest.mark.e2e
def test_a_run_trains_beside_hidden_folders(tmp_path):
    root = _with_hidden_folders(make_tiny(tmp_path / "d", (6, 6), (2, 2)))
    res = run_fgic(["-d", str(root), *tiny_args(epochs=1, batch_size=6), "--output-dir", str(tmp_path / "runs")])
    assert res.returncode == 0, res.stderr
    config = json.loads(next((tmp_path / "runs").rglob("config.json")).read_text())
    assert config["classes"] == ["class_00", "class_01"] and config["num_classes"] == 2


def test_the_fingerprint_of_a_copy_elsewhere_is_the_same_and_of_changed_files_not(tiny_data, tmp_path):
    """What fgic.ddp compares across ranks: node-local copies agree; a missing image, a file of another size, or a
    relabelled one do not."""
    def of(root):
        splits = [data.KeyedImageFolder(root / s, s == "train", 72, 64, 4, 0) for s in data.SPLITS]
        return data.fingerprint(root, splits)
    copy = tmp_path / "node-local" / "tiny"
    shutil.copytree(tiny_data, copy)
    assert of(copy) == of(tiny_data)
    image = copy / "test" / "class_01" / "000.jpg"
    image.write_bytes(image.read_bytes() + b"\0")
    assert of(copy) != of(tiny_data)
    image.rename(copy / "test" / "class_02" / "999.jpg")
    assert of(copy) != of(tiny_data)
