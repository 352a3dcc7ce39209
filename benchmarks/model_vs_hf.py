"""Training throughput (forward + backward) of our model vs Hugging Face's DeepseekV3ForCausalLM, same config
and weights, one process, CPU by default.

Config (a small MoE): hidden 256, 4 layers (1 dense + 3 MoE), 16 routed experts top-4 in 4 groups
(keep 2), 1 shared expert, expert dim 256, MLA with q_lora 128 / kv_lora 64, vocab 4096, YaRN;
batch 2 x seq 1024, in fp32 and in bf16. HF runs with its SDPA attention (its fastest on CPU). Target: ours >= 2x HF.

    python benchmarks/model_vs_hf.py [--seq 1024] [--batch 2] [--dtype fp32 bf16] [--steps 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from model.hf_io import load_hf_model
from model.transformer import IGNORE_INDEX


def hf_config(seq: int) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=4096, hidden_size=256, intermediate_size=704, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=max(4 * seq, 2048),
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": max(seq, 512), "rope_theta": 10000.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})


def tokens_per_second(step, n_tokens: int, steps: int, device: str) -> float:
    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return n_tokens * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    for name in args.dtype:
        run(args, name)


def run(args: argparse.Namespace, dtype_name: str) -> None:
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    cfg = hf_config(args.seq)
    hf_impl = "sdpa"
    hf = DeepseekV3ForCausalLM._from_config(cfg, attn_implementation=hf_impl)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf_model(d, device=args.device, dtype=dtype)
    hf = hf.to(args.device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=ids, labels=ids).loss.backward()

    def our_step():
        ours.zero_grad(set_to_none=True)
        ours(ids, labels=labels).loss.backward()

    with torch.no_grad():
        diff = (hf(input_ids=ids).logits.float() - ours(ids).logits.float()).abs().max().item()
    n = args.batch * args.seq
    ours_tps = tokens_per_second(our_step, n, args.steps, args.device)
    hf_tps = tokens_per_second(hf_step, n, args.steps, args.device)
    print(f"config: hidden 256, 4 layers (3 MoE), 16 experts top-4, batch {args.batch} x seq {args.seq}, {dtype_name}, {args.device}, "
          f"{torch.get_num_threads()} threads; max |logit diff| {diff:.2e}")
    print(f"ours: {ours_tps:,.0f} tokens/s   HF transformers {__import__('transformers').__version__} ({hf_impl}): {hf_tps:,.0f} tokens/s   "
          f"ratio ours/HF {ours_tps / hf_tps:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
