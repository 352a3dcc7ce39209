"""Pre-flight checks: does this recipe run on this cluster? Every problem at once, before queueing.

Dimensions the recipe leaves unset are derived: CP and VPP default to 1, ETP to TP when EP is 1 and
to 1 otherwise (experts split by EP, as NVIDIA's DeepSeek recipes do); TP, PP and EP are searched
over the values the cluster allows and the best valid layout is taken (fits memory, then most data
parallelism, fewest pipeline stages, largest EP inside a node).
"""

from __future__ import annotations

import itertools
from functools import lru_cache
import os
from dataclasses import dataclass, field

from pathlib import Path

from launcher import memory, resume, sft_format
from launcher.cluster import ClusterProfile
from launcher.errors import Problem
from launcher.layout import Layout, megatron, split_layers
from launcher.recipe import Recipe, fingerprint
from launcher.validate import recipe_problems


@lru_cache(maxsize=4096)
def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def divisors(n: int) -> list[int]:
    return list(_divisors(n))


def _fmt(values) -> str:
    values = list(values)
    return ", ".join(map(str, values)) if values else "none"


@dataclass
class Preflight:
    layout: Layout | None
    problems: list[Problem] = field(default_factory=list)
    memory: memory.MemoryEstimate | None = None
    memory_layout: Layout | None = None  # what memory was estimated on (an EP the stage cannot hold is capped)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def input_errors(self) -> list[Problem]:
        """Errors no layout, node count or cluster can fix: the recipe's own values are wrong."""
        return [p for p in self.errors if not p.fit]


