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
    # Hyperparameters come from this attempt's recipe, not the checkpoint: the saved param_groups are one rank's
    # (DCP keeps one copy of non-tensor items), which under PP names another stage's parameters, so the groups
    # would come back without betas/eps; and a resume may change them on purpose.
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for group, own in zip(optimizer.param_groups, hyper):
        group.update(own)
    same_layout = saved["layout"] == current["layout"]
    rng = path / f"rng-{dist.get_rank()}.pt"
    if same_layout and rng.exists():  # RNG streams only mean something for the same ranks
        states = torch.load(rng, weights_only=False)
        torch.set_rng_state(states["cpu"])
        if states["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
    return saved


def start_checkpoint(path: Path) -> Path:
    """The DCP step directory ``checkpoint.load`` names: a step directory, a save_dir (its newest), or a
    run directory (its newest checkpoint; a pipeline's train stage, resolved only once it has run)."""
    from launcher.resume import choose_checkpoint
    from launcher.rundir import is_run, load_run_recipe

    if (path / ".metadata").is_file():
        return path
    if latest(path) is not None:
        return latest(path)
    if is_run(path):
        return choose_checkpoint(path, load_run_recipe(path), None, "checkpoint.load")[1]
    raise SystemExit(f"moe-launch: error: checkpoint.load: {path} is not a moe-launch checkpoint (no .metadata, no step-N inside)")


def _source_peft(step_dir: Path) -> dict | None:
    """The PEFT settings the checkpoint was trained with (trainer.json; older checkpoints: the run's recipe.yaml)."""
    saved = json.loads((step_dir / "trainer.json").read_text()) if (step_dir / "trainer.json").is_file() else {}
    if "peft" in saved:
        return saved["peft"]
    recipe = step_dir.parent.parent / "recipe.yaml"
    if recipe.is_file():
        import yaml

        return (yaml.safe_load(recipe.read_text()) or {}).get("peft")
    return None


@torch.no_grad()
def load_start_weights(model, path: Path, peft) -> tuple[str, bool]:
    """Start a new run from a moe-launch checkpoint's weights (any layout; DCP reshards), whatever PEFT either
    run used: a full model starts from the source's weights with its LoRA adapters folded in (W + B A alpha/r);
    a LoRA model keeps the source's adapters when both have the same LoRA settings, else starts fresh ones on
    that (folded) base. Returns (what was done, for the log; whether the adapters were continued)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from export.checkpoint_reader import CheckpointReader
    from model.hf_io import local_region

    step_dir = start_checkpoint(path)
    reader = CheckpointReader(step_dir)
    saved = set(reader.tensors)
    ours = get_model_state_dict(model)
    is_adapter = lambda k: ".lora_A." in k or ".lora_B." in k  # noqa: E731
    source_peft = _source_peft(step_dir)
    mine = {"rank": peft.rank, "alpha": peft.alpha, "targets": list(peft.targets)} if peft.method == "lora" else None
    same_lora = mine is not None and source_peft is not None and source_peft.get("method") == "lora" and \
        {k: source_peft.get(k) for k in mine} == mine
    wanted = {k: v for k, v in ours.items() if same_lora or not is_adapter(k)}
    missing = sorted(k for k in wanted if k not in saved)
    if missing:
        raise SystemExit(f"moe-launch: error: checkpoint.load: {step_dir} lacks {len(missing)} tensor(s) of this model "
                         f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    state = {"model": wanted}
    dcp.load(state, checkpoint_id=str(step_dir))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    folded = []
    if not same_lora and any(is_adapter(k) for k in saved):
        if source_peft is None:
            raise SystemExit(f"moe-launch: error: checkpoint.load: {step_dir} has LoRA adapters but no record of their alpha/rank")
        scaling = source_peft["alpha"] / source_peft["rank"]
        params = dict(model.named_parameters())
        for module in sorted({k.rsplit(".lora_", 1)[0] for k in saved if is_adapter(k)}):
            if f"{module}.weight" not in params:
                continue  # another pipeline stage's layer
            ab = reader.read({f"{module}.lora_A.weight": None, f"{module}.lora_B.weight": None}, torch.float32)
            delta = ab[f"{module}.lora_B.weight"] @ ab[f"{module}.lora_A.weight"] * scaling
            local, region = local_region(params[f"{module}.weight"])
            local.copy_((local.float() + delta[region].to(local.device)).to(local.dtype))
            folded.append(module)
    how = "its LoRA adapters continued" if same_lora else (f"{len(folded)} LoRA adapter(s) folded into the weights" if folded else "weights")
    return f"started from {step_dir} ({how})", same_lora
