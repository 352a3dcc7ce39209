"""The nemo backend's job side, run in the project's NeMo venv (scripts/nemo_venv.sh; .ci/run builds it).

For every shipped recipe with backend.name=nemo: `launch --dry-run` writes a run directory, the job's
entry module builds the NeMo recipe from it (`python -m nemo_backend.main --config-only`, as the script starts it), and the built
recipe holds exactly the values our recipe and plan say (field by field, read back from NeMo's objects);
its readable YAML is a golden file; its JSON form deserialises to an equal recipe.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from launcher.config_io import load_yaml_into
from launcher.recipe import Recipe
from nemo_backend.recipe import data_values, peft_values, values

NEMO_PYTHON = Path(os.environ.get("MOE_LAUNCH_NEMO_PYTHON", ROOT / ".nemo-venv" / "bin" / "python"))
pytestmark = pytest.mark.skipif(not NEMO_PYTHON.exists(), reason="no NeMo venv (bash scripts/nemo_venv.sh)")
GOLDEN = ROOT / "tests" / "golden" / "nemo"
NEMO = ["backend.name=nemo", "backend.container_image=nvcr.io/nvidia/nemo:25.09"]
CASES = {"full_ft": ("h100-8x64", []), "lora": ("h100-8x64", []), "full_ft_16b": ("h100-8x4", []),
         "pretrain": ("h100-8x4", []), "pretrain_671b": ("h100-8x64", ["parallel.ep=32"]),
         "full_ft_cp2": ("h100-8x64", ["parallel.cp=2"])}  # a variant: recipe name before the first "_cp"

# Runs in the NeMo venv: build each run directory's recipe through the entry module, read every field back.
READ_BACK = """
import json, sys, types
from pathlib import Path
import fiddle as fdl
from nemo.collections.llm.api import _validate_config
from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer
from nemo_backend.main import write_config
from nemo_backend.recipe import get_path
out = {}
for run_dir, keys in json.loads(sys.argv[1]).items():
    r = write_config(Path(run_dir))
    got = {k: get_path(r, k) for k in keys}
    got["data"] = {k: getattr(r.data, k) for k in ("dataset_root", "paths", "seq_length", "micro_batch_size",
                   "global_batch_size", "seed", "dataset_kwargs", "split", "index_mapping_dir") if hasattr(r.data, k)}
    peft = getattr(r, "peft", None) if "peft" in r.__arguments__ else None
    got["peft"] = None if peft is None else {k: getattr(peft, k) for k in ("dim", "alpha", "dropout", "target_modules")}
    back = ZlibJSONSerializer().deserialize((Path(run_dir) / "nemo_recipe.json").read_text())
    got["json_equal"] = back == r
    got["fn"] = r.__fn_or_cls__.__name__
    # NeMo's own pre-training checks (llm.finetune/pretrain run them first; here on the config, no GPU):
    # DP/GBS divisibility, TP/SP, PP dtype, CP (seq_length % 2CP, per-token loss for SFT), EP vs experts
    cls = r.data.__fn_or_cls__
    data = cls.__new__(cls)
    for k in ("micro_batch_size", "global_batch_size", "seq_length"):
        setattr(data, k, getattr(r.data, k))
    trainer = types.SimpleNamespace(strategy=fdl.build(r.trainer.strategy), num_devices=r.trainer.devices,
                                    num_nodes=r.trainer.num_nodes)
    try:
        _validate_config(fdl.build(r.model), data, trainer)
        got["nemo_validates"] = True
    except AssertionError as exc:
        got["nemo_validates"] = str(exc)
    out[run_dir] = got
