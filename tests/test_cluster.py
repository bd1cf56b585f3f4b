"""fgic.cluster: how a process was started, read from its environment alone, and the commands that start fgic.ddp."""
import socket
import subprocess
import sys

import pytest

from fgic import cluster
from fgic.errors import FgicError
from tests.helpers import REPO, fgic_env


def test_single_process_by_default():
    assert cluster.detect({}) == cluster.Launch("single")


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert cluster.detect(env) == cluster.Launch("torchrun", 3, 8, 1, 2, "n1", 29500)
    assert cluster.detect(env).launcher == "torchrun"


@pytest.mark.parametrize("marker", ["SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_DEBUG_JOB_ID"])
def test_a_submitit_job_is_recorded_as_launched_by_submitit(marker):
    # submitit exports torchrun's variables for its tasks: the rendezvous is torchrun's, the launcher submitit
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29500", marker: "slurm"}
    launch = cluster.detect(env)
    assert (launch.kind, launch.rank, launch.launcher) == ("torchrun", 1, "submitit")
    assert cluster.detect({marker: "1"}) == cluster.Launch("single", launcher="submitit")


def test_srun_task_environment(monkeypatch):
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)  # no scontrol: the built-in parser
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    launch = cluster.detect(env)
    assert launch == cluster.Launch("srun", 5, 8, 1, 4, "gpu007", 10000 + 123456 % 20000)
    assert cluster.detect({**env, "MASTER_PORT": "1234"}).master_port == 1234


@pytest.mark.parametrize("spec,node,here", [("4(x2)", "1", 4), ("2,1", "1", 1), ("2(x2),1", "2", 1),
                                             ("2(x2),1", "1", 2), ("3", None, 3)])
def test_an_srun_tasks_local_world_is_its_nodes_share(monkeypatch, spec, node, here):
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_NTASKS": "5", "SLURM_LOCALID": "0",
           "SLURM_STEP_TASKS_PER_NODE": spec, "SLURM_JOB_NODELIST": "n[1-3]"}
    if node is not None:
        env["SLURM_NODEID"] = node
    assert cluster.detect(env).local_world_size == here


def test_torchruns_variables_set_by_hand_in_a_slurm_step_take_slurms_place_on_the_node(monkeypatch):
    """RANK and WORLD_SIZE from a job script's srun line without LOCAL_RANK: every task was local rank 0, so all of a
    node's tasks took GPU 0."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29555", "SLURM_STEP_ID": "0",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2"}
    assert cluster.detect(env) == cluster.Launch("torchrun", 1, 2, 1, 2, "n1", 29555)
    assert cluster.local_rank(env) == 1


def test_an_srun_steps_rendezvous_is_master_addr_when_set(monkeypatch):
    """init_process_group (env://) takes MASTER_ADDR where it is set: the port check and config.json name that host,
    not the node list's first."""
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[007-008]"}
    assert cluster.detect(env).master_addr == "gpu007"
    assert cluster.detect({**env, "MASTER_ADDR": "login-given"}).master_addr == "login-given"


def test_batch_script_without_srun_is_a_single_process():
    # sbatch --ntasks=4 runs the script once: SLURM_NTASKS is set but there is no step id.
    assert cluster.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "a1"}).kind == "single"


@pytest.mark.parametrize("env", [
    {}, {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "0",
         "SLURM_NTASKS": "4"},
    {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "a1"},
    {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "a1"},  # a batch script
    {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "a1"}])
def test_the_local_rank_that_prints_a_nodes_errors_is_detects(env, monkeypatch):
    """run_cli lets a node's first process print an error every process finds: the same rank detect gives, read
    without the rendezvous (which may itself be the error)."""
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    assert cluster.local_rank(env) == cluster.detect(env).local_rank


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("gpu[003-005,9],cpu1", "gpu003"),
                                            ("a1,b2", "a1"), ("rack2-n[10-12]", "rack2-n10")])
def test_first_host_without_scontrol(monkeypatch, nodelist, first):
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    assert cluster.first_host(nodelist) == first


def test_parse_gpus():
    assert cluster.parse_gpus("0,2") == [0, 2] and cluster.parse_gpus(None) == []
    with pytest.raises(FgicError, match="-g/--gpu"):
        cluster.parse_gpus("zero")


def test_several_gpus_on_a_workstation_relaunch_through_torchrun(monkeypatch):
    seen = {}
    monkeypatch.setattr(cluster.os, "execv", lambda exe, cmd: seen.update(exe=exe, cmd=cmd))
    cluster.relaunch_per_gpu([0, 2], ["-d", "cub", "-g", "0,2"])
    assert seen["cmd"][1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "fgic.ddp", "-d", "cub", "-g", "0,2"]


def test_one_process_is_plain_python_several_are_torchrun():
    assert cluster.command(["-d", "x"]) == [sys.executable, "-m", "fgic.ddp", "-d", "x"]
    assert cluster.command([], 3, program=("script.py",))[1:] == ["-m", "torch.distributed.run", "--standalone",
                                                                  "--nproc_per_node=3", "script.py"]
    assert cluster.command([], 1, nnodes=2, node_rank=1, master=("h", 7))[1:] == [
        "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--nproc_per_node=1", "--master_addr=h",
        "--master_port=7", "-m", "fgic.ddp"]


@pytest.fixture
def taken_port():
    with socket.socket() as server:
        server.bind(("", 0))
        server.listen()
        yield server.getsockname()[1]


def test_a_taken_rendezvous_port_is_one_line_with_a_free_one(taken_port):
    with pytest.raises(FgicError, match=rf"port {taken_port} on n1 \(the port derived from job 77\) is in use.*"
                                        r"`export MASTER_PORT=\d+`"):
        cluster.check_port("n1", taken_port, {"SLURM_JOB_ID": "77"})
    with pytest.raises(FgicError, match=r"\(MASTER_PORT\) is in use"):
        cluster.check_port("n1", taken_port, {"MASTER_PORT": str(taken_port)})


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
    cluster.check_port("localhost", port, {})


@pytest.mark.e2e
def test_launch_torchrun_checks_the_port_on_the_first_node(taken_port):
    env = fgic_env(SLURM_JOB_ID="5", SLURM_NNODES="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost,other",
                   MASTER_PORT=str(taken_port), CUDA_VISIBLE_DEVICES="", PATH="/usr/bin:/bin")
    res = subprocess.run([sys.executable, "-m", "launch.torchrun", "-d", "demo"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"launch.torchrun: error: rendezvous port {taken_port} on localhost (MASTER_PORT) is "
                               f"in use"), lines
