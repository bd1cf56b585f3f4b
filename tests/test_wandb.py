"""--wandb (fgic.wandb_log), offline and in-process: config, epochs and summary as W&B wrote them to its transaction
logs; a resumed run continues the same W&B run with no epoch twice or missing; a W&B failure is one warning line."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from fgic import wandb_log
from fgic.signals import EXIT_PREEMPTED
from fgic.wandb_log import WandbRun
from tests.helpers import optional, popen, read_jsonl, run_fgic, tiny_args, workers

CONFIG = {"arch": "resnet18", "lr": 0.1, "epochs": 4, "batch_size": 16}
WARNING = "fgic: warning: --wandb: "


def record(epoch: int) -> dict:
    return {"epoch": epoch, "lr": 0.1 / epoch, "train_loss": 2.0 / epoch, "train_acc": 10.0 * epoch,
            "test_loss": 1.0 / 3 / epoch, "test_acc": 12.5 * epoch, "test_top5": 99.0, "test_correct": 3 * epoch,
            "test_total": 101, "epoch_seconds": 1.25, "train_images_per_second": 123.4}


@pytest.fixture
def wandb(tmp_path, monkeypatch):
    """wandb, offline, its files under tmp_path (none in $HOME); a fresh wandb singleton (settings read anew) each."""
    module = optional("wandb")
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY",
                 "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with credentials
    module.teardown()
    yield module
    module.teardown()


@pytest.fixture
def files(wandb):
    from tests import wandb_files
    return wandb_files


def open_run(run_dir, done_epochs=0, records=(), **kwargs):
    return WandbRun.open(run_dir, CONFIG, done_epochs, list(records),
                         **{"project": "fgic-test", "entity": None, "group": "g1", "name": "tiny-run", **kwargs})


def epochs(rows):
    return [row["epoch"] for row in rows]


def state(run_dir):
    return json.loads((run_dir / "wandb.json").read_text())


def test_config_epochs_and_summary_are_logged(tmp_path, files, capsys):
    run_dir = tmp_path / "run"
    w = open_run(run_dir)
    for epoch in (1, 2, 3):
        w.epoch(record(epoch))
    w.summary({"final_test_acc": 37.5, "best_test_acc": 37.5, "best_epoch": 3})
    w.finish()
    [attempt] = files.attempts(run_dir)
    assert state(run_dir) == {"id": attempt["id"], "logged_epochs": 3, "project": "fgic-test", "entity": "",
                              "asked": ["fgic-test", None]}
    assert (attempt["project"], attempt["group"], attempt["name"]) == ("fgic-test", "g1", "tiny-run")
    assert [{k: row[k] for k in record(1)} for row in attempt["history"]] == [record(e) for e in (1, 2, 3)]
    assert [row["_step"] for row in attempt["history"]] == [1, 2, 3]
    assert attempt["config"].items() >= CONFIG.items()
    assert {"final_test_acc": 37.5, "best_test_acc": 37.5, "best_epoch": 3}.items() <= attempt["summary"].items()
    assert (attempt["preempting"], attempt["exit_code"]) == (False, 0)
    out, err = capsys.readouterr()
    assert err == "" and f"fgic: W&B run {attempt['id']} offline in {run_dir / 'wandb'}" in out


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, files):
    run_dir = tmp_path / "run"
    w = open_run(run_dir)
    w.epoch(record(1))
    w.epoch(record(2))
    w.finish(preempted=True)  # a stop signal after epoch 2's checkpoint
    w = open_run(run_dir, 2, [record(1), record(2)])  # the requeued run, a new process in real life
    w.epoch(record(2))  # already in W&B (W&B itself would take it again: an offline resume starts at step 0)
    w.epoch(record(3))
    w.epoch(record(4))
    w.finish()
    first, second = files.attempts(run_dir)
    assert first["id"] == second["id"] == state(run_dir)["id"] and state(run_dir)["logged_epochs"] == 4
    assert (first["preempting"], first["exit_code"], second["exit_code"]) == (True, 75, 0)
    assert epochs(first["history"]) == [1, 2] and epochs(second["history"]) == [3, 4]
    assert {k: epochs(rows) for k, rows in files.history(run_dir).items()} == {first["id"]: [1, 2, 3, 4]}
    assert [row["test_acc"] for row in files.history(run_dir)[first["id"]]] == [12.5, 25.0, 37.5, 50.0]


def test_epochs_checkpointed_but_not_given_to_wandb_are_caught_up(tmp_path, files):
    run_dir = tmp_path / "run"
    w = open_run(run_dir)
    w.epoch(record(1))
    w.finish()  # then, in real life, killed after the checkpoints of epochs 2 and 3 but before W&B got them
    assert state(run_dir)["logged_epochs"] == 1
    w = open_run(run_dir, 3, [record(1), record(2), record(3)])
    assert state(run_dir)["logged_epochs"] == 3
    w.epoch(record(3))  # already logged: not again
    w.finish()
    first, second = files.attempts(run_dir)
    assert first["id"] == second["id"] and epochs(second["history"]) == [2, 3]
    assert epochs(files.history(run_dir)[first["id"]]) == [1, 2, 3]


def test_starting_over_or_from_before_wandbs_last_epoch_gets_a_new_wandb_run(tmp_path, files):
    run_dir = tmp_path / "run"
    w = open_run(run_dir)
    for epoch in (1, 2, 3):
        w.epoch(record(epoch))
    w.finish()
    first = state(run_dir)["id"]
    open_run(run_dir, 1, [record(1)]).finish()  # --resume PATH of epoch 1's checkpoint: epoch 1 in a new W&B run
    second = state(run_dir)
    open_run(run_dir).finish()  # --resume none
    third = state(run_dir)
    assert len({first, second["id"], third["id"]}) == 3
    assert (second["logged_epochs"], third["logged_epochs"]) == (1, 0)
    assert {k: epochs(rows) for k, rows in files.history(run_dir).items()} == {first: [1, 2, 3], second["id"]: [1],
                                                                               third["id"]: []}


def test_without_wandb_one_warning_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert open_run(tmp_path / "run") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(WARNING) and "pip install wandb" in err
    assert not (tmp_path / "run" / "wandb.json").exists()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_online_without_an_api_key_one_warning_line(tmp_path, wandb, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", closed_port())
    assert open_run(tmp_path / "run") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(WARNING + "wandb.init failed (UsageError: No API key")
    assert "`wandb login`" in err and "WANDB_MODE=offline" in err


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
def test_an_unreachable_server_one_warning_line_after_init_timeout(tmp_path, wandb, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", closed_port())
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setattr(wandb_log, "INIT_TIMEOUT_S", 1.0)
    assert open_run(tmp_path / "run") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(WARNING + "wandb.init failed (CommError: ")


def test_a_failing_wandb_log_is_one_warning_line_and_then_nothing(tmp_path, files, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    w = open_run(run_dir)
    real = w.run

    def broken(*args, **kwargs):
        raise RuntimeError("the service is gone\nmore detail")
    monkeypatch.setattr(real, "log", broken)
    w.epoch(record(1))
    w.epoch(record(2))
    w.summary({"final_test_acc": 25.0})
    w.finish()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(WARNING + "run.log failed (RuntimeError: the service is gone); W&B has the epochs up to 0")
    assert w.run is None and state(run_dir)["logged_epochs"] == 0
    real.finish()
    [attempt] = files.attempts(run_dir)
    assert attempt["history"] == [] and "final_test_acc" not in attempt["summary"]


def test_an_epoch_is_wandbs_once_wandb_core_has_answered_after_it(tmp_path, files, monkeypatch, capsys):
    """run.log returns with the row still in the socket's buffer: a wandb-core gone before reading it fails only the
    next call. The epoch is not counted, and the resumed run logs it again."""
    run_dir = tmp_path / "run"
    w = open_run(run_dir)
    w.epoch(record(1))

    def gone():
        raise ConnectionResetError("Connection lost")  # as wandb's client says it
    monkeypatch.setattr(w.run, "status", gone)
    w.epoch(record(2))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        WARNING + "run.status failed (ConnectionResetError: Connection lost); W&B has the epochs up to 1,")
    assert w.run is None and state(run_dir)["logged_epochs"] == 1
    resumed = open_run(run_dir, 2, [record(1), record(2)])
    resumed.finish()
    assert state(run_dir)["logged_epochs"] == 2
    assert [epochs(a["history"]) for a in files.attempts(run_dir)][-1] == [2]


SIGTERM_CHILD = """
import os, signal, sys, time
from pathlib import Path
from fgic.wandb_log import WandbRun
from tests import wandb_files
signal.signal(signal.SIGTERM, lambda *_: None)  # as fgic's StopRequest: recorded, acted on at a step boundary
run_dir = Path(sys.argv[1])
w = WandbRun.open(run_dir, {"lr": 0.1}, 0, [], project="fgic-test", entity=None, group=None, name="n")
w.epoch({"epoch": 1, "test_acc": 12.5})
log = next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
for _ in range(1000):  # till the epoch is on disk (wandb-core flushes the file every x_transaction_log_flush_interval)
    if any(r.HasField("history") for r in wandb_files.records(log)):
        break
    time.sleep(0.01)
