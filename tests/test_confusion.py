"""--eval-only's confusion counts (engine.evaluate(confusion=True)): the mistakes as (true, predicted, count), in
memory that grows with the test images, not with the classes squared (800 MB of float64 at iNaturalist's 10,000)."""
from __future__ import annotations

import resource
from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from fgic import augment, engine
from fgic.batch import Batch
from fgic.cluster import Launch
from fgic.dist import Dist

CPU = torch.device("cpu")


class Batches(list):
    """Batch(uint8 images, labels) batches standing in for a loader."""
    dataset = SimpleNamespace(to_device=lambda batch, device: batch, normalization=augment.IMAGENET)


class TwoRanks(Dist):
    """One process standing for two with the same shard: gather gives its value twice."""

    def gather(self, obj) -> list:
        return [obj, obj]


def evaluated(n: int, batches: int, dist: Dist | None = None):
    torch.manual_seed(n)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, n))
    nn.init.normal_(model[1].bias, std=0.1 if n < 100 else 10.0)  # many classes: spread the predictions out
    loader = Batches(Batch(torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8), torch.randint(0, n, (5,)))
                     for _ in range(batches))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = engine.evaluate(model, loader, nn.CrossEntropyLoss(), dist or Dist(Launch("single"), CPU), "off", n,
                          confusion=True)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024
    cells = Counter()
    with torch.inference_mode():
        for batch in loader:
            batch = engine.inputs(loader, batch, CPU)
            images, labels = batch.images, batch.labels
            cells.update(zip(labels.tolist(), model(images).argmax(1).tolist()))
    return out, cells, grown


def pairs_of(cells: Counter, times: int = 1) -> list[tuple[int, int, int]]:
    return sorted(((t, p, c * times) for (t, p), c in cells.items() if t != p), key=lambda c: (-c[2], c[0], c[1]))


def test_confusion_counts_equal_a_dense_count():
    out, cells, _ = evaluated(7, 8)
    assert out["confusion_pairs"] == pairs_of(cells) and len(out["confusion_pairs"]) > 5
    dense = np.zeros((7, 7), np.int64)
    np.add.at(dense, tuple(np.array(list(cells.elements())).T), 1)
    assert [(t, p, dense[t, p]) for t, p, _ in out["confusion_pairs"]] == out["confusion_pairs"]
    assert dense.diagonal().tolist() == out["class_correct"]
    assert sum(c for _, _, c in out["confusion_pairs"]) == out["total"] - out["correct"]


def test_confusion_counts_are_summed_over_the_processes():
    out, cells, _ = evaluated(7, 8, TwoRanks(Launch("single"), CPU))
    assert out["confusion_pairs"] == pairs_of(cells, times=2)


def test_confusion_at_10000_classes_takes_memory_in_the_images():
    out, cells, grown = evaluated(10_000, 4)
    assert "confusion" not in out
    pairs = out["confusion_pairs"]
    assert isinstance(pairs, list) and 10 < len(pairs) <= 20 and pairs == pairs_of(cells)
    assert grown < 200e6  # the peak memory; the n x n float64 tensor alone took 800 MB, its list 2.2 GB more
