"""DeepSeek-V3 (671B) LoRA SFT: TP8 with sequence parallel, experts TP-sharded (EP1).

PP is left unset and derived from the cluster (PP4 on 4 nodes, PP5 on NVIDIA's 5-node layout).
"""

from launcher.recipe import Checkpoint, Data, Parallel, Peft, Recipe, Train
from model.presets import deepseek_v3


def recipe() -> Recipe:
    return Recipe(
        name="dsv3-lora-sft",
        model=deepseek_v3(),
        parallel=Parallel(tp=8, sp=True, ep=1, recompute="full"),
        data=Data(kind="sft", path="/data/sft", template="chatml", answer_only_loss=True,
                  seq_length=4096, packing=True, tokenizer="/checkpoints/deepseek-v3-bf16"),
        train=Train(global_batch_size=32, micro_batch_size=1, max_steps=500, lr=1e-4, min_lr=1e-5,
                    warmup_steps=20, weight_decay=0.0, grad_clip=1.0, precision="bf16"),
        checkpoint=Checkpoint(load="/checkpoints/deepseek-v3-bf16", load_format="hf", interval=100, keep=2),
        peft=Peft(method="lora", rank=16, alpha=32.0,
                  targets=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
    )
