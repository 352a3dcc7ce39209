"""`launch report` (report/), the expert-load records the trainer writes, and the W&B / MLflow trackers (trackers/):
on real smoke runs (gloo), with the real wandb (offline) and mlflow (file store) packages, and the page opened in
Debian's headless Chromium."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, run_launch, train

pytest.importorskip("matplotlib")
TRACKED = ["train.max_steps=6", "train.expert_load_interval=2", "train.eval_interval=3", "tracking.wandb=true",
           "tracking.mlflow=true"]
FIGURES = ("loss", "grad_norm", "throughput", "memory", "expert_load", "expert_final")


@pytest.fixture(scope="module")
def tracked(cpu_env):
    """A 2-rank smoke run (EP2) with both trackers on, expert load every 2 steps, validation every 3, and its report."""
    run, res = train(cpu_env, cpu_env[1] / "report-tracked", 2, "parallel.ep=2", *TRACKED)
    assert "moe-launch: report: " in res.stdout
    return run


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_report_has_every_figure_and_its_numbers_are_the_runs(tracked, cpu_env):
    res = run_launch("report", str(tracked), env=cpu_env[0])
    assert res.returncode == 0, res.stderr
    page = tracked / "report" / "index.html"
    assert res.stdout.strip() == f"report   {page}"
    data = json.loads((page.parent / "data.json").read_text())
    assert set(data["figures"]) == set(FIGURES)
    for name in FIGURES:
        png = page.parent / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f'id="fig-{name}"' in page.read_text()
    recs = metrics(tracked)
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert data["scalars"][key] == {"step": [r["step"] for r in recs], key: [r[key] for r in recs]}
    assert data["val_loss"]["step"] == [3, 6] and data["val_loss"]["val_loss"] == [r["val_loss"] for r in recs if "val_loss" in r]
    mem = json.loads((tracked / "memory.json").read_text())
    plan = yaml.safe_load((tracked / "plan.yaml").read_text())
    assert data["memory"]["measured_gib"] == mem["peak_gib"] and len(mem["peak_gib"]) == 2
    assert data["memory"]["plan_gib"] == [plan["memory"]["total_per_pp_rank_gib"][0]] * 2
    assert data["layout"]["ep"] == 2 and data["state"] == "done"
    # the heat map: every MoE layer, a record per 2 steps, totals = tokens x top-k x steps covered
    recipe = yaml.safe_load((tracked / "recipe.yaml").read_text())
    m, t = recipe["model"], recipe["train"]
    el = data["expert_load"]
    assert el["layers"] == list(range(m["first_k_dense_replace"], m["num_hidden_layers"])) + \
        [m["num_hidden_layers"] + k for k in range(m["num_nextn_predict_layers"])]
    assert el["steps"] == [2, 4, 6] and el["steps_covered"] == [2, 2, 2]
    tokens = t["global_batch_size"] * recipe["data"]["seq_length"]
    assert np.array(el["load"]).sum(axis=2).tolist() == [[tokens * m["num_experts_per_tok"] * 2] * len(el["layers"])] * 3
    assert np.abs(np.array(el["bias"])).max() > 0  # the bias update moved


def _wandb_history(run: Path) -> tuple[list[dict], dict]:
    """The scalars and config of W&B's offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, payload, rows, config = 32768, 7, b"", [], {}
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        payload += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(payload)
            payload = b""
            which = rec.WhichOneof("record_type")
            if which == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif which in ("config", "run"):  # the config comes with the run record, later updates on their own
                items = rec.config.update if which == "config" else rec.run.config.update
                config.update({i.key: json.loads(i.value_json) for i in items})
        elif kind == 0 and length == 0:
            break
    return rows, config


def test_wandb_offline_logs_the_same_scalars_and_the_recipe(tracked):
    pytest.importorskip("wandb")
    rows, config = _wandb_history(tracked)
    recs = metrics(tracked)
    assert [r["_step"] for r in rows] == [r["step"] for r in recs]
    for row, rec in zip(rows, recs):
        for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "expert_imbalance"):
            assert row[key] == pytest.approx(rec[key], rel=1e-9), key
        assert ("val_loss" in row) == ("val_loss" in rec)
    assert config["train"]["max_steps"] == 6 and config["tracking"]["wandb"] is True and config["name"] == "smoke"


