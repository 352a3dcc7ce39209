"""The bad-input corpus: every wrong value, file or option is refused with exit 2 and one line that names
the field or file and what would be valid; no traceback, nothing written, no advice that cannot help.

Each case is (argv, files to create, words the one error line must contain). ``{t}`` in argv and files is
the case's temporary directory; profiles written there are given to --cluster by path.
"""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from launcher import cli

GOOD_PROFILE = "executor: local\ndevice: cpu\nnodes: 1\ngpus_per_node: 2\ngpu: {type: cpu, memory_gb: 8, peak_tflops: 1.0, assumed_mfu: 0.1}\n"
SLURM_PROFILE = "executor: slurm\ndevice: cpu\nnodes: 1\ngpus_per_node: 2\ngpu: {type: cpu, memory_gb: 8, peak_tflops: 1.0, assumed_mfu: 0.1}\n"


def launch(*overrides, cluster="local"):
    return ["recipes/smoke.py", "--cluster", cluster, "--dry-run", "--runs-dir", "{t}/runs", *overrides]


def profile(body, name="p", base=GOOD_PROFILE):
    """argv and files for a launch on a profile file ``{t}/<name>.yaml`` holding ``base`` + ``body``."""
    return launch(cluster=f"{{t}}/{name}.yaml"), {f"{name}.yaml": f"name: {name}\n{base}{body}"}


