"""Communication volumes, torch-free (the planner and benchmarks/cp_comm.py use the same formulas).

Context parallelism for MLA (trainer.context_parallel): per layer, each CP rank all-gathers the other
ranks' normalised latent and rotated rope key (kv_lora_rank + qk_rope_head_dim values per token) and
in backward reduce-scatters their gradients: (CP - 1) / CP of the sequence's latent each way. Under TP
the latent is the same on every TP rank, so each sends 1/TP of it over CP and the TP group (inside a
node) all-gathers the slices: the CP traffic per rank is divided by TP (the intra-node part is not counted).
Ring attention over full K/V (PyTorch's context_parallel, TransformerEngine's p2p) passes each rank's
K and V blocks (heads / TP x (qk_head_dim + v_head_dim) values per token) around the ring in forward,
and in backward K and V again plus their gradient accumulators (twice the forward volume).
Bytes are what one rank receives per layer per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CPBytes:
    latent_forward: float
    latent_backward: float
    ring_forward: float
    ring_backward: float

    @property
    def ours(self) -> float:
        return self.latent_forward + self.latent_backward

    @property
    def ring(self) -> float:
        return self.ring_forward + self.ring_backward

    @property
    def ratio(self) -> float:
        return self.ring / self.ours if self.ours else float("inf")


def cp_attention_bytes(cfg, seq_length: int, cp: int, tp: int = 1, micro_batch: int = 1, dtype_bytes: int = 2) -> CPBytes:
    """Bytes one CP rank receives per MLA layer and micro-batch (``cfg``: model.config.ModelConfig)."""
    others = micro_batch * seq_length * (cp - 1) / cp  # tokens held by the other CP ranks
    latent = others * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes / tp
    kv = others * cfg.num_attention_heads / tp * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
    return CPBytes(latent, latent, kv, 2 * kv)
