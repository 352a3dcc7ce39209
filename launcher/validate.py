"""Valid values of every recipe and cluster-profile field: choices, ranges, names that become paths.

Types are checked when a config is read (launcher.config_io); this module holds what a type cannot
say: ``train.lr`` is above 0, ``gpu.assumed_mfu`` is a fraction, a profile's ``name`` is one safe path
component. Layout rules (divisibility, world size, memory) are launcher.preflight's.
"""

from __future__ import annotations

import re
from pathlib import Path

from launcher.errors import ENV_NAME, Problem, UserError
from launcher.recipe import CHOICES, Recipe
from launcher.tracking import MODES as TRACKING_MODES

# A name that becomes part of a path, a job name or an #SBATCH line: one safe path component.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SAFE_NAME_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or UNLIMITED / INFINITE.
SLURM_TIME = re.compile(r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)")
HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*|\[?[0-9A-Fa-f:.]+\]?")

# (low, high, low inclusive, high inclusive); None: unbounded. Optional fields are checked when set.
# The bounds are what a user can have meant, not what the arithmetic survives: lr 0 trains nothing.
RECIPE_RANGES: dict[str, tuple] = {
    "train.global_batch_size": (1, None, True, True),
    "train.micro_batch_size": (1, None, True, True),
    "train.max_steps": (1, None, True, True),
    "train.lr": (0, 1, False, False),
    "train.min_lr": (0, 1, True, False),
    "train.warmup_steps": (0, None, True, True),
    "train.weight_decay": (0, 1, True, True),
    "train.adam_beta1": (0, 1, True, False),
    "train.adam_beta2": (0, 1, True, False),
    "train.grad_clip": (0, None, True, True),
    "train.seed": (0, 2**63 - 1, True, True),
    "train.log_interval": (1, None, True, True),
    "train.eval_interval": (0, None, True, True),
    "train.mtp_loss_weight": (0, None, True, True),
    "train.bias_update_rate": (0, 1, True, False),
    "train.expert_load_interval": (0, None, True, True),
    "data.seq_length": (2, None, True, True),
    "checkpoint.interval": (1, None, True, True),
    "checkpoint.keep": (1, None, True, True),
    "peft.rank": (1, None, True, True),
    "peft.alpha": (0, None, False, True),
    "peft.dropout": (0, 1, True, False),
    **{f"parallel.{k}": (1, None, True, True) for k in ("tp", "pp", "vpp", "ep", "etp", "cp", "dp")},
    "model.vocab_size": (1, None, True, True),
    "model.hidden_size": (1, None, True, True),
    "model.intermediate_size": (1, None, True, True),
    "model.moe_intermediate_size": (1, None, True, True),
    "model.num_hidden_layers": (1, None, True, True),
    "model.num_attention_heads": (1, None, True, True),
    "model.q_lora_rank": (1, None, True, True),
    "model.kv_lora_rank": (1, None, True, True),
    "model.qk_nope_head_dim": (0, None, True, True),
    "model.qk_rope_head_dim": (2, None, True, True),
    "model.v_head_dim": (1, None, True, True),
    "model.n_routed_experts": (0, None, True, True),
    "model.n_shared_experts": (0, None, True, True),
    "model.num_experts_per_tok": (1, None, True, True),
    "model.first_k_dense_replace": (0, None, True, True),
    "model.n_group": (1, None, True, True),
    "model.topk_group": (1, None, True, True),
    "model.routed_scaling_factor": (0, None, False, True),
    "model.aux_loss_alpha": (0, None, True, True),
    "model.rms_norm_eps": (0, 1, False, False),
    "model.rope_theta": (0, None, False, True),
    "model.max_position_embeddings": (1, None, True, True),
    "model.num_nextn_predict_layers": (0, None, True, True),
    "model.initializer_range": (0, None, False, True),
    "model.rope_scaling.factor": (1, None, True, True),
    "model.rope_scaling.original_max_position_embeddings": (1, None, True, True),
    "model.rope_scaling.beta_fast": (0, None, False, True),
    "model.rope_scaling.beta_slow": (0, None, False, True),
}

PROFILE_RANGES: dict[str, tuple] = {
    "nodes": (1, None, True, True),
    "gpus_per_node": (1, None, True, True),
    "gpu.memory_gb": (0, None, False, True),
    "gpu.peak_tflops": (0, None, False, True),
    "gpu.assumed_mfu": (0, 1, False, True),
    "interconnect.intra_node_gbps": (0, None, False, True),
    "interconnect.inter_node_gbps": (0, None, False, True),
    "interconnect.latency_us": (0, None, True, True),
    "slurm.cpus_per_task": (1, None, True, True),
    "slurm.signal_seconds": (0, None, True, True),
    "slurm.max_requeues": (0, None, True, True),
    "slurm.rdzv_timeout": (1, None, True, True),
    "slurm.array_throttle": (1, None, True, True),
}
PROFILE_CHOICES = {"executor": ("slurm", "local"), "device": ("cuda", "cpu")}


def _get(obj: object, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part) if obj is not None else None
    return obj


def _range_error(value, low, high, low_in, high_in) -> str | None:
    """Why ``value`` is outside the range, naming the valid range; None when inside."""
    if (low is None or (value >= low if low_in else value > low)) and (high is None or (value <= high if high_in else value < high)):
        return None
    lo = "" if low is None else f"{'>=' if low_in else '>'} {low}"
    hi = "" if high is None else f"{'<=' if high_in else '<'} {high}"
    return f"must be {lo}{' and ' if lo and hi else ''}{hi}, got {value}"


