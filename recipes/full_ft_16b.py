"""Moonlight-16B-A3B (DeepSeek-V3 architecture, 16B total) full-parameter SFT on 4 nodes: EP8 inside a node, DP over the rest."""

from launcher.recipe import Checkpoint, Data, Parallel, Recipe, Train
from model.presets import moonlight_16b


def recipe() -> Recipe:
    return Recipe(
        name="moonlight-16b-full-sft",
        model=moonlight_16b(),
        parallel=Parallel(tp=1, pp=1, ep=8, recompute="selective"),
        data=Data(kind="sft", path="/data/sft", template="chatml", answer_only_loss=True,
                  seq_length=4096, packing=True, tokenizer="/checkpoints/moonlight-16b"),
        train=Train(global_batch_size=128, micro_batch_size=1, max_steps=1000, lr=1e-5, min_lr=1e-6,
                    warmup_steps=50, precision="bf16"),
        checkpoint=Checkpoint(load="/checkpoints/moonlight-16b", load_format="hf", interval=200, keep=2),
    )
