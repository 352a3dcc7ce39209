"""Time `launch RECIPE --cluster NAME --dry-run` as a whole process (what a user waits for on a login node).

Prints the median over N runs, next to two peers measured in the same run: a bare interpreter start
(`python -c pass`, the floor no Python CLI can beat) and importing just our two libraries
(`python -c "import omegaconf, jinja2"`). Target: median <= 0.25 s on the 2-core dev machine.

    python benchmarks/dry_run.py [-n 20] [recipe] [cluster]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def median_seconds(cmd: list[str], n: int, cwd: str) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", default="recipes/full_ft.py")
    ap.add_argument("cluster", nargs="?", default="h100-8x64")
    ap.add_argument("-n", type=int, default=20)
    args = ap.parse_args()
    launch = Path(sys.executable).with_name("launch")
    launch_cmd = [str(launch)] if launch.exists() else [shutil.which("launch") or sys.exit("launch is not installed")]
    with tempfile.TemporaryDirectory() as runs:
        cmd = [*launch_cmd, args.recipe, "--cluster", args.cluster, "--dry-run", "--runs-dir", runs]
        ours = median_seconds(cmd, args.n, os.getcwd())
    bare = median_seconds([sys.executable, "-c", "pass"], args.n, os.getcwd())
    libs = median_seconds([sys.executable, "-c", "import omegaconf, jinja2"], args.n, os.getcwd())
    print(f"launch {args.recipe} --cluster {args.cluster} --dry-run: median {ours:.3f} s over {args.n} runs (target <= 0.250 s)")
    print(f"  peer: python -c pass                   {bare:.3f} s   ratio ours/peer {ours / bare:.2f}x")
    print(f"  peer: python -c 'import omegaconf, jinja2'  {libs:.3f} s   ratio ours/peer {ours / libs:.2f}x")
    print(f"  launch's own work above the libraries: {ours - libs:.3f} s")


if __name__ == "__main__":
    main()
