"""Experiment-tracker settings (torch-free): what a recipe's ``tracking`` section and a cluster profile's
``tracking:`` block say, and how the two combine. The trackers themselves run in the job (trackers/)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Optional


@dataclass
class Tracking:
    """Off unless asked. Rank 0 logs the metrics.jsonl scalars, the resolved recipe as config and, at the end
    of each attempt, the report's figures as artifacts; a tracker that fails to start is a warning."""

    wandb: bool = False
    wandb_project: str = "moe-launch"
    wandb_entity: Optional[str] = None
    wandb_mode: str = "offline"  # offline (no internet on the nodes: `wandb sync RUN/wandb/offline-run-*` later) | online
    wandb_dir: Optional[str] = None  # where wandb writes (its wandb/ folder); None: the run directory
    mlflow: bool = False
    mlflow_tracking_uri: Optional[str] = None  # None: a local file store, RUN/mlruns
    mlflow_experiment: str = "moe-launch"


MODES = ("offline", "online")


def resolve(recipe: Tracking, profile: Tracking) -> Tracking:
    """A tracker is on if the recipe or the profile turns it on; every other setting is the recipe's where it
    differs from the default, else the profile's (a profile carries the site's project, URI or offline mode)."""
    default = Tracking()
    out = {}
    for f in dataclasses.fields(Tracking):
        mine, site, base = getattr(recipe, f.name), getattr(profile, f.name), getattr(default, f.name)
        out[f.name] = (mine or site) if isinstance(base, bool) else (mine if mine != base else site)
    return Tracking(**out)


def wandb_run_id(run_dir) -> str:
    """One W&B run per run directory, across requeues and resumes (native trainer and NeMo alike)."""
    from pathlib import Path

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
