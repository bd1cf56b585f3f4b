"""The run folder's record files (config.json, metrics.jsonl, train_log.csv, summary.json, eval.json): written by rank
0, read back checked (a damaged file is a one-line error naming it)."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from fgic import tblog
from fgic.errors import FgicError
from fgic.jsonfile import read_object, read_text, write_json
from fgic.runlock import RunLock, unwritable
from fgic.wandb_log import WandbRun

CHECKPOINT = "checkpoint.pt"  # the run folder's latest state (fgic.checkpoint writes it; fgic.report looks for it)
BEST = "best.pt"  # the model of the best epoch
BEST_EMA = "best_ema.pt"  # the EMA model of its best epoch (--model-ema)
CSV_COLUMNS = ("Epoch", "lr", "Train_Loss", "Train_Acc", "Test_Acc")  # the seed train.py's log


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records (RunLog.epoch appends them), naming a line that is not a JSON object."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FgicError(f"{path}: line {number} is not valid JSON ({exc.msg}); fix or remove the line") from None
        if not isinstance(record, dict):
            raise FgicError(f"{path}: line {number} is not a JSON object; fix or remove the line")
        records.append(record)
    return records


class RunLog:
    """Appends one record per finished epoch, to the files and to TensorBoard and W&B where asked; every method is a
    no-op on ranks other than 0. `wandb`: WandbRun.open's keyword arguments (project, entity, group, name), or None.
    `lock`: the run folder's (fgic.runlock), checked before each write that changes what the folder holds."""

    def __init__(self, run_dir: Path, is_main: bool, tensorboard: bool = False, wandb: dict | None = None,
                 lock: RunLock | None = None):
        self.dir, self.is_main, self.tensorboard, self.tb = run_dir, is_main, tensorboard, None
        self.lock = lock or RunLock(None)
        self.wandb, self.wb = wandb, None
        self.metrics, self.csv = run_dir / "metrics.jsonl", run_dir / "train_log.csv"

    def make_dir(self, flag: str = "--output-dir") -> None:
        """Say in one line (rank 0) why the run folder cannot be created or written, before any set-up work. The
        folders made for the check are removed again: the run folder appears when the run starts (`start`), so a
        start that fails its checks leaves nothing behind."""
        if not self.is_main:
            return
        made = [p for p in (self.dir, *self.dir.parents) if not p.exists()]  # deepest first
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise unwritable(self.dir, exc, flag) from None
        finally:
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:  # not made after all, or another run's files are in it now
                    pass

    def set_aside(self) -> Path | None:
        """Starting over (rank 0, before anything is written): an earlier run in the folder is renamed to
        RUN_DIR.old-N (N the first free), kept whole rather than partly overwritten. Returns where it went."""
        if not self.is_main or not self.dir.is_dir() or not any(self.dir.iterdir()):
            return None
        self.lock.check()
        n = 1
        while (old := self.dir.with_name(f"{self.dir.name}.old-{n}")).exists():
            n += 1
        try:
            self.dir.rename(old)
        except OSError as exc:
            raise FgicError(f"--resume none: cannot move the earlier run {self.dir} aside to {old} "
                            f"({exc.strerror or exc}); move or delete it yourself") from None
        return old

    def start(self, config: dict, done_epochs: int) -> None:
        """Write config.json and keep only the records of the epochs the starting point has (all of them when
        resuming, none when starting over), so a record written after the last checkpoint is not repeated. A
        summary.json of an earlier attempt goes: the run is unfinished until this one writes its own."""
        if not self.is_main:
            return
        self.lock.check()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "config.json", config)
        (self.dir / "summary.json").unlink(missing_ok=True)
        kept = [r for r in read_records(self.metrics) if isinstance(r.get("epoch"), int) and r["epoch"] <= done_epochs]
        lost = sorted(set(range(1, done_epochs + 1)) - {r["epoch"] for r in kept})
        if lost:
            print(f"fgic: warning: {self.metrics} lacks the records of epoch(s) {', '.join(map(str, lost))}, which "
                  f"the checkpoint has (lost in a crash before the record was fsynced?); their metrics are gone, and "
                  f"fgic.report counts the run as unfinished; --resume none retrains it whole", file=sys.stderr,
                  flush=True)
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        with open(self.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(_csv_row(r) for r in kept)
        if self.tensorboard:
            self.tb = tblog.open_writer(self.dir, done_epochs)
        if self.wandb is not None:
            shown = {k: v for k, v in config.items() if k != "classes"}  # the class names: in config.json
            self.wb = WandbRun.open(self.dir, shown, done_epochs, kept, **self.wandb)

    def epoch(self, record: dict) -> None:
        if not self.is_main:
            return
        self.lock.check()
        # fsynced: the epoch's checkpoint comes next, and a node crash must not keep it while losing its record (the
        # resume would go on past the epoch, and fgic.report would call the run unfinished)
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow(_csv_row(record))
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            tblog.write(self.tb, record)

    def checkpointed(self, record: dict) -> None:
        """W&B gets an epoch once its checkpoint is written: what W&B has is never ahead of where a resume starts
        (an epoch it has is never redone), and an epoch it misses is caught up from metrics.jsonl on resume."""
        if self.wb is not None:
            self.wb.epoch(record)

    def write(self, name: str, obj: dict) -> None:
        if self.is_main:
            self.lock.check()
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / name, obj)

    def summary(self, summary: dict) -> None:
        """summary.json, and W&B's summary."""
        self.write("summary.json", summary)
        if self.wb is not None:
            self.wb.summary(summary)

    def close(self, preempted: bool = False) -> None:
        """The end of this attempt: a preempted one marks the W&B run preempting (its requeue continues it)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wb is not None:
            self.wb.finish(preempted)
            self.wb = None


def _csv_row(r: dict) -> list:
    return [r["epoch"], f"{r['lr']:.6g}", f"{r['train_loss']:.4f}", f"{r['train_acc']:.2f}", f"{r['test_acc']:.2f}"]


def run_config(weights: Path) -> dict | None:
    """The config.json of the fgic run a weights file was saved in; None where there is none (a file from
    elsewhere, whose folder may hold another program's config.json)."""
    path = Path(weights).parent / "config.json"
    try:
        found = read_object(path) if path.is_file() else None
    except FgicError:
        return None
    return found if found is not None and all(k in found for k in ("arch", "num_classes")) else None
