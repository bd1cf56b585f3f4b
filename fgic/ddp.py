"""Train (or evaluate) with the reference FGVC recipe on 1 process or N: `python -m fgic.ddp -d cub`,
`torchrun --nproc_per_node=4 -m fgic.ddp -d cub`, or one srun task per GPU."""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fgic import agreed, checkpoint, cluster, compiling, config, data, engine, models, optim, runlog, scoring, testhooks
from fgic.cli import run_cli
from fgic.cluster import Launch
from fgic.dist import Dist, pick_device
from fgic.errors import FgicError
from fgic.requeue import requeue
from fgic.runlock import RunLock
from fgic.runlog import RunLog
from fgic.samplers import ORDER, order_of
from fgic.signals import StopRequest

STOP_CHECK_EVERY = 8  # steps between the ranks' agreement on a stop request on GPUs (each one syncs the host)


@dataclass(frozen=True)
class Run:
    """One run, resolved and checked before any process group exists: the flags, the data, this process's place in
    the job and its device, the run folder."""
    args: argparse.Namespace
    dataset: str
    root: Path
    classes: list[str]
    run_dir: Path
    launch: Launch
    device: torch.device

    @property
    def per_process_batch(self) -> int:
        return self.args.batch_size // self.launch.world_size

    def config(self) -> dict:
        """config.json, and what a checkpoint is checked against on resume."""
        launch = self.launch
        return {**vars(self.args), "dataset": self.dataset, "data_path": str(self.root.resolve()),
                "num_classes": len(self.classes), "classes": self.classes, "world_size": launch.world_size,
                "per_process_batch": self.per_process_batch, "launcher": launch.launcher, "cpus": data.usable_cpus(),
                "rendezvous": f"{launch.master_addr}:{launch.master_port}" if launch.world_size > 1 else None,
                "device": str(self.device), "run_dir": str(self.run_dir), "torch": str(torch.__version__),
                "torchvision": str(torchvision.__version__),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}  # whose checkpoint a requeue finds (own_requeued)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    hooks = testhooks.Hooks.read()
    stop = StopRequest(hooks).install()  # from the start: a warning during set-up is acted on at the first step
    run = resolve(argv)
    dist = Dist.start(run.launch, run.device)
    locks = []  # kept outside agree: a peer that fails there must not leave rank 0's lock behind
    try:  # the run folder's lock before its checkpoint is read; --eval-only writes no run folder
        agreed.same_amp(dist, run.args.amp)  # before the run folder, whose name holds it
        if not run.args.eval_only:
            dist.agree(lambda: locks.append(RunLock.take(run.run_dir, dist.is_main)))
        return train(run, dist, stop, locks[0] if locks else RunLock(None), hooks)
    finally:
        for lock in locks:
            lock.release()
        dist.close()


def resolve(argv: list[str]) -> Run:
    """The flags, the launch and the data, checked. These checks fail the same way on every process, so they come
    before the process group exists (and -g's ids before one process per GPU starts)."""
    args = config.parse(argv)
    launch = cluster.detect()
    gpus = cluster.parse_gpus(args.gpu)
    device = pick_device(args.device, gpus, launch.local_rank)
    if launch.kind == "single" and len(gpus) > 1:
        cluster.relaunch_per_gpu(gpus, argv)
    data.check_batch(args.batch_size, launch.world_size)
    models.check_arch(args.arch)
    models.check_input(args.arch, args.crop)
    weights_own = models.normalization(args.arch, args.weights)  # what the flags leave unset
    args.mean, args.std = list(args.mean or weights_own.mean), list(args.std or weights_own.std)
    dataset, root = data.resolve(args.data, args.data_root)
    args.amp = auto_amp(args, dataset, device, launch.rank == 0) if args.amp == "auto" else args.amp  # named in run_dir
    classes = data.check_layout(root)
    if args.workers is None:
        args.workers = data.default_workers(launch.local_world_size, launch.kind)
    return Run(args, dataset, root, classes, config.run_dir(args, dataset), launch, device)


