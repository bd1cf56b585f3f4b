"""One training process per run folder. Rank 0 holds a lock file beside RUN_DIR (.RUN_NAME.lock, so that moving an
earlier run aside keeps it) from before it reads the folder's checkpoint until it exits: the same command started
twice (a job submitted twice, a sweep re-run while its jobs train) is refused in one line instead of both writing the
same metrics.jsonl and checkpoint.pt.

The lock is a file created with O_EXCL, which is atomic on local file systems, NFS (v3 and later) and Lustre, where
flock is not reliable without mount options. Its holder refreshes its mtime every HEARTBEAT_S. Ages are measured
against a probe file's mtime, so by the file system's timestamps: the server's clock on NFS, the clients' (kept
within seconds by NTP) on Lustre. A lock is free once its holder is
- known to be gone: a process of this machine that no longer runs, a machine that has rebooted since;
- presumed gone and silent for SILENT_S: an earlier start of this Slurm job or torchrun run (a requeue, an elastic
  restart), or a Slurm job that squeue no longer shows running; a start waits up to WAIT_S for that silence rather
  than being refused, since a holder killed moments ago has just stopped beating;
- or silent for STALE_S, whoever it is.
A lock is removed only under its .break file (O_EXCL too), after checking that it is still the file judged: two starts
breaking one lock, or a breaker and a holder releasing, cannot remove a lock just taken. A holder whose lock was taken
over stops before writing anything more: RunLog and the checkpoint writes `check` it first."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fgic.errors import FgicError

HEARTBEAT_S = 30.0
SILENT_S = 2 * HEARTBEAT_S + 5  # two missed heartbeats, and a margin for clocks and a slow file system
STALE_S = 300.0  # ten missed heartbeats: a holder stalled this long on its file system is taken for dead
WAIT_S = SILENT_S + 30  # the longest wait for a holder presumed gone to fall silent
BREAK_STALE_S = 60.0  # a .break file this old was left by a start that died while breaking


def unwritable(run_dir: Path, exc: OSError, flag: str = "--output-dir") -> FgicError:
    return FgicError(f"{flag}: cannot write the run folder {run_dir} ({exc.strerror or exc}); give a writable folder")


def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


def _process_start(pid: int | str) -> str | None:
    """The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat): with the pid, it names
    a process even after its pid is reused. None where /proc does not show it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _running(pid: int, start: str) -> bool:
    """Whether the process `pid` that started at `start` runs on this machine (in this pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    now = _process_start(pid)
    return now is None or not start or now == start  # /proc hidden (hidepid): the pid alone says it runs


def _slurm_job_ended(job: str) -> bool:
    """Whether squeue says Slurm job `job` no longer runs (ended, or purged from its list); False where it cannot
    tell (no squeue here, an unreachable controller)."""
    if not shutil.which("squeue"):
        return False
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if out.returncode != 0:
        return "invalid job id" in out.stderr.lower()
    return out.stdout.strip() in ("", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                                  "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY")


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
    torchrun_id: str | None = None
    torchrun_restart: int = 0
    since: str = ""

    @classmethod
    def me(cls, env: os._Environ | dict = os.environ) -> Holder:
        try:
            namespace = os.readlink("/proc/self/ns/pid")
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            namespace = boot = ""
        return cls(secrets.token_hex(8), socket.gethostname(), os.getpid(), _process_start("self") or "", namespace,
                   boot, env.get("SLURM_JOB_ID"), int(env.get("SLURM_RESTART_COUNT") or 0),
                   env.get("TORCHELASTIC_RUN_ID"), int(env.get("TORCHELASTIC_RESTART_COUNT") or 0),
                   time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):  # half written, or not fgic's
            return None

    def __str__(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.since}"

    def gone(self, me: Holder) -> tuple[bool, str]:
        """Whether this holder has ended, seen from `me`, and why: (True, why) known gone; (False, why) presumed
        gone once silent; (False, "") it may run."""
        if self.host == me.host and self.boot_id and me.boot_id:
            if self.boot_id != me.boot_id:
                return True, "its machine has rebooted since"
            if self.pid_namespace == me.pid_namespace:
                running = _running(self.pid, self.process_start)
                return (False, "") if running else (True, "its process no longer runs")
        if self.slurm_job_id and self.slurm_job_id == me.slurm_job_id and self.slurm_restart < me.slurm_restart:
            return False, f"an earlier start of this Slurm job (restart {self.slurm_restart})"
        if self.torchrun_id and self.torchrun_id == me.torchrun_id and self.torchrun_restart < me.torchrun_restart:
            return False, f"an earlier start of this torchrun run (restart {self.torchrun_restart})"
        if self.slurm_job_id and self.slurm_job_id != me.slurm_job_id and _slurm_job_ended(self.slurm_job_id):
            return False, f"its Slurm job {self.slurm_job_id} has ended"
        return False, ""


def _age(stat: os.stat_result, folder: Path) -> float:
    """Seconds since the file of `stat` in `folder` was last modified, by the file system's timestamps."""
    probe = folder / f".fgic-clock.{socket.gethostname()}.{os.getpid()}"
    probe.write_bytes(b"")
    try:
        return probe.stat().st_mtime - stat.st_mtime
    finally:
        probe.unlink(missing_ok=True)


