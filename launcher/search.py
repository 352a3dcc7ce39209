"""Layout search: every valid layout of a recipe on a cluster, ranked; and the fewest nodes that fit.

Validity and memory come from one place, ``preflight.check_layout``; this module only enumerates
and ranks (see :meth:`Candidate.rank_key`): fits before at risk, then the estimated step time
(compute at the profile's MFU with recompute overhead and pipeline bubble, plus the communication it
cannot hide, launcher.comm).

The fewest-nodes search uses that memory never grows with data parallelism (more DP shards more,
and leaves fewer micro-batches in flight): per model-parallel shape it looks for the smallest DP that
fits, with the most frugal settings (full recompute, no interleaving, the largest EP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launcher.cluster import ClusterProfile
from launcher.preflight import Preflight, check_layout, divisors
from launcher.recipe import Recipe

RECOMPUTE = ("none", "selective", "full")
# extra compute per step from recomputation: full = one more forward (+1/3 of 6N), selective = attention core
RECOMPUTE_COST = {"none": 1.0, "selective": 1.05, "full": 4 / 3}


@dataclass(frozen=True)
class Candidate:
    pre: Preflight
    recompute: str
    cross_node: tuple[str, ...]  # "TP" / "EP" when their traffic crosses nodes
    step_seconds: float

    @property
    def layout(self):
        return self.pre.layout

    def rank_key(self) -> tuple:
        """Fits first; then the estimated step time: compute (recompute overhead, pipeline bubble) plus the
        communication it cannot hide (launcher.comm: TP/SP, expert all-to-all, PP, CP, and FSDP beyond
        compute, each inside or across nodes at the profile's bandwidths); then memory headroom."""
        fit = {"fits": 0, "at risk": 1}.get(self.pre.memory.verdict, 2)
        return (fit, round(self.step_seconds, 6), self.pre.memory.total)


def variant(recipe: Recipe, tp: int, vpp: int, recompute: str) -> Recipe:
    """The recipe with the settings a layout implies: SP with TP, the interleaved schedule with VPP."""
    par = dataclasses.replace(recipe.parallel, sp=tp > 1, recompute=recompute,
                              pp_schedule="interleaved_1f1b" if vpp > 1 else ("1f1b" if recipe.parallel.pp_schedule != "gpipe" else "gpipe"))
    return dataclasses.replace(recipe, parallel=par)


@dataclass(frozen=True)
class StepTime:
    """A step's estimated seconds: compute (at the profile's MFU, recompute overhead and pipeline bubble
    included) plus the communication it cannot hide (launcher.comm: overlapped terms count beyond compute)."""

    compute: float
    exposed_comm: float  # TP, EP, PP, CP: on the critical path
    overlapped_comm: float  # FSDP: prefetched behind compute
    terms: tuple = ()  # the launcher.comm.CommTerm the two sums come from

    @property
    def total(self) -> float:
        return self.compute + self.exposed_comm + max(0.0, self.overlapped_comm - self.compute)


def step_time(recipe: Recipe, profile: ClusterProfile, lay, recompute: str, flops_per_token: float | None = None) -> StepTime:
    from launcher.comm import step_terms

    t = recipe.train
    tokens = t.global_batch_size * recipe.data.seq_length
    per_token = flops_per_token or recipe.model.train_flops_per_token(recipe.data.seq_length)
    compute = per_token * tokens * RECOMPUTE_COST[recompute]
    micro = max(t.global_batch_size // (t.micro_batch_size * lay.dp), 1)
    bubble = 1 + (lay.pp - 1) / (micro * lay.vpp)  # 1F1B idle time; interleaving divides it by VPP
    seconds = compute * bubble / (lay.world * profile.gpu.peak_tflops * 1e12 * profile.gpu.assumed_mfu)
    terms = step_terms(dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, recompute=recompute)),
                       lay, profile.gpus_per_node)
    net = profile.interconnect
    return StepTime(seconds, sum(x.seconds(net) for x in terms if not x.overlapped),
                    sum(x.seconds(net) for x in terms if x.overlapped), tuple(terms))


def step_seconds(recipe: Recipe, profile: ClusterProfile, pre: Preflight, recompute: str, flops_per_token: float | None = None) -> float:
    return step_time(recipe, profile, pre.layout, recompute, flops_per_token).total


def _cross_node(lay, gpn: int) -> tuple[str, ...]:
    out = []
    if lay.tp > gpn:
        out.append("TP")
    if lay.cp > 1 and lay.tp * lay.cp > gpn:  # CP groups are the next ranks out from TP: inside a node if they fit
        out.append("CP")
    if lay.ep * lay.etp > gpn and lay.ep > 1:
        out.append("EP")
    return tuple(out)


