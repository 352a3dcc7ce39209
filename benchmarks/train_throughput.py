"""Training throughput of the native trainer on this machine (CPU, gloo), next to a peer measured in the
same run: the same model, batch and optimizer in a plain single-process PyTorch loop (no torchrun,
no FSDP, no expert parallelism). The ratio shows what the distributed machinery costs or gains.

Configs: ``smoke`` (the smoke recipe: tiny model, 2 processes, EP2) and ``larger`` (hidden 512,
8 layers, 16 experts top-2, seq 256, fp32, 2 processes, EP2).

    python benchmarks/train_throughput.py [--steps 12] [--configs smoke larger]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "smoke": [],
    "larger": ["model.hidden_size=512", "model.num_hidden_layers=8", "model.intermediate_size=1024", "model.moe_intermediate_size=256",
               "model.n_routed_experts=16", "model.num_experts_per_tok=2", "model.n_group=4", "model.topk_group=2",
               "model.num_attention_heads=8", "model.q_lora_rank=128", "model.kv_lora_rank=64", "model.num_nextn_predict_layers=0",
               "data.seq_length=256", "train.global_batch_size=16", "train.micro_batch_size=4"],
}


def run_trainer(name: str, steps: int, runs: Path) -> dict:
    cmd = [sys.executable, "-m", "launcher.cli", "smoke", "--cluster", "local", "--runs-dir", str(runs / name),
           f"train.max_steps={steps}", "checkpoint.interval=100000", *CONFIGS[name]]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    (run,) = (runs / name).iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][2:]  # skip warm-up
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows), "mfu": statistics.median(r["mfu"] for r in rows)}


def run_peer(name: str, steps: int) -> float:
    """Same recipe, one process, plain loop: model(batch).loss.backward(); AdamW.step()."""
    sys.path.insert(0, str(ROOT))
    import torch

    from launcher.recipe_loader import apply_overrides, load_recipe
    from model.transformer import build_model
    from trainer.data import build_train_loader
    from trainer.tokenizer import load_tokenizer

    torch.set_num_threads(2)
    recipe = apply_overrides(load_recipe("smoke")[0], CONFIGS[name])
    model = build_model(recipe.model, seed=0, mtp_loss_weight=recipe.train.mtp_loss_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr)
    loader = build_train_loader(recipe.data, recipe.train, load_tokenizer("byte"))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for b in loader.step_batches():
            model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"], segment_ids=b["segment_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return recipe.train.global_batch_size * recipe.data.seq_length / statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as d:
        for name in args.configs:
            ours = run_trainer(name, args.steps, Path(d))
            peer = run_peer(name, args.steps)
            print(f"{name:7s} trainer (2 procs, EP2, FSDP2): {ours['tokens_per_s']:,.0f} tokens/s, MFU {ours['mfu']:.2%} "
                  f"(of the local profile's nominal 1 TFLOP/s per process)   peer (1 process, plain loop): {peer:,.0f} tokens/s   "
                  f"ratio {ours['tokens_per_s'] / peer:.2f}x")


if __name__ == "__main__":
    main()
