"""Validation during training (``train.eval_interval``): the answer-only loss on the validation split, on the
training layout itself, every rank taking part (expert parallelism and pipelining need all of them).

Without pipelining the model runs forward as in ``evaluation.loss.split_loss``. With it, the schedule runs
forward only (``schedule.eval``) over groups of exactly the micro-batch count it was built for, padded with
all-ignored micro-batches; the last stage records each micro-batch's loss sum. The MoE layers do not count
these tokens as load (they count only in training mode), so validating changes no training step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from model.transformer import IGNORE_INDEX, mtp_targets


@torch.no_grad()
def validation_loss(model, dataset, micro_batch_size: int, device, meshes, tp: int, schedule=None, stages=(), n_micro: int = 1,
                    depth: int = 0, prepare=None) -> dict:
    """{"val_loss", "val_perplexity"} of ``dataset`` (each data-parallel rank its share; ``prepare``: under context
    parallelism, this rank's part of a micro-batch, see trainer.main)."""
    from evaluation.loss import split_loss
    from trainer.data import batch_to, eval_batches

    prepare = prepare or (lambda b: b)
    dp_rank, dp_size = meshes.dp.get_local_rank(), meshes.dp.size()
    model.eval()
    try:
        if schedule is None:
            res = split_loss(model, dataset, micro_batch_size, device, dp_rank, dp_size, meshes.tokens_group, prepare=prepare)
            loss = res["loss"]
        else:
            batches = list(eval_batches(dataset, micro_batch_size, dp_rank, dp_size))
            filler = {k: v.clone() for k, v in batches[0].items()}
            filler["labels"].fill_(IGNORE_INDEX)
            batches += [filler] * (-len(batches) % n_micro)
            has_first = any(m.first for _, m in stages)
            has_last = any(m.last for _, m in stages)
            lm_sum, tokens = 0.0, 0.0
            for i in range(0, len(batches), n_micro):
                whole = batches[i:i + n_micro]  # counted on the whole sequences, then cut for CP
                local = [sum(float((b["labels"] != IGNORE_INDEX).sum()) for b in whole)]
                for k in range(depth):
                    local.append(sum(float((mtp_targets(b["labels"], b["segment_ids"], depth)[k] != IGNORE_INDEX).sum()) for b in whole))
                group = [batch_to(prepare(b), device) for b in whole]
                counts = torch.tensor(local, dtype=torch.float64)
                dist.all_reduce(counts, group=meshes.dp_group)
                for _, m in stages:
                    m.begin_step(group, counts.tolist())
                inputs = (torch.cat([b["input_ids"] for b in group]),) if has_first else ()
                target = torch.cat([b["labels"] for b in group]) if has_last else None
                schedule.eval(*inputs, target=target, losses=[] if has_last else None, return_outputs=False)
                lm_sum += sum(float(x) for _, m in stages for x in m.lm_sums)
                tokens += counts[0].item()
            total = torch.tensor([lm_sum], dtype=torch.float64)
            dist.all_reduce(total)  # only last-stage ranks hold sums; TP ranks hold copies of them
            loss = total.item() / tp / max(tokens, 1)
    finally:
        model.train()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
