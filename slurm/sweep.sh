#!/bin/bash
# A sweep of datasets x seeds x AMP modes, one Slurm array task per combination, all writing to one runs folder:
#   sbatch slurm/sweep.sh                                  # the defaults: 3 datasets x 3 seeds = --array=0-8
#   DATASETS="cub cars" SEEDS="0 1" AMPS="off bf16" bash slurm/sweep.sh    # any size: submits itself with the
#                                                                          # matching --array
# then `python -m fgic.report runs` for the table. Environment (space-separated lists):
#   DATASETS  registry names (cub aircraft cars demo) or dataset folders      default: cub aircraft cars
#   SEEDS     seeds                                                           default: 0 1 2
#   AMPS      off, fp16 or bf16                                               default: off
#   FGIC_ARGS more fgic.ddp flags for every run, e.g. "--epochs 64 --arch resnet101"
#   RUNS      the runs folder (fgic.ddp --output-dir)                         default: runs
#   PYTHON    the interpreter                                                 default: python3
# A combination that fails (exit code other than 0, or 75 for "preempted, requeued") leaves
# RUNS/failed/DATASET-AMP-sSEED.json for the report; a later success removes it.
#
# For your site, change (or override on the sbatch command line, or with SBATCH_PARTITION / SBATCH_ACCOUNT):
#   --partition and --account (add them below), --gpus-per-node and --cpus-per-task to your nodes, --time to
#   your queue's limit, and --array's %N suffix to cap how many run at once.
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
# extra may be empty: under set -u, bash 4.2/4.3 (RHEL/CentOS 7) call a plain @ or * expansion of an empty array
# an "unbound variable" error, so it is expanded as ${extra[@]+"${extra[@]}"} (nothing when empty)
read -ra extra <<<"${FGIC_ARGS:-}"
runs="${RUNS:-runs}"
python="${PYTHON:-python3}"
n=$(( ${#datasets[@]} * ${#seeds[@]} * ${#amps[@]} ))
if [ "$n" -eq 0 ]; then
    echo "sweep.sh: error: DATASETS, SEEDS and AMPS must each name at least one value" >&2
    exit 2
fi

if [ -z "${SLURM_JOB_ID:-}" ]; then  # run with bash: submit this script as an array of the right size
    exec sbatch --array="0-$((n - 1))" "$@" "$0"
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || [ "${SLURM_ARRAY_TASK_COUNT:-0}" -ne "$n" ] \
        || [ "${SLURM_ARRAY_TASK_MIN:-0}" -ne 0 ] || [ "${SLURM_ARRAY_TASK_MAX:-0}" -ne "$((n - 1))" ]; then
    echo "sweep.sh: error: the job array is ${SLURM_ARRAY_TASK_MIN:-?}-${SLURM_ARRAY_TASK_MAX:-?} but" \
         "DATASETS x SEEDS x AMPS has $n combinations; submit with sbatch --array=0-$((n - 1)) slurm/sweep.sh," \
         "or run bash slurm/sweep.sh to have it choose" >&2
    exit 2
fi

i="$SLURM_ARRAY_TASK_ID"
amp="${amps[i % ${#amps[@]}]}"
seed="${seeds[(i / ${#amps[@]}) % ${#seeds[@]}]}"
dataset="${datasets[i / (${#amps[@]} * ${#seeds[@]})]}"
echo "fgic sweep: task $i of $n: -d $dataset --seed $seed --amp $amp ${FGIC_ARGS:-}" \
     "(job ${SLURM_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0}, $(date -Is))"

# Since Slurm 22.05 srun does not take the job's --cpus-per-task; where Slurm binds tasks to CPUs, the launcher
# (and every process and loader worker it starts) would get one CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
failed="$runs/failed/$(basename -- "$dataset")-$amp-s$seed.json"
srun --kill-on-bad-exit=1 "$python" -m launch.torchrun -d "$dataset" --seed "$seed" --amp "$amp" \
    --output-dir "$runs" ${extra[@]+"${extra[@]}"}
rc=$?
if [ "$rc" -eq 0 ]; then
    rm -f -- "$failed"
elif [ "$rc" -ne 75 ]; then
    log="$(scontrol show job "${SLURM_ARRAY_JOB_ID}_${i}" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n 1)"
    mkdir -p -- "$runs/failed"
    "$python" -c 'import json, sys; d, s, a, rc, log, path = sys.argv[1:7]
json.dump({"dataset": d, "seed": int(s), "amp": a, "args": sys.argv[7:], "exit_code": int(rc), "log": log},
          open(path, "w"), indent=2)' "$dataset" "$seed" "$amp" "$rc" "$log" "$failed" ${extra[@]+"${extra[@]}"}
fi
exit "$rc"
