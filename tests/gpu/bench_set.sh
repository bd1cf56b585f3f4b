#!/usr/bin/env bash
# check.sh's benchmarks, a set of fgic.bench runs per step, merged into one file keyed by label (check.sh returns at
# most eight files), rewritten after each run (a set stopped at its step's limit keeps the runs it finished). A failed
# run is left out of the file and makes the exit status 1; the others still run.
#   bash tests/gpu/bench_set.sh resnet50|families|cache|loader|bounds SCRATCH_DIR OUT_JSON  ($PY: the Python; $D: JPEGs)
# A run is "label|[NAME=VALUE ...] fgic.bench's arguments": the NAME=VALUE words go to its environment.
#   resnet50  ResNet-50 at 448 px, synthetic: the old default (fp32, eager, batch 64) and the new one (-a auto: bf16
#             on this GPU, eager); bf16 batch 128 eager and compiled, each beside a plain PyTorch step
#             (--reference); the new default compiled, with an inductor cache of its own, empty (no kernel of the
#             other compiled runs found there), and again with the cache that run filled (what a first run and a
#             requeued one pay: the figures that decide --compile's default)
#   families  ViT-B/16 and ConvNeXt-T at 448 px, bf16 batch 64, eager and compiled, each beside --reference
#   cache     ResNet-50 448 px bf16 batch 128 fed from fgic's cache: the seed's recipe (crops on the GPU), tv-v2's
#             (per-image policies and mixing partners in 16 loader workers), tv-v2's step on synthetic data, and the
#             seed's original pipeline (ImageFolder + PIL, 16 workers)
#   loader    the host side alone, 16 workers, batch 128: the seed's recipe and tv-v2's, each beside the original
#             pipeline
#   bounds    what bounds ResNet-50's rate (bf16 batch 128): fgic's synchronised BatchNorm on a one-process NCCL group
#             (its collectives included) against plain BatchNorm; the step without BatchNorm, eager and compiled;
#             compiled with CUDA graphs (reduce-overhead); last, the slowest to compile, max-autotune-no-cudagraphs
set -uo pipefail
PY=${PY:-python3}
R50="--arch resnet50 --crop 448"
B128="--synthetic $R50 --amp bf16 -b 128 --steps 30 --warmup 10"
B64="--synthetic $R50 -b 64 --steps 20 --warmup 8"
case ${1:-} in
    resnet50) RUNS=(
        "old-default|train $B64 --amp off"
        "new-default|train $B64 --amp bf16"
        "bf16-b128|train $B128 --reference"
        "bf16-b128-compiled|train $B128 --reference --compile"
        "new-default-compiled|TORCHINDUCTOR_CACHE_DIR=$2/inductor-new-default train $B64 --amp bf16 --compile"
        "new-default-compiled-warm|TORCHINDUCTOR_CACHE_DIR=$2/inductor-new-default train $B64 --amp bf16 --compile") ;;
    families) RUNS=(
        "vit_b_16|train --synthetic --arch vit_b_16 --crop 448 --amp bf16 -b 64 --steps 15 --warmup 8 --reference"
        "vit_b_16-compiled|train --synthetic --arch vit_b_16 --crop 448 --amp bf16 -b 64 --steps 15 --warmup 8 --reference --compile"
        "convnext_tiny|train --synthetic --arch convnext_tiny --crop 448 --amp bf16 -b 64 --steps 15 --warmup 8 --reference"
        "convnext_tiny-compiled|train --synthetic --arch convnext_tiny --crop 448 --amp bf16 -b 64 --steps 15 --warmup 8 --reference --compile") ;;
    cache) RUNS=(
        "seed|train -d $D -w 8 $R50 --amp bf16 -b 128 --steps 30 --warmup 10"
        "tv-v2|train -d $D -w 16 $R50 --amp bf16 -b 128 --steps 30 --warmup 10 --recipe tv-v2"
        "tv-v2-synthetic|train $B128 --recipe tv-v2"
        "original|train -d $D --pipeline original -w 16 $R50 --amp bf16 -b 128 --steps 20 --warmup 8") ;;
    loader) RUNS=(
        "seed|loader -d $D -w 16 -b 128 --batches 30"
        "tv-v2|loader -d $D -w 16 -b 128 --batches 30 --recipe tv-v2") ;;
    bounds) RUNS=(
        "sync-bn|train $B128 --sync-bn"
        "no-batchnorm|train $B128 --no-batchnorm"
        "no-batchnorm-compiled|train $B128 --no-batchnorm --compile"
        "cuda-graphs|train $B128 --compile --compile-mode reduce-overhead"
        "max-autotune|train --synthetic $R50 --amp bf16 -b 128 --steps 20 --warmup 5 --compile --compile-mode max-autotune-no-cudagraphs") ;;
    *) echo "bench_set.sh: the first argument is resnet50, families, cache, loader or bounds" >&2; exit 2 ;;
esac
[[ $# -eq 3 ]] || { echo "bench_set.sh: give SET SCRATCH_DIR OUT_JSON" >&2; exit 2; }
rc=0
files=()
for run in "${RUNS[@]}"; do
    label=${run%%|*}
    read -r -a words <<<"${run#*|}"
    environment=()
    while [[ ${words[0]} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do environment+=("${words[0]}"); words=("${words[@]:1}"); done
    echo "--- $1 $label: ${environment[*]}${environment[*]:+ }fgic.bench ${words[*]}"
    if env ${environment[@]+"${environment[@]}"} "$PY" -m fgic.bench "${words[@]}" --json "$2/$label.json"; then
        files+=("$label=$2/$label.json")
    else
        rc=1
    fi
    "$PY" "$(dirname "$0")/results.py" merge "$3" ${files[@]+"${files[@]}"} || rc=1
done
exit $rc
