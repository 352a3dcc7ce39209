"""Bytes per layer our context parallelism moves vs ring attention over full K/V, and a check of the formula.

  python benchmarks/cp_comm.py            # the DeepSeek-V3 table, then the count on gloo
  python benchmarks/cp_comm.py --no-count # the table only

Table: DeepSeek-V3 at 32k / 64k / 128k tokens, CP 2 / 4 / 8, TP 1 and 8, bf16, one sequence per micro-batch:
what one rank receives per MLA layer, forward + backward (launcher/comm.py, the formulas `launch plan`
prints): ours = the latent all-gather and its gradients' reduce-scatter (1/TP each under TP), ring =
K/V blocks around the ring (backward: K/V again plus their gradients). Target: >= 50x fewer.

Count: the tiny model trained one step under CP2 and CP2 x TP2 on gloo (torchrun), the bytes of every
floating-point all-gather and reduce-scatter over the CP group counted as they happen
(trainer.context_parallel), per MLA layer, against the formula for the same config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.comm import cp_attention_bytes  # noqa: E402
from model.presets import deepseek_v3, tiny  # noqa: E402

SEQ, BATCH = 128, 2  # the counted config: tiny model, 2 sequences of 128 tokens, fp32


def table() -> bool:
    cfg, ok = deepseek_v3(), True
    print("DeepSeek-V3, bf16, per MLA layer and rank, forward + backward (MiB)")
    print(f"{'tokens':>7} {'CP':>3} {'TP':>3} {'ours':>9} {'ring K/V':>10} {'ratio':>7}")
    for seq in (32768, 65536, 131072):
        for cp in (2, 4, 8):
            for tp in (1, 8):
                b = cp_attention_bytes(cfg, seq, cp, tp)
                ok &= b.ratio >= 50
                print(f"{seq // 1024:>6}k {cp:>3} {tp:>3} {b.ours / 2**20:>9.1f} {b.ring / 2**20:>10.1f} {b.ratio:>6.0f}x")
    print(f"target >= 50x fewer bytes than ring attention: {'met' if ok else 'NOT met'}")
    return ok


def worker() -> None:
    """One rank: count the CP traffic of one forward + backward of the tiny model."""
    import torch
    import torch.distributed as dist

    from model.transformer import build_model
    from trainer import context_parallel as C

    dist.init_process_group("gloo")
    tp = int(os.environ["CP_COUNT_TP"])
    world = dist.get_world_size()
    cp = world // tp
    rank = dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (cp, tp), mesh_dim_names=("cp", "tp"))  # TP inner, as the trainer's mesh
    cp_group, tp_group = mesh["cp"].get_group(), mesh["tp"].get_group() if tp > 1 else None
    received = {"bytes": 0}
    plain_gather, plain_scatter = C._all_gather, C._reduce_scatter

    def counting_gather(x, group):
        if group is cp_group and x.is_floating_point():
            received["bytes"] += (cp - 1) * x.numel() * x.element_size()
        return plain_gather(x, group)

    def counting_scatter(chunks, group):
        if group is cp_group:
            received["bytes"] += (cp - 1) * chunks[0].numel() * chunks[0].element_size()
        return plain_scatter(chunks, group)

    C._all_gather, C._reduce_scatter = counting_gather, counting_scatter
    cfg = tiny()
    model = build_model(cfg, seed=0)  # no TP split: the gather's traffic does not depend on the heads' split
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)}
    batch["labels"] = torch.roll(batch["input_ids"], -1, 1)
    b = C.split_batch(batch, cp, dist.get_rank(cp_group), cfg.num_nextn_predict_layers)
    ctx = C.ContextParallel.for_batch(cp_group, b.pop("cp_index"), tp_group)
    out = model(b.pop("input_ids"), reduction="sum", return_logits=False, cp=ctx, **b)
    (out.lm_loss + out.mtp_loss.sum()).backward()
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if rank == 0:
        print("COUNT " + json.dumps({"cp": cp, "tp": tp, "per_layer": received["bytes"] / layers}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def count() -> bool:
    ok = True
    print(f"\ncounted on gloo: tiny model, {BATCH} x {SEQ} tokens, fp32, one forward + backward (bytes per MLA layer and rank)")
    for cp, tp in ((2, 1), (2, 2)):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp * tp}",
                              __file__, "--worker"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "CP_COUNT_TP": str(tp), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("COUNT ")), None)
        if res.returncode or line is None:
            print(res.stdout[-2000:] + res.stderr[-3000:])
            return False
        got = json.loads(line[6:])["per_layer"]
        want = cp_attention_bytes(tiny(), SEQ, cp, tp, BATCH, 4).ours
        ok &= got == want
        print(f"  CP{cp} TP{tp}: counted {got:,.0f}, formula {want:,.0f}: {'equal' if got == want else 'DIFFERENT'}")
    return ok


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-count", action="store_true", help="the table only (no torchrun)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker()
        sys.exit(0)
    good = table()
    if not args.no_count:
        good &= count()
    sys.exit(0 if good else 1)
