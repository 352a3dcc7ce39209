"""The `launch` command end to end, as a subprocess."""

import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import ROOT, run_launch
from launcher.config_io import load_yaml_into
from launcher.recipe import Recipe
from launcher.recipe_loader import load_recipe


def run_dirs(root):
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def test_dry_run_full_ft_on_64_nodes(tmp_path):
    runs = tmp_path / "runs"
    res = run_launch("recipes/full_ft.py", "--cluster", "h100-8x64", "--dry-run", "--runs-dir", str(runs))
    assert res.returncode == 0, res.stderr
    script = tmp_path / "printed.sbatch"
    script.write_text(res.stdout)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "layout" in res.stderr and "TP  PP  VPP  EP" in res.stderr and "dry run: nothing submitted" in res.stderr
    (run,) = run_dirs(runs)
    assert sorted(p.name for p in run.iterdir()) == ["cluster.yaml", "job.sbatch", "logs", "meta.yaml", "plan.yaml", "recipe.yaml"]
    assert (run / "job.sbatch").read_text() == res.stdout
    meta = yaml.safe_load((run / "meta.yaml").read_text())
    assert meta["command"] == "launch recipes/full_ft.py --cluster h100-8x64 --dry-run --runs-dir " + str(runs)
    assert meta["dry_run"] is True and "commit" in meta["git"] and "dirty" in meta["git"]
    assert meta["versions"]["moe-launch"]
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    assert plan["layout"]["dp"] == 64 and plan["memory"]["verdict"] in ("fits", "at risk")
    # the resolved recipe reads back as the same Recipe the job will use
    back = load_yaml_into(Recipe, run / "recipe.yaml")
    assert back == load_recipe("full_ft")[0]


def test_full_ft_on_4_nodes_refused(tmp_path):
    runs = tmp_path / "runs"
    res = run_launch("recipes/full_ft.py", "--cluster", "h100-8x4", "--dry-run", "--runs-dir", str(runs))
    assert res.returncode == 2
    assert res.stdout == ""
    err = res.stderr
    assert "parallel.ep:" in err and "memory: won't fit" in err
    assert "what would fit:" in err and "--cluster h100-8x64" in err and "recipes/lora.py" in err and "at least 64 nodes" in err
    assert not runs.exists()


