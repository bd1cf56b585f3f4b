"""Signals: SIGTERM/SIGUSR1/SIGUSR2 (Slurm's preemption and time-limit warnings) ask training to stop at the next
step boundary that every rank agrees on; the handler only records the request.

A signal that comes during evaluation or a checkpoint write is acted on after the next training step (the
end-of-epoch checkpoint already holds everything); in the last epoch the run simply finishes."""
from __future__ import annotations

import contextlib
import os
import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
HELD = (signal.SIGUSR1, signal.SIGUSR2)  # blocked by launchers until the handlers are in place (hold)
# A run stopped by a signal, its checkpoint written: not finished, resume it (EX_TEMPFAIL, "try again later").
EXIT_PREEMPTED = 75


class StopRequest:
    """Set by a stop signal. Further signals while the checkpoint is written change nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._pid = os.getpid()  # forked loader workers inherit the handler; only this process speaks
        # test hook: slow steps (agree runs after each one), so that a signal lands mid-training on any machine
        self._test_step_sleep = float(os.environ.get("FGIC_TEST_STEP_SLEEP_S", 0))

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)  # a signal held back by a launcher arrives now
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None and os.getpid() == self._pid:  # straight to fd 2: sys.stderr may be mid-write (tqdm)
            os.write(2, f"fgic: got {signal.Signals(signum).name}; stopping at the next step boundary\n".encode())
        self.signum = self.signum or signum

    def agree(self, reduce_max) -> bool:
        """Whether any rank got a stop signal (`reduce_max` is the ranks' max); afterwards every rank knows which."""
        if self._test_step_sleep:
            time.sleep(self._test_step_sleep)
        signum = reduce_max(self.signum or 0)
        if signum:
            self.signum = signum
        return bool(signum)


def hold() -> None:
    """Block USR1/USR2 until fgic's handlers are installed (StopRequest.install unblocks them). For a launcher about
    to exec torchrun or fgic.ddp: the mask and a pending signal survive exec and reach the workers, so a warning that
    comes during start-up is acted on at the first step instead of killing the process. torchrun never unblocks them,
    so it is not killed by them either (Slurm signals every process of a step; torchrun has no handler for them)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


@contextlib.contextmanager
def term_held():
    """Hold SIGTERM back, in this process and the commands it starts, while the job requeues itself: Slurm ends a
    requeued job's step with SIGTERM, sometimes before `scontrol requeue` has exited, and a scontrol killed that way
    reads as a failed requeue. On leaving, a held SIGTERM is delivered (fgic's handler already has its stop)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
