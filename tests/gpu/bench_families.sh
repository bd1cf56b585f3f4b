#!/usr/bin/env bash
# check.sh's train-families step: fgic.bench train for ViT-B/16 and ConvNeXt-T at 448 px in bf16 (synthetic data, as
# the ResNet-50 figure), their two results merged into one file (check.sh returns at most eight).
#   bash tests/gpu/bench_families.sh SCRATCH_DIR OUT_JSON      ($PY: the Python, default python3)
set -euo pipefail
PY=${PY:-python3}
for arch in vit_b_16 convnext_tiny; do
    "$PY" -m fgic.bench train --synthetic --arch "$arch" --crop 448 --amp bf16 -b 64 --steps 20 --warmup 10 \
        --json "$1/$arch.json"
done
"$PY" "$(dirname "$0")/results.py" merge "$2" "$1/vit_b_16.json" "$1/convnext_tiny.json"
