"""What recording per-layer expert load costs (trainer/expert_load.py), as a share of the training step.

The smoke recipe's model and batch in one process (gloo, world 1): each step is forward, backward, AdamW
and the bias update, as in the trainer; recording adds the loads to a running sum every step and, every
interval, copies them with the biases to the host, appends a record and gathers every rank's peak memory
(what the trainer does at each record). Its time is measured around exactly those calls, over the same
steps, at interval 1 (the worst case) and at the default interval.

    python benchmarks/expert_load_overhead.py [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGET = 0.02


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    import torch
    import torch.distributed as dist

    from launcher.recipe import Train
    from launcher.recipe_loader import load_recipe
    from model.moe import update_expert_bias
    from model.transformer import build_model
    from trainer.expert_load import ExpertLoadRecorder, record_peak_memory
    from trainer.metrics import peak_memory_gib

    torch.set_num_threads(1)
    recipe, _ = load_recipe("smoke")
    default_interval = Train().expert_load_interval
    tmp = Path(tempfile.mkdtemp(prefix="expert-load-bench-"))
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=0, world_size=1)
    model = build_model(recipe.model, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    b, s = recipe.train.global_batch_size, recipe.data.seq_length
    batch = torch.randint(0, recipe.model.vocab_size, (b, s), generator=g)
    results = {}
    for interval in (1, default_interval):
        run_dir = tmp / f"interval-{interval}"
        run_dir.mkdir()
        rec = ExpertLoadRecorder(run_dir, model, interval, 0, True, None)
        step_t, rec_t = [], []
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            out = model(batch, labels=batch, return_logits=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loads = update_expert_bias(model, recipe.train.bias_update_rate)
            t1 = time.perf_counter()
            last = step == args.steps
            rec.add(loads, step, last)
            if rec.due(step, last):
                record_peak_memory(run_dir, peak_memory_gib(torch.device("cpu")), step)
            t2 = time.perf_counter()
            if step > 2:  # warm-up
                step_t.append(t1 - t0)
                rec_t.append(t2 - t1)
        rec.close()
        results[interval] = (statistics.mean(rec_t), statistics.median(step_t))
    dist.destroy_process_group()
    print(f"smoke model ({recipe.model.name}, {len(rec.layers)} MoE layers x {recipe.model.n_routed_experts} experts), "
          f"batch {b} x {s}, {args.steps} steps, one process")
    for interval, (rec_s, step_s) in results.items():
        print(f"  interval {interval:>3}: recording {rec_s * 1e3:.3f} ms per step, step {step_s * 1e3:.1f} ms: "
              f"{rec_s / step_s:.2%}")
    share = results[default_interval][0] / results[default_interval][1]
    print(f"recording expert load costs {share:.2%} of step time at the default interval {default_interval} "
          f"(target < {TARGET:.0%}: {'met' if share < TARGET else 'NOT met'}); "
          f"{results[1][0] / results[1][1]:.2%} when recording every step")


if __name__ == "__main__":
    main()
