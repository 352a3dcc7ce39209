"""Communication volumes, torch-free (the planner and benchmarks/cp_comm.py use the same formulas).

Context parallelism for MLA (trainer.context_parallel): per layer, each CP rank all-gathers the other
ranks' normalised latent and rotated rope key (kv_lora_rank + qk_rope_head_dim values per token) and
in backward reduce-scatters their gradients: (CP - 1) / CP of the sequence's latent each way. Under TP
the latent is the same on every TP rank, so each sends 1/TP of it over CP and the TP group (inside a
node) all-gathers the slices: the CP traffic per rank is divided by TP (the intra-node part is not counted).
Ring attention over full K/V (PyTorch's context_parallel, TransformerEngine's p2p) passes each rank's
K and V blocks (heads / TP x (qk_head_dim + v_head_dim) values per token) around the ring in forward,
and in backward K and V again plus their gradient accumulators (twice the forward volume).
Bytes are what one rank receives per layer per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CPBytes:
    latent_forward: float
    latent_backward: float
    ring_forward: float
    ring_backward: float

    @property
    def ours(self) -> float:
        return self.latent_forward + self.latent_backward

    @property
    def ring(self) -> float:
        return self.ring_forward + self.ring_backward

    @property
    def ratio(self) -> float:
        return self.ring / self.ours if self.ours else float("inf")


def cp_attention_bytes(cfg, seq_length: int, cp: int, tp: int = 1, micro_batch: int = 1, dtype_bytes: int = 2) -> CPBytes:
    """Bytes one CP rank receives per MLA layer and micro-batch (``cfg``: model.config.ModelConfig)."""
    others = micro_batch * seq_length * (cp - 1) / cp  # tokens held by the other CP ranks
    latent = others * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes / tp
    kv = others * cfg.num_attention_heads / tp * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
    return CPBytes(latent, latent, kv, 2 * kv)


# ----------------------------------------------------------------------------- per-step communication of a layout
# What one rank of the fullest pipeline stage sends per training step, term by term, split into the bytes that
# stay inside its node and those that cross the network, with times from the profile's interconnect. Ring
# algorithms: an all-gather or reduce-scatter over n ranks sends (n-1)/n of the full tensor per rank, an
# all-reduce twice that; an all-to-all sends the (n-1)/n of its input that belongs to other ranks.
#
# Overlap, as the native trainer runs (and Megatron with its defaults): FSDP's parameter all-gathers and
# gradient reduce-scatters are prefetched behind compute (exposed only beyond the compute time); TP/SP,
# the expert all-to-all, pipeline send/recv and CP's latent gather sit on the critical path (exposed).


@dataclass(frozen=True)
class CommTerm:
    name: str
    what: str  # the collective and its operand
    intra_bytes: float
    inter_bytes: float
    ops: int  # collective calls per step (latency)
    overlapped: bool

    @property
    def bytes(self) -> float:
        return self.intra_bytes + self.inter_bytes

    def seconds(self, net) -> float:
        """``net``: launcher.cluster.Interconnect (GB/s per GPU inside a node and across nodes, latency)."""
        return (self.intra_bytes / (net.intra_node_gbps * 1e9) + self.inter_bytes / (net.inter_node_gbps * 1e9)
                + self.ops * net.latency_us * 1e-6)


def _split(total: float, peers_in_node: int, peers: int) -> tuple[float, float]:
    """(intra, inter) of traffic spread evenly over ``peers`` other ranks, ``peers_in_node`` of them in this node."""
    if peers <= 0:
        return 0.0, 0.0
    intra = total * min(peers_in_node, peers) / peers
    return intra, total - intra


MESH = ("pp", "edp", "ep", "cp", "tp")  # trainer.parallel.build_meshes: TP innermost


def members_in_node(lay, dims: tuple[str, ...], gpn: int) -> int:
    """Members of rank 0's process group over mesh ``dims`` that share its node (ranks fill nodes in order, as
    torchrun places them): itself included."""
    sizes = {"pp": lay.pp, "edp": lay.edp, "ep": lay.ep, "cp": lay.cp, "tp": lay.tp}
    stride, strides = 1, {}
    for d in reversed(MESH):
        strides[d] = stride
        stride *= sizes[d]
    ranks = [0]
    for d in dims:
        ranks = [r + i * strides[d] for r in ranks for i in range(sizes[d])]
    return sum(1 for r in ranks if r < gpn)


RECOMPUTE_FORWARD = {"none": 0.0, "selective": 0.5, "full": 1.0}  # forward comm replayed in backward (share of the layer's)


def step_terms(recipe, lay, gpus_per_node: int, pp_rank: int | None = None) -> list[CommTerm]:
    """The per-step communication of one rank of pipeline rank ``pp_rank`` of ``lay`` (default: the one with
    the most layers; ``recipe``: launcher.recipe.Recipe).

    The device mesh is (pp, edp, ep, cp, tp), TP innermost (trainer.parallel.build_meshes): TP groups are
    consecutive ranks, CP groups ranks TP apart, EP groups ranks CP x TP apart, DP groups ranks CP x TP apart
    (EP inside DP), PP neighbours world / PP apart."""
    from launcher.layout import megatron, rank_layers
    from launcher.memory import _group_key, group_params, rank_groups

    m, t, par = recipe.model, recipe.train, recipe.parallel
    act = 2 if t.precision == "bf16" else 4
    micro = max(t.global_batch_size // max(t.micro_batch_size * lay.dp, 1), 1)
    tokens = t.micro_batch_size * recipe.data.seq_length / lay.cp  # per micro-batch and rank
    h, gpn = m.hidden_size, gpus_per_node
    ranks = rank_layers(m.num_hidden_layers, lay.pp, lay.vpp, megatron(recipe))
    r = max(range(lay.pp), key=lambda i: len(ranks[i])) if pp_rank is None else pp_rank
    groups = rank_groups(recipe, lay, r, ranks[r])
    layers = groups["dense"] + groups["moe"] + groups["mtp"]
    moe_layers = groups["moe"] + (groups["mtp"] if m.n_routed_experts else 0)
    replay = 1 + RECOMPUTE_FORWARD[par.recompute] / 2  # forward is half of a layer's collectives
    out = []
    if lay.tp > 1:
        # in units of (n-1)/n x a micro-batch's activations (tokens x hidden), forward and backward together: attention
        # and a dense MLP each 4 (SP: gather in, reduce-scatter out and the reverse in backward; without SP the same
        # bytes as one all-reduce each way); a MoE layer 4 for attention, 4 for its shared experts (output all-reduced),
        # with SP 4 more (it gathers the sequence to route it), and with experts split by TP (ETP = TP) an all-reduce
        # of the routed copies' outputs each way: 4 x top-k
        n = lay.tp
        unit = (n - 1) / n * tokens * h * act
        etp = 4 * m.num_experts_per_tok if lay.etp == lay.tp and lay.ep == 1 else 0
        moe_units = 8 + (4 if lay.sp else 0) + etp
        units = 8 * (layers - moe_layers) + moe_units * moe_layers
        total = unit * units * micro * replay
        out.append(CommTerm("TP", ("SP all-gather + reduce-scatter of activations" if lay.sp else "all-reduce of activations")
                            + (", all-reduce of the routed copies (ETP)" if etp else ""),
                            *_split(total, members_in_node(lay, ("tp",), gpn) - 1, n - 1), int(units / 2 * micro * replay), False))
    if lay.ep > 1 and moe_layers:  # dispatch and combine the routed copies; again in backward
        n = lay.ep
        per = 4 * tokens * m.num_experts_per_tok * h * act * (n - 1) / n
        total = per * moe_layers * micro * replay
        out.append(CommTerm("EP", f"all-to-all of the routed token copies (top-{m.num_experts_per_tok})",
                            *_split(total, members_in_node(lay, ("ep",), gpn) - 1, n - 1), int(4 * moe_layers * micro * replay), False))
    if lay.cp > 1 and recipe.backend.name == "native":
        b = cp_attention_bytes(m, recipe.data.seq_length, lay.cp, lay.tp, t.micro_batch_size, act)
        total = b.ours * layers * micro * replay
        n = lay.cp
        out.append(CommTerm("CP", "all-gather of the latent, reduce-scatter of its gradient",
                            *_split(total, members_in_node(lay, ("cp",), gpn) - 1, n - 1), int(2 * layers * micro * replay), False))
    if lay.pp > 1:  # a middle rank sends its output forward and its input's gradient backward, per micro-batch and chunk
        # (with two stages each rank sends one of them); with MTP the first and last stage also sum their
        # embedding copies' gradients once per step (trainer.pipeline.sync_shared_embedding)
        directions = 2 if lay.pp * lay.vpp > 2 else 1
        total = directions * tokens * h * act / (lay.tp if lay.sp else 1) * micro * lay.vpp
        uses_mtp = m.num_nextn_predict_layers > 0 and t.mtp_loss_weight > 0
        if uses_mtp and r in (0, (lay.pp * lay.vpp - 1) % lay.pp):  # the two embedding copies: first and last stage
            total += group_params(recipe, "embed", lay, _group_key(recipe))[0] * 4 / (lay.dp * lay.cp)
        crosses = lay.world // lay.pp >= gpn  # the next stage is world / PP ranks away
        out.append(CommTerm("PP", "send/recv of activations and their gradients", 0.0 if crosses else total, total if crosses else 0.0,
                            directions * micro * lay.vpp, False))
    native = recipe.backend.name == "native"
    param = 2 if t.precision == "bf16" else 4
    dense_all = exp_all = dense_train = exp_train = 0.0
    for kind, count in groups.items():
        if count:
            p = group_params(recipe, kind, lay, _group_key(recipe))
            # FSDP2 reshards a layer after its forward and gathers it again for backward; the root module
            # (embedding, head) stays gathered from forward to backward: once per micro-batch. Under PP the
            # pipeline schedule keeps what backward gathered until the step ends (reshard_after_backward off
            # for all but the last micro-batch): a layer is gathered for the first forward and each backward,
            # the root once
            if lay.pp > 1:
                times = 1 if kind in ("embed", "head") else micro + 1
            else:
                times = micro if kind in ("embed", "head") else 2 * micro
            dense_all, exp_all = dense_all + times * count * p[0], exp_all + times * count * p[1]
            dense_train, exp_train = dense_train + count * p[2], exp_train + count * p[3]
    for name, n, dims, gathered, trained in (("FSDP dense", lay.dp * lay.cp, ("edp", "ep", "cp"), dense_all, dense_train),
                                             ("FSDP experts", lay.dp * lay.cp // lay.ep, ("edp", "cp"), exp_all, exp_train)):
        if n <= 1 or not gathered:
            continue
        if native:  # FSDP2: parameters gathered as counted above (``gathered``: elements x gathers); gradients
            # (fp32) reduce-scattered once per step
            total = (gathered * param + trained * 4) * (n - 1) / n
            calls = (micro + 2) if lay.pp > 1 else (2 * micro + 1)
            what = ("all-gather of parameters (first forward, each backward)" if lay.pp > 1 else
                    "all-gather of parameters per micro-batch (fwd + bwd)") + ", reduce-scatter of gradients"
        else:  # Megatron's distributed optimizer: gradients reduce-scattered, then parameters gathered, once per step
            total = 2 * trained * param * (n - 1) / n
            calls, what = 2, "reduce-scatter of gradients, all-gather of updated parameters (distributed optimizer)"
            name = name.replace("FSDP", "DistOpt")
        out.append(CommTerm(name, what, *_split(total, members_in_node(lay, dims, gpn) - 1, n - 1), int(calls), True))
    return out
