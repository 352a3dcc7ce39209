"""MLA's compressed KV cache: per token and layer, the normalised latent (kv_lora_rank values) and the
rotated shared rope key (qk_rope_head_dim values), nothing per head.

For DeepSeek-V3 that is 512 + 64 = 576 values per token per layer, where caching expanded keys and
values would take 128 heads x (192 + 128) = 40,960: 71x more. Decoding attends over the latent with
the absorbed projections (``generation.decode``), so the per-head keys and values are never built.

One preallocated tensor [layers, batch, max_len, kv_lora_rank + qk_rope_head_dim]; rows are aligned
by slot (prompts are left-padded to one length), ``length`` slots are filled.
"""

from __future__ import annotations

import torch


class LatentCache:
    def __init__(self, layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.rank, self.rope_dim, self.max_len = kv_lora_rank, rope_dim, max_len
        self.data = torch.zeros(layers, batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype: torch.dtype, device) -> "LatentCache":
        return cls(cfg.num_hidden_layers, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)

    @property
    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x layers x dtype size: what one more token of one sequence costs."""
        layers, _, _, width = self.data.shape
        return layers * width * self.data.element_size()

    def write(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Append latent [B, S, rank] and k_rope [B, S, rope] at slots length .. length + S (``advance`` moves on)."""
        s = latent.shape[1]
        if self.length + s > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {self.length} used, {s} more asked")
        slot = self.data[layer, :, self.length:self.length + s]
        slot[..., :self.rank] = latent
        slot[..., self.rank:] = k_rope

    def advance(self, n: int) -> None:
        self.length += n

    def read(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent [B, T, rank], k_rope [B, T, rope]) of the first ``upto`` slots."""
        kv = self.data[layer, :, :upto]
        return kv[..., :self.rank], kv[..., self.rank:]
