"""AdamW, the learning-rate schedule and gradient clipping for sharded (DTensor) parameters."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def build_optimizer(model: nn.Module, train) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (norms). ``train`` is the recipe's Train section."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                             eps=1e-8, foreach=True)


def lr_at(step: int, train) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    span = max(train.max_steps - train.warmup_steps, 1)
    progress = min(max(step - train.warmup_steps, 0) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if train.lr_schedule == "cosine" else 1 - progress
    return train.min_lr + (train.lr - train.min_lr) * shape


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, pp_size: int = 1, skip=()) -> torch.Tensor:
    """Global gradient norm over all ranks, then scale grads to ``max_norm`` (0 = no clipping).

    Sums local squares over the whole world, discounting copies: a gradient on mesh M is held by
    (world / pp) / |M| groups of ranks outside M (e.g. TP ranks for a parameter FSDP shards over DP
    only) and replicated along M's Replicate dimensions; pipeline stages hold different parameters,
    except copies kept in sync across stages, which are passed in ``skip`` on all but one of them.
    """
    skip_ids = {id(p) for p in skip}
    per_stage = (dist.get_world_size() if dist.is_initialized() else 1) // pp_size
    total = None
    for p in model.parameters():
        if p.grad is None or id(p) in skip_ids:
            continue
        g = p.grad
        local = g.to_local() if isinstance(g, DTensor) else g
        sq = local.float().pow(2).sum()
        if isinstance(g, DTensor):
            copies = per_stage // g.device_mesh.size()
            for mesh_dim, placement in enumerate(g.placements):
                if isinstance(placement, Replicate):
                    copies *= g.device_mesh.size(mesh_dim)
            sq = sq / copies
        total = sq if total is None else total + sq
    if total is None:
        return torch.tensor(0.0)
    if dist.is_initialized():
        dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, scale)
    return norm
