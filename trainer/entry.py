"""What every job entry point shares (training, export, generation, evaluation): ``--run-dir``, the
process group, and how it ends.

Exit codes: 0 done; 2 refused (bad input or a setting the job cannot take); 75 checkpointed after a
stop signal (training only); anything else a failure. A failing or refusing rank claims
``RUN_DIR/EXIT_CODE`` ("<code> <one line: rank, host, exception>"; the first rank to fail wins) and
prints its traceback to stderr, which the job script's torchrun keeps in that rank's log file
(``logs/ranks/.../<local rank>/stderr.log``). torchrun reports any failed worker as exit 1; the job
script turns EXIT_CODE back into the real code and shows its line once, instead of a traceback per rank.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from launcher.errors import UserError

EXIT_REFUSED = 2
EXIT_CODE_FILE = "EXIT_CODE"


def init_distributed(device_kind: str) -> torch.device:
    """This rank's device, and the process group (NCCL on GPUs, gloo on CPU) torchrun's environment describes."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # On GPUs NCCL carries the tensors on the device; the small host-side collectives (token counts, losses,
        # stop votes, peak memory, objects) go over gloo in the same groups: NCCL alone refuses CPU tensors.
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return device


def claim_exit_code(run_dir: Path, code: int, reason: str) -> bool:
    """Write EXIT_CODE unless another rank already did (the first failure is the cause). True if this one did."""
    try:
        fd = os.open(run_dir / EXIT_CODE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError:
        return False  # not a run directory we can write: the exit code still says it
    with os.fdopen(fd, "w") as f:
        f.write(f"{code} {' '.join(reason.split())}\n")
    return True


def run_entry(prog: str, body: Callable[[Path], int], argv: list[str] | None = None, success: tuple[int, ...] = (0,)) -> None:
    """Parse ``--run-dir``, run ``body(run_dir)`` and exit with its code (see the module docstring).

    ``SystemExit("moe-launch: error: ...")`` or a UserError (bad data, a missing or corrupt run directory)
    from the body is a refusal: exit 2 with that line and no traceback.
    ``success``: codes after which the ranks meet at a barrier before leaving (a failed peer would
    leave the others waiting there)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    code, reason = 1, ""
    rank = os.environ.get("RANK", "0")
    where = f"rank {rank} on {os.environ.get('SLURMD_NODENAME') or socket.gethostname()}"
    try:
        if not (args.run_dir / "plan.yaml").is_file():
            raise UserError(f"{args.run_dir} is not a run directory written by launch (no plan.yaml)", "--run-dir")
        code = body(args.run_dir)
    except UserError as exc:
        code, reason = EXIT_REFUSED, f"{where}: {exc}"
    except SystemExit as exc:
        code = EXIT_REFUSED if isinstance(exc.code, str) else (exc.code or 0)
        if isinstance(exc.code, str):
            reason = f"{where}: {exc.code.removeprefix('moe-launch: error: ')}"
    except Exception as exc:
        traceback.print_exc()
        code, reason = 1, f"{where}: {type(exc).__name__}: {exc}"
    if code not in success and reason:
        print(f"moe-launch: error: {reason}", file=sys.stderr, flush=True)  # in this rank's log, after its traceback
        claim_exit_code(args.run_dir, code, reason)
    if dist.is_initialized():
        if code in success:
            dist.barrier()  # only on success: a failed peer would leave this waiting
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: a finished gloo job can otherwise abort in a worker thread during interpreter shutdown
    os._exit(code)
