"""Pretraining the seed's from-scratch MoE (hidden 1024, 24 layers, 16 experts top-2) with expert parallelism (EP4)."""

from launcher.recipe import Checkpoint, Data, Parallel, Recipe, Train
from model.presets import moe_5b


def recipe() -> Recipe:
    return Recipe(
        name="moe-5b-pretrain",
        model=moe_5b(),
        parallel=Parallel(tp=1, pp=1, ep=4),
        data=Data(kind="pretrain", path="/data/tokens/train.bin", seq_length=2048, packing=False, tokenizer="/data/tokens/tokenizer.json"),
        train=Train(global_batch_size=256, micro_batch_size=4, max_steps=10000, lr=3e-4, min_lr=3e-5,
                    warmup_steps=500, weight_decay=0.1, grad_clip=1.0, precision="bf16"),
        checkpoint=Checkpoint(interval=500, keep=3),
    )
