"""Time `launch RECIPE --cluster NAME --dry-run` as a whole process (what a user waits for on a login node).

Prints the median over N runs, next to peers measured in the same run (interleaved, so that machine
noise hits all alike): a bare interpreter start (`python -c pass`, the floor no Python CLI can beat),
importing the libraries launch uses (`python -c "import jinja2, yaml"`), and the issue's peer
`python -c "import jinja2, omegaconf, yaml"` (launch no longer imports omegaconf; shown when installed).
Target (issue 13): ours / `import jinja2, omegaconf, yaml` <= 1.3x.

All commands run with bytecode caching on (PYTHONDONTWRITEBYTECODE unset, pycs under a temporary
PYTHONPYCACHEPREFIX, warmed by the first round), as on a user's install, where pip compiles at install
time: with it off, an editable checkout recompiles every module of launch on every call.

    python benchmarks/dry_run.py [-n 20] [recipe] [cluster]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def medians(cmds: dict[str, list[str]], n: int, cwd: str) -> dict[str, float]:
    """Median wall time of each command over ``n`` rounds, the commands interleaved within a round."""
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(n):
        for key, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", default="recipes/full_ft.py")
    ap.add_argument("cluster", nargs="?", default="h100-8x64")
    ap.add_argument("-n", type=int, default=20)
    args = ap.parse_args()
    launch = Path(sys.executable).with_name("launch")
    launch_cmd = [str(launch)] if launch.exists() else [shutil.which("launch") or sys.exit("launch is not installed")]
    has_omegaconf = importlib.util.find_spec("omegaconf") is not None
    with tempfile.TemporaryDirectory() as runs, tempfile.TemporaryDirectory() as cache:
        cmds = {"ours": [*launch_cmd, args.recipe, "--cluster", args.cluster, "--dry-run", "--runs-dir", runs],
                "bare": [sys.executable, "-c", "pass"],
                "libs": [sys.executable, "-c", "import jinja2, yaml"]}
        if has_omegaconf:
            cmds["issue"] = [sys.executable, "-c", "import jinja2, omegaconf, yaml"]
        os.environ["XDG_CACHE_HOME"] = cache  # compiled templates: the first round fills it, as a user's first launch does
        os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(cache, "pyc")
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        medians(cmds, 1, os.getcwd())  # warm: bytecode and templates compiled once
        t = medians(cmds, args.n, os.getcwd())
    ours = t["ours"]
    print(f"launch {args.recipe} --cluster {args.cluster} --dry-run: median {ours:.3f} s over {args.n} runs")
    print(f"  peer: python -c pass                              {t['bare']:.3f} s   ours/peer {ours / t['bare']:.2f}x")
    print(f"  peer: python -c 'import jinja2, yaml'             {t['libs']:.3f} s   ours/peer {ours / t['libs']:.2f}x  (the libraries launch imports)")
    if has_omegaconf:
        print(f"  peer: python -c 'import jinja2, omegaconf, yaml'  {t['issue']:.3f} s   ours/peer {ours / t['issue']:.2f}x  (target <= 1.30x)")
    else:
        print("  peer: python -c 'import jinja2, omegaconf, yaml'  not run: omegaconf is not installed (launch does not use it)")
    print(f"  launch's own work above its libraries: {ours - t['libs']:.3f} s")


if __name__ == "__main__":
    main()
