"""Evaluate a run's checkpoint: answer-only loss and perplexity on a data split, in one process.

  python -m trainer.evaluate --run-dir RUN [--split validation] [--checkpoint DIR] [--max-batches N]

Reads the run's recipe, loads the newest checkpoint (DCP reshards whatever layout trained it into
this one process), writes ``RUN/eval-<split>.json`` and prints one line. A pipeline's eval stage
runs this after its train stage (see ``recipes/smoke_pipeline.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from model.transformer import IGNORE_INDEX, build_model
from trainer import checkpoint
from trainer.data import build_dataset, eval_batches
from trainer.lora import apply_lora
from trainer.main import load_run
from trainer.tokenizer import load_tokenizer


def evaluate(run_dir: Path, split: str = "validation", ckpt: Path | None = None, max_batches: int | None = None) -> dict:
    recipe, profile, _ = load_run(run_dir)
    save_dir = Path(recipe.checkpoint.save_dir or run_dir / "checkpoints")
    ckpt = ckpt or checkpoint.latest(save_dir)
    if ckpt is None:
        raise SystemExit(f"moe-launch: error: no complete checkpoint under {save_dir} to evaluate")
    device = torch.device("cuda" if profile.device == "cuda" and torch.cuda.is_available() else "cpu")
    model = build_model(recipe.model, device=device, mtp_loss_weight=0.0)
    if recipe.peft.method == "lora":
        apply_lora(model, recipe.peft, seed=recipe.train.seed)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt))  # no process group: every shard is read into this process
    model.load_state_dict(state["model"])
    model.eval()
    dataset = build_dataset(recipe.data, load_tokenizer(recipe.data.tokenizer), split)
    bf16 = recipe.train.precision == "bf16" and device.type == "cuda"
    loss_sum, tokens, batches = 0.0, 0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in eval_batches(dataset, recipe.train.micro_batch_size):
            if max_batches is not None and batches >= max_batches:
                break
            b = {k: v.to(device) for k, v in batch.items()}
            out = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"], segment_ids=b["segment_ids"],
                        return_logits=False, reduction="sum")
            loss_sum += float(out.lm_loss)
            tokens += int((b["labels"] != IGNORE_INDEX).sum())
            batches += 1
    loss = loss_sum / max(tokens, 1)
    step = json.loads((ckpt / "trainer.json").read_text())["step"]
    return {"checkpoint": str(ckpt), "step": step, "split": split, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "label_tokens": tokens, "batches": batches}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="the training run's directory")
    p.add_argument("--split", default="validation", help="data split: training | validation | test (default validation)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the run's newest)")
    p.add_argument("--max-batches", type=int, help="stop after this many micro-batches")
    args = p.parse_args(argv)
    if not (args.run_dir / "recipe.yaml").is_file():
        print(f"moe-launch: error: {args.run_dir} is not a run directory (no recipe.yaml)", file=sys.stderr)
        return 2
    result = evaluate(args.run_dir, args.split, args.checkpoint, args.max_batches)
    (args.run_dir / f"eval-{args.split}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"moe-launch: eval {args.split} at step {result['step']}: loss {result['loss']:.4f} "
          f"perplexity {result['perplexity']:.2f} over {result['label_tokens']} label tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