print("RESULT " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{recipe name: (run dir, what the NeMo venv read back)} for every case, in one NeMo process."""
    base = tmp_path_factory.mktemp("nemo")
    runs = {}
    for name, (cluster, extra) in CASES.items():
        root = base / name
        res = subprocess.run([sys.executable, "-m", "launcher.cli", name.split("_cp")[0], "--cluster", cluster, "--dry-run", "--runs-dir",
                              str(root), *NEMO, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        (run,) = [p for p in root.iterdir() if not p.name.startswith(".")]
        assert "-m nemo_backend.main --run-dir" in (run / "job.sbatch").read_text()
        runs[name] = run
    keys = {str(run): list(expected(run)) for run in runs.values()}
    res = subprocess.run([str(NEMO_PYTHON), "-c", READ_BACK, json.dumps(keys)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    return {name: (run, result[str(run)]) for name, run in runs.items()}


def expected(run: Path) -> dict:
    recipe = load_yaml_into(Recipe, run / "recipe.yaml")
    return values(recipe, yaml.safe_load((run / "plan.yaml").read_text()), str(run))


@pytest.mark.parametrize("name", list(CASES))
def test_nemo_recipe_has_our_values_field_by_field(built, name):
    run, got = built[name]
    recipe = load_yaml_into(Recipe, run / "recipe.yaml")
    want = expected(run)
    wrong = {k: (v, got[k]) for k, v in want.items() if got[k] != (str(v) if isinstance(v, float) and k.endswith("precision") else v)
             and not (isinstance(v, float) and isinstance(got[k], (int, float)) and abs(got[k] - v) <= 1e-12 * max(abs(v), 1))}
    assert not wrong, wrong
    assert got["fn"] == ("pretrain" if recipe.data.kind == "pretrain" else "finetune")
    data = data_values(recipe, str(run))
    for k, v in data.items():
        assert got["data"][k] == v, k
    assert got["peft"] == peft_values(recipe)
    assert got["json_equal"] is True
    assert got["nemo_validates"] is True, got["nemo_validates"]


@pytest.mark.parametrize("name", list(CASES))
def test_nemo_recipe_yaml_is_golden(built, name):
    run, _ = built[name]
    text = (run / "nemo_recipe.yaml").read_text().replace(str(run), f"/runs/{name}")
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path.name}: run UPDATE_GOLDEN=1 pytest tests/test_nemo_backend.py"
    assert text == path.read_text(), f"{path.name} changed: review the diff, then UPDATE_GOLDEN=1 pytest tests/test_nemo_backend.py"


DATA_MODULE = """
import json, sys
import fiddle as fdl, nemo_run as run
from nemo.collections import llm
from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
from nemo_backend.recipe import PROMPT_TEMPLATES
data, tok = sys.argv[1], sys.argv[2]
out = {}
for name in ("chatml", "plain"):
    dm = fdl.build(run.Config(llm.FineTuningDataModule, dataset_root=data, seq_length=64, micro_batch_size=1, global_batch_size=2,
                              seed=1, tokenizer=run.Config(AutoTokenizer, pretrained_model_name=tok),
                              dataset_kwargs={"prompt_template": PROMPT_TEMPLATES[name], "label_key": "output",
                                              "answer_only_loss": True, "truncation_field": "input"}))
    ds = dm._create_dataset(dm.train_path, **dm.dataset_kwargs)
    batch = ds.collate_fn([ds[0]])
    out[name] = {k: batch[k][0].tolist() for k in ("tokens", "labels", "loss_mask")}
print("RESULT " + json.dumps(out))
"""


def test_nemo_data_module_reads_our_sft_directory_with_our_answer_tokens(tmp_path):
    """NeMo's FineTuningDataModule (real, on CPU) on our JSONL with a local tokenizer: the tokens it trains on
    (loss_mask 1) are our answer tokens; plain equals ours (NeMo adds no bos), chatml ends with eos in NeMo."""
    from trainer.chat import JINJA, render_chat
    from trainer.tokenizer import load_tokenizer, write_hf_tokenizer

    tok_dir, data = tmp_path / "tok", tmp_path / "sft"
    tok_dir.mkdir()
    data.mkdir()
    write_hf_tokenizer("byte", tok_dir, JINJA["chatml"], 1024)
    for split in ("training", "validation", "test"):
        (data / f"{split}.jsonl").write_text('{"input": "What is 2+3?", "output": "5"}\n{"input": "Capital of France?", "output": "Paris"}\n')
    res = subprocess.run([str(NEMO_PYTHON), "-c", DATA_MODULE, str(data), str(tok_dir)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    tok = load_tokenizer(str(tok_dir))
    for name in ("chatml", "plain"):
        prompt, answer = render_chat(name, "What is 2+3?", "5", tok)
        tokens, labels, mask = got[name]["tokens"], got[name]["labels"], got[name]["loss_mask"]
        trained = [t for t, m in zip(labels, mask) if m]  # the targets the loss covers
        assert tokens[:len(prompt) - 1] == prompt[1:], name  # the prompt, without our bos
        if name == "plain":
            assert trained == answer
        else:
            assert trained == answer[:-2] + [tok.eos_id]  # "<|im_end|>\n" in ours, eos in NeMo's


REQUEUE = """
import os, signal, sys, types
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
from nemo_backend.requeue import RequeueOnSignal
saved = []
ckpt = types.SimpleNamespace(_monitor_candidates=lambda t: {}, _save_last_checkpoint=lambda t, m: saved.append(1))
trainer = types.SimpleNamespace(should_stop=False, checkpoint_callback=ckpt, strategy=types.SimpleNamespace(checkpoint_io=None))
cb = RequeueOnSignal()
cb.on_train_start(trainer, None)
cb.on_train_batch_end(trainer, None, None, None, 0)  # no signal: training goes on
assert not trainer.should_stop and not saved
os.kill(os.getpid(), signal.SIGTERM if sys.argv[2] == "TERM" else signal.SIGUSR2)
try:
    cb.on_train_batch_end(trainer, None, None, None, 1)
except SystemExit as e:
    print("EXIT", e.code, trainer.should_stop, len(saved))
"""


@pytest.mark.parametrize("sig", ["USR2", "TERM"])
def test_nemo_trainer_checkpoints_and_exits_75_on_usr2_and_term(sig):
    """Our requeue protocol in NeMo's trainer (a Lightning callback): at the end of the step after the
    signal, save the last checkpoint and exit 75 (NeMo's own PreemptionCallback exits 0, one signal)."""
    res = subprocess.run([str(NEMO_PYTHON), "-c", REQUEUE, str(free_port()), sig], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "EXIT 75 True 1" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


def test_megatron_model_our_job_configures_trains_a_step_on_cpu(tmp_path):
    """The tiny model, `launch`ed with backend.name=nemo: the Megatron DeepSeek model NeMo would build from the
    job's recipe (r.model.config) has exactly our parameter count (MTP included) and runs forward and
    backward on CPU (tests/nemo_scripts/megatron_cpu.py; the CUDA-only calls it patches are listed there):
    loss ~ ln(vocab) at init, a finite non-zero gradient on every parameter (experts and routers too)."""
    from model.presets import tiny
    from trainer.chat import JINJA
    from trainer.tokenizer import write_hf_tokenizer

    tok, data, runs = tmp_path / "tok", tmp_path / "sft", tmp_path / "runs"
    tok.mkdir()
    data.mkdir()
    write_hf_tokenizer("byte", tok, JINJA["chatml"], 1024)
    for split in ("training", "validation", "test"):
        (data / f"{split}.jsonl").write_text('{"input": "What is 2+3?", "output": "5"}\n')
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "smoke", "--cluster", gpu_profile(tmp_path), "--dry-run", "--runs-dir",
                          str(runs), *NEMO, f"data.tokenizer={tok}", f"data.path={data}", "data.packing=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    res = subprocess.run([str(NEMO_PYTHON), str(ROOT / "tests" / "nemo_scripts" / "megatron_cpu.py"), str(run), str(free_port())],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    cfg = tiny()
    assert got["numel"] == cfg.num_params(include_mtp=True)
    assert got["num_layers"] == cfg.num_hidden_layers and got["mtp"] == cfg.num_nextn_predict_layers
    assert got["moe_layer_freq"] == [int(cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)]
    assert abs(got["loss"] - got["ln_vocab"]) < 0.3
    assert got["no_grad"] == [] and got["zero_grad"] == [] and got["experts"] > 0 and got["router"] > 0


def gpu_profile(tmp_path: Path, nodes: int = 1, gpus: int = 2) -> str:
    """A small Slurm GPU cluster profile (the nemo backend trains on GPUs only); returns its path."""
    path = tmp_path / "gpu.yaml"
    path.write_text(f"name: gpu\nexecutor: slurm\ndevice: cuda\nnodes: {nodes}\ngpus_per_node: {gpus}\n"
                    "gpu: {type: H100-80GB, memory_gb: 80, peak_tflops: 989, assumed_mfu: 0.35}\nslurm: {partition: gpu}\n")
    return str(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRETRAIN_DATA = """
import json, sys
import numpy as np
from nemo_backend.data import index_token_file
out = {}
for name, token_file in json.loads(sys.argv[1]).items():
    prefix = sys.argv[2] + "/" + name
    out[name] = {"indexed": index_token_file(token_file, prefix)}
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    out[name]["docs"] = [ds[i].tolist() for i in range(len(ds))]
    out[name]["dtype"] = np.dtype(ds.index.dtype).name
# NeMo's PreTrainingDataModule (real: Megatron's GPTDataset builder) on the indexed file, as our job configures it
from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule
from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
dm = PreTrainingDataModule(paths=[sys.argv[2] + "/uint16"], seq_length=16, micro_batch_size=2, global_batch_size=4,
                           seed=1, split="100,0,0", index_mapping_dir=sys.argv[2] + "/index",
                           tokenizer=AutoTokenizer(pretrained_model_name=sys.argv[3]), num_workers=0)
dm.build(trainer_max_steps=3, trainer_val_check_interval=3, trainer_limit_val_batches=0, trainer_limit_test_batches=0)
sample = dm._train_ds[0]
out["sample"] = {"tokens": sample["tokens"].tolist(), "labels": sample["labels"].tolist(), "train_len": len(dm._train_ds)}
print("RESULT " + json.dumps(out))
"""


def test_nemo_pretraining_reads_our_token_file_through_megatrons_index(tmp_path):
    """A token file from `launch data tokens` (uint16, and uint32 as a big vocabulary writes it) indexed for
    Megatron by the job (nemo_backend.data): Megatron's IndexedDataset reads back exactly our documents
    (our FILE.idx offsets; or split after eos without it); NeMo's PreTrainingDataModule builds its GPTDataset on
    it and its samples are our tokens with labels shifted by one."""
    import numpy as np

    from dataprep.token_file import index_path, open_tokens, read_document_offsets, read_sidecar, sidecar_path, sidecar_text
    from trainer.chat import JINJA
    from trainer.tokenizer import write_hf_tokenizer

    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i}: " + "lorem ipsum " * (i % 5 + 1)}) + "\n" for i in range(40)))
    files = {"uint16": tmp_path / "uint16.bin"}
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "data", "tokens", str(text), "--out", str(files["uint16"]),
                          "--tokenizer", "byte", "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    tokens, meta = open_tokens(files["uint16"])
    offsets = read_document_offsets(files["uint16"])
    docs = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    # the same documents as uint32 without an offsets file: split after each eos
    files["uint32"] = tmp_path / "uint32.bin"
    np.asarray(tokens, dtype=np.uint32).tofile(files["uint32"])
    sidecar_path(files["uint32"]).write_text(sidecar_text({**read_sidecar(files["uint16"]), "dtype": "uint32"}))
    assert not index_path(files["uint32"]).exists()
    tok = tmp_path / "tok"
    tok.mkdir()
    write_hf_tokenizer("byte", tok, JINJA["chatml"], 1024)
    res = subprocess.run([str(NEMO_PYTHON), "-c", PRETRAIN_DATA, json.dumps({k: str(v) for k, v in files.items()}),
                          str(tmp_path / "nemo"), str(tok)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    for name in files:
        assert got[name]["indexed"] == len(docs) == 40 and got[name]["docs"] == docs, name
    assert got["uint16"]["dtype"] == "uint16" and got["uint32"]["dtype"] == "int32"
    assert (tmp_path / "nemo" / "uint16.bin").resolve() == files["uint16"].resolve()  # linked, not copied
    sample, stream = got["sample"], tokens.tolist()
    assert sample["train_len"] >= 12 and len(sample["tokens"]) == 16 and sample["labels"][:-1] == sample["tokens"][1:]
    assert all(t in set(stream) for t in sample["tokens"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("uint")) == [
        "uint16.bin", "uint16.bin.idx", "uint16.bin.json", "uint32.bin", "uint32.bin.json"]  # the user's files untouched
    assert meta["eos_id"] in stream


def test_the_jobs_command_line_runs_from_the_code_snapshot(built):
    """The full_ft job as rendered: its entry module, started as the script starts it (`python -m nemo_backend.main
    --run-dir RUN_DIR`), with only the run directory's code snapshot on PYTHONPATH (as in NeMo's container) and
    outside the checkout, builds the recipe (--config-only) and writes what NeMo is asked to do."""
    run, _ = built["full_ft"]
    script = (run / "job.sbatch").read_text()
    assert '-m nemo_backend.main --run-dir "$RUN_DIR"' in script
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(NEMO_PYTHON), "-m", "nemo_backend.main", "--run-dir", str(run), "--config-only"], cwd="/",
                         capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": str(run / "code")})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"wrote {run / 'nemo_recipe.yaml'}" in res.stdout
    assert "nemo_backend.requeue.RequeueOnSignal" in (run / "nemo_recipe.yaml").read_text()


def test_trackers_become_nemo_loggers(tmp_path):
    """tracking.wandb / tracking.mlflow on the nemo backend: NeMoLogger's WandbLogger (offline by default, one W&B run
    per run directory) and MLFlowLogger (file store in the run directory) with the native trainer's settings; a
    tracker whose package the environment lacks is a warning, and the job goes on without it."""
    from launcher.tracking import wandb_run_id

    res = subprocess.run([sys.executable, "-m", "launcher.cli", "lora", "--cluster", "h100-8x64", "--dry-run", "--runs-dir",
                          str(tmp_path), *NEMO, "tracking.wandb=true", "tracking.wandb_project=dsv3", "tracking.mlflow=true"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    (run,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    res = subprocess.run([str(NEMO_PYTHON), "-m", "nemo_backend.main", "--run-dir", str(run), "--config-only"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    text = (run / "nemo_recipe.yaml").read_text()
    log = yaml.safe_load(text)["log"]
    wandb = log["wandb"]
    assert wandb["_target_"].endswith("WandbLogger") and wandb["project"] == "dsv3" and wandb["offline"] is True
    assert wandb["id"] == wandb_run_id(run) and wandb["save_dir"] == str(run)
    has_mlflow = subprocess.run([str(NEMO_PYTHON), "-c", "import mlflow"], capture_output=True).returncode == 0
    if has_mlflow:
        (mlf,) = [x for x in log["extra_loggers"] if x["_target_"].endswith("MLFlowLogger")]
        assert mlf["tracking_uri"] == (run / "mlruns").as_uri()
    else:
        assert "moe-launch: warning: tracker mlflow: the mlflow package is not in this environment" in res.stdout
        assert "MLFlowLogger" not in text
