"""DeepSeek-V3-family model configuration and the arithmetic that follows from it.

Torch-free on purpose: the launcher imports this on login nodes to count parameters, FLOPs and
memory. Field names follow Hugging Face's ``DeepseekV3Config`` so configs map one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RopeScaling:
    """YaRN RoPE scaling (``type: yarn``); the only scaling the family uses."""

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # mscale / mscale_all_dim: YaRN's attention temperature terms; None = absent from the HF config.
    mscale: Optional[float] = 1.0
    mscale_all_dim: Optional[float] = 1.0
    attention_factor: Optional[float] = None  # scales cos/sin; None = derived as Hugging Face does

    def cos_sin_scale(self) -> float:
        """The factor cos/sin are multiplied by (HF's ``attention_factor``; 1.0 for V3 and V2-Lite)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class ModelConfig:
    """A DeepSeek-V3-family decoder: MLA attention, dense first layers, then MoE layers."""

    name: str = "custom"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense (first_k_dense_replace) layers
    moe_intermediate_size: int = 2048  # one routed or shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA: queries through a low-rank path when q_lora_rank is set (V3), directly otherwise (V2-Lite).
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    scoring_func: str = "sigmoid"  # sigmoid (V3, aux-loss-free bias) | softmax (V2)
    topk_method: str = "noaux_tc"  # noaux_tc | greedy | group_limited_greedy
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.0  # sequence-wise auxiliary balance loss weight
    # norms, positions
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = field(default_factory=lambda: RopeScaling(factor=40.0))
    max_position_embeddings: int = 163840
    num_nextn_predict_layers: int = 0  # multi-token prediction modules
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    # ------------------------------------------------------------------ shapes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(self.num_hidden_layers - self.first_k_dense_replace, 0) if self.n_routed_experts else 0

    @property
    def num_dense_layers(self) -> int:
        return self.num_hidden_layers - self.num_moe_layers

    def is_moe_layer(self, index: int) -> bool:
        return self.n_routed_experts > 0 and index >= self.first_k_dense_replace

    # -------------------------------------------------------------- parameters
    def attention_params(self) -> int:
        h, H = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        else:
            q = h * H * self.qk_head_dim
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + H * self.v_head_dim * h

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def expert_params(self) -> int:
        """One routed (or shared) SwiGLU expert."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def router_params(self) -> int:
        # e_score_correction_bias is a buffer, not a parameter (as in HF and the reference).
        return self.n_routed_experts * self.hidden_size

    def layer_params(self, index: int) -> "ParamSplit":
        """Parameters of decoder layer ``index``, split into dense and routed-expert parts."""
        dense = 2 * self.hidden_size + self.attention_params()
        if self.is_moe_layer(index):
            dense += self.router_params() + self.n_shared_experts * self.expert_params()
            return ParamSplit(dense, self.n_routed_experts * self.expert_params())
        return ParamSplit(dense + self.dense_mlp_params(), 0)

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Final norm plus output projection (none when tied to the embedding)."""
        return self.hidden_size + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    def mtp_params(self) -> "ParamSplit":
        """Unique parameters of the multi-token-prediction modules (embedding and head are shared)."""
        if not self.num_nextn_predict_layers:
            return ParamSplit(0, 0)
        layer = self.layer_params(self.num_hidden_layers)  # an MTP block is a MoE layer when the model has experts
        per = ParamSplit(layer.dense + 3 * self.hidden_size + 2 * self.hidden_size * self.hidden_size, layer.experts)
        return ParamSplit(per.dense * self.num_nextn_predict_layers, per.experts * self.num_nextn_predict_layers)

    def param_split(self, include_mtp: bool = False) -> "ParamSplit":
        dense = self.embedding_params() + self.head_params()
        experts = 0
        for i in range(self.num_hidden_layers):
            p = self.layer_params(i)
            dense += p.dense
            experts += p.experts
        total = ParamSplit(dense, experts)
        return total + self.mtp_params() if include_mtp else total

    def num_params(self, include_mtp: bool = False) -> int:
        """Total parameters (as Hugging Face's DeepseekV3ForCausalLM counts them, which has no MTP)."""
        return self.param_split(include_mtp).total

    def num_active_params(self, include_mtp: bool = False) -> int:
        """Parameters touched per token: everything but the routed experts a token is not sent to."""
        unused = (self.n_routed_experts - self.num_experts_per_tok) * self.expert_params()
        moe_layers = self.num_moe_layers + (self.num_nextn_predict_layers if include_mtp and self.n_routed_experts else 0)
        return self.num_params(include_mtp) - moe_layers * unused

    # ------------------------------------------------------------------- FLOPs
    def train_flops_terms(self, seq_length: int) -> dict[str, float]:
        """Training FLOPs per token by kind: 6 x the active non-embedding parameters, split into routed
        experts (top-k of them) and the rest, plus causal attention scores (TorchTitan's count)."""
        active = self.num_active_params() - self.embedding_params()
        experts = 6.0 * self.num_moe_layers * self.num_experts_per_tok * self.expert_params()
        attn = 6.0 * self.num_hidden_layers * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * seq_length
        return {"dense": 6.0 * active - experts, "attention": attn, "experts": experts}

    def train_flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token (the sum of :meth:`train_flops_terms`)."""
        return sum(self.train_flops_terms(seq_length).values())

    # ------------------------------------------------------------ tensor inventory
    def layer_tensors(self, index: int) -> list["TensorSpec"]:
        """The parameter tensors of decoder layer ``index`` (an MTP block's layer: index >= num_hidden_layers),
        with the dimension tensor parallelism splits (Megatron's and the native trainer's TP plan alike)."""
        h, H = self.hidden_size, self.num_attention_heads
        t = []
        if self.q_lora_rank:
            t += [TensorSpec("self_attn.q_a_proj", (self.q_lora_rank, h)), TensorSpec("self_attn.q_a_layernorm", (self.q_lora_rank,)),
                  TensorSpec("self_attn.q_b_proj", (H * self.qk_head_dim, self.q_lora_rank), 0)]
        else:
            t.append(TensorSpec("self_attn.q_proj", (H * self.qk_head_dim, h), 0))
        t += [TensorSpec("self_attn.kv_a_proj_with_mqa", (self.kv_lora_rank + self.qk_rope_head_dim, h)),
              TensorSpec("self_attn.kv_a_layernorm", (self.kv_lora_rank,)),
              TensorSpec("self_attn.kv_b_proj", (H * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank), 0),
              TensorSpec("self_attn.o_proj", (h, H * self.v_head_dim), 1),
              TensorSpec("input_layernorm", (h,)), TensorSpec("post_attention_layernorm", (h,))]
        if self.is_moe_layer(index):
            E, F = self.n_routed_experts, self.moe_intermediate_size
            t += [TensorSpec("mlp.gate", (E, h)),
                  TensorSpec("mlp.experts.gate_proj", (E, F, h), 1, expert=True),
                  TensorSpec("mlp.experts.up_proj", (E, F, h), 1, expert=True),
                  TensorSpec("mlp.experts.down_proj", (E, h, F), 2, expert=True)]
            inter, prefix = self.n_shared_experts * F, "mlp.shared_experts"
        else:
            inter, prefix = self.intermediate_size, "mlp"
        if inter:
            t += [TensorSpec(f"{prefix}.gate_proj", (inter, h), 0), TensorSpec(f"{prefix}.up_proj", (inter, h), 0),
                  TensorSpec(f"{prefix}.down_proj", (h, inter), 1)]
        return t

    def mtp_block_tensors(self, eh_proj_tp: bool) -> list["TensorSpec"]:
        """One multi-token-prediction block (embedding and head are the main model's). The native
        trainer splits eh_proj over TP only with sequence parallelism."""
        h = self.hidden_size
        return [TensorSpec("enorm", (h,)), TensorSpec("hnorm", (h,)), TensorSpec("eh_proj", (h, 2 * h), 0 if eh_proj_tp else None),
                *self.layer_tensors(self.num_hidden_layers), TensorSpec("shared_head.norm", (h,))]

    def embedding_tensor(self, vocab_parallel: bool) -> "TensorSpec":
        return TensorSpec("embed_tokens", (self.vocab_size, self.hidden_size), 0 if vocab_parallel else None)

    def head_tensors(self, vocab_parallel: bool) -> list["TensorSpec"]:
        t = [TensorSpec("norm", (self.hidden_size,))]
        if not self.tie_word_embeddings:
            t.append(TensorSpec("lm_head", (self.vocab_size, self.hidden_size), 0 if vocab_parallel else None))
        return t

    # ------------------------------------------------------------------- YaRN
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def lora_target_modules(self) -> list[str]:
        """Module names a LoRA recipe may target in this model."""
        names = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        names += ["q_a_proj", "q_b_proj"] if self.q_lora_rank else ["q_proj"]
        if self.num_dense_layers or self.n_shared_experts or self.n_routed_experts:
            names += ["gate_proj", "up_proj", "down_proj"]
        return names


@dataclass(frozen=True)
class ParamSplit:
    """A parameter count split into dense (replicated or TP-sharded) and routed-expert (EP-sharded) parts."""

    dense: int
    experts: int

    @property
    def total(self) -> int:
        return self.dense + self.experts

    def __add__(self, other: "ParamSplit") -> "ParamSplit":
        return ParamSplit(self.dense + other.dense, self.experts + other.experts)


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor: its name in the model (without ``.weight``), full shape, and how it is split.

    ``tp_dim``: the dimension tensor parallelism splits (None: replicated over TP). ``expert``: routed
    experts, whose dim 0 (the expert index) expert parallelism splits."""

    name: str
    shape: tuple[int, ...]
    tp_dim: Optional[int] = None
    expert: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n
