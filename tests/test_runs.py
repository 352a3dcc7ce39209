"""Living with runs on the local executor: start a run from another's checkpoint, resume a cancelled run in
its own directory, honest status of a crashed run, list filters, validation during training, the Python
API, and the help texts. (The Slurm side of these is in tests/test_slurm.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST, ROOT, launch_cmd, train, wait_for_run_steps


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def launch(env, *args, expect=0, timeout=300):
    res = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env[0], capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def first_step_loss(ckpt_run: Path, new_run: Path) -> float:
    """The loss of ``ckpt_run``'s final model on ``new_run``'s first step (one process, whole batch)."""
    from generation.loading import load_model
    from launcher.resume import choose_checkpoint
    from launcher.rundir import load_run_recipe
    from trainer.data import build_train_loader
    from trainer.tokenizer import load_tokenizer

    source = load_run_recipe(ckpt_run)
    model, _ = load_model(source.model, checkpoint=choose_checkpoint(ckpt_run, source, None)[1], peft=source.peft)
    recipe = load_run_recipe(new_run)
    loader = build_train_loader(recipe.data, recipe.train, load_tokenizer("byte"), 0, 1)
    total = count = 0.0
    with torch.no_grad():
        for b in loader.step_batches():
            out = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"], segment_ids=b["segment_ids"], reduction="sum")
            total += float(out.lm_loss)
            count += float((b["labels"] != -100).sum())
    return total / count


def test_a_run_starts_from_another_runs_checkpoint(cpu_env, trained):
    full = trained("dp2", 2, "parallel.ep=1")
    # LoRA on top of a full fine-tune's DCP checkpoint (the reported crash), on another layout, by RUN:STEP
    lora, res = train(cpu_env, cpu_env[1] / "from-full", 2, "parallel.ep=2", "peft.method=lora", "peft.rank=4", "train.lr=5e-3",
                      f"checkpoint.load={full}:4")
    assert f"started from {full}/checkpoints/step-00000004 (weights)" in res.stdout, res.stdout
    assert yaml.safe_load((lora / "recipe.yaml").read_text())["checkpoint"]["load_format"] == "dcp"
    assert losses(lora)[0] == pytest.approx(first_step_loss(full, lora), abs=2e-5)
    # a full fine-tune (TP2) from the LoRA run: its adapters are folded into the weights
    folded, res = train(cpu_env, cpu_env[1] / "from-lora", 2, "parallel.tp=2", "parallel.ep=1", f"checkpoint.load={lora}")
    assert "LoRA adapter(s) folded into the weights" in res.stdout, res.stdout
    assert losses(folded)[0] == pytest.approx(first_step_loss(lora, folded), abs=2e-5)
    # what cannot work is refused before anything is written
    for bad, words in ((f"checkpoint.load={full}:7", "has no checkpoint at step 7; it has steps 4"),
                       ("model.moe_intermediate_size=32", "trained another model (moe_intermediate_size 64 vs 32")):
        extra = [bad, f"checkpoint.load={full}"] if bad.startswith("model") else [bad]
        res = subprocess.run(launch_cmd(cpu_env[1] / "refused", 1, *extra), cwd=ROOT, env=cpu_env[0], capture_output=True, text=True)
        assert res.returncode == 2 and "checkpoint.load: " in res.stderr and words in res.stderr, res.stderr
        assert not (cpu_env[1] / "refused").exists()


def test_resume_after_cancel_continues_in_the_same_directory_bitwise(cpu_env, trained):
    long = ["train.max_steps=10", "parallel.ep=2"]
    reference = trained("uninterrupted-10", 2, *long)
    runs = cpu_env[1] / "cancelled"
    proc = subprocess.Popen(launch_cmd(runs, 2, *long), cwd=ROOT, env=cpu_env[0], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = wait_for_run_steps(runs, 2, proc)
    assert "asked local run" in launch(cpu_env, "cancel", str(run)).stdout
    proc.communicate(timeout=120)
    status = launch(cpu_env, "status", str(run)).stdout
    assert "CANCELLED" in status and "exit 75" in status, status
    stopped = len(losses(run))
    assert 2 <= stopped < 10
    res = launch(cpu_env, "resume", str(run))
    assert f"resumed from {run}/checkpoints/step-{stopped:08d}" in res.stdout
    assert losses(run) == losses(reference)  # one metrics file, every step once, bitwise the uninterrupted run
    assert {"job.sh", "local.yaml", "recipe.yaml", "EXIT_CODE"} <= {p.name for p in (run / "attempts" / "1").iterdir()}
    history = yaml.safe_load((run / "attempts.yaml").read_text())
    assert history[0]["attempt"] == 2 and history[0]["resumed_from"].endswith(f"step-{stopped:08d}")
    assert "COMPLETED" in launch(cpu_env, "status", str(run)).stdout
    assert json.loads((run / "summary.json").read_text())["step"] == 10
    # a resume may take what the checkpoint can (more steps) and refuses what it cannot (another TP)
    launch(cpu_env, "resume", str(run), "parallel.tp=2", "parallel.ep=1", expect=2)
    res = launch(cpu_env, "resume", str(run), "train.max_steps=12", "--dry-run")
    assert "resume   from" in res.stderr and not (run / "attempts" / "2").exists()


def test_status_of_a_crashed_local_run_says_why(cpu_env, tmp_path):
    from model.hf_config import config_to_hf
    from model.presets import tiny

    weights = tmp_path / "hf"  # starting weights that exist (pre-flight passes) and break the job when read
    weights.mkdir()
    (weights / "config.json").write_text(json.dumps(config_to_hf(tiny())))
    (weights / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    run, res = train(cpu_env, tmp_path / "runs", 2, f"checkpoint.load={weights}", "checkpoint.load_format=hf", expect=1)
    assert res.stdout.count("Traceback") == 0 and "moe-launch: exit 1: rank " in res.stdout + res.stderr
    status = launch(cpu_env, "status", str(run)).stdout
    assert "FAILED exit 1" in status and "error  rank " in status, status
    log = Path(status.split("log    ")[1].strip())
    assert "Traceback" in log.read_text()  # the whole trace is in the rank's own log
    assert "FAILED exit 1" in launch(cpu_env, "list", "--runs-dir", str(tmp_path / "runs")).stdout


def test_bad_record_past_the_preflight_sample_is_one_line_in_the_job(cpu_env, tmp_path):
    """Pre-flight reads the first records of each split; a bad one further down stops the job with exit 2
    and one line naming file and line, no traceback anywhere."""
    data = tmp_path / "data"
    data.mkdir()
    good = '{"input": "q", "output": "a"}\n'
    (data / "training.jsonl").write_text(good * 150 + '{"input": "q", "output": 3}\n')
    (data / "validation.jsonl").write_text(good * 4)
    run, res = train(cpu_env, tmp_path / "runs", 2, f"data.path={data}", expect=2)
    out = res.stdout + res.stderr
    assert "Traceback" not in out and "training.jsonl: line 151: fields 'input' and 'output' must be strings" in out, out
    status = launch(cpu_env, "status", str(run)).stdout
    assert "FAILED exit 2" in status and "line 151" in status, status
    assert not any("Traceback" in f.read_text() for f in run.glob("logs/ranks/**/stderr.log"))


def test_list_finds_every_profiles_runs_and_filters_them(cpu_env, tmp_path):
    profiles = Path(cpu_env[0]["MOE_LAUNCH_CLUSTERS"])
    shared = tmp_path / "shared-runs"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "team.yaml").write_text((profiles / "cpu1.yaml").read_text().replace("name: cpu1", "name: team")
                                                     + f"runs_dir: {shared}\n")
    env = ({**cpu_env[0], "MOE_LAUNCH_CLUSTERS": f"{tmp_path / 'profiles'}:{profiles}"}, cpu_env[1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def cli(*args, expect=0):
        res = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=elsewhere, env=env[0], capture_output=True, text=True)
        assert res.returncode == expect, res.stderr
        return res.stdout

    cli("smoke", "--cluster", "team", *FAST, "train.max_steps=1", "parallel.ep=1")
    cli("smoke", "--cluster", "team", "--dry-run", "parallel.ep=1")
    listing = cli("list")  # no --runs-dir: ./runs and every profile's runs_dir
    assert listing.count("smoke-team") == 1 and "COMPLETED" in listing and "dry run" not in listing
    assert cli("list", "--all").count("dry run") == 1
    assert "smoke-team" in cli("list", "--state", "completed", "--recipe", "smo*", "--since", "1h", "--cluster", "team")
    assert "no runs" in cli("list", "--state", "failed") and "no runs" in cli("list", "--recipe", "dsv3-*")
    assert "COMPLETED" in cli("status")  # the newest real run, found through the profile
    assert "--since" in subprocess.run([sys.executable, "-m", "launcher.cli", "list", "--since", "yesterday"], cwd=elsewhere,
                                       env=env[0], capture_output=True, text=True).stderr


def test_validation_during_training_at_the_interval(trained):
    run = trained("eval-interval", 2, "parallel.ep=2", "train.eval_interval=2", "train.max_steps=5")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 5]  # the interval, and the last step
    assert all(0 < r["val_loss"] < 10 for r in records if "val_loss" in r)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] == records[-1]["val_loss"] and summary["state"] == "done" and summary["tokens_this_attempt"] == 5 * 8 * 64
    # under context parallelism each rank validates its part of every sequence: the same losses
    cp_run = trained("eval-interval-cp2", 2, "parallel.ep=1", "parallel.cp=2", "train.eval_interval=2", "train.max_steps=5")
    cp_records = [json.loads(line) for line in (cp_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in cp_records if "val_loss" in r] == pytest.approx([r["val_loss"] for r in records if "val_loss" in r], abs=2e-5)


def test_python_api_drives_a_smoke_run(cpu_env, monkeypatch, tmp_path):
    from launcher import api

    monkeypatch.setenv("MOE_LAUNCH_CLUSTERS", cpu_env[0]["MOE_LAUNCH_CLUSTERS"])
    monkeypatch.setenv("MOE_LAUNCH_DATA_CACHE", cpu_env[0]["MOE_LAUNCH_DATA_CACHE"])
    monkeypatch.chdir(tmp_path)
    run = api.launch("smoke", "cpu2", [*FAST, "parallel.ep=2"], runs_dir=str(tmp_path / "api"))
    assert run.status().state in ("PENDING", "RUNNING", "COMPLETED")
    assert run.wait(timeout=180) == "COMPLETED"
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["loss"] < metrics[0]["loss"]
    assert run.summary()["step"] == 4 and "torchrun exited 0" in run.logs()
    assert api.run(run.name, runs_dir=str(tmp_path / "api")).path == run.path
    with pytest.raises(api.LaunchRefused) as refused:
        api.launch("smoke", "cpu2", ["parallel.ep=3"], runs_dir=str(tmp_path / "api"))
    assert any("parallel.ep" in p for p in refused.value.problems)


def test_help_describes_every_command():
    def helptext(*args):
        return subprocess.run([sys.executable, "-m", "launcher.cli", *args, "--help"], cwd=ROOT, capture_output=True, text=True).stdout

    top = helptext()
    for command in ("plan", "resume", "export", "generate", "eval", "list", "status", "logs", "cancel", "clusters", "recipes"):
        assert f"launch {command}" in top or f"| {command}" in top, command
        if command not in ("clusters", "recipes"):
            text = helptext(command)
            assert "example" in text.lower() and len(text.splitlines()) > 5, (command, text)


@pytest.fixture(autouse=True)
def _no_stray_local_jobs():
    yield
    # the API starts local jobs in the background: none may outlive its test
    leftover = subprocess.run(["pgrep", "-f", "local_exec.run\\("], capture_output=True, text=True).stdout.split()
    assert not [p for p in leftover if int(p) != os.getpid()], leftover
