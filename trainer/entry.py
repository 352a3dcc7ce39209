"""What every job entry point shares (training, export, generation, evaluation): ``--run-dir``, the
process group, and how it ends.

Exit codes: 0 done; 2 refused (bad input or a setting the job cannot take: one line, no traceback);
75 checkpointed after a stop signal (training only); anything else a failure. torchrun reports any
failed worker as 1, so rank 0 also writes ``RUN_DIR/EXIT_CODE`` ("<code> <reason>"), which the job
script turns back into the real exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

EXIT_REFUSED = 2
EXIT_CODE_FILE = "EXIT_CODE"


def init_distributed(device_kind: str) -> torch.device:
    """This rank's device, and the process group (NCCL on GPUs, gloo on CPU) torchrun's environment describes."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return device


def run_entry(prog: str, body: Callable[[Path], int], argv: list[str] | None = None, success: tuple[int, ...] = (0,)) -> None:
    """Parse ``--run-dir``, run ``body(run_dir)`` and exit with its code (see the module docstring).

    ``SystemExit("message")`` from the body is a refusal: the message is printed as one line, exit 2.
    ``success``: codes after which the ranks meet at a barrier before leaving (a failed peer would
    leave the others waiting there)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    code = 1
    try:
        code = body(args.run_dir)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            print(exc, file=sys.stderr, flush=True)
        code = EXIT_REFUSED if isinstance(exc.code, str) else (exc.code or 0)
    except Exception:
        traceback.print_exc()
        code = 1
    if code not in (0, 1) and os.environ.get("RANK", "0") == "0" and not (args.run_dir / EXIT_CODE_FILE).exists():
        try:
            (args.run_dir / EXIT_CODE_FILE).write_text(f"{code} refused (see the message above)\n")
        except OSError:
            pass  # not a run directory we can write: the exit code still says it
    if dist.is_initialized():
        if code in success:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: a finished gloo job can otherwise abort in a worker thread during interpreter shutdown
    os._exit(code)
