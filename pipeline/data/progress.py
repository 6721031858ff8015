"""Progress for people: tqdm's bar on a terminal, plain lines with an ETA everywhere else.

On a terminal tqdm redraws one line with carriage returns. In a SLURM `.out` file, in CI or
through `| tee`, those frames pile up into one unreadable line with the step log interleaved.
Without a terminal Strata prints instead one ordinary line every STRATA_PROGRESS_INTERVAL seconds
(default 30): `stage 1/2 general: 40/120 step (33%), 2.1 step/s, elapsed 0:00:19, ETA 0:00:38`.
A slow step reads `2.5 s/step`, never `0.0 step/s`. Off a terminal no library draws a bar either
(`silence_library_bars`: transformers' "Writing model shards", lm-eval's, datasets').
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from typing import Any

from pipeline.distributed import log

PROGRESS_INTERVAL_ENV = "STRATA_PROGRESS_INTERVAL"  # seconds between plain progress lines
LOG = log(__name__)


SCALED_UNITS = {"B"}  # amounts in these units read 1.2M, with SI prefixes; steps and batches read 1,234


def progress_bar(total: int | None, desc: str, unit: str, initial: int = 0, disable: bool = False,
                 leave: bool = True) -> Any:
    """tqdm when stderr is a terminal, else PlainProgress (the same update/write/close/n).
    `leave`: tqdm keeps the finished bar on screen."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable,
                    unit_scale=unit in SCALED_UNITS, leave=leave, dynamic_ncols=True, mininterval=1.0)
    return PlainProgress(total, desc, unit, initial, disable)


LIBRARY_BAR_SWITCHES = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def silence_library_bars() -> None:
    """Off a terminal, turn off the progress bars of tqdm (lm-eval), huggingface_hub, transformers and
    datasets: in this process (libraries already imported) and in the ones it starts (the switches
    are environment variables, which the libraries read when imported). A switch the user set stays."""
    if sys.stderr.isatty():
        return
    for key, value in LIBRARY_BAR_SWITCHES.items():
        os.environ.setdefault(key, value)
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def _clock(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


def _amount(n: float, unit: str, scale: bool) -> str:
    if not scale:
        return f"{n:,.0f}"
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{prefix}"
        n /= 1000
    return f"{n:.1f}P"


def _speed(rate: float, unit: str, scale: bool) -> str:
    """`2.1 step/s`, or `2.5 s/step` below one unit a second (never `0 step/s` on slow steps)."""
    if rate <= 0:
        return f"no {unit} done yet"
    if rate < 1:
        return f"{1 / rate:,.1f} s/{unit}"
    return f"{_amount(rate, unit, scale) if scale else f'{rate:,.1f}'} {unit}/s"


class PlainProgress:
    """Plain progress lines at a modest interval, for output that is not a terminal."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, disable: bool = False,
                 interval: float | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.disable, self.unit_scale = disable, unit in SCALED_UNITS
        self.interval = float(os.environ.get(PROGRESS_INTERVAL_ENV, 30)) if interval is None else interval
        self._start_n = initial
        self._start = self._last = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.interval:
            self._last = now
            LOG.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{_amount(self.n, self.unit, self.unit_scale)}"
        if self.total:
            done += f"/{_amount(self.total, self.unit, self.unit_scale)} {self.unit} ({self.n / self.total:.0%})"
        else:
            done += f" {self.unit}"
        eta = f", ETA {_clock((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        return f"{self.desc}: {done}, {_speed(rate, self.unit, self.unit_scale)}, elapsed {_clock(elapsed)}{eta}"

    def write(self, text: str) -> None:
        LOG.info(text)

    def close(self) -> None:
        pass
