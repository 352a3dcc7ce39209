"""Counting the bytes each rank sends, by collective, for one training step: what the planner's communication
model (launcher/comm.py) is checked against (tests/test_comm_model.py).

A TorchDispatchMode sees every collective the step issues, whoever calls it: c10d ops (FSDP2's all-gathers
and reduce-scatters, the expert all-to-all, pipeline send/recv, the trainer's own small all-reduces) and
functional collectives (DTensor's redistributions under TP/SP). Bytes sent per rank follow the ring
algorithms the model assumes: all-gather (n-1)/n of the output, reduce-scatter (n-1)/n of the input,
all-reduce twice that, all-to-all the input's share for other ranks, send the tensor.

``MOE_LAUNCH_COUNT_COMM=STEP`` makes the trainer count step STEP and write ``RUN/comm_count.<rank>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _group(args):
    """The ProcessGroup among a c10d op's arguments (a ScriptObject there), or None."""
    import torch.distributed as dist

    for a in args:
        if type(a).__name__ == "ScriptObject":
            try:
                return dist.ProcessGroup.unbox(a)
            except RuntimeError:  # a ReduceOp
                continue
    return None


def _functional_group(args):
    """The process group a functional collective names (its last string argument)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    name = next((a for a in reversed(args) if isinstance(a, str)), None)
    try:
        return _resolve_process_group(name) if name else None
    except Exception:  # noqa: BLE001
        return None


class CommCounter(TorchDispatchMode):
    """Bytes sent by this rank per (collective, group size); ``records`` keeps every call."""

    def __init__(self):
        super().__init__()
        self.records: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        ns = func.namespace if hasattr(func, "namespace") else ""
        if ns in ("c10d", "_c10d_functional"):
            self._count(ns, name, list(args), kwargs)
        return func(*args, **kwargs)

    def _count(self, ns: str, name: str, args: list, kwargs: dict) -> None:
        if name in ("wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier"):
            return
        if ns == "_c10d_functional":  # (input, ..., [group_size,] group_name)
            pg = _functional_group(args)
            n = pg.size() if pg is not None else 0
            inp = _nbytes(_tensors(args[0]))
            if name.startswith("all_gather"):
                sent = inp * (n - 1)  # each rank sends its part to the n-1 others (ring: (n-1)/n of the output)
            elif name.startswith("reduce_scatter"):
                sent = inp * (n - 1) / n if n else 0
            elif name.startswith("all_reduce"):
                sent = 2 * inp * (n - 1) / n if n else 0
            elif name.startswith("all_to_all"):  # all_to_all_single(input, output_splits, input_splits, group_name)
                splits = [int(x) for x in args[2]] if len(args) > 2 and args[2] else []
                if splits and pg is not None:
                    sent = inp * (sum(splits) - splits[pg.rank()]) / max(sum(splits), 1)
                else:
                    sent = inp * (n - 1) / n if n else 0
            else:
                sent = 0
        else:
            pg = _group(args)
            n = pg.size() if pg is not None else 0
            ts = _tensors(args[0]) if args else []
            if name in ("_allgather_base_", "allgather_into_tensor_coalesced"):
                sent = _nbytes(_tensors(args[1])) * (n - 1)
            elif name in ("allgather_", "allgather_coalesced_"):
                inp = _tensors(args[1])
                sent = _nbytes(inp) * (n - 1)
            elif name in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_", "reduce_scatter_"):
                inp = _tensors(args[1])
                sent = _nbytes(inp) * (n - 1) / n if n else 0
            elif name in ("allreduce_", "allreduce_coalesced_"):
                sent = 2 * _nbytes(ts) * (n - 1) / n if n else 0
            elif name == "alltoall_base_":  # (output, input, group, output_splits, input_splits, ...)
                inp = args[1]
                in_splits = [int(x) for x in args[4]] if len(args) > 4 and args[4] else []
                total = _nbytes([inp])
                if in_splits and n:
                    row = total / max(sum(in_splits), 1)
                    sent = (sum(in_splits) - in_splits[pg.rank()]) * row
                else:
                    sent = total * (n - 1) / n if n else 0
            elif name in ("alltoall_",):
                sent = _nbytes(_tensors(args[1])) * (n - 1) / n if n else 0
            elif name == "send":
                sent = _nbytes(ts)
            elif name in ("broadcast_", "scatter_", "recv_", "recv_any_source_", "gather_", "reduce_"):
                sent = 0 if name.startswith("recv") else _nbytes(ts)
            else:
                sent = 0
        self.records.append({"op": f"{ns}.{name}", "group": n, "bytes": float(sent)})


def write(records: list[dict], run_dir: Path, rank: int) -> None:
    (run_dir / f"comm_count.{rank}.json").write_text(json.dumps(records) + "\n")
