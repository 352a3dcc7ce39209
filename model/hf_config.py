"""Hugging Face ``config.json`` <-> :class:`ModelConfig` (torch-free: the launcher reads model directories with it).

transformers v4 writes YaRN settings as ``rope_scaling``, v5 as ``rope_parameters``; both are read,
and both are written so either version loads our exports.

The model_type decides the router in transformers (DeepseekV3: sigmoid + noaux_tc; DeepseekV2: softmax,
greedy or group_limited_greedy, never renormalised), so import reads absent keys with that model_type's
defaults (``_FAMILY_DEFAULTS``) and export picks the model_type from the routing (:func:`hf_model_type`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from model.config import ModelConfig, RopeScaling

_HF_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "scoring_func",
              "topk_method", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "aux_loss_alpha",
              "rms_norm_eps", "max_position_embeddings", "num_nextn_predict_layers", "tie_word_embeddings",
              "initializer_range"]
_ROPE_FIELDS = ["factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"]

# What a key left out of config.json (or null, q_lora_rank excepted) means, per model_type: transformers'
# DeepseekV3Config / DeepseekV2Config defaults (5.x), so a file loads here as it does there. scoring_func and
# topk_method are no transformers config fields: its DeepseekV3 router is always sigmoid + noaux_tc, its
# DeepseekV2 router softmax (topk_method default "greedy"); V2's n_group/topk_group default None = no groups.
# Not here: num_nextn_predict_layers (MTP is outside transformers' forward; absent = none), aux_loss_alpha
# (training only), V2's num_experts_per_tok (no default there). Other model_types: ModelConfig's defaults.
_FAMILY_DEFAULTS: dict[str, dict] = {
    "deepseek_v3": {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
                    "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
                    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
                    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
                    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 4096, "tie_word_embeddings": False, "initializer_range": 0.02},
    "deepseek_v2": {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "q_lora_rank": 1536, "kv_lora_rank": 512,
                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
                    "n_shared_experts": 2, "first_k_dense_replace": 0,
                    "scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                    "norm_topk_prob": False, "routed_scaling_factor": 1.0, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 2048, "tie_word_embeddings": False, "initializer_range": 0.02},
}


def config_from_hf(hf: dict, name: str = "hf") -> ModelConfig:
    """ModelConfig from a config.json dict (transformers v4 ``rope_scaling`` or v5 ``rope_parameters``)."""
    model_type = hf.get("model_type")
    present = {k: hf[k] for k in _HF_FIELDS if k in hf and (hf[k] is not None or k == "q_lora_rank")}
    fields = {**_FAMILY_DEFAULTS.get(model_type, {}), **present}
    if model_type == "deepseek_v2" and fields["norm_topk_prob"]:
        # transformers' DeepseekV2TopkRouter never renormalises (DeepSeek's own V2 code would, for k > 1)
        warnings.warn("deepseek_v2 config sets norm_topk_prob; transformers' DeepseekV2 ignores it: loaded as false", stacklevel=2)
        fields["norm_topk_prob"] = False
    cfg = ModelConfig(name=name, **fields)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    cfg.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "yarn":
        cfg.rope_scaling = RopeScaling(
            factor=float(rope["factor"]), original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
            mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"), attention_factor=rope.get("attention_factor"))
    elif kind in ("default", None):
        cfg.rope_scaling = None
    else:
        raise ValueError(f"rope type {kind!r} is not used by the DeepSeek-V3 family (yarn or default)")
    if "n_routed_experts" in hf and hf.get("n_routed_experts") is None:
        cfg.n_routed_experts = 0
    return cfg


_ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers model_type whose forward computes ``cfg``'s: ``deepseek_v3`` for sigmoid routing,
    ``deepseek_v2`` for softmax. ValueError, naming the field, for a routing neither expresses (an export
    under the other model_type would load there as a different model)."""
    if cfg.scoring_func == "sigmoid":
        if cfg.topk_method != "noaux_tc":
            raise ValueError(f"topk_method {cfg.topk_method!r} with scoring_func 'sigmoid' has no Hugging Face equivalent: "
                             "transformers' DeepseekV3 routes sigmoid with noaux_tc only (DeepseekV2: softmax)")
        return "deepseek_v3"
    if cfg.scoring_func == "softmax":
        if cfg.topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method {cfg.topk_method!r} with scoring_func 'softmax' has no Hugging Face equivalent: "
                             "transformers' DeepseekV2 routes softmax with greedy or group_limited_greedy only")
        if cfg.norm_topk_prob:
            raise ValueError("norm_topk_prob true with scoring_func 'softmax' has no Hugging Face equivalent: "
                             "transformers' DeepseekV2 never renormalises the top-k weights (use norm_topk_prob false)")
        return "deepseek_v2"
    raise ValueError(f"scoring_func {cfg.scoring_func!r} has no Hugging Face equivalent (sigmoid: DeepseekV3, softmax: DeepseekV2)")


def config_to_hf(cfg: ModelConfig, dtype: str = "bfloat16", bos_token_id: int | None = 0, eos_token_id: int | None = 1) -> dict:
    """config.json for DeepseekV3ForCausalLM (sigmoid routing) or DeepseekV2ForCausalLM (softmax), readable by
    transformers v4 and v5 (no quantization section); ValueError for a routing transformers cannot express.

    Both get every routing field (DeepseekV2Config reads topk_method, n_group, topk_group, routed_scaling_factor
    and norm_topk_prob; scoring_func, aux_loss_alpha, moe_layer_freq and num_nextn_predict_layers are for
    DeepSeek's own code and ours). rope_interleave is DeepseekV3's switch; DeepseekV2 always interleaves.
    """
    model_type = hf_model_type(cfg)
    hf = {"architectures": [_ARCHITECTURES[model_type]], "model_type": model_type, "hidden_act": "silu",
          "num_key_value_heads": cfg.num_attention_heads, "attention_bias": False, "attention_dropout": 0.0,
          "moe_layer_freq": 1, **({"rope_interleave": True} if model_type == "deepseek_v3" else {}), "torch_dtype": dtype,
          "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    hf.update({k: getattr(cfg, k) for k in _HF_FIELDS})
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": "yarn", "type": "yarn", "rope_theta": cfg.rope_theta,
                **{k: getattr(rs, k) for k in _ROPE_FIELDS if getattr(rs, k) is not None}}
    hf["rope_parameters"] = rope
    hf["rope_scaling"] = None if cfg.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"}
    hf["rope_theta"] = cfg.rope_theta
    return hf


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    return config_from_hf(json.loads((path / "config.json").read_text()), name=path.name)