core = [pid for t in os.listdir("/proc/self/task") for pid in open(f"/proc/self/task/{t}/children").read().split()]
for pid in core:
    os.kill(int(pid), signal.SIGTERM)  # a Slurm step's SIGTERM reaches wandb-core too
while sys.argv[2] == "exited" and any(open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in core):
    time.sleep(0.01)
for i in range(8):
    print(f"training goes on {i}", file=sys.stderr)
w.epoch({"epoch": 2, "test_acc": 25.0})
w.finish(preempted=True)
"""


@pytest.mark.e2e  # in-process, but seconds of work (the quick loop stays under a minute)
@pytest.mark.parametrize("core", ["exited", "exiting"])  # the next epoch after wandb-core's exit, or racing it
def test_wandb_core_gone_at_a_sigterm_is_one_warning_line_and_the_flushed_epochs_stay(tmp_path, files, core):
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("finds wandb-core in /proc")
    run_dir = tmp_path / "run"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", SIGTERM_CHILD, str(run_dir), core], cwd=repo, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": repo})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("training goes on")]
    # Which call sees it first depends on whether wandb's reader thread has yet seen the socket close (seen: both).
    gone = r"run\.(log|status) failed \((ConnectionResetError|HandleAbandonedError|MailboxClosedError)\b"
    assert len(lines) == 1 and re.match(re.escape(WARNING) + gone, lines[0]), done.stderr
    assert "W&B has the epochs up to 1," in lines[0] and state(run_dir)["logged_epochs"] == 1
    [attempt] = files.attempts(run_dir, wait_s=0)
    assert epochs(attempt["history"]) == [1] and attempt["exit_code"] is None  # wandb-core wrote no more


class FakeOnlineRun:
    """What wandb.init returns for an online run resumed from a server whose last step is `server_last`."""

    def __init__(self, server_last: int):
        self.id, self.project, self.entity, self.url = "abc123", "fgic-test", "me", "https://wandb.example/abc123"
        self.resumed, self.offline, self.starting_step = True, False, server_last + 1 if server_last else 0
        self.logged = []

    def log(self, row, step, commit):
        self.logged.append(step)

    def status(self):
        pass


def test_online_the_servers_last_epoch_decides_what_is_logged_again(tmp_path, wandb, monkeypatch):
    """wandb.json says 4 epochs went to W&B, but wandb-core was ended (a SIGTERM to the whole step) before it sent
    epochs 3 and 4: the resumed run logs them again from metrics.jsonl's records."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb.json").write_text(json.dumps({"id": "abc123", "logged_epochs": 4}))
    fake = FakeOnlineRun(server_last=2)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: fake)
    w = open_run(run_dir, 4, [record(e) for e in (1, 2, 3, 4)])
    assert fake.logged == [3, 4] and state(run_dir)["logged_epochs"] == 4
    w.epoch(record(4))
    w.epoch(record(5))
    assert fake.logged == [3, 4, 5]


