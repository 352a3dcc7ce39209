"""Calls to Slurm's command-line tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from launcher.errors import UserError


def require(tool: str = "sbatch") -> str:
    path = shutil.which(tool)
    if not path:
        raise UserError(f"{tool} not found on PATH: this cluster profile submits to Slurm. Run on a login node, "
                        "add --dry-run to only render, or use --cluster local", "slurm")
    return path


def submit(script: Path, after_ok: str | None = None) -> str:
    """``sbatch --parsable``; returns the job id. sbatch's own error message is passed on.

    ``after_ok``: start only after that job completed successfully; if it fails, Slurm cancels this
    one (``--kill-on-invalid-dep=yes``) instead of leaving it pending forever (DependencyNeverSatisfied).
    """
    dep = [f"--dependency=afterok:{after_ok}", "--kill-on-invalid-dep=yes"] if after_ok else []
    out = subprocess.run([require("sbatch"), "--parsable", *dep, str(script)], capture_output=True, text=True, cwd=script.parent)
    if out.returncode != 0:
        msg = " ".join(out.stderr.split()) or f"exit code {out.returncode}"
        raise UserError(f"sbatch refused the job: {msg}", "slurm")
    return out.stdout.strip().split(";")[0]
