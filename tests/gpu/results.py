"""The GPU check's Python side (tests/gpu/check.sh runs it; the standard library only, but for `env`'s checks):

  python3 tests/gpu/results.py env ENV_JSON          versions, nvidia-smi and a CUDA round trip; exit 3 without
                                                     a usable torch + CUDA GPU (the reason: one line on stderr
                                                     and in a file `problem` beside ENV_JSON)
  python3 tests/gpu/results.py report RESULTS_DIR STEPS_TSV ENV_JSON BUDGET_S ELAPSED_S FINAL
                                                     summary.md and results.json from what the steps left
  python3 tests/gpu/results.py merge OUT_JSON LABEL=BENCH_JSON...
                                                     fgic.bench results in one file, by label
"""
from __future__ import annotations

import importlib
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

NEEDED = ("torch", "torchvision", "numpy", "PIL", "tqdm")  # what fgic's GPU paths import
OPTIONAL = ("pytest", "xdist")
# Each step's file: {label: an fgic.bench result} (bench_set.sh).
BENCH_FILES = {"train-resnet50": "train_resnet50.json", "train-families": "train_families.json",
               "train-cache": "train_cache.json", "loader": "loader.json", "train-bounds": "train_bounds.json"}
TARGETS = ("ResNet-50 at 448 px bf16 batch 128 >= 2,400 images/s compiled (else what bounds it: train-bounds), fgic / "
           "reference >= 1.0 eager and compiled; the new default >= 3x the old; ViT-B/16 >= 35% of peak; ConvNeXt-T >= "
           "1.5x 743 images/s; the cache within 5% of synthetic data, for the seed's recipe and tv-v2's; loader >= 10x "
           "the original pipeline")