def auto_amp(args: argparse.Namespace, dataset: str, device: torch.device, say: bool) -> str:
    """-a auto's mode: the device's (engine.resolve_amp), unless this is a requeued Slurm job that wrote its checkpoint
    in the other 16-bit mode's run folder, on another kind of GPU: it continues there in that mode rather than starting
    over in a folder of its own. A bf16 run requeued onto a GPU without bfloat16 is refused. `say`: the notice is this
    process's to print."""
    mine = engine.resolve_amp("auto", device)
    if mine == "off":
        return mine
    other = "fp16" if mine == "bf16" else "bf16"
    ours, theirs = (config.run_dir(argparse.Namespace(**{**vars(args), "amp": a}), dataset) for a in (mine, other))
    if checkpoint.own_requeued(theirs) is None:
        return mine
    gpu = torch.cuda.get_device_name(device)
    if other == "bf16":
        raise FgicError(f"-a auto: this requeued job's run {theirs} trains in bf16, which this {gpu} lacks; resubmit "
                        f"it for a GPU with bfloat16 (compute capability 8.0 or later, e.g. sbatch --constraint), or "
                        f"give -a fp16 to start an fp16 run in {ours}")
    if say:
        print(f"fgic: notice: -a auto continues this requeued job's run {theirs} in fp16, the mode it started in (on "
              f"this {gpu} a new run would train in bf16, in {ours})", file=sys.stderr, flush=True)
    return other


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # a few CUDA backward kernels have no such variant


