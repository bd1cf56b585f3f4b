"""`python -m launch.submitit --datasets cub cars --seeds 0 1 2 [--amps off bf16] [--sweep lr=0.05,0.1]... [fgic.ddp
flags]`: a sweep as one submitit job array.

One job per dataset x seed x AMP mode x value of each --sweep flag (fgic.sweep: the grid, the run folders' names),
each running fgic.ddp (one task per GPU, or --tasks-per-node on CPUs). On
Slurm's warning signal fgic checkpoints at a step boundary, then submitit requeues the job and the restart resumes
from the run folder (--resume auto). `--cluster local|debug` runs the same without Slurm, `--dry-run` only prints.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import submitit
import torch

from fgic import config, ddp, requeue, sweep
from fgic.cli import run_cli
from fgic.errors import FgicError
from fgic.signals import EXIT_PREEMPTED, term_held


def launcher_parser(add_help: bool) -> argparse.ArgumentParser:
    """The sweep's and the cluster's own flags (every other flag is fgic.ddp's)."""
    p = argparse.ArgumentParser(add_help=add_help, allow_abbrev=False)
    g = p.add_argument_group("sweep (launch.submitit)")
    g.add_argument("--datasets", nargs="+", metavar="NAME|PATH", help="datasets to sweep (default: -d's)")
    g.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds to sweep (default: --seed's)")
    g.add_argument("--amps", nargs="+", metavar="MODE", help="AMP modes to sweep (default: --amp's; auto is bf16 with "
                                                              "--gpus-per-node, off without, with --device cpu, or "
                                                              "for a local job where torch has no CUDA)")
    g.add_argument("--sweep", action="append", default=[], metavar="FLAG=V1,V2",
                   help="sweep any other fgic.ddp flag too, e.g. lr=0.05,0.1 or arch=resnet50,vit_b_16 (repeat for a "
                        "grid; switches as compile=on,off); values outside the run name's arch, amp and seed go into "
                        "its note: runs/cub/resnet50-off-s0-lr0.05")
    g.add_argument("--dry-run", action="store_true", help="print the jobs that would be submitted and stop")
    g.add_argument("--wait", action="store_true", help="wait for the jobs and print how each ended")
    g = p.add_argument_group("cluster (launch.submitit)")
    g.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                   help="auto: Slurm when srun is on PATH, else local processes; debug: in this process")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one process each (default 0: CPU)")
    g.add_argument("--tasks-per-node", type=int, help="processes per node (default: --gpus-per-node, at least 1)")
    g.add_argument("--cpus-per-task", type=int,
                   help="CPUs per process (default with GPUs: the node's CPUs per GPU times the GPUs per process, "
                        "the fewest among the partition's nodes, from sinfo; without GPUs Slurm's default, 1)")
    g.add_argument("--mem-gb", type=float, help="memory per node")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--constraint", help="Slurm constraint, e.g. a GPU type")
    g.add_argument("--timeout", type=int, default=24 * 60, metavar="MIN", help="time limit per job (default 1440)")
    g.add_argument("--max-parallel", type=int, default=64, help="array jobs running at once")
    g.add_argument("--max-timeouts", type=int, default=10, help="how often a job may time out and be requeued")
    g.add_argument("--logs", help="submitit's folder (default: OUTPUT_DIR/submitit)")
    return p


def get_args_parser() -> argparse.ArgumentParser:
    """fgic.ddp's parser as the parent, the launcher's flags beside it: the plural flags sweep, -d/--seed/--amp
    give the value when their plural is absent."""
    return config.Parser("launch.submitit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                         parents=[config.get_args_parser(add_help=False), launcher_parser(add_help=False)])


class Train(submitit.helpers.Checkpointable):
    """One fgic.ddp run as a submitit job. submitit pickles it; after preemption or a timeout it is requeued as it is,
    and fgic resumes from the run folder's checkpoint."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # RANK, WORLD_SIZE, MASTER_ADDR... for torch.distributed, as torchrun would set them
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        usr_sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))  # submitit's choice
        on_signal = signal.getsignal(usr_sig)  # submitit's handler: checkpoint(), then requeue on rank 0
        code = ddp.main(self.argv)  # installs fgic's handlers: it stops at a step boundary with a checkpoint
        if code == EXIT_PREEMPTED and callable(on_signal):
            state = requeue.ending(requeue.show(requeue.job_id()) or "")
            if state:  # scancel: the job ends here, with its checkpoint
                print(f"fgic: job {requeue.job_id()} is {state}, not running (cancelled?): not requeued",
                      file=sys.stderr, flush=True)
            else:
                hand_over(on_signal, usr_sig)  # rank 0 requeues and exits there; the other ranks go on to return
        if code not in (0, EXIT_PREEMPTED):
            raise RuntimeError(f"fgic.ddp {' '.join(self.argv)} exited with {code}")
        return code


def hand_over(on_signal, usr_sig) -> None:
    """Run submitit's handler (checkpoint the submission, `scontrol requeue`, exit on rank 0) with SIGTERM held: the
    requeue's own SIGTERM to this job step must not kill scontrol and so turn the requeue into a failed job."""
    with term_held():
        on_signal(usr_sig, None)


def cluster(args: argparse.Namespace) -> str:
    """Where the jobs run: --cluster, or for auto submitit's own choice (Slurm when srun is on PATH)."""
    return args.cluster if args.cluster != "auto" else submitit.AutoExecutor.which()


def tasks_per_node(args: argparse.Namespace) -> int:
    """--tasks-per-node, else one per GPU (one on a CPU node)."""
    return args.tasks_per_node or max(args.gpus_per_node, 1)


def cpus_per_task(args: argparse.Namespace) -> str:
    """Fill in --cpus-per-task for a Slurm GPU job and say where the number came from. Without it submitit asks
    for Slurm's default, 1 CPU per task: the training process and all its loader workers on one core. The default
    is the node's CPUs per GPU times the process's GPUs, with the fewest CPUs per GPU among the partition's nodes
    that have enough GPUs, so the job fits on any of them and leaves the other GPUs their share."""
    if args.cpus_per_task is not None:
        return f"--cpus-per-task {args.cpus_per_task}"
    if not args.gpus_per_node:
        return "Slurm's default CPUs per task, 1 (give --cpus-per-task for more)"
    partition = args.partition or os.environ.get("SBATCH_PARTITION")
    cmd = ["sinfo", "--noheader", "--Node", "--format=%P|%c|%G", *(["--partition", partition] if partition else [])]
    give = "give --cpus-per-task (CPUs per process)"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FgicError(f"--cpus-per-task: no default without sinfo's node list ({exc}); {give}") from None
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[0]
        raise FgicError(f"--cpus-per-task: no default: {' '.join(cmd)} failed ({why}); {give}")
    rows = [line.split("|", 2) for line in out.stdout.splitlines() if line.count("|") >= 2]
    if not partition and any(part.endswith("*") for part, _, _ in rows):
        rows = [row for row in rows if row[0].endswith("*")]  # the default partition, where sbatch sends the jobs
    per_gpu = []
    for part, cpus, gres in rows:  # gres: gpu:4, gpu:a100:4(S:0-1), gpu:a100:2,gpu:v100:2, (null)
        gpus = sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))
        if gpus >= args.gpus_per_node and cpus.strip().isdigit():
            per_gpu.append(int(cpus) // gpus)
    where = f"partition {partition}" if partition else "the default partition"
    if not per_gpu:
        raise FgicError(f"--cpus-per-task: no default: sinfo shows no node with {args.gpus_per_node} GPUs in {where}; "
                        f"{give}, or check --gpus-per-node and --partition")
    args.cpus_per_task = max(1, min(per_gpu) * args.gpus_per_node // tasks_per_node(args))
    return f"--cpus-per-task {args.cpus_per_task} ({min(per_gpu)} CPUs per GPU on the nodes of {where}, from sinfo)"


def executor(args: argparse.Namespace, folder: Path) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster(args), slurm_max_num_timeout=args.max_timeouts)
    params = dict(name="fgic", timeout_min=args.timeout, nodes=args.nodes, tasks_per_node=tasks_per_node(args),
                  slurm_array_parallelism=args.max_parallel,
                  slurm_additional_parameters={"requeue": True})
    if args.cpus_per_task:  # submitit's srun line does not pass it, and Slurm 22.05's srun does not take it from
        # the job: on 22.05.8, a 2-task job with --cpus-per-task=4 ran a step that asked for cpu:2 without this
        # (scontrol show step: TresPerStep=cpu:2) and TresPerTask=cpu:4 with it
        params["slurm_srun_args"] = [f"--cpus-per-task={args.cpus_per_task}"]
    for key, value in (("gpus_per_node", args.gpus_per_node or None), ("cpus_per_task", args.cpus_per_task),
                       ("mem_gb", args.mem_gb), ("slurm_partition", args.partition),
                       ("slurm_account", args.account), ("slurm_constraint", args.constraint)):
        if value is not None:
            params[key] = value
    ex.update_parameters(**{k: v for k, v in params.items() if ex.cluster == "slurm" or not k.startswith("slurm_")})
    return ex


def why_failed(exc: Exception) -> str:
    """One line on why a job failed: the job's own exception when submitit quotes its traceback, else submitit's
    reason (a job that ended without a result says its Slurm state)."""
    text = str(exc)
    parts = text.split("\n" + "-" * 22 + "\n")  # FailedJobError: header, the job's traceback, footer
    if isinstance(exc, submitit.core.utils.FailedJobError) and len(parts) >= 3:
        text = parts[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    state = [line for line in lines if "(state: " in line]  # UncompletedJobError: "has not produced any output ..."
    return (state or lines[-1:] or [type(exc).__name__])[0][:300]


def without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv less the given flags and their values (`-d X`, `--data=X`, `-s5`; a bare `--amp`): the sweep's grid gives
    each job its own."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in flags:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        elif arg.partition("=")[0] not in flags and not (arg[:2] in flags and not arg.startswith("--")):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    full = get_args_parser().parse_args(argv)  # --help, and every flag checked before anything is submitted
    args, fgic_argv = launcher_parser(add_help=False).parse_known_args(argv)
    grid = {"datasets": ("-d", "--data", "--data-path"), "seeds": ("-s", "--seed"), "amps": ("-a", "--amp")}
    for plural, flags in grid.items():  # both given: the grid's values would replace the flag's without a word
        if getattr(args, plural) and without(fgic_argv, flags) != fgic_argv:
            raise FgicError(f"--{plural} and {flags[0]}: give one of them (each job gets the grid's --{plural} value, "
                            f"not {flags[0]}'s)")
    fgic_argv = without(fgic_argv, sum(grid.values(), ()))  # each job gets the grid's
    args.datasets = args.datasets or ([full.data] if full.data else None)
    if not args.datasets:
        raise FgicError(f"--datasets: name at least one dataset ({', '.join(config.REGISTRY)} or a folder), or give -d")
    args.seeds = args.seeds or [full.seed]
    for flag in ("nodes", "tasks_per_node", "cpus_per_task"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise FgicError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a number of at least 1")
    if args.gpus_per_node < 0:
        raise FgicError(f"--gpus-per-node {args.gpus_per_node}: give 0 (CPU) or more")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):  # fgic.ddp: one GPU a process
        wasted = "sit idle" if args.tasks_per_node < args.gpus_per_node else "be shared"
        raise FgicError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: each "
                        f"process trains on one GPU, so GPUs would {wasted}; leave --tasks-per-node out (one per GPU)")
    # -a auto is resolved here, where the run folders are named: bf16 for jobs that train on a GPU (a GPU without it
    # says so in one line at the job's start), off for the others (fgic.ddp's auto on the CPU)
    on_gpu = args.gpus_per_node > 0 and full.device != "cpu" and (cluster(args) == "slurm" or
                                                                    torch.cuda.is_available())
    args.amps = [("bf16" if on_gpu else "off") if a == "auto" else a for a in args.amps or [full.amp]]
    planned = [(c.argv, c.run_dir) for c in sweep.plan(args.datasets, args.seeds, args.amps, args.sweep, fgic_argv)]
    cpus = cpus_per_task(args) if cluster(args) == "slurm" else None
    folder = Path(args.logs or Path(full.output_dir) / "submitit")
    for argv_i, run_dir in planned:
        print(f"{'would submit' if args.dry_run else 'job'}: fgic.ddp {' '.join(argv_i)}  ->  {run_dir}")
    if cpus:
        print(f"each job: {args.nodes} node(s) x {tasks_per_node(args)} task(s), {args.gpus_per_node} GPU(s) per node, "
              f"{cpus}")
    if args.dry_run:
        print(f"{len(planned)} job(s); logs would go to {folder}, runs to {full.output_dir}")
        return 0
    ex = executor(args, folder)
    with ex.batch():
        submitted = [ex.submit(Train(argv_i)) for argv_i, _ in planned]
    print(f"submitted {len(submitted)} job(s) to {ex.cluster}: {' '.join(j.job_id for j in submitted)}")
    print(f"logs: {folder}   runs: {full.output_dir}   results: python -m fgic.report {full.output_dir}")
    if not (args.wait or ex.cluster in ("local", "debug")):
        return 0
    failed = 0
    for job, (_, run_dir) in zip(submitted, planned):
        try:
            job.results()
            print(f"{job.job_id}: done  {run_dir}")
        except Exception as exc:  # submitit re-raises the job's error; report it and go on with the others
            failed += 1
            print(f"{job.job_id}: FAILED ({why_failed(exc)}); log {job.paths.stderr}")
    unnamed = folder / "%j"  # submitit 1.5's local controller makes its folder before putting the job id in its name
    if unnamed.is_dir() and not any(unnamed.iterdir()):
        unnamed.rmdir()
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main, "launch.submitit")
