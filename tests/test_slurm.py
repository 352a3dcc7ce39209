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
