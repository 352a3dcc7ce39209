"""The job of `launch bench comm`: ``python -m commbench.main --run-dir RUN_DIR`` on every rank of the cluster.

Measures all-reduce, all-gather, reduce-scatter and all-to-all with torch.distributed (NCCL on GPUs, gloo on
CPUs) among the ranks of one node and among one rank per node, as bus bandwidth per rank (the bytes each
rank sends over the time: (n-1)/n of the tensor, twice that for all-reduce), and the latency of a tiny
all-reduce. Writes ``RUN_DIR/comm_bench.json`` and the profile's measured overlay (the task's ``out``:
``~/.config/moe-launch/measured/<profile>.yaml``), which the planner's communication model reads from then on.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.entry import init_distributed, run_entry

SIZES = {"cuda": 256 * 2**20, "cpu": 8 * 2**20}  # bytes per rank's tensor
REPEATS = 5


def _time(fn, device) -> float:
    """Median seconds of ``fn`` over REPEATS runs after one warm-up (every rank of the group calls it)."""
    fn()
    out = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def measure(group, n: int, nbytes: int, device) -> dict:
    """GB/s each rank sends for each collective over ``group`` (``n`` ranks), and the latency of 8 bytes."""
    elems = nbytes // 2
    x = torch.ones(elems, dtype=torch.bfloat16, device=device)
    out = {}
    sent = {"all_reduce": 2 * (n - 1) / n * nbytes, "all_gather": (n - 1) * nbytes, "reduce_scatter": (n - 1) / n * nbytes,
            "all_to_all": (n - 1) / n * nbytes}
    gathered = torch.empty(elems * n, dtype=torch.bfloat16, device=device)
    scattered = torch.empty(elems // n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    calls = {"all_reduce": lambda: dist.all_reduce(x, group=group),
             "all_gather": lambda: dist.all_gather_into_tensor(gathered, x, group=group),
             "reduce_scatter": lambda: dist.reduce_scatter_tensor(scattered, x[: (elems // n) * n], group=group),
             "all_to_all": lambda: dist.all_to_all_single(y, x, group=group)}
    for name, call in calls.items():
        out[name] = {"seconds": _time(call, device), "bytes_sent": sent[name]}
        out[name]["gbps"] = out[name]["bytes_sent"] / out[name]["seconds"] / 1e9
    tiny = torch.ones(4, dtype=torch.bfloat16, device=device)
    out["latency_us"] = _time(lambda: dist.all_reduce(tiny, group=group), device) * 1e6
    return out


def bench(run_dir: Path) -> int:
    import yaml

    from launcher.config_io import load_yaml_into
    from launcher.tasks import load_task
    from launcher.cluster import ClusterProfile

    profile = load_yaml_into(ClusterProfile, run_dir / "cluster.yaml")
    task = load_task(run_dir)
    device = init_distributed(profile.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    nodes: list = [None] * world
    dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    order = list(dict.fromkeys(nodes))
    by_node = {n: [r for r in range(world) if nodes[r] == n] for n in order}
    # every rank takes part in creating every group (torch.distributed's rule), then uses its own
    node_groups = {n: dist.new_group(ranks) for n, ranks in by_node.items()}
    leaders = [ranks[0] for ranks in by_node.values()]
    cross = dist.new_group(leaders) if len(leaders) > 1 else None
    nbytes = SIZES.get(device.type, SIZES["cpu"])
    result = {"nodes": {n: len(r) for n, r in by_node.items()}, "bytes_per_rank": nbytes, "device": device.type}
    mine = nodes[rank]
    if len(by_node[mine]) > 1:
        intra = measure(node_groups[mine], len(by_node[mine]), nbytes, device)
        if rank == by_node[order[0]][0]:
            result["intra_node"] = intra
    dist.barrier()
    if cross is not None and rank in leaders:
        inter = measure(cross, len(leaders), nbytes, device)
        if rank == leaders[0]:
            result["inter_node"] = inter
    dist.barrier()
    if rank == 0:
        (run_dir / "comm_bench.json").write_text(json.dumps(result, indent=1) + "\n")
        overlay = {"measured": f"{datetime.datetime.now().isoformat(timespec='seconds')} by launch bench comm, {run_dir}"}
        kinds = ("all_gather", "reduce_scatter", "all_to_all")  # the planner's terms; all-reduce is two of them
        if "intra_node" in result:
            overlay["intra_node_gbps"] = round(statistics.median(result["intra_node"][k]["gbps"] for k in kinds), 3)
        if "inter_node" in result:
            overlay["inter_node_gbps"] = round(statistics.median(result["inter_node"][k]["gbps"] for k in kinds), 3)
            overlay["latency_us"] = round(result["inter_node"]["latency_us"], 1)
        elif "intra_node" in result:
            overlay["latency_us"] = round(result["intra_node"]["latency_us"], 1)
        out = Path(task.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(f"# written by `launch bench comm` ({run_dir}); the profile itself is untouched. Delete this file to\n"
                       f"# plan with the profile's own interconnect figures again.\n" + yaml.safe_dump({"interconnect": overlay}, sort_keys=False))
        tmp.replace(out)
        lines = [f"moe-launch: bench comm on {len(by_node)} node(s) x {max(len(r) for r in by_node.values())} rank(s), "
                 f"{nbytes / 2**20:.0f} MiB per rank ({device.type})"]
        for where in ("intra_node", "inter_node"):
            if where in result:
                r = result[where]
                lines.append(f"  {where.replace('_', ' ')}: " + ", ".join(f"{k} {r[k]['gbps']:.2f} GB/s" for k in
                             ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")) + f"; latency {r['latency_us']:.0f} us")
        lines.append(f"moe-launch: measured interconnect -> {out}")
        print("\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> None:
    run_entry("python -m commbench.main", bench, argv)


if __name__ == "__main__":
    main()
