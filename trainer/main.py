"""The job entry point torchrun starts on every rank: ``python -m trainer.main --run-dir RUN_DIR``.

Reads the run directory the launcher wrote (recipe.yaml, cluster.yaml, plan.yaml), builds the model
on the meta device, parallelises it per the plan, materialises only this rank's shards, trains,
checkpoints and resumes.

Exit codes: 0 done; 75 (REQUEUE_EXIT_CODE) checkpointed after SIGUSR2, requeue me; 2 a configuration
the job refuses (resume into an incompatible layout, a bad run directory); anything else: a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.cluster import ClusterProfile
from launcher.config_io import load_yaml_into
from launcher.recipe import Recipe
from launcher.render import REQUEUE_EXIT_CODE
from launcher.rundir import read_plan
from model.moe import AuxLossGrad, imbalance as load_imbalance, update_expert_bias
from model.transformer import IGNORE_INDEX, build_model, mtp_targets
from trainer import checkpoint
from trainer.context_parallel import ContextParallel, split_batch
from trainer.data import batch_to, build_train_loader
from trainer.entry import EXIT_CODE_FILE, init_distributed, run_entry
from trainer.expert_load import ExpertLoadRecorder, record_peak_memory
from trainer.lora import apply_lora, freeze_in_bf16, init_lora
from trainer.metrics import MetricsLogger, peak_memory_gib, static_bytes
from trainer.optim import build_optimizer, clip_grad_norm, lr_at
from trainer.pipeline import PipelineRankModel, build_schedule, build_stages, shared_embedding_group, sync_shared_embedding
from trainer.parallel import apply_activation_checkpointing, apply_fsdp, dp_all_reduce, materialize, set_parallel
from trainer.tokenizer import load_tokenizer


def start_trackers(recipe, profile, run_dir: Path):
    """W&B / MLflow on rank 0 when the recipe or the profile asks (trackers/); None when neither does."""
    from launcher.tracking import resolve

    cfg = resolve(recipe.tracking, profile.tracking)
    if not (cfg.wandb or cfg.mlflow):
        return None
    from trackers import Trackers

    return Trackers(cfg, run_dir, run_dir.name, recipe)


class StopFlag:
    """Set by SIGUSR2 (forwarded by the sbatch script ahead of the time limit, or sent by hand) and by
    SIGTERM (Slurm preempting the job, which it then requeues itself): checkpoint at the end of the step, stop."""

    def __init__(self):
        self.requested = False
        self.name = ""
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        self.name = self.name or signal.Signals(signum).name


def load_run(run_dir: Path) -> tuple[Recipe, ClusterProfile, dict]:
    """The run directory's recipe, profile and plan; UserError (one line, exit 2) names a missing or corrupt file."""
    return load_yaml_into(Recipe, run_dir / "recipe.yaml"), load_yaml_into(ClusterProfile, run_dir / "cluster.yaml"), read_plan(run_dir)


def load_weights(model, path: str, fmt: str, peft, partial: bool = False) -> tuple[str, bool]:
    """Starting weights: an HF-format directory (each rank reads only its regions) or a moe-launch DCP
    checkpoint (see checkpoint.load_start_weights). ``partial``: this rank holds only some layers (a
    pipeline stage). Returns (a line for the log, whether LoRA adapters came with the weights)."""
    path = Path(os.path.expanduser(path))
    if fmt == "hf":
        from model.hf_io import load_hf_weights

        load_hf_weights(model, path, ignore_unexpected=partial)
        return f"started from {path} (Hugging Face weights)", False
    return checkpoint.load_start_weights(model, path, peft)


