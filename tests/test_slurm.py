"""Against a real Slurm cluster (the project's scripts/local_slurm_up.sh; .ci/run starts it and exports SLURM_CONF)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.skipif(not (shutil.which("sbatch") and os.environ.get("SLURM_CONF")),
                                reason="no local Slurm cluster (run scripts/local_slurm_up.sh and export SLURM_CONF)")


def wait_gone(job_id: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if not out:
            return
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still queued/running after {timeout}s")


def test_smoke_recipe_trains_on_real_slurm(tmp_path):
    runs = tmp_path / "runs"
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "smoke", "--cluster", "local-slurm", "--runs-dir", str(runs),
                          "train.max_steps=8", "train.log_interval=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    (run,) = list(runs.iterdir())
    job_id = yaml.safe_load((run / "submission.yaml").read_text())["job_id"]
    assert f"submitted job {job_id}" in res.stdout
    wait_gone(job_id)
    log = (run / "logs" / f"slurm-{job_id}.out").read_text()
    assert "moe-launch: done: 8 steps" in log and "job step exited 0" in log, log[-3000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0
    assert (run / "checkpoints" / "step-00000008" / "trainer.json").exists()


def launch(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def wait_state(runs: Path, states: tuple[str, ...], timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = launch("status", "--runs-dir", str(runs)).stdout
        if any(f" {s}" in out for s in states):
            return out
        time.sleep(0.5)
    raise AssertionError(f"never reached {states}: {out}")


def test_status_logs_list_cancel_on_running_and_failed_jobs(tmp_path):
    runs = tmp_path / "runs"
    assert launch("smoke", "--cluster", "local-slurm", "--runs-dir", str(runs), "train.max_steps=500").returncode == 0
    out = wait_state(runs, ("RUNNING",))
    job = out.split("job ")[1].split()[0]
    listing = launch("list", "--runs-dir", str(runs)).stdout
    assert "smoke-local-slurm" in listing and "RUNNING" in listing and job in listing
    deadline = time.time() + 60
    while "step " not in launch("logs", "--runs-dir", str(runs)).stdout:
        assert time.time() < deadline
        time.sleep(0.5)
    res = launch("cancel", job, "--runs-dir", str(runs))  # by job id
    assert res.returncode == 0 and f"cancelled job {job}" in res.stdout
    assert "CANCELLED" in wait_state(runs, ("CANCELLED",))

    # a job that fails for a deterministic reason exits with it and is not requeued
    failed = tmp_path / "failed"
    assert launch("smoke", "--cluster", "local-slurm", "--runs-dir", str(failed), "model.vocab_size=100").returncode == 0
    out = wait_state(failed, ("FAILED",), timeout=90)
    assert "exit 2:0" in out and "restarts 0" in out
    log = launch("logs", "--runs-dir", str(failed)).stdout
    assert "tokenizer has 261 tokens, model.vocab_size is 100" in log and "requeueing" not in log


def test_signal_before_time_limit_checkpoints_requeues_once_and_resumes_exactly(tmp_path):
    """Slurm's pre-timeout signal (B:USR2) -> ranks checkpoint, exit 75 -> requeue -> resume -> same weights."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    args = ["smoke", "--cluster", "local-slurm", "train.max_steps=16", "train.log_interval=1", "checkpoint.interval=1000"]
    weights = {}
    for name in ("straight", "signalled"):
        runs = tmp_path / name
        assert launch(*args, "--runs-dir", str(runs)).returncode == 0
        (run,) = list(runs.iterdir())
        job = yaml.safe_load((run / "submission.yaml").read_text())["job_id"]
        if name == "signalled":
            deadline = time.time() + 60
            while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
                assert time.time() < deadline
                time.sleep(0.2)
            subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True)  # what --signal=B:USR2@T sends
        wait_gone(job, timeout=240)
        st = launch("status", str(run)).stdout
        assert "COMPLETED" in st, st
        log = (run / "logs" / f"slurm-{job}.out").read_text()
        if name == "signalled":
            assert "restarts 1" in st and "requeueing (restart 1 of 1)" in log and "resumed from" in log
            assert len((run / "metrics.jsonl").read_text().splitlines()) == 16  # steps before + after, none twice
        out = tmp_path / f"{name}.pt"
        dcp_to_torch_save(run / "checkpoints" / "step-00000016", out)
        weights[name] = torch.load(out, weights_only=False)["model"]
    a, b = weights["straight"], weights["signalled"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
