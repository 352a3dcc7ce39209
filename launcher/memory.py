"""Per-GPU memory estimate for a recipe on a layout (torch-free, from the configs alone).

Model (see shared/reference/deepseek-v3-family.md):
- static bytes per parameter with a distributed optimizer: bf16 weights 2 + fp32 grads 4 +
  fp32 master/Adam m/Adam v 12 sharded over the data-parallel group (dense parameters over DP x CP,
  routed experts over the expert-data-parallel group). fp32 training: 4 + 4 + 8/d. LoRA: frozen
  weights only, plus the adapters as trainable.
- activations: the tensors a MLA/MoE layer keeps for backward (bf16), per token, with
  TP/SP/ETP sharding, reduced by the recompute setting, times the micro-batches a pipeline rank
  holds in flight for the schedule; fp32 logits and their gradient on the last stage.
- labelled margins: routing imbalance on the MoE activations, NCCL/all-to-all buffers and the
  CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.layout import Layout, rank_layers
from model.config import ModelConfig

GiB = 1024**3
ROUTING_IMBALANCE = 0.25  # extra MoE activation memory for uneven expert load
CUDA_OVERHEAD_GIB = 1.5  # CUDA context, allocator fragmentation
COMM_BUFFERS_GIB = 2.0  # NCCL and all-to-all buffers


@dataclass(frozen=True)
class MemoryEstimate:
    items: tuple[tuple[str, float], ...]  # (label, bytes) on the fullest pipeline rank
    pp_rank: int
    capacity: float  # bytes per GPU
    per: str = "GPU"  # "process" on a CPU profile

    @property
    def total(self) -> float:
        return sum(b for _, b in self.items)

    @property
    def verdict(self) -> str:
        if self.total <= 0.9 * self.capacity:
            return "fits"
        return "at risk" if self.total <= self.capacity else "won't fit"

    def biggest(self, n: int = 3) -> str:
        top = sorted(self.items, key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{label} {fmt_bytes(b)}" for label, b in top if b > 0)

    def summary(self) -> str:
        return (f"{self.verdict}: ~{fmt_bytes(self.total)} of {fmt_bytes(self.capacity)} per {self.per} "
                f"(pipeline rank {self.pp_rank}; biggest: {self.biggest()})")


def fmt_bytes(b: float) -> str:
    return f"{b / GiB:.1f} GiB" if b >= GiB else f"{b / 1024**2:.1f} MiB"


def _lora_shapes(m: ModelConfig, layer: int) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of each LoRA-targetable linear in a layer. gate/up/down cover dense MLPs and shared experts."""
    h, H = m.hidden_size, m.num_attention_heads
    s = {
        "kv_a_proj_with_mqa": [(h, m.kv_lora_rank + m.qk_rope_head_dim)],
        "kv_b_proj": [(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim))],
        "o_proj": [(H * m.v_head_dim, h)],
    }
    if m.q_lora_rank:
        s["q_a_proj"] = [(h, m.q_lora_rank)]
        s["q_b_proj"] = [(m.q_lora_rank, H * m.qk_head_dim)]
    else:
        s["q_proj"] = [(h, H * m.qk_head_dim)]
    inter = m.n_shared_experts * m.moe_intermediate_size if m.is_moe_layer(layer) else m.intermediate_size
    if inter:
        s["gate_proj"] = [(h, inter)]
        s["up_proj"] = [(h, inter)]
        s["down_proj"] = [(inter, h)]
    return s


def lora_params(m: ModelConfig, layers: list[int], targets: list[str], rank: int) -> int:
    return sum(rank * (i + o) for L in layers for name, shapes in _lora_shapes(m, L).items() if name in targets for i, o in shapes)


