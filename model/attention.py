"""Multi-head Latent Attention (DeepSeek-V2/V3).

q = W_qb(norm(W_qa x)) (V3) or W_q x (V2-Lite); per head [q_nope | q_rope].
The keys and values come from a compressed latent: W_kva x = [c_kv | k_rope]; norm(c_kv) -> W_kvb ->
per head [k_nope | v]; k_rope is one head shared by all heads. RoPE touches only the rope parts.
Attention runs through scaled_dot_product_attention (fused kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.norm import RMSNorm
from model.rope import apply_rope

LATENT_NORM_EPS = 1e-6  # q_a/kv_a norms: fixed in the reference implementations, not rms_norm_eps


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale()
        h, heads, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * cfg.v_head_dim, h, bias=False)
        # Under tensor parallelism each rank holds some heads; the shared rope key feeds all of them, so
        # its gradient must be summed over the TP group. The trainer installs that here.
        self.shared_key_hook = None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, H] -> q_nope [B, h, S, nope], q_rope [B, h, S, rope] (rotated), the normalised latent
        [B, S, kv_lora_rank] and the rotated shared key k_rope [B, 1, S, rope]: what MLA caches is the last two."""
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q = q.view(b, s, -1, self.nope + self.rope).transpose(1, 2)  # heads from the weight: TP-friendly
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin), self.kv_a_layernorm(latent), apply_rope(k_rope.view(b, 1, s, self.rope), cos, sin)

    def attend(self, q_nope, q_rope, latent, k_rope, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of the queries over the keys/values expanded from the latent (through kv_b_proj), then o_proj.
        mask: None (causal, as many queries as keys) or a boolean [B, 1, S_q, S_k] (True = attend)."""
        b, s_k, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, s_k, -1, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        # Fused (flash) kernels want one head dim for q, k and v: pad v with zeros, drop the padding after.
        pad = q.shape[-1] - self.v_dim
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)) if pad > 0 else v, attn_mask=mask,
                                             is_causal=mask is None, scale=self.scale)
        if pad > 0:
            out = out[..., : self.v_dim]
        return self.o_proj(out.transpose(1, 2).reshape(b, q.shape[2], -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None, cp=None) -> torch.Tensor:
        """x [B, S, H]; mask: None (causal) or a boolean [B, 1, S, S] (True = attend).

        ``cp`` (context parallelism, trainer.context_parallel): x is this rank's part of the sequence; the
        latent and the rotated shared key (what MLA's K/V come from, ~70x smaller than K/V) are gathered
        from every CP rank, and the local queries attend to all of them (:meth:`attend_long`; ``mask`` unused)."""
        q_nope, q_rope, latent, k_rope = self.project(x, cos, sin)
        if cp is not None:
            latent, k_rope = cp.gather(latent, 1), cp.gather(k_rope, 2)
        if self.shared_key_hook is not None:  # after the gather: its gradient arrives summed over TP, as the latent's
            k_rope = self.shared_key_hook(k_rope)
        if cp is not None:
            return self.attend_long(q_nope, q_rope, latent, k_rope, cp)
        return self.attend(q_nope, q_rope, latent, k_rope, mask)

    def attend_long(self, q_nope, q_rope, latent, k_rope, cp) -> torch.Tensor:
        """Under CP: local queries over every rank's keys, in chunks with an online softmax, each chunk's K/V
        expanded from the gathered latent on the fly (model.chunked_attention): neither the whole sequence's
        K/V nor its scores nor a mask are ever in memory; the masks come chunk by chunk from ``cp``'s global
        positions and segment ids."""
        from model.chunked_attention import LatentChunkedAttention

        proj = self.kv_b_proj
        sources = [(latent, _local(proj.weight))]
        if hasattr(proj, "lora_A"):  # LoRA (trainer.lora.LoRALinear): x W^T + B(A(dropout(x))) * scaling
            low = F.linear(proj.lora_dropout(latent), _local(proj.lora_A.weight))
            sources.append((low, _local(proj.lora_B.weight) * proj.scaling))
        if self.shared_key_hook is not None:  # TP: each rank's heads give part of the latent's gradient; sum it
            sources = [(self.shared_key_hook(x), w) for x, w in sources]
        q = torch.cat([q_nope, q_rope], dim=-1)
        out = LatentChunkedAttention.apply(q, k_rope, cp.index, cp.all_index, cp.segments, cp.all_segments, self.scale,
                                           self.nope, *(t for pair in sources for t in pair))
        b = q.shape[0]
        return self.o_proj(out.transpose(1, 2).reshape(b, q.shape[2], -1))


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor-parallel (DTensor) weight, differentiably; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return weight.to_local() if isinstance(weight, DTensor) else weight
