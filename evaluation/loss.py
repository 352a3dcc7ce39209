"""Teacher-forced answer-only loss and perplexity of a checkpoint on a data split.

``split_loss`` runs inside the evaluation job on its layout (every rank the same number of batches,
sums over the data-parallel ranks). As a command of its own, in one process (a pipeline stage):

  python -m evaluation.loss --run-dir RUN [--split validation] [--checkpoint DIR] [--max-batches N]

reads the run's recipe, loads the newest checkpoint (DCP reshards whatever layout trained it),
writes ``RUN/eval-<split>.json`` and prints one line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from model.transformer import IGNORE_INDEX


@torch.no_grad()
def split_loss(model, dataset, micro_batch_size: int, device, dp_rank: int = 0, dp_size: int = 1, dp_group=None,
               max_batches: int | None = None, prepare=None) -> dict:
    """{"loss", "perplexity", "label_tokens", "batches"} over the whole split (summed over ``dp_group``: the
    data-parallel ranks, or DP x CP when ``prepare`` gives each rank its part of every sequence, trainer.main's
    context-parallel split)."""
    from trainer.data import batch_to, eval_batches

    loss_sum, tokens, batches = 0.0, 0, 0
    for batch in eval_batches(dataset, micro_batch_size, dp_rank, dp_size):
        if max_batches is not None and batches >= max_batches:
            break
        b = batch_to(prepare(batch) if prepare is not None else batch, device)
        tokens += int((b["labels"] != IGNORE_INDEX).sum())
        out = model(b.pop("input_ids"), return_logits=False, reduction="sum", **b)
        loss_sum += float(out.lm_loss)
        batches += 1
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        t = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
        dist.all_reduce(t, group=dp_group)
        loss_sum, tokens = t[0].item(), int(t[1].item())
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "label_tokens": tokens, "batches": batches}


def evaluate(run_dir: Path, split: str = "validation", ckpt: Path | None = None, max_batches: int | None = None) -> dict:
    from generation.loading import load_model
    from launcher.resume import choose_checkpoint
    from launcher.rundir import load_run_recipe
    from trainer.data import build_dataset
    from trainer.tokenizer import load_tokenizer

    recipe = load_run_recipe(run_dir)
    if ckpt is None:
        _, ckpt = choose_checkpoint(run_dir, recipe, None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(recipe.model, checkpoint=ckpt, peft=recipe.peft, device=device,
                          dtype=torch.bfloat16 if recipe.train.precision == "bf16" and device.type == "cuda" else torch.float32)
    dataset = build_dataset(recipe.data, load_tokenizer(recipe.data.tokenizer), split)
    result = split_loss(model, dataset, recipe.train.micro_batch_size, device, max_batches=max_batches)
    step = json.loads((Path(ckpt) / "trainer.json").read_text())["step"]
    return {"checkpoint": str(ckpt), "step": step, "split": split, **result}


def main(argv: list[str] | None = None) -> int:
    from launcher.errors import UserError

    p = argparse.ArgumentParser(prog="python -m evaluation.loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="the training run's directory")
    p.add_argument("--split", default="validation", help="data split: training | validation | test (default validation)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the run's newest)")
    p.add_argument("--max-batches", type=int, help="stop after this many micro-batches")
    args = p.parse_args(argv)
    try:
        result = evaluate(args.run_dir, args.split, args.checkpoint, args.max_batches)
    except UserError as exc:
        print(f"moe-launch: error: {exc}", file=sys.stderr)
        return 2
    (args.run_dir / f"eval-{args.split}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"moe-launch: eval {args.split} at step {result['step']}: loss {result['loss']:.4f} "
          f"perplexity {result['perplexity']:.2f} over {result['label_tokens']} label tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
