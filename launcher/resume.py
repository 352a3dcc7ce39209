"""Which checkpoint a run resumes from, and whether it can (torch-free: the launcher checks this before
queueing, the trainer again before training). A checkpoint's ``trainer.json`` records the model/PEFT
fingerprint and the layout it was written with.

Also the other way a run uses an earlier one: ``checkpoint.load=RUN[:STEP]`` starts a new run from a
run's checkpoint (its weights only: a new optimizer, data order and step count), whatever the two
runs' layouts, PEFT settings or data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from launcher.errors import UserError

STEP_DIR = re.compile(r"^step-(\d{8})$")  # a complete checkpoint (writers use step-N.partial)
RESUMABLE_CHANGES = ("dp", "ep", "edp", "cp")  # DCP reshards these (CP is an FSDP dimension too); the rest must match


class ResumeRefused(RuntimeError):
    """The checkpoint cannot continue with this recipe or layout."""


def latest(save_dir: Path) -> Path | None:
    """The newest complete checkpoint (``step-XXXXXXXX`` with its trainer.json), if any."""
    if not save_dir.is_dir():
        return None
    steps = sorted(p for p in save_dir.iterdir() if STEP_DIR.match(p.name) and (p / "trainer.json").exists())
    return steps[-1] if steps else None


def check_compatible(saved: dict, current: dict) -> None:
    if saved.get("fingerprint") != current["fingerprint"]:
        raise ResumeRefused("the checkpoint was written for another model or PEFT configuration "
                            f"(fingerprint {saved.get('fingerprint')} vs {current['fingerprint']}); use a new checkpoint.save_dir")
    for dim in ("tp", "pp", "vpp", "etp"):
        if saved["layout"].get(dim, 1) != current["layout"].get(dim, 1):
            raise ResumeRefused(f"the checkpoint was written with {dim.upper()}={saved['layout'].get(dim)}, this layout has "
                                f"{dim.upper()}={current['layout'].get(dim)}; only {', '.join(d.upper() for d in RESUMABLE_CHANGES)} may change on resume")


def check_save_dir(save_dir: Path, current: dict) -> Path | None:
    """The checkpoint a launch would resume from, after checking it can; None if there is none."""
    found = latest(save_dir)
    if found is not None:
        check_compatible(json.loads((found / "trainer.json").read_text()), current)
    return found


# ------------------------------------------------------------------------------- the checkpoints of a run
def checkpoint_dir(run: Path, recipe) -> Path:
    if recipe.backend.name == "nemo":
        from nemo_backend import checkpoints

        return checkpoints.checkpoint_dir(run, recipe.name)
    return Path(os.path.expanduser(recipe.checkpoint.save_dir)) if recipe.checkpoint.save_dir else run / "checkpoints"


def complete_checkpoints(run: Path, recipe) -> dict[int, Path]:
    """step -> directory of every complete checkpoint of the run (``step-N`` with its trainer.json; a nemo
    run's: NeMo's own, see nemo_backend.checkpoints)."""
    if recipe.backend.name == "nemo":
        from nemo_backend import checkpoints

        return checkpoints.complete_checkpoints(run, recipe.name)
    save_dir = checkpoint_dir(run, recipe)
    if not save_dir.is_dir():
        return {}
    return {int(STEP_DIR.match(p.name).group(1)): p for p in sorted(save_dir.iterdir())
            if STEP_DIR.match(p.name) and (p / "trainer.json").is_file()}


def choose_checkpoint(run: Path, recipe, step: int | None, field: str = "--step") -> tuple[int, Path]:
    found = complete_checkpoints(run, recipe)
    if not found:
        raise UserError(f"run {run.name} has no complete checkpoint under {checkpoint_dir(run, recipe)} "
                        "(it has not reached a checkpoint step yet, or it wrote elsewhere)", "RUN" if field == "--step" else field)
    if step is None:
        step = max(found)
    if step not in found:
        raise UserError(f"run {run.name} has no checkpoint at step {step}; it has steps {', '.join(map(str, sorted(found)))}", field)
    return step, found[step]


# ---------------------------------------------------------------------------------- starting from a run
# Fields a new run may change relative to the run it starts from: names, initialisation (unused), MTP
# modules it drops, and the routing balance settings (the weights do not depend on them).
_FREE_MODEL_FIELDS = {"name", "initializer_range", "num_nextn_predict_layers", "aux_loss_alpha"}


def model_differences(source, target) -> list[str]:
    """Fields of ModelConfig on which a run cannot start from another's weights."""
    a, b = dataclasses.asdict(source), dataclasses.asdict(target)
    diffs = [f"{k} {a[k]} vs {b[k]}" for k in a if k not in _FREE_MODEL_FIELDS and a[k] != b[k]]
    if target.num_nextn_predict_layers > source.num_nextn_predict_layers:
        diffs.append(f"num_nextn_predict_layers {source.num_nextn_predict_layers} vs {target.num_nextn_predict_layers} "
                     "(the source has fewer MTP modules)")
    return diffs


def find_run(spec: str, root: Path) -> Path | None:
    """A run directory named by path or by name under ``root``; None if ``spec`` names none."""
    from launcher.rundir import is_run

    for candidate in (Path(os.path.expanduser(spec)), root / spec):
        if is_run(candidate):
            return candidate.absolute()
    return None


def resolve_load(recipe, root: Path, produced: tuple[str, ...] = ()):
    """The recipe with ``checkpoint.load=RUN[:STEP]`` (a run directory or a run name under ``root``) replaced
    by that run's checkpoint directory (load_format dcp), after checking the model matches. A moe-launch
    checkpoint given by path (a step directory or a save_dir) is read as DCP too. Paths an earlier
    pipeline stage produces are left as they are (the trainer resolves them when it starts)."""
    from launcher.rundir import load_run_recipe

    spec = recipe.checkpoint.load
    if not spec or any(os.path.join(spec, "").startswith(os.path.join(d, "")) for d in produced):
        if spec and recipe.checkpoint.load_format == "hf" and any(spec.rstrip("/") == d.rstrip("/") for d in produced):
            recipe = dataclasses.replace(recipe, checkpoint=dataclasses.replace(recipe.checkpoint, load_format="dcp"))
        return recipe
    head, sep, tail = spec.rpartition(":")
    run_spec, step = (head, int(tail)) if sep and tail.isdigit() else (spec, None)
    run = find_run(run_spec, root)
    if run is not None:
        source = load_run_recipe(run)
        step, path = choose_checkpoint(run, source, step, "checkpoint.load")
        diffs = model_differences(source.model, recipe.model)
        if diffs:
            raise UserError(f"run {run.name} trained another model ({'; '.join(diffs[:4])}); start from a run of the same model",
                            "checkpoint.load")
        return dataclasses.replace(recipe, checkpoint=dataclasses.replace(recipe.checkpoint, load=str(path), load_format="dcp"))
    path = Path(os.path.expanduser(spec))
    if (path / ".metadata").is_file() or latest(path) is not None:
        return dataclasses.replace(recipe, checkpoint=dataclasses.replace(recipe.checkpoint, load_format="dcp"))
    return recipe
