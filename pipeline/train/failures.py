"""When things go wrong during training: scheduler signals, non-finite losses, and test faults.

The trainer calls three hooks: `StepGuard.step()` instead of `engine.step()`, `after_step()` once
an optimizer step is done, and `stop_if_requested()` after the step's checkpoint. Every decision
here is taken on values all-reduced across ranks, so all ranks skip, stop or continue together;
a rank that decided alone would leave the others waiting in a collective forever.

Signals. SLURM (or Kubernetes, or a user) sends SIGTERM before killing a job; with
`#SBATCH --signal=B:USR1@120` the batch script is warned two minutes ahead and forwards SIGUSR1.
Either signal only sets a flag: the current step finishes, the flag is all-reduced with the
step's loss (no extra collective), every rank writes a mid-stage checkpoint and the process exits
with EXIT_INTERRUPTED (75, EX_TEMPFAIL: "try again later"). Running the same command resumes.

Non-finite loss. The loss of the whole global batch is all-reduced *before* the optimizer step
of the accumulation boundary. If it is NaN or inf on any rank, DeepSpeed's step still runs (it
must: it advances its micro-step counters and zeroes the accumulated gradients) but the inner
optimizer's `step` is replaced for that one call by a no-op, so neither weights nor AdamW moments
see the bad gradients. The data of that step is consumed and the LR schedule moves on, exactly as
if the step had happened (resume arithmetic stays simple). After `train.max_bad_steps`
consecutive skipped steps the run stops with one error line; no checkpoint is written for the
failing step, so the last checkpoint holds the last good weights.

Test faults (`STRATA_TEST_FAULT`, comma-separated; used by the tests through tests/conftest.py's `strata()`):
  nan@S:N or nan@S:A-B    rank 0's loss is NaN on step N (or steps A..B) of stage S (1-based)
  sigterm@S:N             rank 0 receives SIGTERM during step N of stage S
  kill@S:N                every rank dies (SIGKILL) right after step N (and its checkpoint, if any)
  hold@S:N                every rank waits after step N until the file $STRATA_TEST_RELEASE exists
  kill@S:N:mid            every rank dies (SIGKILL) after the first micro-batch of step N
  kill-in-save@TAG        every rank dies while checkpoint TAG is half written
  disk-full@TAG           writing checkpoint TAG fails with ENOSPC on every rank
  torch-disk-full@TAG     torch's own writer fails on checkpoint TAG as on a full disk (files go to /dev/full)
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.distributed import log
from pipeline.errors import StrataError

EXIT_INTERRUPTED = 75  # stopped by a signal after writing a checkpoint; run the same command to resume
FAULT_ENV = "STRATA_TEST_FAULT"
LOG = log(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(Exception):
    """The run stopped on a scheduler signal after writing a checkpoint (not an error)."""

    exit_code = EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------------------
# Test faults.


def faults() -> list[tuple[str, str]]:
    raw = os.environ.get(FAULT_ENV, "")
    return [tuple(item.split("@", 1)) for item in raw.split(",") if "@" in item]


def fault_at(kind: str, stage: int, step: int, phase: str = "") -> bool:
    """Whether fault `kind` is set for (1-based stage, 1-based step[, phase])."""
    for k, where in faults():
        if k != kind:
            continue
        parts = where.split(":")
        if int(parts[0]) != stage or (parts[2] if len(parts) > 2 else "") != phase:
            continue
        lo, _, hi = parts[1].partition("-")
        if int(lo) <= step <= int(hi or lo):
            return True
    return False


def checkpoint_fault(tag: str, folder: Path, before: bool = False) -> None:
    """Called by StageCheckpoint.save before DeepSpeed writes `tag` into its temp `folder`
    (`before`) and once it has."""
    for kind, where in faults():
        if where != tag:
            continue
        if kind == "torch-disk-full" and before:
            # The first file DeepSpeed writes goes to /dev/full: torch's own writer fails exactly as
            # on a full disk (a RuntimeError from its C++ stream, after part of the folder exists).
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
                (folder / name).symlink_to("/dev/full")
        if before:
            continue
        if kind == "kill-in-save":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "disk-full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------------------------


class StopSignal:
    """Remembers the first SIGTERM/SIGUSR1; the trainer acts on it at the next step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not in a test thread)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name


