"""Mixture of Experts: router variants, grouped experts, shared experts, load balancing.

Routing (per token, scores in fp32):
- V3 (``sigmoid``/``noaux_tc``): s = sigmoid(x W^T); choose with s + correction bias, restricted to the
  ``topk_group`` expert groups with the best sum of their top-2 biased scores; weights are the
  *unbiased* s of the chosen experts, renormalised (norm_topk_prob: w / (sum w + 1e-20), for any k,
  k = 1 included) and then multiplied by routed_scaling.
- V2 (``softmax``/``greedy`` or ``group_limited_greedy``): s = softmax(x W^T); top-k (within the best
  groups by max score for the group-limited variant); weights s * routed_scaling (V2 checkpoints have
  norm_topk_prob false; transformers' DeepseekV2 never renormalises, see ``model.hf_config``).

Aux-loss-free balancing: each MoE layer counts the tokens sent to each expert (``tokens_per_expert``,
no gradient); :func:`update_expert_bias` moves the correction bias against the load, outside autograd.
The optional sequence-wise auxiliary loss reaches the router through :class:`AuxLossGrad`, so it needs
no plumbing through the model's outputs (and works under pipelining and recomputation).

Dispatch: token copies are sorted by expert and run through one grouped matmul per projection
(``torch.nn.functional.grouped_mm``), with a per-expert loop as fallback; no Python loop over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            # fp32 buffer, updated by update_expert_bias (never by the optimizer)
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] fp32, expert ids [T, k], scores [T, E] fp32)."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if cfg.topk_method == "noaux_tc" else scores
        if cfg.n_group > 1 and cfg.topk_method in ("noaux_tc", "group_limited_greedy"):
            grouped = choice.view(-1, cfg.n_group, self.n_experts // cfg.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1) if cfg.topk_method == "noaux_tc" else grouped.amax(-1)
            keep = group_score.topk(cfg.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(self.n_experts // cfg.n_group, dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:  # for any k, k = 1 included (transformers' DeepseekV3TopkRouter; not only k > 1)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids, scores


class GroupedExperts(nn.Module):
    """The routed experts of one layer as stacked weights: gate/up [E, F, H], down [E, H, F].

    Under expert parallelism a rank holds experts [first_expert, first_expert + E_local).
    """

    def __init__(self, n_experts: int, hidden: int, inter: int, first_expert: int = 0):
        super().__init__()
        self.first_expert = first_expert
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))

    @property
    def n_local(self) -> int:
        p = self.gate_proj
        return (p.to_local() if hasattr(p, "to_local") else p).shape[0]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, H] sorted by expert, counts [E_local] -> [N, H]."""
        # Under expert parallelism the weights are DTensors split over experts: compute on the local part.
        gate, up, down = (p.to_local() if hasattr(p, "to_local") else p for p in (self.gate_proj, self.up_proj, self.down_proj))
        if _grouped_mm_ok(x, gate, down):
            offs = counts.cumsum(0).to(torch.int32)
            g = F.grouped_mm(x, gate.transpose(-2, -1), offs=offs)
            u = F.grouped_mm(x, up.transpose(-2, -1), offs=offs)
            return F.grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)
        outs = []
        for e, chunk in enumerate(torch.split(x, counts.tolist())):
            h = F.silu(chunk @ gate[e].t()) * (chunk @ up[e].t())
            outs.append(h @ down[e].t())
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


def _grouped_mm_ok(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned rows; on CUDA it also needs bf16 on sm90+ (else fall back)."""
    if not hasattr(F, "grouped_mm") or x.dtype != w_in.dtype:
        return False
    if x.is_cuda and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9):
        return False
    align = 16 // x.element_size()
    return all(d % align == 0 for d in (w_in.shape[-1], w_in.shape[-2], w_out.shape[-1]))


class AuxLossGrad(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient ``scale`` into ``aux`` (Megatron's trick)."""

    scale = 1.0  # set by the trainer to the main loss's scaling (e.g. 1 / gradient-accumulation steps)

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, AuxLossGrad.scale)


