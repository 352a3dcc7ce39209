"""The plan of a launch: resolved layout, pipeline split, memory and FLOP estimates (for plan.yaml and the summary)."""

from __future__ import annotations

from launcher.cluster import ClusterProfile
from launcher.layout import megatron, rank_layers, split_layers
from launcher.memory import STATIC, GiB, estimate_ranks
from launcher.preflight import Preflight
from launcher.recipe import Recipe


def plan_dict(recipe: Recipe, profile: ClusterProfile, pre: Preflight) -> dict:
    lay, m, t = pre.layout, recipe.model, recipe.train
    micro = t.global_batch_size // (t.micro_batch_size * lay.dp)
    tokens = t.global_batch_size * recipe.data.seq_length
    flops = m.train_flops_per_token(recipe.data.seq_length) * tokens
    step_s = flops / (lay.world * profile.gpu.peak_tflops * 1e12 * profile.gpu.assumed_mfu)
    mem = pre.memory
    ranks = estimate_ranks(recipe, lay, profile.gpu.memory_gb, profile.device)
    return {
        "cluster": profile.name,
        "world_size": lay.world,
        "nodes": lay.nodes,
        "gpus_per_node": lay.gpus_per_node,
        "layout": lay.dims(),
        "derived": list(lay.derived),
        "pipeline": {
            "schedule": recipe.parallel.pp_schedule,
            "layers_per_stage": split_layers(m.num_hidden_layers, lay.pp, lay.vpp, megatron(recipe)),
            "layers_per_rank": [len(r) for r in rank_layers(m.num_hidden_layers, lay.pp, lay.vpp, megatron(recipe))],
        },
        "batch": {"global": t.global_batch_size, "micro": t.micro_batch_size, "microbatches_per_step": micro,
                  "tokens_per_step": tokens},
        "model": {"name": m.name, "params_total": m.num_params(), "params_active": m.num_active_params(),
                  "params_mtp": m.mtp_params().total},
        "memory": {"verdict": mem.verdict, "total_gib": round(mem.total / GiB, 2), "capacity_gib": round(mem.capacity / GiB, 2),
                   "pp_rank": mem.pp_rank, "items_gib": {k: round(v / GiB, 3) for k, v in mem.items},
                   # bytes the trainer compares with what it allocates (memory.json), and each pipeline rank's total
                   "static_per_pp_rank": [{k: int(e.get(k)) for k in STATIC} for e in ranks],
                   "total_per_pp_rank_gib": [round(e.total / GiB, 3) for e in ranks]},
        "compute": {"flops_per_step": flops, "assumed_mfu": profile.gpu.assumed_mfu,
                    "est_step_seconds": round(step_s, 4), "est_tokens_per_day": int(tokens / step_s * 86400) if step_s else None},
        "comm": comm_dict(recipe, profile, lay),
        "warnings": [str(p) for p in pre.warnings],
    }


def comm_dict(recipe: Recipe, profile: ClusterProfile, lay) -> dict:
    """plan.yaml's communication section: the step time with communication and its terms (launcher.comm)."""
    from launcher.search import step_time

    net = profile.interconnect
    st = step_time(recipe, profile, lay, recipe.parallel.recompute)
    return {"est_step_seconds": round(st.total, 4), "compute_seconds": round(st.compute, 4),
            "exposed_seconds": round(st.exposed_comm, 4), "overlapped_seconds": round(st.overlapped_comm, 4),
            "terms": [{"name": x.name, "intra_node_bytes": int(x.intra_bytes), "inter_node_bytes": int(x.inter_bytes),
                       "seconds": round(x.seconds(net), 5), "overlapped": x.overlapped}
                      for x in st.terms]}