def test_mlflow_file_store_logs_the_same_scalars_recipe_and_figures(tracked):
    pytest.importorskip("mlflow")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tracked / "mlruns").as_uri())
    run_id = (tracked / ".mlflow_run_id").read_text().strip()
    recs = metrics(tracked)
    for key in ("loss", "grad_norm", "tokens_per_s", "val_loss"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert hist == [(r["step"], pytest.approx(r[key])) for r in recs if key in r], key
    assert client.get_run(run_id).data.params["train.max_steps"] == "6"
    figures = {os.path.basename(f.path) for f in client.list_artifacts(run_id, "report")}
    assert {f"{n}.png" for n in FIGURES} <= figures
    assert json.loads(Path(client.download_artifacts(run_id, "recipe.json", str(tracked / "dl"))).read_text())["name"] == "smoke"
    shutil.rmtree(tracked / "dl")


def test_report_of_a_run_in_progress(tracked, tmp_path, cpu_env):
    """Mid-run files: a half-written metrics line, a half-written expert-load record, no summary yet."""
    run = tmp_path / tracked.name
    shutil.copytree(tracked, run, ignore=shutil.ignore_patterns("report", "wandb", "mlruns", "checkpoints"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    (run / "summary.json").unlink()
    records = run / "expert_load" / "stage0.bin"
    size = records.stat().st_size
    records.write_bytes(records.read_bytes()[: size // 3 + 10])  # one whole record and a piece of the next
    res = run_launch("report", str(run), env=cpu_env[0])
    assert res.returncode == 0, res.stderr
    data = json.loads((run / "report" / "data.json").read_text())
    assert data["state"] == "running" and data["scalars"]["loss"]["step"] == [1, 2, 3]
    assert data["expert_load"]["steps"] == [2]
    status = run_launch("status", str(run), env=cpu_env[0]).stdout
    assert f"step 3/6, loss {lines[2] and json.loads(lines[2])['loss']:.4f}" in status and "tokens/s" in status


def test_sweep_overlays_one_curve_per_run_and_a_failing_tracker_is_a_warning(tracked, cpu_env):
    other, res = train(cpu_env, cpu_env[1] / "report-sweep", 2, "parallel.ep=2", "train.max_steps=6", "train.lr=3e-3",
                       "tracking.mlflow=true", "tracking.mlflow_tracking_uri=nosuchscheme://nowhere")
    assert "moe-launch: warning: tracker mlflow did not start" in res.stderr + res.stdout  # and the run completed (exit 0)
    out = cpu_env[1] / "sweep-report"
    res = run_launch("report", str(tracked), str(other), "--out", str(out), env=cpu_env[0])
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "data.json").read_text())
    a, b = (d["label"] for d in data["runs"])
    assert data["curves"]["loss"] == [f"{a}: train", f"{a}: validation", f"{b}: train"]  # one curve per run (and its eval)
    assert data["runs"][1]["label"].startswith("train.lr=3e-3 ")  # what tells the runs apart
    assert [d["scalars"]["loss"]["loss"] for d in data["runs"]] == [[r["loss"] for r in metrics(r)] for r in (tracked, other)]
    assert (other / "report" / "index.html").exists()  # each run's own report, linked


def test_report_page_loads_in_headless_chromium(tracked, cpu_env, tmp_path):
    """The page in Debian's Chromium: no console errors, every figure decoded; a screenshot kept as a test
    artifact ($MOE_LAUNCH_TEST_ARTIFACTS, else pytest's temporary directory)."""
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    assert run_launch("report", str(tracked), env=cpu_env[0]).returncode == 0
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        driver.get((tracked / "report" / "index.html").as_uri())
        sizes = driver.execute_script("return [...document.images].map(i => [i.id, i.complete, i.naturalWidth])")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        shot = Path(os.environ.get("MOE_LAUNCH_TEST_ARTIFACTS", tmp_path)) / "report-page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert not errors, errors
    assert sorted(i for i, _, _ in sizes) == sorted(f"fig-{n}" for n in FIGURES)
    assert all(done and width > 100 for _, done, width in sizes), sizes
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_expert_load_benchmark_prints_its_ratio():
    res = subprocess.run([sys.executable, "benchmarks/expert_load_overhead.py", "--steps", "6"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "recording expert load costs" in res.stdout and "% of step time" in res.stdout


def test_expert_load_of_a_pipeline_merges_its_stages_and_a_resume_rewrites_what_runs_again(cpu_env):
    """PP2: each pipeline rank records its own layers, the report has them all. Resumed from step 2 (the later
    checkpoints gone), the records of steps 3-6 are replaced, not doubled, and the steps train as they did
    (a PP resume once lost the optimizer's hyperparameters: trainer/checkpoint.py)."""
    run, _ = train(cpu_env, cpu_env[1] / "report-pp2", 2, "parallel.pp=2", "parallel.ep=1", "train.expert_load_interval=2",
                   "checkpoint.interval=2", "checkpoint.keep=5", "train.max_steps=6")
    assert sorted(p.name for p in (run / "expert_load").glob("stage*.bin")) == ["stage0.bin", "stage1.bin"]
    for step in (4, 6):
        shutil.rmtree(run / "checkpoints" / f"step-0000000{step}")
    res = run_launch("resume", str(run), env=cpu_env[0], timeout=300)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    first = [json.loads(x) for x in (run / "metrics.rewound.jsonl").read_text().splitlines()]
    again = metrics(run)[2:]
    assert [r["step"] for r in again] == [r["step"] for r in first] == [3, 4, 5, 6]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(first, again)) <= 1e-5
    from report.expert_load import read_expert_load

    el = read_expert_load(run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    m, t = recipe["model"], recipe["train"]
    assert el.layers == list(range(m["first_k_dense_replace"], m["num_hidden_layers"])) + \
        [m["num_hidden_layers"] + k for k in range(m["num_nextn_predict_layers"])]
    assert el.steps.tolist() == [2, 4, 6] and el.covered.tolist() == [2, 2, 2]
    tokens = t["global_batch_size"] * recipe["data"]["seq_length"] * m["num_experts_per_tok"]
    assert (el.load.sum(axis=2) == 2 * tokens).all()
