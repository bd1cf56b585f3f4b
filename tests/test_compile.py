"""--compile: training through torch.compile (inductor; on the CPU here) gives the uncompiled run's result up to the
compiler's float rounding, on 1 process and on 2 (gloo), and its checkpoint holds the plain model's keys, so resuming
and evaluating need no flag; a compiled run stopped mid-epoch resumes bitwise; the keyed stochastic depth and dropout
compile once."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from fgic import cluster, compiling, drop
from fgic.demo import make_tiny
from fgic.dist import Dist
from tests.helpers import final_weights, max_difference, popen, read_jsonl, run_fgic, same_result, tiny_args, workers

pytestmark = pytest.mark.e2e  # every test here starts processes

RUN = ("tiny8", "resnet18-off-s2020")
GRAPH_CACHES = {"fxgraph", "aotautograd"}  # inductor's and AOT autograd's graphs in its folder; the rest: kernels


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    """48 train images: 4 steps per epoch at the global batch of 12 (a stop signal lands mid-epoch)."""
    return make_tiny(tmp_path_factory.mktemp("d") / "tiny8", (16, 16, 16), (10, 10, 10))


class Runs:
    """The tiny run (2 epochs, --deterministic) as each test asks for it: "plain" and "plain2" (1 and 2 processes, not
    compiled), "w1" and "w2" (1 and 2 processes, --compile), "control" (w1 with each batch's samples reversed:
    tests.rounding_control). The compiled runs share one inductor cache, so w1's graphs serve the control and w2's a
    resumed w2 (CPU compiles cost minutes cold)."""

    def __init__(self, data: Path, root: Path):
        self.data, self.root, self.made, self.stdout = data, root, {}, {}
        self.inductor = root / "inductor"

    def args(self, out: Path, compiled: bool = True) -> list[str]:
        return ["-d", str(self.data), *tiny_args(), *(["--compile"] if compiled else []),
                "--output-dir", str(out)]

    def env(self, name: str) -> dict:
        plain = name.startswith("plain")
        return {"TORCHINDUCTOR_CACHE_DIR": str(self.root / "plain-inductor" if plain else self.inductor)}

    def folder(self, name: str) -> Path:
        if name not in self.made:
            out = self.root / name
            program = ("-m", "tests.rounding_control") if name == "control" else cluster.FGIC_DDP
            res = run_fgic(self.args(out, not name.startswith("plain")), nproc=2 if name.endswith("2") else 1,
                           timeout=1200, program=program, **self.env(name))
            assert res.returncode == 0, res.stderr[-3000:]
            self.made[name], self.stdout[name] = out.joinpath(*RUN), res.stdout
        return self.made[name]

    def weights(self, name: str) -> dict:
        return final_weights(self.folder(name))


@pytest.fixture(scope="module")
def runs(data8, tmp_path_factory):
    return Runs(data8, tmp_path_factory.mktemp("compile"))


def test_compiled_training_matches_the_uncompiled_run(runs):
    """Up to float rounding: within 10x the rounding control. 8 steps at this batch size amplify rounding a lot (the
    control moves the weights by ~1e-2 and the running variances by ~1), so the control is the only fair yardstick."""
    plain, compiled = runs.weights("plain"), runs.weights("w1")
    assert not any(f.is_file() for f in (runs.root / "plain-inductor").rglob("*"))  # (SGD alone makes the folder)
    assert any(f.is_file() for f in runs.inductor.rglob("*"))  # the compiler ran
    assert json.loads((runs.folder("w1") / "config.json").read_text())["compile"] is True
    assert compiled.keys() == plain.keys()  # no "_orig_mod." or "model." prefix
    diff, control = max_difference(compiled, plain), max_difference(runs.weights("control"), compiled)
    print(f"max abs difference, compiled vs not after 2 epochs: {diff:.3g}; rounding control {control:.3g}")
    assert 0 < control and diff <= 10 * control, (diff, control)


def test_compiled_on_two_processes_matches_one_within_rounding(runs):
    """--compile under torchrun (DDP's graph splitter, the synchronized BatchNorm's collectives in the graph): 2
    processes end where 1 does, up to float rounding (within 10x the rounding control, as tests/families.py).
    Before the fix the 2-process run died in the splitter: 'float' object has no attribute 'target'."""
    w1 = runs.weights("w1")
    control, two = max_difference(runs.weights("control"), w1), max_difference(runs.weights("w2"), w1)
    print(f"compiled, max abs weight difference from 1 process: rounding control {control:.3g}, 2 processes {two:.3g}")
    assert 0 < control and two <= 10 * control, (two, control)
    ones, twos = (read_jsonl(runs.folder(n) / "metrics.jsonl") for n in ("w1", "w2"))
    assert [m["test_total"] for m in twos] == [m["test_total"] for m in ones] == [30, 30]


def test_a_compile_failure_on_one_rank_is_one_warning_and_every_rank_goes_on_eager(runs, tmp_path):
    """No working C++ compiler for inductor (tests.compile_fails: CXX names no file) on rank 1 of 2: rank 0 compiles
    (from w2's cache), rank 1 fails, and both train eager from the first step on. The records and weights are the
    --no-compile run's, bit for bit; the records say "compiled": false. Before fgic.compiling the run died in a
    BackendCompilerFailed traceback (and rank 0 waited in its first BatchNorm's collective for a rank that had left).
    A failure on the only process: test_a_failing_compiler_leaves_the_step_eager_in_process."""
    runs.folder("w2")  # rank 0's graphs in the shared cache: it compiles in seconds, not minutes
    out, empty = tmp_path / "failing", tmp_path / "empty-inductor-cache"
    empty.mkdir()
    res = run_fgic(runs.args(out), nproc=2, timeout=1200, program=("-m", "tests.compile_fails", "1", str(empty)),
                   **runs.env("w2"))
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("fgic: warning: --compile failed (") and \
        "No working C++ compiler" in warnings[0] and warnings[0].endswith("); training eager"), warnings
    run, plain = out.joinpath(*RUN), runs.folder("plain2")
    records = read_jsonl(run / "metrics.jsonl")
    assert [r.pop("compiled") for r in records] == [False, False]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # as --no-compile's, to compare
    same_result(run, plain)
    assert not (run / compiling.CACHE_FILE).exists()  # nothing compiled, nothing saved


def test_compiled_two_process_run_stopped_mid_epoch_resumes_bitwise(runs, tmp_path):
    """... and resumed on "another node" (an inductor folder without any graph), it compiles no graph: every one
    comes from the run folder's mega-cache (torch.compiler.save_cache_artifacts), which the first session wrote. That
    node's folder holds the C++ kernels a CPU graph loads, as one that ran this model before would: the mega-cache has
    a GPU's Triton kernels, not those, and in an empty folder inductor built 84 of them again (120 CPU-s of the
    resumed run against 37: BENCHMARKS.md), which is the C++ compiler's time, not fgic's."""
    runs.folder("w2")  # the uninterrupted run (its first step's line below), its kernels and graphs in the shared cache
    out = tmp_path / "stopped"
    run = out.joinpath(*RUN)
    args = runs.args(out)
    proc = popen(args, 2, FGIC_TEST_STEP_SLEEP_S="1", **runs.env("w2"))
    pids = workers(proc, 2)
    deadline = time.time() + 1200
    while not (run / "checkpoint.pt").is_file():  # epoch 1 (and its compile) done: the signal lands inside epoch 2
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.5)  # epoch 2's first 3 steps wait 1 s each at their stop check
    os.kill(pids[-1], signal.SIGUSR2)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "stopped by SIGUSR2" in err, err[-3000:]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], 0 < ckpt["step"] < 4) == (1, True), (ckpt["epoch"], ckpt["step"])
    assert (run / compiling.CACHE_FILE).stat().st_size > 0
    elsewhere = tmp_path / "another-nodes-inductor"
    shutil.copytree(runs.inductor, elsewhere, ignore=lambda folder, names: GRAPH_CACHES & set(names))
    res = run_fgic(args, nproc=2, timeout=1200, TORCHINDUCTOR_CACHE_DIR=str(elsewhere))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming {run / 'checkpoint.pt'} at epoch 2, step {ckpt['step']}" in res.stdout
    cold = re.search(r"--compile: first step ([\d.]+) s, mode default; inductor's cache: (\d+) graph\(s\) found, "
                     r"(\d+) compiled", runs.stdout["w2"])
    warm = re.search(r"--compile: first step ([\d.]+) s, mode default; inductor's cache: (\d+) graph\(s\) found, "
                     r"(\d+) compiled", res.stdout)
    print(f"first compiled step of 2 processes: {cold[1]} s (w2: {cold[2]} found, {cold[3]} compiled), resumed "
          f"from the run folder's mega-cache {warm[1]} s")
    assert int(warm[2]) > 0 and warm[3] == "0", res.stdout
    assert any(f.is_file() for f in (elsewhere / "fxgraph").rglob("*"))  # filled from the mega-cache
    same_result(run, runs.folder("w2"))


def test_keyed_drop_layers_compile_once_and_draw_the_eager_masks():
    """The sample keys reach KeyedDrop as a module attribute that changes every step (fgic.drop.keyed): dynamo takes
    it as a graph input, so new keys neither recompile nor get baked in, and the compiled masks are eager's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), drop.KeyedDrop(0.5, "element", 0), torch.nn.Linear(16, 8),
                                drop.KeyedDrop(0.5, "row", 1))
    model.train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    x = torch.randn(6, 8)
    outputs = []
    for step in range(3):
        keys = torch.arange(6) + 100 * step
        with drop.keyed(model, keys):
            eager, ours = model(x), compiled(x)
        torch.testing.assert_close(ours, eager)
        outputs.append(ours)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not torch.equal(outputs[0], outputs[1])  # the masks moved with the keys


