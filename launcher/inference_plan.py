"""The layout of a generation or evaluation job (torch-free): TP and EP over the fewest nodes that hold it.

Inference keeps no gradients or optimizer states and no FSDP sharding: every rank holds its TP part of
the dense weights and its EP part of the routed experts, in the serving dtype, plus the compressed
KV cache of its batch (MLA caches kv_lora_rank + qk_rope_head_dim values per token and layer, the
same on every TP rank) and the logits of one step. The MTP modules are not needed to generate and
are not loaded. Data parallelism (different prompts per rank) takes the rest of the world.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.cluster import ClusterProfile
from launcher.layout import Layout
from launcher.memory import fmt_bytes
from model.config import ModelConfig

CUDA_CONTEXT_GIB = 1.5  # the planner's margin for the CUDA context and allocator (as in launcher.memory)
USABLE = 0.9  # of the device memory


@dataclass(frozen=True)
class InferencePlan:
    layout: Layout
    weights_bytes: int
    cache_bytes: int
    activation_bytes: int
    capacity_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.cache_bytes + self.activation_bytes

    def describe(self) -> str:
        lay = self.layout
        return (f"TP{lay.tp} EP{lay.ep} DP{lay.dp} on {lay.nodes} node{'s' * (lay.nodes > 1)} x {lay.gpus_per_node}: "
                f"~{fmt_bytes(self.total_bytes)} of {fmt_bytes(self.capacity_bytes)} per rank (weights {fmt_bytes(self.weights_bytes)}, "
                f"KV cache {fmt_bytes(self.cache_bytes)}, activations {fmt_bytes(self.activation_bytes)})")


def weight_bytes(cfg: ModelConfig, tp: int, ep: int, dtype_bytes: int) -> int:
    """One rank's weights: TP splits what the trainer's TP plan splits, EP the routed experts (split over EP
    only: ETP = 1), embedding and head replicated; no MTP."""
    n = 0
    for i in range(cfg.num_hidden_layers):
        for t in cfg.layer_tensors(i):
            n += t.numel // (ep if t.expert else tp if t.tp_dim is not None else 1)
    n += cfg.embedding_tensor(False).numel + sum(t.numel for t in cfg.head_tensors(False))
    return n * dtype_bytes


def cache_bytes(cfg: ModelConfig, batch: int, tokens: int, dtype_bytes: int) -> int:
    """MLA's compressed cache: (kv_lora_rank + qk_rope_head_dim) values per token per layer."""
    return batch * tokens * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes


def activation_bytes(cfg: ModelConfig, tp: int, batch: int, prompt: int, dtype_bytes: int) -> int:
    """The prefill's peak: one layer's queries and expanded keys/values of the prompt (heads split over TP),
    the MoE's token copies, plus fp32 logits of the last positions."""
    heads = cfg.num_attention_heads // tp
    attn = batch * prompt * heads * (3 * cfg.qk_head_dim) * dtype_bytes
    moe = batch * prompt * max(cfg.num_experts_per_tok, 1) * (cfg.hidden_size + 3 * cfg.moe_intermediate_size) * dtype_bytes
    return attn + moe + batch * cfg.vocab_size * 4 * 2


def plan(cfg: ModelConfig, profile: ClusterProfile, *, dtype_bytes: int, batch: int, prompt_tokens: int, new_tokens: int,
         nodes: int | None = None, tp: int | None = None, ep: int | None = None) -> tuple[InferencePlan | None, InferencePlan]:
    """(the chosen plan or None, the best plan tried). Fewest nodes first, then the smallest TP and EP
    that fit; ``nodes``, ``tp``, ``ep`` fix those dimensions. Raises ValueError for a dimension that
    cannot be valid, naming the valid values."""
    gpn = profile.gpus_per_node
    capacity = int(profile.gpu.memory_gb * USABLE * 2**30) - (int(CUDA_CONTEXT_GIB * 2**30) if profile.device == "cuda" else 0)
    experts = max(cfg.n_routed_experts, 1)
    tps = [d for d in range(1, gpn + 1) if gpn % d == 0 and cfg.num_attention_heads % d == 0
           and (not cfg.num_dense_layers or cfg.intermediate_size % d == 0)]
    if tp is not None and tp not in tps:
        raise ValueError(f"--tp: TP={tp} must divide the {cfg.num_attention_heads} attention heads and the "
                         f"{gpn} GPUs of a node; valid: {', '.join(map(str, tps))}")
    node_counts = [nodes] if nodes is not None else list(range(1, profile.nodes + 1))
    best: InferencePlan | None = None
    for n in node_counts:
        world = n * gpn
        for t in [tp] if tp is not None else tps:
            dp = world // t
            eps = [d for d in range(1, dp + 1) if dp % d == 0 and experts % d == 0]
            if ep is not None:
                if ep not in eps:
                    raise ValueError(f"--ep: EP={ep} must divide the {experts} routed experts and the {dp} data-parallel "
                                     f"ranks (world {world} / TP {t}); valid: {', '.join(map(str, eps))}")
                eps = [ep]
            for e in eps:
                layout = Layout(tp=t, pp=1, vpp=1, cp=1, ep=e, etp=1, dp=dp, sp=False, nodes=n, gpus_per_node=gpn)
                p = InferencePlan(layout, weight_bytes(cfg, t, e, dtype_bytes),
                                  cache_bytes(cfg, batch, prompt_tokens + new_tokens, dtype_bytes),
                                  activation_bytes(cfg, t, batch, prompt_tokens, dtype_bytes), capacity)
                if p.total_bytes <= capacity:
                    return p, p
                if best is None or p.total_bytes < best.total_bytes:
                    best = p
    return None, best
