"""Batched generation with MLA's compressed cache.

Prefill runs the prompt through the model as training does (keys and values expanded from the latent,
fused attention) and stores each layer's latent and rope key. Each decode step then attends over the
cache with the absorbed projections: the query's no-rope part goes through W_UK into latent space,
scores are taken against the cached latent (plus the rope part against the cached rope key), the
weighted latent goes through W_UV and o_proj. No per-head key or value is ever built while decoding.

Prompts of different lengths are left-padded to one length: padding is masked out of every attention
and each row's positions start at 0 on its first real token, so a row's tokens do not depend on the
other rows of its batch. Distributed (TP/EP): every rank of a job runs the same number of steps
(``all_done`` agrees on when to stop), because each MoE layer exchanges tokens between ranks.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from generation.cache import LatentCache


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if hasattr(w, "to_local") else w


def absorbed_weights(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_UK [h, nope, rank], W_UV [h, v, rank]): kv_b_proj per head, this rank's heads, LoRA folded in."""
    proj = attn.kv_b_proj
    w = _local(proj.weight)
    if hasattr(proj, "lora_A"):  # colwise under TP: B split like the weight, A whole
        w = w + (_local(proj.lora_B.weight) @ _local(proj.lora_A.weight)).to(w.dtype) * proj.scaling
    w = w.view(-1, attn.nope + attn.v_dim, attn.kv_rank)
    return w[:, :attn.nope], w[:, attn.nope:]


def absorbed_attention(attn, q_nope, q_rope, latent, k_rope, key_valid: torch.Tensor) -> torch.Tensor:
    """q_nope [B, h, S, nope], q_rope [B, h, S, rope] against the cache: latent [B, T, rank], k_rope [B, T, rope];
    key_valid [B, T] (False: padding). The heads are this rank's (kv_b_proj split by TP). ``attn.absorbed_kv``
    holds the absorbed weights once a model is loaded for inference; else they are computed here."""
    b, _, s, _ = q_nope.shape
    cached = getattr(attn, "absorbed_kv", None)
    w_uk, w_uv = cached if cached is not None and cached[0].dtype == q_nope.dtype else absorbed_weights(attn)
    q_latent = torch.einsum("bhsn,hnr->bhsr", q_nope, w_uk)
    scores = torch.einsum("bhsr,btr->bhst", q_latent, latent) + torch.einsum("bhsd,btd->bhst", q_rope, k_rope)
    scores = (scores.float() * attn.scale).masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(latent.dtype)
    out = torch.einsum("bhsr,hvr->bhsv", torch.einsum("bhst,btr->bhsr", probs, latent), w_uv)
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))


@torch.no_grad()
def forward_cached(model, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache, key_valid: torch.Tensor) -> torch.Tensor:
    """Run ids [B, S] (S > 1 only as the first call: the prompt) and return the last position's logits [B, V] in fp32.
    key_valid [B, cache.length + S]: which cache slots hold real tokens."""
    s = ids.shape[1]
    prefill = cache.length == 0
    if not prefill and s != 1:
        raise ValueError("after the prompt, tokens are decoded one step at a time")
    h = model.embed_tokens(ids)
    cos, sin = model.rope(positions, h.dtype)
    mask = None
    if prefill and not bool(key_valid.all()):
        eye = torch.eye(s, dtype=torch.bool, device=ids.device)  # a padding query attends to itself, not to nothing
        mask = ((torch.ones(s, s, dtype=torch.bool, device=ids.device).tril() & key_valid[:, None, :]) | eye)[:, None]
    for i, layer in enumerate(model.layers.values()):
        attn = layer.self_attn
        q_nope, q_rope, latent, k_rope = attn.project(layer.input_layernorm(h), cos, sin)
        cache.write(i, latent, k_rope[:, 0])
        if prefill:
            a = attn.attend(q_nope, q_rope, latent, k_rope, mask)
        else:
            a = absorbed_attention(attn, q_nope, q_rope, *cache.read(i, cache.length + s), key_valid)
        h = h + a
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    cache.advance(s)
    return model.lm_head(model.norm(h[:, -1:]))[:, -1].float()


def sample(logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Greedy when temperature is 0; else softmax(logits / temperature) cut to the smallest set of tokens
    whose mass reaches top_p, each row drawn with its own generator (on the CPU): a row's tokens depend on
    its seed only, not on the batch it shares or the device."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    gens = generators or [None] * probs.shape[0]
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[:, 0] for p, g in zip(probs, gens)]).to(logits.device)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
             temperature: float = 0.0, top_p: float = 1.0, generators: Sequence[torch.Generator] | None = None,
             max_positions: int | None = None, all_done: Callable[[bool], bool] | None = None,
             device: torch.device | str = "cpu", stand_in: bool = False) -> tuple[list[list[int]], LatentCache]:
    """New tokens of each prompt (a stop token included when one ended it), and the cache used.

    A row stops at a stop token, after ``max_new_tokens``, or when it reaches ``max_positions``.
    ``all_done(local_done) -> global_done`` keeps distributed ranks stepping together; a ``stand_in``
    batch (a rank without prompts) only steps along with them."""
    lens = [len(p) for p in prompts]
    if not prompts or min(lens) == 0:
        raise ValueError("every prompt needs at least one token")
    b, width = len(prompts), max(lens)
    limit = max_positions or model.cfg.max_position_embeddings
    budget = [max(0, min(max_new_tokens, limit - n)) for n in lens]
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[r, width - len(p):] = True
    pads = torch.tensor([width - n for n in lens])
    positions = (torch.arange(width)[None, :] - pads[:, None]).clamp(min=0)
    ids, valid, positions, pads = (t.to(device) for t in (ids, valid, positions, pads))
    dtype = model.embed_tokens.weight.dtype
    cache = LatentCache.for_model(model.cfg, b, width + max(max_new_tokens, 1), dtype, device)
    logits = forward_cached(model, ids, positions, cache, valid)
    out: list[list[int]] = [[] for _ in prompts]
    done = [stand_in or n == 0 for n in budget]
    stops = set(int(t) for t in stop_ids)
    step = 0
    while True:
        nxt = sample(logits, temperature, top_p, generators)
        for r, tok in enumerate(nxt.tolist()):
            if not done[r]:
                out[r].append(tok)
                done[r] = tok in stops or len(out[r]) >= budget[r]
        finished = all(done)
        if all_done is not None:
            finished = all_done(finished)
        if finished or step + 1 >= max(max_new_tokens, 1):
            break
        valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool, device=valid.device)], dim=1)
        logits = forward_cached(model, nxt[:, None], (width + step - pads)[:, None], cache, valid)
        step += 1
    return out, cache
