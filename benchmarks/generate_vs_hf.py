"""Cached generation: ours (MLA latent cache, absorbed decode) vs transformers' generate, same weights and prompts.

Config (DeepSeek-V3's attention proportions, scaled down): hidden 512, 4 layers (1 dense + 3 MoE), 16 heads
with nope/rope/v dims 64/32/64 over a kv_lora_rank of 128 (heads x (nope + v) = 16x the latent), q_lora 256,
16 routed experts top-4 + 1 shared, vocab 4096, YaRN. Greedy, batch 4 x 1024-token prompts, 128 new tokens,
fp32 on 2 CPU threads; both must produce the same tokens. Reports new tokens per second (prefill included),
the decode-only rate, and the KV cache bytes each holds at the end. Targets: ours >= 2x HF, cache >= 10x smaller.

    python benchmarks/generate_vs_hf.py [--batch 4] [--prompt 1024] [--new 128] [--threads 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from generation.decode import generate
from generation.loading import load_model
from model.hf_config import load_config


def config(max_positions: int) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        max_position_embeddings=max_positions, initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": max_positions // 4, "rope_theta": 10000.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})


def hf_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each (the best counts)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = config(max(2048, args.prompt + args.new))
    hf = DeepseekV3ForCausalLM._from_config(cfg, attn_implementation="sdpa").float().eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours, _ = load_model(load_config(d), hf_dir=d)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt), generator=g)
    eos = -1  # never stop early: both decode exactly --new tokens

    def run_ours():
        out, cache = generate(ours, prompts.tolist(), args.new, [eos], 0)
        return [o for o in out], cache.length * cache.bytes_per_token * args.batch

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0,
                              return_dict_in_generate=True)
        return [row[args.prompt:].tolist() for row in out.sequences], hf_cache_bytes(out.past_key_values)

    def prefill_ours():
        return generate(ours, prompts.tolist(), 1, [eos], 0)

    def prefill_hf():
        with torch.no_grad():
            return hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=1, do_sample=False,
                               eos_token_id=None, pad_token_id=0)

    def best(fn):
        times, result = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        return min(times), result

    run_ours(), run_hf()  # warm-up
    t_ours, (tok_ours, bytes_ours) = best(run_ours)
    t_hf, (tok_hf, bytes_hf) = best(run_hf)
    p_ours, _ = best(prefill_ours)
    p_hf, _ = best(prefill_hf)
    same = tok_ours == tok_hf
    n = args.batch * args.new
    print(f"config: hidden 512, 4 layers (3 MoE, 16 experts top-4), 16 heads, kv_lora_rank 128, fp32, cpu, {args.threads} threads; "
          f"batch {args.batch} x {args.prompt}-token prompts, {args.new} new tokens, greedy; same tokens: {same}")
    print(f"ours: {n / t_ours:,.1f} new tokens/s ({t_ours:.2f} s; decode only {(n - args.batch) / max(t_ours - p_ours, 1e-9):,.1f} tokens/s)   "
          f"HF transformers {transformers_version()} (sdpa): {n / t_hf:,.1f} new tokens/s ({t_hf:.2f} s; decode only "
          f"{(n - args.batch) / max(t_hf - p_hf, 1e-9):,.1f} tokens/s)   ratio ours/HF {t_hf / t_ours:.2f}x (target >= 2x)")
    print(f"KV cache at the end: ours {bytes_ours / 2**20:.2f} MiB, HF {bytes_hf / 2**20:.2f} MiB   ratio HF/ours "
          f"{bytes_hf / max(bytes_ours, 1):.2f}x (target >= 10x; an expanded per-head cache would be "
          f"{args.batch * (args.prompt + args.new) * 4 * 16 * (96 + 64) * 4 / 2**20:.1f} MiB, "
          f"{16 * (96 + 64) / (128 + 32):.0f}x ours)")
    if not same:
        raise SystemExit("the two generations differ")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
