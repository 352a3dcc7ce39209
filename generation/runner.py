"""What the generation and evaluation jobs share: open the model a task names (on this rank's part of the
layout), and answer a list of prompts split over the data-parallel ranks.

Prompts are sorted by length and decoded in batches (little padding); every rank runs the same number
of batches and steps, a rank without work decoding a one-token stand-in, because expert parallelism
exchanges tokens between ranks inside every MoE layer. Tensor-parallel ranks share their prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from generation.decode import generate
from generation.loading import load_model
from launcher.rundir import load_run_recipe
from launcher.tasks import Task, prompt_ids
from trainer.chat import render_chat, stop_ids
from trainer.parallel import seeded_generator

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Opened:
    model: torch.nn.Module
    tokenizer: object
    template: str
    cfg: object
    recipe: object  # the run's recipe (None for a Hugging Face directory)
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: object = None  # the data-parallel process group (None in one process)


def open_model(task: Task, layout: dict, device: torch.device) -> Opened:
    from model.hf_config import load_config
    from trainer.tokenizer import load_tokenizer

    if task.source_kind == "run":
        recipe = load_run_recipe(Path(task.source))
        cfg, tokenizer = recipe.model, load_tokenizer(recipe.data.tokenizer)
        model, meshes = load_model(cfg, checkpoint=task.checkpoint, peft=recipe.peft, layout=layout, device=device,
                                   dtype=DTYPES[task.dtype])
    else:
        recipe, cfg, tokenizer = None, load_config(task.source), load_tokenizer(task.source)
        model, meshes = load_model(cfg, hf_dir=task.source, layout=layout, device=device, dtype=DTYPES[task.dtype])
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SystemExit(f"moe-launch: error: the tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")
    if meshes is None:
        return Opened(model, tokenizer, task.template or "raw", cfg, recipe)
    return Opened(model, tokenizer, task.template or "raw", cfg, recipe, meshes.dp.get_local_rank(), meshes.dp.size(), meshes.dp_group)


def encode_prompt(opened: Opened, text: str) -> list[int]:
    return prompt_ids(opened.template, text, opened.tokenizer, render_chat)


def _all_done(local: bool) -> bool:
    flag = torch.tensor([0.0 if local else 1.0])
    dist.all_reduce(flag)
    return flag.item() == 0


def answer(opened: Opened, task: Task, prompts: dict[int, list[int]], device: torch.device, progress=None) -> dict[int, dict]:
    """{key: prompt ids} (this rank's share) -> {key: {"tokens", "finish"}}. ``finish``: stop (a stop token),
    length (max_new_tokens or the model's positions) or too_long (the prompt fills the positions: not run)."""
    tok, cfg = opened.tokenizer, opened.cfg
    stops = stop_ids(opened.template, tok)
    pad = next((i for i in (tok.pad_id, tok.eos_id) if i is not None), 0)
    results: dict[int, dict] = {}
    runnable = []
    for key, ids in prompts.items():
        if len(ids) >= cfg.max_position_embeddings:
            results[key] = {"tokens": [], "finish": "too_long"}
        else:
            runnable.append(key)
    runnable.sort(key=lambda k: len(prompts[k]))
    batches = [runnable[i:i + task.batch_size] for i in range(0, len(runnable), task.batch_size)]
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    n_batches = len(batches)
    if distributed:
        t = torch.tensor([float(n_batches)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_batches = int(t.item())
    done_prompts, t0, new_tokens = 0, time.perf_counter(), 0
    for i in range(n_batches):
        keys = batches[i] if i < len(batches) else []
        rows = [prompts[k] for k in keys] or [[pad]]  # a stand-in keeps this rank in step with the others
        gens = [seeded_generator(task.seed, "generate", k) for k in keys] if task.temperature > 0 else None
        out, _ = generate(opened.model, rows, task.max_new_tokens, stops, pad, task.temperature, task.top_p, gens,
                          cfg.max_position_embeddings, _all_done if distributed else None, device, stand_in=not keys)
        for k, toks in zip(keys, out):
            results[k] = {"tokens": toks, "finish": "stop" if toks and toks[-1] in stops else "length"}
            new_tokens += len(toks)
        done_prompts += len(keys)
        if progress is not None:
            progress(done_prompts, len(runnable), new_tokens, time.perf_counter() - t0)
    return results


def gather(obj, opened: Opened) -> list | None:
    """Every data-parallel rank's ``obj`` on rank 0 (tensor-parallel copies counted once); None elsewhere."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (opened.dp_rank, obj))
    if dist.get_rank() != 0:
        return None
    by_dp: dict = {}
    for dp_rank, o in everyone:
        by_dp.setdefault(dp_rank, o)
    return [by_dp[r] for r in sorted(by_dp)]


def progress_printer(what: str, log=print):
    """A progress line every ~10% (rank 0's share of the work; the ranks move in step)."""
    shown = {"at": -1}

    def show(done: int, total: int, tokens: int, seconds: float) -> None:
        tenth = (10 * done) // max(total, 1)
        if tenth == shown["at"] and done < total:
            return
        shown["at"] = tenth
        bar = "#" * (2 * tenth) + "." * (20 - 2 * tenth)
        log(f"{what} [{bar}] {done}/{total} prompts on this rank, {tokens:,} new tokens, "
            f"{tokens / max(seconds, 1e-9):,.1f} tokens/s")

    return show