def train(run: Run, dist: Dist, stop: StopRequest, lock: RunLock, hooks: testhooks.Hooks = testhooks.NONE) -> int:
    """The recipe: set-up, resume (or --eval-only's score), the epochs, the summary. `lock`: the run folder's, which
    every write to it checks first."""
    args, run_dir, cfg = run.args, run.run_dir, run.config()
    say = print if dist.is_main else (lambda *a, **k: None)
    seed_everything(args.seed, args.deterministic)
    # What to continue or score, and where the results go: the run folder, or beside --eval-only's --weights FILE.
    if args.eval_only:
        scored = dist.agree(lambda: scoring.target(args, run_dir, run.classes))
        ckpt_path, out_dir = None, scored.out_dir
    else:
        scored, ckpt_path, out_dir = None, dist.agree(lambda: checkpoint.select(args.resume, run_dir)), run_dir
    log = open_log(run, dist, out_dir, lock)

    # Set-up: the model (--eval-only's checkpoint replaces all its weights), the data, the optimization.
    model = build_model(run, dist, "none" if scored and scored.ckpt else args.weights, hooks)
    order = order_of(checkpoint.saved_config(ckpt_path)) if ckpt_path else ORDER  # a resumed run keeps its own
    train_set, test_set, train_loader, test_loader = dist.agree(  # scan, cache: the slowest node is waited for
        lambda: data.build(data.DataSpec.of(args, order), run.root, dist.world_size, dist.rank,
                           pin_memory=dist.device.type == "cuda"))
    images = {"data_files": data.fingerprint(run.root, (train_set, test_set)), "train_images": len(train_set),
              "test_images": len(test_set)}  # checked on resume (checkpoint.differences)
    agreed.same_images(dist, run.root, *images.values())
    cfg.update(images, sample_order=order)
    steps_per_epoch = len(train_loader)  # now, before set_epoch's skip shortens the loader (until the next set_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    opt = dist.agree(lambda: optim.build(model, dist.device, args, steps_per_epoch))  # --layer-decay's arch check
    if scored is not None:
        return scoring.evaluate_only(dist, model, opt, scored, run.classes, test_loader, criterion, args.amp, log)

    # Resume: the run folder's checkpoint (auto), a named one, or none.
    progress = resume(dist, ckpt_path, cfg, model, opt, steps_per_epoch)
    if progress.epoch >= args.epochs:
        last = (runlog.read_records(log.metrics) or [{}])[-1]
        if not (run_dir / "summary.json").is_file() and last.get("epoch") == args.epochs:
            # killed after its last checkpoint, before its summary: both are in the checkpoint and metrics.jsonl
            trained_on = checkpoint.saved_config(ckpt_path).get("world_size", dist.world_size)
            log.summary(run_summary(last, progress, args.epochs, trained_on))
            say(f"fgic: {run_dir}: its summary.json written now, from its last checkpoint and records")
        say(f"fgic: {run_dir} already finished (epoch {args.epochs}/{args.epochs}); nothing to do (--resume none "
            f"starts over, moving this run aside to {run_dir.name}.old-N)")
        return 0
    # An earlier run in the folder is kept whole as RUN_DIR.old-N unless this continues it (its own checkpoint)
    own = ckpt_path is not None and ckpt_path.resolve() == (run_dir / runlog.CHECKPOINT).resolve()
    moved = None if own else dist.agree(log.set_aside)
    say(*start_lines(run, dist, ckpt_path, progress, moved, len(train_set), len(test_set)), sep="\n")
    dist.agree(lambda: log.start(cfg, progress.epoch))  # a damaged metrics.jsonl stops every rank with one line
    # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, not in a copy beside them (the same
    # arithmetic; one gradient's worth of memory less: regnet_y_128gf 9.1 -> 8.0 GiB a process on the CPU)
    cuda = dist.device.type == "cuda"
    # --compile compiles the model with its loss, DDP's wrapper included: dynamo's DDPOptimizer then splits the graph
    # at DDP's bucket boundaries, so each bucket's all-reduce starts while the backward goes on (compiling the inner
    # model would hand DDP every gradient at the end of one backward graph). Its crash on N processes ("'float' object
    # has no attribute 'target'") came from AllReduceBatchNorm's .item(): the graph after that break held round() of
    # a float constant, which the splitter took for a node. The BatchNorm reads nothing to the host now.
    step_model = engine.WithLoss(model, criterion) if args.compile else model
    ddp_model = (DistributedDataParallel(step_model, device_ids=[dist.device.index] if cuda else None,
                                         gradient_as_bucket_view=True) if dist.distributed else step_model)
    if args.compile:  # the same decision on every rank: a compiler that fails leaves the run eager (one warning)
        ddp_model = compiling.compiled(ddp_model, dist, args.compile_mode, run_dir, args.cache_dir)
    every = STOP_CHECK_EVERY if cuda else 1
    started = time.perf_counter() - progress.wall_seconds  # the run's wall time counts its earlier sessions
    saves = Checkpoints(dist, run_dir, cfg, model, opt, lock, hooks)
    saves.write(progress, "the trial checkpoint write", trial=True)  # a full disk is said now, not after an epoch

    # The epochs: train, score the model (and its EMA), record, checkpoint; a stop signal leaves with a checkpoint.
    for epoch in range(progress.epoch, args.epochs):
        t0 = time.perf_counter()
        first_step = progress.step if epoch == progress.epoch else 0
        lr = opt.lr_at(epoch * steps_per_epoch)
        train_loader.sampler.set_epoch(epoch, skip=first_step * run.per_process_batch)
        tr = engine.train_one_epoch(ddp_model, train_loader, opt, criterion, dist, args.amp,
                                    desc=f"epoch {epoch + 1}/{args.epochs}", start_step=first_step,
                                    totals=progress.totals_of(dist.rank, dist.world_size),
                                    stop=lambda step: step % every == 0 and stop.agree(dist.max),
                                    later_steps=(args.epochs - epoch - 1) * steps_per_epoch)
        if tr.stopped_at is not None:  # a stop signal: checkpoint this step boundary and leave
            saves.write(replace(progress, epoch=epoch, step=tr.stopped_at, totals=dist.gather(tr.totals),
                                wall_seconds=time.perf_counter() - started), "the checkpoint write")
            return preempted(dist, stop, log, f"epoch {epoch + 1}, step {tr.stopped_at}")
        opt.after_epoch()
        te = engine.evaluate(model, test_loader, criterion, dist, args.amp, len(run.classes))
        seconds = time.perf_counter() - t0
        ema = (engine.evaluate(opt.ema.module, test_loader, criterion, dist, args.amp, len(run.classes), "test ema")
               if opt.ema is not None else None)
        record = epoch_record(epoch + 1, lr, seconds, tr.metrics, te, ema)
        if args.compile:
            record["compiled"] = ddp_model.compiled  # what ran: see fgic.compiling
        dist.agree(lambda: log.epoch(record), during="the epoch's records")  # a lost lock stops every rank
        progress, bests = progress.after_epoch(epoch + 1, te["acc"], ema and ema["acc"], time.perf_counter() - started)
        saves.write(progress, "the checkpoint writes", bests)
        log.checkpointed(record)
        dist.barrier()  # the others wait for rank 0's saves here, patiently, not in the next epoch's collectives
        say(epoch_line(record, args.epochs), flush=True)
        # A signal during the evaluation or the saves (a large test set, a slow file system) is acted on here, with
        # the checkpoint just written, not after the next epoch's first step: Slurm's SIGKILL follows its SIGTERM
        # after KillWait (30 s by default; 15 s on the test cluster).
        if epoch + 1 < args.epochs and stop.agree(dist.max):
            return preempted(dist, stop, log, f"the end of epoch {epoch + 1}")

    summary = run_summary(record, progress, args.epochs, dist.world_size)
    log.summary(summary)
    log.close()
    say(f"fgic: done. final top-1 {summary['final_test_acc']:.2f}% (last epoch); best {summary['best_test_acc']:.2f}% "
        f"at epoch {summary['best_epoch']} (selected on the test set); {run_dir}")
    del ddp_model  # before the process group goes (see Dist.close)
    return 0