def sequence_aux_loss(scores: torch.Tensor, ids: torch.Tensor, batch: int, alpha: float, cp=None) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: alpha * mean_seq sum_i f_i P_i.

    ``cp`` (context parallelism: this rank holds part of each sequence): f and P are statistics of the whole
    sequence, so the counts and affinity sums are summed over the CP ranks; the gradient reaches only this
    rank's tokens (the other ranks' parts enter as constants; CP gradients are summed afterwards)."""
    n_exp, k = scores.shape[-1], ids.shape[-1]
    probs = (scores / scores.sum(-1, keepdim=True)).view(batch, -1, n_exp)  # normalised affinities
    seq = probs.shape[1]
    counts = torch.zeros(batch, n_exp, device=scores.device).scatter_add_(1, ids.view(batch, -1), torch.ones(batch, seq * k, device=scores.device))
    prob_sum = probs.sum(1)
    if cp is not None:
        counts = cp.all_reduce(counts)
        prob_sum = prob_sum + (cp.all_reduce(prob_sum.detach()) - prob_sum.detach())
        seq = seq * cp.size
    f = counts * n_exp / (k * seq)
    return alpha * (f * prob_sum / seq).sum(-1).mean()


class MoE(nn.Module):
    """Routed experts + shared experts. ``dispatcher`` (set for expert parallelism) moves tokens between ranks."""

    def __init__(self, cfg: ModelConfig, n_local_experts: int | None = None, first_expert: int = 0):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(n_local_experts or cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, first_expert)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)
        self.dispatcher = None  # None: all experts local
        self.expert_runner = None  # None: self.experts; tensor parallelism wraps them

    def forward(self, x: torch.Tensor, cp=None) -> torch.Tensor:
        """x [B, S, H]; ``cp``: context parallelism (trainer.context_parallel), for the sequence-wise aux loss."""
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        weights, ids, scores = self.gate(flat)
        if self.training and torch._C._current_graph_task_id() == -1:  # training load; not during a backward-time recomputation
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(ids.flatten(), minlength=self.cfg.n_routed_experts).float()
        out = self.route(flat, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        out = out.view(b, s, h)
        if self.training and self.cfg.aux_loss_alpha > 0 and torch.is_grad_enabled():
            out = AuxLossGrad.apply(out, sequence_aux_loss(scores, ids, b, self.cfg.aux_loss_alpha, cp))
        return out

    def route(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Send each token's copies to its experts, weight their outputs and sum them back per token."""
        k = ids.shape[1]
        flat_ids = ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        token = order // k
        counts = torch.bincount(flat_ids, minlength=self.cfg.n_routed_experts)
        xs = x.index_select(0, token)
        experts = self.expert_runner or self.experts
        ys = self.dispatcher(xs, counts, experts) if self.dispatcher is not None else experts(xs, counts)
        ys = (ys.float() * weights.flatten()[order].unsqueeze(-1)).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)


def moe_layers(model: nn.Module) -> list[tuple[int, "MoE"]]:
    """(decoder-layer index, MoE) of every MoE layer ``model`` holds (a pipeline rank: its own), MTP layers
    numbered after the main ones (as in HF checkpoints: layer 61 is DeepSeek-V3's MTP layer)."""
    out = [(int(name), block.mlp) for name, block in model.layers.items() if isinstance(block.mlp, MoE)]
    return out + [(model.cfg.num_hidden_layers + k, block.mlp) for k, block in enumerate(getattr(model, "mtp", ()))
                  if isinstance(block.mlp, MoE)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float, all_reduce=None) -> torch.Tensor | None:
    """Aux-loss-free balancing step: bias += rate * sign(mean load - load), then reset the counters.

    ``all_reduce`` (a callable on a tensor) sums the loads over data/expert-parallel ranks first, so every
    rank applies the same update. Returns the step's global loads [MoE layers, experts], in
    :func:`moe_layers` order (None without MoE layers).
    """
    layers = [m for _, m in moe_layers(model)]
    if not layers:
        return None
    loads = torch.stack([m.tokens_per_expert for m in layers])
    if all_reduce is not None:
        all_reduce(loads)
    for m, load in zip(layers, loads):
        if hasattr(m.gate, "e_score_correction_bias") and rate > 0 and load.sum() > 0:
            delta = torch.sign(load.mean() - load)
            m.gate.e_score_correction_bias += rate * (delta - delta.mean())
        m.tokens_per_expert.zero_()
    return loads


def imbalance(loads: torch.Tensor) -> float:
    """The worst layer's max/mean expert load."""
    return float((loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)).max())
