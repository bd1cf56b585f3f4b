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
STEPS = ["env", "pytest", "make-data", "loader", "train-synthetic", "train-cache", "train-original", "train-families"]


def check(*args, cwd=REPO, timeout=120, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHON", "GPU_CHECK_BUDGET_S")}
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
    assert "| train-original | not run | 0 | 90 | env did not pass |" in summary


def test_report_reads_the_benchmarks_and_pytest_results(tmp_path):
    """tests/gpu/results.py report, on the JSON that fgic.bench writes and a junit file with one failure."""
    jpgs, out = tmp_path / "jpg", tmp_path / "r"
    bench.main(["loader", "--make-data", str(jpgs), "--images", "20"])
    small = ["--resize", "40", "--crop", "32", "--padding", "4", "-w", "0"]
    bench.main(["loader", "-d", str(jpgs), *small, "-b", "4", "--batches", "2", "--warmup", "1",
                "--json", str(out / "loader.json")])
    runs = (("train_synthetic", "resnet18", ["--synthetic"]), ("train_cache", "resnet18", ["-d", str(jpgs)]),
            ("vit", "timm:test_vit", ["--synthetic"]))
    for name, arch, source in runs:
        bench.main(["train", *source, *small, "--arch", arch, "-b", "4", "--steps", "1", "--warmup", "1",
                    "--amp", "off", "--device", "cpu", "--peak-tflops", "1", "--json", str(tmp_path / f"{name}.json")])
    for name in ("train_synthetic", "train_cache"):
        (tmp_path / f"{name}.json").rename(out / f"{name}.json")
    results_py = [sys.executable, str(REPO / "tests" / "gpu" / "results.py")]
    merged = subprocess.run([*results_py, "merge", str(out / "train_families.json"), str(out / "train_synthetic.json"),
                             str(tmp_path / "vit.json")], capture_output=True, text=True, timeout=60)
    assert merged.returncode == 0, merged.stderr
    (tmp_path / "pytest.xml").write_text(  # in the scratch folder, beside env.json, as check.sh leaves it
        '<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4">'
        '<testcase classname="tests.test_gpu" name="test_a"/><testcase classname="tests.test_gpu" name="test_b">'
        '<failure message="boom"/></testcase></testsuite></testsuites>')
    (tmp_path / "env.json").write_text(json.dumps({"torch": "9.9", "torch_cuda": "13.0", "cudnn": 92400,
                                                   "devices": [{"name": "NVIDIA H200"}]}))
    steps = [("env", "pass"), ("pytest", "fail"), ("make-data", "pass"), ("loader", "pass"),
             ("train-synthetic", "pass"), ("train-cache", "pass"), ("train-original", "timeout"),
             ("train-families", "pass")]
    (tmp_path / "steps.tsv").write_text("".join(f"{n}\t{s}\t0\t1.5\t60\t-\tcmd\n" for n, s in steps))
    res = subprocess.run([*results_py, "report", str(out),
                          str(tmp_path / "steps.tsv"), str(tmp_path / "env.json"), "450", "99", "1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "results.json").read_text())
    loader, synthetic, cached = (json.loads((out / f"{n}.json").read_text())
                                 for n in ("loader", "train_synthetic", "train_cache"))
    vit = json.loads((tmp_path / "vit.json").read_text())
    assert result["ok"] is False and result["bench"] == {
        "loader": loader, "train-synthetic": synthetic, "train-cache": cached,
        "train-families": {"resnet18": synthetic, "timm:test_vit": vit}}
    assert result["pytest"] == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1, "passed": 2,
                                "failed": ["tests.test_gpu::test_b"]}
    figures = result["figures"]
    assert figures["env"].startswith("NVIDIA H200; torch 9.9, CUDA 13.0")
    assert figures["pytest"] == "2 passed, 1 failed, 0 errors, 1 skipped"
    assert figures["loader"].startswith(f"fgic {loader['fgic_images_per_second']:,.0f} img/s, original "
                                        f"{loader['baseline_images_per_second']:,.0f} img/s: {loader['ratio']:.1f}x")
    assert f"{100 * synthetic['fraction_of_peak']:.1f}% of 1" in figures["train-synthetic"]
    share = cached["images_per_second"] / synthetic["images_per_second"]
    assert f"= {100 * cached['prep_fraction_of_step']:.2f}% of a step; {100 * share:.1f}% of synthetic" in \
        figures["train-cache"]
    assert figures["train-families"].startswith(f"resnet18 at 32 px: {synthetic['images_per_second']:,.0f} img/s")
    assert f"; timm:test_vit at 32 px: {vit['images_per_second']:,.0f} img/s" in figures["train-families"]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# fgic GPU check: FAIL") and "- tests.test_gpu::test_b" in summary
    assert f"| train-cache | pass | 1.5 | 60 | {figures['train-cache']} |" in summary