@pytest.mark.e2e
def test_fgic_ddp_stopped_and_resumed_on_2_processes_is_one_wandb_run(tmp_path, files, tiny_data):
    """`fgic.ddp --wandb` under torchrun, stopped by USR2 to both ranks in epoch 2 and resumed by the same command: one
    W&B run holding metrics.jsonl's epochs once each, the config, and summary.json as its summary."""
    args = ["-d", str(tiny_data), *tiny_args(epochs=3, batch_size=6), "--output-dir", str(tmp_path / "runs"),
            "--wandb", "--wandb-project", "fgic-test", "--wandb-group", "g1"]
    run = tmp_path / "runs" / "tiny" / "resnet18-off-s2020"
    proc = popen(args, 2, FGIC_TEST_STEP_SLEEP_S="0.5")  # 4 steps of at least 0.5 s an epoch
    pids = workers(proc, 2)
    for _ in range(3000):
        if (run / "wandb.json").is_file() and state(run)["logged_epochs"] == 1 or proc.poll() is not None:
            break
        time.sleep(0.05)
    time.sleep(1.0)  # into epoch 2
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped by SIGUSR2 at epoch 2, step" in err, err
    assert WARNING not in err and len(read_jsonl(run / "metrics.jsonl")) == 1
    res = run_fgic(args, nproc=2)
    assert res.returncode == 0 and WARNING not in res.stderr, res.stderr
    first, second = files.attempts(run)
    assert first["id"] == second["id"] == state(run)["id"] and res.stdout.count(f"fgic: W&B run {first['id']}") == 1
    assert (first["preempting"], first["exit_code"], second["exit_code"]) == (True, EXIT_PREEMPTED, 0)
    assert (first["group"], first["name"], first["project"]) == ("g1", "tiny/resnet18-off-s2020", "fgic-test")
    rows = files.history(run)[first["id"]]
    assert [{k: row[k] for k in record(1)} for row in rows] == read_jsonl(run / "metrics.jsonl")  # 1, 2, 3 once each
    summary = json.loads((run / "summary.json").read_text())
    assert summary.items() <= second["summary"].items()
    assert second["config"]["arch"] == "resnet18" and second["config"]["world_size"] == 2


@pytest.mark.parametrize("change", [{"project": "fgic-test-2"}, {"entity": "someone"}], ids=["project", "entity"])
def test_another_project_or_entity_on_resume_gets_a_new_wandb_run_caught_up(tmp_path, files, capsys, change):
    """Before, the same W&B id went on in the new project, which then lacked epochs 1 and 2."""
    run_dir = tmp_path / "run"
    w = open_run(run_dir)
    w.epoch(record(1))
    w.epoch(record(2))
    w.finish(preempted=True)
    first = state(run_dir)["id"]
    w = open_run(run_dir, 2, [record(1), record(2)], **change)
    w.epoch(record(3))
    w.finish()
    second = state(run_dir)
    flag, value = next(iter(change.items()))
    assert second["id"] != first and second["logged_epochs"] == 3 and second["asked"][flag == "entity"] == value
    assert f"fgic: --wandb-{flag} " in capsys.readouterr().out
    assert {k: epochs(rows) for k, rows in files.history(run_dir).items()} == {first: [1, 2], second["id"]: [1, 2, 3]}
    open_run(run_dir, 3, [record(1), record(2), record(3)], **change).finish()  # the same flags again: the same run
    assert state(run_dir)["id"] == second["id"]
