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
  (backward: the gradients reduce-scattered back, summed); local queries attend to all keys with a mask
  from the global token index (causal) and the segment ids (packed documents).
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


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` over the CP group (ranks in order); backward: this rank's slice of the
    summed gradients (a reduce-scatter; all-reduce + slice where the backend has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        ctx.size, ctx.rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            chunks = [c.contiguous() for c in grad.chunk(ctx.size, dim=ctx.dim)]
            out = torch.empty_like(chunks[0])
            dist.reduce_scatter(out, chunks, group=ctx.group)
            return out, None, None
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, dim=ctx.dim)[ctx.rank].contiguous(), None, None


@dataclass
class ContextParallel:
    """What the model needs of CP for one micro-batch: gather along the sequence, and the global position of
    every local and every gathered token (for the causal mask)."""

    group: object
    index: torch.Tensor  # [S_local] global token positions of this rank's tokens
    all_index: torch.Tensor  # [S_global] global positions of the gathered tokens, in gather order
    size: int = 1

    @classmethod
    def for_batch(cls, group, index: torch.Tensor) -> "ContextParallel":
        return cls(group, index, gather_constant(index, 0, group), dist.get_world_size(group))

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _GatherSequence.apply(x, dim, self.group)

    def gather_constant(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return gather_constant(x, dim, self.group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over CP, no gradient (statistics of the whole sequence: expert counts)."""
        x = x.clone()
        dist.all_reduce(x, group=self.group)
        return x


def gather_constant(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
