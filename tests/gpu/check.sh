#!/usr/bin/env bash
# The GPU check: every `-m gpu` test and BENCHMARKS.md's GPU benchmarks in one go on a CUDA machine, within 8
# minutes (one remote command). Each step runs under its own time limit, cut to what is left of the whole budget, so
# a hung step costs its limit and no more; a failed step is recorded and the next one runs; the steps come in the
# open issues' priority, and what the budget cuts off is reported as not run (GPU_CHECK_STEPS runs it in another
# command). The results go to one folder, rewritten after every step (an interrupted run still leaves them), in
# eight files at most (some remote runners return no more): summary.md, results.json, log.txt (every step's output,
# pytest's included), train_resnet50.json, train_families.json, train_cache.json, loader.json, train_bounds.json.
#
#   bash tests/gpu/check.sh [RESULTS_DIR]   RESULTS_DIR, else $OUT if set, else ./gpu-check-DATE
#   bash tests/gpu/check.sh --dry-run       the steps with their limits and commands; runs nothing
#
# Exit status: 0 every step passed; 1 a step failed, timed out or was not run; 2 bad arguments; 3 no usable Python,
# torch or CUDA GPU (one line on stderr says which; the summary is written all the same).
# Environment: GPU_CHECK_STEPS (the steps to run after env, e.g. "pytest" or "make-data train-cache" to split the
# check over two remote commands; default all), PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450: the
# steps' total, 30 s left for the start and the reports), GPU_CHECK_KEEP=1 keeps the scratch folder (generated JPEGs
# and the image cache).
set -uo pipefail  # no -e: a failing step is recorded, the rest still run

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
DRY=0
R=
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu-check: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) [[ -z $R ]] || { echo "gpu-check: one results folder, not two ($R, $arg)" >&2; exit 2; }; R=$arg ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu-check: GPU_CHECK_BUDGET_S=$BUDGET: give whole seconds" >&2; exit 2; }
GRACE=15  # what a step may take past its limit: timeout's 10 s before SIGKILL, then the report

# The steps in order: name, time limit in seconds, command (run by bash from the repository root; $PY is the Python,
# $D the generated JPEG dataset, $R the results folder, $S the scratch folder).
STEPS=(env make-data train-resnet50 pytest train-families train-cache loader train-bounds)
declare -A LIMIT=([env]=60 [make-data]=60 [train-resnet50]=240 [pytest]=200 [train-families]=180 [train-cache]=120
                  [loader]=60 [train-bounds]=300)
declare -A CMD=(
    [env]='"$PY" tests/gpu/results.py env "$S/env.json"'
    [make-data]='"$PY" -m fgic.bench loader --make-data "$D" --images 2560'
    [train-resnet50]='bash tests/gpu/bench_set.sh resnet50 "$S" "$R/train_resnet50.json"'
    [train-families]='bash tests/gpu/bench_set.sh families "$S" "$R/train_families.json"'
    [pytest]='"$PY" -m pytest -m gpu $GPU_TESTS -q -rA -p no:cacheprovider $XDIST --junitxml="$S/pytest.xml" -o junit_logging=all'
    [train-cache]='bash tests/gpu/bench_set.sh cache "$S" "$R/train_cache.json"'
    [loader]='bash tests/gpu/bench_set.sh loader "$S" "$R/loader.json"'
    [train-bounds]='bash tests/gpu/bench_set.sh bounds "$S" "$R/train_bounds.json"'
)
# A step runs only when the step it needs passed (the dataset), and none runs after env failed.
declare -A NEEDS=([loader]=make-data [train-cache]=make-data)
# The order is the open issues' priority: ResNet-50's figures (the old and the new default, fgic against a plain
# PyTorch step, eager and compiled, the new default compiled from an empty inductor cache and from a warm one: the
# whole-run figures that decide --compile's default), the tests, the families' (eager and compiled), the cache-fed
# recipes and the original pipeline, the loaders alone; last what bounds ResNet-50's rate (synchronised BatchNorm,
# no BatchNorm, CUDA graphs, and max-autotune, whose autotuning may take the rest of the step: its set keeps the runs
# it finished). GPU_CHECK_STEPS="train-resnet50 pytest" and then the rest fit two remote commands.
# The files holding a `pytest.mark.gpu` test; the others are not imported (they may need packages a GPU machine
# lacks, and a collection error would fail the whole step).
export GPU_TESTS
GPU_TESTS=$(cd "$REPO" && grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')

if ((DRY)); then
    total=0
    for name in "${STEPS[@]}"; do total=$((total + LIMIT[$name])); done
    echo "gpu-check: ${#STEPS[@]} steps; their limits add up to $total s," \
        "each cut to what is left of the ${BUDGET} s budget"
    echo "  PY=$PY  GPU_TESTS=$GPU_TESTS XDIST='-n 4' when pytest-xdist is importable"
    echo "  D, S: a scratch folder (deleted at the end); R: the results folder"
    i=0
    for name in "${STEPS[@]}"; do
        i=$((i + 1))
        printf '  [%d] %-15s %4s s  %s\n' "$i" "$name" "${LIMIT[$name]}" "${CMD[$name]}"
    done
    exit 0
fi

now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }
STARTED_MS=$(now_ms)
DEADLINE_MS=$((STARTED_MS + BUDGET * 1000))
if [[ -z $R ]]; then
    if [[ -n ${OUT:-} ]]; then R=$OUT; else R=gpu-check-$(date +%Y%m%d-%H%M%S); fi
