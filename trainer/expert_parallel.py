"""Expert parallelism: each rank of an EP group holds E/ep experts; token copies travel by all-to-all.

Dispatch (per MoE layer, inside autograd):
  1. the local token copies are already sorted by global expert id, with per-expert counts [E];
  2. exchange the counts (all-to-all) so every rank knows how many copies it gets per local expert
     from each source rank;
  3. all-to-all the copies (uneven splits) to the ranks owning their experts;
  4. regroup the received copies by local expert (they arrive grouped by source), run the experts,
     undo the regrouping and all-to-all the results back. Splits may be zero.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd


class ExpertParallelDispatcher:
    def __init__(self, group: dist.ProcessGroup, n_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.n_local = n_experts // self.size

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, experts) -> torch.Tensor:
        ep, n_local = self.size, self.n_local
        counts = counts.to(torch.int64)
        # counts_recv[s, e]: copies source rank s sends to our local expert e
        counts_recv = torch.empty_like(counts)
        dist.all_to_all_single(counts_recv, counts, group=self.group)
        counts_recv = counts_recv.view(ep, n_local)
        send_splits = counts.view(ep, n_local).sum(1).tolist()
        recv_splits = counts_recv.sum(1).tolist()
        received = all_to_all_single_autograd(x, recv_splits, send_splits, self.group)

        # received is ordered (source, expert); the experts want (expert, source)
        order = _regroup_order(counts_recv)
        y = experts(received.index_select(0, order), counts_recv.sum(0))
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        y = y.index_select(0, back)
        return all_to_all_single_autograd(y, send_splits, recv_splits, self.group)


def _regroup_order(counts: torch.Tensor) -> torch.Tensor:
    """Indices that reorder rows laid out source-major ([s][e] blocks) into expert-major order."""
    ep, n_local = counts.shape
    starts = torch.cumsum(counts.flatten(), 0) - counts.flatten()  # start of block (s, e) in source-major order
    starts = starts.view(ep, n_local)
    pieces = [torch.arange(int(starts[s, e]), int(starts[s, e] + counts[s, e]), device=counts.device)
              for e in range(n_local) for s in range(ep)]
    return torch.cat(pieces) if pieces else counts.new_zeros(0)
