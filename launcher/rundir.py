"""Run directories: one per launch, created atomically, never overwritten.

Layout of ``<runs>/<YYYYmmdd-HHMMSS>-<recipe>-<cluster>[-N]/``:
  job.sbatch | job.sh   the rendered job script
  recipe.yaml           the fully resolved recipe (what the job reads)
  cluster.yaml          the resolved cluster profile
  plan.yaml             layout, memory and FLOP estimates, warnings
  meta.yaml             command line, versions, git commit and dirty flag, time, host
  submission.yaml       Slurm job id (written after sbatch accepts the job)
  logs/                 job output
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from launcher.errors import UserError


def runs_root(cli_value: str | None, profile_value: str | None) -> Path:
    """--runs-dir, then $MOE_LAUNCH_RUNS, then the profile's runs_dir, then ./runs."""
    value = cli_value or os.environ.get("MOE_LAUNCH_RUNS") or profile_value or "runs"
    return Path(os.path.expanduser(value)).absolute()


def reserve_name(root: Path, recipe: str, cluster: str, now: dt.datetime | None = None) -> Path:
    """A run directory path that does not exist yet."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = root / f"{stamp}-{recipe}-{cluster}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def create(final: Path, files: dict[str, str]) -> None:
    """Write ``files`` into a staging directory, then rename it to ``final`` (atomic on one filesystem).

    A failure leaves nothing behind. Raises FileExistsError if ``final`` appeared meanwhile: an
    existing directory is never replaced (the caller picks a new name and re-renders).
    """
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    except OSError as exc:
        raise UserError(f"cannot create run directory under {root}: {exc.strerror}", "runs dir") from None
    try:
        (staging / "logs").mkdir()
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)  # code/<package>/... of a container job
            (staging / name).write_text(text)
            if name.endswith((".sbatch", ".sh")):
                os.chmod(staging / name, 0o755)
        os.chmod(staging, 0o755)
        if final.exists():
            raise FileExistsError(final)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def dump(data: object) -> str:
    from launcher.config_io import dump_yaml

    return dump_yaml(data)


def read(run_dir: Path, name: str) -> dict:
    return yaml.safe_load((run_dir / name).read_text()) or {}


LAYOUT_KEYS = ("tp", "pp", "vpp", "ep", "etp", "cp", "dp")


def read_plan(run_dir: Path) -> dict:
    """``plan.yaml`` of a run directory as the job reads it; UserError names the file when it is missing or corrupt."""
    file = Path(run_dir) / "plan.yaml"
    try:
        plan = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read the plan ({type(exc).__name__}); re-launch to write a new run directory", str(file)) from None
    layout = plan.get("layout") if isinstance(plan, dict) else None
    if not isinstance(layout, dict) or not all(isinstance(layout.get(k), int) and layout[k] >= 1 for k in LAYOUT_KEYS):
        raise UserError(f"has no valid layout ({', '.join(LAYOUT_KEYS)} >= 1); re-launch to write a new run directory", str(file))
    return plan


def load_run_recipe(run: Path):
    """A training run's resolved recipe (``recipe.yaml``), type-checked."""
    from launcher import config_io
    from launcher.recipe import Recipe

    if not (run / "recipe.yaml").is_file():
        raise UserError(f"{run} has no recipe.yaml: not a training run", "RUN")
    return config_io.load_yaml_into(Recipe, run / "recipe.yaml")


def is_run(path: Path) -> bool:
    return (path / "meta.yaml").is_file()
