"""Context parallelism for MLA: the sequence split over CP ranks, attention over the gathered latent.

Why not ring attention: MLA's keys and values are expanded from a per-token latent of kv_lora_rank +
qk_rope_head_dim values (576 in DeepSeek-V3) against 128 x (192 + 128) = 40,960 for full K/V, so
gathering the latent moves ~70x fewer bytes than passing K/V around a ring, needs no special kernel,
and takes any mask (../shared/reference/context-parallel.md has the measurements).

- The split is load balanced for causal attention: of 2 x CP equal chunks of the sequence, CP rank r
  holds chunks r and 2 x CP - 1 - r (sequences are padded to a multiple of 2 x CP with ignored labels).
- Everything per token is sliced from the *whole* sequence, so nothing local leaks in: positions (RoPE
  and YaRN see global positions), packing segments, the MTP inputs and targets (shifted before the split).
- Each MLA layer all-gathers the normalised latent and the rotated shared rope key over the CP group
  (backward: the gradients reduce-scattered back, summed); local queries attend to all keys chunk by
  chunk (model.chunked_attention), masked by global token index (causal) and segment ids (documents).
- The loss is summed over local tokens and divided by the global count of labelled tokens; gradients
  are summed over CP like over DP (FSDP shards over DP x CP); expert loads and the sequence-wise aux
  loss are reduced over CP (they are per-sequence statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.transformer import IGNORE_INDEX, mtp_targets


def chunk_index(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The global token positions CP rank ``rank`` holds: chunks ``rank`` and ``2 cp - 1 - rank`` of 2 x cp."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not a multiple of 2 x CP = {2 * cp}")
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])


def pad_to(batch: dict, multiple: int, pad_id: int) -> dict:
    """Pad [B, S] tensors to a multiple of ``multiple``: pad tokens, ignored labels, a segment of their own."""
    s = batch["input_ids"].shape[1]
    extra = -s % multiple
    if not extra:
        return batch
    out = {}
    for key, t in batch.items():
        if key == "position_ids":
            fill = t[:, -1:] + torch.arange(1, extra + 1)
            out[key] = torch.cat([t, fill], dim=1)
            continue
        value = {"input_ids": pad_id, "labels": IGNORE_INDEX, "segment_ids": -1}.get(key, 0)
        out[key] = torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], dim=1)
    return out


def split_batch(batch: dict, cp: int, rank: int, mtp_depth: int, pad_id: int = 0) -> dict:
    """This CP rank's share of a micro-batch (tensors [B, S]), plus ``mtp_inputs``/``mtp_labels`` (one per
    depth: the tokens and targets k ahead, taken from the whole sequence) and ``cp_index`` (global positions)."""
    batch = pad_to(batch, 2 * cp, pad_id)
    idx = chunk_index(batch["input_ids"].shape[1], cp, rank)
    out = {k: v[:, idx] for k, v in batch.items()}
    if mtp_depth:
        segments = batch.get("segment_ids")
        out["mtp_labels"] = [t[:, idx] for t in mtp_targets(batch["labels"], segments, mtp_depth)]
        out["mtp_inputs"] = [torch.roll(batch["input_ids"], -k, dims=1)[:, idx] for k in range(1, mtp_depth + 1)]
    out["cp_index"] = idx
    return out


class _GatherSequenceTP(torch.autograd.Function):
    """The same gather when the tensor is replicated over TP ranks (MLA's latent under tensor parallelism):
    each TP rank sends only its 1/TP slice of its tokens over CP, then the slices are all-gathered inside the
    TP group (a node), so the CP traffic per rank is 1/TP of the plain gather's. The incoming gradient is the
    same on every TP rank (summed over heads by TP's column-parallel kv_b_proj and the shared-key hook):
    backward reduce-scatters this rank's slice over CP, then all-gathers the slices over TP."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group, tp_group) -> torch.Tensor:
        cp, tp = dist.get_world_size(group), dist.get_world_size(tp_group)
        ctx.dim, ctx.group, ctx.tp_group, ctx.cp, ctx.tp = dim, group, tp_group, cp, tp
        ctx.cp_rank, ctx.tp_rank = dist.get_rank(group), dist.get_rank(tp_group)
        part = x.chunk(tp, dim=dim)[ctx.tp_rank].contiguous()
        by_cp = torch.cat(_all_gather(part, group), dim=dim)  # [cp x slice t]
        by_tp = _all_gather(by_cp, tp_group)  # tp of them: [cp x slice t'] for every t'
        pieces = [p.chunk(cp, dim=dim) for p in by_tp]  # pieces[t'][c]
        return torch.cat([pieces[t][c] for c in range(cp) for t in range(tp)], dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp, tp, dim = ctx.cp, ctx.tp, ctx.dim
        blocks = grad.contiguous().chunk(cp * tp, dim=dim)  # (c, t) in CP-major order
        mine = [blocks[c * tp + ctx.tp_rank].contiguous() for c in range(cp)]  # slice t of every CP rank's tokens
        summed = _reduce_scatter(mine, ctx.group)  # this CP rank's slice t, summed over CP
        return torch.cat(_all_gather(summed, ctx.tp_group), dim=dim), None, None, None


def _all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _reduce_scatter(chunks: list[torch.Tensor], group) -> torch.Tensor:
    """Sum ``chunks[r]`` over the group into rank r (all-reduce + take where the backend has no reduce-scatter)."""
    if dist.get_backend(group) == "nccl":
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    whole = torch.stack(chunks)
    dist.all_reduce(whole, group=group)
    return whole[dist.get_rank(group)].contiguous()


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` over the CP group (ranks in order); backward: this rank's slice of the
    summed gradients (a reduce-scatter; all-reduce + slice where the backend has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        ctx.size, ctx.rank = dist.get_world_size(group), dist.get_rank(group)
        return torch.cat(_all_gather(x, group), dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter([c.contiguous() for c in grad.chunk(ctx.size, dim=ctx.dim)], ctx.group), None, None


@dataclass
class ContextParallel:
    """What the model needs of CP for one micro-batch: gather along the sequence, and the global position of
    every local and every gathered token (for the causal mask)."""

    group: object
    index: torch.Tensor  # [S_local] global token positions of this rank's tokens
    all_index: torch.Tensor  # [S_global] global positions of the gathered tokens, in gather order
    size: int = 1
    tp_group: object = None  # set under tensor parallelism: gathered tensors are replicated over TP
    segments: torch.Tensor | None = None  # [B, S_local] packed-sequence ids (set_segments)
    all_segments: torch.Tensor | None = None  # [B, S_global], in gather order

    @classmethod
    def for_batch(cls, group, index: torch.Tensor, tp_group=None) -> "ContextParallel":
        tp_group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
        return cls(group, index, gather_constant(index, 0, group), dist.get_world_size(group), tp_group)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather along ``dim`` over CP, autograd-aware (a TP-replicated tensor: 1/TP of it over CP each)."""
        if self.tp_group is not None:
            return _GatherSequenceTP.apply(x, dim, self.group, self.tp_group)
        return _GatherSequence.apply(x, dim, self.group)

    def gather_constant(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return gather_constant(x, dim, self.group)

    def set_segments(self, segments: torch.Tensor | None) -> None:
        """This micro-batch's packed-sequence ids [B, S_local], gathered once for every layer's masks."""
        self.segments = segments
        self.all_segments = None if segments is None else self.gather_constant(segments, 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over CP, no gradient (statistics of the whole sequence: expert counts)."""
        x = x.clone()
        dist.all_reduce(x, group=self.group)
        return x


def gather_constant(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return torch.cat(_all_gather(x, group), dim=dim)
