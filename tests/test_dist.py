import socket
import subprocess

import pytest
import torch

from fgic import cluster, dist
from fgic.errors import FgicError
from tests.helpers import REPO, fgic_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
@pytest.mark.parametrize("flag,gpus,match", [("cuda", [], "--device cuda"), ("auto", [0], "-g/--gpu 0"),
                                             ("cpu", [1], "--device cpu")])
def test_missing_cuda_names_the_flag(flag, gpus, match):
    with pytest.raises(FgicError, match=match):
        dist.pick_device(flag, gpus, 0)


def test_cpu_device_without_cuda():
    assert dist.pick_device("cpu", [], 0) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pick_and_absent_id():
    n = torch.cuda.device_count()
    assert dist.pick_device("auto", [], 0) == torch.device("cuda", 0)
    assert dist.pick_device("auto", [n - 1], 0) == torch.device("cuda", n - 1)
    with pytest.raises(FgicError, match=f"-g/--gpu {n}"):
        dist.pick_device("auto", [n], 0)


LATE_PEER = """
import sys, time, torch
from fgic import cluster, dist
d = dist.Dist.start(cluster.detect(), torch.device("cpu"))
print(f"rank {d.rank} joined", flush=True)
late = (lambda: time.sleep(14)) if d.rank == 1 else (lambda: None)  # rank 1's set-up is slow (a cache build)
if sys.argv[1] == "agree":
    d.agree(late)
else:
    late()
d.all_reduce_sum(torch.ones(1))  # a training collective: it waits FGIC_COLLECTIVE_TIMEOUT_S at most
d.close()
"""


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["agree", "plain"])
def test_a_slow_set_up_step_is_waited_for_past_the_collective_timeout(tmp_path, how):
    """Set-up steps (scan, cache build) that take one node longer than the others are waited for under agree();
    the training collectives' short timeout would otherwise fail the job, as the plain run shows. (10 s, not less:
    on torch 2.4 the same timeout also bounds the workers' own rendezvous.)"""
    script = tmp_path / "late.py"
    script.write_text(LATE_PEER)
    res = subprocess.run(cluster.command([how], 2, program=(str(script),)), cwd=REPO,
                         env=fgic_env(FGIC_COLLECTIVE_TIMEOUT_S="10"),
                         capture_output=True, text=True, timeout=120)
    assert "rank 0 joined" in res.stdout and "rank 1 joined" in res.stdout, res.stderr  # the group started
    if how == "agree":
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode != 0 and "Timed out waiting" in res.stderr, res.stderr  # the collective


def test_rank_0_of_srun_tasks_checks_the_port_before_listening():
    with socket.socket() as server:
        server.bind(("", 0))
        server.listen()
        taken_port = server.getsockname()[1]
        launch = cluster.Launch("srun", 0, 2, 0, 2, "localhost", taken_port)
        with pytest.raises(FgicError, match=f"port {taken_port}"):
            dist.Dist.start(launch, torch.device("cpu"))