fi
mkdir -p "$R" || { echo "gpu-check: cannot make the results folder $R" >&2; exit 2; }
export R
R=$(cd "$R" && pwd)
# This run's files only: a previous run's benchmark figures must not pass for this one's.
rm -f "$R/summary.md" "$R/results.json" "$R/log.txt" "$R/pytest.xml" "$R/loader.json" "$R/train_resnet50.json" \
    "$R/train_cache.json" "$R/train_bounds.json" "$R/train_families.json"
export S
S=$(mktemp -d "${TMPDIR:-/tmp}/fgic-gpu-check.XXXXXX") || { echo "gpu-check: mktemp failed" >&2; exit 2; }
cleanup() { [[ ${GPU_CHECK_KEEP:-0} == 1 || -z $S || ! -d $S ]] || rm -rf -- "$S"; }
trap cleanup EXIT
# Inductor's cache of this run alone, Triton's inside it (inductor puts it there when TRITON_CACHE_DIR is unset): no
# kernel of an earlier run is found, as on a user's fresh machine; the compile that decides --compile's default has a
# folder of its own (bench_set.sh resnet50).
export TORCHINDUCTOR_CACHE_DIR=$S/inductor
unset TRITON_CACHE_DIR
export D=$S/jpg FGIC_CACHE=$S/cache PYTHONUNBUFFERED=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} XDIST=
LOG=$R/log.txt
STEPS_TSV=$S/steps.tsv
: >"$STEPS_TSV"
cd "$REPO" || exit 2
HAVE_TIMEOUT=0
command -v timeout >/dev/null 2>&1 && HAVE_TIMEOUT=1

say() { echo "gpu-check: $*" | tee -a "$LOG"; }
elapsed_s() { echo $((($(now_ms) - STARTED_MS) / 1000)); }
seconds_since() { local ms=$(($(now_ms) - $1)); echo "$((ms / 1000)).$((ms % 1000 / 100))"; }  # T0_MS -> "12.3"

# run_limited SECONDS COMMAND: COMMAND (a bash command line) killed after SECONDS with all its process group
# (timeout's), SIGKILL 10 s later if it is still there; returns its status, 124 or 137 when it was stopped.
run_limited() {
    if ((HAVE_TIMEOUT)); then
        timeout -k 10 "$1" bash -c "exec $2"
        return
    fi
    # No timeout(1): the command itself (exec) is signalled; children it started may outlive it.
    bash -c "exec $2" &
    local pid=$! rc
    (sleep "$1"; kill -TERM "$pid" 2>/dev/null && : >"$S/timed-out"; sleep 10; kill -KILL "$pid" 2>/dev/null) &
    local watcher=$!
    wait "$pid"
    rc=$?
    kill "$watcher" 2>/dev/null
    if [[ -e $S/timed-out ]]; then rm -f "$S/timed-out"; return 124; fi
    return "$rc"
}

