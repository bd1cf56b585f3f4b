"""A sweep's grid: datasets x seeds x AMP modes x `--sweep FLAG=V1,V2,...` over any other fgic.ddp flag, each
combination as its fgic.ddp argv and run folder, all checked before anything runs. launch.submitit plans with it, and
slurm/sweep.sh through its command line:

    python -m fgic.sweep count|list|run --datasets D... --seeds S... --amps A... [--sweep FLAG=V1,V2]...
        [--runs DIR] [--no-check] -- FGIC_ARGS

count prints the number of combinations, list one line per combination; run, inside an array task's srun step,
trains the combination of SLURM_ARRAY_TASK_ID and keeps its failure record for fgic.report (`run`). Every command
first checks every combination (exit 2 and one line); --no-check (inside a job) leaves out the data and arch checks,
so that a dataset gone since the submission fails that run alone, with its record. The runs folder is FGIC_ARGS'
--output-dir, else --runs (sweep.sh's RUNS), else ./runs.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fgic import config, requeue, signals
from fgic.cli import run_cli
from fgic.errors import FgicError

# Swept by the launchers' own lists, or fixed for the whole sweep.
OWN_LIST = {"data": "--datasets", "seed": "--seeds", "amp": "--amps"}
FIXED = {"output_dir": "one runs folder holds the sweep", "note": "the swept values are added to the note",
         "resume": "each run resumes from its own folder", "wandb_group": "a sweep's runs share one W&B group",
         "help": "it prints the help"}
# Already in the run folder's name (config.run_name): sweeping them needs no suffix.
IN_NAME = {"arch", "recipe"}
SWITCH_VALUES = ("on", "off")


@dataclass(frozen=True)
class Axis:
    """One --sweep FLAG=V1,V2: the flag as fgic.ddp spells it, its values, and the argv piece per value."""
    flag: str
    dest: str
    values: tuple[str, ...]
    switch: bool  # a flag without a value (--compile, --model-ema): swept as on,off
    negatable: bool  # a switch with a --no- form (--model-ema): off is said, so that it overrides a recipe's on

    def argv(self, value: str) -> list[str]:
        if not self.switch:
            return [self.flag, value]
        if value == "on":
            return [self.flag]
        return [self.flag.replace("--", "--no-", 1)] if self.negatable else []

    def name_part(self, value: str) -> str:
        """What the value adds to the run folder's name: lr0.05, batch-size128, weightsbest.pt (a path: its file's
        name), compile (off: nothing). Values that come out alike are refused by `plan`."""
        key = self.dest.replace("_", "-")
        if self.switch:
            return key if value == "on" else ""
        return key + re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(value).name if "/" in value else value).strip("-")


@dataclass(frozen=True)
class Combination:
    argv: list[str]  # fgic.ddp's, complete
    run_dir: Path
    dataset: str  # the -d value
    seed: int
    amp: str
    swept: dict  # dest -> value, of the --sweep axes

    @property
    def label(self) -> str:
        """DATASET-RUN_NAME (my-resnet50-off-s0-lr0.1): unique within the sweep, a file name (sweep.sh's failed/)."""
        return f"{self.run_dir.parent.name}-{self.run_dir.name}"


def parse_axis(spec: str, parser: argparse.ArgumentParser) -> Axis:
    """FLAG=V1,V2,... with FLAG an fgic.ddp flag, with or without its dashes: lr=0.05,0.1, --arch=resnet50,vit_b_16."""
    flag, eq, values = spec.partition("=")
    flag = ("-" if len(flag.strip().lstrip("-")) == 1 else "--") + flag.strip().lstrip("-")  # b=32,64 is -b's
    # argparse keeps its option strings in a private table; it is the only record of which flags exist and take a value
    action = parser._option_string_actions.get(flag)  # noqa: SLF001
    if not eq or not values.strip() or action is None:
        known = "" if action is not None or not eq else f" ({flag} is not an fgic.ddp flag)"
        raise FgicError(f"--sweep {spec!r}: give FLAG=V1,V2,... with FLAG an fgic.ddp flag, e.g. lr=0.05,0.1{known}")
    if action.dest in OWN_LIST:
        raise FgicError(f"--sweep {spec!r}: sweep {flag} with {OWN_LIST[action.dest]}")
    if action.dest in FIXED:
        raise FgicError(f"--sweep {spec!r}: {flag} cannot be swept: {FIXED[action.dest]}")
    # the long name the user gave (an alias may mean more: timm's --warmup-epochs is a linear warmup), else the first
    long = flag if flag.startswith("--") and not flag.startswith("--no-") else \
        next(o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-"))  # b: --batch-size
    vals = tuple(v.strip() for v in values.split(","))
    if "" in vals or len(set(vals)) != len(vals):
        raise FgicError(f"--sweep {spec!r}: give distinct, non-empty values separated by commas")
    switch = action.nargs == 0
    if switch and not set(vals) <= set(SWITCH_VALUES):
        raise FgicError(f"--sweep {spec!r}: {long} is a switch: sweep it as {long.lstrip('-')}=on,off")
    negatable = isinstance(action, argparse.BooleanOptionalAction)
    if switch and not negatable and action.const is not True:  # --pretrained: its off would be the recipe's value
        dest = action.dest.replace("_", "-")
        raise FgicError(f"--sweep {spec!r}: {long} sets --{dest} {action.const}, and leaving it out keeps --{dest} "
                        f"as the recipe has it; sweep {dest}=... instead")
    return Axis(long, action.dest, vals, switch, negatable)


def plan(datasets: list[str], seeds: list[int], amps: list[str], specs: list[str], fgic_argv: list[str],
         check: bool = True) -> list[Combination]:
    """Every combination, in a fixed order (datasets, seeds, AMP modes, then the --sweep axes in their order, the last
    varying fastest), each checked as fgic.ddp checks its flags before any data work (the arch at the crop, the
    dataset's layout), and every run folder distinct."""
    parser = config.get_args_parser()
    where = "the flags for every run"

    def refuse(message: str):  # argparse's error, as one line naming the combination, instead of fgic.ddp's usage
        raise FgicError(f"{where}: {message}")

    parser.error = refuse
    if "auto" in amps:
        raise FgicError("--amps auto: a sweep names its run folders before any job runs, and auto becomes bf16, fp16 "
                        "or off on the machine; give those (launch.submitit resolves auto for its GPU jobs)")
    for dest, own in OWN_LIST.items():
        given = [a for a in fgic_argv for o in parser_options(parser, dest)
                 if a == o or a.startswith(o + "=") or (len(o) == 2 and a.startswith(o) and not a.startswith("--"))]
        if given:
            raise FgicError(f"the flags for every run give {given[0]}, which the sweep's {own} would override; give it "
                            f"with {own} (slurm/sweep.sh: DATASETS, SEEDS, AMPS)")
    axes = [parse_axis(spec, parser) for spec in specs]
    if len({a.dest for a in axes}) != len(axes):
        raise FgicError("--sweep: name each flag once (give all its values after one =, separated by commas)")
    base = parser.parse_args(["-d", "x", *fgic_argv])
    for axis in axes:
        if axis.switch and not axis.negatable and getattr(base, axis.dest):
            raise FgicError(f"--sweep {axis.flag.lstrip('-')}=...: {axis.flag} is also among the flags for every "
                            f"run; leave it out there")
    if base.wandb and not base.wandb_group:
        fgic_argv = [*fgic_argv, "--wandb-group", group(datasets, seeds, amps, specs, fgic_argv)]
    out, seen, checked = [], {}, set()
    for dataset, seed, amp, *values in itertools.product(datasets, seeds, amps, *(a.values for a in axes)):
        parts = [p for a, v in zip(axes, values) if a.dest not in IN_NAME and (p := a.name_part(v))]
        note = "-".join([base.note.strip(), *parts] if base.note.strip() else parts)
        argv = [*fgic_argv, "-d", dataset, "--seed", str(seed), "--amp", amp,  # the last occurrence wins
                *(x for a, v in zip(axes, values) for x in a.argv(v)), *(["-n", note] if note else [])]
        where = f"-d {dataset} --seed {seed} --amp {amp}" + "".join(f" --sweep {a.flag.lstrip('-')}={v}"
                                                                    for a, v in zip(axes, values))
        run = config.resolve(parser.parse_args(argv))
        name = check_run(run, checked) if check else config.dataset_name(run.data)
        combo = Combination(argv, config.run_dir(run, name), dataset, seed, amp,
                            {a.dest: v for a, v in zip(axes, values)})
        if combo.run_dir in seen:
            raise FgicError(f"--sweep: {seen[combo.run_dir]} and {combo.swept or combo.argv} would share the run "
                            f"folder {combo.run_dir}; give values that differ in letters or digits")
        seen[combo.run_dir] = combo.swept or combo.argv
        out.append(combo)
    return out


def parser_options(parser: argparse.ArgumentParser, dest: str) -> list[str]:
    """The option strings of fgic.ddp's flag `dest` (-s, --seed)."""
    return [o for a in parser._actions if a.dest == dest for o in a.option_strings]  # noqa: SLF001  (see parse_axis)


def group(datasets, seeds, amps, specs, fgic_argv) -> str:
    """The W&B group of a sweep's runs: sweep-AXES-HASH, the hash of the whole sweep, so that the same sweep
    submitted again (to rerun its failures) joins its group and another sweep does not."""
    whole = json.dumps([datasets, seeds, amps, specs, fgic_argv])
    axes = [spec.partition("=")[0].strip().lstrip("-") for spec in specs]
    return "-".join(["sweep", *axes, hashlib.sha256(whole.encode()).hexdigest()[:6]])


def check_run(run: argparse.Namespace, checked: set) -> str:
    """fgic.ddp's checks before any data work: the dataset and its layout, the arch at the crop (0.15-0.75 s each;
    `checked` holds what has been checked). Returns the dataset's name."""
    from fgic import data, models  # noqa: PLC0415  (torch, 3 s: a job's `task` lookup, --no-check, does without)
    name, root = data.resolve(run.data, run.data_root)
    if (run.arch, run.crop) not in checked:
        models.check_arch(run.arch)
        models.check_input(run.arch, run.crop)
        checked.add((run.arch, run.crop))
    if root not in checked:
        data.check_layout(root)
        checked.add(root)
    return name


def with_runs(fgic_argv: list[str], runs: str | None) -> list[str]:
    """FGIC_ARGS and the sweep's runs folder: their own --output-dir (any spelling fgic.ddp takes), else `runs`,
    else ./runs. Both, naming two folders, are refused: one of them would be dropped silently."""
    parser = config.get_args_parser()
    parser.set_defaults(output_dir=None)

    def refuse(message: str):
        raise FgicError(f"the flags for every run: {message}")

    parser.error = refuse
    given = parser.parse_known_args(["-d", "x", *fgic_argv])[0].output_dir
    if given is None:
        return [*fgic_argv, "--output-dir", runs or "runs"]
    if runs is not None and Path(runs) != Path(given):
        raise FgicError(f"--output-dir {given} (in FGIC_ARGS) and --runs {runs} (RUNS) name two runs folders; "
                        f"give one of them")
    return fgic_argv


def array_task(combos: list[Combination], env=os.environ) -> int:
    """This array task's index, once the job array is checked against the sweep: a mismatch is an error in every
    task, not a silent skip."""
    n = len(combos)
    low, high, count = (env.get(f"SLURM_ARRAY_TASK_{k}") for k in ("MIN", "MAX", "COUNT"))
    if not env.get("SLURM_ARRAY_TASK_ID") or (low, high, count) != ("0", str(n - 1), str(n)):
        raise FgicError(f"the job array is {low or '?'}-{high or '?'} but the sweep has {n} combinations; submit with "
                        f"sbatch --array=0-{n - 1} slurm/sweep.sh, or run bash slurm/sweep.sh to have it choose")
    return int(env["SLURM_ARRAY_TASK_ID"])


def run(combos: list[Combination], env=os.environ) -> int:
    """The array task's combination, inside its srun step (sweep.sh execs srun on this, as train.sbatch does, so
    that a plain scancel's SIGTERM to the batch step cannot end the step before the training has stopped): train it
    with launch.torchrun, then remove its failure record on success, or write one (on the first node) when it failed
    and Slurm is not ending the job. Exit 75 is a stop to resume; torchrun turns it into 1 with several processes,
    and then `scontrol show job` shows COMPLETING (measured on Slurm 22.05 right after `scontrol requeue`; a cancel
    too). The stop signals are held here (signals.hold): Slurm sends them to every process of the step, and this
    one must outlive the training; the training unblocks them in its own processes."""
    i = array_task(combos, env)
    combo = combos[i]
    print(f"fgic sweep: task {i} of {len(combos)}: {' '.join(combo.argv)} (job {env.get('SLURM_JOB_ID')}, restart "
          f"{env.get('SLURM_RESTART_COUNT', 0)}, {datetime.now().astimezone().isoformat(timespec='seconds')})",
          flush=True)
    signals.hold(env)
    code = subprocess.call([sys.executable, "-m", "launch.torchrun", *combo.argv])
    code = code if code >= 0 else 128 - code  # killed by a signal: the shell's 128+N
    if code == signals.EXIT_PREEMPTED or env.get("SLURM_PROCID", "0") != "0":
        return code
    if code == 0:
        failure_path(combo).unlink(missing_ok=True)
        return 0
    job = requeue.job_id(env)
    info = (requeue.show(job) if job else None) or ""
    if requeue.ending(info):
        print(f"fgic.sweep: exit code {code} while Slurm ends job {job} ({requeue.ending(info)}: requeued or "
              f"cancelled); no failure record", file=sys.stderr, flush=True)
        return code
    log = re.search(r"^\s*StdOut=(.*)$", info, re.M)
    write_failure(combo, code, log.group(1).strip() if log else "")
    return code


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fgic.sweep", description="a sweep's combinations (slurm/sweep.sh calls this)")
    p.add_argument("command", choices=("count", "list", "run"), help="run: an array task's combination (sweep.sh)")
    p.add_argument("--no-check", dest="check", action="store_false", help="inside a job: no data or arch checks")
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    p.add_argument("--amps", nargs="+", required=True)
    p.add_argument("--sweep", action="append", default=[], metavar="FLAG=V1,V2")
    p.add_argument("--runs", help="the runs folder unless FGIC_ARGS name one (default ./runs)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: fgic.ddp's flags for every run
    args = get_args_parser().parse_args(argv[:cut])
    combos = plan(args.datasets, args.seeds, args.amps, args.sweep, with_runs(argv[cut + 1:], args.runs),
                  check=args.check)
    if args.command == "count":
        print(len(combos))
    elif args.command == "list":
        for i, c in enumerate(combos):
            print(f"{i}: fgic.ddp {' '.join(c.argv)}  ->  {c.run_dir}")
    else:
        return run(combos)
    return 0


def failure_path(combo: Combination) -> Path:
    """OUTPUT_DIR/failed/LABEL.json, the record fgic.report lists (its docstring)."""
    return combo.run_dir.parent.parent / "failed" / f"{combo.label}.json"


def write_failure(combo: Combination, code: int, log: str) -> Path:
    """The combination's failure record: args are the run's flags beyond its dataset, seed, AMP mode and runs
    folder."""
    given = {"-d", "--data", "-s", "--seed", "-a", "--amp", "--output-dir"}
    args = [a for i, a in enumerate(combo.argv) if a not in given and (i == 0 or combo.argv[i - 1] not in given)]
    path = failure_path(combo)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"dataset": combo.dataset, "seed": combo.seed, "amp": combo.amp, "args": args, "exit_code": code,
              "log": log}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


if __name__ == "__main__":
    run_cli(main, "fgic.sweep")
