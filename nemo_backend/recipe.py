"""Our recipe and plan as an NVIDIA NeMo 2 recipe (``run.Partial`` of ``llm.finetune`` / ``llm.pretrain``).

Runs inside the job (NeMo's container, or the project's NeMo venv in tests): starts from NeMo's own
``llm.<family>.finetune_recipe`` / ``pretrain_recipe`` and then sets every field our recipe and plan
decide, so NeMo trains what ``launch`` planned and nothing of NeMo's defaults leaks through where we
have a value: the model's architecture field by field, the layout (TP, PP with our first/last stage
split, VPP, EP, ETP, CP, SP), recompute, batch and sequence, steps, optimizer and schedule, precision,
data (our JSONL directory through ``FineTuningDataModule``), PEFT, checkpoints, logging and resume.

:func:`values` is the same mapping as plain data (dotted NeMo path -> value), what tests compare and
what :func:`build` applies; the mapping's rules live only there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.recipe import Recipe
from launcher.tracking import Tracking, wandb_run_id
from model.config import ModelConfig
from nemo_backend.checkpoints import FILENAME as CHECKPOINT_FILENAME

# Our LoRA target names -> NeMo's (Megatron's MLA linears). NeMo's DeepSeek LoRA adapts attention only.
LORA_TARGETS = {"q_proj": "linear_q_proj", "q_a_proj": "linear_q_down_proj", "q_b_proj": "linear_q_up_proj",
                "kv_a_proj_with_mqa": "linear_kv_down_proj", "kv_b_proj": "linear_kv_up_proj", "o_proj": "linear_proj"}
# data.template -> FineTuningDataModule's prompt_template. NeMo requires "{output}" last and ends every
# answer with the tokenizer's eos (add_eos): chatml answers end with eos there, not with "<|im_end|>\n" as
# in the native trainer; plain is the same (bos aside: NeMo adds none by default).
PROMPT_TEMPLATES = {"chatml": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n{output}",
                    "plain": "{input}\n{output}", "raw": "{input}{output}"}
RECOMPUTE = {"none": (None, None, None), "selective": ("selective", None, None), "full": ("full", "uniform", 1)}


def family(cfg: ModelConfig) -> str:
    """NeMo's recipe module for the architecture: sigmoid routing is V3's; softmax V2's (V2-Lite: no q LoRA)."""
    if cfg.scoring_func == "sigmoid":
        return "deepseek_v3"
    return "deepseek_v2_lite" if cfg.q_lora_rank is None else "deepseek_v2"