def _check_ranges(obj: object, ranges: dict[str, tuple]):
    for key, bounds in ranges.items():
        value = _get(obj, key)
        if value is not None:
            why = _range_error(value, *bounds)
            if why:
                yield key, why


def recipe_problems(recipe: Recipe) -> list[Problem]:
    """Field-level problems of a recipe (choices, ranges, names): errors, and warnings for the merely odd."""
    problems: list[Problem] = []

    def add(field: str, message: str, severity: str = "error") -> None:
        problems.append(Problem(severity, field, message))

    for key, allowed in CHOICES.items():
        value = _get(recipe, key)
        if value not in allowed:
            add(key, f"{value!r} is not valid; choose one of {', '.join(allowed)}")
    for key, why in _check_ranges(recipe, RECIPE_RANGES):
        add(key, why)
    t, m = recipe.train, recipe.model
    if t.min_lr > t.lr > 0:
        add("train.min_lr", f"{t.min_lr} is above train.lr {t.lr}; make it <= {t.lr}")
    if t.warmup_steps > t.max_steps >= 1:
        add("train.warmup_steps", f"{t.warmup_steps} warmup steps of {t.max_steps}: the lr never reaches train.lr", "warning")
    if not SAFE_NAME.fullmatch(recipe.name):
        add("name", f"{recipe.name!r} is not valid; {SAFE_NAME_RULE} (it names the job and run directory)")
    for k in recipe.env:
        if not ENV_NAME.match(k):
            add(f"env.{k}", "not a valid environment variable name (letters, digits, '_', not starting with a digit)")
    if any(p.field.startswith("model.") for p in problems):
        return problems  # the relations below would repeat a range error in other words
    if m.qk_rope_head_dim % 2:
        add("model.qk_rope_head_dim", f"{m.qk_rope_head_dim} must be even (RoPE rotates pairs)")
    if m.first_k_dense_replace > m.num_hidden_layers:
        add("model.first_k_dense_replace", f"{m.first_k_dense_replace} is more than the {m.num_hidden_layers} layers")
    if m.rope_scaling is not None and m.rope_scaling.type != "yarn":
        add("model.rope_scaling.type", f"{m.rope_scaling.type!r} is not valid; the family uses 'yarn' (or model.rope_scaling=null)")
    if m.n_routed_experts and not 1 <= m.num_experts_per_tok <= m.n_routed_experts:
        add("model.num_experts_per_tok", f"{m.num_experts_per_tok} must be between 1 and n_routed_experts ({m.n_routed_experts})")
    if m.n_routed_experts and (m.n_group < 1 or m.n_routed_experts % m.n_group or not 1 <= m.topk_group <= m.n_group):
        add("model.n_group", f"{m.n_group} groups with topk_group {m.topk_group} do not split {m.n_routed_experts} experts; "
                             "n_group must divide the experts and 1 <= topk_group <= n_group")
    elif m.n_routed_experts and m.topk_group * (m.n_routed_experts // m.n_group) < m.num_experts_per_tok:
        add("model.topk_group", f"{m.topk_group} groups of {m.n_routed_experts // m.n_group} experts cannot supply "
                                f"{m.num_experts_per_tok} experts per token; raise topk_group")
    return problems


def check_profile(profile, path: Path) -> None:
    """Raise UserError for the first invalid field of a cluster profile read from ``path``."""
    where = f"{path}: "
    if not SAFE_NAME.fullmatch(profile.name):
        raise UserError(f"{profile.name!r} is not valid; {SAFE_NAME_RULE} (it names run directories and jobs)", f"{where}name")
    if profile.name != path.stem:
        raise UserError(f"profile file {path.name} declares name {profile.name!r}; make it {path.stem!r} (or rename the file)", f"{where}name")
    for key, allowed in PROFILE_CHOICES.items():
        if getattr(profile, key) not in allowed:
            raise UserError(f"{getattr(profile, key)!r} is not valid; choose one of {', '.join(allowed)}", f"{where}{key}")
    for key, why in _check_ranges(profile, PROFILE_RANGES):
        raise UserError(why, f"{where}{key}")
    if profile.tracking.wandb_mode not in TRACKING_MODES:
        raise UserError(f"{profile.tracking.wandb_mode!r} is not valid; choose one of {', '.join(TRACKING_MODES)}",
                        f"{where}tracking.wandb_mode")
    for key in profile.env:
        if not ENV_NAME.match(key):
            raise UserError("not a valid environment variable name (letters, digits, '_', not starting with a digit)", f"{where}env.{key}")
    s = profile.slurm
    if not SLURM_TIME.fullmatch(s.time):
        raise UserError(f"{s.time!r} is not a Slurm time limit; use e.g. 04:00:00, 2-00:00:00 or 90 (minutes)", f"{where}slurm.time")
    if s.rdzv_host is not None and not HOST.fullmatch(s.rdzv_host):
        raise UserError(f"{s.rdzv_host!r} is not a host name or IP address", f"{where}slurm.rdzv_host")
    for i, mount in enumerate(profile.container.mounts):
        parts = mount.split(":")
        if "," in mount or not 2 <= len(parts) <= 3 or not all(parts[:2]):
            raise UserError(f"{mount!r} is not src:dst[:flags] (no commas: pyxis separates mounts with them)",
                            f"{where}container.mounts[{i}]")
    if profile.container.image is not None and (not profile.container.image or profile.container.image != profile.container.image.strip()):
        raise UserError(f"{profile.container.image!r} is not an image name (empty or surrounded by spaces)", f"{where}container.image")
    if profile.python is not None and not profile.python.strip():
        raise UserError("empty; give the interpreter on the nodes (e.g. python3 or /opt/venv/bin/python) or remove the key", f"{where}python")
