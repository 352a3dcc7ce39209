"""Hugging Face checkpoint interop: safetensors shards <-> our model (config.json: model/hf_config.py).

Hub layout (what ``save_pretrained`` writes and DeepSeek publishes):
  model.embed_tokens.weight, model.layers.L.<module>..., model.norm.weight, lm_head.weight
  routed experts one by one: model.layers.L.mlp.experts.J.{gate,up,down}_proj.weight
  MTP module k: model.layers.<num_hidden_layers + k>.{enorm,hnorm,eh_proj,shared_head.norm,...}
    (+ its own copies of embed_tokens and shared_head.head, which we share with the main model)
Ours: the same names without the ``model.`` prefix, experts stacked per layer (mlp.experts.gate_proj
[E, F, H]), MTP modules under ``mtp.k``.

Loading reads the index, then each shard once, and only the tensors the model in hand needs (a rank
that holds experts 8..15 reads only those), copying each into place; nothing else stays in memory.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig
from model.hf_config import config_from_hf, config_to_hf, load_config  # noqa: F401  (re-exported)
from model.moe import GroupedExperts

class CheckpointMismatch(ValueError):
    """Missing, unexpected or mis-shaped tensors; the message lists them."""


# ------------------------------------------------------------------------ key mapping
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def hub_name(name: str, cfg: ModelConfig) -> str:
    """Our parameter/buffer name -> hub name (experts still stacked: '...mlp.experts.gate_proj')."""
    if name.startswith("lm_head."):
        return name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    return "model." + name


def expected_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, tuple[slice, ...], tuple[int, ...]]]:
    """hub key -> (local tensor to fill, region of the hub tensor it holds, full hub shape).

    Works for plain and sharded (DTensor: FSDP, expert-parallel) models alike: each rank lists only
    the experts and the parts of tensors it holds.
    """
    cfg: ModelConfig = model.cfg
    out: dict[str, tuple[torch.Tensor, tuple[slice, ...], tuple[int, ...]]] = {}
    experts = {name: mod for name, mod in model.named_modules() if isinstance(mod, GroupedExperts)}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("tokens_per_expert") or ".lora_A." in name or ".lora_B." in name:
            continue  # runtime counters and LoRA adapters are not part of a base checkpoint
        local, region = local_region(tensor)
        owner, _, attr = name.rpartition(".")
        if owner in experts:
            prefix = hub_name(owner, cfg)
            # a DTensor's region knows its experts; a plain partial stack says where it starts
            first = region[0].start if hasattr(tensor, "to_local") else experts[owner].first_expert
            for i, e in enumerate(range(first, first + local.shape[0])):
                out[f"{prefix}.{e}.{attr}.weight"] = (local[i], region[1:], tuple(tensor.shape[1:]))
        else:
            out[hub_name(name, cfg)] = (local, region, tuple(tensor.shape))
    return out


def local_region(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(local tensor, the slices of the global tensor it holds) for a DTensor or a plain tensor."""
    if hasattr(t, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return t, tuple(slice(0, n) for n in t.shape)


def _other_experts(model: nn.Module, wanted: dict) -> set[str]:
    """Hub keys of the routed experts this (expert-parallel) rank does not hold."""
    cfg: ModelConfig = model.cfg
    keys = set()
    for name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            prefix = hub_name(name, cfg)
            keys |= {f"{prefix}.{e}.{proj}.weight" for e in range(cfg.n_routed_experts) for proj in ("gate_proj", "up_proj", "down_proj")}
    return keys - wanted.keys()


def mtp_shared_copies(cfg: ModelConfig) -> dict[str, str]:
    """Hub keys that duplicate shared tensors (each MTP module's embedding and head) -> the hub key they copy."""
    keys = {}
    for k in range(cfg.num_nextn_predict_layers):
        base = f"model.layers.{cfg.num_hidden_layers + k}"
        keys.update({f"{base}.embed_tokens.weight": "model.embed_tokens.weight", f"{base}.shared_head.head.weight": "lm_head.weight"})
    return keys


def _unused_mtp_layer(key: str, cfg: ModelConfig) -> bool:
    """A tensor of an MTP layer the model does not have (e.g. the release's layer 61 for a model built
    without MTP, as for generation): not needed, not an error."""
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers + cfg.num_nextn_predict_layers


def _weight_map(path: Path) -> dict[str, str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors.index.json or model.safetensors")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


# ------------------------------------------------------------------------------- load
@torch.no_grad()
def load_hf_weights(model: nn.Module, path: str | Path, strict: bool = True, ignore_unexpected: bool = False) -> dict:
    """Fill ``model`` from an HF-format directory, shard by shard, reading only the tensors it needs.

    ``strict``: every tensor of the model must be in the checkpoint. Tensors the model does not hold are
    unexpected unless they belong to other ranks (experts outside this rank's range, layers of other
    pipeline stages): pass ``ignore_unexpected=True`` for a partial model.
    """
    from safetensors import safe_open

    path = Path(path)
    cfg: ModelConfig = model.cfg
    wanted = expected_tensors(model)
    weight_map = _weight_map(path)
    shared = mtp_shared_copies(cfg)
    missing = sorted(k for k in wanted if k not in weight_map)
    held_elsewhere = _other_experts(model, wanted)  # experts of other expert-parallel ranks
    unexpected = sorted(k for k in weight_map if k not in wanted and k not in shared and k not in held_elsewhere
                        and not _unused_mtp_layer(k, cfg))
    if ignore_unexpected:
        unexpected = []
    bad_shape = []
    by_shard: dict[str, list[str]] = defaultdict(list)
    for key in wanted:
        if key in weight_map:
            by_shard[weight_map[key]].append(key)
    loaded = 0
    for shard, keys in sorted(by_shard.items()):
        with safe_open(path / shard, framework="pt") as f:
            for key in keys:
                dest, region, full_shape = wanted[key]
                src = f.get_slice(key)
                if tuple(src.get_shape()) != full_shape:
                    bad_shape.append(f"{key}: checkpoint {tuple(src.get_shape())} vs model {full_shape}")
                    continue
                if src.get_dtype() in ("F8_E4M3", "F8_E5M2"):
                    raise CheckpointMismatch(f"{path}: {key} is FP8; convert the checkpoint first: moe-convert-fp8 SRC DST")
                part = src[region] if region else f.get_tensor(key)  # reads only this rank's region
                dest.copy_(part)
                loaded += 1
    problems = []
    if missing and strict:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if bad_shape:
        problems.append(f"mis-shaped {len(bad_shape)}: {'; '.join(bad_shape[:10])}")
    if problems:
        raise CheckpointMismatch(f"{path}: checkpoint does not match the model: " + " | ".join(problems))
    return {"loaded": loaded, "missing": missing, "shards": len(by_shard)}


# ------------------------------------------------------------------------------- save
@torch.no_grad()
def save_hf(model: nn.Module, path: str | Path, max_shard_bytes: int = 2 * 1024**3, dtype: torch.dtype | None = None) -> None:
    """Write config.json, safetensors shards (hub key names, experts one by one) and the index."""
    path = Path(path)
    cfg: ModelConfig = model.cfg
    config = config_to_hf(cfg)  # first: a routing transformers cannot express is refused before any shard is written
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, (t, region, full_shape) in expected_tensors(model).items():
        if tuple(t.shape) != full_shape:
            raise ValueError("save_hf needs the whole model in one process; consolidate a sharded checkpoint first")
        v = t.detach()
        if dtype is not None and v.is_floating_point() and not key.endswith("e_score_correction_bias"):
            v = v.to(dtype)
        tensors[key] = v.contiguous().cpu()
    for copy, original in mtp_shared_copies(cfg).items():  # the hub layout repeats the shared tensors per MTP module
        tensors[copy] = tensors[original].clone()
    write_safetensors_shards(tensors, path, max_shard_bytes)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def write_safetensors_shards(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int, convert=None) -> None:
    """Hub-keyed tensors -> ``model-XXXXX-of-YYYYY.safetensors`` in hub order, at most ``max_shard_bytes`` each
    (a bigger tensor alone; sizes as written), and ``model.safetensors.index.json``. ``convert(key, tensor)``
    (e.g. a dtype cast) and contiguity are applied shard by shard, so memory-mapped inputs stay on disk."""
    from safetensors.torch import save_file

    convert = convert or (lambda key, t: t)
    sizes = {k: convert(k, t[:0] if t.dim() else t).element_size() * t.numel() for k, t in tensors.items()}

    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors, key=hub_order):
        nbytes = sizes[key]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map, total = {}, 0
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: convert(k, tensors[k]).contiguous() for k in keys}, str(Path(path) / name), metadata={"format": "pt"})
        for key in keys:
            weight_map[key] = name
            total += sizes[key]
    (Path(path) / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def hub_order(key: str):
    """Sort key of the hub layout: embedding, layers in order (experts by number), then norm and head."""
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", key)
    if not m:
        return (0 if "embed" in key else 2, 0, (key,))
    natural = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", m.group(2)))
    return (1, int(m.group(1)), natural)


def load_hf_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, mtp_loss_weight: float = 0.1):
    """Build our model from an HF directory's config.json and load its weights."""
    from model.transformer import build_model

    cfg = load_config(path)
    if cfg.num_nextn_predict_layers and f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" not in _weight_map(Path(path)):
        cfg.num_nextn_predict_layers = 0  # transformers' save_pretrained does not write MTP modules
    model = build_model(cfg, device=device, dtype=dtype, seed=None, mtp_loss_weight=mtp_loss_weight)
    load_hf_weights(model, path)
    return model


def hf_dir_size(path: str | Path) -> int:
    return sum(os.path.getsize(p) for p in Path(path).glob("*.safetensors"))
