"""Recording per-layer expert load and correction bias during training (format: report/expert_load.py).

The loads are the global counts the bias update already all-reduces each step: recording adds one
on-device add per step and, every ``train.expert_load_interval`` steps, one copy to the host on the
stage's writer rank. Each rank's peak memory is gathered at the same interval (``memory.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from model.moe import moe_layers
from report.expert_load import ExpertLoadWriter


class ExpertLoadRecorder:
    """Sums each step's loads and writes one record per interval (and at the last step of an attempt)."""

    def __init__(self, run_dir: Path, model: torch.nn.Module, interval: int, stage: int, writer: bool,
                 resume_step: int | None):
        self.layers = moe_layers(model)
        self.interval = interval
        self.sum: torch.Tensor | None = None
        self.steps = 0
        self.writer = None
        if interval > 0 and writer and self.layers:
            experts = self.layers[0][1].cfg.n_routed_experts
            self.writer = ExpertLoadWriter(run_dir, stage, [i for i, _ in self.layers], experts, resume_step)

    def due(self, step: int, last: bool) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or last)

    def add(self, loads: torch.Tensor | None, step: int, last: bool) -> None:
        """``loads``: the step's global [layers, experts] (update_expert_bias); ``last``: the attempt ends here."""
        if self.writer is None or loads is None:
            return
        self.sum = loads.double() if self.sum is None else self.sum + loads
        self.steps += 1
        if self.due(step, last):
            bias = torch.stack([_bias(m, loads.shape[1], loads.device) for _, m in self.layers])
            self.writer.write(step, self.steps, self.sum.cpu().numpy(), bias.float().cpu().numpy())
            self.sum, self.steps = None, 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _bias(moe, experts: int, device) -> torch.Tensor:
    bias = getattr(moe.gate, "e_score_correction_bias", None)
    return bias.detach() if bias is not None else torch.zeros(experts, device=device)


def record_peak_memory(run_dir: Path, peak_gib: float, step: int) -> None:
    """Every rank's peak memory so far into ``memory.json`` (rank 0 writes; a collective: all ranks call)."""
    mine = torch.tensor([peak_gib], dtype=torch.float64)
    everyone = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if dist.get_rank() != 0:
        return
    path = run_dir / "memory.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(peak_gib=[round(float(t), 4) for t in everyone], peak_step=step)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
