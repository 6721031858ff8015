"""Joining torchrun's process group, once, the same way for every command.

`strata train`, `strata eval` and `strata score` all run as one process or under torchrun. They
join here: NCCL on GPUs (each rank on its LOCAL_RANK device), gloo on CPU, with a collective
timeout from STRATA_DIST_TIMEOUT (default 30 min) so that a rank whose peer died — a lost node —
fails instead of hanging, and torchrun can end the job.

`log(name)` is the one rank-aware logger of library code: rank 0 speaks for all ranks, a message
only one rank has says `[rank N]`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DIST_TIMEOUT_ENV = "STRATA_DIST_TIMEOUT"  # seconds a collective may wait for a peer


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join(deepspeed_engine: bool = False) -> Dist:
    """Join torchrun's group if there is one. `deepspeed_engine`: DeepSpeed needs a process group
    even for a single process, so one of one is made on a free local port."""
    if deepspeed_engine and "RANK" not in os.environ:  # a plain `strata train`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if gpu:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    wanted = deepspeed_engine or int(os.environ.get("WORLD_SIZE", 1)) > 1
    if wanted and not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_ENV, 1800)))
        backend = "nccl" if gpu else "gloo"
        if deepspeed_engine:
            import deepspeed
            import deepspeed.ops

            if not gpu:
                # On CPU, DeepSpeed JIT-compiles a shared-memory op for *inference* all-reduce when
                # its comm backend starts. Training never uses it, and a process killed during
                # that compile leaves a lock file on which every later start waits forever.
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    if not dist.is_initialized():
        return Dist(0, 1, local_rank, device)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def leave() -> None:
    """Destroy the process group, if any. Through DeepSpeed when it is loaded: it caches the world
    group, and a group destroyed behind its back breaks the next engine built in this process."""
    import sys

    if not dist.is_initialized():
        return
    if "deepspeed.comm" in sys.modules and sys.modules["deepspeed.comm"].is_initialized():
        sys.modules["deepspeed.comm"].destroy_process_group()
    else:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank (so that every rank takes the same branch)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`train.dtype`: auto is bf16 on GPUs, fp32 on CPU."""
    return torch.bfloat16 if setting == "bf16" or (setting == "auto" and device.type == "cuda") else torch.float32


# -- the rank-aware logger -------------------------------------------------------------------------
ONE_RANK = {"one_rank": True}  # log(...).info(msg, extra=ONE_RANK): a message only this rank has


class _RankFilter(logging.Filter):
    """Rank 0's records pass; another rank's only when marked ONE_RANK, prefixed `[rank N]`."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        if getattr(record, "one_rank", False):
            record.msg = f"[rank {rank}] {record.msg}"
            return True
        return rank == 0


class _Stdout(logging.StreamHandler):
    """Plain lines to whatever sys.stdout is now (a terminal, a log file, a test's capture)."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler sets it once; the current stdout wins
        pass


def log(name: str) -> logging.Logger:
    """The logger of a library module (stdlib `logging` under "pipeline"): INFO and up, plain
    lines on stdout, rank 0's messages only unless one passes extra=ONE_RANK. Commands print
    their results themselves; library code logs through this."""
    root = logging.getLogger("pipeline")
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(name)
