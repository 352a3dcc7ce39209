"""Per-GPU memory estimate for a recipe on a layout (torch-free, from the configs alone).

Static memory is counted tensor by tensor (``model.config.TensorSpec``), split the way each backend
splits it (torch.chunk semantics for uneven splits; the fullest rank is reported):

- native (FSDP2, what ``trainer/`` runs): fp32 parameters, fp32 gradients and AdamW's two fp32 moments
  (plus a 4-byte step counter per tensor) are all sharded: dense tensors over DP on dim 0 after TP,
  routed experts over the expert-data-parallel group after EP/ETP. Embedding and output head are
  replicated over TP. LoRA: gradients and optimizer states for the adapters only, frozen weights in
  bf16 when training in bf16. Plus the copies FSDP
  gathers (bf16 with mixed precision) for the layer in use and the next one, and the unsharded root.
- nemo (Megatron's distributed optimizer): bf16 weights 2 + fp32 grads 4 bytes per model-parallel-local
  parameter, fp32 master/Adam m/Adam v 12 bytes sharded over DP x CP (dense) or EDP (experts);
  vocab-parallel embedding and head. fp32 training: 4 + 4 + 8/d.

Activations: the tensors a MLA/MoE layer keeps for backward (bf16), per token, with TP/SP/ETP
sharding, reduced by the recompute setting, times the micro-batches a pipeline rank holds in flight
for the schedule; fp32 logits and their gradient on the last stage. Labelled margins: routing
imbalance on the MoE activations, NCCL/all-to-all buffers and the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.layout import Layout, megatron, rank_layers
from model.config import ModelConfig, TensorSpec

GiB = 1024**3
ROUTING_IMBALANCE = 0.25  # extra MoE activation memory for uneven expert load
CUDA_OVERHEAD_GIB = 1.5  # CUDA context, allocator fragmentation
COMM_BUFFERS_GIB = 2.0  # NCCL and all-to-all buffers
STATIC = ("weights", "grads", "optimizer")  # the items the trainer measures (memory.json)


@dataclass(frozen=True)
class MemoryEstimate:
    items: tuple[tuple[str, float], ...]  # (label, bytes) on one pipeline rank (estimate(): the fullest)
    pp_rank: int
    capacity: float  # bytes per GPU
    per: str = "GPU"  # "process" on a CPU profile

    @property
    def total(self) -> float:
        return sum(b for _, b in self.items)

    def get(self, label: str) -> float:
        return sum(b for k, b in self.items if k == label)

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


CP_SCORE_CHUNK_BYTES = 2**30  # model.chunked_attention.SCORE_BUDGET_BYTES (torch-free copy; a test keeps them equal)


def _activation_elems_per_token(m: ModelConfig, layer: int, lay: Layout, recompute: str,
                                latent_cp: bool = True) -> tuple[float, float]:
    """(dense part, MoE routed part) of the elements one layer keeps for backward per token, counted from
    what the model saves (tests/test_planner.py measures it with saved-tensor hooks): each RMSNorm keeps
    its input and normalised output and the next linear its weighted input; MLA its low-rank paths
    (replicated over TP), the kv_b output, and q, k, v (v padded to the q/k head size for flash
    attention) and the attention output; a SwiGLU its two projections, the activation and the product;
    routed experts their dispatched input and output (and the weighted output), per chosen expert; the
    router its fp32 scores. ``selective`` recomputes the attention block (the trainer checkpoints
    self_attn), ``full`` the whole layer (only its input is kept). Under CP with ``latent_cp`` (the native
    trainer: model.chunked_attention) attention keeps the gathered latent and rope key of the whole sequence
    instead of any K/V (expanded chunk by chunk, again in backward); else (NeMo's ring attention) K/V."""
    t = lay.tp
    tsp = t if lay.sp else 1
    h, H = m.hidden_size, m.num_attention_heads
    if recompute == "full":  # only the layer input is kept; the layer is recomputed in backward
        return h / tsp, 0.0
    if recompute == "selective":
        attn = h / tsp  # the attention block's input; its insides are recomputed
    else:
        low_rank = (3 * m.q_lora_rank if m.q_lora_rank else 0) + (m.kv_lora_rank + m.qk_rope_head_dim) + 2 * m.kv_lora_rank
        latent = m.kv_lora_rank + m.qk_rope_head_dim
        if lay.cp > 1 and latent_cp:  # q, the output (and o_proj's copy of it), fp32 log-sum-exp; the gathered latent
            attn = 3 * h / tsp + low_rank + H * (m.qk_head_dim + 2 * m.v_head_dim + 2) / t + lay.cp * latent
        else:  # the kv_b output, q, k, v (padded), the output; under CP (ring attention) k and v for all CP x tokens
            attn = 3 * h / tsp + low_rank + H * (m.qk_nope_head_dim + m.v_head_dim) / t + 4 * H * m.qk_head_dim / t
            attn += (lay.cp - 1) * (latent + H * (m.qk_nope_head_dim + m.v_head_dim) / t + 2 * H * m.qk_head_dim / t)
    mlp_in = 3 * h / tsp  # post-attention norm: input, normalised, weighted
    if m.is_moe_layer(layer):
        shared = 4 * m.n_shared_experts * m.moe_intermediate_size / t
        router = 2 * (2 * m.n_routed_experts + 4 * m.num_experts_per_tok)  # fp32 scores, choices: 2 bf16 elements each
        routed = m.num_experts_per_tok * (3 * h + 4 * m.moe_intermediate_size / lay.etp) / tsp
        return attn + mlp_in + shared + router / tsp, routed
    return attn + mlp_in + 4 * m.intermediate_size / t, 0.0


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


def chunk(n: int, parts: int, index: int = 0) -> int:
    """Rows part ``index`` gets when torch.chunk splits ``n`` rows ``parts`` ways (DTensor and FSDP2 both
    shard this way; the first parts are the fullest)."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_parallel_shape(t: TensorSpec, lay: Layout) -> list[int]:
    """The tensor's shape on one rank after EP (experts, dim 0) and TP/ETP, before data-parallel sharding."""
    shape = list(t.shape)
    if t.expert and lay.etp == 1:
        shape[0] = chunk(shape[0], lay.ep)
    if t.tp_dim is not None:
        shape[t.tp_dim] = chunk(shape[t.tp_dim], lay.etp if t.expert else lay.tp)
    return shape


def fsdp_local(t: TensorSpec, lay: Layout) -> int:
    """Elements FSDP2 keeps on the fullest rank: experts over their data-parallel group (on dim 1 when EP
    holds dim 0), the rest over DP. The native trainer's EP groups lie inside DP (experts are replicated
    over TP when ETP is 1), so its expert data-parallel group is DP / EP."""
    shape = model_parallel_shape(t, lay)
    if t.expert:
        dp = lay.dp * lay.cp
        dim, parts = (1 if lay.etp == 1 else 0), (dp // lay.ep if dp % lay.ep == 0 else lay.edp)
    else:
        dim, parts = 0, lay.dp * lay.cp
    shape[dim] = chunk(shape[dim], parts)
    return _numel(shape)


def lora_tensors(t: TensorSpec, rank: int) -> list[TensorSpec]:
    """LoRA's A [r, in] and B [out, r] of a wrapped linear, split over TP as its base is (column: B, row: A)."""
    out_f, in_f = t.shape
    return [TensorSpec(t.name + ".lora_A", (rank, in_f), 1 if t.tp_dim == 1 else None),
            TensorSpec(t.name + ".lora_B", (out_f, rank), 0 if t.tp_dim == 0 else None)]


def _group_key(recipe) -> tuple:
    m, peft = recipe.model, recipe.peft
    return (repr(m), peft.method, tuple(peft.targets), peft.rank, recipe.train.precision, recipe.backend.name)


def _group_tensors(recipe, kind: str, lay: Layout) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(frozen, trainable) tensors of one FSDP group kind: dense / moe layer, mtp block, embed, head."""
    m, peft = recipe.model, recipe.peft
    lora = peft.method == "lora"
    vocab_parallel = recipe.backend.name != "native"  # Megatron splits embedding and head over TP; the native trainer does not
    if kind in ("dense", "moe"):
        index = m.first_k_dense_replace if kind == "moe" else 0
        tensors = m.layer_tensors(index)
        adapters = [a for t in tensors if lora and t.name.rsplit(".", 1)[-1] in peft.targets and len(t.shape) == 2
                    and not t.expert and t.name != "mlp.gate" for a in lora_tensors(t, peft.rank)]
        return (tensors, adapters) if lora else ([], tensors)
    tensors = {"mtp": lambda: m.mtp_block_tensors(eh_proj_tp=lay.sp), "embed": lambda: [m.embedding_tensor(vocab_parallel)],
               "head": lambda: m.head_tensors(vocab_parallel)}[kind]()
    return (tensors, []) if lora else ([], tensors)  # LoRA adapts the decoder layers only


_GROUP_CACHE: dict[tuple, tuple] = {}


def _group_static(recipe, kind: str, lay: Layout, rkey: tuple) -> tuple:
    """Per-group sums, memoised (a search evaluates thousands of layouts of one model):
    (frozen FSDP-local, trainable FSDP-local, trainable tensors, unsharded model-parallel-local,
     frozen model-parallel-local, trainable dense model-parallel-local, trainable expert model-parallel-local)."""
    dp = lay.dp * lay.cp
    key = (rkey, kind, lay.tp, lay.ep, lay.etp, lay.sp, dp, lay.edp)
    hit = _GROUP_CACHE.get(key)
    if hit is None:
        frozen, trainable = _group_tensors(recipe, kind, lay)
        mp = lambda ts: sum(_numel(model_parallel_shape(t, lay)) for t in ts)  # noqa: E731
        hit = (sum(fsdp_local(t, lay) for t in frozen), sum(fsdp_local(t, lay) for t in trainable), len(trainable),
               mp(frozen) + mp(trainable), mp(frozen), mp([t for t in trainable if not t.expert]), mp([t for t in trainable if t.expert]))
        if len(_GROUP_CACHE) > 100_000:
            _GROUP_CACHE.clear()
        _GROUP_CACHE[key] = hit
    return hit


_PARAM_CACHE: dict[tuple, tuple] = {}


def group_params(recipe, kind: str, lay: Layout, rkey: tuple) -> tuple[int, int, int, int]:
    """Model-parallel-local elements of one FSDP group kind, what FSDP gathers and reduces (launcher.comm):
    (dense, experts, trainable dense, trainable experts)."""
    key = (rkey, kind, lay.tp, lay.ep, lay.etp, lay.sp)
    hit = _PARAM_CACHE.get(key)
    if hit is None:
        frozen, trainable = _group_tensors(recipe, kind, lay)
        mp = lambda ts, expert: sum(_numel(model_parallel_shape(t, lay)) for t in ts if t.expert == expert)  # noqa: E731
        hit = (mp(frozen, False) + mp(trainable, False), mp(frozen, True) + mp(trainable, True), mp(trainable, False), mp(trainable, True))
        if len(_PARAM_CACHE) > 100_000:
            _PARAM_CACHE.clear()
        _PARAM_CACHE[key] = hit
    return hit


def rank_groups(recipe, lay: Layout, r: int, layers: list[int]) -> dict[str, int]:
    """How many FSDP groups of each kind pipeline rank ``r`` holds (decoder layers, MTP blocks, root parts);
    ``layers``: its decoder layers (:func:`rank_layers`)."""
    m = recipe.model
    last = (lay.pp * lay.vpp - 1) % lay.pp
    uses_mtp = m.num_nextn_predict_layers > 0 and (lay.pp == 1 or recipe.train.mtp_loss_weight > 0)
    moe = sum(1 for i in layers if i >= m.first_k_dense_replace) if m.n_routed_experts else 0
    return {"dense": len(layers) - moe, "moe": moe,
            "mtp": m.num_nextn_predict_layers if r == last and uses_mtp else 0,
            # the last stage keeps a copy of the embedding for MTP
            "embed": 1 if r == 0 or (r == last and uses_mtp and lay.pp > 1) else 0,
            "head": 1 if r == last else 0}


def static_items(recipe, lay: Layout, groups: dict[str, int], rkey: tuple) -> list[tuple[str, float]]:
    """Weights, gradients and optimizer states of a pipeline rank holding ``groups`` (its
    :func:`rank_groups`; the fullest DP/TP rank), in bytes."""
    bf16 = recipe.train.precision == "bf16"
    counts = {k: n for k, n in groups.items() if n}
    g = {k: _group_static(recipe, k, lay, rkey) for k in counts}
    total = lambda i, kinds=None: sum(counts[k] * g[k][i] for k in counts if kinds is None or k in kinds)  # noqa: E731
    if recipe.backend.name == "native":
        frozen_bytes = 2 if bf16 else 4  # LoRA: the trainer keeps frozen weights in bf16 (trainer.lora.freeze_in_bf16)
        local_t = total(1)
        items = [("weights", 4 * local_t + frozen_bytes * total(0)), ("grads", 4 * local_t),
                 ("optimizer", 8 * local_t + 4 * total(2))]
        if lay.dp * lay.cp > 1 or lay.edp > 1:
            # FSDP gathers a layer's parameters for its forward and backward, one layer ahead, and
            # reduce-scatters its fp32 gradients; the root module (embedding, head) stays gathered.
            biggest = max([g[k][3] for k in ("dense", "moe", "mtp") if k in counts] or [0])
            root = total(3, ("embed", "head"))
            items.append(("fsdp gather buffers", (2 if bf16 else 4) * (2 * biggest + root) + 4 * biggest))
        return items
    w, opt = (2, 12) if bf16 else (4, 8)
    dense_t, exp_t = total(5), total(6)
    return [("weights", w * (total(4) + dense_t + exp_t)), ("grads", 4 * (dense_t + exp_t)),
            ("optimizer", opt * dense_t / (lay.dp * lay.cp) + opt * exp_t / lay.edp)]


def estimate_ranks(recipe, lay: Layout, capacity_gib: float, device: str = "cuda") -> list[MemoryEstimate]:
    """Memory of every pipeline rank of ``lay`` (``recipe`` is a launcher.recipe.Recipe)."""
    m, train, par = recipe.model, recipe.train, recipe.parallel
    micro = max(train.global_batch_size // max(train.micro_batch_size * lay.dp, 1), 1)
    tokens = train.micro_batch_size * recipe.data.seq_length / lay.cp
    last = (lay.pp * lay.vpp - 1) % lay.pp
    rkey = _group_key(recipe)
    latent_cp = recipe.backend.name == "native"
    per_layer = {kind: _activation_elems_per_token(m, m.first_k_dense_replace if kind == "moe" else 0, lay, par.recompute, latent_cp)
                 for kind in ("dense", "moe")}
    static_memo: dict[tuple, list] = {}  # ranks holding the same groups hold the same static bytes
    out = []
    for r, layers in enumerate(rank_layers(m.num_hidden_layers, lay.pp, lay.vpp, megatron(recipe))):
        counts = rank_groups(recipe, lay, r, layers)
        key = tuple(counts.values())
        if key not in static_memo:
            static_memo[key] = static_items(recipe, lay, counts, rkey)
        items = list(static_memo[key])
        dense_act = per_layer["dense"][0] * counts["dense"] + per_layer["moe"][0] * counts["moe"]
        routed_act = per_layer["moe"][1] * counts["moe"]
        if par.recompute == "full" and layers:  # plus one layer's full working set during its recompute
            d, e = _activation_elems_per_token(m, layers[-1], lay, "none", latent_cp)
            dense_act, routed_act = dense_act + d, routed_act + e
        flight = in_flight(par.pp_schedule, lay.pp, lay.vpp, r, micro)
        items.append(("activations", (dense_act + routed_act) * tokens * 2 * flight))
        if lay.cp > 1 and latent_cp:  # one chunk's scores and probabilities (model.chunked_attention)
            items.append(("cp attention chunk", CP_SCORE_CHUNK_BYTES))
        items.append(("routing imbalance margin", routed_act * tokens * 2 * flight * ROUTING_IMBALANCE))
        if r == last:
            heads = 1 + m.num_nextn_predict_layers
            items.append(("logits", tokens * m.vocab_size / lay.tp * 4 * 2 * heads))
        if device == "cuda":
            items += [("comm buffers", COMM_BUFFERS_GIB * GiB), ("cuda context", CUDA_OVERHEAD_GIB * GiB)]
        out.append(MemoryEstimate(tuple(items), r, capacity_gib * GiB, "process" if device == "cpu" else "GPU"))
    return out


def estimate(recipe, lay: Layout, capacity_gib: float, device: str = "cuda") -> MemoryEstimate:
    """Memory on the fullest pipeline rank of ``lay``."""
    return max(estimate_ranks(recipe, lay, capacity_gib, device), key=lambda e: e.total)
