"""Against a real Slurm cluster (the project's scripts/local_slurm_up.sh; .ci/run starts it and exports SLURM_CONF)."""

import json
import os
import re
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
    assert "moe-launch: done: step 8/8" in log and "job step exited 0" in log, log[-3000:]
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
    assert "error  rank " in out and "tokenizer has 261 tokens" in out and "log    " in out, out  # why, and where


def test_resume_after_cancel_continues_the_run_in_its_directory(tmp_path, trained):
    """scancel -> the ranks checkpoint on SIGTERM -> CANCELLED; `launch resume` submits a new attempt in the same
    run directory, which finishes with bitwise the losses of an uninterrupted run (trained by the local executor)."""
    from conftest import FAST

    reference = trained("uninterrupted-10", 2, "train.max_steps=10", "parallel.ep=2")
    runs = tmp_path / "runs"
    assert launch("smoke", "--cluster", "local-slurm", "--runs-dir", str(runs), *FAST, "train.max_steps=10", "parallel.ep=2").returncode == 0
    run, job = the_run(runs)
    wait_for_steps(run, 2)
    assert f"cancelled job {job}" in launch("cancel", str(run)).stdout
    wait_gone(job)
    assert "CANCELLED" in launch("status", str(run)).stdout
    res = launch("resume", str(run))
    assert res.returncode == 0 and "submitted job" in res.stdout, res.stderr
    new_job = str(yaml.safe_load((run / "submission.yaml").read_text())["job_id"])
    assert new_job != job and (run / "attempts" / "1" / "submission.yaml").exists()
    wait_gone(new_job)
    assert "COMPLETED" in launch("status", str(run)).stdout
    ref = [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] == ref


def wait_for_steps(run: Path, steps: int, timeout: float = 60) -> None:
    """Until the job has logged ``steps`` steps to metrics.jsonl."""
    deadline = time.time() + timeout
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < steps:
        assert time.time() < deadline, f"{run.name}: fewer than {steps} steps after {timeout}s"
        time.sleep(0.2)


def job_node(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True).stdout.strip()


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
            wait_for_steps(run, 3)
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


# ----------------------------------------------------------------------------- timed out, multi-node, pipelines, sweeps
def write_profile(tmp_path: Path, base: str, name: str, **slurm) -> str:
    """A copy of a shipped profile with some slurm fields changed (a path works as --cluster)."""
    prof = yaml.safe_load((ROOT / "clusters" / f"{base}.yaml").read_text())
    prof["name"] = name
    prof["slurm"].update(slurm)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(prof))
    return str(path)


def the_run(runs: Path) -> tuple[Path, str]:
    (run,) = list(runs.iterdir())
    return run, yaml.safe_load((run / "submission.yaml").read_text())["job_id"]


def test_a_job_past_its_time_limit_shows_as_timed_out_and_is_not_requeued(tmp_path):
    prof = write_profile(tmp_path, "local-slurm", "short", time="00:01:00", signal_seconds=0)  # no pre-timeout signal
    runs = tmp_path / "runs"
    assert launch("smoke", "--cluster", prof, "--runs-dir", str(runs), "train.max_steps=100000").returncode == 0
    run, job = the_run(runs)
    wait_gone(job, timeout=240)
    st = launch("status", str(run)).stdout
    assert "TIMEOUT" in st and "restarts 0" in st, st
    assert "requeueing" not in launch("logs", str(run)).stdout


two_nodes = pytest.mark.skipif(
    len(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()) < 2
    if shutil.which("sinfo") and os.environ.get("SLURM_CONF") else True,
    reason="needs a Slurm cluster of 2 nodes (SLURM_LOCAL_NODES=2 scripts/local_slurm_up.sh)")


@two_nodes
def test_two_node_job_trains_across_both_nodes(tmp_path):
    runs = tmp_path / "runs"
    res = launch("smoke", "--cluster", "local-slurm-2n", "--runs-dir", str(runs), "train.max_steps=8")
    assert res.returncode == 0, res.stderr
    run, job = the_run(runs)
    wait_gone(job)
    log = (run / "logs" / f"slurm-{job}.out").read_text()
    assert "2 node(s)" in log and "job step exited 0" in log, log[-3000:]
    # one torchrun per node met at the head's rendezvous: rank 0 on one node, rank 1 on the other
    line = next(ln for ln in log.splitlines() if "moe-launch: training" in ln)
    placed = dict(re.findall(r"(\S+) \(rank (\d)\)", line.split(" on nodes ")[1].split(", layout")[0]))
    assert len(placed) == 2 and sorted(placed.values()) == ["0", "1"], line
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0


