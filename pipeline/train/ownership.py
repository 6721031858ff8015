"""One writer per run folder: the lock that rank 0 holds, the run id every rank checks, and the
watchdog that stops workers whose launcher died.

Two `strata train` on one folder (or a resume while orphaned workers of a killed launch still
run) used to interleave their writes: metrics lines lost, checkpoints half overwritten. Now:

- Rank 0 takes an exclusive `fcntl.flock` on RUN_DIR/train.lock before anything else and holds
  it until the process ends. The kernel releases it when the process dies, even by SIGKILL, so
  there is never a stale lock to clean up. A second run finds it held and exits at once with one
  line naming the holder (host, pid, since when), which rank 0 wrote into the lock file.
- The lock file also carries a fresh run id. Every rank reads it once it has joined the process
  group (rank 0 wrote it before joining) and checks it again before each checkpoint it writes: a
  worker left over from an earlier launch finds another id there and stops without writing.
- Under torchrun each worker watches its parent, the torchrun agent. When the agent dies (a
  SIGKILLed launcher; torchrun starts its workers in their own process groups, so they survive
  it) the worker is re-parented, notices within a second and exits at once. Exiting mid-step is
  safe for the same reason a SIGKILL is: every write is atomic (pipeline/files.py).

Once rank 0 holds the lock, the temporaries a killed run left (`.NAME.tmp-PID`, files.py) are removed.
`strata eval` and `strata report` never take the lock (eval.json has its own, files.py).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from pipeline.distributed import ONE_RANK, log
from pipeline.errors import StrataError
from pipeline.files import remove_leftovers

LOCK_FILE = "train.lock"
LOG = log(__name__)
EXIT_ORPHANED = 70  # the launcher died; the worker stopped on its own (run the launch again to resume)


class RunOwnershipLost(StrataError):
    """This process is not (or no longer) the run folder's writer. Raised on one rank only, so the
    command line prints it on whichever rank it happens (see pipeline/cli.py)."""


def describe_os_error(e: OSError) -> str:
    return e.strerror or str(e)


class RunOwner:
    """The run folder's lock (rank 0) and run id (every rank)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.run_id: str | None = None
        self._file: IO[str] | None = None

    def claim(self) -> None:
        """Rank 0: take the lock or refuse with who holds it; then write our holder line and run id."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise StrataError(f"{self.run_dir}: cannot write to the run folder ({describe_os_error(e)})") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            text = f.read()
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StrataError(f"{self.path}: cannot lock the run folder ({describe_os_error(e)})") from None
            raise RunOwnershipLost(f"{self.run_dir}: in use by another strata train ({holder(text)}); "
                                   "wait for it to finish, stop it, or use another --run-dir") from None
        self.run_id = uuid.uuid4().hex
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": dt.datetime.now().isoformat(timespec="seconds"),
                  "run_id": self.run_id}
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            f.close()
            raise StrataError(f"{self.path}: cannot write to the run folder ({describe_os_error(e)})") from None
        self._file = f  # held open (and locked) until release() or the end of the process
        # The folder is ours: a killed run's temporaries (`.latest.json.tmp-PID`, `.hf.tmp-PID`) go.
        for folder in [self.run_dir, self.run_dir / "checkpoints", *sorted((self.run_dir / "stages").glob("*"))]:
            remove_leftovers(folder)

    def learn(self) -> None:
        """Other ranks: remember the run id rank 0 wrote (call once the process group is joined)."""
        if self.run_id is None:
            self.run_id = _read(self.path).get("run_id")

    def check(self) -> None:
        """Before a write: refuse if another run has taken the folder since we started."""
        if self._file is not None:
            return  # rank 0 holds the lock: nobody else can have taken over
        now = _read(self.path).get("run_id")
        if now != self.run_id:
            raise RunOwnershipLost(f"{self.run_dir}: another strata train took over this run folder "
                                   f"({holder(self.path.read_text() if self.path.is_file() else '')}); "
                                   f"this process (pid {os.getpid()}) stops without writing")

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def holder(text: str) -> str:
    """'host H, pid P, since T' from the lock file's content (which may be half written)."""
    try:
        h = json.loads(text)
        return f"host {h['host']}, pid {h['pid']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


# ---------------------------------------------------------------------------------------------


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_launcher(interval: float = 1.0) -> threading.Thread | None:
    """Under torchrun: exit this worker as soon as its launcher (the parent process) is gone."""
    if not under_torchrun():
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:  # re-parented: the torchrun agent died
                try:
                    LOG.error(f"error: pid {os.getpid()}: the torchrun launcher (pid {parent}) is gone; stopping "
                              "without writing more", extra=ONE_RANK)  # every rank says it, with its number
                finally:
                    os._exit(EXIT_ORPHANED)
            time.sleep(interval)

    thread = threading.Thread(target=watch, name="strata-launcher-watch", daemon=True)
    thread.start()
    return thread