def env(out: Path) -> int:
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    for name in NEEDED + OPTIONAL:
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # noqa: BLE001  (any import failure is a missing package here)
            info[name] = None
            info[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    info["nvidia_smi"] = _nvidia_smi()
    problem = None
    missing = [n for n in NEEDED if info[n] is None]
    if missing:
        problem = f"{sys.executable} cannot import {', '.join(missing)} ({info[missing[0] + '_error']})"
    else:
        problem = _cuda(info)
    if problem is None:
        try:
            importlib.import_module("fgic.bench")
        except Exception as exc:  # noqa: BLE001
            problem = f"fgic does not import: {type(exc).__name__}: {exc}"
    info["problem"] = problem
    out.write_text(json.dumps(info, indent=2) + "\n")
    for key, value in info.items():
        if key != "nvidia_smi":
            print(f"{key}: {value}")
    print(info["nvidia_smi"]["output"])
    if problem:
        (out.parent / "problem").write_text(problem + "\n")
        print(f"gpu-check: {problem}", file=sys.stderr)
        return 3
    return 0


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"found": False, "output": "nvidia-smi: not on the PATH"}
    out = {"found": True}
    for key, args in (("output", []), ("query", ["--query-gpu=name,driver_version,memory.total",
                                                 "--format=csv,noheader"])):
        try:
            res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
            out[key] = (res.stdout + res.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            out[key] = f"nvidia-smi {' '.join(args)}: {exc}"
    return out


def _cuda(info: dict) -> str | None:
    """Fill in torch's CUDA facts; the problem in one line, or None."""
    import torch  # noqa: PLC0415
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["cuda_available"] = torch.cuda.is_available()
    if not torch.version.cuda:
        return f"no CUDA GPU: torch {torch.__version__} at {sys.executable} is built without CUDA"
    if not torch.cuda.is_available():
        return f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none"
    info["devices"] = [{"name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i)),
                        "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2 ** 30, 1)}
                       for i in range(torch.cuda.device_count())]
    info["bf16"] = torch.cuda.is_bf16_supported()
    if torch.ones(1000, device="cuda").sum().item() != 1000:
        return "the GPU computed a wrong sum of 1000 ones"
    return None


# ------------------------------------------------------------------------------------------------------ report


def report(folder: Path, steps_tsv: Path, env_json: Path, budget: int, elapsed: int, final: bool) -> None:
    steps = [dict(zip(("name", "status", "rc", "seconds", "limit", "note", "command"),
                      ("" if field == "-" else field for field in line.split("\t"))))  # "-": empty (check.sh)
             for line in steps_tsv.read_text().splitlines() if line.strip()]
    environment = _read_json(env_json) or {}
    bench = {step: r for step, name in BENCH_FILES.items() if (r := _read_json(folder / name)) is not None}
    tests = _junit(env_json.parent / "pytest.xml")  # check.sh's scratch folder: its junit XML does not come back
    figures = {s["name"]: _figures_or_why(s["name"], environment, tests, bench) if s["status"] != "not run" else ""
               for s in steps}
    ok = final and len(steps) > 0 and all(s["status"] == "pass" for s in steps)
    result = {"ok": ok, "finished": final, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "elapsed_seconds": elapsed, "budget_seconds": budget, "steps": steps, "figures": figures,
              "env": environment, "pytest": tests, "bench": bench}
    (folder / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "summary.md").write_text(_summary(result))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _junit(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def _figures_or_why(*args) -> str:
    try:
        return _figures(*args)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError) as exc:  # a report, not a check
        return f"figures unreadable ({type(exc).__name__}: {exc})"


def _figures(step: str, environment: dict, tests: dict | None, bench: dict) -> str:
    """The step's key figures, in words, from what it wrote."""
    if step == "env":
        devices = environment.get("devices") or []
        gpu = devices[0]["name"] if devices else "no GPU"
        return (f"{gpu}; torch {environment.get('torch')}, CUDA {environment.get('torch_cuda')}, cuDNN "
                f"{environment.get('cudnn')}, Python {environment.get('python')}")
    if step == "pytest":
        if tests is None:
            return "no pytest.xml"
        return (f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                f"{tests['skipped']} skipped")
    r = bench.get(step)
    if r is None:
        return ""
    if step == "loader":
        return "; ".join(f"{label}: fgic {one['fgic_images_per_second']:,.0f} img/s, original "
                         f"{one['baseline_images_per_second']:,.0f} img/s: {one['ratio']:.1f}x ({one['workers']} "
                         f"workers, batch {one['batch_size']})" for label, one in r.items())
    text = "; ".join(f"{label}: {_train_figures(one)}" for label, one in r.items())
    return "; ".join([text, *_comparisons(step, r, bench)])


def _comparisons(step: str, r: dict, bench: dict) -> list[str]:
    """The ratios the open issues ask of a set: the new default against the old, compiled against eager, cache-fed
    against synthetic, and each bound against the step it bounds."""
    def ratio(a: str, b: str, what: str, source: dict = r) -> list[str]:
        if a in r and b in source:
            return [f"{what} {r[a]['images_per_second'] / source[b]['images_per_second']:.2f}x"]
        return []
    if step == "train-resnet50":
        return (ratio("new-default", "old-default", "new default / old") +
                ratio("bf16-b128-compiled", "bf16-b128", "compiled / eager") + _whole_run(r))
    if step == "train-families":
        return [x for arch in sorted({label.removesuffix("-compiled") for label in r})
                for x in ratio(f"{arch}-compiled", arch, f"{arch} compiled / eager")]
    resnet50 = bench.get("train-resnet50") or {}
    # GPU_CHECK_STEPS without train-resnet50: the steps these are measured against are in another command's folder
    missing = [] if resnet50 else ["no ratio to ResNet-50's synthetic steps: no train-resnet50 results in this folder"]
    if step == "train-bounds":
        return (missing + ratio("sync-bn", "bf16-b128", "SyncBN / plain BN", resnet50) +
                ratio("no-batchnorm", "bf16-b128", "without BatchNorm / with, eager", resnet50) +
                ratio("no-batchnorm-compiled", "bf16-b128-compiled", "without BatchNorm / with, compiled", resnet50) +
                ratio("cuda-graphs", "bf16-b128-compiled", "CUDA graphs / default mode", resnet50) +
                ratio("max-autotune", "bf16-b128-compiled", "max-autotune-no-cudagraphs / default mode", resnet50))
    return (missing + ratio("seed", "bf16-b128", "seed from the cache / synthetic", resnet50) +
            ratio("tv-v2", "tv-v2-synthetic", "tv-v2 from the cache / synthetic") +
            ratio("original", "bf16-b128", "the original pipeline / synthetic", resnet50))


# What decides --compile's default: a whole CUB-sized run (fgic.config.RECIPE's 128 epochs of CUB's 5,994 training
# images at the default batch, 64 on one GPU), eager against compiled, the compile included.
CUB_TRAIN_IMAGES, RECIPE_EPOCHS = 5994, 128


def _whole_run(r: dict) -> list[str]:
    """The training steps of a whole CUB run, eager (new-default) and compiled (new-default-compiled): the warm-up
    (compile, cuDNN's trials) once, then the remaining steps at the timed rate. The evaluations, eager in both, are
    left out. With new-default-compiled-warm, the warm-up a requeued or resumed job pays again (inductor's cache
    filled)."""
    if "new-default" not in r or "new-default-compiled" not in r:
        return []

    def seconds(one: dict) -> float:
        steps = RECIPE_EPOCHS * (CUB_TRAIN_IMAGES // one["batch_size"])
        return one["warmup_seconds"] + (steps - one["warmup_steps"]) * one["step_ms"] / 1000
    eager, compiled = seconds(r["new-default"]), seconds(r["new-default-compiled"])
    warm = r.get("new-default-compiled-warm")
    again = f", {warm['warmup_seconds']:.0f} s with inductor's cache filled" if warm else ""
    return [f"CUB {RECIPE_EPOCHS} epochs' steps eager {eager / 60:.1f} min, compiled {compiled / 60:.1f} min (warm-up "
            f"{r['new-default-compiled']['warmup_seconds']:.0f} s{again}): compiled / eager time "
            f"{compiled / eager:.2f}"]


def _train_figures(r: dict) -> str:
    text = f"{r['images_per_second']:,.0f} img/s, {r['step_ms']:.1f} ms/step, {r['achieved_tflops']:.1f} TFLOP/s"
    if r.get("fraction_of_peak") is not None:
        text += f" = {100 * r['fraction_of_peak']:.1f}% of {r['peak_tflops']:g}"
    if r.get("cudagraph_skips"):
        text += f"; CUDA GRAPHS SKIPPED {r['cudagraph_skips']} time(s) (inductor's log says why)"
    if r.get("synchronised_batchnorms"):
        text += f"; {r['synchronised_batchnorms']} BatchNorms synchronised"
    if r.get("reference_ratio") is not None:
        text += (f"; reference {r['reference_images_per_second']:,.0f} img/s, fgic / reference "
                 f"{r['reference_ratio']:.2f}")
    if r.get("prep_fraction_of_step") is not None:
        text += f"; prep {r['prep_ms_per_batch']:.2f} ms/batch = {100 * r['prep_fraction_of_step']:.2f}% of a step"
    if not r.get("loss_is_finite", True):
        text += "; LOSS NOT FINITE"
    return text


def merge(out: Path, pairs: list[str]) -> int:
    """One JSON of several fgic.bench results, keyed by their labels (check.sh's sets)."""
    labelled = [pair.partition("=")[::2] for pair in pairs]
    results = {label: r for label, path in labelled if (r := _read_json(Path(path))) is not None}
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if len(results) == len(pairs) else 1


def _summary(result: dict) -> str:
    environment = result["env"]
    smi = (environment.get("nvidia_smi") or {}).get("query") or "nvidia-smi: none"
    verdict = ("PASS" if result["ok"] else "FAIL") if result["finished"] else "RUNNING (partial results)"
    passed = sum(s["status"] == "pass" for s in result["steps"])
    lines = [f"# fgic GPU check: {verdict}", "",
             f"{passed} of {len(result['steps'])} steps passed; {result['elapsed_seconds']} s elapsed of the "
             f"{result['budget_seconds']} s budget; written {result['written']}.", "",
             f"- GPU (nvidia-smi): {smi}",
             f"- torch {environment.get('torch')} (CUDA {environment.get('torch_cuda')}, cuDNN "
             f"{environment.get('cudnn')}), torchvision {environment.get('torchvision')}, numpy "
             f"{environment.get('numpy')}, Pillow {environment.get('PIL')}, pytest {environment.get('pytest')}, "
             f"pytest-xdist {environment.get('xdist')}; Python {environment.get('python')} "
             f"({environment.get('executable')})", ""]
    if environment.get("problem"):
        lines += [f"**{environment['problem']}**", ""]
    lines += ["| step | result | seconds | limit | key figures | note |", "| --- | --- | ---: | ---: | --- | --- |"]
    for s in result["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit']} | "
                     f"{result['figures'].get(s['name'], '')} | {s['note']} |")
    tests = result["pytest"]
    if tests and tests["failed"]:
        lines += ["", "Failed tests (their output: log.txt):", ""] + [f"- {t}" for t in tests["failed"]]
    lines += ["", f"Targets, for orientation (issue 27): {TARGETS}.", "",
              "Files: results.json (all of it), log.txt (every step's output, pytest's included), and the "
              "benchmarks' train_resnet50.json, train_families.json, train_cache.json, loader.json, "
              "train_bounds.json.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"] and len(argv) == 2:
        return env(Path(argv[1]))
    if argv[:1] == ["merge"] and len(argv) >= 2:
        return merge(Path(argv[1]), argv[2:])
    if argv[:1] == ["report"] and len(argv) == 7:
        report(Path(argv[1]), Path(argv[2]), Path(argv[3]), int(argv[4]), int(argv[5]), argv[6] == "1")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
