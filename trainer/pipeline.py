"""Pipeline parallelism with torch.distributed.pipelining: stage modules and schedules.

Virtual stage k (of PP x VPP) runs on pipeline rank k % PP and holds the layers
``launcher.layout.split_layers`` assigns it; the first stage also holds the embedding, the last one
the final norm and the LM head. Stage modules keep the full model's parameter names, so checkpoints
look the same with and without pipelining.

Only the hidden state travels between stages. The per-micro-batch token ids, labels, positions and
packing segments are the same on every pipeline rank (they see the same data), so each stage takes
them from ``side_inputs`` in micro-batch order, which is the order every schedule runs forwards in.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.layout import split_layers
from model.transformer import DeepseekV3, causal_lm_loss, mtp_targets, segment_mask


class StageModule(nn.Module):
    """The last stage computes the loss itself (main + MTP, already divided by the step's global token
    counts) and returns it as its output; with MTP it also holds a copy of the embedding, kept equal to
    the first stage's by summing their gradients (see :func:`sync_shared_embedding`)."""

    def __init__(self, model: DeepseekV3, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.cfg = model.cfg
        self.first, self.last = first, last
        self.mtp_weight = model.mtp_loss_weight if len(model.mtp) else 0.0
        self.embed_tokens = model.embed_tokens if first or (last and self.mtp_weight > 0) else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.mtp = model.mtp if last and self.mtp_weight > 0 else nn.ModuleList()
        self.rope = model.rope
        self.side_inputs: list[dict] = []
        self.counts: list[float] = []
        self.lm_sums: list[torch.Tensor] = []
        self._next = 0

    def begin_step(self, side_inputs: list[dict], counts: list[float]) -> None:
        """Per micro-batch: input_ids, labels, position_ids, segment_ids; global token counts (main, MTP depths)."""
        self.side_inputs, self.counts, self.lm_sums, self._next = side_inputs, counts, [], 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.side_inputs[self._next]
        self._next += 1
        h = self.embed_tokens(x) if self.first else x
        cos, sin = self.rope(b["position_ids"], h.dtype)
        segments, cp = b["segment_ids"], b.get("cp")  # cp: this micro-batch's context parallelism (or None)
        if cp is not None:  # no whole mask: attention masks chunk by chunk from positions and these segments
            cp.set_segments(segments)
            mask = None
        else:
            mask = segment_mask(segments) if segments is not None else None
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask, cp=cp)
        if not self.last:
            return h
        h = self.norm(h)
        lm_sum = causal_lm_loss(self.lm_head(h), b["labels"], "sum")
        self.lm_sums.append(lm_sum.detach())
        loss = lm_sum / max(self.counts[0], 1)
        if len(self.mtp):
            depth = len(self.mtp)
            targets = b["mtp_labels"] if cp is not None else mtp_targets(b["labels"], segments, depth)
            for k, (module, target) in enumerate(zip(self.mtp, targets), start=1):
                ahead = b["mtp_inputs"][k - 1] if cp is not None else torch.roll(b["input_ids"], -k, dims=1)
                h = module(h, self.embed_tokens(ahead), cos, sin, mask, cp=cp)
                loss = loss + self.mtp_weight / depth * causal_lm_loss(self.lm_head(h), target, "sum") / max(self.counts[k], 1)
        return loss


class PipelineRankModel(nn.Module):
    """Everything one pipeline rank holds (one or more stages), under the full model's names.

    Used for the optimizer, gradient clipping, balancing and checkpoints; the schedule runs the stages.
    """

    def __init__(self, model: DeepseekV3, stages: list[StageModule]):
        super().__init__()
        self.cfg = model.cfg
        self.layers = nn.ModuleDict({k: v for st in stages for k, v in st.layers.items()})
        for name in ("embed_tokens", "norm", "lm_head"):
            held = [getattr(st, name) for st in stages if getattr(st, name) is not None]
            setattr(self, name, held[0] if held else None)
        self.mtp = next((st.mtp for st in stages if len(st.mtp)), nn.ModuleList())
        # the last stage's embedding (for MTP) is a copy of the first stage's: count it once in norms
        self.embedding_copy = bool(len(self.mtp)) and not any(st.first for st in stages)
        self.stages = stages  # plain list: not registered twice

    def set_requires_gradient_sync(self, flag: bool) -> None:
        for st in self.stages:
            st.set_requires_gradient_sync(flag)


def shared_embedding_group(world_mesh, pp: int):
    """Process group pairing each first-stage rank with the last-stage rank of the same DP/EP/TP position."""
    import torch.distributed as dist

    ranks = world_mesh.mesh  # [pp, edp, ep, tp] global ranks
    mine = None
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in ranks.shape[1:]]).reshape(-1, ranks.dim() - 1):
        pair = [int(ranks[(0, *idx.tolist())]), int(ranks[(pp - 1, *idx.tolist())])]
        group = dist.new_group(pair)  # every rank takes part in creating every group
        if dist.get_rank() in pair:
            mine = group
    return mine


@torch.no_grad()
def sync_shared_embedding(model: "PipelineRankModel", group) -> None:
    """Sum the embedding gradients of the first and last stage, so both copies take the same step."""
    import torch.distributed as dist

    if group is None or model.embed_tokens is None or model.embed_tokens.weight.grad is None:
        return
    g = model.embed_tokens.weight.grad
    local = g.to_local() if hasattr(g, "to_local") else g
    dist.all_reduce(local, group=group)


def build_stages(model: DeepseekV3, pp: int, vpp: int, pp_rank: int) -> list[tuple[int, StageModule]]:
    """(stage index, module) for the virtual stages of pipeline rank ``pp_rank``."""
    counts = split_layers(model.cfg.num_hidden_layers, pp, vpp)
    starts = [sum(counts[:k]) for k in range(pp * vpp)]
    out = []
    for k in range(pp_rank, pp * vpp, pp):
        ids = list(range(starts[k], starts[k] + counts[k]))
        out.append((k, StageModule(model, ids, first=k == 0, last=k == pp * vpp - 1)))
    return out


def build_schedule(stages, n_stages: int, n_micro: int, kind: str, device, group, loss_fn,
                   micro_batch: int, seq: int, act_dtype: torch.dtype, hidden_seq: int | None = None):
    """The schedule over this rank's stages. Shapes are given up front (static metadata), so the
    schedule runs no extra inference forward that would consume a micro-batch's side inputs."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    def meta(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    pipe_stages = []
    for k, m in stages:
        cfg = m.cfg
        # the hidden state between stages; with sequence parallelism each TP rank sends its part of the sequence
        hidden = meta(micro_batch, hidden_seq or seq, cfg.hidden_size, dtype=act_dtype).requires_grad_()
        inp = meta(micro_batch, seq, dtype=torch.long) if m.first else hidden
        out = meta(dtype=torch.float32).requires_grad_() if m.last else hidden  # the last stage returns its loss
        pipe_stages.append(PipelineStage(m, k, n_stages, device, input_args=(inp,), output_args=(out,),
                                         input_grads=(None,) if m.first else (hidden,),
                                         output_grads=None if m.last else (hidden,), group=group))
    # scale_grads=False: the loss is already divided by the global token count
    if kind == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(pipe_stages, n_micro, loss_fn=loss_fn, scale_grads=False)
    cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
    return cls(pipe_stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)
