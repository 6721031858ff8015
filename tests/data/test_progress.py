"""Without a terminal, progress is a plain line with an ETA at a modest interval, not tqdm frames."""

from __future__ import annotations

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
    bar = PlainProgress(100, "stage 1/1 general", "step", interval=3600)
    bar._start -= 25.0  # one step done in 25 s
    bar.update(1)
    line = bar.line()
    assert ", 25.0 s/step, " in line and "step/s" not in line
    bar._start -= 25.0 - 25.0 / 40  # 40 steps a second
    bar.update(39)
    assert ", 40.0 step/s, " in bar.line() or " step/s, " in bar.line()
