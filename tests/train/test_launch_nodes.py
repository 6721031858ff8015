"""Two nodes on loopback (launch/torchrun.sh with NNODES=2): a node dies, both stop, the job is
restarted and finishes like one node. Its own module so that it runs beside test_launch.py's
other drills under pytest-xdist (`make test` runs two workers, one module each)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, step_metrics
from test_failures import recipe  # noqa: F401  (fixture)
from test_launch import SCRIPTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(recipe_path: Path, run_dir: Path, rank: int, port: int, nnodes: int = 2, nproc: int = 1,
         kill_after: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "NNODES": str(nnodes), "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "NPROC_PER_NODE": str(nproc), "RDZV_ID": f"test{port}",
           "STRATA_DIST_TIMEOUT": "20"}  # the node that loses its peer fails fast instead of hanging
    for key in ("STRATA_TEST_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    if nnodes == 1:
        env.pop("MASTER_ADDR")
    if kill_after:
        env["STRATA_TEST_FAULT"] = f"kill@{kill_after}"
    return subprocess.Popen(["bash", str(SCRIPTS[0]), str(recipe_path), "--run-dir", str(run_dir)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # a node left waiting for its dead peer
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


@pytest.mark.slow
def test_two_nodes_on_loopback_lose_a_node_restart_and_finish_like_one_node(recipe, tmp_path):  # noqa: F811
    ref = tmp_path / "ref"
    [(rc, text)] = finish([node(recipe, ref, 0, free_port(), nnodes=1, nproc=2)])
    assert rc == 0, text[-3000:]
    run_dir = tmp_path / "run"
    port = free_port()
    results = finish([node(recipe, run_dir, 0, port), node(recipe, run_dir, 1, port, kill_after="1:3")], timeout=120)
    assert all(rc != 0 for rc, _ in results)  # node 1 died; node 0 lost its peer
    port = free_port()
    results = finish([node(recipe, run_dir, 0, port), node(recipe, run_dir, 1, port)])
    assert all(rc == 0 for rc, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    assert "resuming at step 2 from s01-step000002" in results[0][1]
    assert step_metrics(run_dir) == step_metrics(ref)