def _activation_elems_per_token(m: ModelConfig, layer: int, lay: Layout, recompute: str) -> tuple[float, float]:
    """(dense part, MoE routed part) of the bf16 elements one layer keeps per token."""
    t = lay.tp
    tsp = t if lay.sp else 1
    h, H = m.hidden_size, m.num_attention_heads
    if recompute == "full":  # only the layer input is kept; the layer is recomputed in backward
        return h / tsp, 0.0
    # MLA: low-rank paths are replicated over TP, per-head tensors are split.
    low_rank = 2 * (m.q_lora_rank or 0) + 2 * m.kv_lora_rank + 2 * m.qk_rope_head_dim
    heads = H * (m.qk_nope_head_dim + m.v_head_dim) / t  # kv_b output
    core = (2 * H * m.qk_head_dim + 2 * H * m.v_head_dim) / t  # q, k, v, attention output
    attn = 3 * h / tsp + low_rank + heads + (0 if recompute == "selective" else core)
    act = 1 if recompute != "selective" else 0  # SwiGLU activation output, recomputed when selective
    if m.is_moe_layer(layer):
        shared = (2 + act) * m.n_shared_experts * m.moe_intermediate_size / t
        routed = m.num_experts_per_tok * (2 * h + (2 + act) * m.moe_intermediate_size / lay.etp) / tsp
        return attn + 2 * h / tsp + shared, routed
    return attn + 2 * h / tsp + (2 + act) * m.intermediate_size / t, 0.0


def in_flight(schedule: str, pp: int, vpp: int, rank: int, microbatches: int) -> float:
    """Micro-batches whose activations pipeline rank ``rank`` holds at its peak."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(microbatches)
    n = float(min(pp - rank, microbatches))
    if schedule == "interleaved_1f1b" and vpp > 1:
        n *= 1 + (pp - 1) / (pp * vpp)
    return n


def estimate(recipe, lay: Layout, capacity_gib: float, device: str = "cuda") -> MemoryEstimate:
    """Memory on the fullest pipeline rank of ``lay`` (``recipe`` is a launcher.recipe.Recipe)."""
    m, train, par = recipe.model, recipe.train, recipe.parallel
    lora = recipe.peft.method == "lora"
    w_bytes = 2 if train.precision == "bf16" else 4
    d_dense, d_exp = lay.dp * lay.cp, lay.edp
    micro = max(train.global_batch_size // max(train.micro_batch_size * lay.dp, 1), 1)
    tokens = train.micro_batch_size * recipe.data.seq_length / lay.cp
    last = (lay.pp * lay.vpp - 1) % lay.pp
    best = None
    for r, layers in enumerate(rank_layers(m.num_hidden_layers, lay.pp, lay.vpp)):
        dense = sum(m.layer_params(i).dense for i in layers)
        experts = sum(m.layer_params(i).experts for i in layers)
        if r == 0:
            dense += m.embedding_params()
        if r == last:
            mtp = m.mtp_params()
            dense += m.head_params() + mtp.dense
            experts += mtp.experts
        dense_gpu, exp_gpu = dense / lay.tp, experts / (lay.ep * lay.etp)
        items: list[tuple[str, float]] = [("weights", (dense_gpu + exp_gpu) * w_bytes)]
        if lora:
            adapters = lora_params(m, layers, recipe.peft.targets, recipe.peft.rank) / lay.tp
            items += [("grads", adapters * 4), ("optimizer", adapters * (12 if w_bytes == 2 else 8) / d_dense),
                      ("lora adapters", adapters * w_bytes)]
        else:
            opt = 12 if w_bytes == 2 else 8
            items += [("grads", (dense_gpu + exp_gpu) * 4), ("optimizer", dense_gpu * opt / d_dense + exp_gpu * opt / d_exp)]
        dense_act = routed_act = 0.0
        for i in layers:
            d, e = _activation_elems_per_token(m, i, lay, par.recompute)
            dense_act += d
            routed_act += e
        if par.recompute == "full" and layers:  # plus one layer's full working set during its recompute
            d, e = _activation_elems_per_token(m, layers[-1], lay, "none")
            dense_act, routed_act = dense_act + d, routed_act + e
        flight = in_flight(par.pp_schedule, lay.pp, lay.vpp, r, micro)
        items.append(("activations", (dense_act + routed_act) * tokens * 2 * flight))
        items.append(("routing imbalance margin", routed_act * tokens * 2 * flight * ROUTING_IMBALANCE))
        if r == last:
            heads = 1 + m.num_nextn_predict_layers
            items.append(("logits", tokens * m.vocab_size / lay.tp * 4 * 2 * heads))
        if device == "cuda":
            items += [("comm buffers", COMM_BUFFERS_GIB * GiB), ("cuda context", CUDA_OVERHEAD_GIB * GiB)]
        est = MemoryEstimate(tuple(items), r, capacity_gib * GiB, "process" if device == "cpu" else "GPU")
        if best is None or est.total > best.total:
            best = est
    return best
