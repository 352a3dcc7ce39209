"""`launch export`: a checkpoint of any training layout -> the hub's DeepSeek-V3 layout, byte for byte;
loadable by transformers (full, merged) and peft (adapters); memory bounded by a shard; bad input refused.

The training runs are shared with tests/test_trainer.py (the `trained` fixture trains each once).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT

transformers = pytest.importorskip("transformers")

LAYOUTS = [
    ("dp2", 2, ["parallel.ep=1"]),
    ("ep2", 2, ["parallel.ep=2"]),
    ("tp2-sp-mtp", 2, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=1"]),
    ("pp2-mtp", 2, ["parallel.pp=2", "parallel.ep=1"]),
]
LORA_MLA = ["peft.method=lora", "peft.rank=4", "train.lr=5e-3"]  # the default targets: the MLA projections


def launch(env, *args, expect=0, timeout=300):
    res = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env[0], capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == expect, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def consolidated(run):
    """The checkpoint's model tensors, gathered by DCP's own single-file converter (the oracle)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (step,) = sorted((run / "checkpoints").glob("step-*"))[-1:]
    dcp_to_torch_save(step, run / "consolidated.pt")
    return torch.load(run / "consolidated.pt", weights_only=False)["model"]


def hub_expected(ours: dict, layers: int) -> dict:
    """The hub tensors our checkpoint must give, written out independently of the exporter's mapping."""
    out = {}
    for name, t in ours.items():
        if name.startswith("mtp."):
            _, k, rest = name.split(".", 2)
            name = f"layers.{layers + int(k)}.{rest}"
        if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            prefix, proj = name.rsplit(".", 1)
            out.update({f"model.{prefix}.{e}.{proj}.weight": t[e] for e in range(t.shape[0])})
        elif name == "lm_head.weight":
            out[name] = t
        else:
            out[f"model.{name}"] = t
    if any(k.startswith("mtp.") for k in ours):
        out[f"model.layers.{layers}.embed_tokens.weight"] = ours["embed_tokens.weight"]
        out[f"model.layers.{layers}.shared_head.head.weight"] = ours["lm_head.weight"]
    return out