def test_a_failing_compiler_leaves_the_step_eager_in_process(tmp_path, monkeypatch, capsys):  # in-process
    """fgic.compiling on one process, the compiler made unusable through inductor's own setting (cpp.cxx, which CXX
    sets) and an empty cache: one warning, the eager module's output, `compiled` false, no mega-cache written."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    step = compiling.compiled(module, Dist(cluster.Launch("single"), torch.device("cpu")), "default", tmp_path, None)
    x = torch.randn(4, 8)
    with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/c++")}):
        out = step(x)
    assert torch.equal(out, module(x)) and step.compiled is False
    assert torch.equal(step(x), module(x))  # and eager from then on
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("fgic:")] == \
        [f"fgic: warning: --compile failed ({step.reason}); training eager"] and "C++ compiler" in step.reason
    assert not (tmp_path / compiling.CACHE_FILE).exists()


class TwoGraphs(torch.nn.Module):
    """Two BatchNorms with a graph break between them: dynamo compiles and runs the first graph before it compiles
    the second."""
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x * 2)


def test_a_compile_failing_after_a_graph_ran_leaves_one_steps_statistics(tmp_path, monkeypatch):  # in-process
    """The eager retry of a step whose second graph failed to compile: BatchNorm's running statistics count the step
    once (the first graph had updated them: twice, before the buffers were kept)."""
    compiles = []

    class SecondFails:  # inductor's stand-in: the first graph as traced, the second raises
        def __init__(self, *args):
            pass

        def __call__(self, gm, example_inputs):
            compiles.append(gm)
            if len(compiles) == 2:
                raise RuntimeError("the second graph's lowering failed")
            return gm.forward
    monkeypatch.setattr(torch, "_TorchCompileInductorWrapper", SecondFails)
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours, eager = TwoGraphs(), TwoGraphs()
    eager.load_state_dict(ours.state_dict())
    step = compiling.compiled(ours, Dist(cluster.Launch("single"), torch.device("cpu")), "default", tmp_path,
                              str(tmp_path))
    x = torch.randn(8, 4)
    out = step(x)
    assert len(compiles) == 2 and step.compiled is False and "second graph" in step.reason
    assert torch.equal(out, eager(x))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), eager.state_dict().values()))
    assert ours.a.num_batches_tracked.item() == 1