def _global_sum(values: list[float], group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def _report_static_memory(run_dir: Path, plan: dict, model, optimizer, pp_rank: int, log) -> None:
    """RUN_DIR/memory.json: each rank's bytes of weights, gradients and optimizer states, next to the
    plan's estimate for its pipeline rank; one summary line for the fullest rank."""
    mine = {"rank": dist.get_rank(), "pp_rank": pp_rank, **static_bytes(model, optimizer)}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() != 0:
        return
    planned = plan.get("memory", {}).get("static_per_pp_rank")
    (run_dir / "memory.json").write_text(json.dumps({"ranks": everyone, "plan": planned}, indent=1) + "\n")
    worst = max(everyone, key=lambda e: e["weights"] + e["grads"] + e["optimizer"])
    est = planned[worst["pp_rank"]] if planned else None
    parts = [f"{k} {worst[k] / 2**20:.2f} MiB" + (f" (plan {est[k] / 2**20:.2f})" if est else "") for k in ("weights", "grads", "optimizer")]
    log.info(f"moe-launch: static memory of the fullest rank ({worst['rank']}): " + ", ".join(parts))


def _ranks_per_node(nodes: list[str]) -> str:
    """'node(s) n1 (ranks 0-3), n2 (ranks 4-7)': where torchrun put the ranks."""
    spans: dict[str, list[int]] = {}
    for r, n in enumerate(nodes):
        spans.setdefault(n, []).append(r)
    parts = [f"{n} (rank{'s' * (len(r) > 1)} {r[0]}{'-' + str(r[-1]) if len(r) > 1 else ''})" for n, r in spans.items()]
    return f"node{'s' * (len(spans) > 1)} " + ", ".join(parts)


def train(run_dir: Path) -> int:
    recipe, profile, plan = load_run(run_dir)
    layout = plan["layout"]
    device = init_distributed(profile.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = layout["tp"] * layout["pp"] * layout["cp"] * layout["dp"]
    if world != expected:
        raise SystemExit(f"moe-launch: error: {world} ranks started, the plan needs {expected}")
    cp = layout.get("cp", 1)
    stop = StopFlag()
    # which node each rank runs on (SLURMD_NODENAME under Slurm: emulated nodes share a hostname)
    nodes: list = [None] * world
    dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    if rank == 0:
        (run_dir / EXIT_CODE_FILE).unlink(missing_ok=True)
    train_cfg, data_cfg = recipe.train, recipe.data
    save_dir = Path(recipe.checkpoint.save_dir or run_dir / "checkpoints")
    current = {"fingerprint": checkpoint.fingerprint(recipe), "layout": layout}
    found = checkpoint.latest(save_dir) if recipe.checkpoint.resume else None
    if found is not None:  # before building anything: a refused resume costs seconds, not a model load
        try:
            checkpoint.check_compatible(json.loads((found / "trainer.json").read_text()), current)
        except checkpoint.ResumeRefused as exc:
            raise SystemExit(f"moe-launch: error: cannot resume from {found}: {exc}") from None
    torch.manual_seed(train_cfg.seed)

    # model: shapes on meta, parallelise, then allocate and initialise only this rank's shards
    model = build_model(recipe.model, device="meta", mtp_loss_weight=train_cfg.mtp_loss_weight)
    if recipe.peft.method == "lora":
        apply_lora(model, recipe.peft, seed=train_cfg.seed)  # adapters on meta too; initialised after loading
        if train_cfg.precision == "bf16":
            freeze_in_bf16(model)  # frozen base weights need no fp32 master copy: half their memory
    meshes = set_parallel(model, device.type, layout)
    pp, pp_rank = layout["pp"], meshes.pp.get_local_rank()
    if pp > 1:
        stages = build_stages(model, pp, layout["vpp"], pp_rank)
        model = PipelineRankModel(model, [m for _, m in stages])  # what this rank holds, with the usual names
        parts = [m for _, m in stages]
    else:
        stages, parts = [], [model]
    bf16 = train_cfg.precision == "bf16"
    for part in parts:
        apply_activation_checkpointing(part, recipe.parallel.recompute)
        apply_fsdp(part, meshes, torch.bfloat16 if bf16 else None)
        materialize(part, device, train_cfg.seed)
    started, adapters_loaded = None, False
    if recipe.checkpoint.load and found is None:  # a resume restores its own weights instead
        started, adapters_loaded = load_weights(model, recipe.checkpoint.load, recipe.checkpoint.load_format, recipe.peft, partial=pp > 1)
    if recipe.peft.method == "lora" and not adapters_loaded:
        init_lora(model, train_cfg.seed)
    model.train()
    optimizer = build_optimizer(model, train_cfg)
    has_first = any(m.first for _, m in stages)
    has_last = any(m.last for _, m in stages)
    uses_mtp = recipe.model.num_nextn_predict_layers > 0 and train_cfg.mtp_loss_weight > 0
    embed_group = shared_embedding_group(meshes.world, pp) if pp > 1 and uses_mtp else None  # same on every rank

    def pipeline_loss(loss, labels):  # the last stage already returns the normalised loss
        return loss

    dp_rank, dp_size = meshes.dp.get_local_rank(), meshes.dp.size()
    cp_rank, cp_group = meshes.cp.get_local_rank(), meshes.cp.get_group()
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise SystemExit(f"moe-launch: error: tokenizer has {tokenizer.vocab_size} tokens, model.vocab_size is {recipe.model.vocab_size}")
    loader = build_train_loader(data_cfg, train_cfg, tokenizer, dp_rank, dp_size)
    n_micro = loader.micro_batches_per_step
    schedule = build_schedule(stages, pp * layout["vpp"], n_micro, recipe.parallel.pp_schedule, device, meshes.pp.get_group(),
                              pipeline_loss, train_cfg.micro_batch_size, data_cfg.seq_length // cp,
                              torch.bfloat16 if bf16 else torch.float32,
                              data_cfg.seq_length // cp // layout["tp"] if layout["sp"] else None) if pp > 1 else None
    AuxLossGrad.scale = train_cfg.micro_batch_size / train_cfg.global_batch_size  # mean over all micro-batches

    def this_rank_part(b: dict) -> dict:
        """Under CP: this rank's part of every sequence, and how to see the rest (trainer.context_parallel)."""
        if cp == 1:
            return b
        b = split_batch(b, cp, cp_rank, depth, pad_id)
        b["cp"] = ContextParallel.for_batch(cp_group, b.pop("cp_index"), meshes.tp.get_group())
        return b

    start = 0
    log = MetricsLogger(run_dir, train_cfg.max_steps, rank == 0, data_cfg.seq_length * train_cfg.global_batch_size,
                        start_trackers(recipe, profile, run_dir) if rank == 0 else None)
    if found is not None:
        saved = checkpoint.load(found, model, optimizer, current)
        start = saved["step"]
        loader.load_state_dict(saved["data"])
        rewound = log.rewind(start)
        log.info(f"moe-launch: resumed from {found} at step {start}" + ("" if saved["layout"] == layout else f" (layout was {saved['layout']})")
                 + (f"; {rewound} step record(s) after it moved to metrics.rewound.jsonl (those steps run again)" if rewound else ""))
    log.info(f"moe-launch: training {recipe.name}: {recipe.model.name} on {world} rank(s) on {_ranks_per_node(nodes)}, layout {layout}, "
             f"{n_micro} micro-batch(es) of {train_cfg.micro_batch_size} x {data_cfg.seq_length} per rank per step; data {loader.stats()}")

    if started:
        log.info(f"moe-launch: {started}")
    val_set = None
    if train_cfg.eval_interval:
        from trainer.data import build_dataset
        from trainer.validation import validation_loss

        val_set = build_dataset(data_cfg, tokenizer, "validation")
    flops_per_token = recipe.model.train_flops_per_token(data_cfg.seq_length)
    peak_flops = profile.gpu.peak_tflops * 1e12
    reduce = dp_all_reduce(meshes)
    depth = recipe.model.num_nextn_predict_layers if train_cfg.mtp_loss_weight > 0 else 0
    step, last_checkpoint = start, found
    writer = meshes.dp.get_local_rank() == 0 and cp_rank == 0 and meshes.tp.get_local_rank() == 0
    load_log = ExpertLoadRecorder(run_dir, model, train_cfg.expert_load_interval, pp_rank, writer, start if found is not None else None)
    count_step = int(os.environ.get("MOE_LAUNCH_COUNT_COMM", "0"))  # trainer.comm_count: bytes of one step, for tests
    while step < train_cfg.max_steps:
        t0 = time.perf_counter()
        counter = None
        if count_step == step + 1:
            from trainer.comm_count import CommCounter

            counter = CommCounter()
            counter.__enter__()
        lr = lr_at(step, train_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = loader.step_batches()
        # global counts of labelled tokens (main and each MTP depth) normalise the summed losses
        local = [sum(float((b["labels"] != IGNORE_INDEX).sum()) for b in batches)]
        for k in range(depth):
            local.append(sum(float((mtp_targets(b["labels"], b["segment_ids"], depth)[k] != IGNORE_INDEX).sum()) for b in batches))
        counts = _global_sum(local, meshes.dp_group)
        lm_sum = 0.0
        if schedule is not None:
            side = [batch_to(this_rank_part(b), device) for b in batches]
            for _, m in stages:
                m.begin_step(side, counts)
            inputs = (torch.cat([b["input_ids"] for b in side]),) if has_first else ()
            target = torch.cat([b["labels"] for b in side]) if has_last else None
            schedule.step(*inputs, target=target, losses=[] if has_last else None, return_outputs=False)
            lm_sum = sum(float(x) for _, m in stages for x in m.lm_sums)
            sync_shared_embedding(model, embed_group)
        for i, b in enumerate(batches if schedule is None else []):
            model.set_requires_gradient_sync(i == len(batches) - 1)  # reduce gradients once per step
            b = batch_to(this_rank_part(b), device)
            out = model(b.pop("input_ids"), return_logits=False, reduction="sum", **b)
            loss = out.lm_loss / max(counts[0], 1)
            if depth:
                loss = loss + train_cfg.mtp_loss_weight * sum(out.mtp_loss[k] / max(counts[1 + k], 1) for k in range(depth)) / depth
            loss.backward()
            lm_sum += float(out.lm_loss.detach())
        grad_norm = float(clip_grad_norm(model, train_cfg.grad_clip, meshes.pp_size,
                                         skip={model.embed_tokens.weight} if getattr(model, "embedding_copy", False) else ()))
        optimizer.step()
        if step == start:  # the first step here: gradients and optimizer states now exist
            _report_static_memory(run_dir, plan, model, optimizer, pp_rank, log)
        optimizer.zero_grad(set_to_none=True)
        loads = update_expert_bias(model, train_cfg.bias_update_rate, reduce)
        worst = torch.tensor(load_imbalance(loads) if loads is not None else 0.0)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # pipeline ranks hold different layers
        imbalance = worst.item()
        step += 1
        if pp > 1:  # only last-stage ranks have the loss; TP ranks hold copies of it
            (loss_sum,) = _global_sum([lm_sum])
            loss_sum /= layout["tp"]
        else:
            (loss_sum,) = _global_sum([lm_sum], meshes.tokens_group)  # TP ranks hold the same loss: sum over DP x CP only
        (stop_votes,) = _global_sum([float(stop.requested)])  # every rank stops at the same step
        ends = step == train_cfg.max_steps or stop_votes > 0
        load_log.add(loads, step, ends)
        if load_log.due(step, ends):
            record_peak_memory(run_dir, peak_memory_gib(device), step)
        elapsed = time.perf_counter() - t0
        tokens = counts[0]
        tps = data_cfg.seq_length * train_cfg.global_batch_size / elapsed
        metrics = {"loss": loss_sum / max(counts[0], 1), "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tps,
                   "label_tokens": int(tokens), "mfu": flops_per_token * tps / world / peak_flops,
                   "expert_imbalance": imbalance, "mem_gib": peak_memory_gib(device),
                   "step_seconds": elapsed}
        if val_set is not None and (step % train_cfg.eval_interval == 0 or step == train_cfg.max_steps):
            metrics.update(validation_loss(model, val_set, train_cfg.micro_batch_size, device, meshes, layout["tp"], schedule,
                                           stages, n_micro, depth, prepare=this_rank_part))
        if counter is not None:
            from trainer.comm_count import write

            counter.__exit__(None, None, None)
            write(counter.records, run_dir, rank)
        log.log(step, metrics, console=step % train_cfg.log_interval == 0 or step == train_cfg.max_steps or step == start + 1)
        interval_hit = recipe.checkpoint.interval and step % recipe.checkpoint.interval == 0
        if interval_hit or step == train_cfg.max_steps or stop_votes > 0:
            state = {"step": step, "data": loader.state_dict(), "layout": layout, "fingerprint": current["fingerprint"],
                     "recipe": recipe.name, "peft": dataclasses.asdict(recipe.peft)}
            last_checkpoint = checkpoint.save(save_dir, step, model, optimizer, state, recipe.checkpoint.keep)
            log.info(f"moe-launch: checkpoint {last_checkpoint}")
        if stop_votes > 0 and step < train_cfg.max_steps:
            if rank == 0:
                (run_dir / EXIT_CODE_FILE).write_text(f"{REQUEUE_EXIT_CODE} checkpointed at step {step} after {stop.name or 'a stop signal'}\n")
            log.info(f"moe-launch: stopping at step {step} after {stop.name or 'a stop signal on another rank'}; exit {REQUEUE_EXIT_CODE} asks for a requeue")
            log.summary("stopped", step, last_checkpoint)
            log.close()
            load_log.close()
            return REQUEUE_EXIT_CODE
    log.summary("done", step, last_checkpoint)
    log.close()
    load_log.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    run_entry("python -m trainer.main", train, argv, success=(0, REQUEUE_EXIT_CODE))


if __name__ == "__main__":
    main()
