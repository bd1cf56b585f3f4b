"""Optional TensorBoard scalars of each finished epoch in RUN_DIR/tb (--tensorboard; needs the tensorboard package)."""
from __future__ import annotations

import sys
from pathlib import Path

# TensorBoard tag -> metrics.jsonl key
SCALARS = {"train/loss": "train_loss", "train/acc": "train_acc", "test/loss": "test_loss", "test/acc": "test_acc",
           "test/top5": "test_top5", "lr": "lr", "test_ema/loss": "ema_test_loss", "test_ema/acc": "ema_test_acc",
           "test_ema/top5": "ema_test_top5"}


def open_writer(run_dir: Path, done_epochs: int):
    """A SummaryWriter on RUN_DIR/tb, or None (with a one-line notice) when tensorboard cannot be imported. On
    resume, events of the epochs after the starting point are dropped (purge_step), so none is shown twice (from
    inside epoch 1 too: an attempt killed after writing epoch 1, before its checkpoint, left its events)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (tensorboard: an optional extra)
    except Exception as exc:  # ImportError, or a tensorboard/protobuf mismatch that fails while importing
        print(f"fgic: notice: --tensorboard: tensorboard is not usable ({str(exc).splitlines()[0][:100]}); "
              f"`pip install tensorboard` to get it; continuing without it", file=sys.stderr, flush=True)
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=done_epochs + 1)


def write(writer, record: dict) -> None:
    for tag, key in SCALARS.items():
        if key in record:
            writer.add_scalar(tag, record[key], record["epoch"])
    writer.flush()  # each epoch is on disk at once, also for a run that is later killed
