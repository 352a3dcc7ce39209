"""The export job: ``python -m export.main --run-dir JOB_RUN_DIR`` on every rank (torchrun starts it).

Reads ``task.yaml`` (written by ``launch export``): the training run, its checkpoint step, the output
directory, format and dtype. Ranks split the safetensors shards between them; rank 0 writes the
index, config, tokenizer and metadata and renames ``OUT.partial`` to ``OUT`` when all is written.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist

from export.checkpoint_reader import CheckpointReader
from export.hf import DTYPES, ExportRefused, begin, finish, plan_shards, plan_tensors, write_index, write_model_files, write_shards
from export.peft import hf_base, write_adapter
from launcher.errors import UserError
from launcher.memory import fmt_bytes
from launcher.rundir import load_run_recipe
from model.hf_config import hf_model_type
from launcher.tasks import load_task, resolve_at_start
from trainer.entry import init_distributed, run_entry


def _log(msg: str) -> None:
    print(msg, flush=True)


def export(run_dir: Path) -> int:
    t0 = time.perf_counter()
    try:
        task = resolve_at_start(load_task(run_dir))
        recipe = load_run_recipe(Path(task.source))
        hf_model_type(recipe.model)  # refuse before writing, not after the shards (launch export checked it too)
    except (UserError, ValueError) as exc:
        raise SystemExit(f"moe-launch: error: {exc}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        init_distributed("cpu")  # only to meet at barriers: ranks read and write files, not tensors
    rank = dist.get_rank() if dist.is_initialized() else 0

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    out, dtype, cfg = Path(task.out), DTYPES[task.dtype], recipe.model
    reader = CheckpointReader(task.checkpoint)
    scaling = recipe.peft.alpha / recipe.peft.rank
    provenance = {"source_run": task.source, "checkpoint": task.checkpoint, "step": task.step, "format": task.format,
                  "dtype": task.dtype}
    try:
        staging = begin(out) if rank == 0 else out.with_name(out.name + ".partial")
        barrier()
        if task.format == "peft":
            base = hf_base(recipe)
            if base is None:  # the frozen base is not a Hugging Face directory anywhere: export it beside the adapter
                if rank == 0:
                    (staging / "base").mkdir()
                barrier()
                base_shards = plan_shards(plan_tensors(reader.tensors, cfg, dtype, adapters="base"), task.max_shard_bytes)
                write_shards(reader, base_shards, staging / "base", scaling, rank, world, _log)
                barrier()
                if rank == 0:
                    write_index(base_shards, staging / "base")
                    write_model_files(recipe, staging / "base", dtype, {**provenance, "format": "hf", "base_of": str(out)})
                base = str(out.absolute() / "base")
            if rank == 0:
                config = write_adapter(reader, recipe, staging, dtype, base)
                write_model_files(recipe, staging, dtype, provenance)
                (staging / "config.json").unlink()  # an adapter directory has no model config: PEFT reads the base's
                (staging / "generation_config.json").unlink()
                finish(staging, out)
                _log(f"moe-launch: export: PEFT adapter on {', '.join(config['target_modules'])} (r={config['r']}, "
                     f"alpha={config['lora_alpha']}{', routers as modules_to_save' if config['modules_to_save'] else ''}) "
                     f"for base {base} -> {out} in {time.perf_counter() - t0:.1f} s")
            return 0
        tensors = plan_tensors(reader.tensors, cfg, dtype, adapters="merge" if task.format == "merged" else "refuse")
        shards = plan_shards(tensors, task.max_shard_bytes)
        if rank == 0:
            _log(f"moe-launch: export: step {task.step} of {task.source} -> {out} ({task.format}, {task.dtype}): "
                 f"{len(tensors)} tensors, {fmt_bytes(sum(t.nbytes for t in tensors))} in {len(shards)} shard(s) "
                 f"over {world} process(es)")
        write_shards(reader, shards, staging, scaling, rank, world, _log)
        barrier()
        if rank == 0:
            write_index(shards, staging)
            tok_files = write_model_files(recipe, staging, dtype, provenance)
            finish(staging, out)
            _log(f"moe-launch: export: done in {time.perf_counter() - t0:.1f} s: {out} (config.json, generation_config.json, "
                 f"{len(shards)} shard(s) + index, {', '.join(tok_files)})")
    except ExportRefused as exc:
        raise SystemExit(f"moe-launch: error: {exc}") from None
    return 0


def main(argv: list[str] | None = None) -> None:
    run_entry("python -m export.main", export, argv)


if __name__ == "__main__":
    main()
