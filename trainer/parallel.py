"""Apply the plan's layout to the model with torch.distributed: device mesh, expert parallel, FSDP2.

Mesh: (pp, edp, ep, cp, tp) with the data-parallel dimension dp = edp x ep (EP groups are consecutive
ranks, i.e. inside a node; CP groups too, inside them TP). Dense parameters are FSDP-sharded over
dp x cp (the ranks that hold different tokens); routed experts are split over ep (a DTensor Shard(0)
over the expert dimension, so checkpoints keep global shapes and reshard when EP changes) and
FSDP-sharded over edp x cp. Gradients are *summed* over those ranks: the trainer divides the loss by
the global token count itself, which makes any layout equal to one process.

Materialisation initialises each rank's shard from per-tensor (and per-expert) seeded generators, so
the weights do not depend on the layout.
"""

from __future__ import annotations

import functools
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
    dp: DeviceMesh  # data parallel: ranks that read different batches
    ep: DeviceMesh
    edp: DeviceMesh
    tp: DeviceMesh
    pp: DeviceMesh
    pp_size: int = 1
    cp: DeviceMesh | None = None  # context parallel: ranks that hold parts of the same sequences
    dp_cp: DeviceMesh | None = None  # every rank with its own tokens: FSDP, loss and token counts, expert loads
    edp_cp: DeviceMesh | None = None  # the replicas of an expert shard: its FSDP mesh

    @property
    def dp_group(self):
        return self.dp.get_group()

    @property
    def tokens_group(self):
        """The ranks whose token counts, losses and expert loads add up to the step's (DP x CP)."""
        return self.dp_cp.get_group()


