#!/bin/bash
# A sweep of datasets x seeds x AMP modes x any other fgic.ddp flags, one Slurm array task per combination, all writing
# to one runs folder:
#   sbatch slurm/sweep.sh                                  # the defaults: 3 datasets x 3 seeds = --array=0-8
#   DATASETS="cub cars" SEEDS="0 1" SWEEP="lr=0.05,0.1 arch=resnet50,vit_b_16" bash slurm/sweep.sh
#                                       # any size: checks every combination, then submits itself with the matching
#                                       # --array (DRY_RUN=1: only prints them)
# then `python -m fgic.report runs` for the table. Environment (space-separated lists):
#   DATASETS  registry names (cub aircraft cars nabirds dogs flowers pets demo) or dataset folders
#                                                                             default: cub aircraft cars
#   SEEDS     seeds                                                           default: 0 1 2
#   AMPS      off, fp16 or bf16                                               default: off
#   SWEEP     FLAG=V1,V2 items: any other fgic.ddp flag and its values (switches as compile=on,off); values outside
#             the run name's arch, amp and seed go into its note: runs/cub/resnet50-off-s0-lr0.05
#   FGIC_ARGS more fgic.ddp flags for every run, e.g. "--epochs 64 --arch resnet101"
#   RUNS      the runs folder, unless FGIC_ARGS give --output-dir             default: runs
#   MAX_PARALLEL  array tasks running at once (Slurm's --array=...%N)         default: no cap
#   PYTHON    the interpreter of fgic's environment      default: the checkout's .venv/bin/python if any, else python3
# Run with bash, the script passes PYTHON on to the jobs it submits; a job submitted with sbatch looks for .venv in
# the folder it was submitted from. A combination that fails (exit code other than 0, or a stop that Slurm requeues
# or cancels) leaves RUNS/failed/DATASET-RUN_NAME.json for the report; a later success removes it. The grid, its
# order and the run folders' names are fgic.sweep's (launch.submitit's too); `python -m fgic.sweep run` trains a
# task's combination and keeps its record.
#
# For your site, change (or override on the sbatch command line, or with SBATCH_PARTITION / SBATCH_ACCOUNT):
#   --partition and --account (add them below), --gpus-per-node and --cpus-per-task to your nodes, and --time to
#   your queue's limit.
#SBATCH --job-name=fgic-sweep
#SBATCH --array=0-8
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=fgic-sweep-%A_%a.out
set -uo pipefail

read -ra datasets <<<"${DATASETS:-cub aircraft cars}"
read -ra seeds <<<"${SEEDS:-0 1 2}"
read -ra amps <<<"${AMPS:-off}"
# these may be empty: under set -u, bash 4.2/4.3 (RHEL/CentOS 7) call a plain @ or * expansion of an empty array
# an "unbound variable" error, so they are expanded as ${a[@]+"${a[@]}"} (nothing when empty)
read -ra extra <<<"${FGIC_ARGS:-}"
read -ra axes <<<"${SWEEP:-}"
if [ "${#datasets[@]}" -eq 0 ] || [ "${#seeds[@]}" -eq 0 ] || [ "${#amps[@]}" -eq 0 ]; then
    echo "sweep.sh: error: DATASETS, SEEDS and AMPS must each name at least one value" >&2
    exit 2
fi
# Inside a job $0 is Slurm's copy of the script: the checkout is the folder the job was submitted from.
python="${PYTHON:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}/.venv/bin/python}"
[ -n "${PYTHON:-}" ] || [ -x "$python" ] || python=python3
if ! "$python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null; then
    echo "sweep.sh: error: $(command -v "$python" || echo "$python") cannot import torch; set PYTHON to the" \
         "python of fgic's environment, e.g. PYTHON=/path/to/fgic/.venv/bin/python" >&2
    exit 2
fi
export PYTHON="$python"  # for the jobs sbatch submits (it passes the environment on)
grid=(--datasets ${datasets[@]+"${datasets[@]}"} --seeds ${seeds[@]+"${seeds[@]}"} --amps ${amps[@]+"${amps[@]}"})
for axis in ${axes[@]+"${axes[@]}"}; do grid+=(--sweep "$axis"); done
if [ -n "${RUNS:-}" ]; then grid+=(--runs "$RUNS"); fi
grid+=(-- ${extra[@]+"${extra[@]}"})

if [ -z "${SLURM_JOB_ID:-}" ]; then  # run with bash: check every combination, then submit an array of the right size
    n=$("$python" -m fgic.sweep count ${grid[@]+"${grid[@]}"}) || exit 2  # fgic.sweep said why, in one line
    if [ -n "${DRY_RUN:-}" ]; then
        "$python" -m fgic.sweep list ${grid[@]+"${grid[@]}"}
        echo "$n combination(s): sbatch --array=0-$((n - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}${*:+ $*} $0"
        exit 0
    fi
    exec sbatch --array="0-$((n - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}" "$@" "$0"
fi

# Since Slurm 22.05 srun does not take the job's --cpus-per-task; where Slurm binds tasks to CPUs, the launcher
# (and every process and loader worker it starts) would get one CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
# exec, as in train.sbatch: srun is the batch step, so a plain scancel's SIGTERM cannot end it (and srun, the relay
# of the step's output) while the training writes its stop checkpoint. fgic.sweep run checks the job array against
# the sweep, trains this task's combination and writes or removes its failure record; --no-check: a dataset gone
# since the submission fails this task alone, with its record.
exec srun --kill-on-bad-exit=1 "$python" -m fgic.sweep run --no-check ${grid[@]+"${grid[@]}"}
