"""The decoded-image cache: built once, reused, rebuilt on change, never read half-written, one builder at a time,
and the same batches as the uncached path, bit for bit."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fgic import augment, cache, data, images
from fgic.batch import collate
from fgic.cacheload import CachedBatches
from fgic.demo import make_tiny
from fgic.errors import FgicError
from fgic.samplers import TrainSampler

FORK = multiprocessing.get_context("fork")


@pytest.fixture()
def ds(tmp_path):
    """A dataset with non-square images of two sizes, so the resize really resamples."""
    root = make_tiny(tmp_path / "d", (5, 4), (3, 3), size=40)
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(root / "train" / "class_00" / "wide.png")
    return root


def samples(root, split="train"):
    return data.KeyedImageFolder(root / split, split == "train", 36, 32, 4, seed=3).samples


def expected(samples_, size):
    return np.stack([augment.resize(images.load_rgb(p), size).numpy() for p, _ in samples_])


def test_build_then_reuse(ds, tmp_path):
    s = samples(ds)
    arr = cache.ensure(tmp_path / "c", ds, "train", s, 36, workers=2, show=False)
    assert arr.shape == (len(s), 3, 36, 36) and np.array_equal(arr, expected(s, 36))
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(files) == 3 and [f.rsplit(".", 1)[1] for f in files] == ["json", "lock", "npy"]
    mtime = (tmp_path / "c" / files[2]).stat().st_mtime_ns
    again = cache.ensure(tmp_path / "c", ds, "train", s, 36, workers=2, show=False)
    assert (tmp_path / "c" / files[2]).stat().st_mtime_ns == mtime and again.filename == arr.filename


def test_a_changed_file_or_size_rebuilds(ds, tmp_path):
    s = samples(ds)
    folder = tmp_path / "c"
    first = cache.ensure(folder, ds, "train", s, 36, workers=0, show=False)
    other_size = cache.ensure(folder, ds, "train", s, 20, workers=0, show=False)
    assert other_size.shape[-1] == 20 and np.array_equal(other_size, expected(s, 20))
    path = s[1][0]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path, quality=90)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = cache.ensure(folder, ds, "train", s, 36, workers=0, show=False)
    assert rebuilt.filename != first.filename and rebuilt[1].max() < 10 and first[1].max() > 100
    assert not os.path.exists(first.filename)  # the older version of the split is removed
    assert os.path.exists(other_size.filename)  # another resize is another cache
    relabelled = [(p, 1 - y) for p, y in s]
    assert cache.name_of(ds, "train", cache.key_of(relabelled, 36)) != cache.name_of(ds, "train",
                                                                                     cache.key_of(s, 36))


def test_half_written_cache_is_not_read(ds, tmp_path):
    s = samples(ds)
    folder = tmp_path / "c"
    arr = cache.ensure(folder, ds, "train", s, 36, workers=0, show=False)
    key = cache.key_of(s, 36)
    name = cache.name_of(ds, "train", key)
    assert name.startswith(f"{ds.name}-train-36px-")  # named after the dataset folder, for people reading the folder
    (folder / f"{name}.json").unlink()  # killed after the array's rename, before its marker
    assert cache.open_array(folder, name, key) is None
    with open(folder / f"{name}.npy", "r+b") as f:  # and the array torn
        f.truncate(1000)
    dead = folder / f"{name}.npy@{cache._host()}@{dead_pid()}@0123abcd.tmp"  # a dead builder's temporary file
    dead.write_bytes(b"partial")
    again = cache.ensure(folder, ds, "train", s, 36, workers=0, show=False)
    assert np.array_equal(again, expected(s, 36)) and again.filename == arr.filename
    assert not dead.exists()
    (folder / f"{name}.json").write_text('{"format": "other"}')  # a marker of another key
    assert cache.open_array(folder, name, key) is None


def dead_pid() -> int:
    p = FORK.Process(target=os._exit, args=(0,))
    p.start()
    p.join()
    return p.pid


def test_temporary_names_differ_across_hosts_with_the_same_pid(monkeypatch, tmp_path):
    names = set()
    for host in ("node-a", "node-b.cluster", "node-a"):
        monkeypatch.setattr(socket, "gethostname", lambda: host)
        tmp = cache._temp(tmp_path / "x.npy")
        assert tmp.name.startswith("x.npy@") and tmp.suffix == ".tmp" and f"@{host}@{os.getpid()}@" in tmp.name
        names.add(tmp.name)
    assert len(names) == 3  # the random token: the same host and pid (another pid namespace) too


def test_the_sweep_removes_only_provably_stale_temporary_files(monkeypatch, tmp_path):
    name, pid, here = "d-train-36px-00000000-" + "0" * 16, dead_pid(), cache._host()
    temps = {"other host, pid dead here": f"{name}.npy@node-b@{pid}@0a0b0c0d.tmp",
             "other key, other host": f"d-train-36px-00000000-{'1' * 16}.npy@node-b.x@{pid}@0a0b0c0d.tmp",
             "this host, alive": f"{name}.npy@{here}@{os.getpid()}@0a0b0c0d.tmp",
             "an older version's name": f"{name}.npy.{pid}.tmp",
             "this host, dead": f"{name}.npy@{here}@{pid}@0a0b0c0d.tmp",
             "this host, dead, json": f"{name}.json@{here}@{pid}@0a0b0c0d.tmp",
             "other host, a day untouched": f"{name}.npy@node-b@{os.getpid()}@0a0b0c0e.tmp"}
    for f in temps.values():
        (tmp_path / f).write_bytes(b"x")
    old = time.time() - cache.STALE_SECONDS - 60
    os.utime(tmp_path / temps["other host, a day untouched"], (old, old))
    cache._remove_stale(tmp_path, name)
    kept = {k for k, f in temps.items() if (tmp_path / f).exists()}
    assert kept == {"other host, pid dead here", "other key, other host", "this host, alive", "an older version's name"}


def test_another_node_s_sweep_spares_a_build_in_progress(ds, tmp_path, monkeypatch):
    """Node B, whose flock does not see node A's (node-local locks on a shared file system), sweeps while A builds;
    A's pid is not alive on B."""
    s, folder = samples(ds), tmp_path / "c"
    name = cache.name_of(ds, "train", cache.key_of(s, 36))
    real_fill = cache._fill

    def fill_while_b_sweeps(task):
        with monkeypatch.context() as node_b:
            node_b.setattr(socket, "gethostname", lambda: "node-b")
            node_b.setattr(cache, "_alive", lambda pid: False)
            cache._remove_stale(folder, name)
        return real_fill(task)
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    monkeypatch.setattr(cache, "_fill", fill_while_b_sweeps)
    arr = cache.ensure(folder, ds, "train", s, 36, workers=0, show=False)
    assert np.array_equal(arr, expected(s, 36)) and not list(folder.glob("*.tmp"))


