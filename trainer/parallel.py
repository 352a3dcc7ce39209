"""Apply the plan's layout to the model with torch.distributed: device mesh, expert parallel, FSDP2.

Mesh: (pp, edp, ep, tp) with the data-parallel dimension dp = edp x ep (EP groups are consecutive
ranks, i.e. inside a node). Dense parameters are FSDP-sharded over dp; routed experts are split over
ep (a DTensor Shard(0) over the expert dimension, so checkpoints keep global shapes and reshard when
EP changes) and FSDP-sharded over edp. Gradients are *summed* over the data-parallel ranks: the
trainer divides the loss by the global token count itself, which makes any layout equal to one process.

Materialisation initialises each rank's shard from per-tensor (and per-expert) seeded generators, so
the weights do not depend on the layout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from model.hf_io import local_region
from model.moe import GroupedExperts, MoE, Router
from model.norm import RMSNorm
from trainer.expert_parallel import ExpertParallelDispatcher


@dataclass
class Meshes:
    world: DeviceMesh
    dp: DeviceMesh
    ep: DeviceMesh
    edp: DeviceMesh

    @property
    def dp_group(self):
        return self.dp.get_group()


def build_meshes(device_type: str, pp: int, dp: int, ep: int, tp: int) -> Meshes:
    if pp != 1 or tp != 1:
        raise SystemExit(f"moe-launch: error: the native trainer does not do tensor or pipeline parallelism yet "
                         f"(plan has TP={tp}, PP={pp}); use parallel.tp=1 parallel.pp=1")
    if dp % ep:
        raise ValueError(f"EP={ep} must divide DP={dp}")
    world = init_device_mesh(device_type, (pp, dp // ep, ep, tp), mesh_dim_names=("pp", "edp", "ep", "tp"))
    dp_mesh = world["edp", "ep"]._flatten("dp")
    return Meshes(world, dp_mesh, world["ep"], world["edp"])


def apply_expert_parallel(model: nn.Module, meshes: Meshes) -> None:
    """Split routed experts over the EP mesh and route tokens to them by all-to-all."""
    ep_mesh = meshes.ep
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(distribute_tensor(full.data, ep_mesh, [Shard(0)], src_data_rank=None)))
        experts.first_expert = ep_mesh.get_local_rank() * (moe.cfg.n_routed_experts // ep_mesh.size())
        if ep_mesh.size() > 1:
            moe.dispatcher = ExpertParallelDispatcher(ep_mesh.get_group(), moe.cfg.n_routed_experts)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute in backward instead of storing: ``full`` = whole decoder layers, ``selective`` = the
    attention blocks only (the MoE activations stay). Composable checkpoint keeps parameter names.
    Apply before FSDP."""
    from torch.distributed._composable import checkpoint

    if mode == "none":
        return
    for layer in list(model.layers.values()) + list(model.mtp):
        checkpoint(layer if mode == "full" else layer.self_attn)


def apply_fsdp(model: nn.Module, meshes: Meshes, param_dtype: torch.dtype | None) -> None:
    """FSDP2: experts over edp (sharded on dim 1, keeping whole experts per rank), each layer and the root over dp."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    managed = []
    for layer in list(model.layers.values()) + list(model.mtp):
        if isinstance(layer.mlp, MoE):
            managed.append(fully_shard(layer.mlp.experts, mesh=meshes.edp, mp_policy=mp, reshard_after_forward=True,
                                       shard_placement_fn=lambda p: Shard(1)))
        managed.append(fully_shard(layer, mesh=meshes.dp, mp_policy=mp, reshard_after_forward=True))
    managed.append(fully_shard(model, mesh=meshes.dp, mp_policy=mp, reshard_after_forward=False))
    for m in managed:  # sum: the loss is already divided by the global token count
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def _generator(seed: int, *key) -> torch.Generator:
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate the (sharded) parameters on ``device`` and initialise them layout-independently.

    Matrices and embeddings ~ N(0, initializer_range), seeded by (seed, name[, expert]); norms 1;
    routing bias 0. Only this rank's region of each tensor is written.
    """
    model.to_empty(device=device)
    std = model.cfg.initializer_range
    expert_params = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters(recurse=False)}
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for name, p in model.named_parameters():
        local, region = local_region(p)
        if id(p) in norm_params:
            local.fill_(1.0)
        elif id(p) in expert_params:
            for i, e in enumerate(range(region[0].start, region[0].stop)):
                full = torch.empty(p.shape[1:]).normal_(0.0, std, generator=_generator(seed, name, e))
                local[i].copy_(full[region[1:]])
        else:
            full = torch.empty(p.shape).normal_(0.0, std, generator=_generator(seed, name))
            local.copy_(full[region])
    for m in model.modules():
        if isinstance(m, Router) and hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.zero_()
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()


def set_parallel(model: nn.Module, device_type: str, layout: dict) -> Meshes:
    """Build meshes from the plan's layout dict and parallelise the (meta-device) model in place."""
    meshes = build_meshes(device_type, layout["pp"], layout["dp"], layout["ep"], layout["tp"])
    apply_expert_parallel(model, meshes)
    return meshes


def dp_all_reduce(meshes: Meshes):
    """A callable that sums a tensor over the data-parallel ranks (for counts and expert loads)."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        if meshes.dp.size() > 1:
            dist.all_reduce(t, group=meshes.dp_group)
        return t
    return reduce
