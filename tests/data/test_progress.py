"""Without a terminal, progress is a plain line with an ETA at a modest interval, not tqdm frames."""

from __future__ import annotations

import re

from pipeline.data.progress import PlainProgress, progress_bar


def test_plain_progress_prints_a_line_with_eta_at_most_once_per_interval(capsys):
    bar = PlainProgress(100, "stage 1/2 general", "step", interval=3600)
    for _ in range(10):
        bar.update(1)
    assert capsys.readouterr().out == ""  # the interval has not passed
    bar.interval = 0
    bar.update(1)
    line = capsys.readouterr().out
    assert line.startswith("stage 1/2 general: 11/100 step (11%), ") and ", ETA " in line and line.endswith("\n")
    assert "\r" not in line


def test_progress_bar_is_plain_when_stderr_is_not_a_terminal(capsys):
    assert isinstance(progress_bar(10, "x", "step"), PlainProgress)  # pytest captures stderr: not a tty


def test_a_slow_step_reads_seconds_per_step_not_zero_steps_per_second():
    slow = PlainProgress(100, "stage 1/1 general", "step", interval=3600)
    slow._start -= 25.0  # one step in 25 s
    slow.update(1)
    assert re.search(r", 2[45]\.\d s/step, ", slow.line()) and "step/s" not in slow.line()
    fast = PlainProgress(100, "stage 1/1 general", "step", interval=3600)
    fast._start -= 1.0  # 40 steps in a second
    fast.update(40)
    assert re.search(r", [34]\d\.\d step/s, ", fast.line()) and "s/step" not in fast.line()
