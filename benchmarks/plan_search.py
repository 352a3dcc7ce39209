"""Time the planner's layout search for DeepSeek-V3 (671B) against a brute-force peer, in one run.

Ours: ``search.layouts`` (every valid layout on the cluster, each with the least recomputation that
fits) plus ``search.fewest_nodes`` up to 1024 nodes (binary search over DP per model-parallel shape).
Peer: the naive way to the same fewest-nodes answer, ``search.layouts`` at every node count from 1
upward until one fits. The script checks both give the same answer and prints the times, the ratio
peer / ours, and ours against the 1-second target.

    python benchmarks/plan_search.py [--max-nodes 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher import memory, search  # noqa: E402
from launcher.cluster import load_profile  # noqa: E402
from launcher.recipe_loader import apply_overrides, load_recipe  # noqa: E402

CASES = [("full_ft", []), ("full_ft", ["backend.name=nemo", "backend.container_image=nemo"]), ("lora", []),
         ("pretrain_671b", [])]


def ours(recipe, profile, max_nodes: int):
    memory._GROUP_CACHE.clear()  # no help from an earlier run
    found = search.fewest_nodes(recipe, profile, max_nodes)
    ranked = search.layouts(recipe, profile)
    return (found[0] if found else None), len(ranked)


def naive_fewest(recipe, profile, limit: int) -> int | None:
    memory._GROUP_CACHE.clear()
    for n in range(1, limit + 1):
        if any(c.pre.memory.verdict == "fits" for c in search.layouts(recipe, dataclasses.replace(profile, nodes=n))):
            return n
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-nodes", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cluster", default="h100-8x64")
    args = ap.parse_args()
    profile = load_profile(args.cluster)[0]
    print(f"{'recipe':34s} {'layouts':>7s} {'fewest':>6s} {'ours s':>7s} {'peer s':>7s} {'peer/ours':>9s} {'ours/1s':>7s}")
    worst = 0.0
    for name, overrides in CASES:
        recipe = apply_overrides(load_recipe(name)[0], overrides)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fewest, n_layouts = ours(recipe, profile, args.max_nodes)
            times.append(time.perf_counter() - t0)
        t_ours = statistics.median(times)
        t0 = time.perf_counter()
        peer = naive_fewest(recipe, profile, fewest or args.max_nodes)
        t_peer = time.perf_counter() - t0
        label = name + (" (" + overrides[0].split("=")[1] + ")" if overrides else "")
        agree = "" if peer == fewest else f"  MISMATCH: peer says {peer}"
        print(f"{label:34s} {n_layouts:7d} {fewest or '-':>6} {t_ours:7.3f} {t_peer:7.2f} {t_peer / t_ours:9.1f} {t_ours:7.2f}{agree}")
        worst = max(worst, t_ours)
        if agree:
            return 1
    print(f"slowest search: {worst:.3f} s ({'under' if worst < 1 else 'OVER'} the 1 s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
