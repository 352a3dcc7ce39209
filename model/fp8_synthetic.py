"""A small checkpoint in DeepSeek's FP8 release format, for trying the fine-tuning chain end to end.

    python -m model.fp8_synthetic OUT [--preset tiny] [--seed 0] [--shards 2]

What DeepSeek publishes for V3 (and what ``moe-convert-fp8`` reads): ``config.json`` with a
``quantization_config`` (fp8, e4m3, 128 x 128 weight blocks), sharded safetensors with an index, every
linear projection stored as ``float8_e4m3fn`` beside its ``weight_scale_inv`` (one float32 per 128 x 128
block: bf16 = fp8 x scale_inv), and embeddings, norms, router gates and the output head left in bf16;
plus the tokenizer files. Here the weights are our model's seeded initialisation (``model.presets``),
the tokenizer the built-in byte tokenizer as a tokenizer.json with a chatml chat template. The values
mean nothing; the format is the release's, which is what the conversion and the pipeline need.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from model.fp8 import BLOCK_SIZE, INDEX_NAME, SCALE_SUFFIX

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Linear weights the release keeps in bf16 (everything else 2-D named *.weight is FP8).
_BF16_KEEP = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "eh_proj", "shared_head")


def quantize(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale_inv) with one scale per block: scale_inv = absmax / 448, fp8 = w / scale_inv."""
    m, n = weight.shape
    mb, nb = math.ceil(m / block_size), math.ceil(n / block_size)
    w = torch.zeros(mb * block_size, nb * block_size, dtype=torch.float32)
    w[:m, :n] = weight.float()
    blocks = w.view(mb, block_size, nb, block_size)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).view(mb * block_size, nb * block_size)[:m, :n]
    return q.to(torch.float8_e4m3fn), scale_inv


def is_fp8(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 2 and not any(k in name for k in _BF16_KEEP)


def write(out: Path, preset: str = "tiny", seed: int = 0, shards: int = 2) -> Path:
    """Write the checkpoint into ``out`` (created; must not exist). Returns ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from model.hf_io import save_hf
    from model.presets import PRESETS
    from model.transformer import build_model
    from trainer.chat import JINJA
    from trainer.tokenizer import write_hf_tokenizer

    if out.exists():
        raise SystemExit(f"moe-convert-fp8 synthetic: error: {out} exists; choose a new directory")
    cfg = PRESETS[preset]()
    model = build_model(cfg, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp, dtype=torch.bfloat16)
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                tensors.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
        config = json.loads((Path(tmp) / "config.json").read_text())
    staged: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if is_fp8(name, t):
            staged[name], staged[name + SCALE_SUFFIX] = quantize(t)
        else:
            staged[name] = t
    out.mkdir(parents=True)
    names = sorted(staged)
    per = math.ceil(len(names) / shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: staged[k].contiguous() for k in part}, str(out / file), metadata={"format": "pt"})
        (out / file).chmod(0o644)  # safetensors writes 0600; a release is readable by all
        weight_map.update({k: file for k in part})
        total += sum(staged[k].numel() * staged[k].element_size() for k in part)
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [BLOCK_SIZE, BLOCK_SIZE]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_hf_tokenizer("byte", out, JINJA["chatml"], cfg.max_position_embeddings)
    return out


def main(argv: list[str] | None = None) -> int:
    from model.presets import PRESETS

    p = argparse.ArgumentParser(prog="python -m model.fp8_synthetic", description=__doc__.split("\n\n")[0],
                                epilog="example: python -m model.fp8_synthetic /tmp/tiny-fp8 && moe-convert-fp8 /tmp/tiny-fp8 /tmp/tiny-bf16")
    p.add_argument("out", type=Path, help="directory to create")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default tiny; keep it small)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--shards", type=int, default=2, help="safetensors shards (default 2)")
    args = p.parse_args(argv)
    if args.shards < 1:
        p.error("--shards must be >= 1")
    out = write(args.out, args.preset, args.seed, args.shards)
    n = sum(1 for _ in out.glob("*.safetensors"))
    print(f"wrote {out}: {args.preset} in DeepSeek's FP8 layout, {n} shard(s); convert with: moe-convert-fp8 {out} <DST>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
