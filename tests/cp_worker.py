"""One CP rank of tests/test_context_parallel.py: ``torchrun --nproc-per-node 2 tests/cp_worker.py MODE...``.

The tiny model (MLA, MoE, MTP) on a packed batch whose documents cross the CP chunks, with context
parallelism as the trainer runs it (trainer.context_parallel; gradients summed over CP as FSDP sums
them), against the same model and batch in one process on every rank. For each MODE prints one line
``RESULT {"mode", "loss_diff", "grad_diff"}`` (rank 0). MODEs other than ``correct`` are the classic
mistakes, made on purpose: the test checks they are caught.
"""

import json
import sys

import torch
import torch.distributed as dist

from model.presets import tiny
from model.transformer import IGNORE_INDEX, build_model, mtp_targets
from trainer import context_parallel
from trainer.context_parallel import ContextParallel, split_batch

B, S, DEPTH, MTP_WEIGHT = 2, 64, 1, 0.1


def packed_batch() -> dict:
    """Documents of 10, 17, 18 and 19 tokens (row 0) and 29 + 35 (row 1): none aligned to CP2's 16-token chunks."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (B, S), generator=g)
    seg, pos = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
    for row, lengths in enumerate(([10, 17, 18, 19], [29, 35])):
        start = 0
        for i, n in enumerate(lengths):
            seg[row, start:start + n], pos[row, start:start + n] = i, torch.arange(n)
            start += n
    labels = torch.roll(ids, -1, dims=1).masked_fill(torch.roll(seg, -1, dims=1) != seg, IGNORE_INDEX)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :5] = IGNORE_INDEX  # an unlabelled prompt
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg}


def loss_of(out, counts) -> torch.Tensor:
    loss = out.lm_loss / counts[0]
    return loss + MTP_WEIGHT * sum(out.mtp_loss[k] / counts[1 + k] for k in range(DEPTH)) / DEPTH


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def config(mode: str):
    """The tiny model; ``with_aux_loss``: with DeepSeek's sequence-wise balance loss (statistics of whole sequences)."""
    cfg = tiny()
    if mode in ("with_aux_loss", "aux_loss_local_stats"):
        cfg.aux_loss_alpha = 0.01
    return cfg


def reference(mode: str, batch: dict, counts: list[float]) -> tuple[float, dict]:
    model = build_model(config(mode), seed=0, mtp_loss_weight=MTP_WEIGHT)
    out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                segment_ids=batch["segment_ids"], reduction="sum", return_logits=False)
    loss = loss_of(out, counts)
    loss.backward()
    return loss.item(), grads(model)


def run(mode: str, batch: dict, counts: list[float]) -> tuple[float, dict]:
    import model.moe as moe

    cp, rank, group = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    whole = moe.sequence_aux_loss
    if mode == "aux_loss_local_stats":  # the balance loss from this rank's part of each sequence only
        moe.sequence_aux_loss = lambda scores, ids, batch_size, alpha, cp=None: whole(scores, ids, batch_size, alpha)
    model = build_model(config(mode), seed=0, mtp_loss_weight=MTP_WEIGHT)
    b = split_batch(batch, cp, rank, DEPTH)
    if mode == "local_positions":  # RoPE/YaRN on positions counted from this rank's first token
        b["position_ids"] = torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"])
    ctx = ContextParallel.for_batch(group, b.pop("cp_index"))
    if mode == "detached_gather":  # dist.all_gather with this rank's part put back: the others' gradients are lost
        def gather(x, dim):
            parts = list(context_parallel.gather_constant(x.detach(), dim, group).chunk(cp, dim=dim))
            parts[rank] = x
            return torch.cat(parts, dim=dim)
        ctx.gather = gather
    if mode == "no_document_mask":  # causal only: tokens attend into the previous packed document
        b["segment_ids"] = None
    out = model(b.pop("input_ids"), reduction="sum", return_logits=False, cp=ctx, **b)
    if mode == "local_mean_loss":  # each rank normalises by its own tokens, gradients averaged over CP
        local = [float((b["labels"] != IGNORE_INDEX).sum())] + [float((t != IGNORE_INDEX).sum()) for t in b["mtp_labels"]]
        loss = loss_of(out, [max(c, 1.0) for c in local]) / cp
    else:
        loss = loss_of(out, counts)
    loss.backward()
    moe.sequence_aux_loss = whole
    g = grads(model)
    for t in g.values():  # what FSDP's sum over DP x CP does
        dist.all_reduce(t, group=group)
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return total.item(), g


def main() -> None:
    dist.init_process_group("gloo")
    batch = packed_batch()
    counts = [float((batch["labels"] != IGNORE_INDEX).sum())]
    counts += [float((t != IGNORE_INDEX).sum()) for t in mtp_targets(batch["labels"], batch["segment_ids"], DEPTH)]
    for mode in sys.argv[1:]:
        ref_loss, ref = reference(mode, batch, counts)
        loss, g = run(mode, batch, counts)
        diff = max((g.get(n, torch.zeros_like(ref[n])) - ref[n]).abs().max().item() for n in ref)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps({"mode": mode, "loss_diff": abs(loss - ref_loss), "grad_diff": diff}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
