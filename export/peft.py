"""A LoRA run's adapters as a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads onto
transformers' DeepseekV3ForCausalLM: ``adapter_config.json`` + ``adapter_model.safetensors``.

Our adapters have PEFT's shapes and scaling (A [r, in], B [out, r], alpha / r); keys become
``base_model.model.model.layers.L.self_attn.<proj>.lora_{A,B}.weight``. Two things a plain adapter
file would lose are carried too:

- the routers: aux-loss-free balancing moves each MoE layer's ``e_score_correction_bias`` during
  training even though the base is frozen, so the routers go in as ``modules_to_save`` (``mlp.gate``:
  weight and bias) whenever the run updated them;
- the base: ``base_model_name_or_path`` is the Hugging Face directory the run started from; a run
  that started from anything else gets its frozen base exported beside the adapter (``OUT/base``).

Adapters PEFT cannot place are refused, naming them (see ``launcher.tasks.PEFT_EXPRESSIBLE``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from export.checkpoint_reader import CheckpointReader
from export.hf import ADAPTER, ExportRefused
from launcher.recipe import Recipe
from launcher.tasks import PEFT_EXPRESSIBLE

PREFIX = "base_model.model."
_EXPRESSIBLE = re.compile(r"^layers\.\d+\.self_attn\.(" + "|".join(PEFT_EXPRESSIBLE) + r")$")


def adapted_modules(reader: CheckpointReader) -> list[str]:
    return sorted({ADAPTER.sub("", n) for n in reader.tensors if ADAPTER.search(n)})


def check_expressible(modules: list[str]) -> None:
    odd = [m for m in modules if not _EXPRESSIBLE.match(m)]
    if odd:
        names = ", ".join(odd[:4]) + (f" and {len(odd) - 4} more" if len(odd) > 4 else "")
        raise ExportRefused(f"PEFT cannot express the adapters on {names}: peft maps gate_proj/up_proj/down_proj of a "
                            "DeepSeek-V3 model onto the fused routed experts of transformers' DeepseekV3 (and MTP layers "
                            "are not in that model); export --format merged")


def routers_changed(recipe: Recipe) -> bool:
    """Did training move the routing biases (aux-loss-free balancing on a noaux_tc model)?"""
    cfg = recipe.model
    return cfg.topk_method == "noaux_tc" and cfg.num_moe_layers > 0 and recipe.train.bias_update_rate > 0


def hf_base(recipe: Recipe) -> str | None:
    """The Hugging Face directory the run's frozen base came from, if it did."""
    ck = recipe.checkpoint
    if ck.load and ck.load_format == "hf":
        return os.path.abspath(os.path.expanduser(ck.load))
    return None


@torch.no_grad()
def write_adapter(reader: CheckpointReader, recipe: Recipe, staging: Path, dtype: torch.dtype, base: str) -> dict:
    """adapter_model.safetensors and adapter_config.json into ``staging``; returns the config."""
    from safetensors.torch import save_file

    modules = adapted_modules(reader)
    if not modules:
        raise ExportRefused("the checkpoint has no LoRA adapters")
    check_expressible(modules)
    names = [f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"]
    cfg = recipe.model
    to_save = []
    if routers_changed(recipe):
        to_save = ["mlp.gate"]
        names += [f"layers.{i}.mlp.gate.{p}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)
                  for p in ("weight", "e_score_correction_bias")]
    tensors = reader.read({n: None for n in names})
    out = {PREFIX + "model." + n: t.to(torch.float32 if n.endswith("e_score_correction_bias") else dtype).contiguous()
           for n, t in tensors.items()}
    save_file(out, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft = recipe.peft
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": peft.rank, "lora_alpha": peft.alpha, "lora_dropout": peft.dropout,
        "target_modules": sorted({m.rpartition(".")[2] for m in modules}), "modules_to_save": to_save or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True,
    }
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
