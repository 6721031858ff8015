"""The stream in DataLoader worker processes, so that reading and packing overlap training.

`make_loader` returns the stage's `StageStream` itself when `train.num_workers` is 0, and a
`StreamLoader` otherwise. Both are a `BatchStream`, what the trainer uses: `next()`, `plan`, `steps`,
`grad_accum`, `retokenized`, `state_dict()`, `load_state_dict()`, `close()`.

Workers prefetch ahead of the trainer, so the state must not come from them: the loader keeps
a copy of the stream in the main process that only runs the mixer (no token is read) and
advances it by one step each time the trainer has taken a whole step's micro-batches. Its
`state_dict()` therefore counts the samples *trained*, never the ones prefetched. Worker w of N
delivers micro-batches w, w + N, ... and the DataLoader takes them in turn, so the order is the
stream's exact order.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.context import StageContext
from pipeline.data.stream import ReadPlan, StageStream
from pipeline.recipe.plan import StagePlan


@runtime_checkable
class BatchStream(Protocol):
    """A stage's micro-batches for one rank, as the trainer reads them."""

    plan: StagePlan  # the stage's plan, as handed down (RHO-1 and scoring read the mixture from it)
    steps: int  # optimizer steps in the stage
    grad_accum: int  # micro-batches per optimizer step on this rank
    retokenized: dict[str, dict]  # sources whose cursor was converted to a new tokenizer at the stage start

    def __next__(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...  # only at optimizer-step boundaries: the samples trained so far

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


class _WorkerStream(IterableDataset):
    """Built in each worker from the stream's arguments and state (its caches are not pickled)."""

    def __init__(self, args: tuple, state: dict):
        self.args, self.state = args, state

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        torch.set_num_threads(1)  # the trainer owns the cores; a worker only slices and stacks arrays
        stream = StageStream(*self.args)
        stream.load_state_dict(self.state)
        yield from stream.micro_batches(worker, workers)


class StreamLoader:
    """A stage's micro-batches read by DataLoader worker processes; the same batches and state as
    the `StageStream` it wraps (which keeps the state; the workers only read ahead)."""

    prefetch_factor = 4

    def __init__(self, stream: StageStream, num_workers: int = 2):
        self.stream = stream
        # The workers reuse the plan and the manifests this stream read: nothing is planned or read
        # twice. They load the stream's state, which replaces all that `carried` decides (no carry).
        self.args = (stream.recipe, stream.stage_index, stream.rank, stream.world_size, None,
                     ReadPlan(stream.plan, stream.prepared))
        self.num_workers = num_workers
        self.steps, self.grad_accum = self.stream.steps, self.stream.grad_accum
        self._iter = None
        self._taken = 0  # micro-batches of the current step already handed to the trainer

    @property
    def retokenized(self) -> dict[str, dict]:
        return self.stream.retokenized

    @property
    def plan(self) -> StagePlan:
        return self.stream.plan

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            dataset = _WorkerStream(self.args, self.stream.state_dict())
            # its own generator: starting the workers must not draw from the global RNG, which a
            # resumed stage has just restored for dropout (the stream itself needs no seed)
            self._iter = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                         prefetch_factor=self.prefetch_factor, generator=torch.Generator(),
                                         pin_memory=torch.cuda.is_available(), persistent_workers=False))
        batch = next(self._iter)
        self._taken += 1
        if self._taken == self.grad_accum:
            self.stream.skip_step()
            self._taken = 0
        return batch

    def state_dict(self) -> dict:
        if self._taken:
            raise RuntimeError("StreamLoader.state_dict() is only defined at optimizer-step boundaries")
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
        self._iter, self._taken = None, 0  # workers restart from the loaded state on the next batch

    def close(self) -> None:
        self._iter = None  # ends the worker processes


def make_loader(ctx: StageContext, carried: dict | None = None) -> BatchStream:
    """The stage's BatchStream: read in `train.num_workers` DataLoader workers, or in this process."""
    stream = StageStream.for_stage(ctx, carried)
    workers = ctx.recipe.train.num_workers
    return stream if workers == 0 else StreamLoader(stream, num_workers=workers)
