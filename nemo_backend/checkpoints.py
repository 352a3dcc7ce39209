"""Where a nemo-backend run's checkpoints are and which are complete (torch- and NeMo-free: ``launch export``
and ``launch status`` read them on the login node).

NeMo's logger puts them under ``RUN/nemo/<recipe name>/checkpoints`` (our recipes resume, so NeMo adds no
version directory), one directory per checkpoint named from ``log.ckpt.filename``
(``<model>--step=<N>-consumed_samples=<M>``, plus a ``-last`` copy of the newest), each holding
``context/`` (the model's config and tokenizer) and ``weights/`` (Megatron's distributed checkpoint). One
still being written has a ``<dir>-unfinished`` marker beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

STEP = re.compile(r"(?:^|-)step=(\d+)(?:-|$)")
FILENAME = "{model_name}--{step}-{consumed_samples}"  # log.ckpt.filename: no val_loss (a run may not validate)


def checkpoint_dir(run: Path, name: str) -> Path:
    return Path(run) / "nemo" / name / "checkpoints"


def is_nemo_checkpoint(path: Path) -> bool:
    return (Path(path) / "context").is_dir() and (Path(path) / "weights").is_dir()


def complete_checkpoints(run: Path, name: str) -> dict[int, Path]:
    """step -> a complete NeMo checkpoint of the run (the plain one where both it and its ``-last`` copy exist)."""
    root = checkpoint_dir(run, name)
    if not root.is_dir():
        return {}
    found: dict[int, Path] = {}
    for p in sorted(root.iterdir(), key=lambda p: p.name.endswith("-last")):  # plain names first
        m = STEP.search(p.name[:-5] if p.name.endswith("-last") else p.name)
        if m and is_nemo_checkpoint(p) and not Path(str(p) + "-unfinished").exists():
            found.setdefault(int(m.group(1)), p)
    return found
