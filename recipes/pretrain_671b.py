"""DeepSeek-V3 (671B) pretraining with NVIDIA's published layout (NeMo 2 pretrain recipe):
128 nodes x 8 H100, TP2 with sequence parallel, PP16, EP64, ETP1, full recomputation,
sequence 4096, global batch 4096.

  launch plan recipes/pretrain_671b.py --cluster h100-8x64 --nodes 128
"""

from launcher.recipe import Backend, Checkpoint, Data, Parallel, Recipe, Train
from model.presets import deepseek_v3


def recipe() -> Recipe:
    return Recipe(
        name="dsv3-pretrain",
        model=deepseek_v3(),
        parallel=Parallel(tp=2, sp=True, pp=16, ep=64, etp=1, recompute="full"),
        data=Data(kind="pretrain", path="/data/tokens/train.bin", seq_length=4096, packing=False,
                  tokenizer="/checkpoints/deepseek-v3-bf16"),
        train=Train(global_batch_size=4096, micro_batch_size=1, max_steps=100000, lr=4.2e-4, min_lr=4.2e-5,
                    warmup_steps=2000, weight_decay=0.1, grad_clip=1.0, precision="bf16", mtp_loss_weight=0.3),
        checkpoint=Checkpoint(interval=1000, keep=3),
        backend=Backend(name="nemo", container_image="nvcr.io/nvidia/nemo:25.09"),
    )