# record NAME STATUS RC SECONDS LIMIT NOTE: one line of steps.tsv; "-" stands for an empty field (read collapses
# adjacent tabs), tabs and newlines in NOTE become spaces.
record() {
    local note=${6//$'\t'/ }
    note=${note//$'\n'/ }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "${3:--}" "$4" "$5" "${note:--}" "${CMD[$1]}" >>"$STEPS_TSV"
}

# report: summary.md and results.json from steps.tsv, the environment and the results so far; plain ones in bash
# when the Python cannot run the report.
report() {
    local final=${1:-0}
    if [[ -s $S/env.json ]] && run_limited 30 \
        '"$PY" tests/gpu/results.py report "$R" "$S/steps.tsv" "$S/env.json" '"$BUDGET $(elapsed_s) $final" \
        >>"$LOG" 2>&1; then
        return
    fi
    {
        echo "# fgic GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
        echo
        echo "No Python could write the full report (see log.txt); the steps, $(elapsed_s) s elapsed of ${BUDGET} s:"
        echo
        echo "| step | result | seconds | limit | note |"
        echo "| --- | --- | ---: | ---: | --- |"
        while IFS=$'\t' read -r name status _rc secs limit note _cmd; do
            echo "| $name | $status | $secs | $limit | $note |"
        done <"$STEPS_TSV"
    } >"$R/summary.md"
}

# run_step NAME: run one step under its limit, cut to the budget left, and record the outcome.
run_step() {
    local name=$1 limit=${LIMIT[$1]} left note="" rc t0 secs status
    t0=$(now_ms)
    {
        echo
        echo "=== [$name] $(date -u +%H:%M:%S), $(elapsed_s) s elapsed: ${CMD[$name]}"
    } | tee -a "$LOG"
    if [[ $name == pytest ]] && ! prepare_pytest 60; then
        record "$name" fail "" "$(seconds_since "$t0")" "$limit" \
            "pytest is not importable by $PY and pip could not install it (no package index?)"
        say "$name: FAIL, pytest is missing (the benchmarks still run)"
        return 1
    fi
    left=$(((DEADLINE_MS - $(now_ms)) / 1000 - GRACE))
    if ((left < 10)); then
        record "$name" "not run" "" 0 "$limit" "out of time: $(elapsed_s) s of the ${BUDGET} s budget used"
        say "$name: not run, out of time"
        return 1
    fi
    if ((limit > left)); then
        note="limit cut from $limit s to the $left s left of the budget; "
        limit=$left
    fi
    run_limited "$limit" "${CMD[$name]}" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    secs=$(seconds_since "$t0")
    case $rc in
        0) status=pass ;;
        124 | 137) status=timeout; note="${note}stopped after its $limit s limit" ;;
        *) status=fail; note="${note}exit status $rc" ;;
    esac
    record "$name" "$status" "$rc" "$secs" "$limit" "${note%; }"
    say "$name: $status in $secs s (limit $limit s); $(elapsed_s) s elapsed of ${BUDGET} s"
    [[ $status == pass ]]
}

# prepare_pytest SECONDS: pytest importable (pip, within SECONDS, installs it where it can), pytest-xdist used when
# it is there.
prepare_pytest() {
    if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
        echo "gpu-check: pytest is not importable by $PY; trying pip (needs a package index)" | tee -a "$LOG"
        local pip='"$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 5 pytest pytest-xdist'
        run_limited "$1" "$pip" 2>&1 | tee -a "$LOG"
        "$PY" -c "import pytest" >/dev/null 2>&1 || return 1
    fi
    if "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST="-n 4"; else XDIST=; fi  # 4 test processes share the GPU
    export XDIST
    echo "gpu-check: pytest $("$PY" -c "import pytest; print(pytest.__version__)")," \
        "${XDIST:-serial (no pytest-xdist)}" | tee -a "$LOG"
}

interrupted() {
    trap - INT TERM
    say "interrupted after $(elapsed_s) s"
    for name in "${STEPS[@]}"; do
        grep -q "^$name"$'\t' "$STEPS_TSV" || record "$name" "not run" "" 0 "${LIMIT[$name]}" "interrupted"
    done
    report 1
    exit 130
}
trap interrupted INT TERM

say "results in $R; scratch $S; budget ${BUDGET} s; $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname 2>/dev/null || echo ?)"
((HAVE_TIMEOUT)) || say "no timeout command here: a stopped step's children may outlive it"

declare -A OUTCOME
env_ok=1
if ! command -v "$PY" >/dev/null 2>&1; then
    record env fail "" 0 "${LIMIT[env]}" "$PY not found; set PYTHON to the Python that has torch"
    echo "no Python: $PY not found; set PYTHON to the Python that has torch" >"$S/problem"
    env_ok=0
elif run_step env; then
    OUTCOME[env]=pass
else
    env_ok=0
fi
report
if ((!env_ok)); then
    reason=$(cat "$S/problem" 2>/dev/null || echo "the environment check did not pass (see $LOG)")
    for name in "${STEPS[@]:1}"; do record "$name" "not run" "" 0 "${LIMIT[$name]}" "env did not pass"; done
    report 1
    echo "gpu-check: FAIL: $reason; summary in $R/summary.md" >&2
    exit 3
fi

for name in "${STEPS[@]:1}"; do
    need=${NEEDS[$name]:-}
    if [[ -n ${GPU_CHECK_STEPS:-} && " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        record "$name" "not run" "" 0 "${LIMIT[$name]}" "not in GPU_CHECK_STEPS"
    elif [[ -n $need && ${OUTCOME[$need]:-} != pass ]]; then
        record "$name" "not run" "" 0 "${LIMIT[$name]}" "$need did not pass"
        say "$name: not run ($need did not pass)"
    elif run_step "$name"; then
        OUTCOME[$name]=pass
    fi
    report
done
report 1

passed=$(grep -c $'^[^\t]*\tpass\t' "$STEPS_TSV")
if ((passed == ${#STEPS[@]})); then
    say "PASS: all ${#STEPS[@]} steps passed in $(elapsed_s) s; $R/summary.md"
    exit 0
fi
say "FAIL: $passed of ${#STEPS[@]} steps passed in $(elapsed_s) s; $R/summary.md"
exit 1