def read_export(path) -> dict:
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(path / shard, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(tensors) == set(index["weight_map"])
    return tensors


def our_logits(run, ids, hf_dir=None):
    from generation.loading import load_model
    from launcher.resume import choose_checkpoint
    from launcher.rundir import load_run_recipe

    recipe = load_run_recipe(run)
    _, ckpt = choose_checkpoint(run, recipe, None)
    model, _ = load_model(recipe.model, checkpoint=ckpt, peft=recipe.peft)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name, procs, overrides", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_any_layout_exports_the_checkpoint_byte_for_byte(cpu_env, trained, name, procs, overrides):
    run = trained(name, procs, *overrides)
    res = launch(cpu_env, "export", str(run), "--cluster", "cpu2", "--dtype", "fp32", "--max-shard-size", "1MB")
    out = run / "export" / "hf-step-4"
    assert f"-> {out}" in res.stdout and "shard(s)" in res.stdout
    assert not (run / "export" / "hf-step-4.partial").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "quantization_config" not in config and config["torch_dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "moe_launch_export.json"} <= {p.name for p in out.iterdir()}
    got = read_export(out)
    want = hub_expected(consolidated(run), config["num_hidden_layers"])
    assert set(got) == set(want)
    assert len({p.name for p in out.glob("model-*.safetensors")}) >= 5  # several shards, written by two processes
    for key, t in want.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in got and "model.layers.4.eh_proj.weight" in got  # per expert, MTP


def test_export_loads_in_transformers_with_equal_logits_and_generates_the_same(cpu_env, trained, tmp_path):
    run = trained("ep2", 2, "parallel.ep=2")
    out = tmp_path / "hf32"
    launch(cpu_env, "export", str(run), "--cluster", "cpu1", "--dtype", "fp32", "--out", str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - our_logits(run, ids)).abs().max().item() <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(out)  # the byte tokenizer, as a tokenizer.json with the same ids
    from trainer.chat import render_chat
    from trainer.tokenizer import ByteTokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True, tokenize=True)
    assert list(chat["input_ids"]) == render_chat("chatml", "What is 3 + 4?", "", ByteTokenizer())[0]
    # generating from the exported directory answers as generating from the run
    prompts = ["What is 3 + 4?", "What is 12 * 11?"]
    args = [a for p in prompts for a in ("--prompt", p)] + ["--cluster", "cpu1", "--max-new-tokens", "6"]
    launch(cpu_env, "generate", str(run), *args, "--out", str(tmp_path / "from-run.jsonl"))
    launch(cpu_env, "generate", str(out), *args, "--out", str(tmp_path / "from-hf.jsonl"), "--runs-dir", str(tmp_path / "runs"))
    assert (tmp_path / "from-run.jsonl").read_text() == (tmp_path / "from-hf.jsonl").read_text()
    nemo_exporter_output_becomes_our_layout(out, tmp_path / "nemo-like", tmp_path / "from-bin")


def nemo_exporter_output_becomes_our_layout(hf_dir, bins, out):
    """A nemo run's export (nemo_backend.export): NeMo's exporter saves with transformers 4.x as sharded
    pytorch_model-*.bin (hub keys, experts one by one, no MTP modules); bin_to_safetensors rewrites them as
    safetensors shards in hub order, in the export's dtype (the routing bias kept fp32), loadable by our model."""
    from safetensors.torch import load_file

    from model.hf_io import hub_order, load_hf_model
    from nemo_backend.export import bin_to_safetensors

    original = {}
    for f in sorted(hf_dir.glob("model-*.safetensors")):
        original.update(load_file(f))
    layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    kept = {k: v for k, v in original.items() if not k.startswith(f"model.layers.{layers}.")}  # what transformers 4.x saves
    bins.mkdir()
    keys = sorted(kept)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({k: kept[k] for k in part}, bins / name)
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    out.mkdir()
    assert bin_to_safetensors(bins, out, torch.bfloat16, 200_000) == len(kept)
    got = {}
    for f in sorted(out.glob("model-*.safetensors")):
        got.update(load_file(f))
    assert len(list(out.glob("model-*.safetensors"))) > 2 and set(got) == set(kept)
    for k, v in kept.items():
        want = v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert list(index) == sorted(index, key=hub_order)
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    load_hf_model(out)  # strict: every tensor our model needs is there (MTP dropped with its weights)


def test_lora_exports_as_peft_adapter_and_merged_model(cpu_env, trained, tmp_path_factory):
    from peft import PeftModel

    from model.hf_io import save_hf
    from model.presets import preset
    from model.transformer import build_model

    base = tmp_path_factory.mktemp("lora-base") / "hf"
    save_hf(build_model(preset("tiny"), seed=3), base)
    run = trained("lora-from-hf", 2, "parallel.ep=2", *LORA_MLA, f"checkpoint.load={base}")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    ours = our_logits(run, ids)

    res = launch(cpu_env, "export", str(run), "--cluster", "cpu2", "--format", "peft", "--dtype", "fp32")
    adapter = run / "export" / "peft-step-4"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["modules_to_save"] == ["mlp.gate"], res.stdout
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        assert (peft_model(ids).logits - ours).abs().max().item() <= 1e-5

    launch(cpu_env, "export", str(run), "--cluster", "cpu2", "--dtype", "fp32")  # a LoRA run's default: merged
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "export" / "merged-step-4", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(ids).logits - ours).abs().max().item() <= 1e-5


def test_peft_export_without_a_hub_base_writes_the_base_beside_it(cpu_env, trained):
    from peft import PeftModel

    run = trained("lora-scratch", 1, "parallel.ep=1", *LORA_MLA)
    launch(cpu_env, "export", str(run), "--cluster", "cpu1", "--format", "peft", "--dtype", "fp32")
    adapter = run / "export" / "peft-step-4"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(adapter / "base")
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(adapter / "base", dtype=torch.float32), adapter)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model.eval()(ids).logits - our_logits(run, ids)).abs().max().item() <= 1e-5


_MAKE_CHECKPOINT = """
import sys, json, torch
import torch.distributed.checkpoint as dcp
from model.presets import tiny
from model.transformer import build_model
cfg = tiny()
cfg.hidden_size, cfg.moe_intermediate_size, cfg.intermediate_size, cfg.n_routed_experts, cfg.num_hidden_layers = 384, 384, 1024, 16, 6
cfg.vocab_size = 4096
model = build_model(cfg, seed=0)
dcp.save({"model": model.state_dict()}, checkpoint_id=sys.argv[1], no_dist=True)
print(json.dumps(sum(v.numel() * v.element_size() for v in model.state_dict().values())))
"""

