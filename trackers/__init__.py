"""Experiment trackers in the job (rank 0 only): Weights & Biases and MLflow, off unless the recipe or the
cluster profile asks (settings: launcher/tracking.py).

They log the same scalars as metrics.jsonl (at the same steps), the resolved recipe as config, and at the
end of each attempt the run's report figures as artifacts. A tracker that cannot start or fails later is
a warning on the console and is dropped; the run goes on.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from launcher.tracking import Tracking, wandb_run_id


def _warn(text: str) -> None:
    print(f"moe-launch: warning: {text}", flush=True)  # stdout: the job's console (rank 0's stderr goes to its rank log)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _Wandb:
    name = "wandb"

    def __init__(self, cfg: Tracking, run_dir: Path, run_name: str, config: dict):
        import wandb

        run_id = wandb_run_id(run_dir)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, mode=cfg.wandb_mode,
                              dir=str(cfg.wandb_dir or run_dir), name=run_name, id=run_id, resume="allow", config=config,
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def artifacts(self, folder: Path) -> None:
        art = self.wandb.Artifact("report", type="report")
        for f in sorted(folder.glob("*.png")):
            art.add_file(str(f))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.run.finish()


class _Mlflow:
    name = "mlflow"

    def __init__(self, cfg: Tracking, run_dir: Path, run_name: str, config: dict):
        uri = cfg.mlflow_tracking_uri or (run_dir / "mlruns").absolute().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch; we ask for it knowingly
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.mlflow_experiment)
        marker = run_dir / ".mlflow_run_id"  # a requeued attempt continues the same MLflow run
        run_id = marker.read_text().strip() if marker.exists() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        marker.write_text(self.run.info.run_id + "\n")
        if run_id is None:
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})
        mlflow.log_dict(config, "recipe.json")

    def log(self, step: int, metrics: dict) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def artifacts(self, folder: Path) -> None:
        self.mlflow.log_artifacts(str(folder), "report")

    def finish(self) -> None:
        self.mlflow.end_run()


class Trackers:
    """The trackers a run asked for; each call goes to every tracker still working."""

    def __init__(self, cfg: Tracking, run_dir: Path, run_name: str, recipe: object):
        self.active = []
        config = dataclasses.asdict(recipe) if dataclasses.is_dataclass(recipe) else dict(recipe)
        for on, kind in ((cfg.wandb, _Wandb), (cfg.mlflow, _Mlflow)):
            if not on:
                continue
            try:
                self.active.append(kind(cfg, run_dir, run_name, config))
            except Exception as exc:  # noqa: BLE001 - a tracker must never fail the run
                _warn(f"tracker {kind.name} did not start ({type(exc).__name__}: {exc}); training goes on without it")

    def _each(self, what: str, *args) -> None:
        for t in list(self.active):
            try:
                getattr(t, what)(*args)
            except Exception as exc:  # noqa: BLE001
                _warn(f"tracker {t.name} failed in {what} ({type(exc).__name__}: {exc}); dropped for this attempt")
                self.active.remove(t)

    def log(self, step: int, metrics: dict) -> None:
        if self.active:
            self._each("log", step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def artifacts(self, folder: Path) -> None:
        if self.active and folder.is_dir():
            self._each("artifacts", folder)

    def finish(self) -> None:
        self._each("finish")
        self.active = []