def resume(dist: Dist, ckpt_path: Path | None, cfg: dict, model: nn.Module, opt: optim.Optimization,
           steps_per_epoch: int) -> checkpoint.Progress:
    """The checkpoint at `ckpt_path` loaded into the model and `opt` once checked against this run's `cfg`, and where
    it stands; a fresh start without one."""
    if ckpt_path is None:
        return checkpoint.Progress()
    progress = checkpoint.restore(dist.agree(lambda: checkpoint.load(ckpt_path)), ckpt_path, cfg, model, opt)
    opt.steps = progress.epoch * steps_per_epoch + progress.step
    return progress


def open_log(run: Run, dist: Dist, out_dir: Path, lock: RunLock) -> RunLog:
    """The run's records in `out_dir`, with TensorBoard and W&B as the flags say. An unwritable folder is said before
    any set-up work; the folder itself appears once the checks have passed."""
    args = run.args
    wandb = (dict(project=args.wandb_project, entity=args.wandb_entity, group=args.wandb_group,
                  name=f"{run.dataset}/{run.run_dir.name}") if args.wandb else None)
    log = RunLog(out_dir, dist.is_main, tensorboard=args.tensorboard, wandb=wandb, lock=lock)
    dist.agree(lambda: log.make_dir("--output-dir" if out_dir == run.run_dir else "--eval-only --weights"))
    return log


def build_model(run: Run, dist: Dist, weights: str, hooks: testhooks.Hooks) -> nn.Module:
    """The model on this process's device, -a checked there. The same seed on every rank gives the same initial
    weights (DDP broadcasts rank 0's anyway)."""
    args = run.args
    model = dist.agree(lambda: models.build(args.arch, len(run.classes), weights, crop=args.crop,
                                            keyed_drop=not hooks.torch_drop, stochastic_depth=args.stochastic_depth,
                                            dropout=args.dropout, new_head=not args.eval_only))
    model = models.sync_batchnorm(model, dist.device, dist.distributed, same_code=args.deterministic).to(dist.device)
    if dist.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        engine.check_amp(args.amp, dist.device)
    return model


def start_lines(run: Run, dist: Dist, ckpt_path: Path | None, progress: checkpoint.Progress, moved: Path | None,
                train_images: int, test_images: int) -> list[str]:
    """What a run says as it starts training: where it starts (over, an earlier run moved aside to `moved`; or resumed
    from `ckpt_path`), its folder, and what it trains on what."""
    args, run_dir = run.args, run.run_dir
    where = [f"fgic: {'starting over' if ckpt_path is None else 'a new run'}: the earlier run in {run_dir} moved to "
             f"{moved}"] if moved is not None else []
    if ckpt_path is not None and args.resume == "none":
        where = [f"fgic: notice: --resume none, but this is restart {os.environ.get('SLURM_RESTART_COUNT')} of Slurm "
                 f"job {os.environ.get('SLURM_JOB_ID')} and {ckpt_path} is its own: resuming it at epoch "
                 f"{progress.epoch + 1}, step {progress.step} (the job's first start began the run over)"]
    elif ckpt_path is not None:
        where.append(f"fgic: resuming {ckpt_path} at epoch {progress.epoch + 1}, step {progress.step}")
    imagenet = [args.mean, args.std] == [list(config.IMAGENET_MEAN), list(config.IMAGENET_STD)]
    inputs = "" if imagenet else f", inputs normalised by {config.as_flags(vars(args), ('mean', 'std'))}"
    return [*where, f"fgic: run folder {run_dir}",
            f"fgic: {run.dataset} {train_images} train / {test_images} test images, {len(run.classes)} classes; "
            f"{args.arch} on {dist.world_size} x {dist.device.type}, batch {args.batch_size} "
            f"({run.per_process_batch} per process), lr {args.lr:g}, amp {args.amp}{inputs}"]


