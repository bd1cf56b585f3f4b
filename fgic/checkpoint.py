"""Checkpoints: atomic saving, safe loading, which checkpoint to resume from, and whether it fits this run's config."""
from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fgic import testhooks
from fgic.config import MEANING, as_flags, completed
from fgic.errors import FgicError
from fgic.runlog import CHECKPOINT
from fgic.weights import safe_load


def save_atomic(obj, path: str | os.PathLike, trial: bool = False, hooks: testhooks.Hooks = testhooks.NONE) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a kill at any moment leaves either
    the previous file or the new one, never a torn one. A full disk or quota is one line (FgicError) naming the file
    and the room the write needs. `trial`: the temporary file is written and removed (whether the write fits, before
    the work that it would save is done). `hooks`: fgic.testhooks' (a stalled overwrite)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if trial:
            return
        hooks.stall_overwrite(path)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save: RuntimeError "unexpected pos", the OSError its context
        full = _full(exc)
        if full is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise FgicError(f"{path}: {'a trial write before training: ' if trial else ''}{full.strerror}; {kept}; the "
                        f"write needs about {_mb(_nbytes(obj))} free beside the files there (the old file and the new "
                        f"one exist at once until the new one replaces it), {_mb(shutil.disk_usage(path.parent).free)} "
                        f"is free; free space (or raise the quota) or move the run folder, then run the same command "
                        f"to resume") from None
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(fd)
    finally:
        os.close(fd)


def _full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC or EDQUOT OSError in an exception's chain, if any."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _nbytes(obj) -> int:
    """The bytes of the tensors in a (nested) checkpoint: its file's size, less a little."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def select(resume: str, run_dir: Path, env: os._Environ | dict = os.environ) -> Path | None:
    """--resume auto: the run folder's checkpoint if there is one; none: start over (but see `own_requeued`); else the
    named file."""
    if resume == "none":
        return own_requeued(run_dir, env)
    if resume == "auto":
        path = run_dir / CHECKPOINT
        return path if path.is_file() else None
    path = named(resume)
    own = run_dir / CHECKPOINT
    if own.is_file() and not own.samefile(path) and continues(own, path):
        return own  # the same command again (a requeue, a stopped run): the run's own progress, not PATH's
    return path


def named(resume: str) -> Path:
    """--resume PATH's file, which must be there."""
    path = Path(resume)
    if not path.is_file():
        raise FgicError(f"--resume {resume}: no such file; give a checkpoint.pt, or auto or none")
    return path


def continues(own: Path, path: Path) -> bool:
    """Whether the checkpoint `own` is of a run that started from `path` (its --resume named that file)."""
    started = saved_config(own).get("resume")
    return isinstance(started, str) and Path(started).is_file() and Path(started).samefile(path)


def saved_config(path: Path) -> dict:
    """A checkpoint's config, read with mmap (not its weights); {} for a file that is not a readable fgic checkpoint
    (fgic.ddp's own load of it says why)."""
    try:
        config = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
    except Exception:  # noqa: BLE001  (any damage: torch raises several kinds)
        return {}
    return config if isinstance(config, dict) else {}


def own_requeued(run_dir: Path, env: os._Environ | dict = os.environ) -> Path | None:
    """--resume none in a requeued Slurm job (SLURM_RESTART_COUNT > 0; a batch script or FGIC_ARGS repeats its flags
    on every restart): the run folder's checkpoint when this job wrote it (its config's slurm_job_id), so that the
    run starts over once, not on every requeue."""
    job = env.get("SLURM_JOB_ID")
    path = run_dir / CHECKPOINT
    if not job or int(env.get("SLURM_RESTART_COUNT") or 0) < 1 or not path.is_file():
        return None
    return path if saved_config(path).get("slurm_job_id") == job else None


def load(path: Path) -> dict:
    ckpt = safe_load(path, "--resume")
    if not isinstance(ckpt, dict) or not {"model", "epoch", "config"} <= ckpt.keys():
        raise FgicError(f"--resume {path}: not an fgic checkpoint (needs model, epoch and config entries)")
    return ckpt


