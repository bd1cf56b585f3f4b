"""launch.torchrun works out the torchrun command from the Slurm allocation or the visible GPUs, joins two "nodes"
into one job, and holds the stop signals back until fgic's handlers are in place; launch.submitit plans and checks."""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fgic import cluster
from launch import torchrun
from tests.helpers import REPO, fgic_env, run_fgic, tiny_args


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)


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


HELD_THEN_EXEC = """
import os, signal, sys
from fgic import signals
signals.hold()
os.kill(os.getpid(), signal.SIGUSR2)  # a time-limit warning while the launcher starts: it must not kill it
os.execv(sys.executable, [sys.executable, "-c",
         "from fgic.signals import StopRequest; print(StopRequest().install().signum)"])
"""


SIGNAL_MID_WRITE = """
import os, signal, sys
from fgic.signals import StopRequest
stop = StopRequest().install()

class Busy:  # sys.stderr in the middle of a write (a progress bar), as a handler that used it would find it
    def write(self, text):
        raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")
    flush = write

sys.stderr = Busy()
os.kill(os.getpid(), signal.SIGUSR2)
sys.stderr = sys.__stderr__
print(stop.signum)
"""


@pytest.mark.e2e
def test_the_stop_handler_says_so_without_sys_stderr():
    out = subprocess.run([sys.executable, "-c", SIGNAL_MID_WRITE], cwd=REPO, env=fgic_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "12", out.stderr
    assert out.stderr == "fgic: got SIGUSR2; stopping at the next step boundary\n"


@pytest.mark.e2e
def test_a_signal_during_start_up_reaches_fgics_handler_after_exec():
    out = subprocess.run([sys.executable, "-c", HELD_THEN_EXEC], cwd=REPO, env=fgic_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "12", out.stderr  # SIGUSR2, held back, then handled


def test_submitit_dry_run_plans_one_checked_job_per_combination(tiny_data, tmp_path, capsys):
    from launch import submitit as launcher
    code = launcher.main(["--datasets", str(tiny_data), "--seeds", "0", "1", "--amps", "off", "bf16", "--epochs",
                          "3", "--output-dir", str(tmp_path), "--dry-run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("would submit")]
    assert code == 0 and len(lines) == 4
    assert lines[0].endswith(f"-d {tiny_data} --seed 0 --amp off  ->  {tmp_path}/tiny/resnet50-off-s0")
    assert lines[3].endswith(f"{tmp_path}/tiny/resnet50-bf16-s1") and "--epochs 3" in lines[3]


@pytest.mark.parametrize("gpus,cuda,device,amp", [("0", True, [], "off"), ("2", True, [], "bf16"),
                                                  ("2", False, [], "off"), ("2", True, ["--device", "cpu"], "off")],
                         ids=["cpu-job", "gpu-job", "local-job-without-cuda", "device-cpu"])
def test_submitit_gives_each_job_its_dataset_seed_and_amp_once(tiny_data, tmp_path, capsys, monkeypatch, gpus, cuda,
                                                               device, amp):
    """-d, --seed and --amp name the grid's one value: each job's command holds them once (it showed -d twice), and
    -a auto is bf16 for jobs that train on a GPU, off for the others, as fgic.ddp's auto (the run folder's name holds
    it): a local job on a machine without CUDA, or one given --device cpu, trained in CPU bf16 named so."""
    from launch import submitit as launcher
    monkeypatch.setattr(launcher.torch.cuda, "is_available", lambda: cuda)
    launcher.main(["-d", str(tiny_data), "-s", "4", "--epochs", "3", *device, "--gpus-per-node", gpus, "--cluster",
                   "local", "--output-dir", str(tmp_path), "--dry-run"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("would submit"))
    assert line == (f"would submit: fgic.ddp --epochs 3 {' '.join(device)}{' ' if device else ''}--output-dir "
                    f"{tmp_path} -d {tiny_data} --seed 4 --amp {amp}  ->  {tmp_path}/tiny/resnet50-{amp}-s4"), line


def test_the_launchers_help_says_what_they_do():
    from launch import submitit as launcher
    assert "from the run folder (--resume auto). `--cluster local|debug` runs the same without Slurm" in \
        " ".join(launcher.get_args_parser().format_help().split())
    out = subprocess.run([sys.executable, "-m", "launch.torchrun", "-h"], cwd=REPO, env=fgic_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("`python -m launch.torchrun [fgic.ddp flags]`: start")
    assert "Every flag is fgic.ddp's:" in out.stdout and "usage: fgic.ddp" in out.stdout


def test_submitit_sweeps_any_flag_into_distinct_run_folders(tiny_data, tmp_path, capsys):
    from launch import submitit as launcher
    code = launcher.main(["--datasets", str(tiny_data), "--seeds", "0", "--sweep", "lr=0.05,0.1", "--sweep",
                          "arch=resnet18,resnet50", "--max-parallel", "2", "--output-dir", str(tmp_path), "--dry-run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("would submit")]
    assert code == 0 and [line.rpartition("  ->  ")[2] for line in lines] == [
        f"{tmp_path}/tiny/{arch}-off-s0-lr{lr}" for lr in ("0.05", "0.1") for arch in ("resnet18", "resnet50")]
    assert "--lr 0.1 --arch resnet50 -n lr0.1" in lines[3]


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "0"], "--datasets: name at least one dataset"),
    (["--datasets", "/nowhere", "--seeds", "0"], "-d /nowhere: no such folder"),
    (["-d", "DATA", "--amps", "fp8"], "-a/--amp 'fp8': choose auto, off, fp16 or bf16"),
    (["-d", "DATA", "--sweep", "lr=0.1,x"], "--sweep lr=x: argument --lr: invalid float value: 'x'"),
    (["-d", "DATA", "--sweep", "arch=resnet18,nonet"], "--arch nonet"),
    # a grid flag beside its plural: the grid's values replaced it without a word (-s 5 trained seed 0)
    (["-d", "DATA", "--datasets", "DATA"], "--datasets and -d: give one of them"),
    (["--datasets", "DATA", "--seeds", "0", "-s", "5"], "--seeds and -s: give one of them"),
    (["--datasets", "DATA", "--seeds", "0", "-s5"], "--seeds and -s: give one of them"),
    (["--datasets", "DATA", "--amps", "off", "-a", "bf16"], "--amps and -a: give one of them"),
    # fgic.ddp trains on one GPU a process: GPUs sat idle (or were shared) without a word
    (["-d", "DATA", "--gpus-per-node", "2", "--tasks-per-node", "1"], "--tasks-per-node 1 with --gpus-per-node 2: "
                                                                      "each process trains on one GPU, so GPUs would "
                                                                      "sit idle; leave --tasks-per-node out"),
    (["-d", "DATA", "--gpus-per-node", "2", "--tasks-per-node", "4"], "so GPUs would be shared"),
])
def test_submitit_checks_every_combination_before_submitting(tiny_data, argv, message):
    from fgic.errors import FgicError
    from launch import submitit as launcher
    with pytest.raises(FgicError, match=re.escape(message)):
        launcher.main([str(tiny_data) if a == "DATA" else a for a in argv] + ["--dry-run"])


# sinfo --Node --format=%P|%c|%G as on a cluster whose default partition mixes node types (typed GPUs, sockets)
NODES = """gpu*|32|gpu:4
gpu*|48|gpu:a100:4(S:0-1)
gpu*|96|gpu:a100:2,gpu:v100:2
gpu*|6|gpu:2
gpu*|64|(null)
big|40|gpu:4
big|8|(null)"""
FAKE_SINFO = """#!/bin/bash
part=""
while [ $# -gt 0 ]; do [ "$1" = --partition ] && part="$2"; shift; done
printf '%s\\n' "$SINFO_NODES" | while IFS= read -r row; do
    p="${row%%|*}"; { [ -z "$part" ] || [ "${p%\\*}" = "$part" ]; } && echo "$row"
done
"""


def fake_bin(tmp_path, **scripts) -> str:
    """A PATH with these stand-ins first."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


@pytest.mark.parametrize("flags,env,expected", [
    # the fewest CPUs per GPU among the default partition's nodes with 4 GPUs or more: 32/4 (not 6/2, not big's)
    (["--gpus-per-node", "4"], {}, "4 task(s), 4 GPU(s) per node, --cpus-per-task 8 (8 CPUs per GPU on the nodes "
                                   "of the default partition, from sinfo)"),
    (["--gpus-per-node", "2"], {}, "--cpus-per-task 3 (3 CPUs per GPU"),  # 6/2 now fits
    (["--gpus-per-node", "4", "--partition", "big"], {}, "--cpus-per-task 10 (10 CPUs"),
    (["--gpus-per-node", "4"], {"SBATCH_PARTITION": "big"}, "--cpus-per-task 10 (10 CPUs per GPU on the nodes of "
                                                           "partition big"),
    (["--gpus-per-node", "4", "--cpus-per-task", "3"], {"SINFO_NODES": ""}, "GPU(s) per node, --cpus-per-task 3\n"),
    ([], {"SINFO_NODES": ""}, "1 task(s), 0 GPU(s) per node, Slurm's default CPUs per task, 1 (give --cpus-per-task"),
], ids=["default-partition", "two-gpus", "partition-flag", "SBATCH_PARTITION", "given", "cpu-job"])
@pytest.mark.e2e
def test_submitit_default_cpus_per_task_is_the_nodes_share_per_gpu(tiny_data, tmp_path, capsys, monkeypatch, flags,
                                                                     env, expected):
    from launch import submitit as launcher
    monkeypatch.setenv("PATH", fake_bin(tmp_path, sinfo=FAKE_SINFO))
    monkeypatch.delenv("SBATCH_PARTITION", raising=False)
    for name, value in {"SINFO_NODES": NODES, **env}.items():
        monkeypatch.setenv(name, value)
    assert launcher.main(["-d", str(tiny_data), "--cluster", "slurm", "--dry-run", *flags]) == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("flags,path,message", [
    (["--gpus-per-node", "8"], "sinfo", "--cpus-per-task: no default: sinfo shows no node with 8 GPUs in the default "
                                        "partition; give --cpus-per-task (CPUs per process), or check --gpus-per-node"),
    (["--gpus-per-node", "4"], "", "--cpus-per-task: no default without sinfo's node list ("),
    (["--gpus-per-node", "4", "--cpus-per-task", "0"], "sinfo", "--cpus-per-task 0: give a number of at least 1"),
], ids=["too-few-gpus", "no-sinfo", "zero"])
@pytest.mark.e2e
def test_submitit_without_a_default_cpus_per_task_says_to_give_one(tiny_data, tmp_path, monkeypatch, flags, path,
                                                                    message):
    from fgic.errors import FgicError
    from launch import submitit as launcher
    monkeypatch.setenv("PATH", fake_bin(tmp_path, sinfo=FAKE_SINFO) if path else str(tmp_path))
    monkeypatch.setenv("SINFO_NODES", NODES)
    with pytest.raises(FgicError, match=re.escape(message)):
        launcher.main(["-d", str(tiny_data), "--cluster", "slurm", "--dry-run", *flags])


@pytest.mark.e2e
def test_submitit_asks_the_job_and_its_srun_step_for_the_cpus(tiny_data, tmp_path):
    """The sbatch script submitit writes: the job asks for the CPUs per task, and so does its srun line, since
    Slurm 22.05's srun does not take --cpus-per-task from the job (tests/test_slurm.py shows the step on Slurm)."""
    script = tmp_path / "job.sh"
    path = fake_bin(tmp_path, sinfo=FAKE_SINFO, srun="#!/bin/sh\nexit 1\n",
                    sbatch=f'#!/bin/bash\ncp "${{@: -1}}" {script}\necho "Submitted batch job 42"\n')
    out = subprocess.run([sys.executable, "-m", "launch.submitit", "-d", str(tiny_data), "--gpus-per-node", "4",
                          *tiny_args(), "--output-dir", str(tmp_path / "runs")], cwd=REPO,
                         env=fgic_env(PATH=path, SINFO_NODES=NODES), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "submitted 1 job(s) to slurm: 42" in out.stdout, out.stdout + out.stderr
    lines = script.read_text().splitlines()
    assert "#SBATCH --cpus-per-task=8" in lines and "#SBATCH --ntasks-per-node=4" in lines
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1 and " --cpus-per-task=8 " in srun[0], srun


@pytest.mark.e2e
def test_submitit_wait_says_why_a_job_failed(tiny_data, tmp_path):
    """A job that fails at run time (a garbled weights file) is reported with the job's own error, not submitit's
    pointer to its logs; the other jobs would go on, and the exit code says one failed."""
    bad = tmp_path / "garbled.pth"
    bad.write_bytes(b"not a torch file" * 64)
    out = subprocess.run([sys.executable, "-m", "launch.submitit", "--datasets", str(tiny_data), "--cluster", "local",
                          "--wait", *tiny_args(epochs=1), "--weights", str(bad), "--output-dir", str(tmp_path)],
                         cwd=REPO, env=fgic_env(), capture_output=True, text=True, timeout=300)
    failed = [line for line in out.stdout.splitlines() if ": FAILED (" in line]
    assert out.returncode == 1 and len(failed) == 1, out.stdout + out.stderr
    assert f"FAILED (fgic.errors.FgicError: --weights {bad}: unreadable, truncated or not a torch file" in failed[0]
    assert failed[0].endswith("_0_log.err"), failed[0]


@pytest.mark.e2e
def test_submitit_local_executor_runs_a_sweep_of_any_flag(tiny_data, tmp_path):
    """--sweep lr=... with submitit's local executor: one job per value, each in its own run folder with its lr, and
    the report shows lr as a column."""
    out = subprocess.run([sys.executable, "-m", "launch.submitit", "--datasets", str(tiny_data), "--cluster", "local",
                          "--wait", *tiny_args(epochs=1), "--sweep", "lr=0.05,0.1", "--output-dir", str(tmp_path)],
                         cwd=REPO, env=fgic_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "submitted 2 job(s) to local" in out.stdout, out.stdout + out.stderr
    logs = sorted(p.name for p in (tmp_path / "submitit").iterdir())
    assert logs == sorted(re.findall(r"^(\d+): done", out.stdout, re.M)), logs  # a folder per job, named by its id
    for lr in ("0.05", "0.1"):
        folder = tmp_path / "tiny" / f"resnet18-off-s2020-lr{lr}"
        assert json.loads((folder / "config.json").read_text())["lr"] == float(lr)
        assert json.loads((folder / "summary.json").read_text())["epochs"] == 1
    table = subprocess.run([sys.executable, "-m", "fgic.report", str(tmp_path), "--no-plot"], cwd=REPO,
                           env=fgic_env(), capture_output=True, text=True, timeout=120).stdout
    assert "| arch | amp | lr | note | tiny final epoch |" in table, table
    rows = [line for line in table.splitlines() if line.startswith("| resnet18 | off | 0.")]
    assert [r.split(" | ")[2:4] for r in rows] == [["0.05", "lr0.05"], ["0.1", "lr0.1"]], table


@pytest.mark.e2e
def test_submitit_requeue_survives_the_sigterm_that_ends_the_step():
    """submitit's handler runs `scontrol requeue`; Slurm then ends the step with SIGTERM, which may reach scontrol
    before it exits. Under hand_over the stand-in scontrol (it signals itself) lives, so the requeue does not fail."""
    from launch import submitit as launcher

    def submitit_handler(signum, frame):
        subprocess.check_call([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])

    launcher.hand_over(submitit_handler, signal.SIGUSR2)
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # given back afterwards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_nodes_meet_through_launch_torchrun_and_train_as_one_job(tiny_data, tmp_path):
    """Two "nodes" on this machine, each one launch.torchrun as `srun --ntasks-per-node=1` starts it (the same job,
    SLURM_NODEID 0 and 1, one CPU process per node): torchrun's multi-node rendezvous at the first host joins them
    into one 2-process job (each node with its own node-local cache), which trains exactly as torchrun's own
    2-process run on one node."""
    args = ["-d", str(tiny_data), *tiny_args(epochs=1)]
    job = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "localhost",
           "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""}
    nodes = [subprocess.Popen([sys.executable, "-m", "launch.torchrun", *args, "--output-dir", str(tmp_path / "nodes")],
                              cwd=REPO, env=fgic_env(**job, SLURM_NODEID=str(n), FGIC_CACHE=str(tmp_path / f"tmp{n}")),
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    for n, (node, (_, err)) in enumerate(zip(nodes, outs)):
        assert node.returncode == 0, f"node {n}: {err}"
        assert f"--nnodes=2 --node_rank={n} --nproc_per_node=1" in err
        assert len(list((tmp_path / f"tmp{n}").glob("*.npy"))) == 2  # each node decoded its own cache (train, test)
    ref = run_fgic([*args, "--output-dir", str(tmp_path / "one")], nproc=2)
    assert ref.returncode == 0, ref.stderr
    run = ("tiny", "resnet18-off-s2020")
    two_nodes = tmp_path.joinpath("nodes", *run)
    assert json.loads((two_nodes / "config.json").read_text())["world_size"] == 2
    a = torch.load(two_nodes / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path.joinpath("one", *run, "checkpoint.pt"), weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
