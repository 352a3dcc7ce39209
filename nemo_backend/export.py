"""A nemo run's export job: ``python -m nemo_backend.export --run-dir JOB_RUN_DIR`` (one process, in the run's
NeMo container; ``launch export RUN`` renders it for a run trained with ``backend.name=nemo``).

NeMo's checkpoint -> the same Hugging Face directory a native run's export is: for LoRA, NeMo merges the
adapters first (``llm.peft.merge_lora``); NeMo's exporter (``llm.export_ckpt(target="hf")``) is pointed at
a config.json written from our recipe (offline: it would fetch a hub config) and writes transformers'
``.bin`` files; :func:`bin_to_safetensors` rewrites those as safetensors shards in the hub's order, and
the directory gets our config.json, generation_config.json, the run's tokenizer with its chat template
and moe_launch_export.json (so ``launch eval`` / ``generate`` find the template). Everything goes to
``OUT.partial``, renamed to ``OUT`` when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path


def bin_to_safetensors(src: Path, out: Path, dtype, max_shard_bytes: int) -> int:
    """transformers' ``pytorch_model*.bin`` (with its index when sharded) in ``src`` -> safetensors shards and
    index in ``out`` (hub order; floating tensors in ``dtype``, the routing bias kept fp32). Returns the tensors
    written. Files are memory-mapped: a shard's tensors are read when it is written."""
    import torch

    from export.hf import KEEP_FP32
    from model.hf_io import write_safetensors_shards

    index = src / "pytorch_model.bin.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["pytorch_model.bin"]
    tensors = {}
    for name in files:
        tensors.update(torch.load(src / name, map_location="cpu", weights_only=True, mmap=True))

    def convert(key, t):
        return t.to(dtype) if t.is_floating_point() and not key.endswith(KEEP_FP32) else t

    write_safetensors_shards(tensors, out, max_shard_bytes, convert)
    return len(tensors)


def export(run_dir: Path) -> int:
    from nemo.collections import llm

    from export.hf import DTYPES, ExportRefused, begin, finish, write_model_files
    from launcher.errors import UserError
    from launcher.rundir import load_run_recipe
    from launcher.tasks import load_task, resolve_at_start
    from model.hf_config import config_to_hf

    t0 = time.perf_counter()
    try:
        task = resolve_at_start(load_task(run_dir))
        recipe = load_run_recipe(Path(task.source))
        out, dtype = Path(task.out), DTYPES[task.dtype]
        staging = begin(out)
    except (UserError, ExportRefused) as exc:
        raise SystemExit(f"moe-launch: error: {exc}") from None
    work = staging / ".nemo-export"
    work.mkdir()
    source = Path(task.checkpoint)
    if task.format == "merged":
        print(f"moe-launch: export: merging the LoRA adapters of {source} (llm.peft.merge_lora)", flush=True)
        llm.peft.merge_lora(lora_checkpoint_path=str(source), output_path=str(work / "merged"))
        source = work / "merged"
    (work / "hf-config").mkdir()  # NeMo's exporter builds the HF model from a config directory: ours, not the hub's
    (work / "hf-config" / "config.json").write_text(json.dumps(config_to_hf(recipe.model), indent=2) + "\n")
    print(f"moe-launch: export: step {task.step} of {task.source} through NeMo's exporter", flush=True)
    llm.export_ckpt(path=source, target="hf", output_path=work / "hf", overwrite=True,
                    target_model_name=str(work / "hf-config"))
    n = bin_to_safetensors(work / "hf", staging, dtype, task.max_shard_bytes)
    shutil.rmtree(work)
    provenance = {"source_run": task.source, "checkpoint": task.checkpoint, "step": task.step, "format": task.format,
                  "dtype": task.dtype, "backend": "nemo"}
    tok_files = write_model_files(recipe, staging, dtype, provenance)
    finish(staging, out)
    print(f"moe-launch: export: done in {time.perf_counter() - t0:.1f} s: {out} ({n} tensors as safetensors, "
          f"{', '.join(tok_files)})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    from trainer.entry import run_entry

    run_entry("python -m nemo_backend.export", export, argv)


if __name__ == "__main__":
    main()
