"""The recipe schema: typed dataclasses describing one training job.

A recipe file (``recipes/*.py``) defines ``recipe() -> Recipe``. Overrides and YAML round trips are
type-checked against these classes (launcher.config_io); value ranges live in launcher.validate.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from launcher.tracking import MODES as TRACKING_MODES, Tracking
from model.config import ModelConfig


@dataclass
class Parallel:
    """Parallel layout. ``None`` means: derive from the cluster. DP is always derived."""

    tp: Optional[int] = None  # tensor parallel
    pp: Optional[int] = None  # pipeline stages
    vpp: Optional[int] = None  # virtual stages per pipeline rank (interleaved schedule)
    ep: Optional[int] = None  # expert parallel
    etp: Optional[int] = None  # tensor parallel inside experts (Megatron default: = tp)
    cp: Optional[int] = None  # context parallel
    sp: bool = False  # sequence parallel (needs tp > 1)
    dp: Optional[int] = None  # leave unset; if set, must equal the derived value
    pp_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b | gpipe
    recompute: str = "none"  # none | selective | full


@dataclass
class Data:
    kind: str = "sft"  # sft | pretrain
    # sft: a directory with training.jsonl / validation.jsonl / test.jsonl (NeMo's format);
    # pretrain: a tokenized memory-mapped file. None: the project's generated smoke dataset.
    path: Optional[str] = None
    template: str = "chatml"  # chat template for sft: chatml | plain | raw (text rendered by launch data sft --template jinja)
    answer_only_loss: bool = True
    seq_length: int = 4096
    packing: bool = True
    tokenizer: str = "byte"  # "byte" (built-in) or a directory/file with tokenizer.json


@dataclass
class Train:
    global_batch_size: int = 128
    micro_batch_size: int = 1
    max_steps: int = 1000
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 50
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 | fp32
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 0  # 0: no evaluation
    mtp_loss_weight: float = 0.1
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step
    expert_load_interval: int = 10  # steps per record of per-layer expert load (RUN/expert_load/; 0: off)


@dataclass
class Checkpoint:
    load: Optional[str] = None  # weights to start from; None: fresh init
    load_format: str = "hf"  # hf (safetensors directory) | dcp (a moe-launch checkpoint) | nemo (a NeMo checkpoint)
    save_dir: Optional[str] = None  # None: <run dir>/checkpoints
    interval: int = 1000  # steps between checkpoints
    keep: int = 2  # newest checkpoints kept
    resume: bool = True  # continue from the newest checkpoint in save_dir


@dataclass
class Peft:
    method: str = "none"  # none | lora
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"])


@dataclass
class Backend:
    name: str = "native"  # native (our PyTorch trainer) | nemo (NVIDIA NeMo in its container)
    container_image: Optional[str] = None  # overrides the cluster profile's image; nemo needs one


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: Parallel = field(default_factory=Parallel)
    data: Data = field(default_factory=Data)
    train: Train = field(default_factory=Train)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    peft: Peft = field(default_factory=Peft)
    backend: Backend = field(default_factory=Backend)
    tracking: Tracking = field(default_factory=Tracking)  # Weights & Biases / MLflow, off unless asked
    # extra environment for the job: values reach it byte for byte (shell-quoted), newlines included
    env: Dict[str, str] = field(default_factory=dict, metadata={"multiline": True})


def fingerprint(recipe: "Recipe") -> str:
    """What must not change across a resume: the model and the PEFT setup."""
    import hashlib  # here: importing it costs a dry run ~5 ms, and only resumes need it
    blob = json.dumps({"model": dataclasses.asdict(recipe.model), "peft": dataclasses.asdict(recipe.peft)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Allowed values of the string-choice fields, checked after overrides (see launcher.validate).
CHOICES: dict[str, tuple[str, ...]] = {
    "parallel.pp_schedule": ("1f1b", "interleaved_1f1b", "gpipe"),
    "parallel.recompute": ("none", "selective", "full"),
    "data.kind": ("sft", "pretrain"),
    "data.template": ("chatml", "plain", "raw"),
    "train.lr_schedule": ("cosine", "linear", "constant"),
    "train.precision": ("bf16", "fp32"),
    "checkpoint.load_format": ("hf", "dcp", "nemo"),
    "peft.method": ("none", "lora"),
    "backend.name": ("native", "nemo"),
    "tracking.wandb_mode": TRACKING_MODES,
    "model.scoring_func": ("sigmoid", "softmax"),
    "model.topk_method": ("noaux_tc", "greedy", "group_limited_greedy"),
}
