"""Launch scripts and cluster drills: shellcheck, the torchrun wrapper's command line, two "nodes"
on loopback that lose a node and resume, and SIGKILL at random moments over seeded trials."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, step_metrics, strata
from test_failures import STEPS, recipe, reference  # noqa: F401  (fixtures)

from pipeline.commands.launch import exit_code

SCRIPTS = [REPO / "launch" / name for name in ("torchrun.sh", "slurm.sbatch", "prepare_array.sbatch")]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launch_scripts_pass_shellcheck():
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def torchrun_args(tmp_path: Path, **env: str) -> list[str]:
    """The command launch/torchrun.sh would exec, captured by a stand-in python."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    full = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "NPROC_PER_NODE": "4", **env}
    out = subprocess.run(["bash", str(SCRIPTS[0]), "r.yaml", "--run-dir", "runs/x"], env=full, capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


def test_torchrun_script_single_node_and_multi_node_rendezvous(tmp_path):
    one = torchrun_args(tmp_path)
    assert one == ["-m", "pipeline", "train", "r.yaml", "--run-dir", "runs/x", "--nproc-per-node", "4",
                   "--shutdown-timeout", "600"]  # strata's own launcher (torch's elastic launch API)
    many = " ".join(torchrun_args(tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29400"))
    assert "--nnodes 2 --rdzv-id strata --rdzv-endpoint 10.0.0.1:29400" in many and "--nproc-per-node 4" in many
    missing = subprocess.run(["bash", str(SCRIPTS[0]), "r.yaml"], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"], "PYTHON": str(tmp_path / "python"), "NNODES": "2",
                                  "NPROC_PER_NODE": "1"})
    assert missing.returncode != 0 and "NODE_RANK" in missing.stderr


def test_launched_workers_refusing_a_user_error_give_its_one_line_and_exit_code(recipe, tmp_path):  # noqa: F811
    bad = tmp_path / "bad-batch.yaml"  # 6 sequences do not split into 2 ranks x micro-batches of 2
    bad.write_text(recipe.read_text().replace("global: 8", "global: 6"))
    # the code one process gives for this error (every rank raises it), not the launcher's 1 or 143
    proc = strata(["train", bad, "--run-dir", tmp_path / "run", "--nproc-per-node", "2"], expect=1, timeout=300)
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "batch" in errors[0], proc.stderr[-3000:]


def test_the_launcher_exits_with_what_the_workers_say():
    assert exit_code({0: 0, 1: 0}) == 0
    assert exit_code({0: 2, 1: -15}) == 2  # a recipe error; the other worker killed in the cleanup
    assert exit_code({0: -15, 1: 1}) == 1  # the worker that failed, not the one the launcher stopped
    assert exit_code({0: 75, 1: 75}) == 75  # pre-empted, checkpoint written
    assert exit_code({0: 75, -1: -15}) == 128 + 15  # a worker killed before it could checkpoint
    assert exit_code({0: -9}) == 128 + 9


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_the_workers_and_exits_75(recipe, tmp_path):  # noqa: F811
    run, release = tmp_path / "run", tmp_path / "release"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "STRATA_TEST_FAULT": "hold@1:2",
           "STRATA_TEST_RELEASE": str(release)}  # every worker waits after step 2 until `release` exists
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(recipe), "--run-dir", str(run),
                             "--nproc-per-node", "2"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pointer = run / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while not (pointer.is_file() and "s01-step000002" in pointer.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # step 2 and its checkpoint are done; the workers hold
    proc.send_signal(signal.SIGTERM)  # what SLURM sends the launcher before a pre-emption
    time.sleep(1.0)
    release.touch()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert out.count("stopped by SIGTERM after step") == 1  # rank 0's line, once
    tag = json.loads(pointer.read_text())["tag"]
    assert tag > "s01-step000002" and f"{tag} written" in out  # the pre-emption's own checkpoint, resumable


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_same_weights_and_losses(recipe, reference, tmp_path):  # noqa: F811
    """Kill the whole process group after seeded random delays, three times in one run: before,
    during or between steps, checkpoint writes and stages -- wherever each lands, the run resumed
    after the last matches the reference. (One run folder killed three times costs about one run
    and three start-ups; three runs killed once each cost three of each and a timing run apiece.)"""
    import torch

    run_dir = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()  # a fresh interpreter, as the killed runs below (not the suite's fork server)
    subprocess.run([sys.executable, "-m", "pipeline", "train", str(recipe), "--run-dir", str(tmp_path / "timing")],
                   env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=600)
    duration = time.perf_counter() - start
    for seed in (0, 1, 2):
        delay = random.Random(seed).uniform(0.3, 0.95) * duration
        p = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(recipe), "--run-dir", str(run_dir)],
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        time.sleep(delay)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    strata(["train", recipe, "--run-dir", run_dir])
    assert step_metrics(run_dir) == step_metrics(reference)
    final = "checkpoints/s02-end/mp_rank_00_model_states.pt"
    got, want = (torch.load(d / final, weights_only=True)["module"] for d in (run_dir, reference))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_and_mid_step_resumes_exactly(recipe, reference, tmp_path):  # noqa: F811
    """One run killed three times in turn and resumed after each: while its first mid-stage
    checkpoint is half written (the next run starts over), while the stage-end checkpoint is half
    written (the next resumes from step 2), in the middle of a step of stage 2 (the next resumes
    from the stage end). A half-written checkpoint never counts; the finished run is the reference."""
    run_dir = tmp_path / "run"
    for fault in ("kill-in-save@s01-step000002", "kill-in-save@s01-end", "kill@2:1:mid"):
        strata(["train", recipe, "--run-dir", run_dir], fault=fault, expect=-9)
        if fault.startswith("kill-in-save"):
            assert not (run_dir / "checkpoints" / fault.split("@")[1]).exists()
    proc = strata(["train", recipe, "--run-dir", run_dir])
    assert "from s01-end" in proc.stdout
    assert step_metrics(run_dir) == step_metrics(reference)
