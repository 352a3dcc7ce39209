"""Rotary position embedding with YaRN scaling, DeepSeek's interleaved-pair layout.

DeepSeek rotates adjacent pairs (x0, x1), (x2, x3), ... . Like Hugging Face we rotate the even/odd
slices and concatenate them ([rotated evens | rotated odds]): q and k get the same permutation, so
every q.k product equals the in-place interleaved rotation's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import ModelConfig


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (fp32, CPU) for the rope head dim, YaRN-blended when rope_scaling is set."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    return (1.0 / (rs.factor * pos)) * (1 - extrapolation) + inv_freq * extrapolation


class RotaryEmbedding(nn.Module):
    """cos/sin for given positions; no parameters or buffers (safe to build on the meta device)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.rope_scaling.cos_sin_scale() if cfg.rope_scaling else 1.0
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, 1, S, rope_dim / 2]."""
        dev = position_ids.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = yarn_inv_freq(self.cfg).to(dev)
        freqs = position_ids[..., None].float() * self._inv_freq[dev]
        return (freqs.cos() * self.scale).to(dtype)[:, None], (freqs.sin() * self.scale).to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, H, S, D]; returns [rotated evens | rotated odds]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
