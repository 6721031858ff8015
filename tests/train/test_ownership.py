"""One writer per run folder: the lock rank 0 holds, the run id every rank checks, and workers that
stop by themselves when their launcher dies (pipeline/train/ownership.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TORCHRUN, prepared_recipe, recipe_dict, small_corpus, step_metrics, strata

from pipeline.train.ownership import LOCK_FILE, RunOwner, RunOwnershipLost


def test_a_locked_run_folder_refuses_a_second_owner_naming_the_holder(tmp_path):
    first = RunOwner(tmp_path / "run")
    first.claim()
    with pytest.raises(RunOwnershipLost, match=rf"in use by another strata train \(host .+, pid {os.getpid()}, since "):
        RunOwner(tmp_path / "run").claim()
    first.release()  # (the kernel does this when the process dies, SIGKILL included)
    again = RunOwner(tmp_path / "run")
    again.claim()
    assert again.run_id != first.run_id
    again.release()


def test_a_worker_of_an_earlier_launch_stops_before_writing_once_another_run_took_the_folder(tmp_path):
    owner = RunOwner(tmp_path / "run")
    owner.claim()
    worker = RunOwner(tmp_path / "run")  # a rank > 0 of the same launch: reads the id, writes
    worker.learn()
    worker.check()
    owner.release()
    RunOwner(tmp_path / "run").claim()  # a new launch takes the folder (new run id)
    with pytest.raises(RunOwnershipLost, match="another strata train took over this run folder"):
        worker.check()


def one_stage(tmp: Path, steps: int, **overrides) -> Path:
    en = small_corpus(tmp, "en", 30)
    stage = {"name": "general", "tokens": 8 * 64 * steps, "sources": [{"name": "en", "path": str(en)}],
             "schedule": {"warmup": 1, "max_lr": 3e-3}}
    return prepared_recipe(tmp, recipe_dict(tmp, [stage], checkpoint={"every": 0}, **overrides))


def env() -> dict:
    full = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("STRATA_TEST_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(key, None)
    return full


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_train_on_a_busy_run_folder_refuses_at_once_and_the_first_run_completes(tmp_path):
    steps = 6
    recipe, run_dir = one_stage(tmp_path, steps), tmp_path / "run"
    release = tmp_path / "release"  # the first run holds after step 2 until this file exists
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(recipe), "--run-dir", str(run_dir)],
                             env={**env(), "STRATA_TEST_FAULT": "hold@1:2", "STRATA_TEST_RELEASE": str(release)},
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = run_dir / LOCK_FILE
    wait_for(lambda: lock.is_file() and f'"pid": {first.pid}' in lock.read_text(), 120, "the first run's lock")
    start = time.monotonic()
    second = strata(["train", recipe, "--run-dir", run_dir], expect=1)
    assert "Traceback" not in second.stderr
    [line] = [ln for ln in second.stderr.splitlines() if ln.startswith("error: ")]
    assert f"{run_dir}: in use by another strata train (host " in line and f"pid {first.pid}, since " in line
    assert first.poll() is None, "the first run ended before the second was refused"
    release.touch()
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    assert [r["step"] for r in step_metrics(run_dir)] == list(range(1, steps + 1))
    assert time.monotonic() - start < 60


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_workers_whose_torchrun_launcher_was_killed_stop_by_themselves(tmp_path):
    recipe, run_dir = one_stage(tmp_path, 400), tmp_path / "run"
    launcher = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "pipeline", "train",
                                 str(recipe), "--run-dir", str(run_dir)], env=env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, 240, "the first logged step")
        workers = children(launcher.pid)
        assert len(workers) == 2
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone: its workers live in their own groups
        launcher.wait()
        wait_for(lambda: not any(alive(w) for w in workers), 10, "the orphaned workers to stop")
        size = metrics.stat().st_size
        time.sleep(2)
        assert metrics.stat().st_size == size  # nobody writes on
        lines = metrics.read_text().splitlines()
        assert 0 < len(lines) < 400 and json.loads(lines[0])["step"] == 1
    finally:
        for pid in [launcher.pid, *children(launcher.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
