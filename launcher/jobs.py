"""Following jobs: their Slurm state, and the run directories they belong to.

State comes from ``scontrol show job`` (queued, running, and finished jobs Slurm still remembers,
MinJobAge), then ``sacct`` (accounting), then ``sacct -c`` (the job-completion log, which also works
when accounting storage is disabled).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from launcher.errors import UserError


@dataclass
class JobStatus:
    job_id: str
    state: str
    reason: str = ""
    elapsed: str = ""
    exit_code: str = ""
    restarts: int = 0
    source: str = ""

    def line(self) -> str:
        reason = f" ({self.reason})" if self.reason and self.reason != "None" else ""
        return (f"job {self.job_id} {self.state}{reason}, elapsed {self.elapsed or '?'}, exit {self.exit_code or '?'}, "
                f"restarts {self.restarts}  [{self.source}]")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found on PATH: run this on a machine of the Slurm cluster", "slurm") from None


def status(job_id: str) -> JobStatus | None:
    out = _run(["scontrol", "show", "job", job_id, "-o"])
    if out.returncode == 0 and out.stdout.strip():
        fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
        return JobStatus(job_id, fields.get("JobState", "?"), fields.get("Reason", ""), fields.get("RunTime", ""),
                         fields.get("ExitCode", ""), int(fields.get("Restarts", 0) or 0), "scontrol")
    # scontrol fails for a job it no longer remembers ("Invalid job id"); anything else means Slurm is not reachable
    unreachable = "" if "invalid job id" in out.stderr.lower() or out.returncode == 0 else " ".join(out.stderr.split()[-12:])
    for cmd, source in ((["sacct", "-j", job_id], "sacct"), (["sacct", "-c", "-j", job_id], "sacct -c")):
        out = _run([*cmd, "-n", "-P", "-X", "-o", "JobID,State,ExitCode,Elapsed"])
        rows = [r.split("|") for r in out.stdout.splitlines() if r.split("|")[0] == job_id]
        if out.returncode == 0 and rows:
            _, state, code, elapsed = rows[-1][:4]
            return JobStatus(job_id, state.split()[0], "", elapsed, code, max(len(rows) - 1, 0), source)
    if unreachable:
        raise UserError(f"cannot reach Slurm about job {job_id} (is SLURM_CONF set, is this a cluster node?): {unreachable}", "slurm")
    return None


def cancel(job_id: str) -> None:
    out = _run(["scancel", job_id])
    if out.returncode != 0:
        raise UserError(f"scancel refused: {' '.join(out.stderr.split())}", "slurm")


# ----------------------------------------------------------------------------- run directories
def job_id_of(run: Path) -> str | None:
    sub = run / "submission.yaml"
    return str(yaml.safe_load(sub.read_text())["job_id"]) if sub.exists() else None


def runs_in(root: Path) -> list[Path]:
    """Run directories under ``root``, newest first."""
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and (p / "meta.yaml").exists()]
    # by time stamp, then by creation (the runs of one launch share a stamp: sweep points, pipeline stages)
    return sorted(runs, key=lambda p: (p.name[:15], (p / "meta.yaml").stat().st_mtime_ns, p.name), reverse=True)


def find_run(spec: str | None, root: Path) -> Path:
    """A run directory from a path, a run name under ``root``, a Slurm job id, or (None) the newest run."""
    if spec is None:
        runs = runs_in(root)
        if not runs:
            raise UserError(f"no runs under {root}; pass a run directory or use --runs-dir", "RUN")
        return runs[0]
    for candidate in (Path(spec), root / spec):
        if (candidate / "meta.yaml").exists():
            return candidate
    if spec.isdigit():
        for run in runs_in(root):
            if job_id_of(run) == spec:
                return run
    raise UserError(f"{spec!r} is not a run directory, a run under {root}, or the job id of one", "RUN")


def log_file(run: Path) -> Path:
    job = job_id_of(run)
    return run / "logs" / (f"slurm-{job}.out" if job else "job.out")


def local_state(run: Path) -> str:
    """What a local run's files say: steps done, and how it ended if it did."""
    metrics = run / "metrics.jsonl"
    steps = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    code = (run / "EXIT_CODE").read_text().split(" ", 1)[0] if (run / "EXIT_CODE").exists() else None
    return f"local, {steps} steps" + (f", exit {code}" if code else "")


def summary_row(run: Path) -> list[str]:
    meta = yaml.safe_load((run / "meta.yaml").read_text())
    job = job_id_of(run)
    if meta.get("dry_run"):
        state = "dry run"
    elif job:
        try:
            st = status(job)
            state = st.state if st else "unknown (forgotten by Slurm)"
        except UserError:
            state = "? (Slurm unreachable)"
    else:
        state = local_state(run)
    plan = yaml.safe_load((run / "plan.yaml").read_text()) if (run / "plan.yaml").exists() else {}
    dp = plan.get("layout", {}).get("dp")
    return [run.name, plan.get("cluster", "?"), job or "-", state, str(dp) if dp is not None else "-"]
