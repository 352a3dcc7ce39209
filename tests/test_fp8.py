"""FP8 -> BF16 checkpoint conversion (model.fp8) on small synthetic DeepSeek-V3-style checkpoints."""

import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from conftest import ROOT
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import fp8
from model.fp8 import ConvertError, convert_fp8_to_bf16, dequantize, main

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
    for overwrite in (False, True):  # --overwrite replaces only an earlier output (a dir holding *.safetensors)
        with pytest.raises(ValueError, match="not empty" if not overwrite else "not an earlier output"):
            convert_fp8_to_bf16(src, dst, overwrite=overwrite, log=lambda m: None)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    (dst / "old.safetensors").write_bytes(b"")
    convert_fp8_to_bf16(src, dst, overwrite=True, log=lambda m: None)
    assert not (dst / "keep.txt").exists() and (dst / INDEX).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or set-aside dir left
    with pytest.raises(ValueError, match="inside the source"):
        convert_fp8_to_bf16(src, src / "bf16", log=lambda m: None)


def test_cli_in_process(sharded, tmp_path, capsys):
    src = sharded[0]
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-convert-fp8: error: ") and "nope" in err and err.count("\n") == 1
    assert main([str(src), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # progress goes to stdout, stderr is for the error line only
    *progress, last = captured.out.splitlines()
    assert [line.split()[0] for line in progress] == ["[1/3]", "[2/3]", "[3/3]"]
    assert last.startswith("moe-convert-fp8: wrote") and "3 shards" in last and "5 tensors dequantized" in last
    assert main([str(src), str(tmp_path / "out")]) == 2  # now non-empty
    err = capsys.readouterr().err
    assert err.startswith("moe-convert-fp8: error: ") and err.count("\n") == 1


def test_cli_subprocess(sharded, tmp_path):
    src = sharded[0]
    res = subprocess.run([sys.executable, "-m", "model.fp8", str(src), str(tmp_path / "out")], check=False,
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and res.stdout.splitlines()[-1].startswith("moe-convert-fp8: wrote")
    assert (tmp_path / "out" / INDEX).is_file()


# ----------------------------------------------------------------------------- bad inputs: one line, exit 2
# Every failure: exit 2, exactly one stderr line "moe-convert-fp8: error: <file>: ...", no traceback, and no
# output (a pre-existing output directory unchanged) and no staging directory left behind.
S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def tiny_shards(b_scale=None, b_weight=None):
    """Two shards of tiny tensors; b.weight (FP8) and its scale can be replaced."""
    gen = torch.Generator().manual_seed(5)
    a, a_s = fp8_pair((4, 6), gen)
    b, b_s = fp8_pair((5, 3), gen)
    b_pair = {"b.weight": b if b_weight is None else b_weight}
    if b_scale is not False:
        b_pair["b.weight_scale_inv"] = b_s if b_scale is None else b_scale
    return {S1: {"a.weight": a, "a.weight_scale_inv": a_s, "norm.weight": torch.ones(6, dtype=torch.bfloat16)},
            S2: {**b_pair, "c.bias": torch.zeros(3)}}


@pytest.fixture
def tiny(tmp_path):
    """(src, dst): a two-shard tiny FP8 checkpoint with an index, and a destination that does not exist yet."""
    src = tmp_path / "src"
    write_checkpoint(src, tiny_shards())
    return src, tmp_path / "out"


def truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7 if keep is None else keep])


def set_index(src, index):
    (src / INDEX).write_text(index if isinstance(index, str) else json.dumps(index))


BREAKERS = {}  # name -> f(src, dst) mutating the fixture; returns (argv, strings the error line must name)


def breaker(fn):
    BREAKERS[fn.__name__] = fn
    return fn


@breaker
def src_missing(src, dst):
    shutil.rmtree(src)
    return [src, dst], [src, "no such directory"]


@breaker
def src_is_a_file(src, dst):
    shutil.rmtree(src)
    src.write_text("x")
    return [src, dst], [src, "not a directory"]


@breaker
def src_has_no_checkpoint(src, dst):
    shutil.rmtree(src)
    src.mkdir()
    return [src, dst], [src, INDEX, "model.safetensors"]


@breaker
def shards_without_index(src, dst):
    (src / INDEX).unlink()
    return [src, dst], [src, INDEX, S1]


@breaker
def index_not_json(src, dst):
    set_index(src, '{"weight_map": {')
    return [src, dst], [src / INDEX, "not valid JSON", "weight_map"]


@breaker
def index_is_a_list(src, dst):
    set_index(src, [])
    return [src, dst], [src / INDEX, "weight_map"]


@breaker
def index_without_weight_map(src, dst):
    set_index(src, {"metadata": {}})
    return [src, dst], [src / INDEX, "weight_map"]


@breaker
def index_shard_outside_dir(src, dst):
    set_index(src, {"weight_map": {"a.weight": "../elsewhere.safetensors"}})
    return [src, dst], [src / INDEX, "../elsewhere.safetensors"]


@breaker
def index_metadata_not_object(src, dst):
    set_index(src, {"metadata": [1], "weight_map": json.loads((src / INDEX).read_text())["weight_map"]})
    return [src, dst], [src / INDEX, "metadata"]


@breaker
def index_names_missing_shard(src, dst):
    (src / S2).unlink()
    return [src, dst], [src / S2, "missing"]


@breaker
def index_lists_absent_tensor(src, dst):
    index = json.loads((src / INDEX).read_text())
    index["weight_map"]["ghost.weight"] = S1
    set_index(src, index)
    return [src, dst], [src / S1, "ghost.weight"]


@breaker
def first_shard_header_truncated(src, dst):
    truncate(src / S1, keep=5)
    return [src, dst], [src / S1, "truncated"]


@breaker
def first_shard_garbage(src, dst):
    (src / S1).write_bytes(b"\xff" * 64)
    return [src, dst], [src / S1, "corrupt"]


@breaker
def second_shard_truncated(src, dst):
    truncate(src / S2)
    return [src, dst], [src / S2, "truncated"]


@breaker
def single_file_truncated(src, dst):
    shutil.rmtree(src)
    write_checkpoint(src, {"model.safetensors": tiny_shards()[S1]})
    truncate(src / "model.safetensors")
    return [src, dst], [src / "model.safetensors"]


@breaker
def fp8_without_scale(src, dst):
    shutil.rmtree(src)
    write_checkpoint(src, tiny_shards(b_scale=False))
    return [src, dst], [src / S2, "b.weight", "b.weight_scale_inv"]


@breaker
def scale_shape_wrong(src, dst):
    shutil.rmtree(src)
    write_checkpoint(src, tiny_shards(b_scale=torch.ones(2, 2)))
    return [src, dst], [src / S2, "b.weight_scale_inv", "[2, 2]", "[1, 1]"]


@breaker
def fp8_weight_not_2d(src, dst):
    shutil.rmtree(src)
    write_checkpoint(src, tiny_shards(b_weight=torch.zeros(2, 2, 2).to(FP8)))
    return [src, dst], [src / S2, "b.weight", "2-D"]


@breaker
def config_not_json(src, dst):
    (src / "config.json").write_text("{")
    return [src, dst], [src / "config.json", "not valid JSON"]


@breaker
def config_is_a_list(src, dst):
    (src / "config.json").write_text("[]")
    return [src, dst], [src / "config.json", "JSON list"]


@breaker
def dst_inside_src(src, dst):
    return [src, src / "bf16"], [src / "bf16", "inside the source"]


@breaker
def dst_contains_src(src, dst):
    return [src, src.parent], [src.parent, "inside the source"]


@breaker
def dst_not_empty(src, dst):
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    return [src, dst], [dst, "not empty"]


@breaker
def dst_not_empty_overwrite(src, dst):
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    return [src, dst, "--overwrite"], [dst, "not an earlier output"]


@breaker
def dst_is_a_file(src, dst):
    dst.write_text("mine")
    return [src, dst], [dst, "not a directory"]


@breaker
def dst_is_a_symlink(src, dst):
    (dst.parent / "real").mkdir()
    dst.symlink_to(dst.parent / "real")
    return [src, dst], [dst, "symbolic link"]


@breaker
def unknown_option(src, dst):
    return [src, dst, "--block-size", "0"], ["--block-size", "usage:"]


@breaker
def missing_argument(src, dst):
    return [src], ["dst", "usage:"]


def snapshot(path):
    """What must survive a failed run unchanged: a file's bytes, a directory tree, a link's target."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return ("file", path.read_bytes())
    return ("dir", tree_hashes(path)) if path.is_dir() else None


def assert_one_error(rc, err, names):
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("moe-convert-fp8: error: "), err
    for name in names:
        assert str(name) in err, (name, err)


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_bad_input_one_error_line(name, tiny, capsys):
    src, dst = tiny
    argv, names = BREAKERS[name](src, dst)
    out_path = Path(argv[1]) if len(argv) > 1 else dst
    before = snapshot(out_path)
    rc = main([str(a) for a in argv])
    assert_one_error(rc, capsys.readouterr().err, names)
    assert snapshot(out_path) == before  # None: still absent
    assert not (out_path.parent / f".{out_path.name}.partial").exists()


def test_shard_truncated_after_others_converted(tiny, capsys, monkeypatch):
    """The second shard is cut short once the first is converted: the error names it, nothing is left."""
    src, dst = tiny
    dst = dst.parent / "new" / "deeper" / "out"  # its parents are created, and removed again on failure
    real_inspect = fp8._inspect

    def inspect_then_truncate(*args):  # after the header check passed, before any shard is converted
        result = real_inspect(*args)
        truncate(src / S2)
        return result

    monkeypatch.setattr(fp8, "_inspect", inspect_then_truncate)
    rc = main([str(src), str(dst)])
    out, err = capsys.readouterr()
    assert out.startswith(f"[1/2] {S1}")  # the first shard was converted
    assert_one_error(rc, err, [src / S2, "truncated"])
    assert not (src.parent / "new").exists()


def test_write_failure_leaves_earlier_output_alone(tiny, capsys, monkeypatch):
    """--overwrite over an earlier output: a failure midway (disk full) leaves that output as it was."""
    src, dst = tiny
    assert main([str(src), str(dst)]) == 0
    before = tree_hashes(dst)
    real_save, calls = fp8.save_file, []

    def save_then_fail(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(fp8, "save_file", save_then_fail)
    capsys.readouterr()
    rc = main([str(src), str(dst), "--overwrite"])
    assert_one_error(rc, capsys.readouterr().err, [dst, S2, "No space left"])
    assert tree_hashes(dst) == before
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out", "src"]  # no staging or set-aside dir


def test_files_appearing_in_empty_dst_are_kept(tiny, capsys, monkeypatch):
    """An empty DST that the user writes into during the run is not replaced at the end."""
    src, dst = tiny
    dst.mkdir()
    real_copy = fp8._copy_extras

    def copy_and_user_writes(*args):
        real_copy(*args)
        (dst / "late.txt").write_text("mine")

    monkeypatch.setattr(fp8, "_copy_extras", copy_and_user_writes)
    rc = main([str(src), str(dst)])
    assert_one_error(rc, capsys.readouterr().err, [dst, "left alone"])
    assert sorted(p.name for p in dst.iterdir()) == ["late.txt"]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out", "src"]


def test_stale_staging_dir_is_replaced(tiny, capsys):
    src, dst = tiny
    staging = dst.parent / ".out.partial"
    staging.mkdir()
    (staging / fp8._STAGING_MARKER).write_text(json.dumps({"pid": 0, "host": socket.gethostname()}))
    (staging / S1).write_bytes(b"half")
    assert main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"removing {staging}" in out and "interrupted" in out
    assert not staging.exists() and load_file(dst / S1).keys() == {"a.weight", "norm.weight"}
    assert not (dst / fp8._STAGING_MARKER).exists()


@pytest.mark.parametrize("kind", ["not-ours", "running"])
def test_staging_path_not_ours_is_left_alone(kind, tiny, capsys):
    """A directory at the staging path without our marker, or one a live conversion writes, is never removed."""
    src, dst = tiny
    staging = dst.parent / ".out.partial"
    staging.mkdir()
    if kind == "running":
        (staging / fp8._STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    else:
        (staging / "mine.txt").write_text("mine")
    before = tree_hashes(staging)
    rc = main([str(src), str(dst)])
    assert_one_error(rc, capsys.readouterr().err, [staging, "another moe-convert-fp8" if kind == "running" else "left alone"])
    assert tree_hashes(staging) == before and not dst.exists()


def test_bad_block_size(tiny):
    for bad in (0, -128, 1.5):
        with pytest.raises(ConvertError, match="block_size: must be a positive integer"):
            convert_fp8_to_bf16(*tiny, block_size=bad, log=lambda m: None)
    assert not tiny[1].exists()


def test_console_script_bad_shard(tiny):
    """The installed moe-convert-fp8 itself: exit 2, one line naming the shard, no traceback."""
    src, dst = tiny
    script = Path(sys.executable).parent / "moe-convert-fp8"
    if not script.exists():
        pytest.skip("moe-convert-fp8 is not installed next to this Python")
    truncate(src / S2)
    res = subprocess.run([str(script), str(src), str(dst)], check=False, capture_output=True, text=True, timeout=120)
    assert_one_error(res.returncode, res.stderr, [src / S2])
    assert not dst.exists() and not (dst.parent / ".out.partial").exists()



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


def test_synthetic_fp8_checkpoint_converts_and_loads(tmp_path):
    """`python -m model.fp8_synthetic` writes the release layout; converted, it loads strictly into our model
    and equals the model it came from within FP8's precision."""
    from model.fp8_synthetic import main as synthetic
    from model.hf_config import load_config
    from model.hf_io import load_hf_weights
    from model.presets import tiny
    from model.transformer import build_model

    assert synthetic([str(tmp_path / "fp8"), "--seed", "3"]) == 0
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.endswith("weight_scale_inv") for k in index) and len(set(index.values())) == 2
    assert main([str(tmp_path / "fp8"), str(tmp_path / "bf16")]) == 0
    model = build_model(load_config(tmp_path / "bf16"), seed=None)
    load_hf_weights(model, tmp_path / "bf16", strict=True)
    original = build_model(tiny(), seed=3).state_dict()
    for name, t in model.state_dict().items():
        ref = original[name].float()
        assert (t.float() - ref).abs().max() <= 0.07 * ref.abs().max() + 1e-6, name
    assert (tmp_path / "bf16" / "tokenizer.json").is_file()
