"""Named model presets (torch-free). Values from the published configs, see shared/reference."""

from __future__ import annotations

from typing import Callable

from model.config import ModelConfig, RopeScaling


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 / V3-Base / R1: 671B total, 37.6B active, one MTP module."""
    return ModelConfig(name="deepseek-v3", num_nextn_predict_layers=1)


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite: 15.7B total, 2.66B active; softmax greedy routing, no q low-rank path."""
    return ModelConfig(
        name="deepseek-v2-lite",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        scoring_func="softmax",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        aux_loss_alpha=0.001,
        rope_scaling=RopeScaling(factor=40.0, mscale=0.707, mscale_all_dim=0.707),
    )


def moonlight_16b() -> ModelConfig:
    """Moonshot's Moonlight-16B-A3B: 16.0B total, 2.91B active; V3 routing, no YaRN."""
    return ModelConfig(
        name="moonlight-16b",
        vocab_size=163840,
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        rope_scaling=None,
        max_position_embeddings=8192,
    )


def moe_5b() -> ModelConfig:
    """The seed's from-scratch MoE (5.0B total, 0.79B active): hidden 1024, 24 layers, 16 experts top-2, expert dim 4096, GPT-2 vocab.

    The seed fixes only those numbers; attention is MLA with 16 heads and the V3 router.
    """
    return ModelConfig(
        name="moe-5b",
        vocab_size=50257,
        hidden_size=1024,
        intermediate_size=4096,
        moe_intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=0,
        num_experts_per_tok=2,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        rope_scaling=None,
        max_position_embeddings=4096,
    )


def tiny() -> ModelConfig:
    """A few-million-parameter DeepSeek-V3-style model for CPU smoke runs and tests (every feature on)."""
    return ModelConfig(
        name="tiny",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=128),
        max_position_embeddings=1024,
        num_nextn_predict_layers=1,
    )


def tiny_v2() -> ModelConfig:
    """Tiny V2-style variant: softmax greedy routing, no q low-rank path, no MTP."""
    return ModelConfig(
        name="tiny-v2",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        scoring_func="softmax",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_scaling=None,
        max_position_embeddings=1024,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "deepseek-v3": deepseek_v3,
    "deepseek-v2-lite": deepseek_v2_lite,
    "moonlight-16b": moonlight_16b,
    "moe-5b": moe_5b,
    "tiny": tiny,
    "tiny-v2": tiny_v2,
}


def preset(name: str) -> ModelConfig:
    """The preset called ``name``; KeyError lists the valid names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}") from None
