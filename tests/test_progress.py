"""Progress on rank 0: whole lines at a steady interval in a log file or a Slurm log, tqdm's bar on a terminal."""
import io
import re

from fgic import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_whole_lines_with_the_rate_and_both_etas(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    out = io.StringIO()  # not a terminal, as a redirected file or a Slurm log
    shown = progress.progress(range(10), True, "epoch 2/5", later_steps=30, images_per_step=64, stream=out)
    for step in shown:
        clock.now += 12.0  # a 12 s step: a line every 30 s, i.e. after steps 3, 6 and 9 (not after the last)
        if step == 4:
            shown.set_postfix(loss="1.234")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "epoch 2/5  step 3/10  5 img/s  ETA 1m24s (run 7m24s)"
    assert [re.search(r"step (\d+)/", line).group(1) for line in lines] == ["3", "6", "9"]
    assert lines[1].endswith("  loss 1.234")


def test_other_ranks_and_short_passes_print_nothing():
    out = io.StringIO()
    assert list(progress.progress(range(5), False, "epoch 1/1", stream=out)) == list(range(5))
    assert list(progress.progress(range(5), True, "test", stream=out)) == list(range(5))  # under 30 s
    assert out.getvalue() == ""


def test_a_terminal_gets_the_bar_with_the_runs_eta():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    out = Tty()
    bar = progress.progress(range(4), True, "epoch 1/2", later_steps=4, stream=out)
    assert isinstance(bar, progress.Bar)
    for _ in bar:
        pass
    bar.refresh()
    assert "run ETA" in bar.format_dict["postfix"]


def test_durations_read_at_a_glance():
    assert [progress.duration(s) for s in (9, 245, 11230)] == ["9s", "4m05s", "3h07m"]


def test_an_epoch_resumed_inside_counts_its_steps_from_the_epochs_start(monkeypatch):
    """Resumed after step 4 of 15, the loader holds the 11 steps left: the lines say step 7/15, not 3/11, and the
    ETA is of the 8 steps left; the bar counts from 4 of 15 too."""
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    out = io.StringIO()
    for _ in progress.progress(range(11), True, "epoch 2/5", images_per_step=64, stream=out, done=4):
        clock.now += 10.0
    assert out.getvalue().splitlines()[0] == "epoch 2/5  step 7/15  6 img/s  ETA 1m20s"

    class Tty(io.StringIO):
        def isatty(self):
            return True
    bar = progress.progress(range(11), True, "epoch 2/5", stream=Tty(), done=4)
    assert (bar.n, bar.total) == (4, 15)
    bar.close()
