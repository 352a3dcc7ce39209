"""The local executor: run the rendered ``job.sh`` here, streaming its output to the terminal and
to ``logs/job.out`` in the run directory (the same layout a Slurm run has)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def run(script: Path) -> int:
    log = script.parent / "logs" / "job.out"
    with open(log, "ab") as sink:
        proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        # Ctrl-C / SIGTERM / SIGUSR2 go to every process of the job: torchrun starts its workers in
        # sessions of their own, so a process-group signal would miss the ranks.
        forward = lambda sig, _frame: proc.poll() is None and _signal_tree(proc.pid, sig)  # noqa: E731
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
        try:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                sink.write(chunk)
            return proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)


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


def _signal_tree(root: int, sig: int) -> None:
    for pid in _descendants(root):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
