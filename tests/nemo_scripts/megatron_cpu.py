"""The Megatron DeepSeek model our NeMo job configures, built and trained one step on CPU (world 1, gloo).

Run by tests/test_nemo_backend.py with the NeMo venv's Python: ``python megatron_cpu.py RUN_DIR``. The model
config is the one ``nemo_backend.main`` builds from a run directory (``r.model.config``); only what has no
CPU form is changed: fp32, CPU initialisation, no fusions, the local (non-TransformerEngine) layer spec, no
grouped GEMM, the all-gather token dispatcher. Megatron-core 0.16 still calls CUDA in a few places on
this path; each is pointed at the CPU equivalent below (see ../shared/reference/dependencies.md). A wiring
check of our configuration, not NeMo's production path (TE, grouped GEMM, all-to-all, bf16 on GPUs).
"""

import json
import math
import os
import sys
from pathlib import Path

import torch

# ---- CUDA calls megatron-core makes on this path, mapped to the CPU
torch.cuda.current_device = lambda: "cpu"  # YaRN rope: .to(device=torch.cuda.current_device())
import megatron.core.tensor_parallel.random as mrandom  # noqa: E402

mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
torch.cuda.manual_seed = lambda seed: None

import megatron.core.transformer.dot_product_attention as mdpa  # noqa: E402

_dpa_init = mdpa.DotProductAttention.__init__


def _dpa_init_mla(self, *args, k_channels=None, v_channels=None, **kwargs):
    """MLA passes TE's k_channels/v_channels; the local attention has one head size: give it the value's."""
    _dpa_init(self, *args, **kwargs)
    if v_channels is not None:
        self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


mdpa.DotProductAttention.__init__ = _dpa_init_mla
import megatron.core.transformer.multi_latent_attention as mla  # noqa: E402

mla.HAVE_TE = False  # its TE import "succeeds" through NeMo's stubs, leaving TELinear = None
import megatron.core.transformer.moe.moe_utils as moe_utils  # noqa: E402

moe_utils.te_general_gemm = None  # the router's GEMM: referenced without TE, defined only with it

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", sys.argv[2] if len(sys.argv) > 2 else "29555")
dist.init_process_group("gloo", rank=0, world_size=1)
parallel_state.initialize_model_parallel(1, 1)
mrandom.model_parallel_cuda_manual_seed(1234)

import fiddle as fdl  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec  # noqa: E402

from nemo_backend.main import write_config  # noqa: E402

run_dir = Path(sys.argv[1])
r = write_config(run_dir)
cfg = fdl.build(r.model.config)
for key, value in dict(use_cpu_initialization=True, perform_initialization=True, params_dtype=torch.float32, bf16=False,
                       fp16=False, pipeline_dtype=torch.float32, autocast_dtype=torch.float32, moe_grouped_gemm=False,
                       moe_token_dispatcher_type="allgather", moe_shared_expert_overlap=False, gradient_accumulation_fusion=False, bias_activation_fusion=False,
                       bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
                       persist_layer_norm=False, moe_permute_fusion=False, cross_entropy_loss_fusion=False,
                       attention_dropout=0.0, hidden_dropout=0.0).items():
    setattr(cfg, key, value)
spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=cfg.vocab_size,
                 max_sequence_length=cfg.seq_length, position_embedding_type="rope",
                 mtp_block_spec=get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False) if cfg.mtp_num_layers else None)
B, S = 2, 16
g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
position_ids = torch.arange(S).expand(B, S)
mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), 1)  # True: masked
losses = model(tokens, position_ids, mask, labels=labels)
loss = losses.float().mean()
loss.backward()
names = [n for n, p in model.named_parameters() if p.requires_grad]
no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
zero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
print("RESULT " + json.dumps({"loss": loss.item(), "numel": sum(p.numel() for p in model.parameters()), "ln_vocab": math.log(cfg.vocab_size), "params": len(names),
                              "no_grad": no_grad, "zero_grad": zero,
                              "experts": sum("experts" in n for n in names), "router": sum("router" in n for n in names),
                              "num_layers": cfg.num_layers, "moe_layer_freq": cfg.moe_layer_freq,
                              "mtp": cfg.mtp_num_layers}))
