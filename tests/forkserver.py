"""A fork server for the suite's single-process `strata` commands.

Every `strata COMMAND` the tests launch is a process of its own, as a user runs it; a fresh Python
spends about 6 CPU seconds importing torch, transformers and DeepSpeed before the command starts,
and the suite launches some seventy of them on one rank. Here one server process per pytest worker
imports those libraries once; each command is then a `fork()` of it that starts a new session,
takes the command's environment, working folder and output files, and runs `python -m pipeline`
(the same `__main__` a user's process runs, its exit code, atexit handlers and all). The child is
a process of its own: killed by a fault, it dies alone (-9), and the server reports its status.

What differs from a fresh interpreter: the libraries were imported before the command's
environment was set (the suite sets the variables they read at import, DS_ACCELERATOR and
OMP_NUM_THREADS, the same for every command), and every child has the server's hash seed.
Commands under torchrun, and the drills that kill a process at a random moment, still start
fresh interpreters.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PRELOAD = """
import deepspeed, deepspeed.ops, peft, transformers
from transformers import LlamaForCausalLM
import pipeline.cli, pipeline.train.trainer
"""

SERVER = r"""
import json, os, runpy, sys, threading
replies = os.fdopen(os.dup(1), "w")  # the replies' pipe; anything the imports print goes to stderr
os.dup2(2, 1)
exec(compile(sys.argv[1], "preload", "exec"))
# (pyarrow's jemalloc runs a native background thread; jemalloc is fork-safe, as DataLoader workers need)
assert threading.active_count() == 1, "a Python thread started during the imports: fork is unsafe"
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        replies.close()
        sys.argv = ["-m", *req["args"]]
        runpy.run_module("pipeline", run_name="__main__", alter_sys=True)  # sys.exit(main())
        sys.exit(0)
    replies.write(json.dumps({"pid": pid}) + "\n"); replies.flush()
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n"); replies.flush()
"""


class ForkServer:
    """One server per pytest worker, started at its first command; `run` keeps subprocess.run's
    contract for one command (returncode, stdout, stderr; TimeoutExpired after `timeout`)."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, PRELOAD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=cwd, text=True)
        self.replies: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put("")  # the server is gone

    def run(self, args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            req = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            pid = self._reply(timeout=120)["pid"]  # the first command waits for the imports
            try:
                code = self._reply(timeout)["code"]
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                self._reply(timeout=60)
                raise
            return subprocess.CompletedProcess(["strata", *args], code, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def _reply(self, timeout: float) -> dict:
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise subprocess.TimeoutExpired("strata (fork server)", timeout) from None
        if not line:
            raise RuntimeError(f"the fork server died (exit code {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
