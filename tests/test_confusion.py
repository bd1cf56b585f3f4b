"""--eval-only's confusion counts (engine.evaluate(confusion=True)): the mistakes as (true, predicted, count), in
memory that grows with the test images, not with the classes squared (800 MB of float64 at iNaturalist's 10,000)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from fgic import engine
from fgic.cluster import Launch
from fgic.dist import Dist

CPU = torch.device("cpu")


class Batches(list):
    """(uint8 images, labels) batches standing in for a loader."""
    dataset = SimpleNamespace(to_device=lambda batch, device: batch)


class TwoRanks(Dist):
    """One process standing for two with the same shard: gather gives its value twice."""

    def gather(self, obj) -> list:
        return [obj, obj]


def evaluated(n: int, batches: int, dist: Dist | None = None):
    torch.manual_seed(n)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, n))
    nn.init.normal_(model[1].bias, std=0.1 if n < 100 else 10.0)  # many classes: spread the predictions out
    loader = Batches((torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8), torch.randint(0, n, (5,)))
                     for _ in range(batches))
    out = engine.evaluate(model, loader, nn.CrossEntropyLoss(), dist or Dist(Launch("single"), CPU), "off", n,
                          confusion=True)
    dense = np.zeros((n, n), np.int64)
    with torch.inference_mode():
        for batch in loader:
            images, labels, _ = engine.inputs(loader, batch, CPU)
            np.add.at(dense, (labels.numpy(), model(images).argmax(1).numpy()), 1)
    return out, dense


def pairs_of(dense: np.ndarray) -> list[tuple[int, int, int]]:
    off = dense.copy()
    np.fill_diagonal(off, 0)
    return sorted(((t, p, int(off[t, p])) for t, p in zip(*np.nonzero(off))), key=lambda c: (-c[2], c[0], c[1]))


def test_confusion_counts_equal_a_dense_count():
    out, dense = evaluated(7, 8)
    assert out["confusion_pairs"] == pairs_of(dense) and len(out["confusion_pairs"]) > 5
    assert out["confusion"] == dense.tolist()  # the whole matrix while it is small
    assert sum(c for _, _, c in out["confusion_pairs"]) == out["test_total"] - out["test_correct"]


def test_confusion_counts_are_summed_over_the_processes():
    out, dense = evaluated(7, 8, TwoRanks(Launch("single"), CPU))
    assert out["confusion_pairs"] == pairs_of(2 * dense)


def test_confusion_at_10000_classes_takes_memory_in_the_images():
    out, dense = evaluated(10_000, 4)
    assert "confusion" not in out
    pairs = out["confusion_pairs"]
    assert isinstance(pairs, list) and 10 < len(pairs) <= 20 and pairs == pairs_of(dense)
