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
#   RUNS      the runs folder (fgic.ddp --output-dir)                         default: runs
#   MAX_PARALLEL  array tasks running at once (Slurm's --array=...%N)         default: no cap
#   PYTHON    the interpreter                                                 default: python3
# A combination that fails (exit code other than 0, or 75 for "preempted, requeued") leaves
# RUNS/failed/DATASET-RUN_NAME.json for the report; a later success removes it. The grid, its order and the run
# folders' names are fgic.sweep's (launch.submitit's too).
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
runs="${RUNS:-runs}"
python="${PYTHON:-python3}"
if [ "${#datasets[@]}" -eq 0 ] || [ "${#seeds[@]}" -eq 0 ] || [ "${#amps[@]}" -eq 0 ]; then
    echo "sweep.sh: error: DATASETS, SEEDS and AMPS must each name at least one value" >&2
    exit 2
fi
grid=(--datasets ${datasets[@]+"${datasets[@]}"} --seeds ${seeds[@]+"${seeds[@]}"} --amps ${amps[@]+"${amps[@]}"})
for axis in ${axes[@]+"${axes[@]}"}; do grid+=(--sweep "$axis"); done
grid+=(-- ${extra[@]+"${extra[@]}"} --output-dir "$runs")

if [ -z "${SLURM_JOB_ID:-}" ]; then  # run with bash: check every combination, then submit an array of the right size
    n=$("$python" -m fgic.sweep count ${grid[@]+"${grid[@]}"}) || exit 2  # fgic.sweep said why, in one line
    if [ -n "${DRY_RUN:-}" ]; then
        "$python" -m fgic.sweep list ${grid[@]+"${grid[@]}"}
        echo "$n combination(s): sbatch --array=0-$((n - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}${*:+ $*} $0"
        exit 0
    fi
    exec sbatch --array="0-$((n - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}" "$@" "$0"
fi
# The number of combinations, this task's run label and its argv, a line each. --no-check: a dataset gone since the
# submission fails this task alone, with its record.
mapfile -t task < <("$python" -m fgic.sweep task "${SLURM_ARRAY_TASK_ID:-0}" --no-check ${grid[@]+"${grid[@]}"})
n="${task[0]:-}"
if [ -z "$n" ]; then
    echo "sweep.sh: error: python -m fgic.sweep gave no combinations (see above)" >&2
    exit 2
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || [ "${SLURM_ARRAY_TASK_COUNT:-0}" -ne "$n" ] \
        || [ "${SLURM_ARRAY_TASK_MIN:-0}" -ne 0 ] || [ "${SLURM_ARRAY_TASK_MAX:-0}" -ne "$((n - 1))" ]; then
    echo "sweep.sh: error: the job array is ${SLURM_ARRAY_TASK_MIN:-?}-${SLURM_ARRAY_TASK_MAX:-?} but" \
         "the sweep has $n combinations; submit with sbatch --array=0-$((n - 1)) slurm/sweep.sh," \
         "or run bash slurm/sweep.sh to have it choose" >&2
    exit 2
fi
i="$SLURM_ARRAY_TASK_ID"
label="${task[1]}"
argv=()
for ((k = 2; k < ${#task[@]}; k++)); do argv+=("${task[k]}"); done
echo "fgic sweep: task $i of $n:" ${argv[*]+"${argv[*]}"} "(job ${SLURM_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0}, $(date -Is))"

# Since Slurm 22.05 srun does not take the job's --cpus-per-task; where Slurm binds tasks to CPUs, the launcher
# (and every process and loader worker it starts) would get one CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
failed="$runs/failed/$label.json"
srun --kill-on-bad-exit=1 "$python" -m launch.torchrun ${argv[@]+"${argv[@]}"}
rc=$?
if [ "$rc" -eq 0 ]; then
    rm -f -- "$failed"
elif [ "$rc" -ne 75 ]; then
    log="$(scontrol show job "${SLURM_ARRAY_JOB_ID}_${i}" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n 1)"
    "$python" -m fgic.sweep failed "$i" "$rc" "$log" --no-check ${grid[@]+"${grid[@]}"}
fi
exit "$rc"