def _no_step(*args: Any, **kwargs: Any) -> None:
    return None


class StepGuard:
    def __init__(self, max_bad_steps: int, rank: int, world_size: int):
        self.max_bad_steps = max_bad_steps
        self.rank = rank
        self.world_size = world_size
        self.signals = StopSignal()
        self.signals.install()
        self.stop: str | None = None  # the signal every rank agreed to stop on
        self.skipped = False  # whether the last optimizer step was skipped
        self.skipped_total = 0
        self.consecutive = 0
        self.first_bad: int | None = None
        self.at_stage = 0  # 1-based position of the step being trained, for messages and faults
        self.at_step = 0
        self.micro = 0
        self._hook = None

    def start_stage(self, index: int, step: int, engine: Any) -> None:
        """Called when a stage's engine is ready and `step` steps of it are done."""
        self.at_stage, self.at_step, self.micro = index + 1, step + 1, 0
        self.consecutive, self.first_bad = 0, None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.rank == 0 and any(k == "nan" for k, _ in faults()):
            # on the last hidden state: the chunked loss (pipeline/model/loss.py) never sees full logits
            self._hook = engine.module.base_model.register_forward_hook(self._inject_nan)

    def _inject_nan(self, module: Any, inputs: Any, output: Any) -> Any:
        if fault_at("nan", self.at_stage, self.at_step):
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    def step(self, engine: Any, optimizer: torch.optim.Optimizer, total: torch.Tensor) -> None:
        """Use instead of `engine.step()` after each micro-batch's backward; `total` holds this rank's
        summed micro-batch losses and is all-reduced in place at the accumulation boundary."""
        self.micro += 1
        if not engine.is_gradient_accumulation_boundary():
            if self.micro == 1 and fault_at("kill", self.at_stage, self.at_step, "mid"):
                os.kill(os.getpid(), signal.SIGKILL)
            engine.step()
            return
        if self.rank == 0 and fault_at("sigterm", self.at_stage, self.at_step):
            os.kill(os.getpid(), signal.SIGTERM)
        # One collective per step carries the loss and the stop flag together.
        flags = torch.stack([total.reshape(()), torch.tensor(1.0 if self.signals.received else 0.0, device=total.device)])
        if self.world_size > 1:
            dist.all_reduce(flags)
        total.copy_(flags[0])
        if flags[1].item() > 0 and self.stop is None:
            self.stop = self.signals.received or "a signal on another rank"
        self.skipped = not bool(torch.isfinite(flags[0]))
        if not self.skipped:
            engine.step()
            return
        # The inner optimizer (ours, also under ZeRO) must not apply NaN/inf gradients: shadow its
        # `step` for this one call; DeepSpeed still zeroes the gradients and advances its counters.
        optimizer.step = _no_step
        try:
            engine.step()
        finally:
            del optimizer.step

    def after_step(self, index: int, name: str, step: int) -> None:
        """Count a skipped step; stop the run after max_bad_steps consecutive ones."""
        self.at_step, self.micro = step + 1, 0
        if not self.skipped:
            self.consecutive, self.first_bad = 0, None
            return
        self.skipped_total += 1
        self.consecutive += 1
        self.first_bad = self.first_bad or step
        if self.rank == 0:
            LOG.warning(f"warning: stage {index + 1} {name!r} step {step}: the loss is not finite; optimizer step "
                        f"skipped ({self.consecutive} in a row, {self.skipped_total} in this run)")
        if self.consecutive >= self.max_bad_steps:
            raise StrataError(f"stage {index + 1} {name!r}: the loss was NaN/inf for {self.consecutive} consecutive "
                              f"steps ({self.first_bad}-{step}, train.max_bad_steps = {self.max_bad_steps}); stopped "
                              "without saving them, the last checkpoint is intact -- lower the LR or check the data")

    def stop_if_requested(self, index: int, name: str, step: int, ckpt: Any) -> None:
        """After the step's checkpoint (written because `stop` is set): leave the run, resumable."""
        if self.stop is None:
            return
        raise Interrupted(f"stopped by {self.stop} after step {step} of stage {index + 1} {name!r}; checkpoint "
                          f"{ckpt.folder / ckpt.latest().tag} written; run the same command to resume "
                          f"(exit code {EXIT_INTERRUPTED})")

    def close(self) -> None:
        self.signals.uninstall()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
