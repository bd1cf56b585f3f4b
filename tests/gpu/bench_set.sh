#!/usr/bin/env bash
# check.sh's training benchmarks, a set of fgic.bench train runs per step, merged into one file keyed by label (check.sh
# returns at most eight files), rewritten after each run (a set stopped at its step's limit keeps the runs it finished).
# A failed run is left out of the file and makes the exit status 1; the others still run.
#   bash tests/gpu/bench_set.sh resnet50|families|cache SCRATCH_DIR OUT_JSON    ($PY: the Python; $D: the JPEGs)
#   resnet50  ResNet-50 at 448 px, synthetic: the old default (fp32, eager, batch 64) and the new one (-a auto: bf16
#             on this GPU, eager); bf16 batch 128 eager and compiled, each beside a plain PyTorch step
#             (--reference); eager with fgic's synchronised BatchNorm on a one-process NCCL group; the new default
#             compiled (its warm-up, the compile, against new-default's: the whole-run figure that decides --compile's
#             default); last, the slowest to compile, bf16 batch 128 in max-autotune-no-cudagraphs beside --reference
#   families  ViT-B/16 and ConvNeXt-T at 448 px, bf16 batch 64, eager and compiled, each beside --reference
#   cache     ResNet-50 448 px bf16 batch 128 fed from fgic's cache: the seed's recipe (crops on the GPU), tv-v2's
#             (per-image policies and mixing partners in 16 loader workers), and tv-v2's step on synthetic data
set -uo pipefail
PY=${PY:-python3}
R50=(--arch resnet50 --crop 448)
case ${1:-} in
    resnet50) RUNS=(
        "old-default|--synthetic ${R50[*]} --amp off -b 64 --steps 20 --warmup 8"
        "new-default|--synthetic ${R50[*]} --amp bf16 -b 64 --steps 20 --warmup 8"
        "bf16-b128|--synthetic ${R50[*]} --amp bf16 -b 128 --steps 30 --warmup 10 --reference"
        "bf16-b128-compiled|--synthetic ${R50[*]} --amp bf16 -b 128 --steps 30 --warmup 10 --reference --compile"
        "bf16-b128-sync-bn|--synthetic ${R50[*]} --amp bf16 -b 128 --steps 30 --warmup 10 --sync-bn"
        "new-default-compiled|--synthetic ${R50[*]} --amp bf16 -b 64 --steps 20 --warmup 8 --compile"
        "bf16-b128-max-autotune|--synthetic ${R50[*]} --amp bf16 -b 128 --steps 20 --warmup 5 --reference --compile --compile-mode max-autotune-no-cudagraphs") ;;
    families) RUNS=(
        "vit_b_16|--synthetic --arch vit_b_16 --crop 448 --amp bf16 -b 64 --steps 15 --warmup 8 --reference"
        "vit_b_16-compiled|--synthetic --arch vit_b_16 --crop 448 --amp bf16 -b 64 --steps 15 --warmup 8 --reference --compile"
        "convnext_tiny|--synthetic --arch convnext_tiny --crop 448 --amp bf16 -b 64 --steps 15 --warmup 8 --reference"
        "convnext_tiny-compiled|--synthetic --arch convnext_tiny --crop 448 --amp bf16 -b 64 --steps 15 --warmup 8 --reference --compile") ;;
    cache) RUNS=(
        "seed|-d $D -w 8 ${R50[*]} --amp bf16 -b 128 --steps 30 --warmup 10"
        "tv-v2|-d $D -w 16 ${R50[*]} --amp bf16 -b 128 --steps 30 --warmup 10 --recipe tv-v2"
        "tv-v2-synthetic|--synthetic ${R50[*]} --amp bf16 -b 128 --steps 30 --warmup 10 --recipe tv-v2") ;;
    *) echo "bench_set.sh: the first argument is resnet50, families or cache" >&2; exit 2 ;;
esac
[[ $# -eq 3 ]] || { echo "bench_set.sh: give SET SCRATCH_DIR OUT_JSON" >&2; exit 2; }
rc=0
files=()
for run in "${RUNS[@]}"; do
    label=${run%%|*}
    echo "--- $1 $label: fgic.bench train ${run#*|}"
    # shellcheck disable=SC2086  # the flags are split on purpose
    if "$PY" -m fgic.bench train ${run#*|} --json "$2/$label.json"; then files+=("$label=$2/$label.json"); else rc=1; fi
    "$PY" "$(dirname "$0")/results.py" merge "$3" ${files[@]+"${files[@]}"} || rc=1
done
exit $rc
