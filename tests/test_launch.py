"""launch.torchrun works out the torchrun command from the Slurm allocation or the visible GPUs."""
import sys

import pytest

from fgic import dist
from launch import torchrun


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)


def test_two_slurm_nodes_with_four_gpus_each():
    env = {"SLURM_JOB_ID": "777", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_JOB_NODELIST": "gpu[12-13]"}
    assert torchrun.command(["-d", "cub"], env) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--nproc_per_node=4",
        "--master_addr=gpu12", f"--master_port={10000 + 777}", "-m", "fgic.ddp", "-d", "cub"]


def test_slurm_cpu_nodes_run_one_process_each():
    env = {"SLURM_JOB_ID": "5", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "CUDA_VISIBLE_DEVICES": "",
           "MASTER_PORT": "4000"}
    cmd = torchrun.command([], env)
    assert "--nproc_per_node=1" in cmd and "--master_port=4000" in cmd and "--master_addr=n1" in cmd


def test_one_process_in_all_is_a_plain_process_with_its_own_exit_code():
    env = {"SLURM_JOB_ID": "5", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "1"}
    assert torchrun.command(["-d", "x"], env) == [sys.executable, "-m", "fgic.ddp", "-d", "x"]


@pytest.mark.parametrize("visible,expected", [("", ["-m", "fgic.ddp", "-d", "x"]), ("0", ["-m", "fgic.ddp", "-d", "x"]),
                                              ("0,1,2", ["-m", "torch.distributed.run", "--standalone",
                                                         "--nproc_per_node=3", "-m", "fgic.ddp", "-d", "x"])])
def test_outside_slurm_one_process_per_visible_gpu(visible, expected):
    assert torchrun.command(["-d", "x"], {"CUDA_VISIBLE_DEVICES": visible})[1:] == expected
