"""Values reach the job exactly as written: every channel, rendered and then executed by bash.

The rule per channel (README, "Values are literal"): profile and recipe env values may hold any
character, newlines included; other fields hold one line; nothing is interpolated (``${...}`` is text);
#SBATCH fields and a Slurm run directory keep to a safe character set; rdzv_host is a host name or address.
"""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher import cli, config_io
from launcher.recipe import Recipe

NASTY = ["$HOME", "${HOME}", "${oc.env:HOME}", "${name}", "`id`", "$(id)", "it's", 'say "hi"', "back\\slash \\${x}",
         "#SBATCH --wrap=x", "ünïcødé ✓ 日本", "; rm -rf / #", "--flag", "  spaces  ", "*", "~/x", "a=b", "'", ""]
MULTILINE = ["two\nlines", "\n#SBATCH --wrap=evil\n", "tab\there\r\n"]
CPU = "device: cpu\nnodes: 1\ngpus_per_node: 2\ngpu: {type: cpu, memory_gb: 8, peak_tflops: 1.0, assumed_mfu: 0.1}\n"


def bash_env(script: str, names: list[str]) -> dict:
    """Run ``script`` (assignments and exports from a rendered job) in bash; the named variables as it sees them."""
    dump = "import os, json; print(json.dumps({n: os.environ.get(n) for n in %r}))" % names
    res = subprocess.run(["bash", "-c", f"{script}\nexport {' '.join(names)}\npython3 -c {json.dumps(dump)}"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def shell_words(script: str, marker: str) -> list[str]:
    """The words bash makes of the script's line holding ``marker`` (a continued srun argument line)."""
    line = next(ln for ln in script.splitlines() if marker in ln).rstrip(" \\")
    return subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], capture_output=True, text=True).stdout.splitlines()


def env_block(script: str) -> str:
    """The rendered script's environment section (the export lines, multi-line values included)."""
    start = script.index("# ---- environment")
    return script[start:script.index("export MOE_LAUNCH_RUN_DIR", start)]


def dry_run(tmp_path, capsys, cluster, *overrides, runs=None):
    runs = runs or tmp_path / "runs"
    code = cli.main(["recipes/smoke.py", "--cluster", str(cluster), "--dry-run", "--runs-dir", str(runs), *overrides])
    out, err = capsys.readouterr()
    assert code == 0, err
    (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    return run, out


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_profile_and_recipe_env_values_reach_the_job_byte_for_byte(tmp_path, capsys, executor):
    profile_env = {f"P{i}": v for i, v in enumerate(NASTY + MULTILINE)}
    recipe_env = {f"R{i}": v for i, v in enumerate(NASTY + MULTILINE)}
    prof = tmp_path / "nasty.yaml"
    prof.write_text(f"name: nasty\nexecutor: {executor}\n{CPU}" + yaml.safe_dump({"env": profile_env}, allow_unicode=True))
    run, script = dry_run(tmp_path, capsys, prof, *[f"env.{k}={v}" for k, v in recipe_env.items()])
    assert script == (run / ("job.sh" if executor == "local" else "job.sbatch")).read_bytes().decode()
    seen = bash_env(env_block(script), [*profile_env, *recipe_env])
    assert seen == {**profile_env, **recipe_env}
    # what the job reads back (recipe.yaml, cluster.yaml) is the same text
    assert config_io.load_yaml_into(Recipe, run / "recipe.yaml").env == recipe_env
    assert yaml.safe_load((run / "cluster.yaml").read_text())["env"] == profile_env


def test_recipe_file_env_and_yaml_scalars_stay_text(tmp_path, capsys):
    """A recipe file's env and a profile's YAML scalars: 010 stays '010', on stays 'on', 1e-5 stays '1e-5'."""
    f = tmp_path / "r.py"
    f.write_text("from launcher.recipe import Recipe, Train, Data\n"
                 "def recipe():\n    return Recipe(name='r', train=Train(max_steps=2), data=Data(seq_length=64),"
                 " env={'A': '${HOME}', 'B': 22, 'C': 'x\\ny'})\n")
    prof = tmp_path / "p.yaml"
    prof.write_text(f"name: p\nexecutor: local\n{CPU}env:\n  N: 010\n  O: on\n  F: 1e-5\n  T: true\n  E: ''\n  H: ${{oc.env:HOME}}\n")
    runs = tmp_path / "runs"
    code = cli.main([str(f), "--cluster", str(prof), "--dry-run", "--runs-dir", str(runs), "model=tiny", "train.warmup_steps=1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    seen = bash_env(env_block(out), ["A", "B", "C", "N", "O", "F", "T", "E", "H"])
    assert seen == {"A": "${HOME}", "B": "22", "C": "x\ny", "N": "010", "O": "on", "F": "1e-5", "T": "true", "E": "", "H": "${oc.env:HOME}"}


@pytest.mark.parametrize("value", [v for v in NASTY if v.strip() and not v.startswith("--")])
def test_override_values_and_paths_are_literal(tmp_path, capsys, value):
    """Overrides of text fields (a path here) keep ${...}, quotes and backslashes; the job reads the same text."""
    run, _ = dry_run(tmp_path, capsys, "local", f"checkpoint.save_dir={value}", f"backend.container_image={value}")
    back = config_io.load_yaml_into(Recipe, run / "recipe.yaml")
    assert back.checkpoint.save_dir == value and back.backend.container_image == value


def test_run_dir_interpreter_and_container_fields_in_the_script(tmp_path, capsys):
    """Local: a runs directory with shell characters; Slurm: the interpreter, image, mounts and rendezvous host."""
    runs = tmp_path / "runs $(id) `x` 'q' ${HOME}"
    run, script = dry_run(tmp_path, capsys, "local", runs=runs)
    assert bash_env(script[script.index("RUN_DIR="):script.index("PROCS=")], ["RUN_DIR"]) == {"RUN_DIR": str(run)}

    prof = tmp_path / "s.yaml"
    image, mount, python = "reg.io/team/img:$TAG `x`", "/data/$(id) x:/data:ro", "/opt/my venv/${X}/python"
    prof.write_text(f"name: s\nexecutor: slurm\n{CPU}" + yaml.safe_dump(
        {"python": python, "container": {"image": image, "mounts": [mount, "/b:/b"]}, "slurm": {"rdzv_host": "head-0.cluster"}}))
    srun, script = dry_run(tmp_path / "s", capsys, prof)
    seen = bash_env(script[script.index("RUN_DIR="):script.index("# ---- environment")], ["PYTHON"])
    assert seen == {"PYTHON": python}
    assert shell_words(script, "--container-image=") == [f"--container-image={image}", "--no-container-mount-home"]
    runs = str(Path(srun).parent)  # the runs directory: a pipeline's earlier stages are visible in the container
    assert shell_words(script, "--container-mounts=") == [f"--container-mounts={runs}:{runs},{mount},/b:/b"]
    assert bash_env(next(ln for ln in script.splitlines() if ln.startswith("HEAD_ADDR=")).split("#")[0], ["HEAD_ADDR"]) == {"HEAD_ADDR": "head-0.cluster"}


def test_slurm_run_dir_outside_the_safe_set_is_refused(tmp_path, capsys):
    """#SBATCH --output holds the run directory and sbatch does not unquote: the rule is stated, not guessed."""
    prof = tmp_path / "s.yaml"
    prof.write_text(f"name: s\nexecutor: slurm\n{CPU}")
    code = cli.main(["recipes/smoke.py", "--cluster", str(prof), "--dry-run", "--runs-dir", str(tmp_path / "my runs")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot go on an #SBATCH line" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "my runs").exists()
