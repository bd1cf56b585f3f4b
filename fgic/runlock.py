"""One training process per run folder. Rank 0 holds a lock file beside RUN_DIR (.RUN_NAME.lock, so that moving an
earlier run aside keeps it) from before it reads the folder's checkpoint until it exits: the same command started
twice (a job submitted twice, a sweep re-run while its jobs train) is refused in one line instead of both writing the
same metrics.jsonl and checkpoint.pt.

The lock is a file created with O_EXCL, which is atomic on local file systems, NFS (v3 and later) and Lustre, where
flock is not reliable without mount options. Its holder refreshes its mtime every HEARTBEAT_S; a lock is free once its
holder is known to be gone (a process of this machine that no longer runs, a machine that has rebooted, an earlier
start of the same requeued Slurm job) or its heartbeat is older than STALE_S, measured against the file server's clock
(a probe file's mtime), not this node's. A holder whose lock was taken over (its heartbeat stalled that long) stops
before writing anything more: RunLog and the checkpoint writes `check` it first."""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fgic.errors import FgicError

HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: a holder stalled this long on its file system is taken for dead


def unwritable(run_dir: Path, exc: OSError, flag: str = "--output-dir") -> FgicError:
    return FgicError(f"{flag}: cannot write the run folder {run_dir} ({exc.strerror or exc}); give a writable folder")


def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int | str) -> str:
    """The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat): with the pid, it names
    a process even after its pid is reused. "" without /proc."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says."""
    token: str
    host: str
    pid: int
    process_start: str = ""
    pid_namespace: str = ""
    boot_id: str = ""
    slurm_job_id: str | None = None
    slurm_restart: int = 0
    since: str = ""

    @classmethod
    def me(cls, env: os._Environ | dict = os.environ) -> Holder:
        try:
            namespace = os.readlink("/proc/self/ns/pid")
        except OSError:
            namespace = ""
        return cls(secrets.token_hex(8), socket.gethostname(), os.getpid(), _process_start("self"), namespace,
                   _read(Path("/proc/sys/kernel/random/boot_id")), env.get("SLURM_JOB_ID"),
                   int(env.get("SLURM_RESTART_COUNT") or 0), time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):  # half written, or not fgic's
            return None

    def __str__(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.since}"

    def gone(self, me: Holder) -> str | None:
        """Why this holder is known to have ended, seen from `me`; None if it may still run."""
        if self.slurm_job_id and self.slurm_job_id == me.slurm_job_id and self.slurm_restart < me.slurm_restart:
            return f"an earlier start of this Slurm job (restart {self.slurm_restart}), which Slurm has ended"
        if self.host != me.host or not self.boot_id or not me.boot_id:
            return None
        if self.boot_id != me.boot_id:
            return "its machine has rebooted since"
        if self.pid_namespace == me.pid_namespace and self.process_start and (
                _process_start(self.pid) != self.process_start):
            return "its process no longer runs"
        return None


def _age(path: Path) -> float:
    """Seconds since `path` was last modified, by the clock of the file system that holds it."""
    probe = path.with_name(f".{path.name}.clock.{os.getpid()}")
    probe.write_bytes(b"")
    try:
        return probe.stat().st_mtime - path.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


class RunLock:
    """The lock of one run folder, held by rank 0 (on other ranks every method does nothing). `take` it, `check` it
    before writing the folder, `release` it at the end (a context manager does)."""

    def __init__(self, run_dir: Path | None, holder: Holder | None = None, made: tuple[Path, ...] = ()):
        self.run_dir, self.holder, self.made = run_dir, holder, made
        self.path = lock_path(run_dir) if run_dir is not None else None
        self.stopped = threading.Event()
        self.beat = None

    @classmethod
    def take(cls, run_dir: Path, is_main: bool, env: os._Environ | dict = os.environ,
             heartbeat_s: float = HEARTBEAT_S) -> RunLock:
        """The lock of `run_dir` for this process, or a one-line FgicError naming who holds it."""
        if not is_main:
            return cls(None)
        path, me = lock_path(run_dir), Holder.me(env)
        made = tuple(p for p in (path.parent, *path.parent.parents) if not p.exists())  # deepest first
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(5):  # another start may take a stale lock at the same moment: look again
                if cls._create(path, me):
                    lock = cls(run_dir, me, made)
                    lock.beat = threading.Thread(target=lock._heartbeat, args=(heartbeat_s,), daemon=True,
                                                 name="fgic-run-lock")
                    lock.beat.start()
                    return lock
                cls._break_if_free(path, run_dir, me)
        except OSError as exc:
            cls(None, made=made).release()
            raise unwritable(run_dir, exc) from None
        cls(None, made=made).release()
        raise FgicError(f"{path}: other processes keep taking this run folder's lock; see which ones train "
                        f"{run_dir} (ps, squeue) and run the same command once they have ended")

    @staticmethod
    def _create(path: Path, me: Holder) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(me)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    @staticmethod
    def _break_if_free(path: Path, run_dir: Path, me: Holder) -> None:
        """Remove the lock at `path` if its holder is gone or silent; a one-line FgicError if it may still run."""
        text = _read(path)
        try:
            age = _age(path)
        except FileNotFoundError:  # released meanwhile
            return
        theirs = Holder.parse(text)
        why = f"its last heartbeat was {age:.0f} s ago" if age > STALE_S else theirs and theirs.gone(me)
        if not why:
            who = theirs or f"a process that is writing {path.name} (its file is not complete yet)"
            raise FgicError(f"{run_dir} is being trained by {who} (heartbeat {max(age, 0):.0f} s "
                            f"ago); run the same command once it has ended, or give another --output-dir / --note. A "
                            f"lock whose holder is gone frees itself {STALE_S:.0f} s after its last heartbeat (at once "
                            f"on its own machine, or in a requeue of its Slurm job)")
        aside = path.with_name(f"{path.name}.{me.token}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:  # another start broke it first
            return
        if _read(aside) != text:  # not the file judged: a lock just taken by another start; give it back
            try:
                os.link(aside, path)
            except OSError:  # a third start holds it now: the one whose lock this was stops at its next check
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        print(f"fgic: notice: took over the run folder's lock {path} from {theirs or 'an unknown process'}: {why}",
              file=sys.stderr, flush=True)

    def _heartbeat(self, every: float) -> None:
        while not self.stopped.wait(every):
            try:
                if Holder.parse(_read(self.path)) != self.holder:
                    return  # taken over or removed: `check` says so
                os.utime(self.path)
            except OSError:  # a file-system hiccup: the next beat tries again
                pass

    def check(self) -> None:
        """A one-line FgicError if this process no longer holds the lock: write nothing more to the run folder."""
        if self.holder is None:
            return
        theirs = Holder.parse(_read(self.path))
        if theirs != self.holder:
            who = f"taken over by {theirs}" if theirs else "removed"
            raise FgicError(f"{self.path}: this run folder's lock was {who} while this process trained it (its "
                            f"heartbeat stalled for more than {STALE_S:.0f} s, or the file was deleted); stopping "
                            f"without writing more; run the same command to resume once no other process trains "
                            f"{self.run_dir}")

    def release(self) -> None:
        """Give the lock up (only the process that took it, not a loader worker forked from it), and remove the
        folders that `take` made if nothing was written in them."""
        self.stopped.set()
        if self.holder is not None and os.getpid() == self.holder.pid:
            if Holder.parse(_read(self.path)) == self.holder:
                self.path.unlink(missing_ok=True)
            self.holder = None
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:  # the run's files are in it
                pass
        self.made = ()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