def test_lora_passes_on_4_nodes(tmp_path):
    res = run_launch("recipes/lora.py", "--cluster", "h100-8x4", "--dry-run", "--runs-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "8  1*" in res.stderr  # TP8, PP1 derived: FSDP shards the frozen bf16 weights over DP4


def test_submit_side_never_imports_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from launcher.cli import main
        rc = main(["recipes/full_ft.py", "--cluster", "h100-8x64", "--dry-run", "--runs-dir", {str(tmp_path)!r}])
        rc2 = main(["recipes/full_ft.py", "--cluster", "h100-8x4", "--dry-run", "--runs-dir", {str(tmp_path)!r}])
        main(["plan", "recipes/full_ft.py", "--cluster", "h100-8x64", "--search"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "safetensors", "tokenizers", "transformers"))
        print(rc, rc2, heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 2 []"


@pytest.mark.parametrize("args, words", [
    (["train.max_stepz=3"], "override train.max_stepz: unknown key in 'train'"),
    (["train.max_steps=ten"], "override train.max_steps: expected an integer; got 'ten'"),
    (["parallel.tp"], "is not of the form key=value"),
    (["model=llama"], "model: unknown model preset 'llama'"),
    (["name=$(reboot)"], "name:"),
    (["data.path=a\nb"], "newline"),
    (["--cluster", "h100-9x9"], "--cluster: unknown cluster 'h100-9x9'; known: h100-8x4, h100-8x64, local, local-slurm"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, words):
    base = ["recipes/smoke.py", "--cluster", "local", "--dry-run", "--runs-dir", str(tmp_path / "runs")]
    if args[0] == "--cluster":
        base[1:3] = []
    res = run_launch(*base, *args)
    assert res.returncode == 2
    assert words in res.stderr, res.stderr
    if "name=" not in args[0]:
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "runs").exists()


def test_shell_metacharacters_end_up_literal(tmp_path):
    value = "x $(touch PWNED) `id` 'q' \"dq\" ; rm -rf /"
    res = run_launch("smoke", "--cluster", "local-slurm", "--dry-run", "--runs-dir", str(tmp_path / "runs"), f"env.MY_VAR={value}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("export MY_VAR="))
    out = subprocess.run(["bash", "-c", line + '; printf %s "$MY_VAR"'], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout == value and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("body, words", [
    ("name: bad\nnodes: four\n", "nodes: expected an integer; got 'four'"),
    ("name: bad\nnodez: 4\n", "nodez: unknown key"),
    ("name: bad\nnodes: [\n", "not valid YAML line"),
    ("name: bad\nexecutor: pbs\n", "executor: 'pbs' is not valid; choose one of slurm, local"),
    ("name: other\n", "declares name 'other'"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("name: bad\nslurm:\n  partition: 'gpu; reboot'\n", "slurm.partition"),
    ("name: bad\nenv:\n  'A B': x\n", "env.A B: not a valid environment variable name"),
])
def test_bad_cluster_profiles(tmp_path, body, words):
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "bad.yaml").write_text(body)
    res = run_launch("smoke", "--cluster", "bad", "--dry-run", "--runs-dir", str(tmp_path / "runs"), env={"MOE_LAUNCH_CLUSTERS": str(d)})
    assert res.returncode == 2
    assert words in res.stderr, res.stderr
    assert "bad.yaml" in res.stderr or "slurm.partition" in words
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "runs").exists()


def test_user_profile_on_search_path(tmp_path):
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "mylab.yaml").write_text("name: mylab\nnodes: 2\ngpus_per_node: 4\ngpu: {type: A100-80GB, memory_gb: 80, peak_tflops: 312}\n"
                                  "slurm: {partition: a100, account: proj-42, qos: high}\n")
    res = run_launch("smoke", "--cluster", "mylab", "--dry-run", "--runs-dir", str(tmp_path / "runs"), "train.global_batch_size=32",
                     env={"MOE_LAUNCH_CLUSTERS": str(d)})
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --account=proj-42" in res.stdout and "#SBATCH --qos=high" in res.stdout
    listing = run_launch("clusters", env={"MOE_LAUNCH_CLUSTERS": str(d)})
    assert "mylab" in listing.stdout and "h100-8x64" in listing.stdout


def test_run_dirs_never_overwritten(tmp_path):
    runs = tmp_path / "runs"
    for _ in range(3):
        assert run_launch("smoke", "--cluster", "local", "--dry-run", "--runs-dir", str(runs)).returncode == 0
    dirs = run_dirs(runs)
    assert len(dirs) == 3 and len({d.name for d in dirs}) == 3
    # a directory the user made with the name launch would pick stays as it was
    from launcher import rundir
    import datetime as dt
    now = dt.datetime(2030, 1, 1, 12, 0, 0)
    mine = rundir.reserve_name(runs, "smoke", "local", now)
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert rundir.reserve_name(runs, "smoke", "local", now) != mine
    with pytest.raises(FileExistsError):
        rundir.create(mine, {"job.sh": "x"})
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not [p for p in runs.iterdir() if p.name.startswith(".staging")]


def test_missing_sbatch_is_a_clear_error(tmp_path):
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    res = run_launch("full_ft", "--cluster", "h100-8x64", "--runs-dir", str(tmp_path / "runs"), env={"PATH": str(empty_path)})
    assert res.returncode == 2
    assert "slurm: sbatch not found on PATH" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_shipped_recipes_found_from_any_directory(tmp_path):
    res = run_launch("recipes/smoke.py", "--cluster", "local", "--dry-run", "--runs-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    listing = run_launch("recipes", cwd=tmp_path)
    assert all(n in listing.stdout for n in ("full_ft", "lora", "pretrain", "smoke", "full_ft_16b"))


def test_ignore_memory_flag(tmp_path):
    args = ["smoke", "--cluster", "local", "--dry-run", "--runs-dir", str(tmp_path / "r"), "model=moonlight-16b", "data.seq_length=64"]
    assert run_launch(*args).returncode == 2
    res = run_launch(*args, "--ignore-memory")
    assert res.returncode == 0, res.stderr and "won't fit" in res.stderr


# ----------------------------------------------------------------------------- sweeps and pipelines (no Slurm needed)
def test_sweep_dry_run_makes_one_run_dir_per_point(tmp_path):
    runs = tmp_path / "runs"
    res = run_launch("smoke", "--cluster", "local-slurm", "--dry-run", "--runs-dir", str(runs),
                     "--sweep", "train.lr=1e-3,2e-3", "--sweep", "parallel.ep=1,2")
    assert res.returncode == 0, res.stderr
    made = sorted(p for p in runs.iterdir() if (p / "meta.yaml").exists())
    assert len(made) == 4 and all(p.name.split("-smoke-s")[1][0] in "1234" for p in made)
    points = [yaml.safe_load((p / "meta.yaml").read_text())["sweep"]["overrides"] for p in made]
    assert sorted(map(tuple, points)) == sorted((f"train.lr={lr}", f"parallel.ep={ep}") for lr in ("1e-3", "2e-3") for ep in (1, 2))
    assert res.stdout.count("#SBATCH --job-name=smoke") == 5  # the four runs' scripts and the job array's
    (sweep,) = [p for p in runs.iterdir() if (p / "array.sbatch").exists()]
    array = (sweep / "array.sbatch").read_text()
    assert "#SBATCH --array=1-4" in array and all(str(p) in array for p in made)
    assert [pt["run"] for pt in yaml.safe_load((sweep / "sweep.yaml").read_text())["points"]] == [p.name for p in made]


def test_sweep_with_one_bad_point_writes_nothing(tmp_path):
    res = run_launch("smoke", "--cluster", "local-slurm", "--dry-run", "--runs-dir", str(tmp_path / "runs"),
                     "--sweep", "parallel.ep=2,4")
    assert res.returncode == 2
    assert "sweep point parallel.ep=4, cannot run" in res.stderr and "parallel.ep=2," not in res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("body, words", [
    ("Pipeline('p', [])", "stages: a pipeline needs at least one stage"),
    ("Pipeline('p', [Stage('a', command=['true']), Stage('a', command=['true'])])", "stages[1].name: two stages are named 'a'"),
    ("Pipeline('p', [Stage('a')])", "stages[0]: give a stage either recipe="),
    ("Pipeline('p', [Stage('a', command=['echo', '{nope}'])])", "names {nope}; known: {a}, {python}"),
    ("Pipeline('p', [Stage('a', recipe='smoke', overrides=['train.max_stepz=3'])])", "override train.max_stepz: unknown key"),
    ("Pipeline('p', [Stage('t', recipe='smoke'), Stage('e', task='eval', args=['{t}', '--splt', 'test'])])",
     "stage e.args: unrecognized arguments: --splt test"),
    ("Pipeline('p', [Stage('t', recipe='smoke'), Stage('e', task='export', args=['{t}', '--format', 'peft'])])",
     "--format: run "),
    ("Pipeline('p', [Stage('t', recipe='smoke'), Stage('e', task='serve', args=['{t}'])])", "stages[1].task: task 'serve' is not one of"),
])
def test_bad_pipelines_one_line_exit_2_nothing_written(tmp_path, body, words):
    pipe = tmp_path / "p.py"
    pipe.write_text(f"from launcher.pipeline import Pipeline, Stage\n\ndef pipeline():\n    return {body}\n")
    res = run_launch(str(pipe), "--cluster", "local-slurm", "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 2 and words in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "runs").exists()


def test_pipeline_dry_run_renders_every_stage(tmp_path):
    runs = tmp_path / "runs"
    res = run_launch("recipes/smoke_pipeline.py", "--cluster", "local-slurm", "--dry-run", "--runs-dir", str(runs))
    assert res.returncode == 0, res.stderr
    made = {yaml.safe_load((p / "meta.yaml").read_text())["pipeline"]["stage"]: p for p in runs.iterdir()}
    assert sorted(made) == ["eval", "export", "prepare", "train"]
    # placeholders resolved to the other stages' run directories; no "not visible" warning for prepare's output
    assert f"{made['prepare']}/data" in (made["train"] / "recipe.yaml").read_text()
    # eval and export are jobs on the train stage's run, whose checkpoint they find when they start
    for stage, module in (("eval", "evaluation.main"), ("export", "export.main")):
        task = yaml.safe_load((made[stage] / "task.yaml").read_text())
        assert task["source"] == str(made["train"]) and task["checkpoint"] is None and task["kind"] == stage
        assert f"-m {module} --run-dir" in (made[stage] / "job.sbatch").read_text()
    assert "not visible" not in res.stderr and "submitted job" not in res.stdout + res.stderr
    assert res.stdout.count("#!/bin/bash") == 4 and "#SBATCH --no-requeue" in res.stdout
