"""CUDA-only paths (NCCL, torch's SyncBatchNorm, CUDA AMP): `pytest -m gpu` on a GPU machine; skipped without CUDA."""
import json

import pytest
import torch

from fgic import models
from tests.conftest import read_jsonl, run_fgic, tiny_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_args(epochs=1, workers=2):
    return tiny_args(epochs=epochs, device="cuda", workers=workers)


def test_sync_batchnorm_on_cuda_is_torchs():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    assert isinstance(models.sync_batchnorm(model, torch.device("cuda"), True)[1], torch.nn.SyncBatchNorm)
    assert type(models.sync_batchnorm(model, torch.device("cuda"), False, True)[1]) is torch.nn.BatchNorm2d


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_one_gpu_trains_with_each_amp_mode(tiny_data, tmp_path, amp):
    res = run_fgic(["-d", str(tiny_data), *cuda_args(), "-a", amp, "--output-dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr
    run = tmp_path / "tiny" / f"resnet18-{amp}-s2020"
    assert json.loads((run / "config.json").read_text())["device"].startswith("cuda")
    assert json.loads((run / "summary.json").read_text())["test_total"] == 101
    assert bool(torch.load(run / "checkpoint.pt", weights_only=True)["scaler"]) == (amp == "fp16")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_nccl_sync_bn_match_one(tiny_data, tmp_path):
    out = {}
    for n in (1, 2):
        res = run_fgic(["-d", str(tiny_data), *cuda_args(epochs=2, workers=0), "--output-dir", str(tmp_path / str(n))],
                       nproc=n)
        assert res.returncode == 0, res.stderr
        run = tmp_path / str(n) / "tiny" / "resnet18-off-s2020"
        out[n] = (torch.load(run / "checkpoint.pt", weights_only=True)["model"], read_jsonl(run / "metrics.jsonl"))
    diff = max((out[1][0][k] - out[2][0][k]).abs().max().item() for k in out[1][0] if k.endswith(("weight", "bias")))
    print(f"max abs weight difference, 2 GPUs vs 1: {diff:.3g}")
    assert diff < 1e-2
    assert [m["test_total"] for m in out[2][1]] == [101, 101]
    assert [m["test_correct"] for m in out[1][1]] == [m["test_correct"] for m in out[2][1]]
