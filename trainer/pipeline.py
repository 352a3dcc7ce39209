"""Pipeline parallelism with torch.distributed.pipelining: stage modules and schedules.

Virtual stage k (of PP x VPP) runs on pipeline rank k % PP and holds the layers
``launcher.layout.split_layers`` assigns it; the first stage also holds the embedding, the last one
the final norm and the LM head. Stage modules keep the full model's parameter names, so checkpoints
look the same with and without pipelining.

Only the hidden state travels between stages. The per-micro-batch positions and packing segments
are the same on every pipeline rank (they see the same data), so each stage takes them from
``side_inputs`` in micro-batch order, which is the order every schedule runs forwards in.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.layout import split_layers
from model.transformer import DeepseekV3, segment_mask


class StageModule(nn.Module):
    def __init__(self, model: DeepseekV3, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.cfg = model.cfg
        self.first, self.last = first, last
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.mtp = nn.ModuleList()  # MTP with pipelining is not supported yet (the trainer refuses it)
        self.rope = model.rope
        self.side_inputs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._next = 0

    def begin_step(self, side_inputs) -> None:
        self.side_inputs, self._next = side_inputs, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions, segments = self.side_inputs[self._next]
        self._next += 1
        h = self.embed_tokens(x) if self.first else x
        cos, sin = self.rope(positions, h.dtype)
        mask = segment_mask(segments) if segments is not None else None
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        return self.lm_head(self.norm(h)) if self.last else h


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
        self.mtp = nn.ModuleList()
        self.stages = stages  # plain list: not registered twice

    def set_requires_gradient_sync(self, flag: bool) -> None:
        for st in self.stages:
            st.set_requires_gradient_sync(flag)


def build_stages(model: DeepseekV3, pp: int, vpp: int, pp_rank: int) -> list[tuple[int, StageModule]]:
    """(stage index, module) for the virtual stages of pipeline rank ``pp_rank``."""
    counts = split_layers(model.cfg.num_hidden_layers, pp * vpp)
    starts = [sum(counts[:k]) for k in range(pp * vpp)]
    out = []
    for k in range(pp_rank, pp * vpp, pp):
        ids = list(range(starts[k], starts[k] + counts[k]))
        out.append((k, StageModule(model, ids, first=k == 0, last=k == pp * vpp - 1)))
    return out


def build_schedule(stages, n_stages: int, n_micro: int, kind: str, device, group, loss_fn,
                   micro_batch: int, seq: int, act_dtype: torch.dtype):
    """The schedule over this rank's stages. Shapes are given up front (static metadata), so the
    schedule runs no extra inference forward that would consume a micro-batch's side inputs."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    def meta(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    pipe_stages = []
    for k, m in stages:
        cfg = m.cfg
        hidden = meta(micro_batch, seq, cfg.hidden_size, dtype=act_dtype).requires_grad_()  # received activations need grads
        inp = meta(micro_batch, seq, dtype=torch.long) if m.first else hidden
        out = meta(micro_batch, seq, cfg.vocab_size, dtype=act_dtype) if m.last else hidden
        pipe_stages.append(PipelineStage(m, k, n_stages, device, input_args=(inp,), output_args=(out,),
                                         input_grads=(None,) if m.first else (hidden,),
                                         output_grads=None if m.last else (hidden,), group=group))
    # scale_grads=False: the loss is already divided by the global token count
    if kind == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(pipe_stages, n_micro, loss_fn=loss_fn, scale_grads=False)
    cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
    return cls(pipe_stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)
