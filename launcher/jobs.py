"""Following jobs: their Slurm state, and the run directories they belong to.

State comes from ``scontrol show job`` (queued, running, and finished jobs Slurm still remembers,
MinJobAge), then ``sacct`` (accounting), then ``sacct -c`` (the job-completion log, which also works
when accounting storage is disabled).
"""

from __future__ import annotations

import json
import re
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
def runs_roots(cli_value: str | None, cluster: str | None = None) -> list[Path]:
    """Where to look for runs: ``--runs-dir``; else ``$MOE_LAUNCH_RUNS`` or ./runs, plus the ``runs_dir`` of
    the profile named by ``--cluster`` (or, without one, of every profile on the search path)."""
    from launcher import cluster as clusters
    from launcher.errors import UserError as _UserError
    from launcher.rundir import runs_root

    if cli_value:
        return [runs_root(cli_value, None)]
    roots = [runs_root(None, None)]
    names = [cluster] if cluster else clusters.available()
    for name in names:
        try:
            prof, _ = clusters.load_profile(name)
        except _UserError:
            if cluster:
                raise
            continue  # a broken profile elsewhere on the path does not stop `launch list`
        if prof.runs_dir:
            roots.append(runs_root(None, prof.runs_dir))
    return list(dict.fromkeys(roots))


def job_id_of(run: Path) -> str | None:
    sub = run / "submission.yaml"
    return str(yaml.safe_load(sub.read_text())["job_id"]) if sub.exists() else None


def runs_in(roots: Path | list[Path]) -> list[Path]:
    """Run directories under ``roots``, newest first."""
    runs = []
    for root in [roots] if isinstance(roots, Path) else roots:
        if root.is_dir():
            runs += [p for p in root.iterdir() if p.is_dir() and (p / "meta.yaml").exists()]
    # by time stamp, then by creation (the runs of one launch share a stamp: sweep points, pipeline stages)
    return sorted(runs, key=lambda p: (p.name[:15], (p / "meta.yaml").stat().st_mtime_ns, p.name), reverse=True)


def find_run(spec: str | None, roots: Path | list[Path]) -> Path:
    """A run directory from a path, a run name under one of ``roots``, a Slurm job id, or (None) the newest run."""
    roots = [roots] if isinstance(roots, Path) else roots
    where = " or ".join(str(r) for r in roots)
    if spec is None:
        runs = [r for r in runs_in(roots) if not is_dry_run(r)]
        if not runs:
            raise UserError(f"no runs under {where}; pass a run directory or use --runs-dir", "RUN")
        return runs[0]
    for candidate in (Path(spec), *(root / spec for root in roots)):
        if (candidate / "meta.yaml").exists():
            return candidate.absolute()
    if spec.isdigit() or re.fullmatch(r"\d+_\d+", spec):
        for run in runs_in(roots):
            if job_id_of(run) == spec:
                return run
    raise UserError(f"{spec!r} is not a run directory, a run under {where}, or the job id of one", "RUN")


def find_array(spec: str | None, roots: list[Path]) -> tuple[str, list[Path]] | None:
    """(array job id, its runs in task order) when ``spec`` names a sweep's job array: its job id or its sweep
    directory (holding array.sbatch and sweep.yaml); None otherwise."""
    if spec is None:
        return None
    sweep = next((d for d in (Path(spec), *(r / spec for r in roots)) if (d / "sweep.yaml").is_file()), None)
    runs = []
    for run in runs_in([sweep.parent] if sweep else roots):
        sub = run / "submission.yaml"
        if sub.exists():
            info = yaml.safe_load(sub.read_text()) or {}
            if (sweep is not None and info.get("sweep") == str(sweep)) or (sweep is None and str(info.get("array_job_id")) == spec):
                runs.append((info.get("array_task", 0), run, str(info.get("array_job_id"))))
    if not runs:
        return None
    runs.sort(key=lambda r: r[0])
    return runs[0][2], [r[1] for r in runs]


def pipeline_of(run: Path) -> dict | None:
    """A pipeline stage's record in meta.yaml (name, stage, index, of, stages); None for other runs."""
    meta = yaml.safe_load((run / "meta.yaml").read_text()) or {}
    return meta.get("pipeline") if isinstance(meta.get("pipeline"), dict) else None


def find_pipeline(spec: str | None, roots: list[Path]) -> tuple[str, list[Path]] | None:
    """(pipeline name, its stages' runs in order) when ``spec`` names a pipeline (its newest launch) or one
    of its stages' runs; None otherwise. The stages of one launch share the parent directory and time stamp."""
    if spec is None:
        return None
    try:
        run = find_run(spec, roots)
        info = pipeline_of(run)
        if info is None:
            return None
        name, group = info["name"], [run.parent]
        stamp = run.name[:15]
    except UserError:  # not a run: a pipeline's name, its newest launch
        name, group, stamp = spec, roots, None
    stages = []
    for r in runs_in(group):
        info = pipeline_of(r)
        if info and info.get("name") == name and (stamp is None or r.name[:15] == stamp):
            if stamp is None:
                stamp = r.name[:15]  # runs_in is newest first: the first match fixes the launch
            if r.name[:15] == stamp:
                stages.append((info.get("index", 0), r))
    return (name, [r for _, r in sorted(stages)]) if stages else None


