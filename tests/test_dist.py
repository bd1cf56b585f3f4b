import socket
import subprocess
import sys

import pytest
import torch

from fgic import dist
from fgic.errors import FgicError
from tests.conftest import REPO, fgic_env


def test_single_process_by_default():
    assert dist.detect({}) == dist.Launch("single")


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert dist.detect(env) == dist.Launch("torchrun", 3, 8, 1, 2, "n1", 29500)


def test_srun_task_environment(monkeypatch):
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)  # no scontrol: the built-in parser
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    launch = dist.detect(env)
    assert launch == dist.Launch("srun", 5, 8, 1, 4, "gpu007", 10000 + 123456 % 20000)
    assert dist.detect({**env, "MASTER_PORT": "1234"}).master_port == 1234


def test_batch_script_without_srun_is_a_single_process():
    # sbatch --ntasks=4 runs the script once: SLURM_NTASKS is set but there is no step id.
    assert dist.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "a1"}).kind == "single"


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("gpu[003-005,9],cpu1", "gpu003"),
                                            ("a1,b2", "a1"), ("rack2-n[10-12]", "rack2-n10")])
def test_first_host_without_scontrol(monkeypatch, nodelist, first):
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)
    assert dist.first_host(nodelist) == first


def test_parse_gpus():
    assert dist.parse_gpus("0,2") == [0, 2] and dist.parse_gpus(None) == []
    with pytest.raises(FgicError, match="-g/--gpu"):
        dist.parse_gpus("zero")


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


def test_several_gpus_on_a_workstation_relaunch_through_torchrun(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist.os, "execv", lambda exe, cmd: seen.update(exe=exe, cmd=cmd))
    dist.relaunch_per_gpu([0, 2], ["-d", "cub", "-g", "0,2"])
    assert seen["cmd"][1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "fgic.ddp", "-d", "cub", "-g", "0,2"]


LATE_PEER = """
import sys, time, torch
from fgic import dist
d = dist.Dist.start(dist.detect(), torch.device("cpu"))
print(f"rank {d.rank} joined", flush=True)
late = (lambda: time.sleep(14)) if d.rank == 1 else (lambda: None)  # rank 1's set-up is slow (a cache build)
if sys.argv[1] == "agree":
    d.agree(late)
else:
    late()
d.all_reduce_sum(torch.ones(1))  # a training collective: it waits FGIC_COLLECTIVE_TIMEOUT_S at most
d.close()
"""


@pytest.mark.parametrize("how", ["agree", "plain"])
def test_a_slow_set_up_step_is_waited_for_past_the_collective_timeout(tmp_path, how):
    """Set-up steps (scan, cache build) that take one node longer than the others are waited for under agree();
    the training collectives' short timeout would otherwise fail the job, as the plain run shows. (10 s, not less:
    on torch 2.4 the same timeout also bounds the workers' own rendezvous.)"""
    script = tmp_path / "late.py"
    script.write_text(LATE_PEER)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), how], cwd=REPO, env=fgic_env(FGIC_COLLECTIVE_TIMEOUT_S="10"),
                         capture_output=True, text=True, timeout=120)
    assert "rank 0 joined" in res.stdout and "rank 1 joined" in res.stdout, res.stderr  # the group started
    if how == "agree":
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode != 0 and "Timed out waiting" in res.stderr, res.stderr  # the collective


@pytest.fixture
def taken_port():
    with socket.socket() as server:
        server.bind(("", 0))
        server.listen()
        yield server.getsockname()[1]


def test_a_taken_rendezvous_port_is_one_line_with_a_free_one(taken_port):
    with pytest.raises(FgicError, match=rf"port {taken_port} on n1 \(the port derived from job 77\) is in use.*"
                                        r"`export MASTER_PORT=\d+`"):
        dist.check_port("n1", taken_port, {"SLURM_JOB_ID": "77"})
    with pytest.raises(FgicError, match=r"\(MASTER_PORT\) is in use"):
        dist.check_port("n1", taken_port, {"MASTER_PORT": str(taken_port)})
    launch = dist.Launch("srun", 0, 2, 0, 2, "localhost", taken_port)  # rank 0 of srun tasks checks before listening
    with pytest.raises(FgicError, match=f"port {taken_port}"):
        dist.Dist.start(launch, torch.device("cpu"))


def test_a_requeued_jobs_own_closed_connections_do_not_make_the_port_taken():
    """The restart of a requeued job derives the same port; the connections its store closed linger in TIME_WAIT
    on that port, which the store itself (SO_REUSEADDR) may bind over."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
        client.close()
    dist.check_port("localhost", port, {})


def test_launch_torchrun_checks_the_port_on_the_first_node(taken_port):
    env = fgic_env(SLURM_JOB_ID="5", SLURM_NNODES="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost,other",
                   MASTER_PORT=str(taken_port), CUDA_VISIBLE_DEVICES="", PATH="/usr/bin:/bin")
    res = subprocess.run([sys.executable, "-m", "launch.torchrun", "-d", "demo"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"launch.torchrun: error: rendezvous port {taken_port} on localhost (MASTER_PORT) is "
                               f"in use"), lines
