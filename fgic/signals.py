"""Signals: SIGTERM/SIGUSR1/SIGUSR2 (Slurm's preemption and time-limit warnings) and SIGINT (Ctrl-C) ask training to
stop at the next step boundary that every rank agrees on; the handler only records the request. After SIGINT, a
second SIGINT, or a SIGTERM (what torchrun sends its workers at a second Ctrl-C), ends the process at once.

A signal that comes during evaluation or a checkpoint write is acted on after the next training step (the
end-of-epoch checkpoint already holds everything); in the last epoch the run simply finishes."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading

from fgic import testhooks

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
HELD = (signal.SIGUSR1, signal.SIGUSR2)  # blocked by launchers until the handlers are in place (hold)
# A run stopped by a signal, its checkpoint written: not finished, resume it (EX_TEMPFAIL, "try again later").
EXIT_PREEMPTED = 75
# Stopped by Ctrl-C, its checkpoint written: the shell's code for it (128 + SIGINT), so that a retry loop or a
# requeue that restarts on 75 does not start again what the user stopped.
EXIT_INTERRUPTED = 130


class StopRequest:
    """Set by a stop signal. Further signals while the checkpoint is written change nothing, but after SIGINT."""

    def __init__(self, hooks: testhooks.Hooks = testhooks.NONE):
        self.signum: int | None = None
        self._pid = os.getpid()  # forked loader workers inherit the handler; only this process speaks
        self.hooks = hooks  # fgic.testhooks': slow steps (agree runs after them)

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a signal held back by a launcher arrives now
        return self

    def _handle(self, signum, frame) -> None:
        mine = os.getpid() == self._pid  # straight to fd 2: sys.stderr may be mid-write (tqdm)
        if self.signum == signal.SIGINT and signum in (signal.SIGINT, signal.SIGTERM) and mine:
            os.write(2, f"fgic: got {signal.Signals(signum).name} after SIGINT; stopping now, without a "
                        f"checkpoint of this epoch's steps\n".encode())
            # Death by the signal itself, as if unhandled (a shell reads it as 128 + the signal): a KeyboardInterrupt
            # raised inside torch.save became a RuntimeError traceback (its zip writer failing on the way out).
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        if self.signum is None and mine:
            name = signal.Signals(signum).name
            again = " with a checkpoint (Ctrl-C again: at once, without it)" if signum == signal.SIGINT else ""
            os.write(2, f"fgic: got {name}; stopping at the next step boundary{again}\n".encode())
        self.signum = self.signum or signum

    @property
    def requeue(self) -> bool:
        """Whether a Slurm job may be requeued after this stop: not after Ctrl-C, the user's own stop."""
        return self.signum != signal.SIGINT

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED

    def done(self) -> None:
        """The stop is complete (checkpoint written, job requeued); the process only leaves now. Further stop
        signals are ignored: the interpreter's shutdown restores their default action, and a SIGTERM then (torchrun's
        to the ranks still running when the first has left) would turn exit 75 into death by a signal."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def agree(self, reduce_max) -> bool:
        """Whether any rank got a stop signal (`reduce_max` is the ranks' max); afterwards every rank knows which."""
        self.hooks.slow_step()
        signum = reduce_max(self.signum or 0)
        if signum:
            self.signum = signum
        return bool(signum)


def hold(env=os.environ) -> None:
    """Block USR1/USR2 until fgic's handlers are installed (StopRequest.install unblocks them). For a launcher about
    to exec torchrun or fgic.ddp: the mask and a pending signal survive exec and reach the workers, so a warning that
    comes during start-up is acted on at the first step instead of killing the process. torchrun never unblocks them,
    so it is not killed by them either (Slurm signals every process of a step; torchrun has no handler for them).

    In a Slurm step SIGTERM and SIGINT are held too. Slurm sends SIGTERM to every process of the step (preemption,
    scancel, the end of a requeued job), and srun forwards a Ctrl-C's SIGINT to every one, so the workers get them
    anyway; torchrun's own handling would pass them on again (a second SIGINT ends the ranks at once) and SIGKILL them
    30 s later, whether or not rank 0 has written its checkpoint and requeued the job. Elsewhere (a container's
    SIGTERM to its first process only; a terminal's Ctrl-C, torchrun's workers being in sessions of their own)
    torchrun keeps passing them on."""
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS if in_step else HELD)


@contextlib.contextmanager
def blocked(signals=STOP_SIGNALS):
    """Hold `signals` back in this thread, and in the processes it starts meanwhile, until the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def term_held():
    """Hold SIGTERM back, in this process and the commands it starts, while the job requeues itself: Slurm ends a
    requeued job's step with SIGTERM, sometimes before `scontrol requeue` has exited, and a scontrol killed that way
    reads as a failed requeue. On leaving, a held SIGTERM is delivered (fgic's handler already has its stop)."""
    return blocked((signal.SIGTERM,))


def ignore_stop(*_) -> None:
    """For a helper process (a loader worker, a cache builder): leave the stop signals to the training process.
    Slurm signals every process of a step; torch's loader workers die of a SIGTERM that is not their parent's (the
    training process then raises "DataLoader worker ... killed by signal" mid-step), and workers that a forkserver or
    spawn starts (Python 3.14's default) die of USR1/USR2 too. Start the helpers inside `blocked()`: they inherit the
    block, so nothing reaches them before this runs.

    The signals stay blocked and a thread takes them: a SIGTERM from the process that started this one still ends
    it, as torch's own handler does (DataLoader's shutdown, multiprocessing's at exit, which would otherwise wait
    forever for a worker that ignores it); every other is dropped."""
    owner = multiprocessing.parent_process()  # the training process, also under forkserver (getppid: the server)
    owner_pid = owner.pid if owner is not None else os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # this thread's block passes to threads started later
    threading.Thread(target=_take_stop_signals, args=(owner_pid,), daemon=True, name="fgic-stop-signals").start()


def _take_stop_signals(owner_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == owner_pid:
            os._exit(0)
