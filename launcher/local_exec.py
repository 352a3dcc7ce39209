"""The local executor: run the rendered ``job.sh`` here, its output to the terminal (unless ``quiet``) and
to ``logs/job.out`` in the run directory (the same layout a Slurm run has), and its state in
``local.yaml``: RUNNING with the pid of the process that follows it, then COMPLETED, FAILED,
CANCELLED (a signal asked it to stop; exit 75 means it checkpointed first) or STOPPED (it
checkpointed and asked for a requeue on its own), with the exit code and the times.

``python -m launcher.local_exec SCRIPT`` does the same without a terminal (``launcher.api`` starts
runs in the background that way).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

STATE_FILE = "local.yaml"
REQUEUE_EXIT = 75  # launcher.render.REQUEUE_EXIT_CODE (not imported: this module stays tiny for background use)


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def write_state(run_dir: Path, **fields) -> None:
    path = run_dir / STATE_FILE
    state = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    state.update(fields)
    tmp = path.with_name(STATE_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(state, sort_keys=False))
    tmp.replace(path)


def read_state(run_dir: Path) -> dict | None:
    path = run_dir / STATE_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else None


def alive(state: dict) -> bool:
    """Is the process that follows this run still there (on this host)?"""
    if state.get("host") != socket.gethostname():
        return True  # another machine's run: trust the record
    try:
        os.kill(int(state["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def run(script: Path, quiet: bool = False) -> int:
    run_dir = script.parent
    log = run_dir / "logs" / "job.out"
    signalled: list[int] = []
    with open(log, "ab") as sink:
        proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        write_state(run_dir, state="RUNNING", pid=os.getpid(), job_pid=proc.pid, host=socket.gethostname(), started=_now(),
                    ended=None, exit_code=None)

        # Ctrl-C / SIGTERM / SIGUSR2 go to the ranks (torchrun starts them in sessions of their own, so a
        # process-group signal would miss them): they checkpoint at the end of the step and exit 75, which
        # the job script and torchrun report as they end. Ctrl-C asks for the same as SIGTERM.
        def forward(sig, _frame):
            if sig != signal.SIGUSR2:
                signalled.append(sig)
            if proc.poll() is None:
                _signal_ranks(proc.pid, signal.SIGTERM if sig == signal.SIGINT else sig)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
        try:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                if not quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
                sink.write(chunk)
                sink.flush()
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    state = ("COMPLETED" if rc == 0 else "CANCELLED" if signalled else "STOPPED" if rc == REQUEUE_EXIT else "FAILED")
    write_state(run_dir, state=state, exit_code=rc, ended=_now())
    return rc


def cancel(run_dir: Path) -> bool:
    """Ask a running local job to stop (SIGTERM to the process that follows it: the ranks checkpoint at the
    end of their step). False when it is not running."""
    state = read_state(run_dir)
    if not state or state.get("state") not in ("RUNNING", "PENDING") or state.get("host") != socket.gethostname() or not alive(state):
        return False
    os.kill(int(state["pid"]), signal.SIGTERM)
    return True


def _descendants(root: int) -> list[int]:
    """``root`` and all processes below it, from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _is_rank(pid: int) -> bool:
    """A worker torchrun started (it has LOCAL_RANK in its environment; torchrun and the job script do not)."""
    try:
        return b"\0LOCAL_RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _signal_ranks(root: int, sig: int) -> None:
    """Signal the ranks below ``root``; before there are any (the job is starting), every process of the job."""
    tree = _descendants(root)
    ranks = [pid for pid in tree if _is_rank(pid)]
    for pid in ranks or tree:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), quiet=True))