def format_table(rows: list[list[str]], left: int = 0) -> list[str]:
    """Columns padded to their widest cell: the first ``left`` columns left-aligned (names), the rest right (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def _si(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def summary(recipe: Recipe, recipe_file: str, profile: ClusterProfile, pre: Preflight, plan: dict) -> list[str]:
    lay, m = pre.layout, recipe.model
    dims = ["TP", "PP", "VPP", "EP", "ETP", "CP", "DP", "EDP", "SP"]
    vals = [str(lay.tp), str(lay.pp), str(lay.vpp), str(lay.ep), str(lay.etp), str(lay.cp), str(lay.dp), str(lay.edp), "yes" if lay.sp else "no"]
    marks = ["*" if d.lower() in lay.derived else "" for d in dims]
    table = format_table([dims, [v + mk for v, mk in zip(vals, marks)]])
    c = plan["compute"]
    lines = [
        f"recipe   {recipe.name} ({recipe_file}): {m.name}, {_si(m.num_params())} params, {_si(m.num_active_params())} active, "
        f"{'LoRA r=' + str(recipe.peft.rank) if recipe.peft.method == 'lora' else 'full fine-tune' if recipe.checkpoint.load else 'from scratch'}, backend {recipe.backend.name}",
        f"cluster  {profile.describe()}",
        f"layout   {table[0]}",
        f"         {table[1]}" + ("   (* derived)" if lay.derived else ""),
        f"memory   {pre.memory.summary()}",
        f"step     {plan['batch']['global']} x {recipe.data.seq_length} tokens, {plan['batch']['microbatches_per_step']} micro-batches per DP rank; "
        f"~{c['est_step_seconds']:.3g} s/step at {c['assumed_mfu']:.0%} MFU" + (f", ~{_si(c['est_tokens_per_day'])} tokens/day" if c["est_tokens_per_day"] else "")
        + f"; ~{plan['comm']['est_step_seconds']:.3g} s with pipeline bubble, recompute and communication (launch plan)",
    ]
    if lay.cp > 1 and recipe.backend.name == "native":
        from launcher.comm import cp_attention_bytes

        b = cp_attention_bytes(m, recipe.data.seq_length, lay.cp, lay.tp, recipe.train.micro_batch_size,
                               2 if recipe.train.precision == "bf16" else 4)
        lines.append(f"cp comm  per layer and micro-batch each rank receives {b.latent_forward / 2**20:,.1f} MiB of latent (all-gather) "
                     f"and as much in gradients (reduce-scatter); ring attention over K/V would move {b.ring / 2**20:,.0f} MiB "
                     f"({b.ratio:.0f}x)")
    lines += [f"warning  {w}" for w in plan["warnings"]]
    return lines


# ----------------------------------------------------------------------------- `launch plan`
SHORT = {"weights": "weights", "grads": "grads", "optimizer": "optim", "fsdp gather buffers": "fsdp",
         "activations": "activ", "cp attention chunk": "cpattn", "routing imbalance margin": "imbal", "logits": "logits", "comm buffers": "comm",
         "cuda context": "cuda"}


def memory_table(recipe: Recipe, profile: ClusterProfile, lay) -> list[str]:
    """Per pipeline rank: its layers and every memory item, GiB (MiB on a CPU profile)."""
    from launcher.memory import estimate_ranks

    ests = estimate_ranks(recipe, lay, profile.gpu.memory_gb, profile.device)
    labels = [k for k in SHORT if any(e.get(k) for e in ests)]
    unit, div = ("GiB", GiB) if profile.device == "cuda" else ("MiB", 1024**2)
    fullest = max(ests, key=lambda e: e.total).pp_rank
    rows = [["rank", "layers", *[SHORT[k] for k in labels], "total", "verdict"]]
    for e, layers in zip(ests, rank_layers(recipe.model.num_hidden_layers, lay.pp, lay.vpp, megatron(recipe))):
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers[-1] - layers[0] == len(layers) - 1 else ",".join(map(str, layers)) or "-"
        rows.append([f"{e.pp_rank}{'*' if e.pp_rank == fullest else ''}", span, *[f"{e.get(k) / div:.2f}" for k in labels],
                     f"{e.total / div:.2f}", e.verdict])
    head = f"memory per {'GPU' if profile.device == 'cuda' else 'process'} by pipeline rank ({unit}; capacity {profile.gpu.memory_gb:g} GiB; * the fullest):"
    return [head, *("  " + line for line in format_table(rows))]


def compute_lines(recipe: Recipe, profile: ClusterProfile, lay) -> list[str]:
    m, t = recipe.model, recipe.train
    seq = recipe.data.seq_length
    terms = m.train_flops_terms(seq)
    tokens = t.global_batch_size * seq
    per_token = sum(terms.values())
    step = per_token * tokens / (lay.world * profile.gpu.peak_tflops * 1e12 * profile.gpu.assumed_mfu)
    return [f"compute  {per_token / 1e9:.1f} GFLOP per token (dense {terms['dense'] / 1e9:.1f}, attention {terms['attention'] / 1e9:.1f}, "
            f"routed experts {terms['experts'] / 1e9:.1f}) x {tokens:,} tokens = {per_token * tokens / 1e15:.3g} PFLOP per step",
            f"         ~{step:.3g} s/step at {profile.gpu.assumed_mfu:.0%} MFU on {lay.world} {'GPUs' if profile.device == 'cuda' else 'processes'} "
            f"({profile.gpu.peak_tflops:g} TFLOPS peak each), ~{_si(tokens / step * 86400) if step else '?'} tokens/day"]


def comm_lines(recipe: Recipe, profile: ClusterProfile, lay) -> list[str]:
    """The communication table of ``lay``: bytes per step and rank by term, in node and across, and the step time with it."""
    from launcher.search import step_time

    net = profile.interconnect
    st = step_time(recipe, profile, lay, recipe.parallel.recompute)
    terms = st.terms
    lines = [f"comm     per step, one rank of the fullest pipeline stage (GB sent; {net.intra_node_gbps:.3g} GB/s per GPU in a node, "
             f"{net.inter_node_gbps:.3g} GB/s across, {net.latency_us:.3g} us per call; "
             + (f"measured: {net.measured})" if net.measured else "the profile's figures; `launch bench comm` measures them)")]
    if terms:
        rows = [["term", "overlap", "in node", "across", "seconds", "  collective"]]
        for x in terms:
            rows.append([x.name, "behind compute" if x.overlapped else "exposed", f"{x.intra_bytes / 1e9:.2f}",
                         f"{x.inter_bytes / 1e9:.2f}", f"{x.seconds(net):.3g}", "  " + x.what])
        table = format_table([r[:5] for r in rows], left=2)
        lines += ["         " + ln + r[5] for ln, r in zip(table, rows)]
    else:
        lines.append("         none: one rank, or nothing this layout splits")
    lines.append(f"step     ~{st.total:.3g} s = compute {st.compute:.3g} s (with recompute and pipeline bubble) + exposed comm {st.exposed_comm:.3g} s"
                 f" + FSDP/optimizer traffic beyond compute {max(0.0, st.overlapped_comm - st.compute):.3g} s")
    return lines


def search_lines(candidates, profile: ClusterProfile, top: int) -> list[str]:
    rows = [["TP", "PP", "VPP", "EP", "ETP", "CP", "DP", "SP", "recompute", "GiB/GPU", "verdict", "s/step", "crosses nodes"]]
    for c in candidates[:top]:
        lay = c.layout
        rows.append([str(lay.tp), str(lay.pp), str(lay.vpp), str(lay.ep), str(lay.etp), str(lay.cp), str(lay.dp),
                     "yes" if lay.sp else "no", c.recompute, f"{c.pre.memory.total / GiB:.1f}", c.pre.memory.verdict,
                     f"{c.step_seconds:.3g}", ",".join(c.cross_node) or "-"])
    head = f"layouts on {profile.describe()}, best first ({min(top, len(candidates))} of {len(candidates)} valid):"
    return [head, *("  " + line for line in format_table(rows))] if candidates else [f"no valid layout fits {profile.describe()}"]
