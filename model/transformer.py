"""The DeepSeek-V3 decoder: embedding, MLA + (dense MLP | MoE) layers, final norm, LM head, MTP modules.

Parameter names follow the Hugging Face hub layout (``self_attn.q_a_proj``, ``mlp.gate``, ...) so that
conversion is a prefix and the expert stacking; layers live in a ModuleDict keyed by their global index,
so a pipeline stage that keeps a subset keeps the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import MLA
from model.config import ModelConfig
from model.moe import MLP, MoE, GroupedExperts, Router
from model.norm import RMSNorm
from model.rope import RotaryEmbedding

IGNORE_INDEX = -100


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cp=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cp=cp)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, cp=cp) if cp is not None and isinstance(self.mlp, MoE) else self.mlp(h))


class MTPModule(DecoderLayer):
    """Multi-token prediction depth k: h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h)]) -> decoder layer -> norm.

    The embedding and output head are the main model's (shared). ``h`` is the previous depth's output
    (the main model's post-final-norm hidden state for k = 1, as in Hugging Face and Megatron).
    """

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__(cfg, index)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, emb_next, cos, sin, mask=None, cp=None):
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h)], dim=-1))
        return self.shared_head.norm(super().forward(x, cos, sin, mask, cp=cp))


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # main + mtp_loss_weight * mtp_loss (what to backpropagate)
    lm_loss: torch.Tensor | None = None  # next-token cross entropy, mean over labelled tokens
    mtp_loss: torch.Tensor | None = None  # mean over MTP depths
    tokens: torch.Tensor | None = None  # labelled tokens in the batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of logits [.., V] against labels (already aligned: label i is the target at position i)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction)


def mtp_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None, depth: int) -> list[torch.Tensor]:
    """Targets of MTP depths 1..depth: labels shifted left by k, never across a packed sequence boundary."""
    out = []
    for k in range(1, depth + 1):
        target = torch.roll(labels, -k, dims=1)
        target[:, -k:] = IGNORE_INDEX
        if segment_ids is not None:
            target = target.masked_fill(torch.roll(segment_ids, -k, dims=1) != segment_ids, IGNORE_INDEX)
        out.append(target)
    return out


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask that also keeps packed sequences apart: [B, S] ids -> boolean [B, 1, S, S]."""
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]


class DeepseekV3(nn.Module):
    def __init__(self, cfg: ModelConfig, mtp_loss_weight: float = 0.1):
        super().__init__()
        self.cfg = cfg
        self.mtp_loss_weight = mtp_loss_weight
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList([MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)])
        self.rope = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, return_logits: bool = True, reduction: str = "mean",
                cp=None, mtp_inputs: list | None = None, mtp_labels: list | None = None) -> CausalLMOutput:
        """input_ids [B, S]; labels [B, S] aligned with positions (IGNORE_INDEX = no loss); segment_ids for packing.

        ``reduction="sum"``: lm_loss is the summed token loss and mtp_loss the per-depth sums [D] (loss is
        None); a distributed trainer divides by its global token counts (see :func:`mtp_targets`).
        ``cp``: context parallelism (trainer.context_parallel): the tensors are this rank's part of the
        sequence, positions global; ``mtp_inputs``/``mtp_labels`` are then the tokens and targets k ahead,
        taken from the whole sequence (a local shift would cross chunk boundaries).
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        if cp is not None:  # no whole mask: attention masks chunk by chunk from positions and these segments
            cp.set_segments(segment_ids)
            mask = None
        else:
            mask = segment_mask(segment_ids) if segment_ids is not None else None
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask, cp=cp)
        h = self.norm(h)
        logits = self.lm_head(h)
        if labels is None:
            return CausalLMOutput(logits)
        lm_loss = causal_lm_loss(logits, labels, reduction)
        out = CausalLMOutput(logits if return_logits else None, lm_loss if reduction == "mean" else None, lm_loss,
                             tokens=(labels != IGNORE_INDEX).sum())
        if len(self.mtp) and self.mtp_loss_weight > 0:
            mtp_losses = []
            targets = mtp_labels if mtp_labels is not None else mtp_targets(labels, segment_ids, len(self.mtp))
            for k, (module, target) in enumerate(zip(self.mtp, targets), start=1):
                ahead = mtp_inputs[k - 1] if mtp_inputs is not None else torch.roll(input_ids, -k, dims=1)
                h = module(h, self.embed_tokens(ahead), cos, sin, mask, cp=cp)
                mtp_losses.append(causal_lm_loss(self.lm_head(h), target, reduction))
            out.mtp_loss = torch.stack(mtp_losses) if reduction == "sum" else torch.stack(mtp_losses).mean()
            if reduction == "mean":
                out.loss = lm_loss + self.mtp_loss_weight * out.mtp_loss
        return out

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zero routing bias."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = self.cfg.initializer_range
        for module in self.modules():
            tensors = []
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                tensors = [module.weight]
            elif isinstance(module, GroupedExperts):
                tensors = [module.gate_proj, module.up_proj, module.down_proj]
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            for t in tensors:
                if gen is None:
                    t.normal_(0.0, std)
                else:  # drawn on the CPU in fp32: the same weights on every device and dtype
                    t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
            if isinstance(module, Router) and hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.zero_()
            if isinstance(module, MoE):
                module.tokens_per_expert.zero_()


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0, mtp_loss_weight: float = 0.1) -> DeepseekV3:
    """Build and initialise; ``device="meta"`` builds shapes only (no memory, nothing initialised)."""
    with torch.device(device):
        model = DeepseekV3(cfg, mtp_loss_weight)
    if str(device) != "meta":
        model.init_weights(seed)
        model.to(dtype)
        for m in model.modules():  # routing state stays fp32
            if isinstance(m, Router) and hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
            if isinstance(m, MoE):
                m.tokens_per_expert.data = m.tokens_per_expert.data.float()
    return model
