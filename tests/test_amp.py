"""Mixed precision: bf16 and fp16 autocast train end to end (on the CPU here; tests/test_gpu.py covers CUDA)."""
import json

import pytest
import torch

from tests.helpers import run_fgic, tiny_args

pytestmark = pytest.mark.e2e  # every test here starts processes


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_modes_train(tiny_data, tmp_path, amp):
    # 32 px: fp16 convolutions on the CPU take 87 s for this run at the tiny runs' 64 px
    res = run_fgic(["-d", str(tiny_data), *tiny_args(epochs=1, resize=40, crop=32), "-a", amp,
                    "--output-dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr  # a log file or a Slurm log gets whole lines, not tqdm's frames
    run = tmp_path / "tiny" / f"resnet18-{amp}-s2020"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_total"] == 101
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in ckpt["model"].items() if v.is_floating_point())
    assert bool(ckpt["scaler"]) == (amp == "fp16")  # fp16 scales the loss, bf16 needs no scaler
