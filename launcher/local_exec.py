"""The local executor: run the rendered ``job.sh`` here, streaming its output to the terminal and
to ``logs/job.out`` in the run directory (the same layout a Slurm run has)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


def run(script: Path) -> int:
    log = script.parent / "logs" / "job.out"
    with open(log, "ab") as sink:
        proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        # Ctrl-C / SIGUSR2 reach the whole job (torchrun and ranks) through its process group.
        forward = lambda sig, _frame: proc.poll() is None and _killpg(proc.pid, sig)  # noqa: E731
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


def _killpg(pid: int, sig: int) -> None:
    import os

    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
