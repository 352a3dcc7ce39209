"""FP8 -> BF16 checkpoint conversion (model.fp8) on small synthetic DeepSeek-V3-style checkpoints."""

import hashlib
import json
import math
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import ROOT  # noqa: E402
from model.fp8 import convert_fp8_to_bf16, dequantize, main  # noqa: E402

BS = 128
FP8 = torch.float8_e4m3fn
INDEX = "model.safetensors.index.json"


def fp8_pair(shape, gen):
    """An FP8 weight and a random positive float32 scale_inv of shape [ceil(M/128), ceil(N/128)]."""
    w = torch.randn(*shape, generator=gen).to(FP8)
    s = torch.rand(math.ceil(shape[0] / BS), math.ceil(shape[1] / BS), generator=gen) * 0.01 + 1e-4
    return w, s


def reference(w, s, bs=BS):
    """Dequantise block by block with an explicit loop: float32 multiply, then bf16."""
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    w32 = w.to(torch.float32)
    for bi in range(math.ceil(w.shape[0] / bs)):
        for bj in range(math.ceil(w.shape[1] / bs)):
            rows, cols = slice(bi * bs, (bi + 1) * bs), slice(bj * bs, (bj + 1) * bs)
            out[rows, cols] = (w32[rows, cols] * s[bi, bj]).to(torch.bfloat16)
    return out


def write_checkpoint(path, shards, extra_files=True):
    """Save {shard file: {name: tensor}} plus an index (when >1 shard), config and tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for fname, tensors in shards.items():
        save_file(tensors, path / fname, metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if extra_files:
        cfg = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 200, "torch_dtype": "bfloat16",
               "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                       "weight_block_size": [128, 128]}}
        (path / "config.json").write_text(json.dumps(cfg))
        (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
        (path / "generation_config.json").write_text('{"bos_token_id": 0}')
        (path / "modeling_deepseek.py").write_text("# remote code\n")


@pytest.fixture
def sharded(tmp_path):
    """A 3-shard FP8 checkpoint; q_b_proj's scale_inv lives in a different shard from its weight."""
    gen = torch.Generator().manual_seed(0)
    fp8 = {
        "model.layers.0.self_attn.q_a_proj.weight": fp8_pair((300, 200), gen),
        "model.layers.0.self_attn.q_b_proj.weight": fp8_pair((129, 257), gen),
        "model.layers.0.mlp.experts.0.up_proj.weight": fp8_pair((64, 130), gen),
        "model.layers.0.mlp.experts.0.down_proj.weight": fp8_pair((256, 128), gen),
        "model.layers.1.mlp.shared_experts.gate_proj.weight": fp8_pair((128, 384), gen),
    }
    plain = {
        "model.embed_tokens.weight": torch.randn(50, 200, generator=gen).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.rand(200, generator=gen).to(torch.bfloat16),
        "model.layers.1.mlp.gate.weight": torch.randn(8, 200, generator=gen).to(torch.bfloat16),
        "model.layers.1.mlp.gate.e_score_correction_bias": torch.randn(8, generator=gen),  # float32
        "model.norm.weight": torch.rand(200, generator=gen),  # float32
    }
    names = list(fp8)
    shards = {
        "model-00001-of-00003.safetensors": {
            names[0]: fp8[names[0]][0], names[0] + "_scale_inv": fp8[names[0]][1],
            names[1]: fp8[names[1]][0],  # its scale_inv is in shard 3
            "model.embed_tokens.weight": plain["model.embed_tokens.weight"],
            "model.layers.0.input_layernorm.weight": plain["model.layers.0.input_layernorm.weight"],
        },
        "model-00002-of-00003.safetensors": {
            **{k: v for n in names[2:4] for k, v in ((n, fp8[n][0]), (n + "_scale_inv", fp8[n][1]))},
            "model.layers.1.mlp.gate.weight": plain["model.layers.1.mlp.gate.weight"],
            "model.layers.1.mlp.gate.e_score_correction_bias": plain["model.layers.1.mlp.gate.e_score_correction_bias"],
        },
        "model-00003-of-00003.safetensors": {
            names[1] + "_scale_inv": fp8[names[1]][1],
            names[4]: fp8[names[4]][0], names[4] + "_scale_inv": fp8[names[4]][1],
            "model.norm.weight": plain["model.norm.weight"],
        },
    }
    src = tmp_path / "src"
    write_checkpoint(src, shards)
    return src, fp8, plain, shards