def check_layout(recipe: Recipe, profile: ClusterProfile, tp: int, pp: int, vpp: int, cp: int, ep: int, etp: int,
                 memory_check: bool = True) -> Preflight:
    """All layout checks for one choice of the model-parallel dimensions."""
    m, par, train, data = recipe.model, recipe.parallel, recipe.train, recipe.data
    world, gpn = profile.world_size, profile.gpus_per_node
    errs: list[Problem] = []
    warns: list[Problem] = []
    E = lambda f, msg: errs.append(Problem("error", f, msg, fit=True))  # noqa: E731
    W = lambda f, msg: warns.append(Problem("warning", f, msg))  # noqa: E731

    # attention heads and hidden dims across TP
    tp_ok = [d for d in divisors(m.num_attention_heads) if d <= gpn]
    if m.num_attention_heads % tp:
        E("parallel.tp", f"TP={tp} must divide the {m.num_attention_heads} attention heads; valid: {_fmt(tp_ok)}")
    elif m.num_dense_layers and m.intermediate_size % tp:
        E("parallel.tp", f"TP={tp} must divide model.intermediate_size {m.intermediate_size}")
    if tp > gpn or gpn % tp:
        W("parallel.tp", f"TP={tp} crosses node boundaries ({gpn} GPUs per node): tensor-parallel traffic goes over the network; use TP <= {gpn}")
    if par.sp and tp == 1:
        E("parallel.sp", "sequence parallel needs TP > 1; set parallel.sp=false or parallel.tp to one of " + _fmt(d for d in tp_ok if d > 1))

    # world size = TP x PP x CP x DP
    mp = tp * pp * cp
    dp = world // mp if world % mp == 0 else 0
    if not dp:
        E("parallel", f"TP*PP*CP = {tp}*{pp}*{cp} = {mp} does not divide the {world} GPUs of {profile.name}; "
                      f"PP values that do with TP={tp} CP={cp}: {_fmt(d for d in divisors(max(world // (tp * cp), 1)) if world % (tp * cp) == 0)}")
    elif par.dp is not None and par.dp != dp:
        E("parallel.dp", f"set to {par.dp} but {world} GPUs / (TP*PP*CP = {mp}) gives DP={dp}; leave parallel.dp unset")

    # experts across EP (x ETP) inside a pipeline stage
    if m.n_routed_experts == 0:
        if ep > 1:
            E("parallel.ep", f"model {m.name} has no routed experts; EP must be 1")
    else:
        ep_ok = [d for d in divisors(m.n_routed_experts) if dp and (world // pp) % (d * etp) == 0]
        if m.n_routed_experts % ep:
            E("parallel.ep", f"EP={ep} must divide the {m.n_routed_experts} routed experts; valid here: {_fmt(ep_ok)}")
        if dp and (world // pp) % (ep * etp):
            E("parallel.ep", f"EP*ETP = {ep}*{etp} = {ep * etp} must divide the {world // pp} GPUs of each pipeline stage "
                             f"({world} GPUs / PP {pp}); valid EP here: {_fmt(ep_ok)}")
        if m.moe_intermediate_size % etp:
            E("parallel.etp", f"ETP={etp} must divide model.moe_intermediate_size {m.moe_intermediate_size}")
        if dp and ep * etp > gpn and (world // pp) % (ep * etp) == 0 and not errs:
            W("parallel.ep", f"EP*ETP = {ep * etp} spans nodes ({gpn} GPUs per node): expert all-to-all crosses the network")
    if cp > 1 and tp * cp > gpn:
        W("parallel.cp", f"TP*CP = {tp * cp} spans nodes ({gpn} GPUs per node): each layer's latent all-gather crosses the network")

    # layers across pipeline stages
    stages = pp * vpp
    unsplittable = vpp > 1 and megatron(recipe) and m.num_hidden_layers % vpp  # Megatron's equal chunks per rank
    if vpp > 1 and pp == 1:
        E("parallel.vpp", f"VPP={vpp} needs pipeline parallelism (PP > 1)")
    if vpp > 1 and par.pp_schedule != "interleaved_1f1b":
        E("parallel.pp_schedule", f"VPP={vpp} needs parallel.pp_schedule=interleaved_1f1b (got {par.pp_schedule})")
    if par.pp_schedule == "interleaved_1f1b" and vpp == 1:
        E("parallel.vpp", "the interleaved_1f1b schedule needs VPP >= 2; set parallel.vpp or parallel.pp_schedule=1f1b")
    if stages > m.num_hidden_layers:
        E("parallel.pp", f"{m.num_hidden_layers} layers cannot fill PP*VPP = {stages} stages; valid PP*VPP: <= {m.num_hidden_layers}")
    elif unsplittable:
        valid = [v for v in range(2, m.num_hidden_layers // pp + 1) if m.num_hidden_layers % v == 0][:6]
        E("parallel.vpp", f"the nemo backend (Megatron's interleaved schedule) needs the {m.num_hidden_layers} layers divisible "
                          f"by VPP {vpp}; valid VPP: {', '.join(map(str, valid)) or 'none'} (or parallel.vpp=1)")
    elif stages > 1 and m.num_hidden_layers % stages:
        counts = split_layers(m.num_hidden_layers, pp, vpp, megatron(recipe))
        W("parallel.pp", f"{m.num_hidden_layers} layers over {stages} stages is uneven ({min(counts)}-{max(counts)} layers per stage)")

    # batch and sequence
    mb = train.micro_batch_size
    if dp and train.global_batch_size % (mb * dp):
        step = mb * dp
        near = sorted({n for n in (train.global_batch_size // step * step, (train.global_batch_size // step + 1) * step) if n})
        E("train.global_batch_size", f"{train.global_batch_size} is not divisible by micro batch {mb} x DP {dp} = {step}; try {' or '.join(map(str, near))}")
    elif dp and par.pp_schedule == "interleaved_1f1b" and pp > 1 and (train.global_batch_size // (mb * dp)) % pp:
        E("train.global_batch_size", f"the interleaved schedule needs the micro-batch count ({train.global_batch_size // (mb * dp)}) divisible by PP {pp}")
    # CP: 2 x CP balanced chunks; SP (and the native trainer's CP gather under TP): each split again over TP
    sp_tp = tp if tp > 1 and (par.sp or (cp > 1 and recipe.backend.name == "native")) else 1
    need = sp_tp * (2 * cp if cp > 1 else 1)
    if data.seq_length % need:
        what = " x ".join([f"TP {tp}"] * (sp_tp > 1) + [f"2*CP = {2 * cp}"] * (cp > 1))
        why = ", ".join(["sequence parallel" if par.sp else "the latent gather split over TP"] * (sp_tp > 1)
                        + ["load-balanced causal context parallel"] * (cp > 1))
        lower = data.seq_length // need * need
        near = " or ".join(str(n) for n in (lower, lower + need) if n)
        E("data.seq_length", f"{data.seq_length} must be divisible by {what}{f' = {need}' if sp_tp > 1 and cp > 1 else ''} "
                             f"({why}); nearest valid: {near}")
    if data.seq_length > m.max_position_embeddings:
        W("data.seq_length", f"{data.seq_length} exceeds the model's max_position_embeddings {m.max_position_embeddings}")

    lay = Layout(tp, pp, vpp, cp, ep, etp, dp, par.sp, profile.nodes, gpn) if dp and not unsplittable else None
    pre = Preflight(lay, errs + warns)
    if lay is not None:
        # An EP the stage cannot hold is estimated with the largest EP it can: experts still need a home.
        fit_ep = ep if (world // pp) % (ep * etp) == 0 else max([d for d in divisors(ep) if (world // pp) % (d * etp) == 0] or [1])
        est_lay = Layout(tp, pp, vpp, cp, fit_ep, etp, dp, par.sp, profile.nodes, gpn)
        pre.memory = memory.estimate(recipe, est_lay, profile.gpu.memory_gb, profile.device)
        pre.memory_layout = est_lay
        if memory_check and pre.memory.verdict == "won't fit":
            note = f" with EP={fit_ep}, the most this layout can hold" if fit_ep != ep else ""
            pre.problems.insert(len(errs), Problem("error", "memory", pre.memory.summary() + note, fit=True))
        elif pre.memory.verdict == "at risk":
            pre.problems.append(Problem("warning", "memory", pre.memory.summary()))
    return pre


def _recipe_problems(recipe: Recipe, profile: ClusterProfile, produced: tuple[str, ...] = ()) -> list[Problem]:
    """Checks that do not depend on the layout, beyond the fields' own values (validate.recipe_problems)."""
    out = []
    if recipe.peft.method == "lora":
        valid = recipe.model.lora_target_modules()
        bad = [t for t in recipe.peft.targets if t not in valid]
        if bad or not recipe.peft.targets:
            out.append(Problem("error", "peft.targets", f"{_fmt(bad) if bad else 'empty'}: not in model {recipe.model.name}; valid: {_fmt(valid)}"))
    if recipe.backend.name == "native" and recipe.checkpoint.load and recipe.checkpoint.load_format == "nemo":
        out.append(Problem("error", "checkpoint.load_format", "nemo: the native trainer reads Hugging Face directories (hf) "
                                                              "and its own checkpoints (dcp); export the NeMo run first (launch export RUN)"))
    if recipe.backend.name == "nemo":
        from nemo_backend.recipe import unsupported  # torch- and NeMo-free: the mapping's own rules

        if profile.device != "cuda":  # then the rest of what nemo would need is beside the point
            out.append(Problem("error", "backend.name", f"the nemo backend trains on GPUs only (NeMo's trainer needs a GPU "
                                                        f"accelerator); cluster {profile.name} has device {profile.device}: "
                                                        "use backend.name=native", fit=True))
        else:
            out += [Problem("error", f, why) for f, why in unsupported(recipe)]
            if profile.executor == "slurm" and not (recipe.backend.container_image or profile.container.image):
                out.append(Problem("error", "backend.container_image", f"the nemo backend needs a container image; set it here or in cluster {profile.name} (container.image), e.g. nvcr.io/nvidia/nemo:25.09", fit=True))
    if recipe.train.eval_interval and recipe.data.kind != "sft":
        out.append(Problem("error", "train.eval_interval", "validation during training needs SFT data with a validation "
                                                           "split (data.kind=sft); set train.eval_interval=0"))
    data = os.path.expanduser(recipe.data.path) if recipe.data.path else None
    if recipe.data.kind == "sft" and data and os.path.isdir(data):  # the first records of each split, where visible
        need = ("training", "validation") if recipe.train.eval_interval else ("training",)
        for key, message in sft_format.check_directory(data, need):
            if "validation.jsonl" in message and message.endswith("has no validation.jsonl"):
                key, message = "train.eval_interval", f"{message} to validate on; set train.eval_interval=0 or add the split"
            out.append(Problem("error", key, message))
        prepared = sft_format.prepared_template(data)
        if prepared is not None and prepared != recipe.data.template:
            out.append(Problem("error", "data.template", f"{recipe.data.template!r}, but {data} was prepared for "
                               f"{prepared!r} (its {sft_format.STATS_FILE}); set data.template={prepared}"))
    out += _path_problems(recipe, profile, produced)
    return out


def _path_problems(recipe: Recipe, profile: ClusterProfile, produced: tuple[str, ...] = ()) -> list[Problem]:
    """Input paths that do not exist here: an error for a local run, a warning for Slurm (compute nodes may
    see more). Paths under ``produced`` (directories an earlier pipeline stage writes) are expected to be missing."""
    out = []
    paths = {"data.path": recipe.data.path, "checkpoint.load": recipe.checkpoint.load,
             "data.tokenizer": None if recipe.data.tokenizer == "byte" else recipe.data.tokenizer}
    for key, value in paths.items():
        if value and any(os.path.join(value, "").startswith(os.path.join(d, "")) for d in produced):
            continue
        if value and not os.path.exists(os.path.expanduser(value)):
            if profile.executor == "local":
                out.append(Problem("error", key, f"{value} does not exist"))
            else:
                out.append(Problem("warning", key, f"{value} is not visible from this machine; make sure the compute nodes see it"))
    return out


def _candidates(recipe: Recipe, profile: ClusterProfile):
    """Every (tp, pp, vpp, cp, ep, etp) to try; fixed dimensions have one value."""
    par, m = recipe.parallel, recipe.model
    gpn, world = profile.gpus_per_node, profile.world_size
    tps = [par.tp] if par.tp else [d for d in divisors(gpn) if m.num_attention_heads % d == 0]
    cps = [par.cp or 1]
    vpps = [par.vpp or 1]
    pps = [par.pp] if par.pp else [d for d in divisors(world) if d <= m.num_hidden_layers]
    eps = [par.ep] if par.ep else (divisors(m.n_routed_experts) if m.n_routed_experts else [1])
    for tp, cp, vpp, pp, ep in itertools.product(tps, cps, vpps, pps, eps):
        if not par.pp and world % (tp * cp * pp) and (pp > 1 or world % (tp * cp) == 0):
            continue  # an unset PP that cannot divide the world; PP=1 stays so errors can be reported
        etp = par.etp or (tp if ep == 1 else 1)
        yield tp, pp, vpp, cp, ep, etp


def _preference(pre: Preflight, gpn: int) -> tuple:
    lay = pre.layout
    fit = {"fits": 0, "at risk": 1}.get(pre.memory.verdict, 2)
    return (fit, lay.tp * lay.pp * lay.cp, lay.pp, lay.ep * lay.etp > gpn, -lay.ep, lay.tp)


def run_preflight(recipe: Recipe, profile: ClusterProfile, memory_check: bool = True, produced: tuple[str, ...] = ()) -> Preflight:
    """Check ``recipe`` against ``profile``, deriving unset layout dimensions. ``produced``: directories
    earlier pipeline stages will have written by the time this job starts."""
    fields = recipe_problems(recipe)
    if any(p.severity == "error" for p in fields):
        return Preflight(None, fields)  # wrong values: no layout arithmetic on them (a zero where a divisor goes)
    base = fields + _recipe_problems(recipe, profile, produced)
    par = recipe.parallel
    unset = tuple(k for k in ("tp", "pp", "ep") if getattr(par, k) is None)
    tried = [check_layout(recipe, profile, *c, memory_check=memory_check) for c in _candidates(recipe, profile)]
    valid = [p for p in tried if p.ok]
    if valid:
        best = min(valid, key=lambda p: _preference(p, profile.gpus_per_node))
    elif tried:
        # nothing valid: report the candidate with the fewest errors (the recipe's own values when all are fixed)
        best = min(tried, key=lambda p: len(p.errors))
        if unset:
            best.problems.insert(0, Problem("error", "parallel", f"no value of {', '.join('parallel.' + k for k in unset)} gives a valid layout on {profile.describe()}; showing the closest", fit=True))
    else:
        best = Preflight(None, [Problem("error", "parallel", f"no layout divides the {profile.world_size} GPUs of {profile.name}", fit=True)])
    if best.layout is not None:
        derived = tuple(k for k in ("tp", "pp", "vpp", "ep", "etp", "cp") if getattr(par, k) is None)
        best.layout = Layout(**{**best.layout.__dict__, "derived": derived})
    best.problems = base + best.problems
    if best.layout is not None and recipe.checkpoint.resume and recipe.checkpoint.save_dir:
        try:
            resume.check_save_dir(Path(os.path.expanduser(recipe.checkpoint.save_dir)), {"fingerprint": fingerprint(recipe), "layout": best.layout.dims()})
        except resume.ResumeRefused as exc:
            best.problems.append(Problem("error", "checkpoint.save_dir", f"cannot resume: {exc}"))
    return best