@two_nodes
def test_unreachable_head_fails_fast_with_a_readable_error(tmp_path):
    # 192.0.2.1 is TEST-NET-1: never assigned, so the second node can never reach a rendezvous there
    prof = write_profile(tmp_path, "local-slurm-2n", "bad-head", rdzv_host="192.0.2.1", rdzv_timeout=6)
    runs = tmp_path / "runs"
    assert launch("smoke", "--cluster", prof, "--runs-dir", str(runs)).returncode == 0
    run, job = the_run(runs)
    wait_gone(job, timeout=90)
    st = launch("status", str(run)).stdout
    assert "FAILED" in st and "exit 2:0" in st and "restarts 0" in st, st
    log = launch("logs", str(run)).stdout
    assert "cannot reach the head node" in log and "192.0.2.1" in log and "requeueing" not in log, log


def job_times(job: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return fields["StartTime"], fields["EndTime"]


def pipeline_stages(runs: Path) -> dict[str, tuple[Path, dict]]:
    stages = {}
    for run in runs.iterdir():
        stage = yaml.safe_load((run / "meta.yaml").read_text())["pipeline"]["stage"]
        stages[stage] = (run, yaml.safe_load((run / "submission.yaml").read_text()))
    return stages


def test_sft_pipeline_runs_all_six_stages_in_order(tmp_path):
    """recipes/sft_pipeline.py as shipped: a tiny synthetic FP8 checkpoint -> BF16, the repository's raw Q/A
    -> SFT splits, full SFT from the converted weights, eval -> results.csv, export -> HF, the example backtest."""
    runs = tmp_path / "runs"
    res = launch("recipes/sft_pipeline.py", "--cluster", "local-slurm", "--runs-dir", str(runs))
    assert res.returncode == 0, res.stderr
    stages = pipeline_stages(runs)
    order = ["convert", "data", "train", "eval", "export", "backtest"]
    assert sorted(stages) == sorted(order)
    for a, b in zip(order, order[1:]):
        assert stages[b][1]["after_ok"] == stages[a][1]["job_id"]
    wait_gone(str(stages["backtest"][1]["job_id"]), timeout=600)
    times = {s: job_times(str(sub["job_id"])) for s, (_, sub) in stages.items()}
    assert all(times[a][1] <= times[b][0] for a, b in zip(order, order[1:])), times
    status = launch("status", "sft-pipeline", "--runs-dir", str(runs)).stdout
    assert status.count("COMPLETED") == 6 and all(f" {s} " in status for s in order), status
    # each stage handed its output on
    run = {s: r for s, (r, _) in stages.items()}
    assert (run["convert"] / "bf16" / "config.json").is_file()
    n_test = sum(1 for line in (run["data"] / "sft" / "test.jsonl").read_text().splitlines() if line.strip())
    results = (run["eval"] / "results" / "results.csv").read_text(encoding="utf-8")
    assert n_test > 0 and results.count("\n") == n_test + 1
    losses = [json.loads(x)["loss"] for x in (run["train"] / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run["export"] / "hf")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    scored = (run["backtest"] / "scored.csv").read_text(encoding="utf-8")
    assert scored.count("\n") == n_test + 1 and "cumulative_pnl" in scored.splitlines()[0]
    # one report page for the pipeline: every stage, the training report, the evaluation, the exported model
    res = launch("report", "sft-pipeline", "--runs-dir", str(runs))
    assert res.returncode == 0, res.stderr
    page = Path(res.stdout.split()[-1])
    data = json.loads((page.parent / "data.json").read_text())
    assert [s["stage"] for s in data["stages"]] == order and all(s["state"] == "COMPLETED" for s in data["stages"])
    train_row = data["stages"][order.index("train")]
    assert (page.parent / train_row["report"]).resolve() == run["train"] / "report" / "index.html"
    html = page.read_text()
    assert str(run["export"] / "hf") in html and "exact_match" in html and str(run["eval"] / "results" / "results.csv") in html


def test_sft_pipeline_with_broken_raw_data_fails_at_data_and_cancels_the_rest(tmp_path):
    broken = tmp_path / "raw.jsonl"
    broken.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", oops\n')
    runs = tmp_path / "runs"
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "recipes/sft_pipeline.py", "--cluster", "local-slurm",
                          "--runs-dir", str(runs)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAW_DATA": str(broken)})
    assert res.returncode == 0, res.stderr
    stages = pipeline_stages(runs)
    for _, sub in stages.values():
        wait_gone(str(sub["job_id"]), timeout=180)  # nothing left pending (DependencyNeverSatisfied would pend forever)
    status = launch("status", "sft-pipeline", "--runs-dir", str(runs)).stdout
    lines = {s: next(ln for ln in status.splitlines() if f" {s} " in ln) for s in stages}
    assert "COMPLETED" in lines["convert"] and "FAILED" in lines["data"], status
    assert all("CANCELLED" in lines[s] for s in ("train", "eval", "export", "backtest")), status
    assert "line 2: invalid JSON" in launch("logs", str(stages["data"][0])).stdout


def test_sweep_is_one_job_array_and_cancel_of_the_array_cancels_all(tmp_path):
    runs = tmp_path / "runs"
    res = launch("smoke", "--cluster", "local-slurm", "--runs-dir", str(runs), "train.max_steps=4",
                 "--sweep", "train.lr=1e-3,2e-3,3e-3")
    assert res.returncode == 0 and "submitted job array" in res.stdout, res.stderr
    made = sorted(p for p in runs.iterdir() if (p / "meta.yaml").exists())
    subs = [yaml.safe_load((run / "submission.yaml").read_text()) for run in made]
    (array,) = {str(s["array_job_id"]) for s in subs}
    assert [s["job_id"] for s in subs] == [f"{array}_{i}" for i in (1, 2, 3)]
    wait_gone(array, timeout=240)
    status = launch("status", array, "--runs-dir", str(runs)).stdout
    assert status.count("COMPLETED") == 3, status
    assert launch("list", "--runs-dir", str(runs), "--state", "completed").stdout.count(f"{array}_") == 3
    lrs = []
    for run in made:
        assert "COMPLETED" in launch("status", str(run)).stdout
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
        assert (run / "logs" / f"slurm-{yaml.safe_load((run / 'submission.yaml').read_text())['job_id']}.out").exists()
        lrs.append(yaml.safe_load((run / "recipe.yaml").read_text())["train"]["lr"])
    assert sorted(lrs) == [1e-3, 2e-3, 3e-3]
    # a long one: cancelling the array cancels every task
    more = tmp_path / "more"
    assert launch("smoke", "--cluster", "local-slurm", "--runs-dir", str(more), "train.max_steps=500",
                  "--sweep", "train.lr=1e-3,2e-3").returncode == 0
    (array2,) = {str(yaml.safe_load((p / "submission.yaml").read_text())["array_job_id"]) for p in more.iterdir() if (p / "meta.yaml").exists()}
    wait_state(more, ("RUNNING",), timeout=60)
    assert f"cancelled job array {array2}" in launch("cancel", array2, "--runs-dir", str(more)).stdout
    wait_gone(array2, timeout=120)
    assert launch("status", array2, "--runs-dir", str(more)).stdout.count("CANCELLED") == 2


def test_preempted_job_checkpoints_is_requeued_and_resumes(tmp_path):
    """A job in 'urgent' preempts ours (partition priority, PreemptMode=REQUEUE in scripts/local_slurm_up.sh):
    SIGTERM -> the ranks checkpoint at the end of the step -> requeued -> resumes there and finishes."""
    runs = tmp_path / "runs"
    assert launch("smoke", "--cluster", "local-slurm", "--runs-dir", str(runs), "train.max_steps=40",
                  "checkpoint.interval=1000").returncode == 0
    run, job = the_run(runs)
    wait_for_steps(run, 3)
    node = job_node(job)
    cpus = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%c"], capture_output=True, text=True).stdout.split()[0]
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-w", node, "-c", cpus, "--mem=500M",
                             f"--output={tmp_path}/urgent.out", "--wrap", "sleep 2"], capture_output=True, text=True, check=True)
    wait_gone(job, timeout=240)
    wait_gone(urgent.stdout.strip(), timeout=60)
    st = launch("status", str(run)).stdout
    log = (run / "logs" / f"slurm-{job}.out").read_text()
    assert "COMPLETED" in st and "restarts 0" not in st, st
    assert "after SIGTERM" in log and "resumed from" in log, log[-3000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 40  # each step once


def test_node_failure_requeues_and_resumes_from_the_last_checkpoint(tmp_path):
    """The node dies mid-run (every process of the job frozen, then killed; no SIGTERM, no checkpoint), and
    Slurm marks it down: NODE_FAIL -> Slurm requeues the job -> it resumes from the last periodic checkpoint,
    trains the lost steps again with the same losses, and metrics.jsonl has each step once."""
    runs = tmp_path / "runs"
    assert launch("smoke", "--cluster", "local-slurm", "--runs-dir", str(runs), "train.max_steps=30",
                  "checkpoint.interval=5").returncode == 0
    run, job = the_run(runs)
    wait_for_steps(run, 12)
    node = job_node(job)

    def tree(pids):
        out = []
        for p in pids:
            children = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
            out += [p] + tree(children)
        return out

    stepds = subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], capture_output=True, text=True).stdout.split()
    pids = tree(stepds)
    assert pids
    try:
        subprocess.run(["kill", "-STOP", *map(str, pids)])
        subprocess.run(["kill", "-KILL", *map(str, pids)])
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=moe-launch-test-node-failure"], check=True)
        wait_gone(job, timeout=240)
    finally:  # the node comes back by itself (ReturnToService=2); make sure before the next test
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True).stdout:
            assert time.time() < deadline, f"node {node} did not come back"
            time.sleep(1)
    st = launch("status", str(run)).stdout
    log = (run / "logs" / f"slurm-{job}.out").read_text()
    assert "COMPLETED" in st and "restarts 1" in st, st
    saved = [int(m) for m in re.findall(r"checkpoint \S+/step-(\d+)\n", log)]
    assert f"resumed from {run / 'checkpoints'}" in log and "moved to metrics.rewound.jsonl" in log, log[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    rewound = [json.loads(line) for line in (run / "metrics.rewound.jsonl").read_text().splitlines()]
    assert rewound and rewound[0]["step"] % 5 == 1 and min(saved) == 5
    assert all(r["loss"] == records[r["step"] - 1]["loss"] for r in rewound)  # the same steps again, the same losses


@two_nodes
def test_bench_comm_measures_the_cluster_and_the_next_plan_uses_it(tmp_path):
    """`launch bench comm` on the 2-node cluster: a job that measures the collectives across the nodes writes the
    profile's measured overlay (in the user's config dir, the profile untouched), and `launch plan` on that profile
    times its communication with the measured figures from then on."""
    before = launch("plan", "recipes/smoke.py", "--cluster", "local-slurm-2n").stdout
    assert "the profile's figures" in before
    runs = tmp_path / "runs"
    res = launch("bench", "comm", "--cluster", "local-slurm-2n", "--runs-dir", str(runs))
    assert res.returncode == 0, res.stderr
    run, job = the_run(runs)
    wait_gone(job)
    log = (run / "logs" / f"slurm-{job}.out").read_text()
    assert "inter node: all_reduce" in log and "job step exited 0" in log, log[-3000:]
    overlay = Path(os.environ["XDG_CONFIG_HOME"]) / "moe-launch" / "measured" / "local-slurm-2n.yaml"
    net = yaml.safe_load(overlay.read_text())["interconnect"]
    measured = json.loads((run / "comm_bench.json").read_text())
    assert net["inter_node_gbps"] > 0 and set(measured["nodes"].values()) == {1} and len(measured["nodes"]) == 2
    after = launch("plan", "recipes/smoke.py", "--cluster", "local-slurm-2n").stdout
    assert "measured: " in after and f"{net['inter_node_gbps']:.3g} GB/s across" in after, after
    step = lambda out: next(ln for ln in out.splitlines() if ln.startswith("step     ~"))  # noqa: E731
    assert step(after) != step(before)  # the smoke layout's all-to-all crosses the two nodes: its time changed
    assert "measured" not in (ROOT / "clusters" / "local-slurm-2n.yaml").read_text()
