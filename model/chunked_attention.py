"""MLA attention over a long key sequence in chunks, with an online softmax (FlashAttention's recurrence),
the keys and values expanded from MLA's latent one chunk at a time: for context parallelism, where each
rank's queries see every rank's keys.

Memory holds one chunk's scores (``queries x chunk x heads``) and one chunk's expanded K/V at a time, and no
mask: the causal and document masks are computed per chunk from global positions and segment ids. Forward
saves only the queries, the latent (and the LoRA path's low-rank input), the shared rope key, the output and
the log-sum-exp, all small next to the whole sequence's K/V (MLA's latent is ~1/30 of its K/V per token at
DeepSeek-V3's sizes and one TP rank's heads); backward recomputes each chunk's K/V and probabilities.
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


def _expand(sources, sl: slice, heads: int, nope: int, k_rope):
    """One chunk's keys [B, h, C, nope + rope] and values [B, h, C, v] from the latent: sum_i x_i W_i^T (the
    base projection, and LoRA's ``dropout(x) A^T`` through ``B * scaling``), per head [k_nope | v], plus the
    shared rope key."""
    kv = sum(x[:, sl] @ w.t() for x, w in sources)
    b, c, _ = kv.shape
    k_nope, v = kv.view(b, c, heads, -1).transpose(1, 2).split([nope, kv.shape[-1] // heads - nope], dim=-1)
    return torch.cat([k_nope, k_rope[:, :, sl].expand(-1, heads, -1, -1)], dim=-1), v


class LatentChunkedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v over key chunks, k and v expanded per chunk from the latent.

    q [B, h, Sq, nope + rope] (this rank's heads), k_rope [B, 1, Sk, rope]; q_pos [Sq], k_pos [Sk] global
    positions; q_seg [B, Sq], k_seg [B, Sk] segment ids or None; ``sources``: pairs (x [B, Sk, r],
    w [h * (nope + v), r]) whose products sum to the per-head [k_nope | v]. Returns [B, h, Sq, v]."""

    @staticmethod
    def forward(ctx, q, k_rope, q_pos, k_pos, q_seg, k_seg, scale: float, nope: int, *sources):
        pairs = list(zip(sources[::2], sources[1::2]))
        b, h, s_q, _ = q.shape
        s_k = k_rope.shape[2]
        step = chunk_size(b, h, s_q, s_k)
        acc = m = denom = None
        for start in range(0, s_k, step):
            sl = slice(start, start + step)
            k, v = _expand(pairs, sl, h, nope, k_rope)
            if acc is None:
                acc = torch.zeros(b, h, s_q, v.shape[-1], dtype=torch.float32, device=q.device)
                m = torch.full((b, h, s_q), float("-inf"), dtype=torch.float32, device=q.device)
                denom = torch.zeros((b, h, s_q), dtype=torch.float32, device=q.device)
            s = (q @ k.transpose(-1, -2)).float() * scale
            s = s.masked_fill(~_allowed(q_pos, k_pos[sl], q_seg, None if k_seg is None else k_seg[:, sl]), float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            safe = m_new.nan_to_num(neginf=0.0)  # rows with nothing allowed yet: keep zeros, no NaN
            p = (s - safe.unsqueeze(-1)).exp()
            correction = (m - safe).exp()
            denom = denom * correction + p.sum(-1)
            acc = acc * correction.unsqueeze(-1) + p.to(v.dtype).float() @ v.float()
            m = m_new
        out = (acc / denom.unsqueeze(-1)).to(q.dtype)
        lse = m + denom.log()
        ctx.save_for_backward(q, k_rope, out, lse, q_pos, k_pos, *(() if q_seg is None else (q_seg, k_seg)), *sources)
        ctx.scale, ctx.step, ctx.nope, ctx.segments, ctx.n_sources = scale, step, nope, q_seg is not None, len(sources)
        return out

    @staticmethod
    def backward(ctx, d_out):
        saved = ctx.saved_tensors
        q, k_rope, out, lse, q_pos, k_pos = saved[:6]
        q_seg, k_seg = saved[6:8] if ctx.segments else (None, None)
        sources = saved[len(saved) - ctx.n_sources:]
        pairs = list(zip(sources[::2], sources[1::2]))
        h, nope = q.shape[1], ctx.nope
        d_out = d_out.float()
        delta = (d_out * out.float()).sum(-1)  # rowsum(dO * O)
        qf = q.float()
        dq = torch.zeros_like(q, dtype=torch.float32)
        d_rope = torch.zeros_like(k_rope, dtype=torch.float32)
        d_x = [torch.zeros_like(x, dtype=torch.float32) for x, _ in pairs]
        d_w = [torch.zeros_like(w, dtype=torch.float32) for _, w in pairs]
        for start in range(0, k_rope.shape[2], ctx.step):
            sl = slice(start, start + ctx.step)
            k, v = _expand(pairs, sl, h, nope, k_rope)
            k, v = k.float(), v.float()
            s = (qf @ k.transpose(-1, -2)) * ctx.scale
            s = s.masked_fill(~_allowed(q_pos, k_pos[sl], q_seg, None if k_seg is None else k_seg[:, sl]), float("-inf"))
            p = (s - lse.unsqueeze(-1)).exp()
            dv = p.transpose(-1, -2) @ d_out
            ds = p * (d_out @ v.transpose(-1, -2) - delta.unsqueeze(-1))
            dq += ds @ k * ctx.scale
            dk = ds.transpose(-1, -2) @ qf * ctx.scale  # [B, h, C, nope + rope]
            d_rope[:, :, sl] = dk[..., nope:].sum(1, keepdim=True)
            d_kv = torch.cat([dk[..., :nope], dv], dim=-1).transpose(1, 2).flatten(2)  # [B, C, h * (nope + v)]
            for i, (x, w) in enumerate(pairs):
                d_x[i][:, sl] = d_kv @ w.float()
                d_w[i] += d_kv.flatten(0, 1).t() @ x[:, sl].flatten(0, 1).float()
        d_sources = []
        for (x, w), gx, gw in zip(pairs, d_x, d_w):
            d_sources += [gx.to(x.dtype), gw.to(w.dtype)]
        return (dq.to(q.dtype), d_rope.to(k_rope.dtype), None, None, None, None, None, None, *d_sources)