def _shapes(recipe: Recipe, profile: ClusterProfile, world: int, frugal: bool):
    """(tp, pp, vpp, cp, ep, etp) with the world divisible by TP x PP x CP (cheap necessary conditions;
    check_layout decides). ``frugal``: only the least-memory choice of VPP and EP."""
    m, gpn = recipe.model, profile.gpus_per_node
    native = recipe.backend.name == "native"
    tps = [d for d in divisors(gpn) if m.num_attention_heads % d == 0]
    cps = [c for c in (1, 2, 4, 8) if recipe.data.seq_length % (2 * c) == 0 or c == 1]
    experts = divisors(m.n_routed_experts) if m.n_routed_experts else [1]
    for tp in tps:
        for cp in cps:
            if world % (tp * cp):
                continue
            for pp in divisors(world // (tp * cp)):
                if pp > m.num_hidden_layers:
                    break
                dp = world // (tp * cp * pp)
                vpps = [1] if frugal or pp == 1 else [v for v in (1, 2, 3, 4) if pp * v <= m.num_hidden_layers]
                for ep in ([max(e for e in experts if (tp * cp * dp) % e == 0 and (not native or dp % e == 0))] if frugal else experts):
                    for etp in ([1] if ep > 1 else sorted({1, tp})):
                        if (tp * cp * dp) % (ep * etp) or (native and (etp not in (1, tp) or dp % ep)):
                            continue
                        for vpp in vpps:
                            yield tp, pp, vpp, cp, ep, etp


def layouts(recipe: Recipe, profile: ClusterProfile) -> list[Candidate]:
    """Every valid layout shape on ``profile`` with the least recomputation that fits it, best first."""
    out = []
    gpn = profile.gpus_per_node
    flops = recipe.model.train_flops_per_token(recipe.data.seq_length)
    for tp, pp, vpp, cp, ep, etp in _shapes(recipe, profile, profile.world_size, frugal=False):
        # memory only shrinks with more recomputation: if full does not pass, nothing does
        for rc in ("full", "none", "selective"):
            r = variant(recipe, tp, vpp, rc)
            pre = check_layout(r, profile, tp, pp, vpp, cp, ep, etp)
            if not pre.ok:
                if rc == "full":
                    break
                continue
            cand = Candidate(pre, rc, _cross_node(pre.layout, gpn), step_seconds(r, profile, pre, rc, flops))
            if rc == "full":
                full = cand
                continue
            if pre.memory.verdict == "fits" or full.pre.memory.verdict != "fits":
                out.append(cand)
                break
        else:
            out.append(full)
    return sorted(out, key=Candidate.rank_key)


def fewest_nodes(recipe: Recipe, profile: ClusterProfile, max_nodes: int = 1024) -> tuple[int, Candidate] | None:
    """The fewest nodes of this profile's kind (same GPUs per node and memory) on which some layout
    fits, and that layout; None if none does up to ``max_nodes``."""
    gpn, t = profile.gpus_per_node, recipe.train
    m = recipe.model
    native = recipe.backend.name == "native"
    best: tuple[int, Candidate] | None = None
    flops = m.train_flops_per_token(recipe.data.seq_length)
    samples = t.global_batch_size // t.micro_batch_size if t.global_batch_size % t.micro_batch_size == 0 else 0
    dps = [d for d in divisors(samples)] if samples else []
    tps = [d for d in divisors(gpn) if m.num_attention_heads % d == 0]
    cps = [c for c in (1, 2, 4, 8) if c == 1 or recipe.data.seq_length % (2 * c) == 0]
    experts = divisors(m.n_routed_experts) if m.n_routed_experts else [1]
    for tp in tps:
        for cp in cps:
            for pp in range(1, m.num_hidden_layers + 1):
                # DP values that make whole nodes, within the node budget, smallest first
                ok = [d for d in dps if (tp * cp * pp * d) % gpn == 0 and tp * cp * pp * d <= max_nodes * gpn]
                if best is not None:
                    ok = [d for d in ok if tp * cp * pp * d // gpn < best[0]]
                if not ok:
                    continue

                def attempt(dp: int) -> Candidate | None:
                    nodes = tp * cp * pp * dp // gpn
                    eps = [e for e in experts if (tp * cp * dp) % e == 0 and (not native or dp % e == 0)]
                    ep = max(eps) if eps else 1
                    r = variant(recipe, tp, 1, "full")
                    prof = dataclasses.replace(profile, nodes=nodes)
                    # experts split by EP (the most DP allows), or by TP: whichever fits (EP replicates them over TP)
                    for ep_, etp in ([(ep, 1), (1, tp)] if ep > 1 and tp > 1 else [(ep, tp if ep == 1 else 1)]):
                        pre = check_layout(r, prof, tp, pp, 1, cp, ep_, etp)
                        if pre.ok and pre.memory.verdict == "fits":  # "at risk" is not a plan
                            return Candidate(pre, "full", _cross_node(pre.layout, gpn), step_seconds(r, prof, pre, "full", flops))
                    return None

                # memory is non-increasing in DP: binary search the smallest DP that fits
                lo, hi, found = 0, len(ok) - 1, None
                if attempt(ok[hi]) is None:
                    continue
                while lo < hi:
                    mid = (lo + hi) // 2
                    if attempt(ok[mid]) is not None:
                        hi = mid
                    else:
                        lo = mid + 1
                found = attempt(ok[lo])
                nodes = tp * cp * pp * ok[lo] // gpn
                if found is not None and (best is None or nodes < best[0]):
                    best = (nodes, found)
    return best
