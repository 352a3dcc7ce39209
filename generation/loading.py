"""A model for generation and evaluation: from a run's checkpoint (any training layout; DCP reshards it)
or a Hugging Face directory, in one process or split by TP/EP over the job's processes with the
trainer's own parallel code (``trainer.parallel.set_parallel``), without FSDP: inference keeps
whole dense weights per TP rank. The MTP modules are not built (generation does not use them).
LoRA stays as trained (adapters beside their frozen weights); the absorbed attention weights are
computed once here, with the kv_b_proj adapter folded in.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from generation.decode import absorbed_weights
from model.attention import MLA
from model.config import ModelConfig
from model.moe import MoE, Router
from model.transformer import build_model


def inference_config(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, num_nextn_predict_layers=0)


@torch.no_grad()
def load_model(cfg: ModelConfig, *, checkpoint: str | Path | None = None, hf_dir: str | Path | None = None, peft=None,
               layout: dict | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The model in eval mode, and its meshes (None in one process). Weights come from ``checkpoint`` (a
    moe-launch DCP step directory; ``peft`` the run's PEFT section) or ``hf_dir``. ``layout``: the plan's
    layout dict (tp, ep, dp, ...) when running distributed."""
    from trainer.parallel import set_parallel

    device = torch.device(device)
    model = build_model(inference_config(cfg), device="meta", mtp_loss_weight=0.0)
    if peft is not None and peft.method == "lora":
        from trainer.lora import apply_lora

        apply_lora(model, peft)
    meshes = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        meshes = set_parallel(model, device.type, layout)
    model.to_empty(device=device)
    if checkpoint is not None:
        state = model.state_dict()
        with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": state}, checkpoint_id=str(checkpoint))
        model.load_state_dict(state)
    else:
        from model.hf_io import load_hf_weights

        load_hf_weights(model, hf_dir)
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Router) and hasattr(m, "e_score_correction_bias"):  # routing state stays fp32
            m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
        if isinstance(m, MoE):
            m.tokens_per_expert.data = torch.zeros_like(m.tokens_per_expert, dtype=torch.float32)
        if isinstance(m, MLA):
            m.absorbed_kv = absorbed_weights(m)
    return model.eval(), meshes
