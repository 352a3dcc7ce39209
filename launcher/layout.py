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


def split_layers(num_layers: int, stages: int) -> list[int]:
    """Layers per (virtual) pipeline stage, as even as possible.

    Extra layers go to the middle stages first: the first stage also holds the embedding and the
    last one the output head, loss and MTP modules.
    """
    base, extra = divmod(num_layers, stages)
    counts = [base] * stages
    order = list(range(1, stages - 1)) + [stages - 1, 0] if stages > 2 else list(range(stages))
    for i in order[:extra]:
        counts[i] += 1
    return counts


@lru_cache(maxsize=4096)
def rank_layers(num_layers: int, pp: int, vpp: int) -> tuple[tuple[int, ...], ...]:
    """Decoder layer indices held by each pipeline rank; virtual stage k runs on rank k % pp."""
    counts = split_layers(num_layers, pp * vpp)
    ranks: list[list[int]] = [[] for _ in range(pp)]
    start = 0
    for k, n in enumerate(counts):
        ranks[k % pp].extend(range(start, start + n))
        start += n
    return tuple(tuple(r) for r in ranks)  # cached: immutable