@dataclass(frozen=True)
class Checkpoints:
    """A run's checkpoint.pt and best models, written by rank 0. Every rank calls `write` (in dist.agree), so that a
    full disk stops all of them with rank 0's one line."""
    dist: Dist
    run_dir: Path
    config: dict
    model: nn.Module
    opt: optim.Optimization
    lock: RunLock
    hooks: testhooks.Hooks

    def write(self, progress: checkpoint.Progress, during: str, bests: Iterable[str] = (), trial: bool = False) -> None:
        """The best models named in `bests` ("best": the model, "best_ema": its EMA), then the checkpoint of
        `progress`. `trial`: a trial write of the real state (checkpoint.save_atomic), so that a full disk or quota
        is said before an epoch of training, not after it (statvfs would not show a quota)."""
        def save() -> None:
            if not self.dist.is_main:
                return
            self.lock.check()
            for best in bests:
                module, name = (self.model, runlog.BEST) if best == "best" else (self.opt.ema.module, runlog.BEST_EMA)
                checkpoint.save_atomic(module.state_dict(), self.run_dir / name)
            checkpoint.save_atomic(checkpoint.state(self.model, self.opt, progress, self.config),
                                   self.run_dir / runlog.CHECKPOINT, trial=trial, hooks=self.hooks)
        self.dist.agree(save, during=during)


def named(prefix: str, metrics: dict, *keys: str) -> dict:
    """`keys` of engine's unprefixed `metrics`, in that order, named as the records name them: prefix + key."""
    return {f"{prefix}{k}": metrics[k] for k in keys}


def epoch_record(epoch: int, lr: float, seconds: float, train: dict, test: dict, ema: dict | None) -> dict:
    """metrics.jsonl's record of an epoch (from 1): the one place engine's metrics get their names (train_, test_,
    ema_test_). `seconds`: the epoch's training and the model's evaluation."""
    record = {"epoch": epoch, "lr": lr, **named("train_", train, "loss", "acc"),
              **named("test_", test, "loss", "acc", "top5", "correct", "total"), "epoch_seconds": seconds,
              **named("train_", train, "images_per_second")}
    return record if ema is None else {**record, **named("ema_test_", ema, "loss", "acc", "top5", "correct")}


def epoch_line(r: dict, epochs: int) -> str:
    """The line an epoch's record is said in."""
    ema = f"  |  EMA acc {r['ema_test_acc']:.2f}%" if "ema_test_acc" in r else ""
    return (f"epoch {r['epoch']}/{epochs}  lr {r['lr']:.4g}  train loss {r['train_loss']:.3f} acc "
            f"{r['train_acc']:.2f}%  |  test loss {r['test_loss']:.3f} acc {r['test_acc']:.2f}% top5 "
            f"{r['test_top5']:.2f}% ({r['test_correct']}/{r['test_total']}){ema}"
            f"  |  {r['epoch_seconds']:.1f} s, {r['train_images_per_second']:.0f} img/s")


def run_summary(last: dict, progress: checkpoint.Progress, epochs: int, world_size: int) -> dict:
    """summary.json: the `last` epoch's record's test accuracy and the best so far, the EMA model's too."""
    summary = {"final_test_acc": last["test_acc"], "best_test_acc": progress.best["acc"],
               "best_epoch": progress.best["epoch"], "epochs": epochs, "test_total": last["test_total"],
               "world_size": world_size, "wall_seconds": progress.wall_seconds}
    if "ema_test_acc" in last:
        summary.update(ema_final_test_acc=last["ema_test_acc"], ema_best_test_acc=progress.best_ema["acc"],
                       ema_best_epoch=progress.best_ema["epoch"])
    return summary


def preempted(dist: Dist, stop: StopRequest, log: RunLog, where: str) -> int:
    """After the stop checkpoint: say so, requeue a Slurm job (rank 0; not after Ctrl-C), and leave with the stop's
    exit code (EXIT_PREEMPTED, 130 after Ctrl-C), all ranks together once rank 0 is done: torchrun and `srun
    --kill-on-bad-exit` end the other processes when one exits, and rank 0 could then be killed mid-checkpoint or
    mid-requeue."""
    if dist.is_main:
        print(f"fgic: stopped by {signal.Signals(stop.signum).name} at {where}; checkpoint written, resume with the "
              f"same command; {log.dir}", file=sys.stderr, flush=True)
        log.close(preempted=True)  # before the requeue, which ends the step (wandb-core too) with a SIGTERM
        if stop.requeue:  # not after Ctrl-C
            print(f"fgic: {requeue()}", file=sys.stderr, flush=True)
    dist.barrier()
    stop.done()
    return stop.exit_code


def cli() -> None:
    run_cli(main, "fgic.ddp")


if __name__ == "__main__":
    cli()
