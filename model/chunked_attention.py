"""Attention over a long key sequence in chunks, with an online softmax (FlashAttention's recurrence):
for context parallelism, where each rank's queries see every rank's keys.

Memory holds one chunk's scores (``queries x chunk x heads``) at a time and no mask: the causal and
document masks are computed per chunk from global positions and segment ids. Forward saves only q, k,
v, the output and the log-sum-exp; backward recomputes each chunk's probabilities from them.
"""

from __future__ import annotations

import torch

SCORE_BUDGET_BYTES = 2**30  # fp32 scores and probabilities of one chunk (queries x chunk x heads) at most


def chunk_size(batch: int, heads: int, queries: int, keys: int) -> int:
    per_key = batch * heads * queries * 4 * 2  # scores and probabilities
    return max(64, min(keys, SCORE_BUDGET_BYTES // max(per_key, 1)))


def _allowed(q_pos, k_pos, q_seg, k_seg) -> torch.Tensor:
    """[B or 1, 1, Sq, C]: causal by global position, and the same packed sequence when segments are given."""
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if q_seg is not None:
        allowed = allowed & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
    return allowed


class ChunkedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v over key chunks. q [B, h, Sq, D], k [B, h, Sk, D], v [B, h, Sk, Dv];
    q_pos [Sq], k_pos [Sk] global positions; q_seg [B, Sq], k_seg [B, Sk] segment ids or None."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, q_seg, k_seg, scale: float):
        b, h, s_q, _ = q.shape
        step = chunk_size(b, h, s_q, k.shape[2])
        acc = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device)
        m = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        denom = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
        for start in range(0, k.shape[2], step):
            sl = slice(start, start + step)
            s = (q @ k[:, :, sl].transpose(-1, -2)).float() * scale
            s = s.masked_fill(~_allowed(q_pos, k_pos[sl], q_seg, None if k_seg is None else k_seg[:, sl]), float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            safe = m_new.nan_to_num(neginf=0.0)  # rows with nothing allowed yet: keep zeros, no NaN
            p = (s - safe.unsqueeze(-1)).exp()
            correction = (m - safe).exp()
            denom = denom * correction + p.sum(-1)
            acc = acc * correction.unsqueeze(-1) + p.to(v.dtype).float() @ v[:, :, sl].float()
            m = m_new
        out = (acc / denom.unsqueeze(-1)).to(q.dtype)
        lse = m + denom.log()
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, *(() if q_seg is None else (q_seg, k_seg)))
        ctx.scale, ctx.step, ctx.segments = scale, step, q_seg is not None
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, q_pos, k_pos, *segs = ctx.saved_tensors
        q_seg, k_seg = segs if ctx.segments else (None, None)
        d_out = d_out.float()
        delta = (d_out * out.float()).sum(-1)  # rowsum(dO * O)
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        for start in range(0, k.shape[2], ctx.step):
            sl = slice(start, start + ctx.step)
            kc, vc = k[:, :, sl].float(), v[:, :, sl].float()
            s = (q.float() @ kc.transpose(-1, -2)) * ctx.scale
            s = s.masked_fill(~_allowed(q_pos, k_pos[sl], q_seg, None if k_seg is None else k_seg[:, sl]), float("-inf"))
            p = (s - lse.unsqueeze(-1)).exp()
            dv[:, :, sl] = p.transpose(-1, -2) @ d_out
            ds = p * (d_out @ vc.transpose(-1, -2) - delta.unsqueeze(-1))
            dq += ds @ kc * ctx.scale
            dk[:, :, sl] = ds.transpose(-1, -2) @ q.float() * ctx.scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None
