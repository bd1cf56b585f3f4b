"""tests/gpu/check.sh, the one command for the GPU machine, exercised without a GPU: its plan, its refusal without
CUDA, a step stopped at its limit, and its report from real benchmark output."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from fgic import bench
from tests.helpers import REPO

pytestmark = pytest.mark.e2e  # every test here starts processes

CHECK = REPO / "tests" / "gpu" / "check.sh"
STEPS = ["env", "make-data", "train-resnet50", "pytest", "train-families", "train-cache", "loader", "train-bounds"]


def check(*args, cwd=REPO, timeout=120, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHON", "GPU_CHECK_BUDGET_S", "GPU_CHECK_STEPS")}
    return subprocess.run(["bash", str(CHECK), *args], cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_lists_the_steps_and_runs_benchmarks_md_commands(tmp_path):
    res = check("--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    listed = re.findall(r"^  \[(\d)\] (\S+) +(\d+) s  (.+)$", res.stdout, re.M)
    assert [name for _, name, _, _ in listed] == STEPS
    total = sum(int(limit) for _, _, limit, _ in listed)
    assert f"limits add up to {total} s, each cut to what is left of the 450 s budget" in res.stdout
    commands = {name: cmd for _, name, _, cmd in listed}
    assert "-m pytest -m gpu $GPU_TESTS" in commands["pytest"]
    marked = sorted(f"tests/{f.name}" for f in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in f.read_text())
    assert "tests/test_gpu.py" in marked and f"GPU_TESTS={' '.join(marked)} " in res.stdout  # every gpu test's file
    text = (REPO / "BENCHMARKS.md").read_text()
    block = text[text.index("## GPU"):].split("```")[1]
    assert block.startswith("\nbash tests/gpu/check.sh [RESULTS_DIR]")
    assert [line for line in block.splitlines()[2:] if not line.startswith("#")] == list(commands.values())
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_without_cuda_it_fails_in_one_line_and_still_writes_the_summary(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    res = check(str(tmp_path / "r"), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", TMPDIR=str(scratch))
    assert res.returncode == 3
    assert res.stderr.splitlines()[-1].startswith("gpu-check: FAIL: no CUDA GPU: torch "), res.stderr
    out = tmp_path / "r"
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "summary.md"]
    result = json.loads((out / "results.json").read_text())
    assert result["ok"] is False and result["finished"] is True
    assert [(s["name"], s["status"]) for s in result["steps"]] == \
           [("env", "fail")] + [(name, "not run") for name in STEPS[1:]]
    import torch  # noqa: PLC0415
    assert result["env"]["torch"] == torch.__version__ and result["env"]["cuda_available"] is False
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# fgic GPU check: FAIL") and "**no CUDA GPU: torch" in summary
    assert all(f"| {name} | not run |" in summary for name in STEPS[1:])
    assert f"torch: {torch.__version__}" in (out / "log.txt").read_text()
    assert list(scratch.iterdir()) == []  # the scratch folder is removed


def test_a_step_past_its_limit_is_stopped_and_reported(tmp_path):
    """A Python that hangs: the env step is stopped at its limit (the 27 s budget less 15 s of grace, less what
    the start took), with its process; the report falls back to bash, into $OUT when no folder is given."""
    pid_file = tmp_path / "pid"
    hang = tmp_path / "python3"
    hang.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 120\n")
    hang.chmod(0o755)
    start = time.monotonic()
    res = check(OUT=str(tmp_path / "out"), PYTHON=str(hang), GPU_CHECK_BUDGET_S="27", TMPDIR=str(tmp_path))
    assert res.returncode == 3 and time.monotonic() - start < 30, res.stdout
    seconds, limit = re.search(r"env: timeout in (\d+\.\d) s \(limit (\d+) s\)", res.stdout).groups()
    assert int(limit) in (10, 11, 12) and int(limit) <= float(seconds) < int(limit) + 2
    assert res.stderr.splitlines()[-1].startswith("gpu-check: FAIL: the environment check did not pass")
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "No Python could write the full report" in summary
    assert (f"| env | timeout | {seconds} | {limit} | limit cut from 60 s to the {limit} s left of the budget; "
            f"stopped after its {limit} s limit |") in summary
    assert "| train-bounds | not run | 0 | 300 | env did not pass |" in summary


def test_gpu_check_steps_runs_only_the_steps_named(tmp_path):
    """GPU_CHECK_STEPS splits the check over two remote commands: the steps not named are reported as not run."""
    fake = tmp_path / "python3"  # env passes, the report falls back to bash, any other command just says it ran
    fake.write_text('#!/bin/bash\nif [[ $2 == env ]]; then echo {} > "$3"; exit 0; fi\n'
                    '[[ $2 == report ]] && exit 1\necho "ran $*"\n')
    fake.chmod(0o755)
    res = check(str(tmp_path / "r"), PYTHON=str(fake), GPU_CHECK_STEPS="make-data train-cache", TMPDIR=str(tmp_path))
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "| make-data | pass |" in summary and "| train-cache | pass |" in summary, res.stdout
    for name in ("train-resnet50", "pytest", "train-families", "loader", "train-bounds"):
        assert f"| {name} | not run | 0 |" in summary and "not in GPU_CHECK_STEPS" in summary
    assert res.returncode == 1


def test_the_compile_that_decides_the_default_finds_no_other_runs_kernels(tmp_path):
    """bench_set.sh resnet50: new-default-compiled (the cold compile of the whole-run figure) gets an inductor folder
    of its own, which new-default-compiled-warm then finds filled; the other runs keep check.sh's."""
    fake = tmp_path / "python3"  # records each fgic.bench run's inductor folder; merging passes
    fake.write_text('#!/bin/bash\n[[ $1 == -m ]] || exit 0\n'
                    'echo "${TORCHINDUCTOR_CACHE_DIR:-unset} ${*: -1}" >> "$(dirname "$0")/runs"\n')
    fake.chmod(0o755)
    scratch = tmp_path / "s"
    scratch.mkdir()
    res = subprocess.run(["bash", str(REPO / "tests" / "gpu" / "bench_set.sh"), "resnet50", str(scratch),
                          str(tmp_path / "out.json")], env={**os.environ, "PY": str(fake),
                                                            "TORCHINDUCTOR_CACHE_DIR": "/check/inductor"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    own = f"{scratch}/inductor-new-default"
    assert (tmp_path / "runs").read_text().splitlines() == [
        f"/check/inductor {scratch}/{label}.json" for label in ("old-default", "new-default", "bf16-b128",
                                                               "bf16-b128-compiled")] + [
        f"{own} {scratch}/new-default-compiled.json", f"{own} {scratch}/new-default-compiled-warm.json"]
    assert f"--- resnet50 new-default-compiled: TORCHINDUCTOR_CACHE_DIR={own} fgic.bench train --synthetic" \
        in res.stdout


def test_report_reads_the_benchmarks_and_pytest_results(tmp_path):
    """tests/gpu/results.py report, on the JSON that fgic.bench writes (merged by label as bench_set.sh does) and a
    junit file with one failure."""
    jpgs, out = tmp_path / "jpg", tmp_path / "r"
    out.mkdir()
    bench.main(["loader", "--make-data", str(jpgs), "--images", "20"])
    small = ["--resize", "40", "--crop", "32", "--padding", "4", "-w", "0"]
    bench.main(["loader", "-d", str(jpgs), *small, "-b", "4", "--batches", "2", "--warmup", "1",
                "--json", str(tmp_path / "loader-seed.json")])
    runs = (("old-default", "resnet18", ["--synthetic"]), ("new-default", "resnet18", ["--synthetic", "--reference"]),
            ("bf16-b128", "resnet18", ["--synthetic"]), ("seed", "resnet18", ["-d", str(jpgs)]),
            ("vit", "timm:test_vit", ["--synthetic"]), ("no-batchnorm", "resnet18", ["--synthetic", "--no-batchnorm"]))
    for name, arch, source in runs:
        bench.main(["train", *source, *small, "--arch", arch, "-b", "4", "--steps", "1", "--warmup", "1",
                    "--amp", "off", "--device", "cpu", "--peak-tflops", "1", "--json", str(tmp_path / f"{name}.json")])
    results_py = [sys.executable, str(REPO / "tests" / "gpu" / "results.py")]
    files = {label: tmp_path / f"{label}.json" for label, _, _ in runs}
    # stand-ins: new-default's warm-up and step time, read as compiled (from an empty inductor cache and a warm one)
    files["new-default-compiled"] = files["new-default-compiled-warm"] = files["new-default"]
    sets = (("train_resnet50", ["old-default", "new-default", "bf16-b128", "new-default-compiled",
                                "new-default-compiled-warm"]),
            ("train_cache", ["seed"]), ("train_families", ["vit"]), ("train_bounds", ["no-batchnorm"]))
    for name, pairs in (*((name, [f"{label}={files[label]}" for label in labels]) for name, labels in sets),
                        ("loader", [f"seed={tmp_path / 'loader-seed.json'}"])):
        merged = subprocess.run([*results_py, "merge", str(out / f"{name}.json"), *pairs],
                                capture_output=True, text=True, timeout=60)
        assert merged.returncode == 0, merged.stderr
    (tmp_path / "pytest.xml").write_text(  # in the scratch folder, beside env.json, as check.sh leaves it
        '<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">'
        '<testcase classname="tests.test_gpu" name="test_a"/><testcase classname="tests.test_gpu" name="test_b">'
        '<failure message="boom"/></testcase></testsuite></testsuites>')
    (tmp_path / "env.json").write_text(json.dumps({"torch": "9.9", "torch_cuda": "13.0", "cudnn": 92400,
                                                   "devices": [{"name": "NVIDIA H200"}]}))
    steps = [("env", "pass"), ("make-data", "pass"), ("train-resnet50", "pass"), ("pytest", "fail"),
             ("train-families", "pass"), ("train-cache", "pass"), ("loader", "pass"), ("train-bounds", "timeout")]
    (tmp_path / "steps.tsv").write_text("".join(f"{n}\t{s}\t0\t1.5\t60\t-\tcmd\n" for n, s in steps))
    res = subprocess.run([*results_py, "report", str(out),
                          str(tmp_path / "steps.tsv"), str(tmp_path / "env.json"), "540", "99", "1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "results.json").read_text())
    one = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name, _, _ in runs}
    loader = json.loads((tmp_path / "loader-seed.json").read_text())
    assert result["ok"] is False and result["bench"] == {
        "loader": {"seed": loader},
        "train-resnet50": {**{k: one[k] for k in ("old-default", "new-default", "bf16-b128")},
                           "new-default-compiled": one["new-default"], "new-default-compiled-warm": one["new-default"]},
        "train-cache": {"seed": one["seed"]}, "train-families": {"vit": one["vit"]},
        "train-bounds": {"no-batchnorm": one["no-batchnorm"]}}
    assert result["pytest"] == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1, "passed": 2,
                                "failed": ["tests.test_gpu::test_b"]}
    figures = result["figures"]
    assert figures["env"].startswith("NVIDIA H200; torch 9.9, CUDA 13.0")
    assert figures["pytest"] == "2 passed, 1 failed, 0 errors, 1 skipped"
    assert figures["loader"].startswith(f"seed: fgic {loader['fgic_images_per_second']:,.0f} img/s, original "
                                        f"{loader['baseline_images_per_second']:,.0f} img/s: {loader['ratio']:.1f}x")
    old, new, synthetic, cached = one["old-default"], one["new-default"], one["bf16-b128"], one["seed"]
    assert figures["train-resnet50"].startswith(f"old-default: {old['images_per_second']:,.0f} img/s")
    assert f"{100 * synthetic['fraction_of_peak']:.1f}% of 1" in figures["train-resnet50"]
    assert (f"reference {new['reference_images_per_second']:,.0f} img/s, fgic / reference "
            f"{new['reference_ratio']:.2f}") in figures["train-resnet50"]
    ratio = new["images_per_second"] / old["images_per_second"]
    steps = 128 * (5994 // 4)  # the recipe's epochs of CUB's training images at this batch
    whole = (new["warmup_seconds"] + (steps - 1) * new["step_ms"] / 1000) / 60
    assert figures["train-resnet50"].endswith(
        f"; new default / old {ratio:.2f}x; CUB 128 epochs' steps eager {whole:.1f} min, compiled {whole:.1f} min "
        f"(warm-up {new['warmup_seconds']:.0f} s, {new['warmup_seconds']:.0f} s with inductor's cache filled): "
        f"compiled / eager time 1.00")
    share = cached["images_per_second"] / synthetic["images_per_second"]
    assert f"= {100 * cached['prep_fraction_of_step']:.2f}% of a step; seed from the cache / synthetic {share:.2f}x" \
        in figures["train-cache"]
    assert figures["train-families"] == f"vit: {bench_figures(one['vit'])}"
    bound = one["no-batchnorm"]["images_per_second"] / synthetic["images_per_second"]
    assert figures["train-bounds"] == (f"no-batchnorm: {bench_figures(one['no-batchnorm'])}; without BatchNorm / "
                                       f"with, eager {bound:.2f}x")
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# fgic GPU check: FAIL") and "- tests.test_gpu::test_b" in summary
    assert f"| train-cache | pass | 1.5 | 60 | {figures['train-cache']} |" in summary


def bench_figures(r: dict) -> str:
    return (f"{r['images_per_second']:,.0f} img/s, {r['step_ms']:.1f} ms/step, {r['achieved_tflops']:.1f} TFLOP/s = "
            f"{100 * r['fraction_of_peak']:.1f}% of 1")
