"""`strata train RECIPE --nproc-per-node N`: start the workers with torch's elastic launch API and
exit the way one process does.

Under plain `torchrun`, a worker's user error or a pre-emption ends in the launcher's traceback
(ChildFailedError, `SignalException: Process N got signal: 15`) and exit code 1: the worker's one
clear line is followed by pages of launcher output, and a SLURM script cannot tell a pre-emption
from a crash. Here the launcher is Strata's own process:

- the workers are `python -m pipeline train ...` started by
  `torch.distributed.launcher.api.elastic_launch` (c10d rendezvous: `localhost:0` on one node,
  `--rdzv-endpoint` across nodes; no restarts: a resume is the same command run again);
- SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 sent to the launcher are passed to the workers,
  which finish their step, write a checkpoint and exit 75 (pipeline/train/failures.py); the
  launcher waits up to `--shutdown-timeout` seconds for that before it kills them;
- each worker writes its exit code into a folder the launcher gives it (STRATA_EXIT_DIR; the
  launch API reports no codes after a signal), and the launcher exits with 0 when every worker
  succeeded, 2 when any worker refused a user error (it printed the one line), 75 when the
  workers stopped for a pre-emption with their checkpoint written, else the code of the first
  worker that failed by itself (workers the launcher stopped afterwards are killed by its signal),
  or 128 + N when a worker was killed by signal N. The launcher prints nothing of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import StrataError

EXIT_DIR = "STRATA_EXIT_DIR"  # where each worker writes its exit code (file RANK)
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
USER_ERROR, PREEMPTED = 2, 75
REPORT_GRACE_S = 5.0


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc-per-node", type=int,
                        help="start this many workers on this node (torch's elastic launch) and exit with their code")
    parser.add_argument("--nnodes", type=int, default=1, help="with --nproc-per-node: nodes in the job")
    parser.add_argument("--rdzv-endpoint", help="with --nnodes > 1: HOST:PORT of the c10d rendezvous")
    parser.add_argument("--rdzv-id", default="strata", help="with --nnodes > 1: the rendezvous id (a job id)")
    parser.add_argument("--shutdown-timeout", type=int, default=600,
                        help="seconds the workers get to checkpoint after SIGTERM/SIGUSR1 before they are killed")


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The `strata train` command line of a worker: the same run, without the launch options."""
    argv = ["--debug"] if args.debug else []
    argv += ["train", str(args.recipe)]
    return argv + (["--run-dir", str(args.run_dir)] if args.run_dir else [])


def launch(args: argparse.Namespace) -> int:
    """Run the workers; the exit code one process would have given."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise StrataError("--nproc-per-node and --nnodes must be >= 1")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise StrataError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node's address)")
    single = args.nnodes == 1 and not args.rdzv_endpoint
    config = LaunchConfig(min_nodes=args.nnodes, max_nodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                          run_id=uuid.uuid4().hex if single else args.rdzv_id, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0" if single else args.rdzv_endpoint, max_restarts=0,
                          signals_to_handle=FORWARDED, shutdown_timeout=args.shutdown_timeout)
    with tempfile.TemporaryDirectory(prefix="strata-exit-") as exits, quiet_launcher(), worker_env(exits):
        try:
            elastic_launch(config, sys.executable)("-m", "pipeline", *worker_argv(args))
            return 0
        except ChildFailedError as e:
            codes = {**worker_codes(Path(exits)), **{r: f.exitcode for r, f in e.failures.items()}}
        except SignalException as e:  # passed on to the workers, which have ended (or were killed)
            codes = worker_codes(Path(exits))
            if len(codes) < args.nproc_per_node:  # some worker left no code: killed
                codes[-1] = -int(e.sigval)
    return exit_code(codes)


def exit_code(codes: dict[int, int]) -> int:
    """One code for the workers' codes by rank (only those that ended; negative: killed by signal)."""
    failed = [codes[r] for r in sorted(codes) if codes[r] != 0]
    if not failed:
        return 0
    if USER_ERROR in failed:
        return USER_ERROR
    if all(c == PREEMPTED for c in failed):
        return PREEMPTED
    # a worker that failed by itself, before one the launcher stopped (killed by a signal) in the cleanup
    first = next((c for c in failed if c > 0 and c != PREEMPTED), None) or next(c for c in failed if c < 0)
    return 128 - first if first < 0 else first


def worker_codes(folder: Path) -> dict[int, int]:
    codes = {}
    for file in folder.iterdir():
        with contextlib.suppress(ValueError, OSError):
            codes[int(file.name)] = int(file.read_text())
    return codes


def record_exit(code: int) -> None:
    """In a worker started by `launch`: leave this rank's exit code for the launcher. In any worker
    of several (`launch` or a plain torchrun) that failed, other than rank 0: wait REPORT_GRACE_S
    before exiting. An error every rank raised is printed by rank 0 alone, and the launcher stops
    the other ranks as soon as one exits: under load rank 0's line was lost."""
    rank = os.environ.get("RANK", "0")
    if folder := os.environ.get(EXIT_DIR):
        with contextlib.suppress(OSError):
            Path(folder, rank).write_text(str(code))
    if code and rank != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(REPORT_GRACE_S)



@contextlib.contextmanager
def worker_env(exits: str) -> Iterator[None]:
    os.environ[EXIT_DIR] = exits
    try:
        yield
    finally:
        os.environ.pop(EXIT_DIR, None)


@contextlib.contextmanager
def quiet_launcher() -> Iterator[None]:
    """The launch API's own log lines (its config, 'Sending process N closing signal', the failure
    summary) off: the workers print what a user needs, as one process would."""
    logger = logging.getLogger("torch.distributed.elastic")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
