"""Optional Weights & Biases logging of a run (--wandb; needs the wandb package), from rank 0: the config, each
checkpointed epoch's metrics.jsonl record (step = its epoch) and the summary. RUN_DIR/wandb.json keeps the W&B run's id
and the last epoch W&B was given, so a resumed or requeued run continues the same W&B run, no epoch twice or missing.
A W&B failure is one warning line, and training goes on without W&B."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from fgic.errors import FgicError
from fgic.jsonfile import read_object, write_json
from fgic.signals import EXIT_PREEMPTED

STATE = "wandb.json"
# How long wandb.init may wait for the server (wandb's default: 90 s). With an API key and an unreachable server it
# waits exactly this long (measured: 5.3 s at 5, 30.4 s at 30), then raises CommError; without an API key it raises
# UsageError at once (0.1 s). A healthy init takes 2-10 s online, 0.5 s offline.
INIT_TIMEOUT_S = 30.0
# What `wandb sync` must be given: every attempt of an offline run (one folder each, in time order by name); given
# RUN_DIR/wandb alone, wandb 0.31 syncs its latest-run, the last attempt only.
SYNC = "offline-run-*"


class WandbRun:
    def __init__(self, run, path: Path, state: dict):
        self.run, self.path, self.state = run, path, state

    @classmethod
    def open(cls, run_dir: Path, config: dict, done_epochs: int, records: list[dict], *, project: str | None,
             entity: str | None, group: str | None, name: str) -> "WandbRun | None":
        """records: metrics.jsonl's records of the done_epochs that the starting point has (RunLog.start keeps them)."""
        path = run_dir / STATE
        state = _read(path)
        # The W&B run goes on only while its history is a prefix of this attempt's. Starting over (--resume none,
        # done_epochs 0) or resuming from before the last epoch W&B has (--resume PATH of an older checkpoint) gets a
        # new W&B run, replacing wandb.json: on a resumed W&B run, W&B ignores a step at or below its last one, so
        # the redone epochs could not be logged to the old one.
        if state is None or state["logged_epochs"] > done_epochs:
            state = {"id": None, "logged_epochs": 0}
        # Another --wandb-project/--wandb-entity: W&B would take the same id there as a run lacking the earlier epochs.
        # A new W&B run there instead, the done epochs caught up from metrics.jsonl below.
        asked = [project, entity]
        before = state.get("asked") or [state.get(k, a) if a else None for k, a in zip(("project", "entity"), asked)]
        changed = [f"--wandb-{flag} {old} -> {new}" for flag, old, new in zip(("project", "entity"), before, asked)
                   if old != new]
        if state["id"] is not None and changed:
            print(f"fgic: {'; '.join(changed)}: a new W&B run there, given the {done_epochs} done epoch(s) from "
                  f"metrics.jsonl (the earlier one, {state['id']}, stays as it is)", flush=True)
            state = {"id": None, "logged_epochs": 0}
        try:
            import wandb  # noqa: PLC0415  (wandb: an optional extra)

            # silent: one fgic line instead of wandb's own (its login line comes before init's settings apply)
            wandb.setup(wandb.Settings(silent=True))
            run = wandb.init(dir=run_dir, id=state["id"], resume="allow", project=project, entity=entity, group=group,
                             name=name, config=config,
                             settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, silent=True, **_settings(wandb)))
        except Exception as exc:  # ImportError, UsageError (no API key), CommError (no server), ...
            fix = ("`pip install wandb` to use it" if isinstance(exc, ImportError) else
                   f"run `wandb login` (or set WANDB_API_KEY) and check the network, or set WANDB_MODE=offline and "
                   f"`wandb sync {run_dir / 'wandb' / SYNC}` later")
            _warn("wandb.init", exc, fix)
            return None
        logged = state["logged_epochs"]
        if run.resumed and not run.offline:
            # Online, trust the server over wandb.json: a wandb-core ended by SIGTERM may have sent nothing of its last
            # epochs. A resumed run's starting_step is one past the server's last step (wandb's sender), 0 if none.
            logged = min(logged, max(run.starting_step - 1, 0))
        self = cls(run, path, {"id": run.id, "logged_epochs": logged, "project": run.project, "entity": run.entity,
                               "asked": asked})
        write_json(path, self.state)
        for record in records:  # catch-up: epochs checkpointed by a run killed before W&B got them (epoch skips others)
            self.epoch(record)
        if self.run is None:
            return None
        folder = run_dir / "wandb"
        where = f"offline in {folder} (upload it with `wandb sync {folder / SYNC}`)" if run.offline else run.url
        print(f"fgic: W&B run {run.id} {where}", flush=True)
        return self

    def epoch(self, record: dict) -> None:
        # run.log returns once the row is in the socket's buffer, even when wandb-core has just exited (seen under load:
        # the failure surfaced at the next call). run.status is a round trip (0.5 ms), answered after wandb-core has
        # read the row: only then does the epoch count as W&B's.
        epoch = record["epoch"]
        if epoch > self.state["logged_epochs"] and self._call("log", record, step=epoch, commit=True) and \
                self._call("status"):
            self.state["logged_epochs"] = epoch
            write_json(self.path, self.state)  # after the log: a kill in between repeats an epoch, never loses one

    def summary(self, summary: dict) -> None:
        self._call("summary.update", summary)

    def finish(self, preempted: bool = False) -> None:
        if preempted:
            self._call("mark_preempting")
        if self._call("finish", exit_code=EXIT_PREEMPTED if preempted else 0):
            self.run = None

    def _call(self, name: str, *args, **kwargs) -> bool:
        """run.NAME(...), True; False when W&B is off or fails: the first failure warns and turns W&B off."""
        if self.run is None:
            return False
        try:
            method = self.run
            for part in name.split("."):
                method = getattr(method, part)
            method(*args, **kwargs)
            return True
        except Exception as exc:
            if isinstance(exc, _core_gone()):  # without the teardown, a traceback from wandb's atexit
                with contextlib.suppress(Exception):
                    sys.modules["wandb"].teardown()
            _warn(f"run.{name}", exc, f"W&B has the epochs up to {self.state['logged_epochs']}, metrics.jsonl all of "
                                     f"them; see {self.path.parent / 'wandb' / 'debug-internal.log'}")
            self.run = None
            return False


