"""--eval-only: the model to score (a checkpoint, or a --weights FILE), checked against how it was trained, and its
eval.json with the pictures."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fgic import checkpoint, config, engine, optim, report, runlog
from fgic.dist import Dist
from fgic.errors import FgicError
from fgic.runlog import RunLog
from fgic.weights import safe_load

# What a model must be scored with as it was trained: its arch and classes, its test transform (sizes, normalisation).
AS_TRAINED = ("arch", "resize", "crop", "mean", "std")


@dataclass(frozen=True)
class Target:
    """The model to score: the file at `path`, given by `flag` (--resume or --weights); `ckpt`, that file loaded when
    it is an fgic checkpoint (None: a state_dict, which the model is built with); the folder its eval.json and
    pictures go to."""
    path: Path
    flag: str
    ckpt: dict | None
    out_dir: Path

    @property
    def source(self) -> str:
        return f"{self.flag} {self.path}"


def target(args: argparse.Namespace, run_dir: Path, classes: list[str]) -> Target:
    """--resume PATH (or the run folder's checkpoint), scored into the run folder; or --weights FILE, into eval-STEM
    beside FILE: an fgic checkpoint as one (its EMA with --model-ema), a state_dict as the model's weights. Refused
    where the flags would score it otherwise than it was trained (AS_TRAINED, the classes of -d)."""
    weights_file = args.weights != "none" and args.weights.split(":")[0] != "imagenet"
    if weights_file and args.resume not in ("auto", "none"):
        raise FgicError(f"--eval-only scores one model: give --resume {args.resume} or --weights {args.weights}, "
                        f"not both")
    if weights_file:
        path, flag = Path(args.weights), "--weights"
        obj = safe_load(path, flag)
        ckpt = obj if isinstance(obj, dict) and {"model", "epoch", "config"} <= obj.keys() else None
        trained = ckpt["config"] if ckpt else runlog.run_config(path)
        out_dir = path.parent / f"eval-{path.stem}"
    else:
        # the file named, even where training would continue the run it started (select): that run is not PATH
        path = checkpoint.select(args.resume, run_dir) if args.resume in ("auto", "none") else \
            checkpoint.named(args.resume)
        if path is None:
            raise FgicError(f"--eval-only: nothing to score (no {runlog.CHECKPOINT} in {run_dir}); give --resume PATH "
                            f"(a checkpoint) or --weights PATH (a state_dict file)")
        own = run_dir / runlog.CHECKPOINT
        if own.is_file() and not own.samefile(path):
            raise FgicError(f"--eval-only --resume {path}: the run folder these flags name, {run_dir}, holds another "
                            f"model ({own}), which its eval.json would be taken for; give another --output-dir")
        ckpt, flag, out_dir = checkpoint.load(path), "--resume", run_dir
        trained = ckpt["config"]
    found = Target(path, flag, ckpt, out_dir)
    if trained is not None:
        check_as_trained(config.completed(trained), args, classes, found.source)
    return found


def check_as_trained(trained: dict, args: argparse.Namespace, classes: list[str], source: str) -> None:
    count = trained.get("num_classes")
    if count is not None and count != len(classes):
        raise FgicError(f"--eval-only {source}: trained for {count} classes, this -d has {len(classes)}; give the -d "
                        f"it was trained on")
    changed = checkpoint.class_change(trained.get("classes"), classes)  # a renamed class shifts every later label
    if changed:
        raise FgicError(f"--eval-only {source}: trained on other classes than this -d's ({changed}); give the -d it "
                        f"was trained on")
    given = vars(args)
    differ = [k for k in AS_TRAINED if trained.get(k) is not None and trained[k] != given[k]]
    if differ:
        theirs = config.as_flags(trained, differ)
        raise FgicError(f"--eval-only {source}: trained with {theirs}, these flags give "
                        f"{config.as_flags(given, differ)}; give {theirs}")


def load(model: nn.Module, opt: optim.Optimization, found: Target) -> tuple[nn.Module, str]:
    """The model to score and its name: the checkpoint's weights loaded into `model` (its EMA's into opt.ema with
    --model-ema), or `model` as built from --weights FILE."""
    path = found.path
    if found.ckpt is None:
        return model, str(path)
    try:
        model.load_state_dict(found.ckpt["model"])
    except RuntimeError as exc:
        raise FgicError(f"--eval-only {found.source}: does not fit the model built from these flags "
                        f"({str(exc).splitlines()[-1].strip()[:160]})") from None
    if opt.ema is None:
        return model, str(path)
    if "model_ema" not in found.ckpt:
        raise FgicError(f"--eval-only --model-ema: {path} holds no EMA weights (trained without --model-ema); "
                        f"give --no-model-ema to evaluate its weights")
    opt.ema.load_state_dict(optim.exact_buffers(found.ckpt["model_ema"], found.ckpt["model"], optim.EMA_PREFIX))
    return opt.ema.module, f"{path} (EMA)"


def evaluate_only(dist: Dist, model: nn.Module, opt: optim.Optimization, found: Target, classes: list[str],
                  test_loader, criterion, amp: str, log: RunLog) -> int:
    """Score the target on the test split; eval.json and its pictures go to log.dir."""
    model, scored = dist.agree(lambda: load(model, opt, found))
    result = engine.evaluate(model, test_loader, criterion, dist, amp, len(classes), confusion=True)
    per_class = {c: 100.0 * k / n if n else None for c, k, n in zip(classes, result["class_correct"],
                                                                      result["class_total"])}
    confusions = sorted(({"true": classes[t], "predicted": classes[p], "count": c} for t, p, c in
                         result["confusion_pairs"]), key=lambda c: (-c["count"], c["true"], c["predicted"]))
    ev = {**{k: result[k] for k in ("acc", "top5", "correct", "total", "loss")}, "per_class_acc": per_class,
          "per_class_total": dict(zip(classes, result["class_total"])), "confusions": confusions, "model": scored}
    log.write("eval.json", ev)
    if dist.is_main:
        written = [log.dir / "eval.json", *report.write_eval_report(log.dir, ev)]
        print(f"fgic: eval of {scored}: top-1 {ev['acc']:.2f}% top-5 {ev['top5']:.2f}% ({ev['correct']}/{ev['total']}) "
              f"-> {', '.join(map(str, written))}")
    return 0