def model_values(cfg: ModelConfig, recipe: Recipe) -> dict[str, Any]:
    """Megatron's DeepSeek config fields for our model (``model.config.<field>``)."""
    moe = cfg.n_routed_experts > 0
    out = {
        "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_head_dim": cfg.qk_nope_head_dim, "qk_pos_emb_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "vocab_size": cfg.vocab_size, "make_vocab_size_divisible_by": 1, "max_position_embeddings": cfg.max_position_embeddings,
        "layernorm_epsilon": cfg.rms_norm_eps, "rotary_base": cfg.rope_theta, "init_method_std": cfg.initializer_range,
        "share_embeddings_and_output_weights": cfg.tie_word_embeddings, "seq_length": recipe.data.seq_length,
        # our loss: summed over the labelled tokens and divided by their global count (NeMo requires it with CP)
        "calculate_per_token_loss": recipe.data.kind == "sft",
        "mtp_num_layers": cfg.num_nextn_predict_layers or None,
        "mtp_loss_scaling_factor": recipe.train.mtp_loss_weight if cfg.num_nextn_predict_layers else None,
    }
    if moe:
        out.update({
            "num_moe_experts": cfg.n_routed_experts, "moe_ffn_hidden_size": cfg.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": cfg.n_shared_experts * cfg.moe_intermediate_size or None,
            "moe_router_topk": cfg.num_experts_per_tok,
            "moe_layer_freq": [int(cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)],
            "moe_router_num_groups": cfg.n_group if cfg.n_group > 1 else None,
            "moe_router_group_topk": cfg.topk_group if cfg.n_group > 1 else None,
            "moe_router_topk_scaling_factor": cfg.routed_scaling_factor, "moe_router_score_function": cfg.scoring_func,
            "moe_router_enable_expert_bias": cfg.topk_method == "noaux_tc",
            "moe_router_bias_update_rate": recipe.train.bias_update_rate,
            "moe_aux_loss_coeff": cfg.aux_loss_alpha,
        })
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        out.update({"rotary_scaling_factor": rs.factor, "original_max_position_embeddings": rs.original_max_position_embeddings,
                    "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow, "mscale": rs.mscale, "mscale_all_dim": rs.mscale_all_dim})
    granularity, method, layers = RECOMPUTE[recipe.parallel.recompute]
    out.update({"recompute_granularity": granularity, "recompute_method": method, "recompute_num_layers": layers})
    return {f"model.config.{k}": v for k, v in out.items()}


def values(recipe: Recipe, plan: dict, run_dir: str) -> dict[str, Any]:
    """Every NeMo recipe field we set, as ``dotted path -> value`` (data module and PEFT config separately)."""
    lay, t = plan["layout"], recipe.train
    ranks = plan["pipeline"]["layers_per_rank"]  # Megatron's split (launcher.layout.split_layers, megatron=True)
    pp = lay["pp"]
    out = {
        "trainer.num_nodes": plan["nodes"], "trainer.devices": plan["gpus_per_node"],
        "trainer.strategy.tensor_model_parallel_size": lay["tp"],
        "trainer.strategy.pipeline_model_parallel_size": pp,
        "trainer.strategy.virtual_pipeline_model_parallel_size": lay["vpp"] if lay["vpp"] > 1 else None,
        # Megatron splits the middle ranks evenly: our plan's first and last rank (its middle ones are equal)
        "trainer.strategy.num_layers_in_first_pipeline_stage": ranks[0] if pp > 1 else None,
        "trainer.strategy.num_layers_in_last_pipeline_stage": ranks[-1] if pp > 1 else None,
        "trainer.strategy.expert_model_parallel_size": lay["ep"],
        "trainer.strategy.expert_tensor_parallel_size": lay["etp"],
        "trainer.strategy.context_parallel_size": lay["cp"],
        "trainer.strategy.sequence_parallel": bool(lay["sp"]),
        "trainer.max_steps": t.max_steps,
        "trainer.val_check_interval": t.eval_interval or t.max_steps,
        "trainer.limit_val_batches": 1.0 if t.eval_interval else 0,  # the whole validation split, or none
        "trainer.log_every_n_steps": t.log_interval,
        "trainer.plugins.precision": "bf16-mixed" if t.precision == "bf16" else "32",
        "optim.config.lr": t.lr, "optim.config.weight_decay": t.weight_decay, "optim.config.adam_beta1": t.adam_beta1,
        "optim.config.adam_beta2": t.adam_beta2, "optim.config.clip_grad": t.grad_clip,
        "optim.config.bf16": t.precision == "bf16", "optim.config.use_distributed_optimizer": True,
        "optim.lr_scheduler.warmup_steps": t.warmup_steps, "optim.lr_scheduler.min_lr": t.min_lr,
        "log.log_dir": f"{run_dir}/nemo", "log.name": recipe.name,
        "log.ckpt.every_n_train_steps": recipe.checkpoint.interval, "log.ckpt.save_top_k": recipe.checkpoint.keep,
        # checkpoint.keep means the newest N (as in the native trainer), also for runs that do not validate
        "log.ckpt.monitor": "step", "log.ckpt.mode": "max", "log.ckpt.filename": CHECKPOINT_FILENAME,
        "resume.resume_if_exists": recipe.checkpoint.resume,
    }
    if recipe.checkpoint.load:  # an HF directory is imported into the run directory first (nemo_backend.main)
        out["resume.restore_config.path"] = imported_path(run_dir) if recipe.checkpoint.load_format == "hf" else recipe.checkpoint.load
    out.update(model_values(recipe.model, recipe))
    return out


def imported_path(run_dir: str) -> str:
    """Where the job imports an HF checkpoint (checkpoint.load_format=hf) as a NeMo checkpoint before training."""
    return f"{run_dir}/nemo/imported"


def data_values(recipe: Recipe, run_dir: str) -> dict[str, Any]:
    """FineTuningDataModule's arguments for our SFT directory, or PreTrainingDataModule's for our token file
    (indexed for Megatron in the run directory at job start: :mod:`nemo_backend.data`; all of it trains, as
    in the native trainer: no validation split, no position reset at document ends)."""
    d, t = recipe.data, recipe.train
    common = {"seq_length": d.seq_length, "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size}
    if d.kind == "pretrain":
        from nemo_backend.data import megatron_prefix

        return {"paths": [megatron_prefix(run_dir)], **common, "seed": t.seed, "split": "100,0,0",
                "index_mapping_dir": f"{run_dir}/nemo/data/index"}
    return {"dataset_root": d.path, **common, "seed": t.seed,
            "dataset_kwargs": {"prompt_template": PROMPT_TEMPLATES[d.template], "label_key": "output",
                               "answer_only_loss": d.answer_only_loss, "truncation_field": "input"}}


def peft_values(recipe: Recipe) -> dict[str, Any] | None:
    p = recipe.peft
    if p.method == "none":
        return None
    return {"dim": p.rank, "alpha": p.alpha, "dropout": p.dropout, "target_modules": [LORA_TARGETS[x] for x in p.targets]}


def unsupported(recipe: Recipe) -> list[tuple[str, str]]:
    """(field, why) for what the NeMo path cannot do; checked at pre-flight (torch- and NeMo-free)."""
    out = []
    bad = [x for x in recipe.peft.targets if x not in LORA_TARGETS] if recipe.peft.method == "lora" else []
    if bad:
        out.append(("peft.targets", f"{', '.join(bad)}: NeMo's DeepSeek LoRA adapts the attention projections only; "
                                    f"valid: {', '.join(LORA_TARGETS)}"))
    if recipe.data.path is None:
        out.append(("data.path", "the nemo backend needs a data directory (the generated smoke data is the native trainer's)"))
    if recipe.data.kind == "sft" and recipe.data.packing and recipe.train.micro_batch_size != 1:
        out.append(("train.micro_batch_size", "NeMo's packed sequences need micro batch 1; set train.micro_batch_size=1 "
                                              "or data.packing=false"))
    if recipe.data.tokenizer == "byte":
        out.append(("data.tokenizer", "the nemo backend needs a Hugging Face tokenizer directory (not the built-in byte one)"))
    if recipe.parallel.pp_schedule == "gpipe":
        out.append(("parallel.pp_schedule", "Megatron runs 1f1b or interleaved_1f1b, not gpipe"))
    if recipe.train.lr_schedule != "cosine":
        out.append(("train.lr_schedule", f"{recipe.train.lr_schedule}: the nemo backend maps the cosine schedule only "
                                         "(NeMo's CosineAnnealingScheduler); use train.lr_schedule=cosine"))
    if recipe.checkpoint.load and recipe.checkpoint.load_format == "dcp":
        out.append(("checkpoint.load_format", "dcp: NeMo restores NeMo checkpoints (load_format=nemo) or imports a Hugging Face "
                                              "directory (load_format=hf); export a native run first (launch export RUN)"))
    if recipe.checkpoint.save_dir:
        out.append(("checkpoint.save_dir", "NeMo writes checkpoints under RUN/nemo/<name>/checkpoints (resumed from there); "
                                           "leave checkpoint.save_dir unset"))
    return out


def tracker_values(cfg: Tracking, run_dir: str, name: str) -> dict[str, dict]:
    """NeMoLogger's loggers for the run's trackers (launcher.tracking settings, resolved with the profile):
    Lightning's WandbLogger and MLFlowLogger arguments, the same project/mode/URI rules as the native trainer's."""
    out = {}
    if cfg.wandb:
        out["wandb"] = {"project": cfg.wandb_project, "name": name, "save_dir": cfg.wandb_dir or run_dir,
                        "offline": cfg.wandb_mode == "offline", "id": wandb_run_id(run_dir), "resume": "allow",
                        **({"entity": cfg.wandb_entity} if cfg.wandb_entity else {})}
    if cfg.mlflow:
        out["mlflow"] = {"experiment_name": cfg.mlflow_experiment, "run_name": name,
                         "tracking_uri": cfg.mlflow_tracking_uri or Path(run_dir, "mlruns").absolute().as_uri()}
    return out


def build(recipe: Recipe, plan: dict, run_dir: str, trackers: dict[str, dict] | None = None):
    """The NeMo recipe (``run.Partial``) with :func:`values` applied and ``trackers`` (:func:`tracker_values`)
    as NeMoLogger's loggers. Imports NeMo."""
    import nemo_run as run
    from nemo.collections import llm
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    fam = getattr(llm, family(recipe.model))
    common = {"dir": f"{run_dir}/nemo", "name": recipe.name, "num_nodes": plan["nodes"], "num_gpus_per_node": plan["gpus_per_node"]}
    if recipe.data.kind == "pretrain":
        r = fam.pretrain_recipe(**common)
    else:
        r = fam.finetune_recipe(**common, peft_scheme=None if recipe.peft.method == "none" else recipe.peft.method,
                                seq_length=recipe.data.seq_length, packed_sequence=recipe.data.packing)
    tokenizer = run.Config(AutoTokenizer, pretrained_model_name=recipe.data.tokenizer)
    data_cls = llm.PreTrainingDataModule if recipe.data.kind == "pretrain" else llm.FineTuningDataModule
    r.data = run.Config(data_cls, **data_values(recipe, run_dir), tokenizer=tokenizer)
    if not recipe.checkpoint.load:
        r.resume.restore_config = None  # from scratch (NeMo's recipes default to a hub checkpoint)
    for path, value in values(recipe, plan, run_dir).items():
        set_path(r, path, value)
    from nemo_backend.requeue import RequeueOnSignal

    r.trainer.callbacks = [*(r.trainer.callbacks or []), run.Config(RequeueOnSignal)]  # checkpoint + exit 75 on USR2/TERM
    trackers = trackers or {}
    if "wandb" in trackers:
        from lightning.pytorch.loggers import WandbLogger

        r.log.wandb = run.Config(WandbLogger, **trackers["wandb"])
    if "mlflow" in trackers:
        from lightning.pytorch.loggers import MLFlowLogger

        r.log.extra_loggers = [*(r.log.extra_loggers or []), run.Config(MLFlowLogger, **trackers["mlflow"])]
    peft = peft_values(recipe)
    if peft is not None:
        for key, value in peft.items():
            setattr(r.peft, key, value)
    return r


def set_path(root, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = root
    for p in parents:
        node = getattr(node, p)
    if last == "precision" and parents[-1:] == ["plugins"]:  # MegatronMixedPrecision: precision and the dtypes with it
        import torch

        dtype = torch.bfloat16 if value == "bf16-mixed" else torch.float32
        node.precision, node.params_dtype, node.pipeline_dtype = value, dtype, dtype
        return
    setattr(node, last, value)


def get_path(root, dotted: str):
    node = root
    for p in dotted.split("."):
        node = getattr(node, p)
    return node
