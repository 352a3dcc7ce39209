"""The answer-evaluation job: ``python -m evaluation.main --run-dir JOB_RUN_DIR`` on every rank.

For every example of the split (``task.yaml``, written by ``launch eval``; a run's data, or for a Hugging
Face directory the data directory the task names): the prompt through the chat template, a greedy answer with the compressed cache, and its score against the reference. Writes,
into the task's output directory (``OUT.partial``, renamed when complete):

- ``results.csv``: id, input, reference, prediction, exact_match, f1, prompt_tokens, answer_tokens,
  finish (stop | length | too_long), then every other field of the JSONL row (metadata carried over);
- ``summary.json``: means of exact match and F1, the teacher-forced answer-only loss and perplexity
  on the same examples, counts, tokens/s and the layout.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from evaluation.loss import split_loss
from evaluation.metrics import exact_match, token_f1
from generation.main import job_setup
from generation.runner import answer, encode_prompt, gather, open_model, progress_printer
from trainer.entry import run_entry

CORE_COLUMNS = ["id", "input", "reference", "prediction", "exact_match", "f1", "prompt_tokens", "answer_tokens", "finish"]
_INPUT_KEYS = {"input", "output", "prompt", "completion", "id"}


def run(run_dir: Path) -> int:
    import torch.distributed as dist

    from trainer.data import SFTDataset, read_sft_records, sft_directory, split_file
    from trainer.chat import render_chat, stop_ids

    task, layout, device = job_setup(run_dir)
    t0 = time.perf_counter()
    opened = open_model(task, layout, device)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    log = (lambda m: print(m, flush=True)) if rank0 else (lambda m: None)
    tok = opened.tokenizer
    data, micro_batch = eval_data(task, opened.recipe)
    file = split_file(sft_directory(data), task.split)
    records = read_sft_records(file)[:task.limit] if task.limit else read_sft_records(file)
    log(f"moe-launch: eval: {len(records)} example(s) of {file}, model loaded in {time.perf_counter() - t0:.1f} s")

    # teacher-forced loss on the same examples (every rank takes part: expert parallelism needs all of them)
    samples = [render_chat(opened.template, i, o, tok) for i, o, _ in records]
    pad = next((i for i in (tok.pad_id, tok.eos_id) if i is not None), 0)
    dataset = SFTDataset(samples, data.seq_length, pad, data.answer_only_loss, data.packing)
    loss = split_loss(opened.model, dataset, micro_batch, device, opened.dp_rank, opened.dp_size, opened.dp_group)

    t_gen = time.perf_counter()
    mine = {i: encode_prompt(opened, r[0]) for i, r in enumerate(records) if i % opened.dp_size == opened.dp_rank}
    results = answer(opened, task, mine, device, progress_printer("eval    ", log))
    prompt_tokens = {i: len(ids) for i, ids in mine.items()}
    everyone = gather((results, prompt_tokens), opened)
    if everyone is None:
        return 0
    gen_seconds = time.perf_counter() - t_gen
    answers = {k: v for part, _ in everyone for k, v in part.items()}
    lengths = {k: v for _, part in everyone for k, v in part.items()}
    stops = set(stop_ids(opened.template, tok))
    out = Path(task.out)
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    metadata = sorted({k for _, _, row in records for k in row if k not in _INPUT_KEYS})
    ems, f1s, finishes = [], [], {"stop": 0, "length": 0, "too_long": 0}
    with open(staging / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CORE_COLUMNS + metadata)
        for i, (inp, ref, row) in enumerate(records):
            res = answers[i]
            prediction = tok.decode([t for t in res["tokens"] if t not in stops]).strip()
            em, f1 = exact_match(prediction, ref), token_f1(prediction, ref)
            ems.append(em)
            f1s.append(f1)
            finishes[res["finish"]] += 1
            w.writerow([row.get("id", i), inp, ref, prediction, int(em), f"{f1:.4f}", lengths[i], len(res["tokens"]),
                        res["finish"]] + [_cell(row.get(k)) for k in metadata])
    generated = sum(len(a["tokens"]) for a in answers.values())
    n = max(len(records), 1)
    summary = {
        "run": task.source, "checkpoint": task.checkpoint, "step": task.step, "split": task.split, "data": str(file),
        "examples": len(records), "exact_match": sum(ems) / n, "f1": sum(f1s) / n,
        "loss": loss["loss"], "perplexity": loss["perplexity"], "label_tokens": loss["label_tokens"],
        "finish": finishes, "generated_tokens": generated, "generation_seconds": round(gen_seconds, 3),
        "tokens_per_s": generated / max(gen_seconds, 1e-9), "max_new_tokens": task.max_new_tokens, "template": opened.template,
        "layout": {k: layout[k] for k in ("tp", "ep", "dp")}, "metadata_columns": metadata,
    }
    (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    staging.rename(out)
    log(f"moe-launch: eval: {len(records)} examples, exact match {summary['exact_match']:.3f}, F1 {summary['f1']:.3f}, "
        f"loss {summary['loss']:.4f} (perplexity {summary['perplexity']:.2f}); {generated:,} tokens in {gen_seconds:.1f} s "
        f"-> {out}/results.csv, summary.json")
    return 0


def eval_data(task, recipe):
    """(the data section, micro batch of the loss): the run's; for a Hugging Face directory, the task's data
    directory with answer-only loss, unpacked, at the task's sequence length."""
    if recipe is not None:
        return recipe.data, recipe.train.micro_batch_size
    from launcher.recipe import Data

    return Data(kind="sft", path=task.data, template=task.template, answer_only_loss=True, seq_length=task.seq_length,
                packing=False, tokenizer=task.source), task.batch_size


def _cell(value) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def main(argv: list[str] | None = None) -> None:
    run_entry("python -m evaluation.main", run, argv)


if __name__ == "__main__":
    main()
