"""Per-layer expert load over a run: the file format (torch-free; the trainer writes it, `launch report` reads it).

``RUN/expert_load/stage<P>.json`` names the MoE layers pipeline stage P holds and the record layout;
``RUN/expert_load/stage<P>.bin`` appends fixed-size records, one per recording interval:

    step       int64            the last step the record covers
    steps      int32            how many steps it sums (the interval, or fewer after a resume)
    load       int32[L, E]      tokens routed to each expert of each layer over those steps, summed over
                                every data/context-parallel rank (the global load the bias update uses)
    bias       float32[L, E]    each layer's correction bias after the record's last step

One stage's writer (its first data/tensor/context-parallel rank) owns each file, so nothing is exchanged to
record; a reader of a running job takes the whole records there are. A resume drops the records after
the step it resumes from (those steps run again), like metrics.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIRNAME = "expert_load"


def record_dtype(layers: int, experts: int) -> np.dtype:
    return np.dtype([("step", "<i8"), ("steps", "<i4"), ("load", "<i4", (layers, experts)), ("bias", "<f4", (layers, experts))])


class ExpertLoadWriter:
    """Appends records for one pipeline stage's MoE layers (``layers``: their decoder-layer indices)."""

    def __init__(self, run_dir: Path, stage: int, layers: list[int], experts: int, resume_step: int | None = None):
        self.dir = Path(run_dir) / DIRNAME
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = record_dtype(len(layers), experts)
        self.path = self.dir / f"stage{stage}.bin"
        meta = {"layers": layers, "experts": experts, "record": "step int64, steps int32, load int32[L,E], bias float32[L,E]"}
        (self.dir / f"stage{stage}.json").write_text(json.dumps(meta) + "\n")
        if self.path.exists():
            self._truncate(resume_step)
        self.file = open(self.path, "ab")

    def _truncate(self, resume_step: int | None) -> None:
        """Keep the whole records up to ``resume_step`` (all whole records when None)."""
        size = self.path.stat().st_size
        n = size // self.dtype.itemsize
        if resume_step is not None and n:
            steps = np.fromfile(self.path, dtype=self.dtype, count=n)["step"]
            n = int(np.searchsorted(steps, resume_step, side="right"))
        if n * self.dtype.itemsize != size:
            with open(self.path, "r+b") as f:
                f.truncate(n * self.dtype.itemsize)

    def write(self, step: int, steps: int, load: np.ndarray, bias: np.ndarray) -> None:
        rec = np.zeros(1, dtype=self.dtype)
        rec["step"], rec["steps"], rec["load"], rec["bias"] = step, steps, np.rint(load), bias
        self.file.write(rec.tobytes())
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class ExpertLoad:
    """Every stage's records merged by step: ``load`` [records, layers, experts] (int), ``bias`` (float),
    ``layers`` the decoder-layer index of each row, ``steps`` the last step of each record."""

    layers: list[int]
    steps: np.ndarray
    covered: np.ndarray  # steps each record sums
    load: np.ndarray
    bias: np.ndarray


def read_expert_load(run_dir: Path) -> ExpertLoad | None:
    """What a run has recorded so far (None when nothing): records every stage has written, by step."""
    folder = Path(run_dir) / DIRNAME
    stages = []
    for meta_path in sorted(folder.glob("stage*.json")):
        meta = json.loads(meta_path.read_text())
        dtype = record_dtype(len(meta["layers"]), meta["experts"])
        data = meta_path.with_suffix(".bin")
        n = data.stat().st_size // dtype.itemsize if data.exists() else 0
        stages.append((meta["layers"], np.fromfile(data, dtype=dtype, count=n) if n else np.zeros(0, dtype=dtype)))
    if not stages or not any(len(recs) for _, recs in stages):
        return None
    common = sorted(set.intersection(*(set(recs["step"].tolist()) for _, recs in stages)))  # a running job: stages may differ by one
    if not common:
        return None
    layers, loads, biases, covered = [], [], [], None
    for stage_layers, recs in stages:
        pick = np.isin(recs["step"], common)
        layers += stage_layers
        loads.append(recs["load"][pick])
        biases.append(recs["bias"][pick])
        covered = recs["steps"][pick]
    order = np.argsort(layers)
    load = np.concatenate(loads, axis=1)[:, order]
    bias = np.concatenate(biases, axis=1)[:, order]
    return ExpertLoad([layers[i] for i in order], np.array(common, dtype=np.int64), covered, load, bias)
