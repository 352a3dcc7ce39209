"""The nemo backend's job entry: ``python -m nemo_backend.main --run-dir RUN_DIR`` on every rank (torchrun).

Reads the run directory ``launch`` wrote, builds the NeMo recipe (:mod:`nemo_backend.recipe`), writes
what NeMo is asked to do into the run directory before training (``nemo_recipe.yaml``, readable, and
``nemo_recipe.json``, nemo_run's serialised form that deserialises to the same recipe), then runs it in
this process (``run.run(recipe, direct=True)``) under the torchrun our job script started, with our
requeue protocol (:mod:`nemo_backend.requeue`: checkpoint and exit 75 on SIGUSR2/SIGTERM).

``--config-only``: write the two files and stop (what ``launch``'s tests run on CPU; NeMo's trainer
needs GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.cluster import ClusterProfile
from launcher.config_io import load_yaml_into
from launcher.errors import UserError
from launcher.recipe import Recipe
from launcher.rundir import read_plan

RECIPE_YAML, RECIPE_JSON = "nemo_recipe.yaml", "nemo_recipe.json"


def write_config(run_dir: Path):
    """Build the NeMo recipe of ``run_dir`` and write its YAML and JSON there (rank 0). Returns the recipe."""
    from nemo_run.core.serialization.yaml import YamlSerializer
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from nemo_backend.recipe import build, unsupported

    recipe = load_yaml_into(Recipe, run_dir / "recipe.yaml")
    problems = unsupported(recipe)
    if problems:
        field, why = problems[0]
        raise UserError(why, field)
    nemo = build(recipe, read_plan(run_dir), str(run_dir), trackers(recipe, run_dir))
    if int(os.environ.get("RANK", "0")) == 0:
        (run_dir / RECIPE_YAML).write_text(YamlSerializer().serialize(nemo))
        (run_dir / RECIPE_JSON).write_text(ZlibJSONSerializer().serialize(nemo))
    return nemo


def trackers(recipe: Recipe, run_dir: Path) -> dict:
    """The run's trackers as NeMo loggers; one whose package the container lacks is a warning and left out
    (as in the native trainer, a tracker never fails the run)."""
    import importlib.util

    from launcher.tracking import resolve
    from nemo_backend.recipe import tracker_values

    profile = load_yaml_into(ClusterProfile, run_dir / "cluster.yaml")
    wanted = tracker_values(resolve(recipe.tracking, profile.tracking), str(run_dir), recipe.name)
    for name in list(wanted):
        if importlib.util.find_spec(name) is None:
            print(f"moe-launch: warning: tracker {name}: the {name} package is not in this environment; "
                  "training goes on without it", flush=True)
            del wanted[name]
    if "mlflow" in wanted and wanted["mlflow"]["tracking_uri"].startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store, asked for knowingly
    return wanted


def once(done: Path, work) -> None:
    """Rank 0 runs ``work()`` unless ``done`` exists (a requeued job finds it), then writes ``done``; the other
    ranks wait for it."""
    import time

    if int(os.environ.get("RANK", "0")) == 0 and not done.exists():
        work()
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("done\n")
    while not done.exists():
        time.sleep(5)


def prepare_inputs(run_dir: Path) -> None:
    """What NeMo reads that our inputs are not yet: an HF ``checkpoint.load`` is imported into the run directory
    (:mod:`nemo_backend.hf_import`: NeMo restores only NeMo checkpoints; GPU-only, its importer needs TransformerEngine),
    a pretraining token file gets its Megatron index (:mod:`nemo_backend.data`)."""
    from nemo_backend.recipe import imported_path

    recipe = load_yaml_into(Recipe, run_dir / "recipe.yaml")
    if recipe.checkpoint.load and recipe.checkpoint.load_format == "hf":
        from nemo_backend.hf_import import import_checkpoint

        target = Path(imported_path(str(run_dir)))
        once(target.with_name(target.name + ".done"),
             lambda: target.exists() or import_checkpoint(Path(recipe.checkpoint.load), target))
    if recipe.data.kind == "pretrain":
        from nemo_backend.data import index_token_file, megatron_prefix

        prefix = megatron_prefix(str(run_dir))
        once(Path(prefix + ".done"), lambda: index_token_file(recipe.data.path, prefix))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_backend.main")
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--config-only", action="store_true", help="write nemo_recipe.yaml/json and stop")
    args = ap.parse_args(argv)
    if args.config_only:
        try:
            if not (args.run_dir / "plan.yaml").is_file():
                raise UserError(f"{args.run_dir} is not a run directory written by launch (no plan.yaml)", "--run-dir")
            write_config(args.run_dir)
        except UserError as exc:
            print(f"moe-launch: error: {exc}", file=sys.stderr)
            sys.exit(2)
        print(f"moe-launch: nemo: wrote {args.run_dir / RECIPE_YAML} and {RECIPE_JSON}")
        return
    from trainer.entry import run_entry

    def body(run_dir: Path) -> int:
        import nemo_run as run

        recipe = write_config(run_dir)
        prepare_inputs(run_dir)
        run.run(recipe, direct=True)  # NeMo's trainer in this process, under our torchrun
        return 0

    from launcher.render import REQUEUE_EXIT_CODE

    run_entry("python -m nemo_backend.main", body, ["--run-dir", str(args.run_dir)], success=(0, REQUEUE_EXIT_CODE))


if __name__ == "__main__":
    main()
