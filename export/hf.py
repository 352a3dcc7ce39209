"""A run's checkpoint -> a Hugging Face model directory in the hub's DeepSeek-V3 layout.

Formats: ``hf`` (the whole model was trained) and ``merged`` (LoRA adapters folded into their base
weights: W + B A alpha/r, computed in fp32). The directory holds ``config.json``,
``generation_config.json``, ``model-XXXXX-of-YYYYY.safetensors`` shards with
``model.safetensors.index.json`` (per-expert hub key names, the MTP layers as
``model.layers.<num_hidden_layers + k>`` with their copies of the embedding and head), the run's
tokenizer files with its chat template, and ``moe_launch_export.json`` (where it came from).

Streaming: the shard plan comes from the checkpoint's metadata alone; each shard's tensors are read
(only their regions: an expert range of a stacked expert tensor), converted and written before the
next shard is touched, so memory stays near one shard (twice, while safetensors serialises it)
whatever the model's size. With several processes each writes every ``world``-th shard. Everything
goes to ``OUT.partial`` and is renamed to ``OUT`` by rank 0 after the last shard and the index: a
directory named ``OUT`` is always complete.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from export.checkpoint_reader import CheckpointReader, TensorInfo
from launcher.recipe import Recipe
from model.config import ModelConfig
from model.hf_io import hub_name, hub_order, mtp_shared_copies
from model.hf_config import config_to_hf

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
KEEP_FP32 = ("e_score_correction_bias",)  # routing state stays fp32, as in DeepSeek's release
_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
ADAPTER = re.compile(r"\.lora_[AB]\.weight$")
PARTIAL_SUFFIX = ".partial"
EXPORT_META = "moe_launch_export.json"


class ExportRefused(ValueError):
    """The export cannot be made as asked (the message says why and what to do instead)."""


@dataclass(frozen=True)
class HubTensor:
    """One tensor of the exported directory and where it comes from."""

    key: str  # hub name
    source: str  # our name in the checkpoint
    shape: tuple[int, ...]
    dtype: torch.dtype
    expert: int | None = None  # index into a stacked expert tensor
    merge: str | None = None  # LoRA: the module whose adapters fold into this weight

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def plan_tensors(tensors: dict[str, TensorInfo], cfg: ModelConfig, dtype: torch.dtype, adapters: str = "refuse") -> list[HubTensor]:
    """Every hub tensor of the export, in hub order, from the checkpoint's tensor names and shapes.

    ``adapters``: what to do with LoRA adapters in the checkpoint: ``merge`` them into their weights,
    leave them out (``base``: the frozen base model) or ``refuse``."""

    def out_dtype(name: str, info: TensorInfo) -> torch.dtype:
        return info.dtype if name.endswith(KEEP_FP32) or not info.dtype.is_floating_point else dtype

    adapted = {ADAPTER.sub("", n) for n in tensors if ADAPTER.search(n)}
    if adapted and adapters == "refuse":
        raise ExportRefused("this checkpoint has LoRA adapters on frozen weights; export --format merged or --format peft")
    merge = adapters == "merge"
    out: list[HubTensor] = []
    for name, info in tensors.items():
        if ADAPTER.search(name) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        m = _STACKED_EXPERTS.match(name)
        if m:
            prefix = hub_name(m.group(1), cfg)
            out += [HubTensor(f"{prefix}.{e}.{m.group(2)}.weight", name, info.shape[1:], out_dtype(name, info), expert=e)
                    for e in range(info.shape[0])]
            continue
        module = name.removesuffix(".weight")
        out.append(HubTensor(hub_name(name, cfg), name, info.shape, out_dtype(name, info),
                             merge=module if merge and module in adapted else None))
    by_key = {t.key: t for t in out}
    for copy, original in mtp_shared_copies(cfg).items():  # the hub layout repeats these per MTP module
        if original in by_key:
            t = by_key[original]
            out.append(HubTensor(copy, t.source, t.shape, t.dtype))
    return sorted(out, key=lambda t: hub_order(t.key))


def plan_shards(tensors: list[HubTensor], max_bytes: int) -> list[list[HubTensor]]:
    """Consecutive tensors into shards of at most ``max_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[HubTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


@torch.no_grad()
def read_shard(reader: CheckpointReader, tensors: list[HubTensor], lora_scaling: float) -> dict[str, torch.Tensor]:
    """The shard's tensors, read source by source (an expert range of a stacked tensor at once)."""
    groups: dict[str, list[HubTensor]] = {}
    for t in tensors:
        groups.setdefault(t.source, []).append(t)
    out: dict[str, torch.Tensor] = {}
    for source, items in groups.items():
        experts = [t.expert for t in items if t.expert is not None]
        lo = min(experts) if experts else 0
        region = (slice(lo, max(experts) + 1),) if experts else None
        merge = items[0].merge
        names = {source: region}
        if merge:
            names.update({f"{merge}.lora_A.weight": None, f"{merge}.lora_B.weight": None})
        got = reader.read(names)
        value = got.pop(source)
        if merge:
            value = value.float() + (got[f"{merge}.lora_B.weight"].float() @ got[f"{merge}.lora_A.weight"].float()) * lora_scaling
        for t in items:
            # a copy of its own: safetensors refuses tensors that share storage
            part = value[t.expert - lo] if t.expert is not None else value
            out[t.key] = part.to(t.dtype, copy=True).contiguous()
        del value, got
    return out


def write_shards(reader: CheckpointReader, shards: list[list[HubTensor]], staging: Path, lora_scaling: float,
                 rank: int = 0, world: int = 1, log: Callable[[str], None] = print) -> None:
    """This rank's shards (every ``world``-th), one at a time."""
    from safetensors.torch import save_file

    mine = range(rank, len(shards), world)
    for n, i in enumerate(mine, 1):
        tensors = read_shard(reader, shards[i], lora_scaling)
        save_file(tensors, str(staging / shard_file(i, len(shards))), metadata={"format": "pt"})
        size = sum(t.nbytes for t in shards[i])
        del tensors
        log(f"moe-launch: export: rank {rank}: shard {i + 1}/{len(shards)} ({size / 2**20:.1f} MiB) written [{n}/{len(mine)} of this rank]")


def write_index(shards: list[list[HubTensor]], staging: Path) -> None:
    weight_map = {t.key: shard_file(i, len(shards)) for i, shard in enumerate(shards) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write_model_files(recipe: Recipe, staging: Path, dtype: torch.dtype, provenance: dict) -> list[str]:
    """config.json, generation_config.json, the tokenizer files (with the run's chat template) and
    moe_launch_export.json. Returns the tokenizer files written."""
    from trainer.chat import JINJA, stop_ids
    from trainer.tokenizer import load_tokenizer, write_hf_tokenizer

    cfg = recipe.model
    tok = load_tokenizer(recipe.data.tokenizer)
    template = recipe.data.template if recipe.data.kind == "sft" else None
    config = config_to_hf(cfg, HF_DTYPE_NAMES[dtype], tok.bos_id, tok.eos_id)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    stops = stop_ids(template, tok)
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": stops if len(stops) > 1 else (stops[0] if stops else None),
                  "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eos_id, "do_sample": False}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    files = write_hf_tokenizer(recipe.data.tokenizer, staging, JINJA.get(template) if template else None, cfg.max_position_embeddings)
    (staging / EXPORT_META).write_text(json.dumps({**provenance, "template": template or "raw"}, indent=2) + "\n")
    return files


def begin(out: Path) -> Path:
    """The staging directory ``OUT.partial`` (a leftover of an earlier, failed export is ours to replace)."""
    if out.exists():
        raise ExportRefused(f"{out} already exists; an export never overwrites: choose another --out")
    staging = out.with_name(out.name + PARTIAL_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def finish(staging: Path, out: Path) -> None:
    if out.exists():
        raise ExportRefused(f"{out} appeared while exporting; the export stays in {staging}")
    staging.rename(out)
