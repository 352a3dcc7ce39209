"""Rendering: golden files for every shipped recipe x profile pair, bash -n, and quoting safety."""

import dataclasses
import os
import subprocess
from pathlib import Path

import jinja2
import pytest

from launcher import paths, tasks
from launcher.cluster import load_profile
from launcher.errors import UserError
from launcher.preflight import run_preflight
from launcher.pipeline import Pipeline, placeholders
from launcher.recipe_loader import apply_overrides, load_recipe, load_target, shipped_names
from launcher.submission import render_command
from launcher.render import RenderInput, environment, render

GOLDEN = paths.PACKAGE_DIR.parent / "tests" / "golden"
RECIPES = shipped_names()
CLUSTERS = sorted(p.stem for p in paths.data_dir("clusters").glob("*.yaml"))


def golden_text(recipe_name, cluster_name):
    """The rendered script (a pipeline: each stage's), or the pre-flight refusal, with fixed run dirs and interpreter."""
    target, _ = load_target(recipe_name)
    profile, _ = load_profile(cluster_name)
    if isinstance(target, Pipeline):
        dirs = {st.name: f"/runs/{target.name}.{st.name}-{cluster_name}" for st in target.stages}
        values = {**dirs, "python": "python3"}
        parts, trained = [], {}
        for i, st in enumerate(target.stages, 1):
            parts.append(f"# ==== stage {i}: {st.name}\n")
            if st.command is not None:
                st = dataclasses.replace(st, command=[placeholders(a, values, "command") for a in st.command])
                parts.append(render_command(st, f"{target.name}.{st.name}", profile, dirs[st.name], "python3"))
            elif st.task is not None:  # a job on an earlier stage's run
                args = tasks.parser(st.task, stage="args").parse_args([placeholders(a, values, "args") for a in st.args])
                prepared = tasks.prepare(st.task, args, profile, Path("/runs"), trained)
                if prepared.task.kind == "export" and prepared.task.out:
                    trained[prepared.task.out] = tasks.Source(Path(prepared.task.out), "hf", prepared.recipe, pending=True)
                name, files = tasks.render_job(prepared, profile, Path(dirs[st.name]), [], True, "python3", job_name=f"{target.name}.{st.name}")
                parts.append(files[name])
            else:
                recipe = apply_overrides(load_recipe(st.recipe)[0], [placeholders(o, values, "overrides") for o in st.overrides])
                trained[dirs[st.name]] = tasks.Source(Path(dirs[st.name]), "run", recipe, pending=True)
                earlier = tuple(dirs[s.name] for s in target.stages[:i - 1])
                text = _render_recipe(recipe, profile, dirs[st.name], earlier)
                if text.startswith("# pre-flight refuses"):  # inside a pipeline's script: as comments
                    text = "".join(f"# {line}\n" if not line.startswith("#") else line + "\n" for line in text.splitlines())
                parts.append(text)
        return "".join(parts).replace(str(paths.data_dir("examples").parent), "/repo")  # shipped example paths: checkout-independent
    return _render_recipe(target, profile, f"/runs/{recipe_name}-{cluster_name}")


def _render_recipe(recipe, profile, run_dir, produced=()):
    pre = run_preflight(recipe, profile, produced=produced)
    if not pre.ok:
        return "# pre-flight refuses this pair\n" + "".join(f"{p.severity}: {p}\n" for p in pre.problems)
    return render(RenderInput(recipe, profile, pre.layout, run_dir, python="python3"))


@pytest.mark.parametrize("cluster_name", CLUSTERS)
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_golden(recipe_name, cluster_name, tmp_path):
    text = golden_text(recipe_name, cluster_name)
    path = GOLDEN / f"{recipe_name}__{cluster_name}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden {path.name}: run UPDATE_GOLDEN=1 pytest tests/test_render.py"
    assert text == path.read_text(), f"{path.name} changed: review the diff, then UPDATE_GOLDEN=1 pytest tests/test_render.py"
    if not text.startswith("# pre-flight refuses"):
        script = tmp_path / "job"
        script.write_text(text)
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_published_pairs_render():
    assert not golden_text("full_ft", "h100-8x64").startswith("# pre-flight refuses")
    assert not golden_text("lora", "h100-8x4").startswith("# pre-flight refuses")
    assert not golden_text("smoke", "local").startswith("# pre-flight refuses")
    assert golden_text("full_ft", "h100-8x4").startswith("# pre-flight refuses")


def test_sbatch_script_shape():
    text = golden_text("full_ft", "h100-8x64")
    for needle in ["#SBATCH --nodes=64", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=B:USR2@300", "--rdzv-backend=c10d",
                   "NodeAddr", "join_timeout=$RDZV_TIMEOUT", 'exit "$rc"', "trap on_usr2 USR2", "--kill-on-bad-exit=1"]:
        assert needle in text


