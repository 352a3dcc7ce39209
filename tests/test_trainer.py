"""The native trainer for real: torchrun + gloo on CPU through `launch --cluster`, compared across layouts.

Tolerances: parallel runs sum gradients in another order than one process, so losses agree to float32
rounding (<= 2e-5 after a few AdamW steps) and weights to 1e-4 (a tenth of one step at lr 1e-3: Adam
divides each element's update by its own gradient scale, so rounding noise in a tiny gradient can move
that element's update by a fraction of lr). A resume on the same layout is bitwise identical.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, launch_cmd, train, wait_for_run_steps

pytest.importorskip("torch.distributed")


@pytest.fixture(scope="module")
def env(cpu_env):
    return cpu_env


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(ckpt_dir: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step = sorted(p for p in ckpt_dir.glob("step-*") if not p.name.endswith(".partial"))[-1]
    out = ckpt_dir.parent / f"{ckpt_dir.name}-{step.name}.pt"
    dcp_to_torch_save(step, out)
    return torch.load(out, weights_only=False)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(env):
    runs = env[1] / "ref"
    run, _ = train(env, runs, 1, "parallel.ep=1")
    imbalance = [json.loads(line)["expert_imbalance"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return losses(run), final_weights(run / "checkpoints"), imbalance


@pytest.mark.parametrize("name, procs, overrides", [
    ("dp2", 2, ["parallel.ep=1"]),
    ("ep2", 2, ["parallel.ep=2"]),
    ("ep2-recompute", 2, ["parallel.ep=2", "parallel.recompute=full"]),
    ("dp1-selective", 1, ["parallel.ep=1", "parallel.recompute=selective"]),
    ("tp2", 2, ["parallel.tp=2", "parallel.ep=1"]),  # experts split by TP too (ETP=TP)
    ("tp2-etp1", 2, ["parallel.tp=2", "parallel.ep=1", "parallel.etp=1"]),  # experts replicated over TP
    ("dp2-tp2", 4, ["parallel.tp=2", "parallel.ep=1"]),
    ("ep2-tp2", 4, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
    # MTP on the last pipeline stage, with its copy of the embedding kept in sync with the first stage's
    ("pp2-mtp", 2, ["parallel.pp=2", "parallel.ep=1"]),
    ("pp2-vpp2-mtp", 2, ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=1", "parallel.pp_schedule=interleaved_1f1b"]),
    ("pp2-ep2-mtp", 4, ["parallel.pp=2", "parallel.ep=2"]),
    ("tp2-sp-mtp", 2, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=1"]),
    ("pp2-tp2-sp-mtp", 4, ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true", "parallel.ep=1"]),
    # context parallel (MTP on): packed documents of the smoke data cross the 16-token chunks of CP2 at seq 64
    ("cp2-mtp", 2, ["parallel.cp=2", "parallel.ep=1"]),
    ("cp2-dp2", 4, ["parallel.cp=2", "parallel.ep=1"]),
    ("cp2-ep2", 4, ["parallel.cp=2", "parallel.ep=2"]),
    ("cp2-tp2-sp", 4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "parallel.ep=1"]),
    ("cp2-pp2-mtp", 4, ["parallel.cp=2", "parallel.pp=2", "parallel.ep=1"]),
])
def test_parallel_layout_equals_single_process(trained, reference, name, procs, overrides):
    run = trained(name, procs, *overrides)
    ref_losses, ref_weights, _ = reference
    got = losses(run)
    assert len(got) == len(ref_losses) == 4
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # metrics also go to TensorBoard
    assert max(abs(a - b) for a, b in zip(got, ref_losses)) <= 2e-5, (got, ref_losses)
    assert max_diff(final_weights(run / "checkpoints"), ref_weights) <= 1e-4
    assert ref_losses[-1] < ref_losses[0]
    # expert loads are counted once per token even when layers are recomputed
    imbalance = [json.loads(line)["expert_imbalance"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert imbalance == pytest.approx(reference[2], abs=1e-4)


def test_lora_trains_adapters_only_on_any_layout(env):
    lora = ["peft.method=lora", "peft.targets=[q_a_proj,q_b_proj,kv_b_proj,o_proj,gate_proj,up_proj,down_proj]", "train.lr=5e-3"]
    got = {}
    for name, procs, layout in (("dp1", 1, ["parallel.ep=1"]), ("ep2", 2, ["parallel.ep=2"]),
                                ("tp2", 2, ["parallel.ep=1", "parallel.tp=2"]),  # adapters split like their base weights
                                ("cp2", 2, ["parallel.ep=1", "parallel.cp=2"]),
                                ("cp2-tp2", 4, ["parallel.ep=1", "parallel.cp=2", "parallel.tp=2"])):  # recipes/long_context.py's form
        run, res = train(env, env[1] / f"lora-{name}", procs, *layout, *lora)
        got[name] = losses(run)
        weights = final_weights(run / "checkpoints")
        assert any(".lora_A." in k for k in weights)
    assert got["ep2"] == pytest.approx(got["dp1"], abs=2e-5)
    assert got["tp2"] == pytest.approx(got["dp1"], abs=2e-5)
    assert got["cp2"] == pytest.approx(got["dp1"], abs=2e-5)
    assert got["cp2-tp2"] == pytest.approx(got["dp1"], abs=2e-5)
    assert min(got["dp1"]) < got["dp1"][0]


def test_start_from_hf_weights_on_any_layout(env, tmp_path):
    """checkpoint.load reads an HF directory region by region; step 1's loss is the loaded model's loss."""
    from model.hf_io import load_hf_model, save_hf
    from model.presets import preset
    from model.transformer import build_model
    from trainer.data import build_train_loader
    from trainer.main import load_run
    from trainer.tokenizer import load_tokenizer

    save_hf(build_model(preset("tiny"), seed=7), tmp_path / "hf")
    first = {}
    for procs, ep in ((1, 1), (2, 2)):
        run, _ = train(env, env[1] / f"hf{procs}", procs, f"parallel.ep={ep}", f"checkpoint.load={tmp_path / 'hf'}", "train.max_steps=2")
        first[procs] = losses(run)
    recipe, _, _ = load_run(run)
    loader = build_train_loader(recipe.data, recipe.train, load_tokenizer("byte"), 0, 1)
    model = load_hf_model(tmp_path / "hf")
    with torch.no_grad():
        total = count = 0.0
        for b in loader.step_batches():
            out = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"], segment_ids=b["segment_ids"], reduction="sum")
            total += float(out.lm_loss)
            count += float((b["labels"] != -100).sum())
    assert first[1][0] == pytest.approx(total / count, abs=1e-5)
    assert first[2] == pytest.approx(first[1], abs=2e-5)


NO_MTP = ["model.num_nextn_predict_layers=0"]  # the same layouts without MTP (the last stage then has no embedding copy)


@pytest.fixture(scope="module")
def reference_no_mtp(env):
    run, _ = train(env, env[1] / "ref-nomtp", 1, "parallel.ep=1", *NO_MTP)
    return losses(run), final_weights(run / "checkpoints")


@pytest.mark.parametrize("name, procs, overrides", [
    ("pp2-1f1b", 2, ["parallel.pp=2", "parallel.ep=1"]),
    ("pp2-gpipe", 2, ["parallel.pp=2", "parallel.ep=1", "parallel.pp_schedule=gpipe"]),
    ("pp2-vpp2-interleaved", 2, ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=1", "parallel.pp_schedule=interleaved_1f1b"]),
    ("pp2-ep2", 4, ["parallel.pp=2", "parallel.ep=2"]),
    ("pp2-tp2", 4, ["parallel.pp=2", "parallel.tp=2", "parallel.ep=1"]),
    ("tp2-sp", 2, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=1"]),
    ("tp2-sp-etp1", 2, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=1", "parallel.etp=1"]),
    ("dp2-tp2-sp", 4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=1"]),
])
def test_pipeline_and_sequence_parallel_layouts_equal_single_process(env, reference_no_mtp, name, procs, overrides):
    run, _ = train(env, env[1] / name, procs, *NO_MTP, *overrides)
    ref_losses, ref_weights = reference_no_mtp
    got = losses(run)
    assert max(abs(a - b) for a, b in zip(got, ref_losses)) <= 2e-5, (got, ref_losses)
    assert max_diff(final_weights(run / "checkpoints"), ref_weights) <= 1e-4


def test_sigusr2_checkpoints_and_exits_for_requeue_then_resume_is_bitwise(env):
    long = ["train.max_steps=12", "train.lr_schedule=cosine"]
    # uninterrupted reference
    full, _ = train(env, env[1] / "full", 2, "parallel.ep=2", *long, f"checkpoint.save_dir={env[1] / 'ck-full'}")
    # interrupted: SIGUSR2 to the launcher (it forwards to the job's process group)
    runs, ck = env[1] / "cut", env[1] / "ck-cut"
    proc = subprocess.Popen(launch_cmd(runs, 2, "parallel.ep=2", *long, f"checkpoint.save_dir={ck}"), cwd=ROOT, env=env[0],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = wait_for_run_steps(runs, 2, proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    stopped = len(losses(run))
    assert 2 <= stopped < 12
    (saved,) = [p for p in ck.glob("step-*")]
    assert saved.name == f"step-{stopped:08d}" and (saved / "trainer.json").exists() and (run / "EXIT_CODE").read_text().startswith("75 ")
    assert not list(ck.glob("*.partial"))
    # resume in a new launch with the same save_dir: continues exactly
    resumed, res = train(env, env[1] / "cut2", 2, "parallel.ep=2", *long, f"checkpoint.save_dir={ck}")
    assert f"resumed from {saved}" in res.stdout
    assert losses(run) + losses(resumed) == losses(full)
    a, b = final_weights(ck), final_weights(env[1] / "ck-full")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_changed_dp_ep_and_cp_layout(env):
    ck = env[1] / "ck-layout"
    long = ["train.max_steps=6", "checkpoint.interval=3"]
    first, _ = train(env, env[1] / "lay1", 2, "parallel.ep=2", *long, "train.max_steps=6", f"checkpoint.save_dir={ck}")
    ref = losses(first)
    # keep only the step-3 checkpoint, then resume it on one process without expert parallelism
    import shutil
    shutil.rmtree(ck / "step-00000006")
    second, res = train(env, env[1] / "lay2", 1, "parallel.ep=1", *long, f"checkpoint.save_dir={ck}")
    assert "resumed from" in res.stdout and "layout was" in res.stdout
    assert max(abs(a - b) for a, b in zip(losses(second), ref[3:])) <= 2e-5
    # and with context parallelism: CP is a layout change like DP's (checkpoints are layout-free)
    cp_dir = Path(f"{ck}-cp")
    shutil.copytree(ck / "step-00000003", cp_dir / "step-00000003")
    third, res = train(env, env[1] / "lay3", 2, "parallel.ep=1", "parallel.cp=2", *long, f"checkpoint.save_dir={cp_dir}")
    assert "resumed from" in res.stdout and "'cp': 1" in res.stdout
    assert max(abs(a - b) for a, b in zip(losses(third), ref[3:])) <= 2e-5


def test_incompatible_resume_is_refused_before_training(env):
    ck = env[1] / "ck-refuse"
    train(env, env[1] / "ref1", 1, "parallel.ep=1", "train.max_steps=1", f"checkpoint.save_dir={ck}")
    bad = ["train.max_steps=2", "model.moe_intermediate_size=32", f"checkpoint.save_dir={ck}"]
    # the launcher refuses before anything runs ...
    res = subprocess.run(launch_cmd(env[1] / "ref2", 1, "parallel.ep=1", *bad), cwd=ROOT, env=env[0], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "checkpoint.save_dir: cannot resume" in res.stderr and "another model" in res.stderr
    assert not (env[1] / "ref2").exists()
    # ... and so does the job itself (e.g. a checkpoint that appeared after submission), with exit 2
    from launcher.resume import ResumeRefused, check_compatible
    saved = json.loads(next(ck.glob("step-*/trainer.json")).read_text())
    with pytest.raises(ResumeRefused, match="TP=1, this layout has TP=2"):
        check_compatible(saved, {"fingerprint": saved["fingerprint"], "layout": {**saved["layout"], "tp": 2}})
    moved = env[1] / "ck-refuse-later"
    run, res = train(env, env[1] / "ref3", 1, "parallel.ep=1", *bad[:2], f"checkpoint.save_dir={moved}", "checkpoint.resume=true")
    import shutil
    shutil.rmtree(moved)
    shutil.copytree(ck, moved)  # now only a foreign checkpoint is there: re-run the same job
    script = run / "job.sh"
    out = subprocess.run(["bash", str(script)], cwd=ROOT, env=env[0], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot resume" in out.stdout + out.stderr


@pytest.mark.parametrize("procs, overrides", [
    (1, ["parallel.ep=1"]),
    (2, ["parallel.ep=2"]),
    (2, ["parallel.pp=2", "parallel.ep=1"]),
    (2, ["parallel.ep=2", "peft.method=lora", "peft.rank=4"]),
    (4, ["parallel.ep=4"]),
    (4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]),
    (4, ["parallel.tp=2", "parallel.ep=1", "parallel.etp=2", "train.precision=fp32"]),
    (4, ["parallel.pp=2", "parallel.ep=2", "peft.method=lora", "peft.rank=4", "peft.targets=[q_b_proj,o_proj,gate_proj,down_proj]"]),
], ids=lambda v: str(v) if isinstance(v, int) else "-".join(o.split(".", 1)[1] for o in v))
def test_planned_static_memory_equals_what_the_trainer_allocates(env, procs, overrides):
    """The planner's weights/grads/optimizer bytes per pipeline rank == the fullest rank's actual allocation."""
    run, _ = train(env, env[1] / f"mem-{procs}-{'-'.join(overrides)}", procs, "train.max_steps=1", *overrides)
    report = json.loads((run / "memory.json").read_text())
    assert len(report["ranks"]) == procs
    for pp_rank, planned in enumerate(report["plan"]):
        ranks = [r for r in report["ranks"] if r["pp_rank"] == pp_rank]
        actual = {k: max(r[k] for r in ranks) for k in ("weights", "grads", "optimizer")}
        assert actual == planned, (pp_rank, actual, planned)


def test_sigterm_checkpoints_at_the_end_of_the_step(env):
    """Preemption (and scancel) send SIGTERM: the ranks finish the step and checkpoint before they go."""
    runs, ck = env[1] / "term", env[1] / "ck-term"
    proc = subprocess.Popen(launch_cmd(runs, 2, "parallel.ep=2", "train.max_steps=200", f"checkpoint.save_dir={ck}"), cwd=ROOT,
                            env=env[0], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = wait_for_run_steps(runs, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    stopped = len(losses(run))
    (saved,) = [p for p in ck.glob("step-*")]
    assert saved.name == f"step-{stopped:08d}" and (saved / "trainer.json").exists(), out[-3000:]
    assert (run / "EXIT_CODE").read_text().startswith("75 checkpointed at step") and "after SIGTERM" in out, out[-3000:]


def test_resume_rewinds_metrics_of_steps_that_run_again(tmp_path):
    """A crash after a checkpoint: the steps after it run again, so their old records move aside
    (metrics.rewound.jsonl) and TensorBoard purges them; every step then appears once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.metrics import MetricsLogger

    def record(step, loss):
        return {"loss": loss, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "mfu": 0.1, "mem_gib": 0.1}

    first = MetricsLogger(tmp_path, 5, True)
    for s in range(1, 6):
        first.log(s, record(s, float(s)), console=False)
    first.close()
    time.sleep(1.1)  # a new event file name (they are per second)
    second = MetricsLogger(tmp_path, 5, True)
    assert second.rewind(3) == 2
    for s in (4, 5):
        second.log(s, record(s, 10.0 * s), console=False)
    second.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.rewound.jsonl").read_text().splitlines()] == [4, 5]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert MetricsLogger(tmp_path, 5, True).rewind(5) == 0  # nothing after the last step: nothing moves
