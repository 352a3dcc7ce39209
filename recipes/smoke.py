"""A tiny DeepSeek-V3-style model (MLA, YaRN, group-limited sigmoid routing, MTP) on the project's
generated arithmetic SFT data, with expert parallelism over 2 processes: `launch recipes/smoke.py --cluster local`."""

from launcher.recipe import Checkpoint, Data, Parallel, Recipe, Train
from model.presets import tiny


def recipe() -> Recipe:
    return Recipe(
        name="smoke",
        model=tiny(),
        parallel=Parallel(tp=1, pp=1, ep=2),
        data=Data(kind="sft", path=None, template="chatml", answer_only_loss=True, seq_length=128, packing=True, tokenizer="byte"),
        train=Train(global_batch_size=16, micro_batch_size=4, max_steps=60, lr=3e-3, min_lr=3e-4,
                    warmup_steps=5, weight_decay=0.0, grad_clip=1.0, precision="fp32", log_interval=5),
        checkpoint=Checkpoint(interval=30, keep=2),
    )
