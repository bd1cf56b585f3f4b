"""tests/gpu/results.py's arithmetic on made-up benchmark results: each figure from the right run, in the right
direction (the report of real fgic.bench output: tests/test_gpu_check.py)."""
from __future__ import annotations

import importlib.util

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("gpu_results", REPO / "tests" / "gpu" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def run(images_per_second: float, step_ms: float = 50.0, warmup_seconds: float = 10.0, batch_size: int = 64,
        **more) -> dict:
    return {"images_per_second": images_per_second, "step_ms": step_ms, "achieved_tflops": 100.0,
            "warmup_seconds": warmup_seconds, "warmup_steps": 8, "batch_size": batch_size, **more}


def test_the_whole_run_projection_takes_eager_compiled_and_warm_from_their_runs():
    """128 epochs x 93 steps of 64 (CUB's 5,994 images): eager 10 + 11,896 x 0.050 s = 10.1 min, compiled
    100 + 11,896 x 0.040 s = 9.6 min, 0.95 of eager; the warm compile's warm-up is the warm run's."""
    r = {"new-default": run(1280, step_ms=50, warmup_seconds=10),
         "new-default-compiled": run(1600, step_ms=40, warmup_seconds=100),
         "new-default-compiled-warm": run(1600, step_ms=40, warmup_seconds=20)}
    assert results._whole_run(r) == ["CUB 128 epochs' steps eager 10.1 min, compiled 9.6 min (warm-up 100 s, 20 s "
                                     "with inductor's cache filled): compiled / eager time 0.95"]


def test_each_ratio_divides_the_run_by_the_one_it_is_measured_against():
    resnet50 = {"old-default": run(400), "new-default": run(1200), "bf16-b128": run(1000, batch_size=128),
                "bf16-b128-compiled": run(2000, batch_size=128)}
    bounds = {"sync-bn": run(900), "no-batchnorm": run(3000), "no-batchnorm-compiled": run(5000),
              "cuda-graphs": run(2200, cudagraph_skips=0), "max-autotune": run(2100)}
    cache = {"seed": run(990), "tv-v2": run(600), "tv-v2-synthetic": run(800), "original": run(450)}
    families = {"vit_b_16": run(500), "vit_b_16-compiled": run(600), "convnext_tiny": run(700),
                "convnext_tiny-compiled": run(1400)}
    bench = {"train-resnet50": resnet50, "train-bounds": bounds, "train-cache": cache, "train-families": families}
    assert results._comparisons("train-resnet50", resnet50, bench) == ["new default / old 3.00x",
                                                                        "compiled / eager 2.00x"]
    assert results._comparisons("train-bounds", bounds, bench) == [
        "SyncBN / plain BN 0.90x", "without BatchNorm / with, eager 3.00x", "without BatchNorm / with, compiled 2.50x",
        "CUDA graphs / default mode 1.10x", "max-autotune-no-cudagraphs / default mode 1.05x"]
    assert results._comparisons("train-cache", cache, bench) == [
        "seed from the cache / synthetic 0.99x", "tv-v2 from the cache / synthetic 0.75x",
        "the original pipeline / synthetic 0.45x"]
    assert results._comparisons("train-families", families, bench) == [  # in the same order on every run
        "convnext_tiny compiled / eager 2.00x", "vit_b_16 compiled / eager 1.20x"]


def test_without_resnet50s_runs_the_report_says_so_rather_than_dropping_ratios():
    """A check split over two commands (GPU_CHECK_STEPS): the second folder has no train-resnet50 file."""
    cache = {"seed": run(990), "tv-v2": run(600), "tv-v2-synthetic": run(800)}
    assert results._comparisons("train-cache", cache, {"train-cache": cache}) == [
        "no ratio to ResNet-50's synthetic steps: no train-resnet50 results in this folder",
        "tv-v2 from the cache / synthetic 0.75x"]


def test_cuda_graphs_that_did_not_run_are_said():
    assert "CUDA GRAPHS SKIPPED 2 time(s)" in results._train_figures(run(2000, cudagraph_skips=2))
    assert "SKIPPED" not in results._train_figures(run(2000, cudagraph_skips=0))
