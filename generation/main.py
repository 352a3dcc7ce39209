"""The generation job: ``python -m generation.main --run-dir JOB_RUN_DIR`` on every rank (torchrun starts it).

Reads ``task.yaml`` and ``prompts.jsonl`` (written by ``launch generate``), loads the model on the
planned layout, answers the prompts (split over the data-parallel ranks) and writes
``generations.jsonl`` (or the task's ``out``): one object per prompt with id, prompt, output,
the new token count and why it stopped. The answers also go to the console.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


from generation.runner import answer, encode_prompt, gather, open_model, progress_printer
from launcher.cluster import ClusterProfile
from launcher.config_io import load_yaml_into
from launcher.errors import UserError
from launcher.rundir import read_plan
from launcher.tasks import PROMPTS_FILE, load_task, resolve_at_start
from trainer.chat import stop_ids
from trainer.entry import init_distributed, run_entry


def job_setup(run_dir: Path):
    """(task, layout dict, device) of a generation or evaluation job's run directory."""
    import torch

    try:
        task = resolve_at_start(load_task(run_dir))
        profile = load_yaml_into(ClusterProfile, run_dir / "cluster.yaml")
        layout = read_plan(run_dir)["layout"]
    except (UserError, OSError, KeyError, TypeError) as exc:
        raise SystemExit(f"moe-launch: error: {run_dir} is not a complete job run directory: {exc}") from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = init_distributed(profile.device)
    else:
        device = torch.device("cuda" if profile.device == "cuda" and torch.cuda.is_available() else "cpu")
    return task, layout, device


def run(run_dir: Path) -> int:
    import torch.distributed as dist

    task, layout, device = job_setup(run_dir)
    t0 = time.perf_counter()
    opened = open_model(task, layout, device)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    log = print if rank0 else (lambda *a, **k: None)
    rows = [json.loads(line) for line in (run_dir / PROMPTS_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    mine = {i: encode_prompt(opened, r["prompt"]) for i, r in enumerate(rows) if i % opened.dp_size == opened.dp_rank}
    log(f"moe-launch: generate: {len(rows)} prompt(s), model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    results = answer(opened, task, mine, device, progress_printer("generate", lambda m: log(m, flush=True)))
    everyone = gather(results, opened)
    if everyone is None:
        return 0
    merged = {k: v for part in everyone for k, v in part.items()}
    out = Path(task.out) if task.out else run_dir / "generations.jsonl"
    tmp = out.with_name(out.name + ".partial")
    stops = set(stop_ids(opened.template, opened.tokenizer))
    with open(tmp, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            res = merged[i]
            text = opened.tokenizer.decode([t for t in res["tokens"] if t not in stops])
            f.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "output": text, "new_tokens": len(res["tokens"]),
                                "finish": res["finish"]}, ensure_ascii=False) + "\n")
            log(f"--- [{r['id']}] {r['prompt']!r}\n{text}", flush=True)
    tmp.rename(out)
    log(f"moe-launch: generate: {len(rows)} answer(s) in {time.perf_counter() - t0:.1f} s -> {out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    run_entry("python -m generation.main", run, argv)


if __name__ == "__main__":
    main()
