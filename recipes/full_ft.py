"""DeepSeek-V3 (671B) full-parameter SFT with the layout NVIDIA publishes: TP1 / PP8 / EP64.

Needs 512 H100 80GB (64 nodes): `launch recipes/full_ft.py --cluster h100-8x64`.
"""

from launcher.recipe import Checkpoint, Data, Parallel, Recipe, Train
from model.presets import deepseek_v3


def recipe() -> Recipe:
    return Recipe(
        name="dsv3-full-sft",
        model=deepseek_v3(),
        parallel=Parallel(tp=1, pp=8, ep=64, etp=1, recompute="full"),
        data=Data(kind="sft", path="/data/sft", template="chatml", answer_only_loss=True,
                  seq_length=4096, packing=True, tokenizer="/checkpoints/deepseek-v3-bf16"),
        train=Train(global_batch_size=128, micro_batch_size=1, max_steps=1000, lr=5e-6, min_lr=5e-7,
                    warmup_steps=50, weight_decay=0.1, grad_clip=1.0, precision="bf16"),
        # BF16 weights in HF format (convert the FP8 release first: moe-convert-fp8)
        checkpoint=Checkpoint(load="/checkpoints/deepseek-v3-bf16", load_format="hf", interval=100, keep=2),
    )
