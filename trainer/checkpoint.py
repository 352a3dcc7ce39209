"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resharded on load, written atomically.

``<save_dir>/step-00000030/`` holds the DCP shards of model + optimizer (global shapes, so a run can
resume with another DP or EP layout), ``trainer.json`` (step, data position, layout, model
fingerprint) and ``rng-<rank>.pt``. Every rank writes into ``step-XXXXXXXX.partial``; after a barrier
rank 0 renames it, so a directory without ``.partial`` is always complete. The newest ``keep`` stay.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from launcher.recipe import fingerprint  # noqa: F401  (re-exported for the trainer)
from launcher.resume import STEP_DIR, RESUMABLE_CHANGES, ResumeRefused, check_compatible, latest  # noqa: F401



def save(save_dir: Path, step: int, model, optimizer, trainer_state: dict, keep: int) -> Path:
    rank = dist.get_rank()
    final = save_dir / f"step-{step:08d}"
    partial = save_dir / f"step-{step:08d}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               partial / f"rng-{rank}.pt")
    dist.barrier()
    if rank == 0:
        (partial / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        old = sorted(p for p in save_dir.glob("step-*") if STEP_DIR.match(p.name))
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model, optimizer, current: dict) -> dict:
    """Load model + optimizer (resharding as needed); returns the saved trainer state."""
    saved = json.loads((path / "trainer.json").read_text())
    check_compatible(saved, current)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    same_layout = saved["layout"] == current["layout"]
    rng = path / f"rng-{dist.get_rank()}.pt"
    if same_layout and rng.exists():  # RNG streams only mean something for the same ranks
        states = torch.load(rng, weights_only=False)
        torch.set_rng_state(states["cpu"])
        if states["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
    return saved
