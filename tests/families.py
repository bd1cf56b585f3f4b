"""The backbone families of issue 14 trained end to end on the CPU (tests/test_families_e2e.py): each family's smallest
member at a small crop, 2 steps on 1 and 2 processes, the rounding-only control (tests.rounding_control), torch's
own masks, and a 2-process run stopped after its first step by a signal to every process, then resumed."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import torch

from fgic import drop, models
from fgic.config import get_args_parser
from fgic.demo import make_tiny
from tests.helpers import final_weights, max_difference, popen, read_jsonl, run_fgic, same_result, tiny_args, workers

# family: (smallest torchvision member, the smallest crop its structure takes near 64, flags). torchvision builds its
# ViTs without dropout and stochastic depth: --dropout 0.1 gives one keyed layer per block (and RegNets have none).
# Swin's --dropout is an nn.Dropout in each MLP and an F.dropout in each attention (fgic.drop keys both).
FAMILIES = {
    "vit": ("vit_b_32", 64, ["--dropout", "0.1"], 6),
    "swin": ("swin_t", 64, ["--dropout", "0.1"], 6),
    # each of its 4 stages' grid must divide by its partition size 7 (224 = 7 x 32). At 224 px a batch of 6 took 294 s
    # of a 32-minute CI run; a batch of 2 (one sample a process on 2, normalised over both by fgic's synchronised
    # BatchNorm) cut a 2-process run from 30.6 to 19.5 s of CPU, a 1-process one from 21.7 to 10.0. Not for the others:
    # efficientnet_v2_s at a batch of 2 ended 8.4x its control (3.1e-3 against 3.7e-4), too near the bound of 10x
    "maxvit": ("maxvit_t", 224, [], 2),
    "convnext": ("convnext_tiny", 64, [], 6),
    "efficientnet_v2": ("efficientnet_v2_s", 64, [], 6),
    # RegNet's absolute differences are large here, the control's too (2.04 after 2 steps at lr 0.05, 54.7 after 4;
    # 1.1 at lr 0.005 and 128 px, where the 1 vs 2 counts then differ): a relative measure for it is still to come
    "regnet": ("regnet_y_400mf", 64, [], 6),
    # small CNN and ViT configurations of timm (0.2M and 0.3M parameters) with its DropPath and dropout: test_byobnet
    # norms and activates in one module (BatchNormAct2d, see fgic.syncbn) and runs its 3 DropPaths (test_efficientnet
    # has 4, on blocks without a skip, which never call them), at 0.3: at 0.1 few of its 12 x 3 draws drop, and after
    # 4 steps torch's masks moved it 8.7e-4 against a control of 8.2e-5 (0.3: 1.5e-3 against 6e-7); test_vit is built
    # for the crop
    "timm_cnn": ("timm:test_byobnet", 64, ["--drop-path", "0.3"], 6),
    "timm_vit": ("timm:test_vit", 64, ["--drop-path", "0.1", "--dropout", "0.1"], 6),
}
# One epoch of 2 steps of the family's global batch, lr raised so that 2 steps of SGD move the weights (the seed's rule
# would give 0.0023 at a batch of 6). 2 epochs of 2 steps took the families' tests 1056 s of a 28-minute CI run.
LR, EPOCHS = "0.05", 1
# The resume test signals as soon as config.json appears (just before the first step; the stop handler is installed
# from the start), and each stop check sleeps STEP_SLEEP_S first, so the signal lands before step 1's check on any
# machine (the test's polling and kill take well under a second) and the run stops at step 1 of 2.
STEP_SLEEP_S = 2.0
CONTROL_FLAGS = {"w1": "--plain-to", "torch_masks": "--torch-masks-to"}  # the runs tests.rounding_control makes first


def make_data(root: Path, batch: int) -> Path:
    """2 steps of the global batch in training images, as many test images but at least one a class (a short exact
    evaluation; 3 images split 2 and 1 over 2 processes), over 3 classes."""
    return make_tiny(root, spread(2 * batch), spread(max(batch, 3)))


def spread(n: int) -> tuple[int, int, int]:
    """n images over 3 classes, as evenly as they go."""
    return tuple(n // 3 + (c < n % 3) for c in range(3))


class FamilyRuns:
    """A family's runs, each made on first use: w1, w2 (1 and 2 processes), control (1 process, batches reversed),
    torch_masks (1 process, torch's own stochastic depth and dropout, where the family has any); w1, control and
    torch_masks in one process (tests.rounding_control; a 2-process torch_masks run cost 10.5 CPU-s more a family).
    Only w2's folder is kept (the resume test's reference); of the others, their weights and metrics."""

    def __init__(self, family: str, tmp: Path):
        self.arch, self.crop, self.extra, batch = FAMILIES[family]
        self.data, self.tmp = make_data(tmp / "data" / f"fam{batch}", batch), tmp
        self.test_images = sum(1 for _ in (self.data / "test").rglob("*.jpg"))
        sizes = tiny_args(crop=self.crop, resize=self.crop + self.crop // 8, epochs=EPOCHS, batch_size=batch)
        self.args = ["-d", str(self.data), *sizes, "--arch", self.arch, "--lr", LR, *self.extra]
        self.masks = has_masks(family_model(self.arch, self.crop, self.extra))
        self.folders: dict[str, Path] = {}
        self.results: dict[str, tuple[dict, list[dict]]] = {}

    def result(self, key: str) -> tuple[dict, list[dict]]:
        """The run's final weights and its metrics.jsonl rows."""
        if key not in self.results:
            run = self.run(key)
            self.results[key] = (final_weights(run),
                                 read_jsonl(run / "metrics.jsonl"))
            if key != "w2":
                shutil.rmtree(run)
        return self.results[key]

    def run(self, key: str) -> Path:
        if key not in self.folders:
            if key in ("w1", "control", "torch_masks"):  # the plain run, torch's masks, the control: one process
                made = ["w1", "torch_masks", "control"] if self.masks else ["w1", "control"]
                first = [x for k in made[:-1] for x in (CONTROL_FLAGS[k], str(self.tmp / k))]
                res = run_fgic([*self.args, "--output-dir", str(self.tmp / "control")], timeout=900,
                               program=("-m", "tests.rounding_control", *first))
            else:
                res = run_fgic([*self.args, "--output-dir", str(self.tmp / key)], nproc=2, timeout=900)
                made = [key]
            assert res.returncode == 0, res.stdout + res.stderr
            self.folders.update({k: self.folder(self.tmp / k) for k in made})
        return self.folders[key]

    def folder(self, out: Path) -> Path:
        return out / self.data.name / f"{self.arch.replace(':', '-')}-off-s2020"