RECIPE_VALUES = [
    ("train.lr=0", "train.lr: must be > 0 and < 1, got 0.0"),
    ("train.lr=-1e-5", "train.lr: must be > 0"),
    ("train.lr=nan", "train.lr: expected a finite number"),
    ("train.lr=inf", "train.lr: expected a finite number"),
    ("train.lr=[1,2]", "train.lr: expected a finite number"),
    ("train.min_lr=0.5", "train.min_lr: 0.5 is above train.lr"),
    ("train.max_steps=0", "train.max_steps: must be >= 1"),
    ("train.max_steps=1.5", "train.max_steps: expected an integer"),
    ("train.global_batch_size=0", "train.global_batch_size: must be >= 1"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be >= 1"),
    ("train.adam_beta2=1", "train.adam_beta2: must be >= 0 and < 1"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip: must be >= 0"),
    ("train.log_interval=0", "train.log_interval: must be >= 1"),
    ("train.eval_interval=-5", "train.eval_interval: must be >= 0"),
    ("train.seed=-1", "train.seed: must be >= 0"),
    ("train.precision=fp8", "train.precision: 'fp8' is not valid; choose one of bf16, fp32"),
    ("data.seq_length=0", "data.seq_length: must be >= 2"),
    ("data.kind=text", "data.kind: 'text' is not valid; choose one of sft, pretrain"),
    ("checkpoint.interval=0", "checkpoint.interval: must be >= 1"),
    ("checkpoint.keep=0", "checkpoint.keep: must be >= 1"),
    ("parallel.tp=0", "parallel.tp: must be >= 1"),
    ("parallel.ep=-2", "parallel.ep: must be >= 1"),
    ("parallel.sp=maybe", "parallel.sp: expected true or false"),
    ("peft.dropout=1.5", "peft.dropout: must be >= 0 and < 1"),
    ("peft.rank=0", "peft.rank: must be >= 1"),
    ("model.hidden_size=0", "model.hidden_size: must be >= 1"),
    ("model.num_attention_heads=0", "model.num_attention_heads: must be >= 1"),
    ("model.rms_norm_eps=0", "model.rms_norm_eps: must be > 0"),
    ("model.qk_rope_head_dim=7", "model.qk_rope_head_dim: 7 must be even"),
    ("model.n_group=0", "model.n_group: must be >= 1"),
    ("model.num_experts_per_tok=0", "model.num_experts_per_tok: must be >= 1"),
    ("model.routed_scaling_factor=0", "model.routed_scaling_factor: must be > 0"),
    ("model.rope_scaling.factor=0.5", "model.rope_scaling.factor: must be >= 1"),
    ("name=../evil", "name: '../evil' is not valid; use 1-64 letters"),
    ("name=a b", "name: 'a b' is not valid"),
    ("env.1X=a", "env.1X: not a valid environment variable name"),
    ("env.X.Y=a", "env.X.Y: 'env' maps names to values"),
    ("data.path=a\nb", "data.path: contains a newline"),
    ("train.max_stepz=3", "train.max_stepz: unknown key in 'train'; valid keys:"),
    ("train=3", "train: is a section; set its keys"),
    ("model=llama", "model: unknown model preset 'llama'; valid: deepseek-v3"),
    ("peft.targets=q_a_proj", "peft.targets: expected a list like [a,b]"),
    ("train.max_steps", "'train.max_steps' is not of the form key=value"),
]

CASES = [pytest.param(launch(o), {}, w, id=o.replace("\n", "\\n")) for o, w in RECIPE_VALUES] + [
    # profiles: containers of the wrong kind, ranges, names that become paths, Slurm fields
    pytest.param(*profile("env: FOO=bar\n"), "p.yaml: env: expected a mapping of names to values; got 'FOO=bar'", id="profile-env-string"),
    pytest.param(*profile("env: [a, b]\n"), "p.yaml: env: expected a mapping", id="profile-env-list"),
    pytest.param(*profile("setup: echo hi\n"), "p.yaml: setup: expected a list", id="profile-setup-string"),
    pytest.param(*profile("slurm: gpu\n"), "p.yaml: slurm: expected a mapping of partition", id="profile-slurm-string"),
    pytest.param(*profile("container: [a]\n"), "p.yaml: container: expected a mapping", id="profile-container-list"),
    pytest.param(*profile("", base="executor: local\ndevice: cpu\ngpu: [1, 2]\n"), "p.yaml: gpu: expected a mapping", id="profile-gpu-list"),
    pytest.param(*profile("", base=GOOD_PROFILE.replace("memory_gb: 8", "memory_gb: -80")), "p.yaml: gpu.memory_gb: must be > 0", id="memory-negative"),
    pytest.param(*profile("", base=GOOD_PROFILE.replace("peak_tflops: 1.0", "peak_tflops: 0")), "p.yaml: gpu.peak_tflops: must be > 0", id="peak-zero"),
    pytest.param(*profile("", base=GOOD_PROFILE.replace("assumed_mfu: 0.1", "assumed_mfu: 0")), "p.yaml: gpu.assumed_mfu: must be > 0 and <= 1", id="mfu-zero"),
    pytest.param(*profile("", base=GOOD_PROFILE.replace("assumed_mfu: 0.1", "assumed_mfu: 35")), "gpu.assumed_mfu: must be > 0 and <= 1, got 35", id="mfu-percent"),
    pytest.param(*profile("", base=GOOD_PROFILE.replace("nodes: 1", "nodes: 0")), "p.yaml: nodes: must be >= 1", id="nodes-zero"),
    pytest.param(*profile("slurm: {cpus_per_task: -4}\n"), "p.yaml: slurm.cpus_per_task: must be >= 1", id="cpus-negative"),
    pytest.param(*profile("slurm: {time: forever}\n"), "slurm.time: 'forever' is not a Slurm time limit", id="slurm-time"),
    pytest.param(*profile("slurm: {rdzv_host: '${HOME}'}\n"), "slurm.rdzv_host: '${HOME}' is not a host name", id="rdzv-host"),
    pytest.param(*profile("slurm: {partition: 'gpu; reboot'}\n", base=SLURM_PROFILE), "slurm.partition: 'gpu; reboot' cannot go on an #SBATCH line", id="sbatch-partition"),
    pytest.param(*profile("container: {mounts: ['/a,/b:/c']}\n"), "container.mounts[0]: '/a,/b:/c' is not src:dst[:flags]", id="mounts-comma"),
    pytest.param(*profile("gpu: {memory_gb: lots}\n", base="executor: local\ndevice: cpu\n"), "gpu.memory_gb: expected a finite number", id="memory-text"),
    pytest.param(*profile("nodez: 4\n"), "p.yaml: nodez: unknown key; valid keys: name, description", id="profile-unknown-key"),
    pytest.param(launch(cluster="{t}/p.yaml"), {"p.yaml": "name: ../../evil\n" + GOOD_PROFILE},
                 "p.yaml: name: '../../evil' is not valid", id="profile-name-escapes"),
    pytest.param(launch(cluster="{t}/p.yaml"), {"p.yaml": "name: other\n" + GOOD_PROFILE},
                 "p.yaml: name: profile file p.yaml declares name 'other'; make it 'p'", id="profile-name-not-file"),
    pytest.param(launch(cluster="{t}/p.yaml"), {"p.yaml": "name: p\nnodes: [\n"}, "p.yaml: not valid YAML line", id="profile-bad-yaml"),
    pytest.param(launch(cluster="{t}/p.yaml"), {"p.yaml": ""}, "p.yaml: must be a YAML mapping", id="profile-empty"),
    pytest.param(launch(cluster="{t}/p.yaml"), {"p.yaml": b"name: p\nx: \xff\xfe\n"}, "p.yaml: not UTF-8 text", id="profile-not-utf8"),
    pytest.param(launch(cluster="{t}/nope.yaml"), {}, "--cluster: no such file", id="profile-missing"),
    pytest.param(launch(cluster="h100-9x9"), {}, "--cluster: unknown cluster 'h100-9x9'; known:", id="profile-unknown"),
    # recipe files
    pytest.param(["{t}/r.py", "--cluster", "local", "--dry-run", "--runs-dir", "{t}/runs"],
                 {"r.py": "from launcher.recipe import Recipe, Train\ndef recipe():\n    return Recipe(name='r', train=Train(lr=0.0))\n"},
                 "train.lr: must be > 0", id="recipe-file-lr-zero"),
    pytest.param(["{t}/r.py", "--cluster", "local", "--dry-run", "--runs-dir", "{t}/runs"],
                 {"r.py": "from launcher.recipe import Recipe\ndef recipe():\n    return Recipe(name='r', env={'X': True})\n"},
                 "env.X: expected text; got True", id="recipe-file-env-bool"),
    pytest.param(["nope.py", "--cluster", "local", "--dry-run"], {}, "RECIPE: no recipe file 'nope.py'; shipped recipes:", id="recipe-missing"),
    # paths and data: errors no other cluster fixes (and no "what would fit" advice)
    pytest.param(launch("data.path={t}/none"), {}, "data.path: {t}/none does not exist", id="data-missing"),
    pytest.param(launch("data.path={t}/d"), {"d/training.jsonl": '{"input": "a", "answer": "b"}\n'},
                 "d/training.jsonl: line 1: needs string fields 'input' and 'output'", id="data-schema"),
    pytest.param(launch("data.path={t}/d"), {"d/training.jsonl": '{"input": "a", "output": 3}\n'},
                 "d/training.jsonl: line 1: fields 'input' and 'output' must be strings", id="data-types"),
    pytest.param(launch("data.path={t}/d"), {"d/training.jsonl": '{"input": "a", "output": "b"}\n{oops\n'},
                 "d/training.jsonl: line 2: invalid JSON", id="data-json"),
    pytest.param(launch("data.path={t}/d"), {"d/validation.jsonl": '{"input": "a", "output": "b"}\n'},
                 "data.path: {t}/d has no training.jsonl", id="data-no-training"),
    pytest.param(launch("data.path={t}/d", "train.eval_interval=2"), {"d/training.jsonl": '{"input": "a", "output": "b"}\n'},
                 "train.eval_interval: {t}/d has no validation.jsonl to validate on", id="data-no-validation"),
    pytest.param(launch("checkpoint.load=no-such-run"), {}, "checkpoint.load:", id="load-missing"),
    # launch plan: bad input is exit 2 with no plan, not "does not fit"
    pytest.param(["plan", "recipes/smoke.py", "--cluster", "local", "train.lr=0"], {}, "train.lr: must be > 0", id="plan-lr"),
    pytest.param(["plan", "recipes/smoke.py", "--cluster", "{t}/p.yaml", "--search"],
                 {"p.yaml": "name: p\n" + GOOD_PROFILE.replace("peak_tflops: 1.0", "peak_tflops: -1")}, "gpu.peak_tflops: must be > 0", id="plan-peak"),
    pytest.param(["plan", "recipes/smoke.py", "--cluster", "local", "--nodes", "0"], {}, "--nodes: must be >= 1", id="plan-nodes"),
    pytest.param(["plan", "recipes/smoke.py", "--cluster", "local", "--max-nodes", "0", "--search"], {}, "--max-nodes: must be >= 1", id="plan-max-nodes"),
    pytest.param(["plan", "recipes/smoke.py", "--cluster", "local", "--top", "0"], {}, "--top: must be >= 1", id="plan-top"),
    # the nemo backend: what its mapping cannot express, refused before queueing
    *[pytest.param(["lora", "--cluster", "h100-8x64", "--dry-run", "--runs-dir", "{t}/runs", "backend.name=nemo",
                    "backend.container_image=nvcr.io/nvidia/nemo:25.09", o], {}, w, id=f"nemo-{o.split('=')[0]}")
      for o, w in (("peft.targets=[q_a_proj,gate_proj]", "peft.targets: gate_proj: NeMo's DeepSeek LoRA adapts the attention projections only"),
                   ("train.lr_schedule=linear", "train.lr_schedule: linear: the nemo backend maps the cosine schedule only"),
                   ("parallel.pp_schedule=gpipe", "parallel.pp_schedule: Megatron runs 1f1b or interleaved_1f1b"),
                   ("checkpoint.save_dir=/ckpt", "checkpoint.save_dir: NeMo writes checkpoints under RUN/nemo"),
                   ("data.tokenizer=byte", "data.tokenizer: the nemo backend needs a Hugging Face tokenizer"),
                   ("checkpoint.load_format=dcp", "checkpoint.load_format: dcp: NeMo restores NeMo checkpoints"))],
    pytest.param(["smoke", "--cluster", "local", "--dry-run", "--runs-dir", "{t}/runs", "checkpoint.load={t}",
                  "checkpoint.load_format=nemo"], {}, "checkpoint.load_format: nemo: the native trainer reads", id="native-load-nemo"),
    # following runs
    pytest.param(["status", "no-such-run", "--runs-dir", "{t}/runs"], {}, "RUN: 'no-such-run' is not a run directory, a run under {t}/runs, or the job id of one", id="status-missing"),
    pytest.param(["list", "--since", "yesterday", "--runs-dir", "{t}/runs"], {}, "--since: 'yesterday' is not a date", id="list-since"),
    pytest.param(["list", "--limit", "-1", "--runs-dir", "{t}/runs"], {}, "--limit: must be >= 0", id="list-limit"),
    pytest.param(["resume", "no-such-run", "--runs-dir", "{t}/runs"], {}, "RUN: 'no-such-run' is not a run directory", id="resume-missing"),
    pytest.param(["export", "no-such-run", "--cluster", "local", "--runs-dir", "{t}/runs"], {}, "no-such-run", id="export-missing"),
    pytest.param(launch("--sweep", "train.lr="), {}, "--sweep: 'train.lr=' is not key=v1,v2", id="sweep-empty"),
]


def _fill(text, t):
    return text.replace("{t}", str(t)) if isinstance(text, str) else text


@pytest.mark.parametrize("argv, files, words", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, files, words):
    for name, body in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body) if isinstance(body, bytes) else path.write_text(_fill(body, tmp_path))
    before = sorted(p for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)  # shipped recipes are found from anywhere; nothing may land in the working directory
    code = cli.main([_fill(a, tmp_path) for a in argv])  # an exception escaping here is a traceback: the test fails
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("launch: error: "), err
    assert _fill(words, tmp_path) in lines[0], lines[0]
    assert "what would fit" not in err and "fewest nodes" not in out and out == ""
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no run directory, no staging, nothing


@pytest.mark.parametrize("module", ["trainer.main", "export.main", "generation.main", "evaluation.main"])
def test_job_entry_points_refuse_a_bad_run_dir_in_one_line(tmp_path, module):
    """The job side: a missing or corrupt run directory is one line and exit 2 (the job's EXIT_CODE says it)."""
    pytest.importorskip("torch")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "plan.yaml").write_text("layout: {tp: 0}\n")
    (corrupt / "recipe.yaml").write_text("train: [\n")
    (corrupt / "cluster.yaml").write_text("name: x\n")
    (corrupt / "task.yaml").write_text("kind: [\n")
    for run_dir, words in ((tmp_path / "missing", "is not a run directory written by launch"),
                           (corrupt, "corrupt/" if module == "trainer.main" else "corrupt")):
        res = subprocess.run([sys.executable, "-m", module, "--run-dir", str(run_dir)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("moe-launch: error: rank 0") and words in lines[0], res.stderr


def test_list_into_a_closed_pipe_is_quiet(tmp_path):
    """`launch list | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    for i in range(3):
        run = tmp_path / f"20261202-10000{i}-smoke-local"
        run.mkdir(parents=True)
        (run / "meta.yaml").write_text("dry_run: false\n")
    p = subprocess.Popen([sys.executable, "-m", "launcher.cli", "list", "--runs-dir", str(tmp_path)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read().decode()
    p.wait(timeout=30)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
