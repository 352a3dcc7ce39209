"""The tiny model at a long sequence with context parallelism over 2 processes: `launch recipes/long_context_smoke.py --cluster local`.

2048-token packed rows of the smoke data (many documents per row, crossing the CP chunks); each process
holds two 512-token chunks and gathers MLA's latent from the other.
"""

from launcher.recipe import Checkpoint, Data, Parallel, Recipe, Train
from model.presets import tiny


def recipe() -> Recipe:
    return Recipe(
        name="smoke-long",
        model=tiny(),
        parallel=Parallel(tp=1, pp=1, ep=1, cp=2),
        data=Data(kind="sft", path=None, template="chatml", answer_only_loss=True, seq_length=2048, packing=True, tokenizer="byte"),
        train=Train(global_batch_size=4, micro_batch_size=1, max_steps=30, lr=3e-3, min_lr=3e-4,
                    warmup_steps=3, weight_decay=0.0, grad_clip=1.0, precision="fp32", log_interval=5),
        checkpoint=Checkpoint(interval=30, keep=2),
    )