def differences(saved: dict, current: dict) -> list[str]:
    """The meaning-changing options whose values differ, as 'option: saved -> current'."""
    saved, current = completed(saved), completed(current)
    diff = [f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {current.get(k)!r}"
            for k in MEANING if saved.get(k) != current.get(k)]
    # The dataset's name and class count may match another dataset's (a folder of the same name): its classes tell
    # (a checkpoint from before they were kept has none)
    changed = class_change(saved.get("classes"), current.get("classes"))
    diff += [f"-d's classes: {changed}"] if changed else []
    # The images (data.fingerprint: relative paths, sizes, labels; a checkpoint from before it has none): moving the
    # data resumes, other images (a copy still syncing on the requeue's node, --skip-bad-images dropping others) do not
    if saved.get("data_files") and current.get("data_files") and saved["data_files"] != current["data_files"]:
        counts = [f"{c.get('train_images')} train / {c.get('test_images')} test" for c in (saved, current)]
        diff.append(f"-d's images: other files ({counts[0]} then, {counts[1]} now)")
    return diff


def class_change(saved, current) -> str | None:
    """The first class that differs between two class lists, as "'saved' -> 'current'"; None when they are alike or
    one is unknown (a config from before the lists were kept)."""
    if not (isinstance(saved, list) and isinstance(current, list)) or saved == current:
        return None
    first = next((a, b) for a, b in itertools.zip_longest(saved, current) if a != b)
    return f"{first[0]!r} -> {first[1]!r}"


@dataclass
class Progress:
    """Where a run stands: finished epochs, steps done inside the next one, the running training totals of each
    rank for that epoch (loss sum, correct, images), the best test accuracy so far (and the EMA model's), and the
    time spent."""
    epoch: int = 0
    step: int = 0
    totals: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"acc": -1.0, "epoch": 0})
    wall_seconds: float = 0.0
    best_ema: dict = field(default_factory=lambda: {"acc": -1.0, "epoch": 0})

    def totals_of(self, rank: int, world_size: int) -> list[float] | None:
        """This rank's running totals. Resumed on another world size, rank 0 carries the sum of all of them (the
        reported train metrics then match an uninterrupted run up to rounding, not bitwise)."""
        if not self.totals:
            return None
        if len(self.totals) == world_size:
            return self.totals[rank]
        return [sum(col) for col in zip(*self.totals)] if rank == 0 else None

    def after_epoch(self, epoch: int, acc: float, ema_acc: float | None,
                    wall_seconds: float) -> tuple[Progress, list[str]]:
        """Where the run stands once epoch `epoch` (from 1) has scored `acc` (its EMA model `ema_acc`, None without
        one), and which bests, "best" and "best_ema", that epoch now is: a higher accuracy than the best so far (a
        tie keeps the earlier epoch)."""
        bests = {"best": self.best, "best_ema": self.best_ema}
        new = {name: {"acc": a, "epoch": epoch} for name, a in (("best", acc), ("best_ema", ema_acc))
               if a is not None and a > bests[name]["acc"]}
        return Progress(epoch, 0, [], wall_seconds=wall_seconds, **{**bests, **new}), list(new)


def state(model, opt, progress: Progress, config: dict) -> dict:
    """Everything needed to continue exactly, in types that torch.load(weights_only=True) accepts. `opt` is the
    run's optim.Optimization (optimizer, scheduler, scaler, EMA)."""
    return {"model": model.state_dict(), **opt.state_dict(), "epoch": progress.epoch, "step": progress.step,
            "train_totals": progress.totals, "best": progress.best, "best_ema": progress.best_ema,
            "wall_seconds": progress.wall_seconds, "rng": rng_state(), "config": config}


def restore(ckpt: dict, path: Path, config: dict, model, opt) -> Progress:
    """Load a checkpoint into the run's objects after checking it was made with the same meaning-changing options."""
    diff = differences(ckpt["config"], config)
    if diff:
        saved = completed(ckpt["config"])
        # --mean/--std default to the weights' own, which a run from before them may not have had: name its values
        keep = (f"; {as_flags(saved, ('mean', 'std'))} continues it" if [saved["mean"], saved["std"]] !=
                [config.get("mean"), config.get("std")] else "")
        raise FgicError(f"--resume {path}: made with other options ({'; '.join(diff)}); --resume none starts over "
                        f"(the run folder's earlier run is moved aside), or give another --note / --output-dir{keep}")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt)
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return Progress(ckpt["epoch"], ckpt.get("step", 0), ckpt.get("train_totals") or [], ckpt["best"],
                    ckpt.get("wall_seconds", 0.0), ckpt.get("best_ema") or Progress().best_ema)


def rng_state() -> dict:
    """The global generators (every rank seeds them alike, so rank 0's stand for all)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