def build_meshes(device_type: str, pp: int, dp: int, ep: int, tp: int, cp: int = 1) -> Meshes:
    if dp % ep:
        raise ValueError(f"EP={ep} must divide DP={dp}")
    world = init_device_mesh(device_type, (pp, dp // ep, ep, cp, tp), mesh_dim_names=("pp", "edp", "ep", "cp", "tp"))
    dp_mesh = world["edp", "ep"]._flatten("dp")
    dp_cp = world["edp", "ep", "cp"]._flatten("dp_cp")
    edp_cp = world["edp", "cp"]._flatten("edp_cp")
    return Meshes(world, dp_mesh, world["ep"], world["edp"], world["tp"], world["pp"], pp, world["cp"], dp_cp, edp_cp)


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the TP group (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward sums partial outputs over the TP group; backward is the identity (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class TensorParallelExperts:
    """Runs GroupedExperts whose weights are split over TP (gate/up by rows of F, down by columns).

    A plain callable, not a module, so the experts' parameters keep their one name."""

    def __init__(self, experts: GroupedExperts, group):
        self.inner = experts
        self.group = group

    def __call__(self, x, counts):
        return _ReduceFromTP.apply(self.inner(_CopyToTP.apply(x, self.group), counts), self.group)


def _lora_tp_styles():
    """TP styles for LoRA-wrapped linears: the adapters follow the base weight's split so that
    B(A(x)) is sharded (column-parallel: B by rows, A whole) or a partial sum (row-parallel: A by columns,
    B whole) exactly like the base output."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def shard(name, module, mesh, src, placements: dict):
        if name:  # distribute_module visits every submodule; the root call places them all
            return
        for owner, placement in placements.items():
            mod = module if owner == "" else getattr(module, owner)
            mod.register_parameter("weight", nn.Parameter(distribute_tensor(mod.weight, mesh, [placement], src_data_rank=src),
                                                          requires_grad=mod.weight.requires_grad))

    class LoRAColwise(ColwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            shard(name, module, device_mesh, self.src_data_rank, {"": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)})

    class LoRARowwise(RowwiseParallel):
        def _partition_linear_fn(self, name, module, device_mesh):
            shard(name, module, device_mesh, self.src_data_rank, {"": Shard(1), "lora_A": Shard(1), "lora_B": Replicate()})

    return LoRAColwise, LoRARowwise


def apply_sequence_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Sequence parallelism on top of TP: the residual stream is split along the sequence between TP
    ranks; norms run on the local part (their weights become replicated DTensors, so their gradients
    are summed over TP), attention, MLP and MoE gather the sequence on entry and scatter it on exit."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                                   PrepareModuleOutput, SequenceParallel, parallelize_module)

    seq, full = Shard(1), Replicate()
    for block in list(model.layers.values()) + list(model.mtp):
        plan = {
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(seq, None, None, None), desired_input_layouts=(full, None, None, None),
                                            use_local_output=True),
        }
        if isinstance(block.mlp, MoE):
            plan["mlp"] = PrepareModuleInputOutput(input_layouts=(seq,), desired_input_layouts=(full,), use_local_input=True,
                                                   output_layouts=(full,), desired_output_layouts=(seq,), use_local_output=True)
        else:
            plan["mlp"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(full,), use_local_output=True)
        if hasattr(block, "eh_proj"):  # an MTP module: its norms and input projection see the sequence split too
            plan.update({"enorm": SequenceParallel(), "hnorm": SequenceParallel(), "shared_head.norm": SequenceParallel(),
                         "eh_proj": ColwiseParallel(input_layouts=seq, output_layouts=seq)})
        parallelize_module(block, tp_mesh, plan)
    parallelize_module(model, tp_mesh, {
        "embed_tokens": PrepareModuleOutput(output_layouts=full, desired_output_layouts=seq),
        "norm": SequenceParallel(),
        "lm_head": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(full,), use_local_output=True),
    })


def apply_tensor_parallel(model: nn.Module, meshes: Meshes, etp: int, sp: bool = False) -> None:
    """Megatron-style TP with DTensor plans: per-head projections of MLA and the MLP inner dimension
    are split over TP (column-parallel in, row-parallel out). The low-rank q/kv down-projections,
    norms, router, embedding and output head stay replicated. With ETP = TP the routed experts are
    split the same way (EP must then be 1)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from torch.distributed.tensor import Replicate

    tp_mesh = meshes.tp
    if tp_mesh.size() == 1:
        return
    out = Shard(1) if sp else Replicate()  # row-parallel outputs: reduce-scatter over the sequence with SP
    lora_col, lora_row = _lora_tp_styles()

    def col(parent, name):
        return lora_col() if hasattr(getattr(parent, name), "lora_A") else ColwiseParallel()

    def row(parent, name, **kw):
        return lora_row(**kw) if hasattr(getattr(parent, name), "lora_A") else RowwiseParallel(**kw)

    for block in list(model.layers.values()) + list(model.mtp):
        attn = block.self_attn
        q = "q_b_proj" if hasattr(attn, "q_b_proj") else "q_proj"
        plan = {"kv_b_proj": col(attn, "kv_b_proj"), "o_proj": row(attn, "o_proj", output_layouts=out), q: col(attn, q)}
        parallelize_module(attn, tp_mesh, plan)
        attn.shared_key_hook = functools.partial(_CopyToTP.apply, group=tp_mesh.get_group())
        mlp = block.mlp if not isinstance(block.mlp, MoE) else block.mlp.shared_experts  # MoE gathers the sequence itself
        if mlp is not None:
            parallelize_module(mlp, tp_mesh, {"gate_proj": col(mlp, "gate_proj"), "up_proj": col(mlp, "up_proj"),
                                              "down_proj": row(mlp, "down_proj", output_layouts=out if mlp is block.mlp else Replicate())})
        if isinstance(block.mlp, MoE) and etp > 1:
            experts = block.mlp.experts
            for name, dim in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 2)):
                full = getattr(experts, name)
                setattr(experts, name, nn.Parameter(distribute_tensor(full.data, tp_mesh, [Shard(dim)], src_data_rank=None),
                                                     requires_grad=full.requires_grad))  # LoRA: stay frozen
            block.mlp.expert_runner = TensorParallelExperts(experts, tp_mesh.get_group())
    if sp:
        apply_sequence_parallel(model, tp_mesh)


def apply_expert_parallel(model: nn.Module, meshes: Meshes) -> None:
    """Split routed experts over the EP mesh and route tokens to them by all-to-all."""
    ep_mesh = meshes.ep
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(distribute_tensor(full.data, ep_mesh, [Shard(0)], src_data_rank=None),
                                                 requires_grad=full.requires_grad))  # LoRA: stay frozen
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


def _expert_fsdp_dim(p: nn.Parameter) -> Shard:
    """FSDP shards experts on a dimension EP/TP do not already split (whole experts stay together under EP)."""
    taken = {pl.dim for pl in getattr(p, "placements", ()) if isinstance(pl, Shard)}
    return Shard(1) if 0 in taken else Shard(0)


def apply_fsdp(model: nn.Module, meshes: Meshes, param_dtype: torch.dtype | None) -> None:
    """FSDP2: experts over edp x cp (sharded on dim 1, keeping whole experts per rank), each layer and the root
    over dp x cp (CP ranks hold different tokens of the same sequences: their gradients add up like DP's)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    managed = []
    for layer in list(model.layers.values()) + list(model.mtp):
        if isinstance(layer.mlp, MoE):
            managed.append(fully_shard(layer.mlp.experts, mesh=meshes.edp_cp, mp_policy=mp, reshard_after_forward=True,
                                       shard_placement_fn=_expert_fsdp_dim))
        managed.append(fully_shard(layer, mesh=meshes.dp_cp, mp_policy=mp, reshard_after_forward=True))
    managed.append(fully_shard(model, mesh=meshes.dp_cp, mp_policy=mp, reshard_after_forward=False))
    for m in managed:  # sum: the loss is already divided by the global token count
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def seeded_generator(seed: int, *key) -> torch.Generator:
    """A CPU generator seeded by (seed, key...): the same stream whatever the layout or order."""
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
                full = torch.empty(p.shape[1:]).normal_(0.0, std, generator=seeded_generator(seed, name, e))
                local[i].copy_(full[region[1:]])
        else:
            full = torch.empty(p.shape).normal_(0.0, std, generator=seeded_generator(seed, name))
            local.copy_(full[region])
    for m in model.modules():
        if isinstance(m, Router) and hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.zero_()
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()


def set_parallel(model: nn.Module, device_type: str, layout: dict) -> Meshes:
    """Build meshes from the plan's layout dict and parallelise the (meta-device) model in place."""
    if layout["etp"] not in (1, layout["tp"]) or (layout["etp"] > 1 and layout["ep"] > 1):
        raise SystemExit(f"moe-launch: error: the native trainer splits experts either by EP or by TP (ETP=TP with EP=1); "
                         f"plan has EP={layout['ep']} ETP={layout['etp']} TP={layout['tp']}")
    meshes = build_meshes(device_type, layout["pp"], layout["dp"], layout["ep"], layout["tp"], layout.get("cp", 1))
    if layout["etp"] == 1:
        apply_expert_parallel(model, meshes)
    apply_tensor_parallel(model, meshes, layout["etp"], sp=bool(layout.get("sp")))
    return meshes


def dp_all_reduce(meshes: Meshes):
    """A callable that sums a tensor over the ranks holding different tokens, DP x CP (counts, expert loads)."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        if meshes.dp_cp.size() > 1:
            dist.all_reduce(t, group=meshes.tokens_group)
        return t
    return reduce