def test_unquoted_strings_cannot_be_rendered():
    with pytest.raises(jinja2.TemplateError, match="unquoted value"):
        environment().from_string("echo {{ x }}").render(x="$(reboot)")
    assert environment().from_string("echo {{ x | q }} {{ n }}").render(x="$(reboot)", n=3) == "echo '$(reboot)' 3"


def _smoke(env=None, **profile_changes):
    recipe, _ = load_recipe("smoke")
    if env:
        recipe = dataclasses.replace(recipe, env=env)
    profile, _ = load_profile("local-slurm")
    profile = dataclasses.replace(profile, **profile_changes)
    pre = run_preflight(recipe, profile)
    return recipe, profile, pre


NASTY = "a b $(touch PWNED) `touch PWNED2` 'single' \"double\" ; | & > < \\ $HOME * ?"


@pytest.mark.parametrize("template_profile", ["local", "local-slurm"])
def test_shell_metacharacters_stay_literal(tmp_path, template_profile):
    recipe, _ = load_recipe("smoke")
    recipe = dataclasses.replace(recipe, env={"NASTY": NASTY})
    profile, _ = load_profile(template_profile)
    pre = run_preflight(recipe, profile)
    run_dir = str(tmp_path / "run")
    text = render(RenderInput(recipe, profile, pre.layout, run_dir, python="python3"))
    # Execute the environment part of the real script and read the value back.
    env_part = text[text.index("# ---- environment"):text.index("export MOE_LAUNCH_RUN_DIR")]
    out = subprocess.run(["bash", "-c", env_part + 'printf %s "$NASTY"'], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout == NASTY
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()


@pytest.mark.parametrize("change", [
    {"slurm.partition": "gpu; rm -rf /"},
    {"slurm.account": "a b"},
    {"slurm.time": "$(date)"},
    {"slurm.extra_flags": ["--reservation=r1 --x"]},
    {"slurm.extra_flags": ["reservation=r1"]},
])
def test_unsafe_sbatch_values_refused(change):
    recipe, profile, pre = _smoke()
    (key, value), = change.items()
    slurm = dataclasses.replace(profile.slurm, **{key.split(".")[1]: value})
    with pytest.raises(UserError) as exc:
        render(RenderInput(recipe, dataclasses.replace(profile, slurm=slurm), pre.layout, "/runs/x"))
    assert key in str(exc.value)


def test_run_dir_with_spaces_refused_for_sbatch():
    recipe, profile, pre = _smoke()
    with pytest.raises(UserError, match="run directory"):
        render(RenderInput(recipe, profile, pre.layout, "/runs/my run"))


def test_container_and_setup_lines():
    recipe, profile, pre = _smoke()
    profile = dataclasses.replace(profile, setup=["module load cuda/12.4", "source /opt/env.sh"],
                                  container=dataclasses.replace(profile.container, image="nvcr.io/nvidia/nemo:25.09", mounts=["/data:/data", "/ckpt:/ckpt"]))
    text = render(RenderInput(recipe, profile, pre.layout, "/runs/x"))
    assert "module load cuda/12.4\nsource /opt/env.sh\n" in text
    assert "--container-image=nvcr.io/nvidia/nemo:25.09" in text and "--container-mounts=/runs:/runs,/data:/data,/ckpt:/ckpt" in text
    assert "PYTHON=python\n" in text


def test_a_container_job_carries_moe_launch_code(tmp_path):
    """A container job mounts its run directory and runs the code snapshotted there (code/ on PYTHONPATH),
    whatever the image holds: the snapshot imports on its own."""
    import subprocess
    import sys

    prof = tmp_path / "box.yaml"
    prof.write_text("name: box\nexecutor: slurm\ndevice: cpu\nnodes: 1\ngpus_per_node: 2\n"
                    "gpu: {type: cpu, memory_gb: 8, peak_tflops: 1.0, assumed_mfu: 0.1}\ncontainer: {image: reg/img:1}\n")
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "smoke", "--cluster", str(prof), "--dry-run", "--runs-dir",
                          str(tmp_path / "runs")], cwd=paths.PACKAGE_DIR.parent, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    script = (run / "job.sbatch").read_text()
    assert f"--container-mounts={run.parent}:{run.parent}" in script  # the runs directory: earlier stages are visible too
    assert 'export PYTHONPATH="$RUN_DIR/code${PYTHONPATH:+:$PYTHONPATH}"' in script
    code = run / "code"
    assert (code / "nemo_backend" / "main.py").is_file() and (code / "trainer" / "main.py").is_file()
    assert "moe-launch" in (code / "SOURCE.json").read_text()
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import launcher.config_io, nemo_backend.recipe, model.config; " \
            "print(launcher.config_io.__file__, nemo_backend.recipe.__file__, model.config.__file__)"
    out = subprocess.run([sys.executable, "-c", probe, str(code)], cwd=tmp_path, capture_output=True, text=True).stdout.split()
    assert len(out) == 3 and all(f.startswith(str(code)) for f in out), out
