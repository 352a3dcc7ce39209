"""The launch side of the nemo backend's checkpoint chain (torch-, NeMo- and GPU-free; the job side runs in
NeMo's container): a nemo run's NeMo checkpoints found and chosen like a native run's, `launch export` of a
nemo run rendered as NeMo's exporter in the run's container (one process), eval/generate pointed at the
export, the HF -> NeMo import stage's checks, and the NeMo pipeline's stages wired to each other.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

IMAGE = "nvcr.io/nvidia/nemo:25.09"


def gpu_profile(tmp_path: Path) -> str:
    path = tmp_path / "gpu.yaml"
    path.write_text("name: gpu\nexecutor: slurm\ndevice: cuda\nnodes: 1\ngpus_per_node: 2\n"
                    "gpu: {type: H100-80GB, memory_gb: 80, peak_tflops: 989, assumed_mfu: 0.35}\nslurm: {partition: gpu}\n")
    return str(path)


def launch(*args, expect=0):
    res = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture
def nemo_run(tmp_path):
    """A nemo run directory from a dry run on a GPU profile, with NeMo-style checkpoints: steps 5 and 10 (plain and
    -last copies), step 15 still being written (its -unfinished marker)."""
    tok, data = tmp_path / "tok", tmp_path / "sft"
    for d in (tok, data):
        d.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (data / "training.jsonl").write_text('{"input": "a", "output": "b"}\n')
    profile = gpu_profile(tmp_path)

    def make(*overrides):
        runs = tmp_path / "runs"
        launch("smoke", "--cluster", profile, "--dry-run", "--runs-dir", str(runs), "backend.name=nemo",
               f"backend.container_image={IMAGE}", f"data.tokenizer={tok}", f"data.path={data}", "data.packing=false", *overrides)
        (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
        ckpts = run / "nemo" / "smoke" / "checkpoints"
        for name in ("smoke--step=5-consumed_samples=80", "smoke--step=10-consumed_samples=160",
                     "smoke--step=10-consumed_samples=160-last", "smoke--step=15-consumed_samples=240"):
            for sub in ("context", "weights"):
                (ckpts / name / sub).mkdir(parents=True)
        (ckpts / "smoke--step=15-consumed_samples=240-unfinished").write_text("")
        return run, profile
    return make


def test_nemo_checkpoints_are_found_and_chosen_like_native_ones(nemo_run):
    from launcher.rundir import load_run_recipe
    from launcher.resume import choose_checkpoint, complete_checkpoints

    run, _ = nemo_run()
    recipe = load_run_recipe(run)
    found = complete_checkpoints(run, recipe)
    assert sorted(found) == [5, 10] and found[10].name == "smoke--step=10-consumed_samples=160"  # not -last, not unfinished
    assert choose_checkpoint(run, recipe, None) == (10, found[10])


def test_export_of_a_nemo_run_runs_nemos_exporter_in_its_container(nemo_run):
    run, profile = nemo_run()
    res = launch("export", str(run), "--cluster", profile, "--dry-run", "--step", "5")
    assert "NeMo's exporter in one process" in res.stdout + res.stderr
    (job,) = [p for p in run.parent.iterdir() if p.name != run.name and not p.name.startswith(".")]
    script = (job / "job.sbatch").read_text()
    assert "-m nemo_backend.export --run-dir" in script and f"--container-image={IMAGE}" in script
    assert "PROCS_PER_NODE=1" in script and f"--container-mounts={run.parent}:{run.parent}" in script
    assert (job / "code" / "nemo_backend" / "export.py").is_file()  # the code travels into the container
    task = yaml.safe_load((job / "task.yaml").read_text())
    assert task["step"] == 5 and task["checkpoint"].endswith("smoke--step=5-consumed_samples=80") and task["format"] == "hf"
    # what NeMo cannot do, and what needs the export first, refused before anything is written
    for args, words in ((["export", str(run), "--cluster", profile, "--nodes", "2"], "--nodes: a NeMo run's export is one process"),
                        (["eval", str(run), "--cluster", profile], "export it (launch export RUN)"),
                        (["generate", str(run), "--cluster", profile, "--prompt", "hi"], "export it (launch export RUN)")):
        res = launch(*args, expect=2)
        assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_lora_nemo_run_exports_merged_only(nemo_run):
    run, profile = nemo_run("peft.method=lora", "peft.targets=[q_a_proj,kv_b_proj]")
    res = launch("export", str(run), "--cluster", profile, "--format", "peft", "--dry-run", expect=2)
    assert "NeMo, which has no PEFT export for DeepSeek; use --format merged" in res.stderr
    res = launch("export", str(run), "--cluster", profile, "--dry-run")
    assert "LoRA merged first" in res.stdout + res.stderr


def test_import_stage_checks_and_gives_nemo_a_completed_config_view(tmp_path):
    """HF_DIR as transformers writes it (without the upstream routing keys NeMo's importer reads): NeMo gets a view
    (links to the files, config.json completed); the user's directory is untouched. FP8 is refused first."""
    from model.hf_config import config_to_hf
    from model.presets import tiny
    from nemo_backend.hf_import import NEMO_KEYS, importer_source

    hf = tmp_path / "hf"
    hf.mkdir()
    config = {k: v for k, v in config_to_hf(tiny()).items() if k not in ("scoring_func", "topk_method", "aux_loss_alpha")}
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "model.safetensors").write_text("weights")
    source, filled = importer_source(hf, tmp_path / "scratch")
    assert sorted(filled) == ["aux_loss_alpha", "scoring_func", "topk_method"] and source != hf
    view = json.loads((source / "config.json").read_text())
    assert view["scoring_func"] == "sigmoid" and view["topk_method"] == "noaux_tc" and all(k in view for k in NEMO_KEYS)
    assert (source / "model.safetensors").resolve() == (hf / "model.safetensors").resolve()
    assert json.loads((hf / "config.json").read_text()) == config  # not written
    assert importer_source(source, tmp_path / "scratch2") == (source, [])  # complete: NeMo reads it as it is
    (hf / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    res = subprocess.run([sys.executable, "-m", "nemo_backend.hf_import", str(hf), str(tmp_path / "out"), "--check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "FP8 checkpoint; NeMo's importer needs BF16: convert it first" in res.stderr
    assert not (tmp_path / "out").exists()


def test_nemo_pipeline_stages_hand_over_to_each_other(tmp_path):
    """recipes/sft_pipeline_nemo.py on a GPU profile: import runs NeMo's importer in NeMo's container on one GPU, the
    training stage starts from its output (load_format nemo), export is NeMo's exporter on the training run and
    eval reads the export with the data stage's split; every container stage sees the runs directory."""
    runs = tmp_path / "runs"
    res = launch("recipes/sft_pipeline_nemo.py", "--cluster", gpu_profile(tmp_path), "--dry-run", "--runs-dir", str(runs))
    stage = {p.name.split(".")[1].rsplit("-", 1)[0]: p for p in runs.iterdir() if not p.name.startswith(".")}
    assert set(stage) == {"convert", "data", "import", "train", "export", "eval", "backtest"}, res.stdout
    imp = (stage["import"] / "command.sbatch").read_text()
    assert f"-m nemo_backend.hf_import {stage['convert']}/bf16 {stage['import']}/nemo" in imp
    assert f"--container-image={IMAGE}" in imp and "--gpus-per-node=1" in imp and f"--container-mounts={runs}:{runs}" in imp
    recipe = yaml.safe_load((stage["train"] / "recipe.yaml").read_text())
    assert recipe["backend"]["name"] == "nemo" and recipe["checkpoint"]["load"] == f"{stage['import']}/nemo"
    assert recipe["checkpoint"]["load_format"] == "nemo" and recipe["data"]["path"] == f"{stage['data']}/sft"
    assert "-m nemo_backend.main --run-dir" in (stage["train"] / "job.sbatch").read_text()
    from launcher.config_io import load_yaml_into
    from launcher.recipe import Recipe
    from nemo_backend.recipe import values

    nemo = values(load_yaml_into(Recipe, stage["train"] / "recipe.yaml"), yaml.safe_load((stage["train"] / "plan.yaml").read_text()),
                  str(stage["train"]))
    assert nemo["resume.restore_config.path"] == f"{stage['import']}/nemo"  # NeMo restores the imported checkpoint
    task = yaml.safe_load((stage["export"] / "task.yaml").read_text())
    assert task["source"] == str(stage["train"]) and task["out"] == f"{stage['export']}/hf"
    assert "-m nemo_backend.export" in (stage["export"] / "job.sbatch").read_text()
    task = yaml.safe_load((stage["eval"] / "task.yaml").read_text())
    assert task["source"] == f"{stage['export']}/hf" and task["source_kind"] == "hf" and task["data"] == f"{stage['data']}/sft"
    assert task["template"] == "chatml" and "-m evaluation.main" in (stage["eval"] / "job.sbatch").read_text()


def test_nemo_gpu_check_script_renders_its_chain(tmp_path):
    """benchmarks/nemo_gpu_check.py, the one-command check for a GPU in NeMo's environment, in its CPU mode:
    the same launch of the NeMo pipeline on its one-GPU local profile, checked and rendered; without a GPU or
    NeMo the real mode says what is missing and exits 2."""
    res = subprocess.run([sys.executable, "benchmarks/nemo_gpu_check.py", "--dry-run", "--out", str(tmp_path / "c")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "c" / "nemo_gpu_check.json").read_text())
    assert report["checks"] == {"launch": True, "stages": True}
    res = subprocess.run([sys.executable, "benchmarks/nemo_gpu_check.py", "--out", str(tmp_path / "d")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "this check needs" in res.stderr and not (tmp_path / "d").exists()


@pytest.mark.parametrize("name,cluster,extra", [("full_ft", "h100-8x64", []), ("lora", "h100-8x64", []),
                                                 ("pretrain_671b", "h100-8x64", ["parallel.ep=32"]),
                                                 ("full_ft", "h100-8x64", ["parallel.pp=4", "parallel.vpp=2", "parallel.pp_schedule=interleaved_1f1b",
                                                                           "model.num_hidden_layers=60", "parallel.ep=64", "train.global_batch_size=512"])])
def test_nemo_plan_splits_layers_as_megatron_does(tmp_path, name, cluster, extra):
    """Megatron takes the first and last pipeline rank's layer counts and splits the rest evenly over the middle
    ranks (and, with VPP, each rank's layers evenly over its chunks): the plan's split must be one Megatron
    builds, or NeMo would train another layout than the one planned (or refuse it). DeepSeek-V3 SFT on PP8: 6/8/7."""
    runs = tmp_path / "runs"
    launch(name, "--cluster", cluster, "--dry-run", "--runs-dir", str(runs), "backend.name=nemo",
           f"backend.container_image={IMAGE}", *extra)
    (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    pp, vpp = plan["layout"]["pp"], plan["layout"]["vpp"]
    ranks, stages = plan["pipeline"]["layers_per_rank"], plan["pipeline"]["layers_per_stage"]
    layers = yaml.safe_load((run / "recipe.yaml").read_text())["model"]["num_hidden_layers"]
    first, last = ranks[0], ranks[-1]
    assert (layers - first - last) % (pp - 2) == 0 and set(ranks[1:-1]) == {(layers - first - last) // (pp - 2)}
    assert max(first, last) <= ranks[1]  # the ends also hold the embedding, head, loss and MTP
    for r in range(pp):
        assert len({stages[k] for k in range(r, pp * vpp, pp)}) == 1 and stages[r] * vpp == ranks[r]  # equal chunks
    if name == "full_ft" and not extra:
        assert ranks == [6, 8, 8, 8, 8, 8, 8, 7]  # NVIDIA's NeMo recipe for DeepSeek-V3 SFT


def test_nemo_vpp_that_megatron_cannot_split_is_refused(tmp_path):
    res = launch("full_ft", "--cluster", "h100-8x64", "--dry-run", "--runs-dir", str(tmp_path / "runs"), "backend.name=nemo",
                 f"backend.container_image={IMAGE}", "parallel.pp=4", "parallel.vpp=2", "parallel.pp_schedule=interleaved_1f1b",
                 expect=2)
    assert "parallel.vpp: the nemo backend (Megatron's interleaved schedule) needs the 61 layers divisible by VPP 2" in res.stderr
