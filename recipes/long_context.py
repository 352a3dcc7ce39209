"""DeepSeek-V3 (671B) LoRA SFT at 64k tokens per sequence: context parallelism over 8 GPUs (TP8 x CP8 = 64 GPUs
per model replica), no pipeline; DP from the node count (8 nodes: DP1; 64 nodes: DP8).

  launch plan recipes/long_context.py --cluster h100-8x64 --nodes 8
  launch plan recipes/long_context.py --cluster h100-8x64 --nodes 8 data.seq_length=131072   # 128k

The CP the planner picks (`launch plan ... --search`): CP8 is the smallest that fits 64k with TP8 on H100 80GB
(each rank holds 8k tokens; MLA's latent is gathered from the other seven). See README "Long context".
"""

from launcher.recipe import Checkpoint, Data, Parallel, Peft, Recipe, Train
from model.presets import deepseek_v3


def recipe() -> Recipe:
    return Recipe(
        name="dsv3-lora-64k",
        model=deepseek_v3(),
        parallel=Parallel(tp=8, sp=True, cp=4, pp=1, ep=1, recompute="full"),
        data=Data(kind="sft", path="/data/sft-long", template="chatml", answer_only_loss=True,
                  seq_length=65536, packing=True, tokenizer="/checkpoints/deepseek-v3-bf16"),
        train=Train(global_batch_size=8, micro_batch_size=1, max_steps=500, lr=1e-4, min_lr=1e-5,
                    warmup_steps=20, weight_decay=0.0, grad_clip=1.0, precision="bf16"),
        checkpoint=Checkpoint(load="/checkpoints/deepseek-v3-bf16", load_format="hf", interval=50, keep=2),
        peft=Peft(method="lora", rank=16, alpha=32.0,
                  targets=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
    )