def _look(path: Path) -> tuple[str, os.stat_result] | None:
    """A lock file's text and its stat, of one file (one open); None if there is none."""
    try:
        with open(path) as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _breaking(path: Path, patience_s: float):
    """Hold the lock's .break file (O_EXCL): the right to remove the lock. Yields whether it was had within
    `patience_s`; a .break file older than BREAK_STALE_S is removed first."""
    brk = path.with_name(path.name + ".break")
    deadline, had = time.monotonic() + patience_s, False
    while True:
        try:
            os.close(os.open(brk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            had = True
            break
        except FileExistsError:
            try:
                if _age(os.stat(brk), brk.parent) > BREAK_STALE_S:
                    brk.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    try:
        yield had
    finally:
        if had:
            brk.unlink(missing_ok=True)


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
             heartbeat_s: float = HEARTBEAT_S, wait_s: float = WAIT_S) -> RunLock:
        """The lock of `run_dir` for this process, or a one-line FgicError naming who holds it."""
        if not is_main:
            return cls(None)
        path, me = lock_path(run_dir), Holder.me(env)
        made = tuple(p for p in (path.parent, *path.parent.parents) if not p.exists())  # deepest first
        lock = cls(run_dir, None, made)
        try:
            lock.holder = cls._acquire(path, run_dir, me, time.monotonic() + wait_s)
        except OSError as exc:
            lock.release()
            raise unwritable(run_dir, exc) from None
        except FgicError:
            lock.release()
            raise
        lock.beat = threading.Thread(target=lock._heartbeat, args=(heartbeat_s,), daemon=True, name="fgic-run-lock")
        lock.beat.start()
        return lock

    @classmethod
    def _acquire(cls, path: Path, run_dir: Path, me: Holder, deadline: float) -> Holder:
        for _ in range(1000):  # each pass: create, or judge the lock there (and break it, or wait for its silence)
            path.parent.mkdir(parents=True, exist_ok=True)  # again: a failed start next door may have removed it
            if cls._create(path, me):
                return me
            seen = _look(path)
            if seen is None:  # released meanwhile
                continue
            text, stat = seen
            theirs, age = Holder.parse(text), _age(stat, path.parent)
            gone, why = theirs.gone(me) if theirs else (False, "")
            if age > STALE_S:
                gone, why = True, f"its last heartbeat was {age:.0f} s ago"
            elif why and not gone and age > SILENT_S:
                gone, why = True, f"{why}, and its last heartbeat was {age:.0f} s ago"
            if gone:
                cls._break(path, stat, theirs, why)
            elif why and time.monotonic() < deadline:  # presumed gone: wait for its silence
                time.sleep(min(5.0, max(SILENT_S - age, 0.1), max(deadline - time.monotonic(), 0.0)))
            else:
                raise cls._held(run_dir, path, theirs, age, why)
        raise FgicError(f"{path}: other processes keep taking this run folder's lock; see which ones train "
                        f"{run_dir} (ps, squeue) and run the same command once they have ended")

    @staticmethod
    def _create(path: Path, me: Holder) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(me)) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # a full disk: no half-written lock left to refuse the next start
            path.unlink(missing_ok=True)
            raise
        return True

    @staticmethod
    def _break(path: Path, judged: os.stat_result, theirs: Holder | None, why: str) -> None:
        """Remove the lock judged free, if the file there is still the one judged (not refreshed, not replaced)."""
        with _breaking(path, patience_s=5.0) as had:
            if not had:
                return
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return
            if (now.st_ino, now.st_mtime_ns, now.st_size) != (judged.st_ino, judged.st_mtime_ns, judged.st_size):
                return
            path.unlink()
        print(f"fgic: notice: took over the run folder's lock {path} from {theirs or 'an unknown process'}: {why}",
              file=sys.stderr, flush=True)

    @staticmethod
    def _held(run_dir: Path, path: Path, theirs: Holder | None, age: float, why: str) -> FgicError:
        who = theirs or f"a process that is writing {path.name} (its file is not complete yet)"
        frees = (f"it is {why}, which frees it after {SILENT_S:.0f} s without a heartbeat" if why else
                 f"a lock whose holder is gone frees itself {STALE_S:.0f} s after its last heartbeat (at once on its "
                 f"own machine, {SILENT_S:.0f} s after in a requeue of its Slurm job)")
        return FgicError(f"{run_dir} is being trained by {who} (heartbeat {max(age, 0):.0f} s ago); run the same "
                         f"command once it has ended, or give another --output-dir / --note; {frees}")

    def _heartbeat(self, every: float) -> None:
        while not self.stopped.wait(every):
            try:
                if Holder.parse(self.path.read_text()) != self.holder:
                    return  # taken over: `check` says so
                os.utime(self.path)
            except FileNotFoundError:
                return  # removed: `check` says so
            except OSError:  # a file-system hiccup (EIO, a stale handle): the next beat tries again
                pass

    def check(self) -> None:
        """A one-line FgicError if this process no longer holds the lock: write nothing more to the run folder. A read
        that fails proves nothing (the next check reads again)."""
        if self.holder is None:
            return
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = None
        except OSError:
            return
        theirs = Holder.parse(text) if text is not None else None
        if theirs == self.holder:
            return
        who = f"taken over by {theirs}" if theirs else "removed" if text is None else "replaced by another file"
        raise FgicError(f"{self.path}: this run folder's lock was {who} while this process trained it (another start "
                        f"judged this one gone: silent {STALE_S:.0f} s on its file system, or its Slurm job requeued "
                        f"or ended); stopping without writing more; run the same command to resume once no other "
                        f"process trains {self.run_dir}")

    def release(self) -> None:
        """Give the lock up (only the process that took it, not a loader worker forked from it), and remove the
        folders that `take` made if nothing was written in them."""
        self.stopped.set()
        if self.holder is not None and os.getpid() == self.holder.pid:
            with _breaking(self.path, patience_s=2.0):  # no breaker replaces it between the read and the unlink
                try:
                    if Holder.parse(self.path.read_text()) == self.holder:
                        self.path.unlink()
                except OSError:
                    pass
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