def tree_hashes(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_values_match_blockwise_reference(sharded, tmp_path):
    src, fp8, _, _ = sharded
    summary = convert_fp8_to_bf16(src, tmp_path / "dst", log=lambda m: None)
    assert summary["shards"] == 3 and summary["dequantized"] == 5
    assert summary["dropped_scales"] == 5 and summary["copied"] == 5
    out = {}
    for f in (tmp_path / "dst").glob("*.safetensors"):
        out.update(load_file(f))
    for name, (w, s) in fp8.items():
        assert out[name].dtype == torch.bfloat16 and out[name].shape == w.shape
        assert torch.equal(out[name], reference(w, s)), name
        assert torch.equal(dequantize(w, s, BS), reference(w, s)), name


def test_dequantize_other_block_size():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(70, 45, generator=gen).to(FP8)
    s = torch.rand(3, 2, generator=gen) + 0.5
    assert torch.equal(dequantize(w, s, 32), reference(w, s, 32))
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize(w, s, 128)


def test_layout_extras_and_source_untouched(sharded, tmp_path):
    src, fp8, plain, shards = sharded
    before = tree_hashes(src)
    dst = tmp_path / "dst"
    convert_fp8_to_bf16(src, dst, log=lambda m: None)
    assert tree_hashes(src) == before
    assert not (tmp_path / ".dst.partial").exists()

    index = json.loads((dst / INDEX).read_text())
    src_index = json.loads((src / INDEX).read_text())
    assert not any(k.endswith("_scale_inv") for k in index["weight_map"])
    assert index["weight_map"] == {k: v for k, v in src_index["weight_map"].items() if not k.endswith("_scale_inv")}
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(shards)
    total = 0
    for fname in shards:
        with safe_open(dst / fname, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = set(f.keys())
            assert names == {k for k in shards[fname] if not k.endswith("_scale_inv")}
            for name in names:
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
                if name in plain:
                    assert t.dtype == plain[name].dtype
                    assert torch.equal(t.view(torch.uint8), plain[name].view(torch.uint8))  # byte-identical
                else:
                    assert t.dtype == torch.bfloat16
    assert index["metadata"]["total_size"] == total
    assert set(plain) | set(fp8) == set(index["weight_map"])

    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16" and cfg["hidden_size"] == 200
    for extra in ("tokenizer.json", "generation_config.json", "modeling_deepseek.py"):
        assert (dst / extra).read_bytes() == (src / extra).read_bytes()


def test_single_file_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(2)
    w, s = fp8_pair((129, 257), gen)
    norm = torch.rand(257, generator=gen).to(torch.bfloat16)
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_checkpoint(src, {"model.safetensors": {"a.weight": w, "a.weight_scale_inv": s, "norm.weight": norm}})
    summary = convert_fp8_to_bf16(src, dst, log=lambda m: None)
    assert (summary["shards"], summary["dequantized"], summary["copied"], summary["dropped_scales"]) == (1, 1, 1, 1)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "modeling_deepseek.py", "tokenizer.json"]
    out = load_file(dst / "model.safetensors")
    assert set(out) == {"a.weight", "norm.weight"}
    assert torch.equal(out["a.weight"], reference(w, s)) and torch.equal(out["norm.weight"], norm)


def test_missing_scale_names_tensor(tmp_path):
    gen = torch.Generator().manual_seed(3)
    w, s = fp8_pair((64, 130), gen)
    src = tmp_path / "src"
    write_checkpoint(src, {"model-00001-of-00002.safetensors": {"ok.weight": w, "ok.weight_scale_inv": s},
                           "model-00002-of-00002.safetensors": {"layers.3.orphan.weight": w}})
    with pytest.raises(ValueError, match=r"layers\.3\.orphan\.weight"):
        convert_fp8_to_bf16(src, tmp_path / "dst", log=lambda m: None)
    assert not (tmp_path / "dst").exists() and not (tmp_path / ".dst.partial").exists()


def test_bad_scale_shape_names_tensor(tmp_path):
    gen = torch.Generator().manual_seed(4)
    w, _ = fp8_pair((300, 200), gen)
    src = tmp_path / "src"
    write_checkpoint(src, {"model.safetensors": {"x.weight": w, "x.weight_scale_inv": torch.ones(2, 2)}})
    with pytest.raises(ValueError, match=r"x\.weight.*\[2, 2\]"):
        convert_fp8_to_bf16(src, tmp_path / "dst", log=lambda m: None)


def test_existing_destination(sharded, tmp_path):
    src = sharded[0]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert_fp8_to_bf16(src, dst, log=lambda m: None)
    assert (dst / "keep.txt").read_text() == "x"
    convert_fp8_to_bf16(src, dst, overwrite=True, log=lambda m: None)
    assert not (dst / "keep.txt").exists() and (dst / INDEX).is_file()
    with pytest.raises(ValueError, match="outside the source"):
        convert_fp8_to_bf16(src, src / "bf16", log=lambda m: None)


def test_cli_in_process(sharded, tmp_path, capsys):
    src = sharded[0]
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-convert-fp8: error: ") and "nope" in err and err.count("\n") == 1
    assert main([str(src), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and "3 shards" in captured.out and "5 tensors dequantized" in captured.out
    assert main([str(src), str(tmp_path / "out")]) == 2  # now non-empty
    err = capsys.readouterr().err
    assert err.startswith("moe-convert-fp8: error: ") and err.count("\n") == 1


def test_cli_subprocess(sharded, tmp_path):
    src = sharded[0]
    res = subprocess.run([sys.executable, "-m", "model.fp8", str(src), str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("moe-convert-fp8: wrote") and res.stdout.count("\n") == 1
    assert (tmp_path / "out" / INDEX).is_file()


_MAKE_BIG = """
import json, sys, torch
from safetensors.torch import save_file
src, n_shards = sys.argv[1], 6
torch.manual_seed(0)
weight_map = {}
for i in range(1, n_shards + 1):
    fname = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
    tensors = {}
    for j in range(4):  # 4 x 2048 x 3000 FP8 = ~24.6 MB per shard (BF16 out: ~49 MB)
        name = f"model.layers.{i}.mlp.experts.{j}.down_proj.weight"
        tensors[name] = torch.randn(2048, 3000).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = torch.rand(16, 24) + 0.5
    tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(3000, dtype=torch.bfloat16)
    save_file(tensors, f"{src}/{fname}", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, fname))
    del tensors
json.dump({"metadata": {}, "weight_map": weight_map}, open(f"{src}/model.safetensors.index.json", "w"))
json.dump({"quantization_config": {"quant_method": "fp8"}}, open(f"{src}/config.json", "w"))
"""

_CONVERT_BIG = """
import json, resource, sys
import torch
from model.fp8 import convert_fp8_to_bf16

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

# Reset the peak (VmHWM) to the current RSS, so only the conversion's own peak is measured.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before_peak, before_now = status_kib("VmHWM"), status_kib("VmRSS")
convert_fp8_to_bf16(sys.argv[1], sys.argv[2], log=lambda m: None)
after_peak = status_kib("VmHWM")
print(json.dumps({"before_peak_kib": before_peak, "before_rss_kib": before_now, "after_peak_kib": after_peak}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and /proc are Linux-specific")
def test_peak_memory_stays_near_one_shard(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    subprocess.run([sys.executable, "-c", textwrap.dedent(_MAKE_BIG), str(src)], check=True, timeout=120)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_CONVERT_BIG), str(src), str(dst)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    out_sizes = [p.stat().st_size for p in dst.glob("*.safetensors")]
    assert len(out_sizes) == 6
    largest_mib, total_mib = max(out_sizes) / 2**20, sum(out_sizes) / 2**20
    # Peak RSS (VmHWM, reset just before converting) minus the RSS at that moment.
    growth_mib = (m["after_peak_kib"] - m["before_rss_kib"]) / 1024
    print(f"peak RSS growth {growth_mib:.0f} MiB; largest output shard {largest_mib:.0f} MiB; all output {total_mib:.0f} MiB; {m}")
    assert growth_mib < 2.5 * largest_mib + 64
    assert growth_mib < 0.7 * total_mib