def log_file(run: Path) -> Path:
    job = job_id_of(run)
    return run / "logs" / (f"slurm-{job}.out" if job else "job.out")


def is_dry_run(run: Path) -> bool:
    meta = yaml.safe_load((run / "meta.yaml").read_text()) or {}
    return bool(meta.get("dry_run")) and not (run / "submission.yaml").exists() and not (run / "local.yaml").exists()


def metrics_tail(run: Path) -> tuple[int, dict | None]:
    """(steps logged, the last record)."""
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return 0, None
    lines = metrics.read_text().splitlines()
    for line in reversed(lines[-2:]):  # a running job's last line may be half-written
        try:
            return len(lines), json.loads(line)
        except ValueError:
            continue
    return len(lines), None


def progress_line(run: Path) -> str:
    """Where training stands, from metrics.jsonl: 'step 40/100, loss 2.1234, 5,120 tokens/s' (what a running job shows)."""
    _, last = metrics_tail(run)
    if not last or "loss" not in last:
        return "no step logged yet"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {} if (run / "recipe.yaml").exists() else {}
    total = (recipe.get("train") or {}).get("max_steps")
    return (f"step {last['step']}{f'/{total}' if total else ''}, loss {last['loss']:.4f}"
            + (f", val loss {last['val_loss']:.4f}" if last.get("val_loss") is not None else "")
            + (f", {last['tokens_per_s']:,.0f} tokens/s" if last.get("tokens_per_s") is not None else ""))


_ERROR_LINE = re.compile(r"^(moe-launch: error: .*|[A-Za-z_.]*(Error|Exception)\b.*: .*)$")


def first_error(run: Path) -> tuple[str | None, Path | None]:
    """The first real error of a failed run and the log that holds the whole story: EXIT_CODE's line (written
    by the first failing rank, or a node check), with the rank log holding its traceback; else the first error
    line of the job's log or of torchrun's own logs."""
    exit_file = run / "EXIT_CODE"
    if exit_file.exists():
        code, _, reason = exit_file.read_text().strip().partition(" ")
        if code not in ("0", "75") and reason:
            ranks = sorted((run / "logs" / "ranks").rglob("stderr.log"), key=lambda p: p.stat().st_mtime)
            holder = next((p for p in ranks if "moe-launch: error:" in p.read_text(errors="replace")), None)
            return reason, holder or log_file(run)
    for log in [log_file(run), *sorted((run / "logs").glob("torchrun*.log"))]:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if _ERROR_LINE.match(line.strip()) and "exited 0" not in line:
                    return line.strip().removeprefix("moe-launch: error: "), log
    return None, None


@dataclass
class RunState:
    """Where a run stands, from Slurm or the local executor's record: one line, and the failure's cause."""

    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, STOPPED, ... ; "dry run"; UNKNOWN
    detail: str = ""
    error: str | None = None
    log: Path | None = None

    @property
    def failed(self) -> bool:
        return self.state.split()[0] in ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "BOOT_FAIL", "DEADLINE")


def run_state(run: Path) -> RunState:
    from launcher import local_exec

    job = job_id_of(run)
    progress = progress_line(run)
    if job:
        try:
            st = status(job)
        except UserError:
            return RunState("? (Slurm unreachable)", f"job {job}")
        if st is None:
            return RunState("UNKNOWN", f"job {job}: forgotten by Slurm (too old?); {progress}")
        rs = RunState(st.state, st.line() + f"; {progress}")
    else:
        local = local_exec.read_state(run)
        if local is None:
            if is_dry_run(run):
                return RunState("dry run", "checked and rendered, never run")
            local = {"state": "UNKNOWN"}  # run before runs kept a record, or by hand
        state, code = local["state"], local.get("exit_code")
        if state in ("RUNNING", "PENDING") and not local_exec.alive(local):
            state = "UNKNOWN"  # the process that ran it is gone without recording an end
        if state == "UNKNOWN" and (run / "EXIT_CODE").exists():
            code = (run / "EXIT_CODE").read_text().split(" ", 1)[0]
            state = "FAILED" if code not in ("0", "75") else state
        if state == "FAILED" and code is not None:
            state = f"FAILED exit {code}"
        rs = RunState(state, f"local on {local.get('host')}, started {local.get('started')}"
                      + (f", ended {local['ended']}, exit {code}" if local.get("ended") else "") + f"; {progress}")
    if rs.failed or rs.state == "UNKNOWN":
        rs.error, rs.log = first_error(run)
    return rs


def recipe_name(run: Path) -> str:
    """The recipe a run trained (a job on a trained model: "<kind>-<recipe>", its run directory label)."""
    if (run / "recipe.yaml").exists():
        return (yaml.safe_load((run / "recipe.yaml").read_text()) or {}).get("name", "?")
    meta = yaml.safe_load((run / "meta.yaml").read_text()) or {}
    return (meta.get("task") or {}).get("kind", "?")


def summary_row(run: Path) -> list[str]:
    plan = yaml.safe_load((run / "plan.yaml").read_text()) if (run / "plan.yaml").exists() else {}
    dp = plan.get("layout", {}).get("dp")
    return [run.name, plan.get("cluster", "?"), job_id_of(run) or "-", run_state(run).state, str(dp) if dp is not None else "-"]