_EXPORT_MEASURED = """
import sys, json, pathlib
from export.checkpoint_reader import CheckpointReader
from export.hf import DTYPES, plan_shards, plan_tensors, write_shards
from model.presets import tiny

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

cfg = tiny()
cfg.hidden_size, cfg.moe_intermediate_size, cfg.intermediate_size, cfg.n_routed_experts, cfg.num_hidden_layers = 384, 384, 1024, 16, 6
cfg.vocab_size = 4096
reader = CheckpointReader(sys.argv[1])
shards = plan_shards(plan_tensors(reader.tensors, cfg, DTYPES["fp32"]), 12 * 2**20)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
write_shards(reader, shards, pathlib.Path(sys.argv[2]), 1.0, log=lambda m: None)
print(json.dumps({"before_rss_kib": before, "after_peak_kib": status_kib("VmHWM")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux-specific")
def test_export_memory_is_bounded_by_a_shard(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    total = int(subprocess.run([sys.executable, "-c", textwrap.dedent(_MAKE_CHECKPOINT), str(ckpt)], cwd=ROOT, check=True,
                               capture_output=True, text=True, timeout=300).stdout.split()[-1])
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_EXPORT_MEASURED), str(ckpt), str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    sizes = [p.stat().st_size for p in out.glob("*.safetensors")]
    largest = max(sizes) / 2**20
    growth = (m["after_peak_kib"] - m["before_rss_kib"]) / 1024
    print(f"{len(sizes)} shards, largest {largest:.1f} MiB, model {total / 2**20:.0f} MiB, peak RSS growth {growth:.0f} MiB")
    assert len(sizes) >= 10
    assert growth < 2 * largest + 256
    assert growth < 0.5 * total / 2**20  # far from holding the model


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def fake_run(tmp_path):
    """A run directory (from a dry run) with a fake complete checkpoint at step 4: enough for launch's checks."""
    def make(*overrides):
        runs = tmp_path / "runs"
        res = subprocess.run([sys.executable, "-m", "launcher.cli", "smoke", "--cluster", "local", "--dry-run", "--runs-dir", str(runs),
                              *overrides], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
        return run
    return make


def _refused(args, words, runs):
    before = sorted(p.name for p in runs.iterdir())
    res = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert sorted(p.name for p in runs.iterdir()) == before  # no job run directory
    return res


def test_bad_export_and_generate_input_exits_2_and_writes_nothing(fake_run, tmp_path):
    run = fake_run()
    runs = run.parent
    _refused(["export", str(run), "--cluster", "local"], "has no complete checkpoint", runs)
    step = run / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text("{}")
    _refused(["export", str(run), "--cluster", "local", "--step", "7"], "--step: run " + run.name + " has no checkpoint at step 7; it has steps 4", runs)
    _refused(["export", str(run), "--cluster", "local", "--format", "peft"], "is a full fine-tune", runs)
    taken = tmp_path / "taken"
    taken.mkdir()
    _refused(["export", str(run), "--cluster", "local", "--out", str(taken)], "already exists", runs)
    _refused(["export", "no-such-run", "--cluster", "local", "--runs-dir", str(runs)], "is not a run directory", runs)
    _refused(["export", str(run), "--cluster", "local", "--max-shard-size", "lots"], "--max-shard-size", runs)
    _refused(["generate", str(run), "--cluster", "local", "--prompt", "x" * 1100], "the model has 1024 positions", runs)
    _refused(["generate", str(run), "--cluster", "local"], "--prompt TEXT", runs)
    _refused(["generate", str(run), "--cluster", "local", "--prompt", "hi", "--top-p", "0"], "--top-p: must be in (0, 1]", runs)
    _refused(["generate", str(run), "--cluster", "local", "--prompt", "hi", "--ep", "3"], "--ep: EP=3 must divide the 8 routed experts", runs)
    _refused(["eval", str(run), "--cluster", "local", "--split", "dev"], "is not a split", runs)
    assert not (run / "export").exists() and not list(taken.iterdir())


def test_lora_export_formats_refused_where_they_cannot_be_right(fake_run):
    run = fake_run("peft.method=lora", "peft.targets=[q_a_proj,kv_b_proj,gate_proj]")
    step = run / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text("{}")
    _refused(["export", str(run), "--cluster", "local", "--format", "hf"], "--format merged", run.parent)
    _refused(["export", str(run), "--cluster", "local", "--format", "peft"], "PEFT cannot express adapters on gate_proj", run.parent)


def test_export_commands_stay_torch_free(fake_run, tmp_path):
    run = fake_run()
    step = run / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text("{}")
    code = textwrap.dedent(f"""
        import sys
        from launcher.cli import main
        rcs = [main(["export", {str(run)!r}, "--cluster", "local", "--dry-run"]),
               main(["eval", {str(run)!r}, "--cluster", "local", "--dry-run"]),
               main(["generate", {str(run)!r}, "--cluster", "local", "--dry-run", "--prompt", "hi"])]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "safetensors", "transformers"))
        print(rcs, heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 0] []"