def _ensure_and_count(folder, root, s, counter):
    real = cache._build

    def counted(*a, **k):
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # long enough for the other process to find the lock taken
        return real(*a, **k)
    cache._build = counted
    arr = cache.ensure(folder, root, "train", s, 36, workers=0, show=False)
    os._exit(0 if np.array_equal(arr, expected(s, 36)) else 3)


@pytest.mark.e2e
def test_concurrent_processes_build_once(ds, tmp_path):
    s = samples(ds)
    counter = tmp_path / "count"
    procs = [FORK.Process(target=_ensure_and_count, args=(tmp_path / "c", ds, s, counter)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "built\n"


def _hold_lock(folder, name, ready, die):
    with cache._lock(folder / f"{name}.lock", name):
        cache._temp(folder / f"{name}.npy").write_bytes(b"half")
        ready.set()
        if die:
            os._exit(1)  # a builder killed mid-build
        time.sleep(30)  # a stuck one


@pytest.mark.e2e
@pytest.mark.parametrize("die", [True, False], ids=["dead-builder", "stuck-builder"])
def test_waiting_for_a_builder_never_hangs(ds, tmp_path, monkeypatch, die):
    s = samples(ds)
    folder = tmp_path / "c"
    folder.mkdir()
    name = cache.name_of(ds, "train", cache.key_of(s, 36))
    ready = FORK.Event()
    holder = FORK.Process(target=_hold_lock, args=(folder, name, ready, die))
    holder.start()
    assert ready.wait(30)
    monkeypatch.setattr(cache, "WAIT_SECONDS", 1.0)
    try:
        if die:
            holder.join(30)
            arr = cache.ensure(folder, ds, "train", s, 36, workers=0, show=False)
            assert np.array_equal(arr, expected(s, 36))
            assert not list(folder.glob("*.tmp"))
        else:
            holder_is = f"process {holder.pid} on {cache._host()}"
            with pytest.raises(FgicError, match=f"waited 1 s for {holder_is} to build .*--cache off"):
                cache.ensure(folder, ds, "train", s, 36, workers=0, show=False)
    finally:
        holder.kill()
        holder.join()


def args_for(**kw):
    opts = dict(resize=36, crop=32, padding=4, seed=3, check_images="fast", skip_bad_images=False, workers=0,
                batch_size=4, cache="on", cache_dir=None)
    return data.DataSpec(**{**opts, **kw})


@pytest.mark.parametrize("crop,padding", [(32, 4), (36, 0), (40, 2)])
def test_cached_batches_equal_uncached_bitwise(ds, tmp_path, crop, padding):
    cached = data.build(args_for(cache_dir=str(tmp_path / "c"), crop=crop, padding=padding), ds, 1, 0, False)
    plain = data.build(args_for(cache="off", crop=crop, padding=padding), ds, 1, 0, False)
    assert isinstance(cached[0], data.CachedImageFolder) and isinstance(plain[0], data.KeyedImageFolder)
    cpu = torch.device("cpu")
    flips = set()
    for epoch in (0, 1, 2):
        for loader in (cached[2], plain[2]):
            loader.sampler.set_epoch(epoch)
        for a, b in zip(cached[2], plain[2], strict=True):
            da, db = cached[2].dataset.to_device(a, cpu), plain[2].dataset.to_device(b, cpu)
            assert da.images.dtype == torch.uint8 and da.images.shape == (4, 3, crop, crop)
            assert torch.equal(da.images, db.images) and torch.equal(da.labels, db.labels)
            assert torch.equal(da.keys, db.keys) and da.params is db.params is da.partners is db.partners is None
            flips.update(a.params[:, 2].tolist())
            del a  # a cached batch's buffer is reused once the next ones are taken
    assert flips == {0, 1}  # both flips were exercised
    for a, b in zip(cached[3], plain[3], strict=True):  # test split: centre crops
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.keys is b.keys is None


@pytest.mark.parametrize("extra", [dict(auto_augment="ta_wide", random_erase=0.5, mixup_alpha=0.2, cutmix_alpha=1.0),
                                   dict(auto_augment="augmix"), dict(mixup_alpha=0.4)])
def test_cached_batches_equal_uncached_with_the_augmentations(ds, tmp_path, extra):
    """Policies, erasing and mixing: the cache's items (by loader workers) equal the decoded ones, partners too."""
    cached = data.build(args_for(cache_dir=str(tmp_path / "c"), workers=2, **extra), ds, 1, 0, False)
    plain = data.build(args_for(cache="off", **extra), ds, 1, 0, False)
    assert isinstance(cached[0], data.CachedImageFolder) and not cached[0].device_crops
    cpu = torch.device("cpu")
    for epoch in (0, 1):
        for loader in (cached[2], plain[2]):
            loader.sampler.set_epoch(epoch)
        for a, b in zip(cached[2], plain[2], strict=True):
            a, b = cached[2].dataset.to_device(a, cpu), plain[2].dataset.to_device(b, cpu)
            assert (a.partners is not None) == ("mixup_alpha" in extra) and a.images.shape == (4, 3, 32, 32)
            assert all(x is y is None or torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_gpus_batched_crop_equals_per_image_crops():
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    params = torch.tensor([(0, 0, 0), (8, 3, 1), (5, 8, 0), (8, 8, 1), (0, 7, 1), (3, 0, 0)], dtype=torch.int16)
    want = torch.stack([augment.crop_flip(x, augment.CropFlip(*p), 16, 4) for x, p in zip(images, params.tolist())])
    assert torch.equal(augment.gather_crops(images, params, 16, 4), want)
    assert torch.equal(augment.crop_flip_batch(images, params, 16, 4), want)
    flip_all = torch.tensor([[0, 0, 1]] * 6, dtype=torch.int16)
    assert torch.equal(augment.gather_crops(images, flip_all, 20, 0), images.flip(-1))


def test_cache_holds_only_the_kept_images(ds, tmp_path):
    bad = ds / "train" / "class_01" / "broken.jpg"
    bad.write_bytes((ds / "train" / "class_01" / "000.jpg").read_bytes()[:300])
    train_set, *_ = data.build(args_for(cache_dir=str(tmp_path / "c"), skip_bad_images=True), ds, 1, 0, False)
    assert isinstance(train_set, data.CachedImageFolder) and len(train_set) == 10
    assert all("broken" not in p for p, _ in train_set.samples) and len(train_set.rows()) == 10


@pytest.mark.e2e
def test_batches_from_threads_and_workers(ds, tmp_path):
    train_set, test_set, loader, test_loader = data.build(args_for(cache_dir=str(tmp_path / "c")), ds, 1, 0, False)
    assert isinstance(loader, CachedBatches) and len(loader) == 2
    sampler = TrainSampler(len(train_set), 1, 0, 3)
    one = [b._replace(images=b.images.clone()) for b in CachedBatches(train_set, sampler, 4, threads=1, pin=False)]
    three = [b._replace(images=b.images.clone())
             for b in CachedBatches(train_set, sampler, 4, threads=3, pin=False, depth=1)]
    assert len(one) == len(three) == 2
    assert all(x is y is None or torch.equal(x, y) for a, b in zip(one, three) for x, y in zip(a, b))
    first = next(iter(CachedBatches(train_set, sampler, 4, threads=2, pin=False)))  # left early: no hang, no thread
    assert torch.equal(first.images, one[0].images)
    assert not [t for t in threading.enumerate() if t.name.startswith("fgic-")]
    items = list(DataLoader(test_set, 4, num_workers=2, collate_fn=collate))  # the test split through loader workers
    assert torch.equal(torch.cat([b.images for b in items]), torch.stack([test_set[i].images
                                                                          for i in range(len(test_set))]))
    copy = pickle.loads(pickle.dumps(train_set))  # what a spawned worker gets: the file's name, not its pages
    assert copy.array is None and len(pickle.dumps(train_set)) < 10_000
    assert torch.equal(copy[(0, 3)].images, train_set[(0, 3)].images)


def test_auto_decides_from_the_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(cache, "memory_available", lambda: (10 * 10**9, "MemAvailable"))
    on, why = cache.decide("auto", 5 * 10**9, tmp_path)
    assert on and "cache on: 5.00 GB" in why and "10.0 GB available (MemAvailable)" in why
    on, why = cache.decide("auto", 7 * 10**9, tmp_path)
    assert not on and "exceed 60% of the 10.0 GB" in why
    assert cache.decide("on", 7 * 10**9, tmp_path)[0] and not cache.decide("off", 1, tmp_path)[0]
    monkeypatch.setattr(cache, "memory_available", lambda: (None, "no memory figure found"))
    assert not cache.decide("auto", 1, tmp_path)[0]


def test_memory_figure_is_plausible():
    avail, source = cache.memory_available()
    assert source in ("MemAvailable", "cgroup limit") and 0 < avail


def test_unwritable_cache_dir_is_one_line(ds, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FgicError, match="--cache-dir .*file.*cannot create it"):
        cache.ensure(tmp_path / "file" / "sub", ds, "train", samples(ds), 36, workers=0)
