"""DeepSeek-V3 (671B) LoRA SFT at 64k tokens per sequence: recipes/lora.py with context parallelism over 4 GPUs
(TP8 x CP4 = 32 GPUs per model replica), no pipeline; DP from the node count (4 nodes: DP1; 64 nodes: DP16).

  launch plan recipes/long_context.py --cluster h100-8x64 --nodes 4
  launch plan recipes/long_context.py --cluster h100-8x64 --nodes 4 data.seq_length=131072 --search   # 128k

CP4 is the planner's pick: the fewest nodes (4) on which 64k fits with TP8 on H100 80GB (each rank holds 16k
tokens; MLA's latent is gathered from the other three). 128k needs CP8. See README "Long context".
"""

import dataclasses

from launcher.recipe import Recipe
from recipes import lora


def recipe() -> Recipe:
    base = lora.recipe()
    return dataclasses.replace(
        base,
        name="dsv3-lora-64k",
        parallel=dataclasses.replace(base.parallel, cp=4, pp=1),
        data=dataclasses.replace(base.data, path="/data/sft-long", seq_length=65536),
        train=dataclasses.replace(base.train, global_batch_size=8),
        checkpoint=dataclasses.replace(base.checkpoint, interval=50),
    )
