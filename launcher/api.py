"""moe-launch from Python (notebooks, scripts, sweeps of your own): the same checks, run directories and jobs
as the ``launch`` command, which is a thin layer over the same functions.

    from launcher import api

    run = api.launch("smoke", "local", ["train.max_steps=20"])   # a recipe name, file or Recipe object
    run.wait()                                                   # -> "COMPLETED"
    run.metrics()[-1]["loss"]                                    # a list of dicts (a DataFrame with pandas=True)
    api.run("20261202-101500-smoke-local").status()              # any existing run

``launch`` returns as soon as the job is submitted (Slurm) or started in the background (the local
executor: ``python -m launcher.local_exec``, output in ``logs/job.out``). Bad input raises
:class:`LaunchRefused` (a :class:`launcher.errors.UserError`) with every problem, and writes nothing.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher import cluster as clusters
from launcher import jobs, local_exec, rundir
from launcher.errors import UserError
from launcher.recipe import Recipe


class LaunchRefused(UserError):
    """The pre-flight checks refused the launch; ``problems`` holds every finding of every run."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


@dataclass
class Run:
    """One run directory and the job that runs it."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def job_id(self) -> str | None:
        return jobs.job_id_of(self.path)

    def status(self) -> jobs.RunState:
        """``.state`` (PENDING, RUNNING, COMPLETED, FAILED exit N, CANCELLED, ...), ``.detail``, and for a
        failed run ``.error`` (the first error line) and ``.log`` (the log holding its traceback)."""
        return jobs.run_state(self.path)

    @property
    def done(self) -> bool:
        state = self.status().state
        return state.split()[0] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "RESIZING")

    def wait(self, timeout: float | None = None, poll: float = 2.0) -> str:
        """Until the job has ended (its final state) or ``timeout`` seconds have passed (TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.name} still {self.status().state} after {timeout} s")
            time.sleep(poll)
        return self.status().state

    def logs(self) -> str:
        """The job's output so far."""
        path = jobs.log_file(self.path)
        return path.read_text(errors="replace") if path.exists() else ""

    def metrics(self, pandas: bool = False):
        """The per-step records of metrics.jsonl (each a dict: step, loss, grad_norm, lr, tokens_per_s, ...)."""
        import json

        path = self.path / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if pandas:
            import pandas as pd

            return pd.DataFrame(rows)
        return rows

    def summary(self) -> dict | None:
        """summary.json of the last attempt that ended (final loss, tokens, wall time, checkpoint)."""
        import json

        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    def cancel(self) -> None:
        """scancel on Slurm; a local run is asked to stop (its ranks checkpoint at the end of the step)."""
        if self.job_id:
            jobs.cancel(self.job_id)
        elif not local_exec.cancel(self.path):
            raise UserError(f"{self.name} is not running (nothing to cancel)", "RUN")


def launch(recipe: str | Recipe, cluster: str, overrides: list[str] | tuple[str, ...] = (), *, sweep: list[str] | tuple[str, ...] = (),
           runs_dir: str | None = None, ignore_memory: bool = False, dry_run: bool = False) -> Run | list[Run]:
    """Check, render, write and start a recipe (or pipeline) on a cluster profile, as ``launch`` does.
    Returns the Run, or the list of runs of a sweep or pipeline."""
    from launcher import submission

    profile, _ = clusters.load_profile(cluster)
    root = rundir.runs_root(runs_dir, profile.runs_dir)
    argv = [getattr(recipe, "name", str(recipe)), "--cluster", cluster, *overrides, *(f"--sweep={s}" for s in sweep)]
    launched = submission.prepare_launch(recipe, list(overrides), list(sweep), profile, root, argv, dry_run, not ignore_memory,
                                         submission.check_can_run)
    if launched.failed:
        problems = [f"{r.run_dir.name}: {p}" for r in launched.failed for p in r.pre.errors]
        raise LaunchRefused(f"{len(problems)} problem(s): " + "; ".join(problems), problems)
    runs = launched.runs
    if not dry_run:
        if launched.array is not None:
            submission.submit_array(runs, launched.array, _Quiet())
        elif profile.executor == "slurm":
            submission.submit_runs(runs, _Quiet())
        elif launched.pipeline:
            raise UserError("a pipeline on the local executor runs in the foreground: use the launch command", "cluster")
        else:
            for r in runs:  # in the background, one after the other (the local machine runs one job at a time)
                _start_local(r.run_dir / r.script_name, after=[x.run_dir for x in runs[:runs.index(r)]])
    out = [Run(r.run_dir) for r in runs]
    return out[0] if len(out) == 1 and not sweep and not launched.pipeline else out


def run(spec: str | None = None, runs_dir: str | None = None) -> Run:
    """An existing run: a run directory, a run name, a Slurm job id, or (None) the newest."""
    return Run(jobs.find_run(spec, jobs.runs_roots(runs_dir)))


def runs(runs_dir: str | None = None, cluster: str | None = None) -> list[Run]:
    """The runs under the runs directories (as ``launch list`` finds them), newest first; dry runs left out."""
    return [Run(p) for p in jobs.runs_in(jobs.runs_roots(runs_dir, cluster)) if not jobs.is_dry_run(p)]


def _start_local(script: Path, after: list[Path]) -> None:
    """``python -m launcher.local_exec SCRIPT`` in the background; with ``after``, once those runs have ended."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom launcher import local_exec\n"
            f"for d in {[str(a) for a in after]!r}:\n"
            "    while (local_exec.read_state(Path(d)) or {}).get('state') in (None, 'RUNNING'):\n"
            "        time.sleep(1)\n"
            f"sys.exit(local_exec.run(Path({str(script)!r}), quiet=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(script.parent))
    local_exec.write_state(script.parent, state="PENDING", pid=proc.pid, host=socket.gethostname())


class _Quiet:
    """A file that swallows the CLI's "submitted job ..." lines."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