def _core_gone() -> tuple[type[Exception], ...]:
    """What a call raises once wandb-core has exited: a send on the closed socket, or a reply never to come."""
    try:
        from wandb.sdk.mailbox import HandleAbandonedError, MailboxClosedError  # noqa: PLC0415  (as wandb 0.31 names them)
    except ImportError:
        return (ConnectionError,)
    return ConnectionError, HandleAbandonedError, MailboxClosedError


def _settings(wandb) -> dict:
    # Measured with wandb 0.31: a SIGTERM (every process of a Slurm step gets it on `scancel`) shuts wandb-core down at
    # once, without flushing the run's .wandb file, which it writes every 15 s by default: the epochs of those last
    # 15 s (or the whole attempt) were lost offline; at 1 s they are there. (USR2, fgic's Slurm warning, it survives.)
    # Starting it with SIGTERM blocked does not shield it: it handles SIGTERM, and Go unblocks a handled signal.
    # console "off": with wandb's console capture, each print after wandb-core had gone was an asyncio line on stderr.
    fields = wandb.Settings.model_fields
    flush = {"x_transaction_log_flush_interval": 1.0} if "x_transaction_log_flush_interval" in fields else {}
    return {"console": "off", **flush}


def _read(path: Path) -> dict | None:
    """wandb.json's state, or None (no file, or not one this module wrote: then a new W&B run)."""
    try:
        state = read_object(path)
    except FgicError:
        return None
    ok = isinstance(state.get("id"), str) and isinstance(state.get("logged_epochs"), int)
    return state if ok else None


def _warn(what: str, exc: Exception, fix: str) -> None:
    why = ": ".join([type(exc).__name__, *(str(exc).strip().splitlines()[:1])])[:200]
    print(f"fgic: warning: --wandb: {what} failed ({why}); {fix}; training goes on without W&B",
          file=sys.stderr, flush=True)