def family_model(arch: str, crop: int, extra: list[str]) -> torch.nn.Module:
    """fgic's build of the arch with the family's flags (its stochastic depth and dropout), for 3 classes."""
    config = get_args_parser().parse_args(["-d", "x", *extra])
    return models.build(arch, 3, "none", crop=crop, stochastic_depth=config.stochastic_depth, dropout=config.dropout)


def has_masks(model: torch.nn.Module) -> bool:
    """Whether the model has stochastic depth or dropout at a rate above 0."""
    return any(isinstance(m, drop.KeyedDrop) and m.p > 0 for m in model.modules())


def check_one_result(runs: FamilyRuns) -> None:
    """1 and 2 processes agree up to float rounding (within 10x the rounding control) and evaluate the same images
    to the same counts; torch's own masks (where the family has any) move the result far more: the bound would catch
    2 processes whose masks were not the 1-process run's (torch's per-process ones, in a plain DDP port)."""
    masks = runs.masks
    (w1, m1), (control_weights, _) = runs.result("w1"), runs.result("control")  # their folders gone before w2's
    (w2, m2) = runs.result("w2")
    control = max_difference(control_weights, w1)
    two = max_difference(w2, w1)
    figures = f"{runs.arch}, max abs weight difference from 1 process after 2 steps: rounding control {control:.3g}, " \
              f"2 processes {two:.3g}"
    torch_own = max_difference(runs.result("torch_masks")[0], w1) if masks else None
    if masks:
        figures += f", torch's own masks {torch_own:.3g}"
    print(figures)
    assert control > 0  # the control measures rounding (were it 0, the bound below would demand bitwise)
    assert two <= 10 * control, (two, control)
    if masks:
        assert torch_own > 10 * max(two, control), (torch_own, two, control)
    assert [r["test_total"] for r in m2] == [r["test_total"] for r in m1] == [runs.test_images] * EPOCHS
    assert [r["test_correct"] for r in m2] == [r["test_correct"] for r in m1]


def check_resume(runs: FamilyRuns) -> None:
    """2 processes, SIGUSR2 to both (as Slurm signals a step's processes) before their first step ends: stopped at
    that step's boundary, then the same command ends bitwise as the uninterrupted 2-process run."""
    out = runs.tmp / "resume"
    args = [*runs.args, "--output-dir", str(out)]
    run = runs.folder(out)
    proc = popen(args, 2, FGIC_TEST_STEP_SLEEP_S=str(STEP_SLEEP_S))
    pids = workers(proc, 2)
    deadline = time.time() + 900
    while not (run / "config.json").is_file():  # written just before the first step
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    for pid in pids:
        subprocess.run(["kill", "-USR2", str(pid)], check=True)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode != 0 and "stopped by SIGUSR2" in err, err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 1), (ckpt["epoch"], ckpt["step"])  # mid-epoch: 1 of 2 steps
    res = run_fgic(args, nproc=2, timeout=900)
    assert res.returncode == 0 and "at epoch 1, step 1" in res.stdout, res.stdout + res.stderr
    same_result(run, runs.run("w2"))
