"""The resolved parallel layout and how pipeline stages split the layers (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache


@dataclass(frozen=True)
class Layout:
    """A complete layout: every dimension known, DP derived from the world size."""

    tp: int
    pp: int
    vpp: int
    cp: int
    ep: int
    etp: int
    dp: int
    sp: bool
    nodes: int
    gpus_per_node: int
    derived: tuple[str, ...] = field(default=())  # dimensions the recipe left unset

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def stage_gpus(self) -> int:
        """GPUs of one pipeline stage: TP x CP x DP (= EP x ETP x EDP for the experts)."""
        return self.tp * self.cp * self.dp

    @property
    def edp(self) -> int:
        """Expert data parallel: replicas of each expert shard (at least 1, also for an invalid EP)."""
        return max(self.stage_gpus // (self.ep * self.etp), 1)

    def dims(self) -> dict[str, int | bool]:
        return {k: getattr(self, k) for k in ("tp", "pp", "vpp", "ep", "etp", "cp", "sp", "dp", "edp")}


def split_layers(num_layers: int, pp: int, vpp: int = 1, megatron: bool = False) -> list[int]:
    """Layers per (virtual) pipeline stage: ``pp * vpp`` counts, virtual stage k on pipeline rank k % pp.

    Without VPP, Megatron's form (what NeMo takes as num_layers_in_first/last_pipeline_stage): the middle
    stages equal, ``m = ceil(L / pp)``, the first and last stage the rest, which is never more than ``m``
    (they also hold the embedding, and the output head, loss and MTP modules); the last gets the odd layer.
    61 layers on PP8: 6, 8 x 6, 7 (NVIDIA's DeepSeek-V3 SFT split).

    With VPP: as even as possible over the virtual stages, extra layers to the middle ones first; or, with
    ``megatron`` (the nemo backend), Megatron's interleaved form: the same rule on chunks of ``L / vpp``
    layers, every virtual stage of a rank the same size; ValueError when ``L`` is not divisible by ``vpp``.
    """
    if vpp == 1 or megatron:
        if num_layers % vpp:
            raise ValueError(f"Megatron's interleaved schedule needs the {num_layers} layers divisible by VPP {vpp}")
        chunk = num_layers // vpp
        if pp <= 2:
            first = chunk // 2 if pp == 2 else chunk
            per_rank = [first, chunk - first][:pp]
        else:
            middle = -(-chunk // pp)
            while middle > 1 and chunk - (pp - 2) * middle < 2:
                middle -= 1
            rest = chunk - (pp - 2) * middle
            per_rank = [rest // 2] + [middle] * (pp - 2) + [rest - rest // 2]
        return [per_rank[k % pp] for k in range(pp * vpp)]
    stages = pp * vpp
    base, extra = divmod(num_layers, stages)
    counts = [base] * stages
    order = list(range(1, stages - 1)) + [stages - 1, 0] if stages > 2 else list(range(stages))
    for i in order[:extra]:
        counts[i] += 1
    return counts


def megatron(recipe) -> bool:
    """Whether the recipe's pipeline split is Megatron's (the nemo backend): see :func:`split_layers`."""
    return recipe.backend.name == "nemo"


@lru_cache(maxsize=4096)
def rank_layers(num_layers: int, pp: int, vpp: int, megatron: bool = False) -> tuple[tuple[int, ...], ...]:
    """Decoder layer indices held by each pipeline rank; virtual stage k runs on rank k % pp."""
    counts = split_layers(num_layers, pp, vpp, megatron)
    ranks: list[list[int]] = [[] for _ in range(pp)]
    start = 0
    for k, n in enumerate(counts):
        ranks[k % pp].extend(range(start, start + n))
        start += n
    return tuple(tuple(r) for r in ranks)  # cached: immutable
